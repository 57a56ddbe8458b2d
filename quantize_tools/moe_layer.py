"""Quantize one MoE block from its captured calibration inputs.

Order inside a layer: gate and up (inputs: the tokens entering the block), then
down (inputs: the intermediate activations produced by the *quantized* gate/up,
so down is fitted to what it will see at inference), then the shared expert the
same way. Every matrix goes IDRE -> VQ of the residual -> BCOS.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

from vllm_kbvq.archs import WEIGHT_TYPES, ArchSpec
from vllm_kbvq.format import (
    GROUPS,
    KBVQConfig,
    QuantizedMatrix,
    Width,
    default_rank,
    layer_matrices,
    matrix_shape,
    spec_bits,
    tensor_specs,
)
from vllm_kbvq.kernels.torch_moe import dequantize_rows
from vllm_kbvq.packing import pack_codes
from vllm_kbvq.reference import KBVQLinear

from .allocate import AllocationError, Unit, allocate
from .bcos import OutputStats, fit_affine
from .finetune import finetune_block
from .gptq import gptvq_assign, second_moment
from .idre import CovarianceAccumulator, identity_klt, joint_svd, klt
from .options import VQ_METHODS, LayerOptions, QuantizeError
from .vq import vq_quantize

__all__ = ["LayerOptions", "quantize_group", "quantize_moe_block"]

_TOKEN_CHUNK = 8192  # tokens per matmul when streaming statistics


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


def _chunks(x: torch.Tensor):
    for i in range(0, x.shape[0], _TOKEN_CHUNK):
        yield x[i : i + _TOKEN_CHUNK]


def quantize_group(
    w: torch.Tensor,
    cov: torch.Tensor,
    inputs: Callable[[int], torch.Tensor],
    opts: LayerOptions,
    rank: int,
    seed: int,
    progress: Callable[[str], None] | None = None,
    widths: Sequence[Width] | None = None,
) -> GroupResult:
    """IDRE + VQ + BCOS for the matrices ``w`` ``[n, oc, ic]`` that share one input space.

    ``cov`` is the input covariance used for the KLT; ``inputs(e)`` returns the
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
        t = klt(cov.to(device), opts.damp) if opts.klt else identity_klt(ic, device)
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
        c, cb = vq_quantize(sub, width.bits, width.vector_dim, opts.kmeans_iters, seed, progress=say)
        for k, e in enumerate(members):
            if opts.vq_method == "gptvq":  # each member's own inputs: routed experts see different tokens
                say(f"GPTVQ assignment {e + 1}/{n}")
                h = second_moment(_chunks(inputs(e)), ic, device)
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
                             progress=lambda msg: say(f"plain-VQ comparison, {msg}"))
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
        for x in _chunks(inputs(e)):
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


def routed_tokens(topk: torch.Tensor, n_experts: int, min_tokens: int):
    """Per expert: the indices of the tokens routed to it, their count, and whether the count is below
    ``min_tokens`` (such experts are fitted on all of the layer's tokens instead)."""
    token_ids = [torch.where((topk == e).any(-1))[0] for e in range(n_experts)]
    counts = [int(t.numel()) for t in token_ids]
    return token_ids, counts, [c < min_tokens for c in counts]


def quantize_moe_block(
    layer: int,
    x: torch.Tensor,
    topk: torch.Tensor,
    weights: Callable[[str, str], torch.Tensor],
    arch: ArchSpec,
    n_experts: int,
    shared: bool,
    act_fn,
    opts: LayerOptions,
    cfg: KBVQConfig,
    device="cpu",
    progress: Callable[[str], None] | None = None,
    block=None,
) -> tuple[dict[str, torch.Tensor], dict]:
    """Quantize the routed (and shared) experts of one layer.

    ``x``: ``[T, hidden]`` tokens entering the block; ``topk``: ``[T, k]`` routed
    expert ids; ``weights(group, wtype)`` returns ``[n, oc, ic]`` FP weights.
    Returns the checkpoint tensors by name (:func:`vllm_kbvq.format.layer_matrices` names them) and
    the layer's report. ``progress`` hears which weight type and stage is running. ``block``, the
    transformers MoE block (FP router and shared expert), is needed only for ``opts.finetune_steps``.
    """
    say = progress or (lambda msg: None)
    out: dict[str, torch.Tensor] = {}
    results: dict[tuple[str, str], GroupResult] = {}
    report: dict = {"layer": layer}
    x = x.to(torch.float32)
    cov_x = CovarianceAccumulator(x.shape[1], device)
    for c in _chunks(x):
        cov_x.add(c)
    cov_x = cov_x.covariance()

    token_ids, counts, fallback = routed_tokens(topk, n_experts, opts.bcos_min_tokens)
    report["routed_tokens"] = counts
    report["bcos_fallback_experts"] = [e for e, f in enumerate(fallback) if f]

    groups = [("experts", n_experts, lambda e: x if fallback[e] else x[token_ids[e]])]
    if shared:
        groups.append(("shared_experts", 1, lambda e: x))
    steps = len(groups) * len(WEIGHT_TYPES)

    def stage(group, wtype, n):
        step = [g for g, _, _ in groups].index(group) * len(WEIGHT_TYPES) + WEIGHT_TYPES.index(wtype) + 1
        what = f"{n} routed {wtype}" if group == "experts" else f"shared {wtype}"
        return lambda msg: say(f"{what} ({step}/{steps}): {msg}")

    plans = {}
    if opts.bits_budget is not None:  # every candidate width measured, then one chosen per unit
        plans, report["allocation"] = _allocate_layer(layer, groups, x, token_ids, counts, weights, cov_x, act_fn,
                                                      opts, cfg, stage, device)
    widths_of: dict[str, dict[str, list[Width]]] = {}
    for group, n, group_inputs in groups:
        grep = {}
        w_down = weights(group, "down").to(device)
        if group in plans:
            gu, down_widths = plans[group]
        else:
            gu = {wtype: quantize_group(weights(group, wtype).to(device), cov_x, group_inputs, opts,
                                        cfg.rank[group][wtype], group_seed(opts.seed, layer, group, wtype),
                                        stage(group, wtype, n))
                  for wtype in ("gate", "up")}
            down_widths = None
        for wtype in ("gate", "up"):
            grep[wtype] = gu[wtype].report
        gate = [gu["gate"].linear(e).to(device) for e in range(n)]
        up = [gu["up"].linear(e).to(device) for e in range(n)]
        for lin in gate + up:  # run twice per expert below: dequantize once (bit-identical outputs)
            lin.cache_vq_weight()

        cov_h = _down_covariance(group, n, x, token_ids, counts, gate, up, act_fn, w_down.shape[2], device)
        down_inputs = _activations(group_inputs, gate, up, act_fn, w_down.shape[2], device)
        # the down projections are fitted (again, under a budget: at the chosen widths) to what the quantized
        # gate and up produce
        dres = quantize_group(w_down, cov_h, down_inputs, opts, cfg.rank[group]["down"],
                              group_seed(opts.seed, layer, group, "down"), stage(group, "down", n), widths=down_widths)
        grep["down"] = dres.report
        report[group] = grep
        for wtype, res in (("gate", gu["gate"]), ("up", gu["up"]), ("down", dres)):
            results[group, wtype] = res
            widths_of.setdefault(group, {})[wtype] = res.widths
    if opts.finetune_steps:
        if block is None:
            raise ValueError("fine-tuning (finetune_steps > 0) needs the MoE block")
        report["finetune"] = finetune_block(block, arch, x, results, weights, n_experts, act_fn, opts,
                                            group_seed(opts.seed, layer, "experts", "gate") ^ 0x5EED, device,
                                            say)
    if opts.bits_budget is not None:
        report["width_of"] = {g: {w: [opts.candidate_widths.index((v.bits, v.vector_dim)) for v in ws]
                                  for w, ws in per.items()} for g, per in widths_of.items()}
    cfg = _with_widths(cfg, layer, report.get("width_of"))
    hidden = x.shape[1]
    inter = results["experts", "gate"].oc
    for ref in layer_matrices(arch, cfg, layer, n_experts, hidden, inter):
        out.update(results[ref.group, ref.wtype].member(ref.member, ref.owns_basis).tensors(ref))
    return out, report


def _with_widths(cfg: KBVQConfig, layer: int, width_of: dict | None) -> KBVQConfig:
    """``cfg`` with this layer's widths filled in (the pipeline collects every layer's into the checkpoint's)."""
    if width_of is None:
        return cfg
    return replace(cfg, width_of={**(cfg.width_of or {}), str(layer): width_of})


def _down_covariance(group, n, x, token_ids, counts, gate, up, act_fn, inter: int, device) -> torch.Tensor:
    """The down projections' input covariance, over what the quantized gate and up give the routed tokens."""
    cov_h = CovarianceAccumulator(inter, device)
    for e in range(n):
        if group == "experts" and counts[e] == 0:
            continue  # the down KLT pools routed activations only
        xe = x[token_ids[e]] if group == "experts" else x
        for c in _chunks(xe):
            c = c.to(device)
            cov_h.add(act_fn(gate[e](c)) * up[e](c))
    return cov_h.covariance()


def _allocate_layer(layer, groups, x, token_ids, counts, weights, cov_x, act_fn, opts, cfg, stage, device):
    """Under ``opts.bits_budget``: every member's gate/up and down quantized at every candidate width, the
    errors measured where they land (the member's output on its calibration inputs), then one width per
    unit (a member's fused gate and up; its down) by :func:`.allocate.allocate`, so the layer's KBVQ
    tensors take at most ``bits_budget`` bits per expert weight.

    Gate/up's error at a width is the member's output error with its down in full precision; down's is
    on the full-precision gate/up activations. Returns, per group, gate and up at the chosen widths and
    the down widths (down is fitted again at them by the caller, on the quantized gate/up's activations),
    and the allocation report.
    """
    cands = [Width(*w) for w in opts.candidate_widths]
    opts = replace(opts, compare_plain_vq=False)  # the plain-VQ comparison is for uniform runs
    units, where, measured = [], [], {}
    total_weights = 0
    for group, n, group_inputs in groups:
        w = {wtype: weights(group, wtype).to(device) for wtype in WEIGHT_TYPES}
        total_weights += sum(t.numel() for t in w.values())
        gu = {wtype: {} for wtype in ("gate", "up")}
        err = {"gate_up": [[0.0] * len(cands) for _ in range(n)], "down": [[0.0] * len(cands) for _ in range(n)]}

        fp_gate = [lambda c, e=e, w=w: c @ w["gate"][e].T for e in range(n)]
        fp_up = [lambda c, e=e, w=w: c @ w["up"][e].T for e in range(n)]
        cov_fp = _down_covariance(group, n, x, token_ids, counts, fp_gate, fp_up, act_fn, w["down"].shape[2], device)
        for k, width in enumerate(cands):
            for wtype in ("gate", "up"):
                gu[wtype][width] = quantize_group(
                    w[wtype], cov_x, group_inputs, opts, cfg.rank[group][wtype],
                    group_seed(opts.seed, layer, group, wtype), stage(group, wtype, n), widths=[width] * n)
            for e in range(n):
                g, u = gu["gate"][width].linear(e).to(device), gu["up"][width].linear(e).to(device)
                for c in _chunks(group_inputs(e).to(device, torch.float32)):
                    d = (act_fn(g(c)) * u(c) - act_fn(fp_gate[e](c)) * fp_up[e](c)) @ w["down"][e].T
                    err["gate_up"][e][k] += float(d.double().pow(2).sum())
            down = quantize_group(w["down"], cov_fp, _activations(group_inputs, fp_gate, fp_up, act_fn,
                                                                  w["down"].shape[2], device),
                                  opts, cfg.rank[group]["down"],
                                  group_seed(opts.seed, layer, group, "down"), stage(group, "down", n),
                                  widths=[width] * n)
            for e in range(n):
                err["down"][e][k] = down.member_err[e]
        measured[group] = gu
        for unit, wtypes in _UNITS.items():
            for e in range(n):
                mats = [(*w[t].shape[1:], cfg.rank[group][t], e == 0) for t in wtypes]
                units.append(Unit(tuple(_bits(mats, width) for width in cands), tuple(err[unit][e])))
                where.append((group, unit, e))
    budget = opts.bits_budget * total_weights
    try:
        choice = allocate(units, budget)
    except AllocationError:
        least = sum(min(u.costs) for u in units) / total_weights
        raise QuantizeError(f"--bits-budget {opts.bits_budget}: layer {layer} needs at least {least:.3f} bits per "
                            f"expert weight, with every matrix at its cheapest of --candidate-widths") from None
    chosen: dict[str, dict[str, list[Width]]] = {}
    for (group, unit, e), k in zip(where, choice):
        n = next(m for g, m, _ in groups if g == group)
        chosen.setdefault(group, {}).setdefault(unit, [None] * n)[e] = cands[k]
    plans = {group: ({wtype: GroupResult.pick(measured[group][wtype], chosen[group]["gate_up"]) for wtype in ("gate", "up")},
                     chosen[group]["down"]) for group in chosen}
    spent = sum(u.costs[k] for u, k in zip(units, choice))
    rep = {"budget_bits_per_weight": opts.bits_budget, "bits_per_weight": spent / total_weights,
           "error": sum(u.errors[k] for u, k in zip(units, choice)),
           "error_cheapest": sum(u.errors[min(range(len(cands)), key=lambda i: u.costs[i])] for u in units),
           "widths": {group: {unit: {str(c): sum(v == c for v in ws) for c in cands} for unit, ws in per.items()}
                      for group, per in chosen.items()}}
    return plans, rep


_UNITS = {"gate_up": ("gate", "up"), "down": ("down",)}  # what gets one width: an expert's fused gate and up; its down


def _bits(mats: list[tuple[int, int, int, bool]], width: Width) -> int:
    """Stored bits of matrices ``(oc, ic, rank, owns_basis)`` at ``width``: codes, codebook, factors, affine."""
    return sum(spec_bits(tensor_specs(oc, ic, width, rank, owns)) for oc, ic, rank, owns in mats)


def least_bits_per_weight(refs, widths: Sequence[Width]) -> float:
    """The fewest bits per expert weight a layer of matrices ``refs`` (:class:`vllm_kbvq.format.MatrixRef`)
    can store at the candidate ``widths``: every unit at its cheapest."""
    units: dict[tuple, list] = {}
    for r in refs:
        unit = next(u for u, wtypes in _UNITS.items() if r.wtype in wtypes)
        units.setdefault((r.group, r.member, unit), []).append((r.oc, r.ic, r.rank, r.owns_basis))
    return sum(min(_bits(m, w) for w in widths) for m in units.values()) / sum(r.oc * r.ic for r in refs)


def _activations(inputs, gate, up, act_fn, width: int, device) -> Callable[[int], torch.Tensor]:
    """Member ``e``'s gate/up activations on ``inputs(e)`` (``gate[e]``, ``up[e]``: the quantized modules, or the
    FP matrices as functions), ``[tokens, width]``, the last member's kept (:func:`_cached`)."""
    def of(e: int) -> torch.Tensor:
        xe = inputs(e).to(device)
        return torch.cat([act_fn(gate[e](c)) * up[e](c) for c in _chunks(xe)]) if xe.shape[0] else xe.new_zeros(0, width)

    return _cached(of)


def _cached(inputs: Callable[[int], torch.Tensor]) -> Callable[[int], torch.Tensor]:
    """``inputs`` keeping its last member's result: quantize_group asks for each member's inputs twice in a row."""
    cache: dict[int, torch.Tensor] = {}

    def get(e: int) -> torch.Tensor:
        if e not in cache:
            cache.clear()
            cache[e] = inputs(e)
        return cache[e]

    return get


def ranks_for(opts: LayerOptions, hidden: int, inter: int, shared_inter: int | None) -> dict[str, dict[str, int]]:
    """Rank per group and weight type from the rank ratio (0 everywhere without IDRE)."""
    widths = {"experts": inter, "shared_experts": shared_inter}
    return {group: {w: default_rank(*matrix_shape(w, hidden, width), opts.rank_ratio) if opts.idre else 0
                    for w in WEIGHT_TYPES}
            for group, width in widths.items() if width}
