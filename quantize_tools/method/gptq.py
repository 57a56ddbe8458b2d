"""GPTQ's error feedback (Frantar et al. 2022), for scalar grids and for VQ codebooks: an option beside
the paper's nearest-codeword assignment (§2.1), and its GPTQ baseline (§4).

Rounding each weight to its nearest grid point minimises the weight error. What
matters is the output error ``||(W - Q) X||``: with correlated inputs, the error of
one column group can be partly cancelled by adjusting the columns not yet quantized.
With ``U`` the upper Cholesky factor of ``H^{-1}`` (``H = X^T X / n``) and
``L = U[J, J]`` for the group ``J`` of ``d`` columns at the front of the remaining
ones, the group's cost is ``||(w_J - q) L^{-1}||^2`` and the optimal compensation
is ``W[:, R] -= (w_J - q) L^{-1} U[J, R]``: GPTQ's update in block form (``d = 1``
is GPTQ itself, ``d > 1`` the vector form GPTVQ uses). Updates are applied lazily per
block of columns, as GPTQ does, which changes the arithmetic order, not the result.

Two users: :func:`gptvq_assign` (``--vq-method gptvq``: the k-means codebook, with
Hessian-aware assignment) and :func:`gptq_quantize` (the scalar GPTQ baseline).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

__all__ = ["second_moment", "error_feedback", "gptvq_assign", "gptq_quantize", "rtn_quantize"]


def second_moment(chunks: Iterable[torch.Tensor], dim: int, device) -> torch.Tensor:
    """``X^T X / n`` over the row chunks of ``X`` (the uncentred input second moment); float32 products
    per chunk, summed in float64."""
    h = torch.zeros(dim, dim, dtype=torch.float64, device=device)
    n = 0
    for x in chunks:
        x = x.to(device, torch.float32)
        h += (x.T @ x).double()
        n += x.shape[0]
    return h / max(n, 1)


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) I)^{-1}``; dead inputs get unit weight."""
    h = h.to(torch.float64).clone()
    diag = torch.diagonal(h)
    diag[diag <= 0] = 1.0
    diag += damp * diag.mean()
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


# choose(first column, current weights [oc, ic] (columns from ``first`` on are up to date), L^{-1})
#   -> quantized values of columns first .. first + d, [oc, d]
Chooser = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


def error_feedback(w: torch.Tensor, h: torch.Tensor, d: int, choose: Chooser, damp: float = 1e-2,
                   block: int = 128) -> torch.Tensor:
    """Quantize ``w [oc, ic]`` ``d`` columns at a time with ``choose``, compensating each group's error
    in the columns after it. Returns the quantized weights, float32."""
    oc, ic = w.shape
    if ic % d:
        raise ValueError(f"input size {ic} is not divisible by the vector dimension {d}")
    block = max(d, block // d * d)
    u = _inverse_cholesky(h, damp).to(w.device, torch.float32)
    work = w.to(torch.float32).clone()
    out = torch.empty_like(work)
    for b0 in range(0, ic, block):
        b1 = min(b0 + block, ic)
        errs = torch.empty(oc, b1 - b0, dtype=torch.float32, device=w.device)
        for j in range(b0, b1, d):
            g = slice(j, j + d)
            l_inv = torch.linalg.inv(u[g, g])  # d x d, upper triangular
            q = choose(j, work, l_inv)
            out[:, g] = q
            err = (work[:, g] - q) @ l_inv
            errs[:, j - b0:j - b0 + d] = err
            work[:, j + d:b1] -= err @ u[g, j + d:b1]
        work[:, b1:] -= errs @ u[b0:b1, b1:]
    return out


def gptvq_assign(w: torch.Tensor, h: torch.Tensor, codebook: torch.Tensor, damp: float = 1e-2,
                 block: int = 128) -> torch.Tensor:
    """Codes ``[oc, ic/d]`` for ``w [oc, ic]`` under the fixed ``codebook [K, d]``, with error feedback.

    Each group takes the codeword nearest in the metric ``L^{-1}`` (its cost above), not the
    Euclidean nearest. ``h`` is the ``[ic, ic]`` second moment of the inputs ``w`` multiplies.
    """
    d = codebook.shape[1]
    cb = codebook.to(w.device, torch.float32)
    codes = torch.empty(w.shape[0], w.shape[1] // d, dtype=torch.int64, device=w.device)

    def nearest(j, work, l_inv):
        wt, ct = work[:, j:j + d] @ l_inv, cb @ l_inv
        q = ((ct * ct).sum(-1)[None, :] - 2 * wt @ ct.T).argmin(-1)  # |wt|^2 is the same for every codeword
        codes[:, j // d] = q
        return cb[q]

    error_feedback(w, h, d, nearest, damp, block)
    return codes


def _grid(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric min/max grid per row of ``w [oc, g]``: (scale, zero point), each ``[oc, 1]``."""
    lo, hi = w.amin(-1, keepdim=True).clamp_max(0), w.amax(-1, keepdim=True).clamp_min(0)
    scale = ((hi - lo) / (2**bits - 1)).clamp_min(1e-8)
    return scale, torch.round(-lo / scale)


def _round(w, scale, zero, bits):
    return (torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1) - zero) * scale


def rtn_quantize(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Round-to-nearest on a per-row, per-group asymmetric min/max grid; dequantized float32 weights.
    Groups are consecutive ``group_size`` inputs; the last one is shorter when the size does not divide."""
    out = torch.empty(w.shape, dtype=torch.float32, device=w.device)
    for j in range(0, w.shape[1], group_size):
        g = w[:, j:j + group_size].float()
        out[:, j:j + group_size] = _round(g, *_grid(g, bits), bits)
    return out


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, bits: int, group_size: int, damp: float = 1e-2,
                  block: int = 128) -> torch.Tensor:
    """Scalar GPTQ with the RTN grid of :func:`rtn_quantize`; each group's grid is fitted when the
    sweep reaches it (to the weights as updated so far), as GPTQ does. Dequantized float32 weights."""
    grid = {}

    def round_column(j, work, _l_inv):
        if j % group_size == 0:
            grid["scale"], grid["zero"] = _grid(work[:, j:j + group_size], bits)
        return _round(work[:, j:j + 1], grid["scale"], grid["zero"], bits)

    return error_feedback(w, h, 1, round_column, damp, block)
