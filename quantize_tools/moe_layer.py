"""Quantize one MoE block from its captured calibration inputs.

Order inside a layer: gate and up (inputs: the tokens entering the block), then
down (inputs: the intermediate activations produced by the *quantized* gate/up,
so down is fitted to what it will see at inference), then the shared expert the
same way. Every matrix goes IDRE -> VQ of the residual -> BCOS.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from vllm_kbvq.archs import WEIGHT_TYPES, ArchSpec
from vllm_kbvq.format import GROUPS, KBVQConfig, QuantizedMatrix, default_rank, layer_matrices, matrix_shape
from vllm_kbvq.kernels.torch_moe import dequantize_rows
from vllm_kbvq.packing import pack_codes
from vllm_kbvq.reference import KBVQLinear

from .bcos import OutputStats, fit_affine
from .finetune import finetune_block
from .options import VQ_METHODS, LayerOptions
from .gptq import gptvq_assign, second_moment
from .idre import CovarianceAccumulator, identity_klt, joint_svd, klt
from .vq import vq_quantize

__all__ = ["LayerOptions", "quantize_group", "quantize_moe_block"]

_TOKEN_CHUNK = 8192  # tokens per matmul when streaming statistics


@dataclass
class GroupResult:
    """Stored tensors of one weight type for all ``n`` members of a group (routed experts, or one shared
    expert), stacked over the members; the names are the format's."""

    vq_codes: torch.Tensor  # [n, oc, words] int32
    vq_codebook: torch.Tensor  # [n, K, d] fp16
    lr_a: torch.Tensor | None  # [n, oc, k] fp16
    lr_b: torch.Tensor | None  # [k, ic] fp16, shared by the members
    affine_s: torch.Tensor  # [n, oc] fp16
    affine_b: torch.Tensor  # [n, oc] fp16
    ic: int
    report: dict = field(default_factory=dict)

    def member(self, e: int, owns_basis: bool = True) -> QuantizedMatrix:
        """Member ``e``'s tensors; ``lr_b`` with them only where ``owns_basis`` (it is stored once)."""
        return QuantizedMatrix(
            vq_codes=self.vq_codes[e], vq_codebook=self.vq_codebook[e], affine_s=self.affine_s[e],
            affine_b=self.affine_b[e], lr_a=None if self.lr_a is None else self.lr_a[e],
            lr_b=self.lr_b if owns_basis else None)

    def linear(self, e: int, cfg: KBVQConfig) -> KBVQLinear:
        """Member ``e`` as a runtime module (the same code the reference runtime uses)."""
        oc = self.vq_codes.shape[1]
        rank = 0 if self.lr_a is None else self.lr_a.shape[-1]
        lin = KBVQLinear(self.ic, oc, cfg, rank, owns_basis=True)
        lin.load(self.member(e))
        return lin


def _chunks(x: torch.Tensor):
    for i in range(0, x.shape[0], _TOKEN_CHUNK):
        yield x[i : i + _TOKEN_CHUNK]


def quantize_group(
    w: torch.Tensor,
    cov: torch.Tensor,
    inputs: Callable[[int], torch.Tensor],
    opts: LayerOptions,
    cfg: KBVQConfig,
    rank: int,
    seed: int,
    progress: Callable[[str], None] | None = None,
) -> GroupResult:
    """IDRE + VQ + BCOS for the matrices ``w`` ``[n, oc, ic]`` that share one input space.

    ``cov`` is the input covariance used for the KLT; ``inputs(e)`` returns the
    calibration inputs member ``e`` sees (its routed tokens, or the fallback).
    """
    if opts.vq_method not in VQ_METHODS:
        raise ValueError(f"unknown vq_method {opts.vq_method!r}: one of {', '.join(VQ_METHODS)}")
    say = progress or (lambda msg: None)
    n, oc, ic = w.shape
    device = w.device
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
    codes, codebook = vq_quantize(residual, opts.bits, opts.vector_dim, opts.kmeans_iters, seed, progress=say)
    if opts.vq_method == "gptvq":
        for e in range(n):  # each member's own inputs: routed experts see different tokens
            say(f"GPTVQ assignment {e + 1}/{n}")
            h = second_moment(_chunks(inputs(e)), ic, device)
            codes[e] = gptvq_assign(residual[e], h, codebook[e], opts.damp)
    w_hat = dequantize_rows(codes, codebook[:, None])
    if row_scale is not None:
        w_hat = w_hat * row_scale[..., None]
    if low_rank is not None:
        w_hat = w_hat + low_rank
    w_plain = None
    if opts.compare_plain_vq and rank > 0:
        pc, pb = vq_quantize(w.float(), opts.bits, opts.vector_dim, opts.kmeans_iters, seed + 7919,
                             progress=lambda msg: say(f"plain-VQ comparison, {msg}"))
        w_plain = dequantize_rows(pc, pb[:, None])

    affine_s = torch.zeros(n, oc, dtype=torch.float16, device=device)
    affine_b = torch.zeros(n, oc, dtype=torch.float16, device=device)
    err = {"plain_vq": 0.0, "idre_vq": 0.0, "idre_vq_bcos": 0.0}
    energy = 0.0
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
        err["idre_vq"] += st.sq_error()
        err["idre_vq_bcos"] += st.sq_error(se, be)
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
        vq_codes=pack_codes(codes.cpu(), cfg.index_bits), vq_codebook=codebook.cpu(),
        lr_a=None if a is None else a.cpu(), lr_b=None if b is None else b.cpu(),
        affine_s=affine_s.cpu(), affine_b=affine_b.cpu(), ic=ic, report=rep,
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

    for group, n, group_inputs in groups:
        grep = {}
        gu = {}
        for wtype in ("gate", "up"):
            w = weights(group, wtype).to(device)
            rank = cfg.rank[group][wtype]
            gu[wtype] = quantize_group(w, cov_x, group_inputs, opts, cfg, rank, group_seed(opts.seed, layer, group, wtype),
                                       stage(group, wtype, n))
            grep[wtype] = gu[wtype].report
        gate = [gu["gate"].linear(e, cfg).to(device) for e in range(n)]
        up = [gu["up"].linear(e, cfg).to(device) for e in range(n)]
        for lin in gate + up:  # run twice per expert below: dequantize once (bit-identical outputs)
            lin.cache_vq_weight()

        def hidden_of(e, gate=gate, up=up, group_inputs=group_inputs):
            xe = group_inputs(e).to(device)
            return torch.cat([act_fn(gate[e](c)) * up[e](c) for c in _chunks(xe)]) if xe.shape[0] else xe.new_zeros(0, gate[e].out_features)

        w_down = weights(group, "down").to(device)
        cov_h = CovarianceAccumulator(w_down.shape[2], device)
        for e in range(n):
            if group == "experts" and counts[e] == 0:
                continue  # the down KLT pools routed activations only
            idx = token_ids[e] if group == "experts" else None
            xe = x[idx] if idx is not None else x
            for c in _chunks(xe):
                c = c.to(device)
                cov_h.add(act_fn(gate[e](c)) * up[e](c))
        rank = cfg.rank[group]["down"]
        hidden_cache: dict[int, torch.Tensor] = {}

        def down_inputs(e, hidden_of=hidden_of):
            if e not in hidden_cache:
                hidden_cache.clear()
                hidden_cache[e] = hidden_of(e)
            return hidden_cache[e]

        dres = quantize_group(w_down, cov_h.covariance(), down_inputs, opts, cfg, rank,
                              group_seed(opts.seed, layer, group, "down"), stage(group, "down", n))
        grep["down"] = dres.report
        report[group] = grep
        for wtype, res in (("gate", gu["gate"]), ("up", gu["up"]), ("down", dres)):
            results[group, wtype] = res
    if opts.finetune_steps:
        if block is None:
            raise ValueError("fine-tuning (finetune_steps > 0) needs the MoE block")
        report["finetune"] = finetune_block(block, arch, x, results, weights, n_experts, act_fn, opts, cfg,
                                            group_seed(opts.seed, layer, "experts", "gate") ^ 0x5EED, device,
                                            say)
    hidden = x.shape[1]
    inter = results["experts", "gate"].vq_codes.shape[1]
    for ref in layer_matrices(arch, cfg, layer, n_experts, hidden, inter):
        out.update(results[ref.group, ref.wtype].member(ref.member, ref.owns_basis).tensors(ref, cfg))
    return out, report


def ranks_for(opts: LayerOptions, hidden: int, inter: int, shared_inter: int | None) -> dict[str, dict[str, int]]:
    """Rank per group and weight type from the rank ratio (0 everywhere without IDRE)."""
    widths = {"experts": inter, "shared_experts": shared_inter}
    return {group: {w: default_rank(*matrix_shape(w, hidden, width), opts.rank_ratio) if opts.idre else 0
                    for w in WEIGHT_TYPES}
            for group, width in widths.items() if width}
