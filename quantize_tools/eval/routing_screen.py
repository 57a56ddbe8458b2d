"""The routing screen: FP perplexity of a few sparse testbed settings (E experts, top-k) against dense SmolLM2.

    python -m quantize_tools.eval.routing_screen   # writes docs/results/sparse/routing.json

It chose the sparse testbed of the second results table (``testbed.build.SPARSE_CHOICE`` says
why); the results page renders its record with :func:`screen_table`.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ..calibration import corpus
from ..run_folder import write_json_atomic
from ..testbed.build import (
    DENSE_INTERMEDIATE,
    SPARSE_CHOICE,
    TestbedError,
    build_moe_model,
    expert_plan,
    load_dense_model,
)
from ..testbed.sparse import router_calibration
from .perplexity import perplexity, text_windows
from .protocol import PPL_SEQLEN, PPL_WINDOWS

__all__ = ["SCREEN_SETTINGS", "WITHIN", "active_fraction", "screen", "screen_table", "main"]

SCREEN_SETTINGS = ((16, 2, None), (16, 4, None), (16, 8, None), (16, 12, None))  # (E, k, shared or default)
WITHIN = 0.15  # the default is the sparsest setting whose FP perplexity is within 15 % of dense


def active_fraction(experts: int, top_k: int, shared: int) -> float:
    """Share of the dense FFN's neurons a token uses: the shared expert plus k of E routed groups."""
    return (shared + top_k * (DENSE_INTERMEDIATE - shared) / experts) / DENSE_INTERMEDIATE


def screen(settings=SCREEN_SETTINGS, windows: int | None = None, progress: bool = True) -> dict:
    """Build each (E, k) Qwen2-MoE testbed in memory and score it like the FP row of the tables
    (their Wikipedia windows; ``windows`` fewer for a quick look)."""
    from tqdm.auto import tqdm

    dense, tok = load_dense_model()
    tokens = router_calibration(tok)
    win = text_windows(tok, corpus.heldout_texts(), PPL_SEQLEN, windows or PPL_WINDOWS)
    dense_ppl = perplexity(dense, win, 4, progress=False)
    rows = []
    for experts, top_k, shared in tqdm(settings, desc="sparse settings", disable=not progress):
        shared = expert_plan("qwen2_moe", experts, shared).shared_size
        t0 = time.time()
        model = build_moe_model("qwen2_moe", experts, dense, shared_size=shared, top_k=top_k, router_tokens=tokens)
        built = time.time() - t0
        ppl = perplexity(model, win, 4, progress=False)
        rows.append({"experts": experts, "top_k": top_k, "shared": shared,
                     "active_fraction": active_fraction(experts, top_k, shared), "perplexity": ppl,
                     "vs_dense": ppl / dense_ppl - 1, "build_seconds": round(built, 1),
                     **model.config.testbed["routed_tokens_per_expert"]})
        del model
    ok = [r for r in rows if r["vs_dense"] <= WITHIN]
    best = min(ok, key=lambda r: r["active_fraction"]) if ok else None
    return {"dense_perplexity": dense_ppl,
            "evaluation": f"{corpus.HELDOUT_CORPUS}: {win.shape[0]} windows of {PPL_SEQLEN} tokens",
            "router_calibration": f"{corpus.CALIBRATION_CORPUS}: {tokens.shape[0]} x {tokens.shape[1]} tokens",
            "within": WITHIN, "settings": rows,
            "sparsest_within": None if best is None else [best["experts"], best["top_k"]]}


PRECISION_NOTE = (
    "Routing in bfloat16: the router is stored rounded to bfloat16, so fp32 and bf16 runs start from the same "
    "router. On the same hidden states, vLLM's bf16 router picks the fp32 router's experts except where the k-th "
    "and (k+1)-th logits are within bf16 rounding of each other (1198 of 1200 (layer, token) choices on the "
    "four test prompts of `tests/runtime/test_sparse_vllm.py`, which prints the count). A bf16 run end to end is not "
    "an fp32 run: one tie broken the other way swaps an expert, moves that token's hidden state, and later "
    "layers route it differently (787 of 1200 choices equal to transformers' fp32 run). A router fitted in "
    "closed form has no margin to give ties, so the tables are scored in fp32 and the bf16 check is on equal "
    "inputs."
)


def screen_table(rec: dict) -> list[str]:
    """Markdown for the page: one row per setting."""
    lines = [f"Dense SmolLM2-135M: Wikipedia perplexity {rec['dense_perplexity']:.2f} ({rec['evaluation']}). "
             f"Routers and experts fitted on {rec['router_calibration']}; routed tokens per expert are counted "
             "on those tokens over all layers (each token counts once per expert it visits).", "",
             "| experts | top-k | shared neurons | FFN neurons a token uses | FP perplexity | vs dense | "
             "mean FFN rel. error | routed tokens per expert (min / median / max) | build s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rec["settings"]:
        lines.append(f"| {r['experts']} | {r['top_k']} | {r['shared']} | {100 * r['active_fraction']:.0f} % | "
                     f"{r['perplexity']:.2f} | {100 * r['vs_dense']:+.0f} % | {r['mean_ffn_rel_err']:.3f} | "
                     f"{r['min']} / {r['median']} / {r['max']} | {r['build_seconds']:.0f} |")
    best = rec["sparsest_within"]
    lines += ["", f"Sparsest setting within {100 * rec['within']:.0f} % of dense: "
              + (f"{best[0]} experts, top-{best[1]}." if best else "none of these.")]
    return lines + ["", SPARSE_CHOICE, "", PRECISION_NOTE]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m quantize_tools.eval.routing_screen",
                                description="Screen sparse testbed settings: FP perplexity of each (E, k) "
                                            "against dense SmolLM2, routed-token counts; writes JSON.")
    p.add_argument("--settings", default=",".join(f"{e}:{k}" + (f":{s}" if s else "") for e, k, s in SCREEN_SETTINGS),
                   help="comma-separated EXPERTS:TOP_K or EXPERTS:TOP_K:SHARED_NEURONS (default: %(default)s)")
    p.add_argument("--windows", type=int, default=None,
                   help=f"Wikipedia windows to score (default: the results tables' {PPL_WINDOWS})")
    p.add_argument("--output", type=Path, default=Path("docs/results/sparse/routing.json"),
                   help="JSON record, rendered into docs/results.md by python -m quantize_tools.eval.results "
                        "(default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    a = p.parse_args(argv)
    try:
        settings = [tuple(int(v) for v in s.split(":")) for s in a.settings.split(",")]
        if any(len(s) not in (2, 3) for s in settings):
            raise ValueError
        settings = [(s[0], s[1], s[2] if len(s) == 3 else None) for s in settings]
        for e, k, sh in settings:
            expert_plan("qwen2_moe", e, sh)
            if not 1 <= k < e:
                raise TestbedError(f"top-k {k} must be between 1 and {e - 1} for {e} experts")
    except TestbedError as exc:
        p.error(f"--settings: {exc}")
    except ValueError:
        p.error(f"--settings: expected EXPERTS:TOP_K[:SHARED] like 16:4,16:8:768, got {a.settings!r}")
    if a.threads:
        torch.set_num_threads(a.threads)
    rec = screen(settings, a.windows)
    write_json_atomic(a.output, rec)
    print("\n".join(screen_table(rec)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
