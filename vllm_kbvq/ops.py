"""KBVQ compute in the runtime layout of :mod:`.layout`: torch implementations and custom ops.

``torch.ops.kbvq.moe`` and ``torch.ops.kbvq.linear`` are what the vLLM methods
call. They are ``torch.library`` custom ops so torch.compile treats them as
opaque (the routed-expert loop is data dependent) and CUDA graphs see one call.
The implementation is chosen per device from ``KERNELS`` (one table, as AQLM
does): the torch functions below are the CPU path, the CUDA path until the
Triton kernels land, and the reference those kernels are tested against.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["dequantize_rows", "kbvq_linear_torch", "kbvq_moe_torch", "KERNELS"]


def dequantize_rows(idx: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """``idx [rows, n]`` into ``codebook [S, K, d]`` -> float32 weight ``[rows, n*d]``.

    The rows form ``S`` equal blocks (fused matrices), block ``s`` decoded by codebook ``s``.
    """
    s, k, d = codebook.shape
    rows, n = idx.shape
    flat = idx.reshape(s, -1).int() + torch.arange(s, dtype=torch.int32, device=idx.device)[:, None] * k
    return F.embedding(flat, codebook.reshape(s * k, d).float()).reshape(rows, n * d)


def _affine_linear(x, idx, codebook, lr_a, bx, affine_s, affine_b):
    """``(1 + s) * (W_vq x + A (B x)) + b`` in float32; ``bx`` is ``B x`` (None without a basis)."""
    y = x @ dequantize_rows(idx, codebook).T
    if lr_a is not None:
        y = y + bx @ lr_a.float().T
    return y * (1 + affine_s.float()) + affine_b.float()


def kbvq_linear_torch(x: torch.Tensor, idx: torch.Tensor, codebook: torch.Tensor, lr_a: torch.Tensor | None,
                      lr_b: torch.Tensor | None, affine_s: torch.Tensor, affine_b: torch.Tensor) -> torch.Tensor:
    xf = x.reshape(-1, x.shape[-1]).float()
    bx = xf @ lr_b.float().T if lr_b is not None else None
    y = _affine_linear(xf, idx, codebook, lr_a, bx, affine_s, affine_b)
    return y.to(x.dtype).reshape(*x.shape[:-1], -1)


def kbvq_moe_torch(
    x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, expert_map: torch.Tensor | None,
    w13_idx: torch.Tensor, w13_codebook: torch.Tensor, w13_lr_a: torch.Tensor | None, w13_lr_b: torch.Tensor | None,
    w13_affine_s: torch.Tensor, w13_affine_b: torch.Tensor,
    w2_idx: torch.Tensor, w2_codebook: torch.Tensor, w2_lr_a: torch.Tensor | None, w2_lr_b: torch.Tensor | None,
    w2_affine_s: torch.Tensor, w2_affine_b: torch.Tensor,
) -> torch.Tensor:
    """Routed SiLU-gated experts, summed with the routing weights (no TP reduction).

    ``topk_ids`` are global expert ids; ``expert_map`` (expert parallelism) maps
    them to local slots, -1 for experts held by another rank.
    """
    xf = x.float()
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    ids = topk_ids.long()
    if expert_map is not None:
        ids = expert_map.long()[ids]
    # B x is the same for every routed expert of a token: once per token for gate and up.
    bx13 = xf @ w13_lr_b.float().T if w13_lr_b is not None else None
    b2 = w2_lr_b.float() if w2_lr_b is not None else None  # per layer: convert once, not per expert
    for e in torch.unique(ids).tolist():
        if e < 0:
            continue
        tok, pos = torch.where(ids == e)
        h = _affine_linear(xf[tok], w13_idx[e], w13_codebook[e], None if w13_lr_a is None else w13_lr_a[e],
                           None if bx13 is None else bx13[tok], w13_affine_s[e], w13_affine_b[e])
        gate, up = h.chunk(2, dim=-1)
        h = F.silu(gate) * up
        bx2 = h @ b2.T if b2 is not None else None
        y = _affine_linear(h, w2_idx[e], w2_codebook[e], None if w2_lr_a is None else w2_lr_a[e], bx2,
                           w2_affine_s[e], w2_affine_b[e])
        out.index_add_(0, tok, y * topk_weights[tok, pos, None].float())
    return out.to(x.dtype)


# (op, device type) -> implementation. The Triton kernels register their CUDA entries here.
KERNELS: dict[tuple[str, str], Callable[..., torch.Tensor]] = {
    ("moe", "cpu"): kbvq_moe_torch,
    ("moe", "cuda"): kbvq_moe_torch,
    ("linear", "cpu"): kbvq_linear_torch,
    ("linear", "cuda"): kbvq_linear_torch,
}


def _kernel(op: str, device: torch.device) -> Callable[..., torch.Tensor]:
    try:
        return KERNELS[(op, device.type)]
    except KeyError:
        raise NotImplementedError(f"no KBVQ {op} kernel for device type {device.type!r}") from None


def _custom_op(op: str, reference: Callable[..., torch.Tensor]):
    """``torch.ops.kbvq.<op>`` with ``reference``'s signature, dispatching on the input's device."""
    def dispatch(*args):
        return _kernel(op, args[0].device)(*args)

    return torch.library.custom_op(f"kbvq::{op}", dispatch, mutates_args=(),
                                   schema=torch.library.infer_schema(reference, mutates_args=()))


moe = _custom_op("moe", kbvq_moe_torch)
moe.register_fake(lambda x, *args: torch.empty_like(x))
linear = _custom_op("linear", kbvq_linear_torch)
linear.register_fake(lambda x, idx, *args: x.new_empty(*x.shape[:-1], idx.shape[0]))
