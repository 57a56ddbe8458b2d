"""Perplexity of a causal LM on text, over non-overlapping windows (the usual WikiText-style protocol)."""
from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from ..calibration.tokens import token_windows

__all__ = ["text_windows", "perplexity", "window_nll"]


def text_windows(tokenizer, texts: list[str], seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """The first ``max_windows`` non-overlapping windows of the texts."""
    windows = token_windows(tokenizer, texts, seqlen)[:max_windows]
    if windows.shape[0] == 0:
        raise ValueError(f"text is shorter than one window of {seqlen} tokens")
    return windows


@torch.no_grad()
def window_nll(model, windows: torch.Tensor, batch_size: int = 1, progress: bool = True) -> tuple[float, int]:
    """Sum of next-token negative log-likelihoods over all windows, and how many tokens were predicted."""
    nll, count = 0.0, 0
    device = next(model.parameters()).device
    for i in tqdm(range(0, windows.shape[0], batch_size), desc="perplexity", disable=not progress):
        ids = windows[i : i + batch_size].to(device)
        logits = model(ids).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        nll -= logp.gather(-1, ids[:, 1:, None]).double().sum().item()
        count += ids[:, 1:].numel()
    return nll, count


def perplexity(model, windows: torch.Tensor, batch_size: int = 1, progress: bool = True) -> float:
    """exp(mean next-token negative log-likelihood) over all predicted tokens of all windows."""
    nll, count = window_nll(model, windows, batch_size, progress)
    return math.exp(nll / count)
