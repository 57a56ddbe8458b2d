"""Sparse routing for the SmolLM2 testbed: each token visits k of E experts, as in a real MoE.

The exact testbed (:mod:`.build`) sends every token to every expert, which keeps it equal to
dense SmolLM2 but hides what BCOS and the routed-token statistics depend on. Here, layer by
layer on calibration text (the sparse model's own hidden states, so later layers see what
the earlier sparse layers produce):

* experts: the routed neurons are grouped into E equal experts by balanced k-means on their
  co-activation pattern (|activation| x |down column| over the calibration tokens), so neurons
  that fire together share an expert and a few experts carry most of a token's FFN output;
* router: a ridge regression from the FFN input to each expert's output norm, scaled so that
  the renormalised top-k weights are nearly equal; with ``down_proj`` multiplied by k the
  routed output is then the sum of the selected experts. Stored rounded to bfloat16 so fp32
  and bf16 runs start from the same router;
* the shared expert (Qwen2-MoE) takes the neurons with the largest mean contribution, the
  ones every token uses, as a real shared expert does.

With k = E nothing is routed away and the exact testbed is returned unchanged.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from ..calibration.layerwise import run_layer, stop_before

# Router logits this small give top-k weights within ~1 % of equal; only their ranking matters.
ROUTER_LOGIT_STD = 0.02
RIDGE = 1e-3  # of the mean eigenvalue of X^T X
ROUTER_SAMPLES, ROUTER_SEQLEN, ROUTER_SEED = 16, 512, 1234


@dataclasses.dataclass
class LayerFit:
    rel_err: float  # ||top-k FFN output - dense FFN output|| / ||dense FFN output||, calibration tokens
    tokens_per_expert: list[int]


def balanced_kmeans(feat: torch.Tensor, groups: int, iters: int = 20, seed: int = 0) -> list[torch.Tensor]:
    """Rows of ``feat`` (unit vectors) in ``groups`` equal clusters, by cosine similarity.

    Each round assigns rows in order of how strongly they prefer their best cluster over the
    second best, each to its most similar cluster that still has room: balanced without an
    optimal-transport solver, and deterministic.
    """
    n = feat.shape[0]
    if n % groups:
        raise ValueError(f"{n} rows do not split into {groups} equal groups")
    cap = n // groups
    # k-means++ seeding on cosine distance: rows far from every chosen seed are likelier seeds
    g = torch.Generator().manual_seed(seed)
    seeds = [int(torch.randint(n, (1,), generator=g))]
    for _ in range(groups - 1):
        dist = (1 - (feat @ feat[seeds].T).max(dim=1).values).clamp_min(0) ** 2
        seeds.append(int(torch.multinomial(dist + 1e-12, 1, generator=g)))
    centroids = feat[seeds].clone()
    assign = torch.full((n,), -1, dtype=torch.long)
    for _ in range(iters):
        sim = feat @ centroids.T  # [n, groups]
        top2 = torch.topk(sim, 2, dim=1).values
        order = torch.argsort(top2[:, 0] - top2[:, 1], descending=True, stable=True).tolist()
        prefs = torch.argsort(sim, dim=1, descending=True, stable=True).tolist()
        fill = [0] * groups
        new = torch.empty(n, dtype=torch.long)
        for r in order:
            c = next(c for c in prefs[r] if fill[c] < cap)
            new[r] = c
            fill[c] += 1
        if torch.equal(new, assign):
            break
        assign = new
        centroids = F.normalize(torch.stack([feat[assign == c].mean(0) for c in range(groups)]), dim=1)
    # deterministic expert order: by the smallest neuron index in each cluster
    clusters = [torch.nonzero(assign == c).flatten() for c in range(groups)]
    return sorted(clusters, key=lambda ix: int(ix[0]))


def _expert_outputs(act, down, groups) -> torch.Tensor:
    """``[N, E, H]``: each neuron group's contribution to the FFN output."""
    return torch.stack([act[:, ix] @ down[:, ix].T for ix in groups], dim=1)


def fit_layer(x: torch.Tensor, gate, up, down, experts: int, k: int, shared: int = 0, seed: int = 0):
    """Split one dense FFN: (routed neuron groups, shared neurons, router [E, H], fit report).

    The shared expert takes the ``shared`` neurons with the largest mean contribution (the ones
    every token uses); the rest are clustered into ``experts`` groups. The router is a ridge
    regression onto each group's output norm; it only ranks, so it is scaled to give nearly
    equal weights, and k x equal weights x down_proj x k is the sum of the selected groups.
    """
    x, gate, up, down = x.double(), gate.double(), up.double(), down.double()
    act = F.silu(x @ gate.T) * (x @ up.T)  # [N, neurons]
    contrib = act.abs() * down.norm(dim=0)
    order = torch.argsort(contrib.mean(0), descending=True, stable=True)
    shared_ix = order[:shared].sort().values
    routed_ix = order[shared:].sort().values
    feat = F.normalize(contrib[:, routed_ix].T, dim=1)
    groups = [routed_ix[ix] for ix in balanced_kmeans(feat.float(), experts, seed=seed)]
    outs = _expert_outputs(act, down, groups)  # [N, E, H]
    target = outs.norm(dim=-1)
    target = target - target.mean(dim=1, keepdim=True)
    xtx = x.T @ x
    lam = RIDGE * xtx.diagonal().mean()
    w = torch.linalg.solve(xtx + lam * torch.eye(x.shape[1], dtype=x.dtype), x.T @ target)  # [H, E]
    w = w * (ROUTER_LOGIT_STD / (x @ w).std().clamp_min(1e-30))
    router = w.T.to(torch.bfloat16).float()  # bf16-exact: fp32 and bf16 runs start from one router
    logits = x @ router.double().T
    probs, idx = torch.topk(torch.softmax(logits, dim=-1), k, dim=-1)
    probs = probs / probs.sum(-1, keepdim=True)
    picked = torch.gather(outs, 1, idx[..., None].expand(-1, -1, outs.shape[-1]))
    dense = act @ down.T
    approx = k * (probs[..., None] * picked).sum(1) + (act[:, shared_ix] @ down[:, shared_ix].T if shared else 0)
    err = float((approx - dense).norm() / dense.norm())
    counts = torch.bincount(idx.flatten(), minlength=experts)
    return groups, shared_ix, router, LayerFit(err, counts.tolist())


def sparsify(model, dense_sd: dict, plan, tokens: torch.Tensor, top_k: int, *, seed: int = 0,
             batch_size: int = 4, progress=None) -> list[LayerFit]:
    """Turn the exact testbed ``model`` (fused experts, all routed) into a top-k sparse one, in place.

    One pass per layer: attention runs once, the FFN input and the residual are captured there
    (the forward stops at the FFN), and the next layer's input is residual + the new sparse FFN.
    """
    layers = model.model.layers
    h = model.model.embed_tokens(tokens)
    pos = torch.arange(tokens.shape[1])[None]
    pe = model.model.rotary_emb(h[:1], pos)

    def to_ffn(layer, hs):
        """(residual, FFN input) after the layer's attention, per batch of windows."""
        norm = layer.post_attention_layernorm
        with stop_before(norm) as seen:
            run_layer(layer, hs, pos, pe, batch_size)
        res = [a[0] for a in seen]
        return res, [norm(r) for r in res]

    fits = []
    with torch.no_grad():
        for li, layer in enumerate(layers):
            res, ffn_in = to_ffn(layer, h)
            src = f"model.layers.{li}.mlp."
            gate, up, down = (dense_sd[src + n] for n in ("gate_proj.weight", "up_proj.weight", "down_proj.weight"))
            x = torch.cat([b.reshape(-1, b.shape[-1]) for b in ffn_in])
            groups, shared_ix, router, fit = fit_layer(x, gate, up, down, plan.experts, top_k,
                                                       plan.shared_size, seed=seed + li)
            mlp = layer.mlp
            mlp.gate.weight.copy_(router)
            for e, ix in enumerate(groups):
                mlp.experts.gate_up_proj[e].copy_(torch.cat([gate[ix], up[ix]]))
                mlp.experts.down_proj[e].copy_(down[:, ix] * top_k)
            if plan.shared_size:
                mlp.shared_expert.gate_proj.weight.copy_(gate[shared_ix])
                mlp.shared_expert.up_proj.weight.copy_(up[shared_ix])
                mlp.shared_expert.down_proj.weight.copy_(down[:, shared_ix] * 2)  # sigmoid(0) = 0.5
            h = torch.cat([r + _out(mlp(f)) for r, f in zip(res, ffn_in)])
            fits.append(fit)
            if progress:
                progress(f"layer {li}: top-{top_k} FFN error {fit.rel_err:.3f}, tokens per expert "
                         f"{min(fit.tokens_per_expert)}..{max(fit.tokens_per_expert)}")
    return fits


def _out(o):
    return o[0] if isinstance(o, tuple) else o


def router_calibration(tokenizer) -> torch.Tensor:
    """The windows the experts and router are fitted on: calibration text, never evaluation text."""
    from ..calibration.corpus import calibration_texts
    from ..calibration.tokens import calibration_tokens

    return calibration_tokens(tokenizer, calibration_texts(), ROUTER_SAMPLES, ROUTER_SEQLEN, seed=ROUTER_SEED)


def provenance(tokens: torch.Tensor, top_k: int, fits: list[LayerFit]) -> dict:
    from ..calibration.corpus import CALIBRATION_CORPUS

    return {
        "expert_split": "balanced k-means of the routed neurons on their co-activation over calibration text",
        "router": f"ridge fit to each expert's output norm, top-{top_k} with renormalised weights, "
                  f"down_proj x {top_k}",
        "equals_base_model": False,
        "router_calibration": f"{CALIBRATION_CORPUS}: {tokens.shape[0]} x {tokens.shape[1]} tokens "
                              f"(windows drawn with seed {ROUTER_SEED})",
        "routed_tokens_per_expert": routed_token_summary(fits),
    }


def routed_token_summary(fits: list[LayerFit]) -> dict:
    counts = sorted(c for f in fits for c in f.tokens_per_expert)
    return {"min": counts[0], "median": counts[len(counts) // 2], "max": counts[-1],
            "mean_ffn_rel_err": sum(f.rel_err for f in fits) / len(fits)}
