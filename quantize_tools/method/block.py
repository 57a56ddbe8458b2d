"""One MoE block, from its captured calibration inputs: the per-layer step of the paper's pipeline.

Order inside a layer: gate and up (inputs: the tokens entering the block), then down (inputs: the
intermediate activations produced by the *quantized* gate/up, so down is fitted to what it will see at
inference), then the shared expert the same way. Every group of matrices goes IDRE -> VQ of the residual ->
BCOS (:mod:`.group`); under a bit budget the widths are chosen first (:mod:`.mixed`), and fine-tuning
(:mod:`.finetune`) comes last, once the codes are fixed.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from vllm_kbvq.archs import WEIGHT_TYPES, MoEGeometry
from vllm_kbvq.format import KBVQConfig, Width, layer_matrices

from ..options import LayerOptions
from .expert_inputs import activations, chunks, down_covariance, routed_tokens
from .finetune import finetune_block
from .group import GroupResult, InputSpace, group_seed, quantize_group
from .idre import CovarianceAccumulator
from .mixed import allocate_layer

__all__ = ["quantize_moe_block"]


def quantize_moe_block(
    layer: int,
    x: torch.Tensor,
    topk: torch.Tensor,
    weights: Callable[[str, str], torch.Tensor],
    geom: MoEGeometry,
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
    for c in chunks(x):
        cov_x.add(c)
    cov_x = InputSpace(cov_x.covariance())  # its KLT is computed once, for every gate and up

    n_experts = geom.n_experts
    token_ids, counts, fallback = routed_tokens(topk, n_experts, opts.bcos_min_tokens)
    report["routed_tokens"] = counts
    report["bcos_fallback_experts"] = [e for e, f in enumerate(fallback) if f]

    groups = [("experts", n_experts, lambda e: x if fallback[e] else x[token_ids[e]])]
    if geom.shared_inter:
        groups.append(("shared_experts", 1, lambda e: x))
    steps = len(groups) * len(WEIGHT_TYPES)

    def stage(group, wtype, n):
        step = [g for g, _, _ in groups].index(group) * len(WEIGHT_TYPES) + WEIGHT_TYPES.index(wtype) + 1
        what = f"{n} routed {wtype}" if group == "experts" else f"shared {wtype}"
        return lambda msg: say(f"{what} ({step}/{steps}): {msg}")

    plans = {}
    if opts.bits_budget is not None:  # every candidate width measured, then one chosen per unit
        plans, report["allocation"] = allocate_layer(layer, groups, x, token_ids, counts, weights, cov_x, act_fn,
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

        cov_h = down_covariance(group, n, x, token_ids, counts, gate, up, act_fn, w_down.shape[2], device)
        down_inputs = activations(group_inputs, gate, up, act_fn, w_down.shape[2], device)
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
        report["finetune"] = finetune_block(block, geom, x, results, weights, act_fn, opts,
                                            group_seed(opts.seed, layer, "experts", "gate") ^ 0x5EED, device,
                                            say)
    if opts.bits_budget is not None:
        report["width_of"] = {g: {w: [opts.candidate_widths.index((v.bits, v.vector_dim)) for v in ws]
                                  for w, ws in per.items()} for g, per in widths_of.items()}
    cfg = _with_widths(cfg, layer, report.get("width_of"))
    for ref in layer_matrices(geom, cfg, layer):
        out.update(results[ref.group, ref.wtype].member(ref.member, ref.owns_basis).tensors(ref))
    return out, report


def _with_widths(cfg: KBVQConfig, layer: int, width_of: dict | None) -> KBVQConfig:
    """``cfg`` with this layer's widths filled in (the pipeline collects every layer's into the checkpoint's)."""
    if width_of is None:
        return cfg
    return replace(cfg, width_of={**(cfg.width_of or {}), str(layer): width_of})
