"""Expert modules the quantizer puts into a MoE block while it works on a layer.

Both have the call signature of transformers' fused experts modules (they subclass the reference
runtime's :class:`~vllm_kbvq.reference.KBVQExperts`, whose torch forward routes the tokens), so the
block's own forward -- router, shared expert and its gate -- runs around them unchanged:

- :class:`DenseExperts`: plain weights (the FP experts, or a scalar baseline's fake-quant ones);
- :class:`TunableExperts`: KBVQ experts with fixed codes whose continuous tensors are trainable
  (:mod:`.finetune`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vllm_kbvq.archs import WEIGHT_TYPES, ArchSpec, MoEGeometry
from vllm_kbvq.format import matrix_shape
from vllm_kbvq.reference import KBVQExperts

__all__ = ["DenseExperts", "TunableLinear", "TunableExperts"]


class _MLP(nn.Module):
    """One expert: its three projections under the arch's names."""

    def __init__(self, names: dict[str, str], projs: dict[str, nn.Module]):
        super().__init__()
        self.names = names
        for wtype, mod in projs.items():
            setattr(self, names[wtype], mod)

    def proj(self, wtype: str) -> nn.Module:
        return getattr(self, self.names[wtype])


class DenseExperts(KBVQExperts):
    """Plain routed experts with the fused experts' call signature."""

    def __init__(self, geom: MoEGeometry, act_fn, device=None):
        def linears():
            return {w: nn.Linear(*reversed(matrix_shape(w, geom.hidden, geom.inter)), bias=False, device=device)
                    for w in WEIGHT_TYPES}

        nn.ModuleList.__init__(self, [_MLP(dict(geom.arch.proj_names), linears()) for _ in range(geom.n_experts)])
        self.act_fn = act_fn

    def basis(self, wtype: str):
        return None  # the low-rank term, if any, is inside each matrix's forward

    def expert_forward(self, e: int, x: torch.Tensor, bx_gate=None, bx_up=None) -> torch.Tensor:
        m = self[e]
        return m.proj("down")(self.act_fn(m.proj("gate")(x)) * m.proj("up")(x))


class _Lookup(torch.autograd.Function):
    """``codebook[codes]`` whose backward sums the gradient per codeword with ``bincount``: on CPU several
    times faster than ``embedding``'s backward (a fifth of a tuning step's time at 20K vectors)."""

    @staticmethod
    def forward(ctx, codes: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(codes)
        ctx.k = codebook.shape[0]
        return F.embedding(codes, codebook)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (codes,) = ctx.saved_tensors
        flat, g = codes.reshape(-1), grad.reshape(-1, grad.shape[-1])
        return None, torch.stack([torch.bincount(flat, g[:, j], ctx.k) for j in range(g.shape[1])], 1).to(grad.dtype)


class TunableLinear(nn.Module):
    """A KBVQ matrix, ``y = (1 + s) * (W_vq x + A (B x)) + b``, with its codes fixed and its floats trainable.

    ``basis`` (``B``) is shared by the routed experts of a layer and weight type: the caller owns the
    parameter, this module only uses it.
    """

    def __init__(self, codes: torch.Tensor, codebook: torch.Tensor, lr_a: torch.Tensor | None,
                 basis: nn.Parameter | None, affine_s: torch.Tensor, affine_b: torch.Tensor):
        super().__init__()
        self.register_buffer("codes", codes.long())  # [oc, ic / d]
        self.codebook = nn.Parameter(codebook.float().clone())
        self.lr_a = None if lr_a is None else nn.Parameter(lr_a.float().clone())
        self._basis = (basis,)  # a tuple: not registered here (the caller registers it once)
        self.affine_s = nn.Parameter(affine_s.float().clone())
        self.affine_b = nn.Parameter(affine_b.float().clone())

    @property
    def basis(self) -> nn.Parameter | None:
        return self._basis[0]

    def vq_weight(self) -> torch.Tensor:
        return _Lookup.apply(self.codes, self.codebook).reshape(self.codes.shape[0], -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.vq_weight().T
        if self.lr_a is not None:
            y = y + (x @ self.basis.T) @ self.lr_a.T
        return y * (1 + self.affine_s) + self.affine_b


class TunableExperts(DenseExperts):
    """Routed experts made of :class:`TunableLinear` matrices (``linears[wtype][e]``)."""

    def __init__(self, arch: ArchSpec, linears: dict[str, list[TunableLinear]], act_fn):
        n = len(linears["gate"])
        nn.ModuleList.__init__(self, [_MLP(dict(arch.proj_names), {w: linears[w][e] for w in WEIGHT_TYPES})
                                      for e in range(n)])
        self.act_fn = act_fn
