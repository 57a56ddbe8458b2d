"""vLLM's view of a KBVQ checkpoint: the quantization config ``kbvq`` and which layers it quantizes.

``from_config`` reads ``quantization_config``; ``maybe_update_config`` validates the checkpoint's
tensors before any layer is built; ``get_quant_method`` gives listed MoE layers and their
shared-expert linears the methods of :mod:`.methods`. Attention, router, embeddings and unlisted
layers stay unquantized. Import only inside a process that has vLLM.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from vllm.model_executor.layers.fused_moe import RoutedExperts
from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig

from ..archs import ARCHS, layer_index
from ..format import QUANT_METHOD, KBVQConfig, validate_checkpoint
from .methods import KBVQLinearMethod, KBVQMoEMethod

__all__ = ["KBVQQuantConfig"]


class KBVQQuantConfig(QuantizationConfig):
    """``quantization_config`` of a KBVQ checkpoint, as vLLM sees it."""

    def __init__(self, cfg: KBVQConfig):
        super().__init__()
        self.kbvq = cfg
        self.arch = ARCHS[cfg.arch]
        self.layers = frozenset(cfg.layers)

    def __repr__(self) -> str:
        return f"KBVQQuantConfig(bits={self.kbvq.bits}, vector_dim={self.kbvq.vector_dim}, arch={self.kbvq.arch})"

    @classmethod
    def get_name(cls) -> str:
        return QUANT_METHOD

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 70

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> KBVQQuantConfig:
        return cls(KBVQConfig.from_dict(config))

    def maybe_update_config(self, model_name: str, hf_config=None, revision: str | None = None):
        # Check every tensor's presence, shape and dtype now, with names, rather than
        # failing (or silently skipping) later inside a loader or a kernel.
        if Path(model_name).is_dir():
            validate_checkpoint(model_name)

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        index = layer_index(prefix)
        quantized = index is not None and index in self.layers
        if isinstance(layer, RoutedExperts):
            return KBVQMoEMethod(self, layer.moe_config, index) if quantized else (
                UnquantizedFusedMoEMethod(layer.moe_config))
        if isinstance(layer, LinearBase):
            wtypes = self.arch.shared_linear_types(prefix, index) if quantized and self.kbvq.shared_intermediate_size else None
            return KBVQLinearMethod(self, wtypes, index) if wtypes else UnquantizedLinearMethod()
        return None
