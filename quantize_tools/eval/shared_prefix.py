"""Log-likelihood scoring that runs each context once for all of its continuations.

lm-eval's ``HFLM`` scores every (context, continuation) pair as its own padded sequence and
takes a log-softmax over the whole vocabulary at every position. A multiple-choice document
repeats its context once per choice (four times for HellaSwag and ARC), and only the
continuation positions are ever read. Here each distinct context runs once, its KV cache is
shared by its continuations, and vocabulary logits are computed only where a continuation token
is scored. The tokens are lm-eval's own (its encoding and its left truncation) and so are the
returned (sum of log-probabilities, greedy) pairs; ``tests/eval/test_evaluate.py`` compares them with
``HFLM`` request by request.
"""
from __future__ import annotations

import copy

import torch
from lm_eval.models.huggingface import HFLM
from tqdm.auto import tqdm

__all__ = ["SharedPrefixHFLM", "score_requests", "shares_contexts"]


def _groups(requests, max_length: int):
    """Requests grouped by their (truncated) context, longest context first."""
    by_ctx: dict[tuple, list] = {}
    for i, (_, ctx, cont) in enumerate(requests):
        if not ctx or not cont:
            raise ValueError(f"request {i}: empty context or continuation")
        if len(cont) > max_length:
            raise ValueError(f"request {i}: continuation of {len(cont)} tokens exceeds max_length {max_length}")
        full = (list(ctx) + list(cont))[-(max_length + 1):]  # as lm-eval truncates: from the left
        by_ctx.setdefault(tuple(full[:-len(cont)]), []).append((list(cont), i))
    return sorted(by_ctx.items(), key=lambda g: -len(g[0]))


def _pad(seqs: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (padding repeats a real token id) and their 0/1 mask."""
    n = max(len(s) for s in seqs)
    ids = torch.tensor([s + [s[-1]] * (n - len(s)) for s in seqs], dtype=torch.long, device=device)
    mask = torch.tensor([[1] * len(s) + [0] * (n - len(s)) for s in seqs], dtype=torch.long, device=device)
    return ids, mask


CHUNK_BATCHES = 8  # contexts are taken in chunks of up to this many batches of continuations
CHUNK_CTX_TOKENS = 1024  # ... and up to this many padded context tokens per batch row (bounds the KV cache)


def _rows(cache, idx: torch.Tensor):
    """A view of ``cache`` with only the batch rows ``idx`` (repeats allowed); ``cache`` itself is left as is."""
    sub = copy.copy(cache)
    sub.layers = [copy.copy(layer) for layer in cache.layers]
    sub.batch_select_indices(idx)  # rebinds each copied layer's tensors: the originals stay whole
    return sub


@torch.no_grad()
def score_requests(model, requests, max_length: int, batch_size: int, progress: bool = True,
                   on_result=None, softmax_dtype=None) -> list[tuple[float, bool]]:
    """``(sum log p(continuation | context), continuation is the greedy one)`` per lm-eval request.

    ``requests`` are lm-eval's ``((context, continuation), context_ids, continuation_ids)``.
    Contexts of similar length run together (one forward per chunk, KV cache kept); their
    continuations then run in batches of ``batch_size`` rows sorted by length, each batch on the
    cache rows of its contexts. Padding is what costs on CPU, so both passes keep it small.
    """
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    device = next(model.parameters()).device
    out: list = [None] * len(requests)
    groups = _groups(requests, max_length)
    bar = tqdm(total=len(requests), desc="Scoring continuations (shared contexts)", disable=not progress)
    g = 0
    while g < len(groups):
        chunk, rows = [groups[g]], len(groups[g][1])
        g += 1
        while (g < len(groups) and rows + len(groups[g][1]) <= CHUNK_BATCHES * batch_size
               and (len(chunk) + 1) * len(chunk[0][0]) <= CHUNK_CTX_TOKENS * batch_size):
            chunk.append(groups[g])
            rows += len(groups[g][1])
            g += 1
        ids, mask = _pad([list(c) for c, _ in chunk], device)
        lens = mask.sum(1)
        pos = torch.arange(ids.shape[1], device=device).expand_as(ids)
        first = decoder(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        h_last = first.last_hidden_state[torch.arange(len(chunk), device=device), lens - 1]  # predicts cont[0]
        members = [(gi, cont, i) for gi, (_, conts) in enumerate(chunk) for cont, i in conts]
        rest = sorted((m for m in members if len(m[1]) > 1), key=lambda m: -len(m[1]))
        h_rest = {}
        for b in range(0, len(rest), batch_size):
            part = rest[b:b + batch_size]
            gidx = torch.tensor([gi for gi, _, _ in part], device=device)
            ids2, mask2 = _pad([cont[:-1] for _, cont, _ in part], device)
            pos2 = lens[gidx, None] + torch.arange(ids2.shape[1], device=device)
            second = decoder(input_ids=ids2, attention_mask=torch.cat([mask[gidx], mask2], 1), position_ids=pos2,
                             past_key_values=_rows(first.past_key_values, gidx), use_cache=True)
            for r, (_, cont, i) in enumerate(part):
                h_rest[i] = second.last_hidden_state[r, : len(cont) - 1]
        del first
        for b in range(0, len(members), batch_size):
            part = members[b:b + batch_size]
            hs = torch.cat([torch.cat([h_last[gi, None], h_rest[i]]) if i in h_rest else h_last[gi, None]
                            for gi, _, i in part])
            logp = torch.log_softmax(head(hs), dim=-1, dtype=softmax_dtype)  # as HFLM: the logits' dtype unless set
            targets = torch.tensor([t for _, cont, _ in part for t in cont], device=device)
            tok_lp = logp.gather(1, targets[:, None])[:, 0]
            greedy = logp.argmax(-1) == targets
            start = 0
            for _, cont, i in part:
                end = start + len(cont)
                out[i] = (float(tok_lp[start:end].sum()), bool(greedy[start:end].all()))
                start = end
                if on_result is not None:
                    on_result(i, out[i])
        bar.update(len(members))
    bar.close()
    return out


# config fields that make a model's logits more than its output embedding of the last hidden state
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def shares_contexts(model) -> bool:
    """Whether :func:`score_requests` applies: a decoder whose logits are its output embedding of the last
    hidden state and whose KV cache is plain per-token keys/values (no sliding window, no recurrent
    state, which padding and row views would corrupt). Otherwise lm-eval's own path scores it."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cfg = model.config
    if any(getattr(cfg, a, None) not in (None, 1, 1.0) for a in _LOGIT_TRANSFORMS):
        return False
    try:
        cache = DynamicCache(config=cfg)
    except Exception:  # a model family with its own cache class
        return False
    return all(type(layer) is DynamicLayer for layer in cache.layers)


class SharedPrefixHFLM(HFLM):
    """lm-eval's ``HFLM`` with :func:`score_requests` as its log-likelihood path (everything else unchanged)."""

    @property
    def shares(self) -> bool:
        """Whether this model gets :func:`score_requests`; otherwise HFLM's own path runs."""
        return self.backend == "causal" and self.mixed_precision_dtype is None and shares_contexts(self.model)

    @property
    def scorer(self) -> str:
        """Which code computes the log-likelihoods, for the record."""
        return "shared contexts (quantize_tools.shared_prefix)" if self.shares else "lm-eval HFLM"

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        if not self.shares:
            return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)

        def hook(i, answer):
            if requests[i][0] is not None:
                self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)

        bs = self.batch_size if isinstance(self.batch_size, int) else (override_bs or 16)
        return score_requests(self.model, requests, self.max_length, bs, progress=not disable_tqdm and self.rank == 0,
                              on_result=hook, softmax_dtype=self.softmax_dtype)
