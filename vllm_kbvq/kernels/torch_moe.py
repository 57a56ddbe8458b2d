"""The torch implementation of KBVQ compute: the CPU path and the oracle every kernel is tested against.

Tensors are in the runtime layout of :mod:`vllm_kbvq.plugin.layout` (unpacked indices, fused
``w13``); :mod:`vllm_kbvq.reference` builds its modules from the same functions. Two MoE
strategies: :func:`kbvq_moe_torch` decodes each routed expert once (a data-dependent loop, a
host sync on GPU) and :func:`kbvq_moe_torch_static` fixes every shape by the input's (CUDA
graphs; the CUDA path when Triton is missing). :mod:`.dispatch` picks between them and the
Triton kernels.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..format import SUFFIXES

_LR_B = SUFFIXES.index("lr_b")  # the per-layer basis; the other suffixes are per expert

__all__ = ["dequantize_rows", "affine_linear", "expert_mlp", "moe_prologue", "sum_routed", "kbvq_linear_torch", "kbvq_moe_torch",
           "kbvq_moe_torch_static"]


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


def affine_linear(x, w_vq, lr_a, bx, affine_s, affine_b):
    """``(1 + s) * (W_vq x + A (B x)) + b`` in float32, ``W_vq`` decoded; ``bx`` is ``B x`` (None without a basis).

    ``x [..., t, in]``: with leading expert dimensions every tensor carries them too.
    """
    y = x @ w_vq.mT
    if lr_a is not None:
        y = y + bx @ lr_a.float().mT
    return y * (1 + affine_s.float()).unsqueeze(-2) + affine_b.float().unsqueeze(-2)


def kbvq_linear_torch(x: torch.Tensor, idx: torch.Tensor, codebook: torch.Tensor, lr_a: torch.Tensor | None,
                      lr_b: torch.Tensor | None, affine_s: torch.Tensor, affine_b: torch.Tensor) -> torch.Tensor:
    xf = x.reshape(-1, x.shape[-1]).float()
    bx = xf @ lr_b.float().T if lr_b is not None else None
    y = affine_linear(xf, dequantize_rows(idx, codebook), lr_a, bx, affine_s, affine_b)
    return y.to(x.dtype).reshape(*x.shape[:-1], -1)


def expert_mlp(e, xf, bx13, b2, w13_idx, w13_codebook, w13_lr_a, w13_affine_s, w13_affine_b,
            w2_idx, w2_codebook, w2_lr_a, w2_affine_s, w2_affine_b):
    """One SiLU-gated expert (or a batch of them when ``e`` is a tensor of expert slots)."""
    h = affine_linear(xf, dequantize_rows(w13_idx[e], w13_codebook[e]), None if w13_lr_a is None else w13_lr_a[e], bx13,
                       w13_affine_s[e], w13_affine_b[e])
    gate, up = h.chunk(2, dim=-1)
    h = F.silu(gate) * up
    bx2 = h @ b2.mT if b2 is not None else None
    return affine_linear(h, dequantize_rows(w2_idx[e], w2_codebook[e]), None if w2_lr_a is None else w2_lr_a[e], bx2,
                          w2_affine_s[e], w2_affine_b[e])


def moe_prologue(x, topk_ids, expert_map, *groups):
    """What every MoE implementation starts with, from its arguments after ``expert_map``.

    ``groups``: the ``w13`` then the ``w2`` tensors, each in ``format.SUFFIXES`` order.
    Returns the float32 input, the local expert slots (-1: held by another
    expert-parallel rank), ``B x`` for gate/up, the down basis in float32, and the
    per-expert tensors (each group's idx, codebook, lr_a, affine_s, affine_b) in
    :func:`expert_mlp`'s order.
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
    xf, ids, bx13, b2, weights = moe_prologue(
        x, topk_ids, expert_map, w13_idx, w13_codebook, w13_lr_a, w13_lr_b, w13_affine_s, w13_affine_b,
        w2_idx, w2_codebook, w2_lr_a, w2_lr_b, w2_affine_s, w2_affine_b)
    out = sum_routed(ids, topk_weights, x.shape[1],
                     lambda e, tok: expert_mlp(e, xf[tok], None if bx13 is None else bx13[tok], b2, *weights))
    return out.to(x.dtype)


def sum_routed(ids: torch.Tensor, topk_weights: torch.Tensor, width: int, run) -> torch.Tensor:
    """``sum_k w[t, k] * expert_{ids[t, k]}(x_t)`` in float32: each routed expert runs once, on its tokens.

    ``run(e, tok)`` is expert ``e`` on the tokens ``tok``; slots < 0 (another rank's experts) are skipped.
    """
    out = torch.zeros(ids.shape[0], width, dtype=torch.float32, device=ids.device)
    for e in torch.unique(ids).tolist():
        if e < 0:
            continue
        tok, pos = torch.where(ids == e)
        out.index_add_(0, tok, run(e, tok).float() * topk_weights[tok, pos, None].float())
    return out


def kbvq_moe_torch_static(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                          expert_map: torch.Tensor | None, *groups: torch.Tensor | None) -> torch.Tensor:
    """:func:`kbvq_moe_torch` (same arguments) with shapes fixed by the input's: no host sync, safe to
    capture in a CUDA graph.

    With at most as many (token, expert) pairs as local experts (decode), each pair's
    expert is gathered and decoded; above that every local expert runs on every token
    and the routing weights (zero where not routed) mask the sum.
    """
    xf, ids, bx13, b2, weights = moe_prologue(x, topk_ids, expert_map, *groups)
    n_tok, top_k = ids.shape
    n_local = weights[0].shape[0]
    if n_tok * top_k <= n_local:
        slot = ids.reshape(-1)
        pair_w = topk_weights.reshape(-1).float() * (slot >= 0)
        tok = torch.arange(n_tok, device=x.device).repeat_interleave(top_k)
        y = expert_mlp(slot.clamp(min=0), xf[tok, None], None if bx13 is None else bx13[tok, None], b2, *weights)
        return (y[:, 0] * pair_w[:, None]).reshape(n_tok, top_k, -1).sum(1).to(x.dtype)
    # routing weights as a [tokens, local experts] matrix; the extra column takes the -1 slots
    route = torch.zeros(n_tok, n_local + 1, dtype=torch.float32, device=x.device)
    route.scatter_add_(1, torch.where(ids >= 0, ids, n_local), topk_weights.float())
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    for e in range(n_local):
        out += expert_mlp(e, xf, bx13, b2, *weights) * route[:, e, None]
    return out.to(x.dtype)
