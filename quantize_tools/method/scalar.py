"""Scalar baselines (the paper's §4 comparisons) for the same expert matrices KBVQ quantizes: RTN and GPTQ, per-group asymmetric.

They run inside the same layer-streaming pipeline, on the same calibration tokens, and write a
plain Hugging Face checkpoint whose expert weights are the dequantized values ("fake quant"):
any loader evaluates it, nothing serves it packed. GPTQ sees, per routed expert, the tokens routed
to it (the layer's tokens when fewer than ``bcos_min_tokens``), and the down projection sees the
activations of the already-quantized gate and up, as KBVQ's down does. No activation reordering
(the GPTQ paper's algorithm). Storage counted as each group's fp16 scale and fp16 zero point.
"""
from __future__ import annotations

import math

import torch

from vllm_kbvq.archs import WEIGHT_TYPES, MoEGeometry

from .expert_inputs import routed_tokens
from .gptq import gptq_quantize, rtn_quantize, second_moment

__all__ = ["scalar_bits_per_weight", "quantize_moe_block_scalar"]

_GROUP_META_BITS = 32  # fp16 scale + fp16 zero point per group


def scalar_bits_per_weight(bits: int, group_size: int, ic: int) -> float:
    """Stored bits per weight of one row of ``ic`` inputs (the last group may be shorter)."""
    return bits + math.ceil(ic / group_size) * _GROUP_META_BITS / ic


def quantize_moe_block_scalar(layer, x, topk, weights, geom: MoEGeometry, act_fn,
                              opts, device="cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """RTN or GPTQ (``opts.method``) of one layer's experts; float32 dequantized weights by tensor name."""
    arch, n_experts = geom.arch, geom.n_experts
    x = x.to(device, torch.float32)
    token_ids, counts, fallback = routed_tokens(topk, n_experts, opts.bcos_min_tokens)
    report = {"layer": layer, "routed_tokens": counts,
              "hessian_fallback_experts": [e for e, f in enumerate(fallback) if f] if opts.method == "gptq" else []}
    out: dict[str, torch.Tensor] = {}
    everyone = [fallback[e] or counts[e] == x.shape[0] for e in range(n_experts)]
    groups = [("experts", [(e, x if everyone[e] else x[token_ids[e]]) for e in range(n_experts)])]
    if geom.shared_inter:
        groups.append(("shared_experts", [(0, x)]))
    err = {w: [0.0, 0.0] for w in WEIGHT_TYPES}
    h_all = []  # the second moment of all tokens, shared by every member that sees all of them

    def hessian(inp):
        if opts.method == "rtn":
            return None
        if inp is not x:
            return second_moment(inp.split(8192), inp.shape[1], device)
        if not h_all:
            h_all.append(second_moment(x.split(8192), x.shape[1], device))
        return h_all[0]

    def quantize(wtype, w, inp, h, name):
        w = w.to(device, torch.float32)
        q = rtn_quantize(w, opts.bits, opts.group_size) if h is None else \
            gptq_quantize(w, h, opts.bits, opts.group_size, opts.damp)
        y = inp @ w.T
        err[wtype][0] += float(((inp @ q.T - y) ** 2).sum())
        err[wtype][1] += float((y**2).sum())
        out[name] = q.contiguous()
        return q

    for group, members in groups:
        for e, xe in members:  # one member at a time: its three matrices and its activations
            h = hessian(xe)
            gate = quantize("gate", weights(group, "gate", e), xe, h, arch.tensor(layer, group, e, "gate"))
            up = quantize("up", weights(group, "up", e), xe, h, arch.tensor(layer, group, e, "up"))
            act = act_fn(xe @ gate.T) * (xe @ up.T)  # what the down projection sees
            quantize("down", weights(group, "down", e), act, hessian(act), arch.tensor(layer, group, e, "down"))
    report["rel_err"] = {w: v[0] / max(v[1], 1e-30) for w, v in err.items()}
    return out, report
