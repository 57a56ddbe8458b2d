"""vLLM methods of ``kbvq``: routed experts (:class:`KBVQMoEMethod`) and shared-expert linears.

The lifecycle is vLLM's (see its ``moe_wna16.py``): ``create_weights`` registers parameters of
:meth:`.layout.GroupLayout.load_shapes` (the codes still packed, as the checkpoint holds them) with
loaders that copy this rank's part of each checkpoint tensor; ``process_weights_after_loading``
unpacks the codes into the runtime layout and asks :func:`vllm_kbvq.kernels.dispatch.bind` for the
op ``apply`` calls (the native CPU op where the codes are in its layout, else the ``torch.ops.kbvq``
custom op).

Import only inside a process that has vLLM.
"""
from __future__ import annotations

from functools import partial

import torch
from vllm.model_executor.layers.fused_moe import FusedMoEMethodBase
from vllm.model_executor.layers.fused_moe.config import FUSED_MOE_UNQUANTIZED_CONFIG
from vllm.model_executor.layers.linear import LinearMethodBase
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.utils import replace_parameter, set_weight_attrs

from ..format import SUFFIXES, FormatError
from ..kernels import dispatch  # registers torch.ops.kbvq.*
from .layout import GroupLayout, load_tensor, moe_banks, process_codes, shared_layout

__all__ = ["KBVQMoEMethod", "KBVQLinearMethod"]

# quant_config below is .config.KBVQQuantConfig (its .kbvq and .arch are read); annotated by its vLLM base
# class because .config imports this module (tests/tools/test_imports.py: no cycle, even for type checking)

_SHARD_OF_EXPERT_ID = {"w1": 0, "w3": 1, "w2": 0}


def _register(layer: torch.nn.Module, name: str, shape, dtype, loader) -> None:
    param = torch.nn.Parameter(torch.zeros(shape, dtype=dtype), requires_grad=False)
    layer.register_parameter(name, param)
    set_weight_attrs(param, {"weight_loader": loader})


def _load(layout: GroupLayout, suffix: str, dst: torch.Tensor, loaded: torch.Tensor, shard: int, name: str):
    try:
        load_tensor(dst, suffix, loaded, shard, layout, name)
    except FormatError as e:
        raise FormatError(f"KBVQ checkpoint: {e}") from None


def _unpack_codes(layer: torch.nn.Module, name: str, layout: GroupLayout) -> None:
    """Swap the loaded packed codes for the runtime indices (a new tensor: shape and dtype differ),
    in the CPU kernels' layout where they will run."""
    packed = getattr(layer, name).data
    codes = process_codes(packed, layout, cpu_kernels=dispatch.uses_cpu_kernels(packed.device))
    if name in layer._parameters:
        replace_parameter(layer, name, codes)
    else:
        layer.register_buffer(name, codes, persistent=False)


def _bank_name(group: str, suffix: str, bank: int) -> str:
    """Bank 0's tensors have vLLM's usual names (``w13_vq_codes``); a mixed layer's other banks a suffix."""
    return f"{group}_{suffix}" + (f"_bank{bank}" if bank else "")


class KBVQMoEMethod(FusedMoEMethodBase):
    """Routed experts from KBVQ tensors: ``w13_*`` (gate and up fused) and ``w2_*``.

    Per-expert tensors get a leading local-expert dimension; the shared bases
    ``w13_lr_b`` / ``w2_lr_b`` are per layer, stored in the checkpoint under expert
    0 and loaded on every rank whatever experts it holds.

    A mixed-precision layer (format version 2) holds one bank per width pair
    (:func:`.layout.moe_banks`): its experts' tensors stacked as above, bank 0 as parameters under the
    usual names, the others as buffers ``<name>_bank<j>`` that bank 0's loaders fill (vLLM matches
    checkpoint tensors to parameters by name, and expects each parameter loaded). ``apply`` runs the
    op once per bank, each with a map from global expert ids to its slots, and sums the outputs.
    """

    def __init__(self, quant_config: QuantizationConfig, moe, layer_index: int):
        super().__init__(moe)
        self.quant_config = quant_config
        self.layer_index = layer_index
        act = getattr(moe.activation, "value", moe.activation)
        if act != "silu":
            raise NotImplementedError(f"KBVQ experts support the SiLU-gated MLP only, not {act!r}")

    def create_weights(self, layer, num_experts: int, hidden_size: int, intermediate_size_per_partition: int,
                       params_dtype: torch.dtype, global_num_experts: int | None = None, **extra_weight_attrs):
        par = self.moe.moe_parallel_config
        self.n_global = n_global = global_num_experts or num_experts
        self.local = [e for e in range(n_global) if layer._map_global_expert_id_to_local_expert_id(e) >= 0]
        self.banks = moe_banks(self.quant_config.kbvq, self.layer_index, n_global, hidden_size,
                               intermediate_size_per_partition * par.tp_size, par.tp_rank, par.tp_size)
        if len(self.banks) == 1:  # vLLM's own expert map applies: its local ids are the slots
            self.bank_of = {e: (0, layer._map_global_expert_id_to_local_expert_id(e)) for e in self.local}
        else:
            self.bank_of = {e: (j, slot) for j, bank in enumerate(self.banks) for slot, e in enumerate(bank.held(self.local))}
        self.active = [j for j, bank in enumerate(self.banks) if bank.held(self.local)]  # banks this rank runs
        for j, bank in enumerate(self.banks):
            n_held = len(bank.held(self.local))
            for group, layout in bank.layouts.items():
                for suffix, (shape, dtype) in layout.load_shapes().items():
                    per_layer = suffix == "lr_b"
                    if j and per_layer:
                        continue  # one basis per layer and weight type, whatever the widths
                    tensor = torch.zeros(shape if per_layer else (n_held, *shape), dtype=dtype)
                    if j:
                        layer.register_buffer(_bank_name(group, suffix, j), tensor, persistent=False)
                    else:
                        _register(layer, _bank_name(group, suffix, 0), tensor.shape, dtype,
                                  partial(self._weight_loader, layer, group, suffix, per_layer))

    def _weight_loader(self, layer, group: str, suffix: str, per_layer: bool, param, loaded_weight,
                       weight_name: str, shard_id: str, expert_id: int, return_success: bool = False):
        shard = _SHARD_OF_EXPERT_ID[shard_id]
        wtype = ("gate", "up")[shard] if group == "w13" else "down"
        name = self.quant_config.arch.expert_tensor(self.layer_index, expert_id, wtype, suffix)
        if per_layer:
            if expert_id != 0:
                raise FormatError(f"KBVQ checkpoint: {name} is unexpected; the shared basis lr_b lives under expert 0")
            bank, dst = 0, param.data
        else:
            if expert_id not in self.bank_of:  # another expert-parallel rank holds this expert
                return False if return_success else None
            bank, slot = self.bank_of[expert_id]
            dst = getattr(layer, _bank_name(group, suffix, bank)).data[slot]
        _load(self.banks[bank].layouts[group], suffix, dst, loaded_weight, shard, name)
        return True if return_success else None

    def process_weights_after_loading(self, layer) -> None:
        for j, bank in enumerate(self.banks):
            for group, layout in bank.layouts.items():
                _unpack_codes(layer, _bank_name(group, "vq_codes", j), layout)
            if len(self.banks) > 1:
                smap = bank.slot_map(self.n_global, self.local).to(layer.w13_vq_codes.device)
                layer.register_buffer(f"slot_map_bank{j}", smap, persistent=False)
        self.op = dispatch.bind("moe", layer.w13_vq_codes)

    def get_fused_moe_quant_config(self, layer):
        return FUSED_MOE_UNQUANTIZED_CONFIG  # activations are not quantized

    def _bank_tensors(self, layer, j: int) -> list[torch.Tensor | None]:
        """Bank ``j``'s tensors in the op's order: each group's in the format's suffix order (lr_* absent at rank 0)."""
        return [getattr(layer, _bank_name(g, s, 0 if s == "lr_b" else j), None) for g in ("w13", "w2") for s in SUFFIXES]

    def apply(self, layer, x, topk_weights, topk_ids, shared_experts, shared_experts_input):
        if layer.apply_router_weight_on_input:
            raise NotImplementedError("KBVQ experts do not support apply_router_weight_on_input")
        if len(self.banks) == 1:
            return self.op(x, topk_weights, topk_ids, layer.expert_map, *self._bank_tensors(layer, 0))
        out = torch.zeros_like(x)  # an expert-parallel rank may hold no expert of this layer's banks
        for j in self.active:
            out = out + self.op(x, topk_weights, topk_ids, getattr(layer, f"slot_map_bank{j}"),
                                *self._bank_tensors(layer, j))
        return out


class KBVQLinearMethod(LinearMethodBase):
    """A shared expert's projection(s) from KBVQ tensors (one matrix, or gate and up fused)."""

    def __init__(self, quant_config: QuantizationConfig, wtypes: tuple[str, ...], layer_index: int):
        self.quant_config = quant_config
        self.wtypes = wtypes
        self.layer_index = layer_index

    def create_weights(self, layer, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **extra_weight_attrs):
        split_in = input_size_per_partition != input_size
        split_out = sum(output_partition_sizes) != output_size
        tp_size = input_size // input_size_per_partition if split_in else (
            output_size // sum(output_partition_sizes))
        rows = tuple(p * tp_size if split_out else p for p in output_partition_sizes)
        if len(rows) != len(self.wtypes):
            raise FormatError(f"{self.wtypes} fused into {len(rows)} outputs")
        self.layout = shared_layout(self.quant_config.kbvq, self.layer_index, self.wtypes, rows, input_size,
                                    layer.tp_rank, tp_size, split_out=split_out, split_in=split_in)
        for suffix, (shape, dtype) in self.layout.load_shapes().items():
            _register(layer, suffix, shape, dtype, partial(self._weight_loader, suffix))

    def _weight_loader(self, suffix: str, param, loaded_weight, loaded_shard_id: int | None = None):
        shard = loaded_shard_id or 0
        name = self.quant_config.arch.shared_tensor(self.layer_index, self.wtypes[shard], suffix)
        _load(self.layout, suffix, param.data, loaded_weight, shard, name)

    def process_weights_after_loading(self, layer) -> None:
        _unpack_codes(layer, "vq_codes", self.layout)
        self.op = dispatch.bind("linear", layer.vq_codes)

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        y = self.op(x, layer.vq_codes, layer.vq_codebook, getattr(layer, "lr_a", None), getattr(layer, "lr_b", None),
                    layer.affine_s, layer.affine_b)
        return y if bias is None else y + bias
