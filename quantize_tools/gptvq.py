"""Hessian-aware VQ assignment: GPTQ's error feedback, one d-column vector group at a time (GPTVQ-style).

k-means picks each vector's nearest codeword, which minimises the weight error. What
matters is the output error ``||(W - Q) X||``: with correlated inputs, the error
of one column group can be partly cancelled by adjusting the columns not yet
quantized. With ``U`` the upper Cholesky factor of ``H^{-1}`` (``H = X^T X / n``)
and ``L = U[J, J]`` for the group ``J`` at the front of the remaining columns,
the group's cost is ``||(w_J - q) L^{-1}||^2`` and the optimal compensation is
``W[:, R] -= (w_J - q) L^{-1} U[J, R]`` (the block form of GPTQ's update, Frantar
et al. 2022). The codebook is the k-means one; only the assignment changes, so
the checkpoint format is the same. Updates are applied lazily per block of
columns, as GPTQ does, which changes the arithmetic order but not the result.
"""
from __future__ import annotations

from typing import Iterable

import torch

__all__ = ["second_moment", "gptvq_assign"]


def second_moment(chunks: Iterable[torch.Tensor], dim: int, device) -> torch.Tensor:
    """``X^T X / n`` in float64 over the row chunks of ``X`` (the uncentred input second moment)."""
    h = torch.zeros(dim, dim, dtype=torch.float64, device=device)
    n = 0
    for x in chunks:
        x = x.to(device, torch.float64)
        h += x.T @ x
        n += x.shape[0]
    return h / max(n, 1)


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) I)^{-1}``; dead inputs get unit weight."""
    h = h.to(torch.float64).clone()
    diag = torch.diagonal(h)
    dead = diag <= 0
    diag[dead] = 1.0
    floor = damp * diag.mean()
    diag += floor
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


def gptvq_assign(w: torch.Tensor, h: torch.Tensor, codebook: torch.Tensor, damp: float = 1e-2,
                 block: int = 128) -> torch.Tensor:
    """Codes ``[oc, ic/d]`` for ``w [oc, ic]`` under the fixed ``codebook [K, d]``, with error feedback.

    ``h`` is the ``[ic, ic]`` second moment of the inputs ``w`` multiplies.
    """
    oc, ic = w.shape
    k, d = codebook.shape
    if ic % d:
        raise ValueError(f"input size {ic} is not divisible by the vector dimension {d}")
    block = max(d, block // d * d)
    u = _inverse_cholesky(h, damp).to(w.device, torch.float32)
    work = w.to(torch.float32).clone()
    cb = codebook.to(w.device, torch.float32)
    codes = torch.empty(oc, ic // d, dtype=torch.int64, device=w.device)
    for b0 in range(0, ic, block):
        b1 = min(b0 + block, ic)
        wb = work[:, b0:b1]  # a view: the in-block updates land in ``work``
        errs = torch.empty_like(wb)
        for j in range(0, b1 - b0, d):
            g = slice(b0 + j, b0 + j + d)
            l_inv = torch.linalg.inv(u[g, g])  # d x d upper triangular
            wt = wb[:, j:j + d] @ l_inv
            ct = cb @ l_inv
            dist = (ct * ct).sum(-1)[None, :] - 2 * wt @ ct.T  # + |wt|^2, the same for every codeword
            q = dist.argmin(-1)
            codes[:, (b0 + j) // d] = q
            err = (wb[:, j:j + d] - cb[q]) @ l_inv
            errs[:, j:j + d] = err
            wb[:, j + d:] -= err @ u[g, b0 + j + d:b1]
        work[:, b1:] -= errs @ u[b0:b1, b1:]
    return codes
