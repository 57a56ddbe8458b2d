"""One group of matrices that share an input space (a layer's routed experts of one weight type, or its
shared expert): IDRE (paper §1: KLT-guided joint SVD, one basis ``B`` for the group), vector quantization
of each member's residual (§2.1), then BCOS (§2.2: the channel-wise affine), with each member's output error
measured on the calibration inputs it sees.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from vllm_kbvq.archs import WEIGHT_TYPES
from vllm_kbvq.format import GROUPS, QuantizedMatrix, Width
from vllm_kbvq.kernels.torch_moe import dequantize_rows
from vllm_kbvq.packing import pack_codes
from vllm_kbvq.reference import KBVQLinear

from ..options import VQ_METHODS, LayerOptions
from .bcos import OutputStats, fit_affine
from .expert_inputs import chunks
from .gptq import gptvq_assign, second_moment
from .idre import KLT, identity_klt, joint_svd, klt
from .vq import vq_quantize

__all__ = ["GroupResult", "InputSpace", "quantize_group", "group_seed"]


@dataclass
class GroupResult:
    """Stored tensors of one weight type for all ``n`` members of a group (routed experts, or one shared
    expert); the names are the format's. Codes and codebooks are per member (their shapes follow the
    member's width), the rest stacked over the members."""

    vq_codes: list[torch.Tensor]  # n x [oc, words] int32
    vq_codebook: list[torch.Tensor]  # n x [K, d] fp16
    lr_a: torch.Tensor | None  # [n, oc, k] fp16
    lr_b: torch.Tensor | None  # [k, ic] fp16, shared by the members
    affine_s: torch.Tensor  # [n, oc] fp16
    affine_b: torch.Tensor  # [n, oc] fp16
    ic: int
    widths: list[Width]  # per member
    report: dict = field(default_factory=dict)
    # per member, the squared output error over its inputs before and after BCOS; the members' output energy
    member_err_vq: list[float] = field(default_factory=list)
    member_err: list[float] = field(default_factory=list)
    energy: float = 0.0

    @property
    def oc(self) -> int:
        return self.affine_s.shape[1]

    def member(self, e: int, owns_basis: bool = True) -> QuantizedMatrix:
        """Member ``e``'s tensors; ``lr_b`` with them only where ``owns_basis`` (it is stored once)."""
        return QuantizedMatrix(
            vq_codes=self.vq_codes[e], vq_codebook=self.vq_codebook[e], affine_s=self.affine_s[e],
            affine_b=self.affine_b[e], lr_a=None if self.lr_a is None else self.lr_a[e],
            lr_b=self.lr_b if owns_basis else None)

    def linear(self, e: int) -> KBVQLinear:
        """Member ``e`` as a runtime module (the same code the reference runtime uses)."""
        rank = 0 if self.lr_a is None else self.lr_a.shape[-1]
        lin = KBVQLinear(self.ic, self.oc, self.widths[e], rank, owns_basis=True)
        lin.load(self.member(e))
        return lin

    @staticmethod
    def pick(by_width: dict[Width, GroupResult], widths: Sequence[Width]) -> GroupResult:
        """Member ``e`` from the result at ``widths[e]``; the results are of the same matrices, whose
        shared basis does not depend on the width (IDRE comes before VQ)."""
        first = next(iter(by_width.values()))
        if first.lr_b is not None and not all(torch.equal(r.lr_b, first.lr_b) for r in by_width.values()):
            raise AssertionError("the shared basis differs between widths: IDRE must not depend on the width")
        take = lambda name: [getattr(by_width[w], name)[e] for e, w in enumerate(widths)]  # noqa: E731
        stack = lambda name: None if getattr(first, name) is None else torch.stack(take(name))  # noqa: E731
        out = GroupResult(vq_codes=take("vq_codes"), vq_codebook=take("vq_codebook"), lr_a=stack("lr_a"),
                           lr_b=first.lr_b, affine_s=stack("affine_s"), affine_b=stack("affine_b"), ic=first.ic,
                           widths=list(widths), report=first.report, member_err_vq=take("member_err_vq"),
                           member_err=take("member_err"), energy=first.energy)
        out.report = {**first.report, "rel_err": {"plain_vq": None, "idre_vq": sum(out.member_err_vq) / out.energy,
                                                  "idre_vq_bcos": sum(out.member_err) / out.energy}}
        return out


class InputSpace:
    """An input covariance and its KLT, computed on first use and kept: the gate and up of every group of a
    layer (routed and shared, at every candidate width) see the block's tokens, so one eigendecomposition
    serves them all."""

    def __init__(self, cov: torch.Tensor):
        self.cov = cov
        self._klt: dict = {}

    def klt(self, opts: LayerOptions, device) -> KLT:
        key = (opts.klt, opts.damp, str(device))
        if key not in self._klt:
            self._klt[key] = klt(self.cov.to(device), opts.damp) if opts.klt else identity_klt(self.cov.shape[0], device)
        return self._klt[key]


def quantize_group(
    w: torch.Tensor,
    cov: torch.Tensor | InputSpace,
    inputs: Callable[[int], torch.Tensor],
    opts: LayerOptions,
    rank: int,
    seed: int,
    progress: Callable[[str], None] | None = None,
    widths: Sequence[Width] | None = None,
) -> GroupResult:
    """IDRE + VQ + BCOS for the matrices ``w`` ``[n, oc, ic]`` that share one input space.

    ``cov`` is the input covariance used for the KLT (an :class:`InputSpace` to share its KLT); ``inputs(e)`` returns the
    calibration inputs member ``e`` sees (its routed tokens, or the fallback). ``widths``: per member
    (default: all ``opts.bits`` in vectors of ``opts.vector_dim``); the members of one width share a
    k-means call, and the shared basis is fitted over all of them.
    """
    if opts.vq_method not in VQ_METHODS:
        raise ValueError(f"unknown vq_method {opts.vq_method!r}: one of {', '.join(VQ_METHODS)}")
    say = progress or (lambda msg: None)
    n, oc, ic = w.shape
    device = w.device
    widths = list(widths) if widths is not None else [Width(opts.bits, opts.vector_dim)] * n
    rep: dict = {"rank": rank}
    if rank > 0:
        say("KLT and joint SVD")
        t = (cov if isinstance(cov, InputSpace) else InputSpace(cov)).klt(opts, device)
        rep["klt_clamped_eigenvalues"] = t.clamped
        idre = joint_svd(w, t, rank)
        a, b, residual = idre.a, idre.b, idre.residual
        rep["rho"] = idre.rho
        low_rank = a.float() @ b.float()
    else:
        a = b = None
        residual, low_rank = w.float(), None
    row_scale = _row_scale(residual) if opts.row_scale else None
    if row_scale is not None:  # the codebook is fitted to rows of equal RMS
        residual = residual / row_scale[..., None]
    codes, codebook = [None] * n, [None] * n
    w_hat = torch.empty(n, oc, ic, dtype=torch.float32, device=device)
    for width in sorted(set(widths)):
        members = [e for e in range(n) if widths[e] == width]
        sub = residual if len(members) == n else residual[members]
        c, cb = vq_quantize(sub, width.bits, width.vector_dim, opts.kmeans_iters, seed, progress=say,
                            max_fit_points=opts.kmeans_sample)
        for k, e in enumerate(members):
            if opts.vq_method == "gptvq":  # each member's own inputs: routed experts see different tokens
                say(f"GPTVQ assignment {e + 1}/{n}")
                h = second_moment(chunks(inputs(e)), ic, device)
                c[k] = gptvq_assign(residual[e], h, cb[k], opts.damp)
            codes[e], codebook[e] = pack_codes(c[k].cpu(), width.index_bits), cb[k].cpu()
        w_hat[members] = dequantize_rows(c, cb[:, None])
    if row_scale is not None:
        w_hat = w_hat * row_scale[..., None]
    if low_rank is not None:
        w_hat = w_hat + low_rank
    w_plain = None
    if opts.compare_plain_vq and rank > 0 and len(set(widths)) == 1:
        pc, pb = vq_quantize(w.float(), widths[0].bits, widths[0].vector_dim, opts.kmeans_iters, seed + 7919,
                             progress=lambda msg: say(f"plain-VQ comparison, {msg}"), max_fit_points=opts.kmeans_sample)
        w_plain = dequantize_rows(pc, pb[:, None])

    affine_s = torch.zeros(n, oc, dtype=torch.float16, device=device)
    affine_b = torch.zeros(n, oc, dtype=torch.float16, device=device)
    err = {"plain_vq": 0.0, "idre_vq": 0.0, "idre_vq_bcos": 0.0}
    energy = 0.0
    member_err, member_err_vq = [], []
    wf = w.float()
    say("BCOS and output errors")
    for e in range(n):
        st, st_plain = OutputStats(oc, device), OutputStats(oc, device)
        for x in chunks(inputs(e)):
            x = x.to(device, torch.float32)
            y = x @ wf[e].T
            st.add(y, x @ w_hat[e].T)
            if w_plain is not None:
                st_plain.add(y, x @ w_plain[e].T)
        se = be = torch.zeros(oc, dtype=torch.float64, device=device)
        if opts.bcos:
            se, be = fit_affine(st, opts.bcos_mode)
            se, be = se.to(torch.float16).double(), be.to(torch.float16).double()
        energy += st.energy()
        member_err_vq.append(st.sq_error())
        err["idre_vq"] += member_err_vq[-1]
        member_err.append(st.sq_error(se, be))
        err["idre_vq_bcos"] += member_err[-1]
        if row_scale is not None:  # y = (1+s) D (W_vq + (A/D) B) x + b: the row scale folds into s and A
            se = (1 + se) * row_scale[e].double() - 1
        affine_s[e], affine_b[e] = se.to(torch.float16), be.to(torch.float16)
        if w_plain is not None:
            err["plain_vq"] += st_plain.sq_error()
        elif rank == 0:  # without IDRE the "IDRE+VQ" matrices are plain VQ
            err["plain_vq"] += st.sq_error()
    rep["rel_err"] = {k: v / max(energy, 1e-30) for k, v in err.items()}
    if row_scale is not None and a is not None:
        a = (a.float() / row_scale[..., None]).to(torch.float16)
    if w_plain is None and rank > 0:
        rep["rel_err"]["plain_vq"] = None  # comparison skipped (--no-plain-vq-report)
    return GroupResult(
        vq_codes=codes, vq_codebook=codebook, lr_a=None if a is None else a.cpu(), lr_b=None if b is None else b.cpu(),
        affine_s=affine_s.cpu(), affine_b=affine_b.cpu(), ic=ic, widths=widths, report=rep,
        member_err_vq=member_err_vq, member_err=member_err, energy=max(energy, 1e-30),
    )


def _row_scale(residual: torch.Tensor) -> torch.Tensor:
    """Per output row, its RMS over the matrix's mean row RMS (``[n, oc]``), within [1/16, 16]: stored folded
    as ``affine_s = (1 + s) * scale - 1`` in float16, whose rounding then moves a row's scale by < 0.4 %."""
    rms = residual.double().pow(2).mean(-1).sqrt()
    typical = rms.mean(-1, keepdim=True).clamp_min(1e-30)
    return (rms / typical).clamp(1 / 16, 16).to(residual.dtype)


def group_seed(seed: int, layer: int, group: str, wtype: str) -> int:
    return (seed * 1_000_003 + layer * 7_919 + GROUPS.index(group) * 131 +
            WEIGHT_TYPES.index(wtype) * 17) % (2**62)
