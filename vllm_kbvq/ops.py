"""KBVQ compute in the runtime layout of :mod:`.layout`: torch implementations and custom ops.

``torch.ops.kbvq.moe`` and ``torch.ops.kbvq.linear`` are what the vLLM methods
call. They are ``torch.library`` custom ops so torch.compile treats them as
opaque and CUDA graphs see one call. The implementation is chosen per device
from ``KERNELS`` (one table, as AQLM does): the torch functions below are the
CPU path (a data-dependent loop over the routed experts), the CUDA path until
the Triton kernels land (:func:`kbvq_moe_torch_static`, free of host syncs),
and the reference those kernels are tested against.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Callable

import torch
import torch.nn.functional as F

from .format import SUFFIXES

logger = logging.getLogger(__name__)
_LR_B = SUFFIXES.index("lr_b")  # the per-layer basis; the other suffixes are per expert

__all__ = ["dequantize_rows", "kbvq_linear_torch", "kbvq_moe_torch", "kbvq_moe_torch_static", "KERNELS"]


def dequantize_rows(idx: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """``idx [..., rows, n]`` into ``codebook [..., S, K, d]`` -> float32 weight ``[..., rows, n*d]``.

    The rows form ``S`` equal blocks (fused matrices), block ``s`` decoded by codebook ``s``;
    leading dimensions (experts) pair each index block with its own codebooks.
    """
    *lead, s, k, d = codebook.shape
    rows, n = idx.shape[-2:]
    blocks = s * math.prod(lead)
    offsets = torch.arange(blocks, dtype=torch.int32, device=idx.device)[:, None] * k
    flat = idx.reshape(blocks, -1).int() + offsets
    return F.embedding(flat, codebook.reshape(blocks * k, d).float()).reshape(*lead, rows, n * d)


def _affine_linear(x, idx, codebook, lr_a, bx, affine_s, affine_b):
    """``(1 + s) * (W_vq x + A (B x)) + b`` in float32; ``bx`` is ``B x`` (None without a basis).

    ``x [..., t, in]``: with leading expert dimensions every tensor carries them too.
    """
    y = x @ dequantize_rows(idx, codebook).mT
    if lr_a is not None:
        y = y + bx @ lr_a.float().mT
    return y * (1 + affine_s.float()).unsqueeze(-2) + affine_b.float().unsqueeze(-2)


def kbvq_linear_torch(x: torch.Tensor, idx: torch.Tensor, codebook: torch.Tensor, lr_a: torch.Tensor | None,
                      lr_b: torch.Tensor | None, affine_s: torch.Tensor, affine_b: torch.Tensor) -> torch.Tensor:
    xf = x.reshape(-1, x.shape[-1]).float()
    bx = xf @ lr_b.float().T if lr_b is not None else None
    y = _affine_linear(xf, idx, codebook, lr_a, bx, affine_s, affine_b)
    return y.to(x.dtype).reshape(*x.shape[:-1], -1)


def _expert(e, xf, bx13, b2, w13_idx, w13_codebook, w13_lr_a, w13_affine_s, w13_affine_b,
            w2_idx, w2_codebook, w2_lr_a, w2_affine_s, w2_affine_b):
    """One SiLU-gated expert (or a batch of them when ``e`` is a tensor of expert slots)."""
    h = _affine_linear(xf, w13_idx[e], w13_codebook[e], None if w13_lr_a is None else w13_lr_a[e], bx13,
                       w13_affine_s[e], w13_affine_b[e])
    gate, up = h.chunk(2, dim=-1)
    h = F.silu(gate) * up
    bx2 = h @ b2.mT if b2 is not None else None
    return _affine_linear(h, w2_idx[e], w2_codebook[e], None if w2_lr_a is None else w2_lr_a[e], bx2,
                          w2_affine_s[e], w2_affine_b[e])


def _moe_prologue(x, topk_ids, expert_map, *groups):
    """What every MoE implementation starts with, from its arguments after ``expert_map``.

    ``groups``: the ``w13`` then the ``w2`` tensors, each in ``format.SUFFIXES`` order.
    Returns the float32 input, the local expert slots (-1: held by another
    expert-parallel rank), ``B x`` for gate/up, the down basis in float32, and the
    per-expert tensors (each group's idx, codebook, lr_a, affine_s, affine_b) in
    :func:`_expert`'s order.
    """
    n = len(SUFFIXES)
    w13, w2 = groups[:n], groups[n:]
    w13_lr_b, w2_lr_b = w13[_LR_B], w2[_LR_B]
    xf = x.float()
    ids = topk_ids.long()
    if expert_map is not None:
        ids = expert_map.long()[ids]
    # B x is the same for every routed expert of a token: once per token for gate and up.
    bx13 = xf @ w13_lr_b.float().T if w13_lr_b is not None else None
    b2 = w2_lr_b.float() if w2_lr_b is not None else None  # per layer: convert once, not per expert
    experts = tuple(t for g in (w13, w2) for i, t in enumerate(g) if i != _LR_B)
    return xf, ids, bx13, b2, experts


def kbvq_moe_torch(
    x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, expert_map: torch.Tensor | None,
    w13_idx: torch.Tensor, w13_codebook: torch.Tensor, w13_lr_a: torch.Tensor | None, w13_lr_b: torch.Tensor | None,
    w13_affine_s: torch.Tensor, w13_affine_b: torch.Tensor,
    w2_idx: torch.Tensor, w2_codebook: torch.Tensor, w2_lr_a: torch.Tensor | None, w2_lr_b: torch.Tensor | None,
    w2_affine_s: torch.Tensor, w2_affine_b: torch.Tensor,
) -> torch.Tensor:
    """Routed SiLU-gated experts, summed with the routing weights (no TP reduction).

    ``topk_ids`` are global expert ids; ``expert_map`` (expert parallelism) maps
    them to local slots, -1 for experts held by another rank. Each routed expert
    is decoded once and applied to its tokens: the least work, but the loop is
    data dependent (a host sync on GPU), so this is the CPU path.
    """
    xf, ids, bx13, b2, weights = _moe_prologue(
        x, topk_ids, expert_map, w13_idx, w13_codebook, w13_lr_a, w13_lr_b, w13_affine_s, w13_affine_b,
        w2_idx, w2_codebook, w2_lr_a, w2_lr_b, w2_affine_s, w2_affine_b)
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    for e in torch.unique(ids).tolist():
        if e < 0:
            continue
        tok, pos = torch.where(ids == e)
        y = _expert(e, xf[tok], None if bx13 is None else bx13[tok], b2, *weights)
        out.index_add_(0, tok, y * topk_weights[tok, pos, None].float())
    return out.to(x.dtype)


def kbvq_moe_torch_static(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                          expert_map: torch.Tensor | None, *groups: torch.Tensor | None) -> torch.Tensor:
    """:func:`kbvq_moe_torch` (same arguments) with shapes fixed by the input's: no host sync, safe to
    capture in a CUDA graph.

    With at most as many (token, expert) pairs as local experts (decode), each pair's
    expert is gathered and decoded; above that every local expert runs on every token
    and the routing weights (zero where not routed) mask the sum.
    """
    xf, ids, bx13, b2, weights = _moe_prologue(x, topk_ids, expert_map, *groups)
    n_tok, top_k = ids.shape
    n_local = weights[0].shape[0]
    if n_tok * top_k <= n_local:
        slot = ids.reshape(-1)
        pair_w = topk_weights.reshape(-1).float() * (slot >= 0)
        tok = torch.arange(n_tok, device=x.device).repeat_interleave(top_k)
        y = _expert(slot.clamp(min=0), xf[tok, None], None if bx13 is None else bx13[tok, None], b2, *weights)
        return (y[:, 0] * pair_w[:, None]).reshape(n_tok, top_k, -1).sum(1).to(x.dtype)
    # routing weights as a [tokens, local experts] matrix; the extra column takes the -1 slots
    route = torch.zeros(n_tok, n_local + 1, dtype=torch.float32, device=x.device)
    route.scatter_add_(1, torch.where(ids >= 0, ids, n_local), topk_weights.float())
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    for e in range(n_local):
        out += _expert(e, xf, bx13, b2, *weights) * route[:, e, None]
    return out.to(x.dtype)


# (op, device type) -> implementation. CUDA entries are replaced by the Triton kernels on first use.
KERNELS: dict[tuple[str, str], Callable[..., torch.Tensor]] = {
    ("moe", "cpu"): kbvq_moe_torch,
    ("moe", "cuda"): kbvq_moe_torch_static,
    ("linear", "cpu"): kbvq_linear_torch,
    ("linear", "cuda"): kbvq_linear_torch,
}
_TRITON_CHECKED = False


def _use_triton() -> None:
    """Register the Triton kernels for CUDA unless triton is missing or ``KBVQ_DISABLE_TRITON=1``."""
    global _TRITON_CHECKED
    if _TRITON_CHECKED:
        return
    _TRITON_CHECKED = True
    if os.environ.get("KBVQ_DISABLE_TRITON", "0") not in ("", "0"):
        return
    try:
        from .triton_moe import kbvq_linear_triton, kbvq_moe_triton
    except ImportError as e:
        logger.warning("KBVQ: triton is not importable (%s); CUDA runs the slower torch path", e)
        return
    KERNELS.update({("moe", "cuda"): kbvq_moe_triton, ("linear", "cuda"): kbvq_linear_triton})


def _kernel(op: str, device: torch.device) -> Callable[..., torch.Tensor]:
    if device.type == "cuda":
        _use_triton()
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
