"""The reference KBVQ runtime: the oracle for the vLLM plugin and the kernels.

``load_kbvq_model`` returns an ordinary transformers model whose MoE experts
(and shared experts) run from the packed tensors: dequantize the codes, add the
shared low-rank part, apply the channel affine, with the functions of
:mod:`vllm_kbvq.kernels.torch_moe`. After :func:`register_with_transformers`
(``load_kbvq_model`` calls it), ``AutoModelForCausalLM.from_pretrained(kbvq_dir)`` works too.

This runtime depends on the checkpoint format only (``archs``, ``format``, ``packing`` and the plain
torch math of ``kernels.torch_moe``; ``tests/runtime/test_reference_imports.py`` holds it to that), so
the plugin and the native kernels are tested against code that shares none of theirs. Its torch path
favours clarity over speed; the same model running vLLM's native CPU kernels, its experts stacked as
the plugin stacks them, is :mod:`vllm_kbvq.plugin.cpu_model`, on the plugin's side.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from .archs import WEIGHT_TYPES, ArchSpec, MoEGeometry
from .format import QUANT_METHOD, KBVQConfig, QuantizedMatrix, Width, matrix_shape, tensor_specs
from .kernels.torch_moe import affine_linear, dequantize_rows, sum_routed
from .packing import unpack_codes

__all__ = ["KBVQLinear", "KBVQExperts", "load_kbvq_model", "quantize_modules", "cast_unquantized",
           "register_with_transformers"]


class KBVQLinear(nn.Module):
    """One quantized matrix: ``y = (1+s) * (W_vq x + A (B x)) + b``."""

    def __init__(self, in_features: int, out_features: int, width: Width, rank: int, owns_basis: bool,
                 device=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.index_bits = width.index_bits
        for name, (shape, dtype) in tensor_specs(out_features, in_features, width, rank, owns_basis).items():
            self.register_parameter(name, nn.Parameter(torch.zeros(shape, dtype=dtype, device=device),
                                                       requires_grad=False))
        if rank == 0 or not owns_basis:
            self.lr_b = None  # a routed expert reads its layer's basis from expert 0
        self.register_buffer("vq_cache", None, persistent=False)

    def vq_weight(self) -> torch.Tensor:
        if self.vq_cache is not None:
            if self.vq_cache.dtype != torch.float32:  # the module was cast after caching: rebuild
                self.cache_vq_weight()
            return self.vq_cache
        idx = unpack_codes(self.vq_codes, self.index_bits, self.in_features // self.vq_codebook.shape[-1])
        return dequantize_rows(idx, self.vq_codebook[None])

    def load(self, m: QuantizedMatrix) -> None:
        """Take the stored tensors of one matrix (``lr_b`` only if this matrix owns its basis)."""
        self.load_state_dict({k: v for k, v in vars(m).items() if v is not None})

    def cache_vq_weight(self) -> None:
        """Keep the dequantized weight: later calls cost what a dense layer's do, bit for bit the same.

        Only valid while the codes and codebook stay as they are (a loaded, frozen model).
        """
        self.vq_cache = None
        self.vq_cache = self.vq_weight()

    def weight_fp32(self, basis: torch.Tensor | None = None) -> torch.Tensor:
        """The effective weight before the affine (``W_vq + A B``), for tests and analysis."""
        w = self.vq_weight()
        if self.rank:
            basis = self.lr_b if basis is None else basis
            w = w + self.lr_a.float() @ basis.float()
        return w

    def forward(self, x: torch.Tensor, bx: torch.Tensor | None = None) -> torch.Tensor:
        """``bx`` is ``B x`` when the caller already has it (one per token for all experts)."""
        xf = x.float()
        if self.rank and bx is None:
            bx = xf @ self.lr_b.float().T
        y = affine_linear(xf, self.vq_weight(), self.lr_a if self.rank else None, None if bx is None else bx.float(),
                          self.affine_s, self.affine_b)
        return y.to(x.dtype)


class _ExpertMLP(nn.Module):
    def __init__(self, arch: ArchSpec, hidden: int, inter: int, cfg: KBVQConfig, layer: int, e: int, device=None):
        super().__init__()
        self.names = dict(arch.proj_names)
        ranks = cfg.rank.get("experts", {})
        for wtype in WEIGHT_TYPES:
            oc, ic = matrix_shape(wtype, hidden, inter)
            setattr(self, arch.proj_names[wtype], KBVQLinear(ic, oc, cfg.width(layer, "experts", wtype, e),
                                                             ranks.get(wtype, 0), e == 0, device=device))

    def proj(self, wtype: str) -> KBVQLinear:
        return getattr(self, self.names[wtype])


class KBVQExperts(nn.ModuleList):
    """Routed experts with the call signature of transformers' fused experts modules.

    Children are named ``0..n-1`` and each holds the arch's projection names, so
    checkpoint tensors ``...experts.{e}.{proj}.{suffix}`` load by name. The
    shared basis of each weight type lives in expert 0.
    """

    def __init__(self, arch: ArchSpec, n: int, hidden: int, inter: int, cfg: KBVQConfig, act_fn, layer: int,
                 device=None):
        super().__init__([_ExpertMLP(arch, hidden, inter, cfg, layer, e, device=device) for e in range(n)])
        self.act_fn = act_fn
        self.cfg, self.layer, self.n_experts, self.hidden, self.inter = cfg, layer, n, hidden, inter

    def basis(self, wtype: str) -> torch.Tensor | None:
        return self[0].proj(wtype).lr_b

    def expert_forward(self, e: int, x: torch.Tensor, bx_gate=None, bx_up=None) -> torch.Tensor:
        m = self[e]
        g = m.proj("gate")(x, bx_gate)
        u = m.proj("up")(x, bx_up)
        h = self.act_fn(g) * u
        down = m.proj("down")
        bx = h.float() @ self.basis("down").float().T if down.rank else None
        return down(h, bx)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        # B x for gate/up is the same for every expert: once per token.
        bxs = {}
        for wtype in ("gate", "up"):
            b = self.basis(wtype)
            bxs[wtype] = hidden_states.float() @ b.float().T if b is not None else None

        def run(e, tok):
            return self.expert_forward(e, hidden_states[tok], *(None if bx is None else bx[tok] for bx in bxs.values()))

        return sum_routed(top_k_index, top_k_weights, hidden_states.shape[-1], run).to(hidden_states.dtype)


def _shared_linears(arch: ArchSpec, moe_block) -> dict[str, nn.Linear]:
    if arch.shared_attr is None:
        return {}
    mlp = getattr(moe_block, arch.shared_attr)
    return {w: getattr(mlp, arch.shared_proj_names[w]) for w in WEIGHT_TYPES}


def moe_blocks(model, arch: ArchSpec):
    """(layer index, MoE block) for every decoder layer whose MLP is a MoE block."""
    for i, layer in enumerate(model.model.layers):
        block = getattr(layer, arch.moe_attr, None)
        if block is not None and hasattr(block, arch.experts_attr):
            yield i, block


def quantize_modules(model, cfg: KBVQConfig, device=None) -> None:
    """Swap every experts module (and shared-expert linear) for its KBVQ twin, in place."""
    geom = MoEGeometry.from_config(model.config)
    arch = geom.arch
    for i, block in moe_blocks(model, arch):
        old = getattr(block, arch.experts_attr)
        setattr(block, arch.experts_attr, KBVQExperts(arch, geom.n_experts, geom.hidden, geom.inter, cfg, old.act_fn,
                                                      i, device=device))
        shared = getattr(block, arch.shared_attr) if arch.shared_attr else None
        ranks = cfg.rank.get("shared_experts", {})
        for wtype, lin in _shared_linears(arch, block).items():
            setattr(shared, arch.shared_proj_names[wtype],
                    KBVQLinear(lin.in_features, lin.out_features, cfg.width(i, "shared_experts", wtype, 0),
                               ranks.get(wtype, 0), True, device=device))


def cast_unquantized(model, dtype: torch.dtype) -> None:
    """Cast every floating parameter outside the KBVQ modules to ``dtype``, in place.

    The KBVQ tensors keep their format dtypes (int32 codes, float16 codebooks and factors); a
    parameter the model keeps in float32 at this dtype (transformers' ``_keep_in_fp32_modules``) stays so.

    Needed after ``from_pretrained``: for a pre-quantized checkpoint, transformers loads every tensor
    whose checkpoint name it renames in the dtype the checkpoint stores, on the assumption that a
    renamed tensor is a serialized quantized one. Mixtral's conversion mapping renames
    ``.block_sparse_moe.`` to ``.mlp.``, so its routers (``block_sparse_moe.gate.weight``) kept the
    checkpoint's dtype (bf16 in a Mixtral checkpoint) whatever dtype was asked for.
    """
    plan = model._get_dtype_plan(dtype) if hasattr(model, "_get_dtype_plan") else {}
    keep = re.compile("|".join(k.replace("*", ".*") for k in plan)) if plan else None
    for mod_name, module in model.named_modules():
        if isinstance(module, KBVQLinear):
            continue
        for p_name, p in module.named_parameters(recurse=False):
            name = f"{mod_name}.{p_name}" if mod_name else p_name
            want = torch.float32 if keep is not None and keep.search(name) else dtype
            if p.is_floating_point() and p.dtype != want and p.device.type != "meta":
                p.data = p.data.to(want)


# ---- transformers integration -------------------------------------------------------------

def register_with_transformers() -> None:
    """Make ``kbvq`` a transformers quantization method, so ``from_pretrained`` builds KBVQ modules (idempotent)."""
    from transformers.quantizers.auto import (
        AUTO_QUANTIZATION_CONFIG_MAPPING,
        AUTO_QUANTIZER_MAPPING,
        register_quantization_config,
        register_quantizer,
    )
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    if QUANT_METHOD in AUTO_QUANTIZER_MAPPING:
        return

    class KBVQHfConfig(QuantizationConfigMixin):
        def __init__(self, **kwargs):
            self.quant_method = QUANT_METHOD
            self.kbvq = KBVQConfig.from_dict({**kwargs, "quant_method": QUANT_METHOD})
            for k, v in kwargs.items():
                setattr(self, k, v)

        def to_dict(self):
            return self.kbvq.to_dict()

    class KBVQHfQuantizer(HfQuantizer):
        requires_calibration = True

        def update_dtype(self, dtype):
            self.kbvq_dtype = dtype  # the dtype asked for: from_pretrained does not pass it on after loading
            return dtype

        def _process_model_before_weight_loading(self, model, **kwargs):
            quantize_modules(model, self.quantization_config.kbvq)

        def _process_model_after_weight_loading(self, model, **kwargs):
            dtype = getattr(self, "kbvq_dtype", None) or model.config.dtype
            if isinstance(dtype, str):
                dtype = getattr(torch, dtype)
            if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
                cast_unquantized(model, dtype)
            return model

        def is_serializable(self):
            return False

        @property
        def is_trainable(self):
            return False

    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(KBVQHfConfig)
    register_quantizer(QUANT_METHOD)(KBVQHfQuantizer)


def load_kbvq_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                    cache_weights: bool = False):
    """A transformers model running the KBVQ checkpoint at ``path`` through this reference runtime's torch
    path, the oracle the tests compare against (:func:`vllm_kbvq.plugin.cpu_model.load_kbvq_model` loads the
    same model onto the native CPU kernels).

    ``cache_weights`` dequantizes every VQ matrix once at load (float32, so the memory of an
    unquantized model) instead of on every call: for long evaluations, whose outputs it leaves
    bit-identical to the torch path's.
    """
    from transformers import AutoModelForCausalLM

    from .format import FormatError, validate_checkpoint

    validate_checkpoint(path)
    register_with_transformers()
    model, info = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype, device_map=str(device), output_loading_info=True)
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        if info.get(kind):
            raise FormatError(f"{path}: {kind.replace('_', ' ')} when loading: {sorted(info[kind])[:5]}")
    if cache_weights:
        for m in model.modules():
            if isinstance(m, KBVQLinear):
                m.cache_vq_weight()
    model.eval()
    return model
