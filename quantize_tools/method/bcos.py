"""BCOS: bias-corrected output stabilisation (paper §2.2: channel-wise affine after each expert linear).

Per output channel, the compressed output is rescaled and shifted so its mean
and standard deviation on the calibration tokens match the full-precision
output: ``y ~ (1 + affine_s) * y_hat + affine_b`` (the checkpoint's names). Five running sums per channel are enough to
fit it and to measure the output error before and after, in one pass.
"""
from __future__ import annotations

import torch

__all__ = ["OutputStats", "fit_affine", "MODES"]

MODES = ("moment", "lstsq")


class OutputStats:
    """Per-channel sums of ``y``, ``y_hat``, their squares and products (float64), for one matrix."""

    def __init__(self, channels: int, device="cpu"):
        z = lambda: torch.zeros(channels, dtype=torch.float64, device=device)  # noqa: E731
        self.n = 0
        self.sy, self.sh, self.syy, self.shh, self.syh = z(), z(), z(), z(), z()

    def add(self, y: torch.Tensor, y_hat: torch.Tensor) -> None:
        y = y.reshape(-1, y.shape[-1]).to(self.sy.device, torch.float64)
        h = y_hat.reshape(-1, y_hat.shape[-1]).to(self.sy.device, torch.float64)
        self.n += y.shape[0]
        self.sy += y.sum(0)
        self.sh += h.sum(0)
        self.syy += (y * y).sum(0)
        self.shh += (h * h).sum(0)
        self.syh += (y * h).sum(0)

    def sq_error(self, affine_s: torch.Tensor | None = None, affine_b: torch.Tensor | None = None) -> float:
        """``sum ||(1+affine_s) y_hat + affine_b - y||^2`` over the tokens seen (default: the identity)."""
        a = 1 + (affine_s.to(torch.float64) if affine_s is not None else torch.zeros_like(self.sy))
        b = affine_b.to(torch.float64) if affine_b is not None else torch.zeros_like(self.sy)
        err = a * a * self.shh + self.n * b * b + self.syy + 2 * a * b * self.sh - 2 * a * self.syh - 2 * b * self.sy
        return float(err.clamp_min(0).sum())

    def energy(self) -> float:
        return float(self.syy.sum())


def fit_affine(st: OutputStats, mode: str = "moment") -> tuple[torch.Tensor, torch.Tensor]:
    """Channel scale and shift ``(affine_s, affine_b)`` (float64).

    ``moment`` (the paper): ``1+s = sigma(y)/sigma(y_hat)``, ``b = mu(y) - (1+s) mu(y_hat)``
    (``s``, ``b``: the paper's symbols for ``affine_s``, ``affine_b``).
    ``lstsq``: the least-squares slope ``Cov(y, y_hat)/Var(y_hat)``, the same shift rule.
    A channel whose compressed output is constant keeps ``s = 0``.
    """
    if mode not in MODES:
        raise ValueError(f"unknown BCOS mode {mode!r}; choose from {MODES}")
    if st.n < 2:
        raise ValueError("BCOS needs at least 2 calibration tokens")
    n = st.n
    mu_y, mu_h = st.sy / n, st.sh / n
    var_y = (st.syy / n - mu_y**2).clamp_min(0)
    var_h = (st.shh / n - mu_h**2).clamp_min(0)
    ok = var_h > 1e-12 * (var_y + 1e-30)
    if mode == "moment":
        scale = torch.where(ok, (var_y / var_h.where(ok, torch.ones_like(var_h))).sqrt(), torch.ones_like(var_h))
    else:
        cov = st.syh / n - mu_y * mu_h
        scale = torch.where(ok, cov / var_h.where(ok, torch.ones_like(var_h)), torch.ones_like(var_h))
    s = scale - 1
    b = mu_y - scale * mu_h
    return s, b

