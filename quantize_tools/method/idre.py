"""IDRE: input-driven redundancy elimination (paper §1: KLT-guided joint SVD across experts).

In the KLT (coloring) space of the calibration inputs, ``E||(W'-W)x||^2 =
||(W'-W) U_X||_F^2``, so the top right-singular directions of the stacked
``[W_1 U_X; ...; W_n U_X]`` are the input directions that carry the most output
energy shared by all experts. They become one basis ``B`` per layer and weight
type; each expert keeps a small private factor ``A_i``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_kbvq.archs import WEIGHT_TYPES, MoEGeometry
from vllm_kbvq.format import default_rank, matrix_shape

__all__ = ["CovarianceAccumulator", "KLT", "klt", "IDREResult", "joint_svd", "ranks_for"]


class CovarianceAccumulator:
    """Uncentered input covariance ``X^T X / (N - 1)``, accumulated in float64 chunk by chunk."""

    def __init__(self, dim: int, device: torch.device | str = "cpu"):
        self.xtx = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self.xtx.device, torch.float64)
        self.xtx.addmm_(x.T, x)
        self.count += x.shape[0]

    def covariance(self) -> torch.Tensor:
        if self.count < 2:
            raise ValueError(f"need at least 2 calibration tokens for a covariance, got {self.count}")
        return self.xtx / (self.count - 1)


@dataclass
class KLT:
    """Coloring basis ``U = Q diag(sqrt(lam))`` and its inverse, with damped eigenvalues."""

    u: torch.Tensor  # [ic, ic]
    u_inv: torch.Tensor  # [ic, ic]
    eigenvalues: torch.Tensor  # damped, ascending
    clamped: int  # how many eigenvalues the damping raised


def klt(cov: torch.Tensor, damp: float = 1e-2) -> KLT:
    """KLT of a covariance. Eigenvalues are clamped to ``damp * mean`` so ``U^{-1}`` stays bounded."""
    cov = cov.to(torch.float64)
    lam, q = torch.linalg.eigh((cov + cov.T) / 2)
    floor = damp * lam.clamp_min(0).mean().clamp_min(torch.finfo(torch.float64).tiny)
    clamped = int((lam < floor).sum())
    lam = lam.clamp_min(floor)
    sq = lam.sqrt()
    return KLT(u=q * sq, u_inv=(q / sq).T, eigenvalues=lam, clamped=clamped)


def identity_klt(dim: int, device="cpu") -> KLT:
    """Plain (input-agnostic) SVD: the ablation "SVD without KLT"."""
    eye = torch.eye(dim, dtype=torch.float64, device=device)
    return KLT(u=eye, u_inv=eye, eigenvalues=torch.ones(dim, dtype=torch.float64, device=device), clamped=0)


@dataclass
class IDREResult:
    a: torch.Tensor  # [n, oc, k] float16, private factors
    b: torch.Tensor  # [k, ic] float16, shared basis
    residual: torch.Tensor  # [n, oc, ic] float32, W_i - A_i B (with the stored fp16 factors)
    rho: float  # energy of the stacked KLT-space weights captured by the top-k directions


def joint_svd(w: torch.Tensor, t: KLT, rank: int) -> IDREResult:
    """Shared basis and private factors for the stacked experts ``w`` ``[n, oc, ic]``.

    Only the right singular vectors of the stacked ``n*oc x ic`` matrix are needed,
    so this takes the eigenvectors of its ``ic x ic`` Gram matrix rather than a
    full SVD (the same subspace, far cheaper when ``n*oc >> ic``). Where the stack has fewer rows than
    columns (a shared expert's down projection: 2048 x 5632 in Qwen1.5-MoE), the row Gram is the smaller
    one: its eigenvectors map to the same right singular vectors (:func:`_top_right_singular`).
    """
    n, oc, ic = w.shape
    if not 0 < rank <= ic:
        raise ValueError(f"rank must be in 1..{ic}, got {rank}")
    w64 = w.to(t.u.device, torch.float64)
    wu = w64 @ t.u  # [n, oc, ic]
    uk, sig2 = _top_right_singular(wu, rank)  # [ic, k], strongest first
    rho = float(sig2[-rank:].sum() / sig2.sum().clamp_min(torch.finfo(torch.float64).tiny))
    b = (uk.T @ t.u_inv).to(torch.float16)
    a = (wu @ uk).to(torch.float16)
    del wu  # float64 copies of all experts are the quantizer's largest working set: two at a time, not four
    low_rank = a.to(torch.float64) @ b.to(torch.float64)
    residual = torch.sub(w64, low_rank, out=low_rank).to(torch.float32)
    return IDREResult(a=a, b=b, residual=residual.to(w.device), rho=rho)


def _top_right_singular(stack: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``rank`` strongest right singular vectors (``[c, rank]``) of the stacked ``[n, oc, c]`` and all its
    squared singular values, from the eigenvectors of the smaller Gram matrix: eigh costs the cube of its side
    (5632: 24 s, 2048: 1 s on the 2-core Zen 3). From the row Gram, ``v = m^T u / sigma``; where a wanted
    ``sigma`` is too small for that division to keep ``v`` orthonormal, the column Gram is used."""
    n, oc, c = stack.shape
    if n * oc < c and rank <= n * oc:
        m = stack.reshape(n * oc, c)
        sig2, u = torch.linalg.eigh(_sym(m @ m.T))  # ascending
        sig2 = sig2.clamp_min(0)
        top = sig2[-rank:].flip(-1)
        if bool((top > sig2[-1] * 1e-12).all()):
            return (m.T @ u[:, -rank:].flip(-1)) / top.sqrt(), sig2
    sig2, v = torch.linalg.eigh(_sym(torch.einsum("noi,noj->ij", stack, stack)))
    return v[:, -rank:].flip(-1), sig2.clamp_min(0)


def _sym(g: torch.Tensor) -> torch.Tensor:
    return (g + g.T) / 2


def ranks_for(opts, geom: MoEGeometry) -> dict[str, dict[str, int]]:
    """Rank of the shared basis per group and weight type, from ``opts.rank_ratio`` (0 everywhere without IDRE)."""
    return {group: {w: default_rank(*matrix_shape(w, geom.hidden, width), opts.rank_ratio) if opts.idre else 0
                    for w in WEIGHT_TYPES}
            for group, _, width in geom.groups}
