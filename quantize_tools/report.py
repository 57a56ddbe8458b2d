"""``kbvq_report.json``: what the quantizer did and what it cost, per layer and overall."""
from __future__ import annotations

import math
import statistics

from vllm_kbvq.archs import WEIGHT_TYPES, MoEGeometry
from vllm_kbvq.format import DTYPE_BITS, GROUPS, KBVQConfig, checkpoint_tensors, is_kbvq_tensor, matrix_shape

__all__ = ["summarize", "summarize_scalar", "format_summary"]

def summarize(cfg: KBVQConfig, layer_reports: dict, ckpt_dir, geom: MoEGeometry) -> dict:
    tensors = checkpoint_tensors(ckpt_dir)
    n, hidden, inter = geom.n_experts, geom.hidden, geom.inter
    si = cfg.shared_intermediate_size or 0
    # weights the quantized tensors stand for
    expert_weights = len(cfg.layers) * 3 * (n * hidden * inter + hidden * si)
    kbvq_bits = other_bits = other_params = 0
    for name, (_, shape, dtype) in tensors.items():
        bits = math.prod(shape) * DTYPE_BITS[dtype]
        if is_kbvq_tensor(name):
            kbvq_bits += bits
        else:
            other_bits += bits
            other_params += math.prod(shape)
    layers = [layer_reports[k] for k in sorted(layer_reports, key=int)]
    summary = {
        "expert_weights": expert_weights,
        "expert_bits_per_weight": kbvq_bits / expert_weights,
        "checkpoint_bits_per_weight": (kbvq_bits + other_bits) / (expert_weights + other_params),
        "checkpoint_bytes": (kbvq_bits + other_bits) // 8,
        "unquantized_bf16_bytes": 2 * (expert_weights + other_params),
        "bcos_fallback_experts": sum(len(r["bcos_fallback_experts"]) for r in layers),
    }
    routed = _routed_counts(layers)
    if routed:
        summary["routed_tokens_per_expert"] = routed
    errs = {}
    for group in GROUPS:
        for wtype in WEIGHT_TYPES:
            rows = [r[group][wtype]["rel_err"] for r in layers if group in r]
            if not rows:
                continue
            mean = {k: (None if any(row[k] is None for row in rows) else sum(row[k] for row in rows) / len(rows))
                    for k in rows[0]}
            mean["layers_kbvq_below_plain_vq"] = (
                None if mean["plain_vq"] is None else sum(row["idre_vq_bcos"] < row["plain_vq"] for row in rows))
            mean["layers"] = len(rows)
            errs[f"{group}.{wtype}"] = mean
    summary["mean_output_rel_err"] = errs
    alloc = [r for r in layers if "allocation" in r]
    if alloc:
        summary["allocation"] = _allocation_summary(alloc)
    tuned = [r["finetune"] for r in layers if "finetune" in r]
    if tuned:
        summary["finetune"] = _finetune_summary(tuned, sum(r.get("seconds", 0.0) for r in layers))
    return {"quantization_config": cfg.to_dict(), "summary": summary, "layers": layers}


def _finetune_summary(tuned: list[dict], layer_seconds: float) -> dict:
    """Mean MoE-block output errors before and after tuning, layers kept, and the share of the time it took."""
    out = {"layers": len(tuned), "layers_kept": sum(r["kept"] for r in tuned),
           "seconds": round(sum(r["seconds"] for r in tuned), 1)}
    out["share_of_layer_seconds"] = out["seconds"] / layer_seconds if layer_seconds else None
    for when in ("before", "after"):
        for split in ("fit", "held_out"):
            vals = [r[f"rel_err_{when}"][split] for r in tuned if split in r[f"rel_err_{when}"]]
            if vals:
                out[f"mean_block_rel_err_{when}_{split}"] = sum(vals) / len(vals)
    return out


def _allocation_summary(layers: list[dict]) -> dict:
    """What --bits-budget chose over all layers: matrices per width, per group and unit; each layer's bits;
    the routed calibration tokens of the experts each width went to (does the budget follow the traffic?);
    and per layer, its routed experts at each width (which layers spend their budget on which weights)."""
    alloc = [r["allocation"] for r in layers]
    widths: dict = {}
    for a in alloc:
        for group, per in a["widths"].items():
            for unit, counts in per.items():
                into = widths.setdefault(group, {}).setdefault(unit, {})
                for w, c in counts.items():
                    into[w] = into.get(w, 0) + c
    bpw = [a["bits_per_weight"] for a in alloc]
    return {"bits_budget": alloc[0]["budget_bits_per_weight"], "layer_bits_per_weight_min": min(bpw),
            "layer_bits_per_weight_max": max(bpw), "widths": widths,
            "error_over_cheapest": sum(a["error"] for a in alloc) / max(sum(a["error_cheapest"] for a in alloc), 1e-30),
            "routed_tokens_by_width": _tokens_by_width(layers),
            "routed_widths_by_layer": {"layers": [r["layer"] for r in layers], "widths": {
                unit: {w: [a["widths"]["experts"][unit][w] for a in alloc] for w in per}
                for unit, per in alloc[0]["widths"]["experts"].items()}}}


def allocation_widths_text(a: dict) -> str:
    """An allocation summary's matrices per width, per group and unit, in words (the report's and the results page's)."""
    return "; ".join(f"{group.replace('_', ' ')} {unit.replace('_', '/')}: " + ", ".join(
        f"{c} at {w}" for w, c in counts.items() if c) for group, per in a["widths"].items() for unit, counts in per.items())


def allocation_tokens_text(a: dict, number: str) -> str:
    """Its routed experts' mean calibration tokens per width, in words, each mean in format ``number``."""
    return "routed experts' mean calibration tokens by width: " + "; ".join(
        f"{unit.replace('_', '/')} " + ", ".join(f"{w} {t:{number}}" for w, t in per.items())
        for unit, per in a["routed_tokens_by_width"].items())


def allocation_layers_text(a: dict, dash: str = "-") -> str:
    """Its routed experts per layer at each width, in words: the fewest and the most over layers, and where."""
    ids, by = a["routed_widths_by_layer"]["layers"], a["routed_widths_by_layer"]["widths"]

    def at(counts: list[int], v: int) -> str:
        where = [layer for layer, c in zip(ids, counts) if c == v]
        return f"{v} (layer {where[0]})" if len(where) == 1 else f"{v} ({len(where)} layers)"

    return "routed experts per layer at each width, fewest" + dash + "most: " + "; ".join(
        f"{unit.replace('_', '/')} " + ", ".join(
            f"{w} {min(c)} in every layer" if min(c) == max(c) else f"{w} {at(c, min(c))}{dash}{at(c, max(c))}"
            for w, c in per.items() if max(c))
        for unit, per in by.items())


def _tokens_by_width(layers: list[dict]) -> dict:
    """Per unit and width, the mean routed calibration tokens of the routed experts given that width."""
    sums: dict = {}
    for r in layers:
        labels = list(r["allocation"]["widths"]["experts"]["gate_up"])  # in --candidate-widths order, as width_of
        for unit, wtype in (("gate_up", "gate"), ("down", "down")):
            for e, k in enumerate(r["width_of"]["experts"][wtype]):
                tokens, n = sums.setdefault(unit, {}).get(labels[k], (0, 0))
                sums[unit][labels[k]] = (tokens + r["routed_tokens"][e], n + 1)
    return {unit: {w: round(t / n, 1) for w, (t, n) in per.items()} for unit, per in sums.items()}


def _routed_counts(layers: list[dict]) -> dict:
    counts = [c for r in layers for c in r["routed_tokens"]]
    return {"min": min(counts), "median": statistics.median(counts), "max": max(counts)} if counts else {}


def summarize_scalar(opts, cfg: KBVQConfig, layer_reports: dict, ckpt_dir, geom: MoEGeometry) -> dict:
    """Report of an RTN / GPTQ baseline: bits counted as packed ints plus each group's fp16 scale and zero."""
    from .method.scalar import scalar_bits_per_weight

    n, hidden, inter = geom.n_experts, geom.hidden, geom.inter
    si = cfg.shared_intermediate_size or 0
    bits = weights = 0
    for members, width in ((n, inter), (1 if si else 0, si)):
        for oc, ic in (matrix_shape(wtype, hidden, width) for wtype in WEIGHT_TYPES):
            w = members * oc * ic * len(cfg.layers)
            if w:
                bits += w * scalar_bits_per_weight(opts.bits, opts.group_size, ic)
                weights += w
    layers = [layer_reports[k] for k in sorted(layer_reports, key=int)]
    summary = {
        "method": opts.method, "bits": opts.bits, "group_size": opts.group_size,
        "expert_weights": weights, "expert_bits_per_weight": bits / weights,
        "hessian_fallback_experts": sum(len(r["hessian_fallback_experts"]) for r in layers),
        "mean_output_rel_err": {w: sum(r["rel_err"][w] for r in layers) / len(layers) for w in WEIGHT_TYPES},
        "routed_tokens_per_expert": _routed_counts(layers),
    }
    return {"summary": summary, "layers": layers}


def format_summary(report: dict) -> str:
    s = report["summary"]
    if s.get("method", "kbvq") != "kbvq":
        lines = [f"{s['method'].upper()} {s['bits']}-bit, group {s['group_size']}: "
                 f"{s['expert_bits_per_weight']:.3f} bits/weight on the experts (fake-quant checkpoint: "
                 "dequantized weights, a plain Hugging Face model)",
                 "mean output relative error on calibration tokens: " +
                 ", ".join(f"{w} {v:.4f}" for w, v in s["mean_output_rel_err"].items())]
        if "run" in report:
            lines.append(f"time {report['run']['seconds']:.0f} s")
        return "\n".join(lines)
    lines = [
        f"expert weights: {s['expert_bits_per_weight']:.3f} bits/weight; whole checkpoint: "
        f"{s['checkpoint_bits_per_weight']:.3f} bits/weight ({s['checkpoint_bytes'] / 2**20:.1f} MiB vs "
        f"{s['unquantized_bf16_bytes'] / 2**20:.1f} MiB in bf16)",
        "mean output relative error on calibration tokens (plain VQ -> IDRE+VQ -> IDRE+VQ+BCOS):",
    ]
    for key, e in s["mean_output_rel_err"].items():
        if e["plain_vq"] is None:
            lines.append(f"  {key:22s} (plain VQ not run) -> {e['idre_vq']:.4f} -> {e['idre_vq_bcos']:.4f}")
        else:
            lines.append(
                f"  {key:22s} {e['plain_vq']:.4f} -> {e['idre_vq']:.4f} -> {e['idre_vq_bcos']:.4f}"
                f"   (KBVQ below plain VQ in {e['layers_kbvq_below_plain_vq']}/{e['layers']} layers)"
            )
    if "routed_tokens_per_expert" in s:
        r = s["routed_tokens_per_expert"]
        lines.append(f"routed calibration tokens per expert: min {r['min']}, median {r['median']}, max {r['max']}; "
                     f"BCOS fell back to all tokens for {s['bcos_fallback_experts']} expert(s)")
    if "allocation" in s:
        a = s["allocation"]
        lines.append(f"bits budget {a['bits_budget']:g}: layers at {a['layer_bits_per_weight_min']:.3f}-"
                     f"{a['layer_bits_per_weight_max']:.3f} bits/weight; {allocation_widths_text(a)}; output error "
                     f"{a['error_over_cheapest']:.2f}x that of the cheapest width everywhere")
        if a.get("routed_tokens_by_width"):
            lines.append(allocation_tokens_text(a, "g"))
        if a.get("routed_widths_by_layer"):
            lines.append(allocation_layers_text(a))
    if "finetune" in s:
        f = s["finetune"]
        held = f.get("mean_block_rel_err_before_held_out")
        lines.append(
            f"fine-tuning: mean MoE-block output error {f['mean_block_rel_err_before_fit']:.4f} -> "
            f"{f['mean_block_rel_err_after_fit']:.4f} on the fitted tokens"
            + (f", {held:.4f} -> {f['mean_block_rel_err_after_held_out']:.4f} held out" if held is not None else "")
            + f"; tuned values kept in {f['layers_kept']}/{f['layers']} layers; {f['seconds']:.0f} s")
    if "run" in report:
        run = report["run"]
        lines.append(f"time {run['seconds']:.0f} s, peak memory {run['peak_memory_bytes'] / 2**30:.2f} GiB on {run['device']}")
    return "\n".join(lines)
