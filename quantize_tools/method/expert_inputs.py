"""What each expert matrix is fitted on (IDRE's covariance, §1, and BCOS's statistics, §2.2, come from these): the calibration tokens the
router sends to each routed expert, and for the down projections the activations that the already
quantized gate and up give those tokens, so that down is fitted to what it will see at inference.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from .idre import CovarianceAccumulator

__all__ = ["TOKEN_CHUNK", "chunks", "routed_tokens", "down_covariance", "activations"]

TOKEN_CHUNK = 8192  # tokens per matmul when streaming statistics


def chunks(x: torch.Tensor):
    for i in range(0, x.shape[0], TOKEN_CHUNK):
        yield x[i : i + TOKEN_CHUNK]


def routed_tokens(topk: torch.Tensor, n_experts: int, min_tokens: int):
    """Per expert: the indices of the tokens routed to it, their count, and whether the count is below
    ``min_tokens`` (such experts are fitted on all of the layer's tokens instead)."""
    token_ids = [torch.where((topk == e).any(-1))[0] for e in range(n_experts)]
    counts = [int(t.numel()) for t in token_ids]
    return token_ids, counts, [c < min_tokens for c in counts]


def down_covariance(group, n, x, token_ids, counts, gate, up, act_fn, inter: int, device) -> torch.Tensor:
    """The down projections' input covariance, over what the quantized gate and up give the routed tokens."""
    cov_h = CovarianceAccumulator(inter, device)
    for e in range(n):
        if group == "experts" and counts[e] == 0:
            continue  # the down KLT pools routed activations only
        xe = x[token_ids[e]] if group == "experts" else x
        for c in chunks(xe):
            c = c.to(device)
            cov_h.add(act_fn(gate[e](c)) * up[e](c))
    return cov_h.covariance()


def activations(inputs, gate, up, act_fn, width: int, device) -> Callable[[int], torch.Tensor]:
    """Member ``e``'s gate/up activations on ``inputs(e)`` (``gate[e]``, ``up[e]``: the quantized modules, or the
    FP matrices as functions), ``[tokens, width]``, the last member's kept (:func:`_cached`)."""
    def of(e: int) -> torch.Tensor:
        xe = inputs(e).to(device)
        return torch.cat([act_fn(gate[e](c)) * up[e](c) for c in chunks(xe)]) if xe.shape[0] else xe.new_zeros(0, width)

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
