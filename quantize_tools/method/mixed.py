"""Mixed precision under a bit budget (``--bits-budget``; the paper's widths are uniform): every expert's
fused gate/up and its down get one of the candidate widths so that a layer's stored bits stay within the
budget, least calibration output error first.

:func:`allocate_layer` measures each unit's error at every width; :func:`allocate` then picks one option
(a width) per unit (a matrix or fused pair). This is the multiple-choice knapsack. It is solved greedily on each unit's lower convex hull of
(bits, error): start every unit at its cheapest option and repeatedly take the upgrade that buys the
most error per bit. Until the first upgrade that does not fit, every solution the greedy passes
through is optimal for the bits it spends (it is the Lagrangian solution at that price, and it is
integral); after it, the upgrades that still fit are taken best first, so the budget is used. An
exact knapsack would need a dynamic program over the budget in bits (millions of states per layer)
for a gain below one upgrade step: at 60-128 experts a step is under 1 % of a layer's error.
Deterministic: ties go to the lower unit index.
"""
from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from vllm_kbvq.archs import WEIGHT_TYPES
from vllm_kbvq.format import Width, spec_bits, tensor_specs

from ..options import QuantizeError
from .expert_inputs import activations, chunks, down_covariance
from .group import GroupResult, group_seed, quantize_group

__all__ = ["Unit", "allocate", "AllocationError", "allocate_layer", "least_bits_per_weight"]


class AllocationError(ValueError):
    """A budget below what the cheapest option of every unit costs."""


@dataclass(frozen=True)
class Unit:
    """One thing to give a width: its cost in bits and its error, per option."""

    costs: tuple[float, ...]
    errors: tuple[float, ...]

    def hull(self) -> list[int]:
        """Options on the lower convex hull of (cost, error), cheapest first, each cheaper one worse."""
        order = sorted(range(len(self.costs)), key=lambda i: (self.costs[i], self.errors[i], i))
        start = order[0]
        pts = [start]
        for i in order[1:]:
            if self.errors[i] >= self.errors[pts[-1]] or self.costs[i] == self.costs[pts[-1]]:
                continue  # costs more and is no better
            while len(pts) >= 2 and self._slope(pts[-2], pts[-1]) < self._slope(pts[-1], i):
                pts.pop()  # pts[-1] lies above the segment from pts[-2] to i (on it, it is kept: a finer step)
            pts.append(i)
        return pts

    def _slope(self, a: int, b: int) -> float:
        """Error bought per bit from option a to b (positive: b is better)."""
        return (self.errors[a] - self.errors[b]) / (self.costs[b] - self.costs[a])


def allocate(units: list[Unit], budget: float) -> list[int]:
    """The option chosen for each unit, total cost within ``budget``."""
    hulls = [u.hull() for u in units]
    pos = [0] * len(units)
    spent = sum(u.costs[h[0]] for u, h in zip(units, hulls))
    if spent > budget:
        raise AllocationError(f"the cheapest width everywhere costs {spent:.0f} bits, over the budget of {budget:.0f}")
    heap = []

    def push(k: int) -> None:
        if pos[k] + 1 < len(hulls[k]):
            a, b = hulls[k][pos[k]], hulls[k][pos[k] + 1]
            heapq.heappush(heap, (-units[k]._slope(a, b), k))

    for k in range(len(units)):
        push(k)
    while heap:
        _, k = heapq.heappop(heap)
        a, b = hulls[k][pos[k]], hulls[k][pos[k] + 1]
        step = units[k].costs[b] - units[k].costs[a]
        if spent + step > budget:
            continue  # this unit stays; cheaper upgrades of others may still fit
        spent += step
        pos[k] += 1
        push(k)
    return [h[p] for h, p in zip(hulls, pos)]


def allocate_layer(layer, groups, x, token_ids, counts, weights, cov_x, act_fn, opts, cfg, stage, device):
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
        cov_fp = down_covariance(group, n, x, token_ids, counts, fp_gate, fp_up, act_fn, w["down"].shape[2], device)
        for k, width in enumerate(cands):
            for wtype in ("gate", "up"):
                gu[wtype][width] = quantize_group(
                    w[wtype], cov_x, group_inputs, opts, cfg.rank[group][wtype],
                    group_seed(opts.seed, layer, group, wtype), stage(group, wtype, n), widths=[width] * n)
            for e in range(n):
                g, u = gu["gate"][width].linear(e).to(device), gu["up"][width].linear(e).to(device)
                for c in chunks(group_inputs(e).to(device, torch.float32)):
                    d = (act_fn(g(c)) * u(c) - act_fn(fp_gate[e](c)) * fp_up[e](c)) @ w["down"][e].T
                    err["gate_up"][e][k] += float(d.double().pow(2).sum())
            down = quantize_group(w["down"], cov_fp, activations(group_inputs, fp_gate, fp_up, act_fn,
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
