"""Triton kernels for KBVQ experts on GPU; tested against :mod:`.torch_moe`, the torch implementation.

Two kernels, each decoding weights from the codes inside its inner loop (no
dequantized weight ever reaches memory):

* ``_vq_gemv``: one program per (token, routed expert) pair and row block; an
  elementwise multiply-and-reduce over the decoded rows. For decode, where each
  expert sees one or a few tokens and the layer is bound by reading the codes.
* ``_vq_grouped_gemm``: pairs sorted by expert and padded to ``BLOCK_M``
  (:func:`align_pairs`, on device, no host sync); each program multiplies one
  block of pairs by a decoded weight tile with ``tl.dot``. For prefill and large
  batches. Which one runs, and the block size, is :mod:`.dispatch`'s choice (``block_m``).

Both fuse the low-rank term ``A_e (B x)`` (``B x`` computed once per token
outside, it is per layer), the affine correction and, for ``w13``, SiLU·mul.
The down projection writes each pair's output scaled by its routing weight and
the ``top_k`` outputs of a token are summed in torch, so the result is
deterministic. Every shape depends only on the input shapes: CUDA-graph safe.

Shapes follow :mod:`vllm_kbvq.plugin.layout`: ``idx [E, R, in/d]`` (uint8/int16/int32),
``codebook [E, S, K, d]`` fp16 with the ``R`` rows in ``S`` equal blocks,
``lr_a [E, R, k]``, ``affine_s / affine_b [E, R]``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .torch_moe import moe_prologue

__all__ = ["align_pairs", "kbvq_linear_triton", "kbvq_moe_triton"]

# Tile shapes: ones that compile without register spills on sm90 (Triton 3.6), not yet timed on a GPU;
# benchmarks/moe_kernels.py is what should tune them (which kernel runs is dispatch.py's choice).
GEMV_BLOCK_ROWS, GEMV_BLOCK_VECTORS = 32, 32
GEMM_BLOCK_N, GEMM_BLOCK_K = 64, 64
GEMM_WARPS_LARGE_BLOCK_M = 128  # 8 warps from this many pairs per block, else 4

_DOT_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@triton.jit
def _epilogue_rows(acc, e, rows, row_ok, lr_ptr, bx, kk, kk_ok, s_ptr, b_ptr, stride_le, stride_lr,
                   stride_ae, HAS_LR: tl.constexpr):
    """``(1 + s) * (acc + A bx) + b`` for one row block (``bx`` a vector: one token)."""
    if HAS_LR:
        a = tl.load(lr_ptr + e * stride_le + rows[:, None] * stride_lr + kk[None, :],
                    mask=row_ok[:, None] & kk_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(a * bx[None, :], axis=1)
    s = tl.load(s_ptr + e * stride_ae + rows, mask=row_ok, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + e * stride_ae + rows, mask=row_ok, other=0.0).to(tl.float32)
    return acc * (1.0 + s) + b


@triton.jit
def _vq_gemv(x_ptr, slot_ptr, pw_ptr, idx_ptr, cb_ptr, lr_ptr, bx_ptr, s_ptr, b_ptr, out_ptr,
             n_cols, n_out, rows_per_shard, n_rank, x_row_div,
             stride_x, stride_ie, stride_ir, stride_le, stride_lr, stride_bx, stride_ae, stride_out,
             S: tl.constexpr, K: tl.constexpr, D: tl.constexpr, GATED: tl.constexpr, HAS_LR: tl.constexpr,
             HAS_WEIGHT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr):
    """One (pair, row block): ``out[pair, rows]`` of one expert for one input row.

    ``GATED``: the rows are gate rows ``r`` and up rows ``r + n_out``; the output is SiLU(gate)·up.
    """
    pair = tl.program_id(0)
    e = tl.load(slot_ptr + pair).to(tl.int64)  # int64 offsets: e * stride passes 2^31 on large models
    if e >= 0:
        xrow = pair // x_row_div
        rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < n_out
        acc = tl.zeros((BLOCK_R, BLOCK_J), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_R, BLOCK_J), dtype=tl.float32)
        comp = tl.arange(0, D)
        book = (e * S + rows // rows_per_shard) * (K * D)
        book_up = (e * S + (rows + n_out) // rows_per_shard) * (K * D)
        for j0 in range(0, n_cols, BLOCK_J):
            cols = j0 + tl.arange(0, BLOCK_J)
            col_ok = cols < n_cols
            xv = tl.load(x_ptr + xrow * stride_x + cols[:, None] * D + comp[None, :], mask=col_ok[:, None],
                         other=0.0).to(tl.float32)
            mask = row_ok[:, None] & col_ok[None, :]
            codes = tl.load(idx_ptr + e * stride_ie + rows[:, None] * stride_ir + cols[None, :], mask=mask, other=0)
            w = tl.load(cb_ptr + book[:, None, None] + codes.to(tl.int32)[:, :, None] * D + comp[None, None, :],
                        mask=mask[:, :, None], other=0.0).to(tl.float32)
            acc += tl.sum(w * xv[None, :, :], axis=2)
            if GATED:
                codes = tl.load(idx_ptr + e * stride_ie + (rows + n_out)[:, None] * stride_ir + cols[None, :],
                                mask=mask, other=0)
                w = tl.load(cb_ptr + book_up[:, None, None] + codes.to(tl.int32)[:, :, None] * D
                            + comp[None, None, :], mask=mask[:, :, None], other=0.0).to(tl.float32)
                acc_up += tl.sum(w * xv[None, :, :], axis=2)
        kk = tl.arange(0, BLOCK_K)
        kk_ok = kk < n_rank
        bx = tl.zeros((BLOCK_K,), dtype=tl.float32)
        if HAS_LR:
            bx = tl.load(bx_ptr + xrow * stride_bx + kk, mask=kk_ok, other=0.0).to(tl.float32)
        y = _epilogue_rows(tl.sum(acc, axis=1), e, rows, row_ok, lr_ptr, bx, kk, kk_ok, s_ptr, b_ptr,
                           stride_le, stride_lr, stride_ae, HAS_LR)
        if GATED:
            up = _epilogue_rows(tl.sum(acc_up, axis=1), e, rows + n_out, row_ok, lr_ptr, bx, kk, kk_ok, s_ptr,
                                b_ptr, stride_le, stride_lr, stride_ae, HAS_LR)
            y = y * tl.sigmoid(y) * up
        if HAS_WEIGHT:
            y = y * tl.load(pw_ptr + pair).to(tl.float32)
        tl.store(out_ptr + pair.to(tl.int64) * stride_out + rows, y, mask=row_ok)


@triton.jit
def _tile_dot(acc, a, idx_ptr, cb_ptr, e, rows, k0, n_in, row_ok, stride_ie, stride_ir, rows_per_shard,
              S: tl.constexpr, K: tl.constexpr, D: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``acc += a @ W[rows, k0:k0+BLOCK_K].T``, the weight tile decoded from the codes.

    Each code is loaded once and its ``D`` codebook components in one vector gather,
    laid out K-major so ``tl.dot`` needs no transpose. With bfloat16 activations the
    float16 codewords are rounded to bfloat16 (3 mantissa bits fewer) for the dot.
    """
    vc = k0 // D + tl.arange(0, BLOCK_K // D)
    mask = (vc < n_in // D)[:, None] & row_ok[None, :]
    codes = tl.load(idx_ptr + e * stride_ie + rows[None, :] * stride_ir + vc[:, None], mask=mask, other=0)
    book = (e * S + rows // rows_per_shard) * (K * D)
    comp = tl.arange(0, D)
    w = tl.load(cb_ptr + book[None, None, :] + codes.to(tl.int32)[:, None, :] * D + comp[None, :, None],
                mask=mask[:, None, :], other=0.0)
    w = tl.reshape(w, (BLOCK_K, BLOCK_N))
    return tl.dot(a, w.to(DOT), acc, input_precision=PREC)


@triton.jit
def _epilogue_tile(acc, e, rows, row_ok, lr_ptr, bx, kk, kk_ok, s_ptr, b_ptr, stride_le, stride_lr,
                   stride_ae, HAS_LR: tl.constexpr):
    """``(1 + s) * (acc + bx A^T) + b`` for a [pairs, rows] tile (``bx``: [pairs, k])."""
    if HAS_LR:
        a = tl.load(lr_ptr + e * stride_le + rows[None, :] * stride_lr + kk[:, None],
                    mask=kk_ok[:, None] & row_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.dot(bx, a, input_precision="ieee")
    s = tl.load(s_ptr + e * stride_ae + rows, mask=row_ok, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + e * stride_ae + rows, mask=row_ok, other=0.0).to(tl.float32)
    return acc * (1.0 + s[None, :]) + b[None, :]


@triton.jit
def _vq_grouped_gemm(x_ptr, pairs_ptr, block_slot_ptr, pw_ptr, idx_ptr, cb_ptr, lr_ptr, bx_ptr, s_ptr, b_ptr,
                     out_ptr, n_pairs, n_in, n_out, rows_per_shard, n_rank, x_row_div,
                     stride_x, stride_ie, stride_ir, stride_le, stride_lr, stride_bx, stride_ae, stride_out,
                     S: tl.constexpr, K: tl.constexpr, D: tl.constexpr, GATED: tl.constexpr, HAS_LR: tl.constexpr,
                     HAS_WEIGHT: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """One block of ``BLOCK_M`` pairs routed to one expert, times ``BLOCK_N`` output rows."""
    blk = tl.program_id(0)
    e = tl.load(block_slot_ptr + blk).to(tl.int64)
    if e >= 0:
        pair = tl.load(pairs_ptr + blk * BLOCK_M + tl.arange(0, BLOCK_M))
        pair_ok = pair < n_pairs
        xrow = pair // x_row_div
        rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < n_out
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, n_in, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < n_in
            a = tl.load(x_ptr + xrow[:, None] * stride_x + ks[None, :], mask=pair_ok[:, None] & k_ok[None, :],
                        other=0.0).to(DOT)
            acc = _tile_dot(acc, a, idx_ptr, cb_ptr, e, rows, k0, n_in, row_ok, stride_ie, stride_ir,
                            rows_per_shard, S, K, D, DOT, PREC, BLOCK_N, BLOCK_K)
            if GATED:
                acc_up = _tile_dot(acc_up, a, idx_ptr, cb_ptr, e, rows + n_out, k0, n_in, row_ok, stride_ie,
                                   stride_ir, rows_per_shard, S, K, D, DOT, PREC, BLOCK_N, BLOCK_K)
        kk = tl.arange(0, BLOCK_R)
        kk_ok = kk < n_rank
        bx = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        if HAS_LR:
            bx = tl.load(bx_ptr + xrow[:, None] * stride_bx + kk[None, :], mask=pair_ok[:, None] & kk_ok[None, :],
                         other=0.0).to(tl.float32)
        y = _epilogue_tile(acc, e, rows, row_ok, lr_ptr, bx, kk, kk_ok, s_ptr, b_ptr, stride_le, stride_lr,
                           stride_ae, HAS_LR)
        if GATED:
            up = _epilogue_tile(acc_up, e, rows + n_out, row_ok, lr_ptr, bx, kk, kk_ok, s_ptr, b_ptr, stride_le,
                                stride_lr, stride_ae, HAS_LR)
            y = y * tl.sigmoid(y) * up
        if HAS_WEIGHT:
            y = y * tl.load(pw_ptr + pair, mask=pair_ok, other=0.0).to(tl.float32)[:, None]
        tl.store(out_ptr + pair.to(tl.int64)[:, None] * stride_out + rows[None, :], y,
                 mask=pair_ok[:, None] & row_ok[None, :])


def align_pairs(slots: torch.Tensor, n_local: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs sorted by expert, each expert's run padded to ``block_m``; all on device, no host sync.

    Returns ``pairs`` (pair indices, ``len(slots)`` as padding) of a static length
    ``ceil((P + n_local * (block_m - 1)) / block_m) * block_m`` and ``block_slot``
    (the expert of each block, -1 past the end). Pairs with slot -1 (another
    expert-parallel rank) are left out.
    """
    n_pairs = slots.numel()
    dev = slots.device
    key = torch.where(slots >= 0, slots, n_local).long()
    order = torch.argsort(key, stable=True)
    counts = torch.zeros(n_local + 1, dtype=torch.long, device=dev).scatter_add_(0, key, torch.ones_like(key))
    padded = (counts[:n_local] + block_m - 1) // block_m * block_m
    pad_end = torch.cumsum(padded, 0)
    pad_start = torch.cat([pad_end.new_zeros(1), pad_end[:-1]])
    run_start = torch.cumsum(counts, 0) - counts
    sorted_key = key[order]
    n_blocks = -(-(n_pairs + n_local * (block_m - 1)) // block_m)
    length = n_blocks * block_m
    rank_in_run = torch.arange(n_pairs, device=dev) - run_start[sorted_key]
    dest = torch.where(sorted_key < n_local, torch.cat([pad_start, pad_start.new_full((1,), length)])[sorted_key]
                       + rank_in_run, length)
    pairs = torch.full((length + 1,), n_pairs, dtype=torch.int32, device=dev)
    pairs.scatter_(0, dest, order.int())
    block_slot = torch.searchsorted(pad_end, torch.arange(n_blocks, device=dev) * block_m, right=True)
    block_slot = torch.where(block_slot < n_local, block_slot, -1).int()
    return pairs[:length], block_slot


def _group_args(idx, codebook, lr_a, affine_s, affine_b):
    """Strides and sizes of one group's tensors, shared by both kernels (which assume row-major rows)."""
    if not (idx.stride(-1) == 1 and codebook.is_contiguous() and affine_s.stride(-1) == 1
            and affine_b.stride() == affine_s.stride() and (lr_a is None or lr_a.stride(-1) == 1)):
        raise ValueError("KBVQ kernels need contiguous rows in idx, lr_a, affine_* and a contiguous codebook")
    n_local, rows, _ = idx.shape
    s, k, d = codebook.shape[1:]
    n_rank = 0 if lr_a is None else lr_a.shape[-1]
    return dict(S=s, K=k, D=d, rows_per_shard=rows // s, n_rank=n_rank,
                stride_ie=idx.stride(0), stride_ir=idx.stride(1),
                stride_le=0 if lr_a is None else lr_a.stride(0), stride_lr=0 if lr_a is None else lr_a.stride(1),
                stride_ae=affine_s.stride(0), HAS_LR=lr_a is not None)


def _vq_matmul(x, bx, slots, pair_weight, x_row_div, idx, codebook, lr_a, affine_s, affine_b, gated, plan):
    """One group (``w13`` when ``gated``, else ``w2`` / a linear) for every pair: ``[P, rows]`` float32.

    ``plan``: None for the GEMV kernel, else the grouped GEMM's ``(pairs, block_slot, block_m)``."""
    n_pairs = slots.numel()
    g = _group_args(idx, codebook, lr_a, affine_s, affine_b)
    n_out = idx.shape[1] // (2 if gated else 1)
    out = torch.zeros(n_pairs, n_out, dtype=torch.float32, device=x.device)
    lr = lr_a if lr_a is not None else affine_s
    bx_ = bx if bx is not None else x
    pw = pair_weight if pair_weight is not None else x
    common = dict(GATED=gated, HAS_WEIGHT=pair_weight is not None, stride_x=x.stride(0),
                  stride_bx=bx_.stride(0), stride_out=out.stride(0), x_row_div=x_row_div, **g)
    if plan is None:
        n_cols = idx.shape[2]
        block_r = GEMV_BLOCK_ROWS
        grid = (n_pairs, triton.cdiv(n_out, block_r))
        _vq_gemv[grid](x, slots, pw, idx, codebook, lr, bx_, affine_s, affine_b, out, n_cols, n_out,
                       BLOCK_R=block_r, BLOCK_J=GEMV_BLOCK_VECTORS, BLOCK_K=max(triton.next_power_of_2(g["n_rank"]), 2), **common)
    else:
        pairs, block_slot, block_m = plan
        block_n, block_k, warps = GEMM_BLOCK_N, GEMM_BLOCK_K, (8 if block_m >= GEMM_WARPS_LARGE_BLOCK_M else 4)
        grid = (block_slot.numel(), triton.cdiv(n_out, block_n))
        # ieee: float32 activations are not rounded to tf32 (half precision ignores it)
        prec = "ieee" if x.dtype == torch.float32 else "tf32"
        _vq_grouped_gemm[grid](x, pairs, block_slot, pw, idx, codebook, lr, bx_, affine_s, affine_b, out, n_pairs,
                               x.shape[1], n_out, DOT=_DOT_DTYPES[x.dtype], PREC=prec, BLOCK_M=block_m,
                               BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=max(triton.next_power_of_2(g["n_rank"]), 16),
                               num_warps=warps, **common)
    return out


def _plan(slots: torch.Tensor, n_local: int, block_m: int | None):
    return None if block_m is None else (*align_pairs(slots, n_local, block_m), block_m)


def kbvq_moe_triton(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                    expert_map: torch.Tensor | None, *groups: torch.Tensor | None, block_m: int | None) -> torch.Tensor:
    """:func:`.torch_moe.kbvq_moe_torch` through the Triton kernels (same arguments, same result);
    ``block_m`` None runs the GEMV kernel, else the grouped GEMM with blocks of that many pairs."""
    xf, ids, bx13, b2, experts = moe_prologue(x, topk_ids, expert_map, *groups)
    w13, w2 = experts[:5], experts[5:]  # idx, codebook, lr_a, affine_s, affine_b
    n_tok, top_k = ids.shape
    n_local = w13[0].shape[0]
    slots = ids.reshape(-1).int().contiguous()
    pair_weight = topk_weights.reshape(-1).float().contiguous()
    x = x.contiguous()
    plan = _plan(slots, n_local, block_m)
    h = _vq_matmul(x, bx13, slots, None, top_k, *w13, True, plan)
    bx2 = h @ b2.T if b2 is not None else None
    if plan is not None:
        h = h.to(x.dtype)  # the grouped GEMM multiplies in the activation dtype
    y = _vq_matmul(h, bx2, slots, pair_weight, 1, *w2, False, plan)
    return y.reshape(n_tok, top_k, -1).sum(1).to(x.dtype)


def kbvq_linear_triton(x: torch.Tensor, idx: torch.Tensor, codebook: torch.Tensor, lr_a: torch.Tensor | None,
                       lr_b: torch.Tensor | None, affine_s: torch.Tensor, affine_b: torch.Tensor, *,
                       block_m: int | None) -> torch.Tensor:
    """:func:`.torch_moe.kbvq_linear_torch` through the same kernels, as one expert that every token visits."""
    xs = x.reshape(-1, x.shape[-1]).contiguous()
    n_tok = xs.shape[0]
    bx = xs.float() @ lr_b.float().T if lr_b is not None else None
    slots = torch.zeros(n_tok, dtype=torch.int32, device=x.device)
    plan = _plan(slots, 1, block_m)
    y = _vq_matmul(xs, bx, slots, None, 1, idx[None], codebook[None], None if lr_a is None else lr_a[None],
                   affine_s[None], affine_b[None], False, plan)
    return y.to(x.dtype).reshape(*x.shape[:-1], -1)
