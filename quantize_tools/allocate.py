"""Bit allocation under a budget: one option (a width) per unit (a matrix or fused pair), least total error.

This is the multiple-choice knapsack. It is solved greedily on each unit's lower convex hull of
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
from dataclasses import dataclass

__all__ = ["Unit", "allocate", "AllocationError"]


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
