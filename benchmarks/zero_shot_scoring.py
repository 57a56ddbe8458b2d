"""Zero-shot scoring speed: lm-eval's HFLM against the shared-context scorer, same requests, one run.

    python benchmarks/zero_shot_scoring.py                       # dense SmolLM2 (packaged), 100 documents per task
    python benchmarks/zero_shot_scoring.py --model out/results/kbvq-w2 --limit 500

Both scorers see the same lm-eval requests (the results tables' zero-shot tasks). Reported per
scorer: wall time; per task: accuracy from each, the largest difference in any choice's
log-likelihood, and how many documents pick a different choice. Written to ``--out`` (JSON).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TASKS = "arc_easy,arc_challenge,piqa,hellaswag,winogrande,lambada"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="HF model or KBVQ checkpoint directory (default: the packaged dense SmolLM2)")
    p.add_argument("--tasks", default=TASKS)
    p.add_argument("--limit", type=int, default=100, help="documents per task")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/zero_shot_scoring.json"))
    a = p.parse_args()
    import torch
    from lm_eval.models.huggingface import HFLM

    from quantize_tools.eval.evaluate import Target
    from quantize_tools.eval.machine import cpu_name
    from quantize_tools.eval.shared_prefix import SharedPrefixHFLM
    from quantize_tools.eval.zeroshot import run_zero_shot
    from quantize_tools.run_folder import write_json_atomic

    if a.threads:
        torch.set_num_threads(a.threads)
    if a.model:
        t = Target(a.model, batch_size=a.batch_size)
        model, tok = t.hf_model, t.tokenizer
    else:
        from quantize_tools.testbed.build import load_dense_model

        model, tok = load_dense_model()
    tasks = a.tasks.split(",")
    runs = {}
    for name, cls in [("lm-eval HFLM", HFLM), ("shared contexts", SharedPrefixHFLM)]:
        lm = cls(pretrained=model, tokenizer=tok, batch_size=a.batch_size)
        t0 = time.perf_counter()
        res = run_zero_shot(lm, tasks, a.limit, log_samples=True)
        runs[name] = {"seconds": round(time.perf_counter() - t0, 1), "results": res}
        print(f"{name:16s} {runs[name]['seconds']:7.1f} s", flush=True)
    base, fast = runs["lm-eval HFLM"]["results"], runs["shared contexts"]["results"]
    per_task = {}
    for task in tasks:
        b, f = base[task]["samples"], fast[task]["samples"]
        diff = max(abs(x - y) for sb, sf in zip(b, f) for x, y in zip(sb["loglikelihoods"], sf["loglikelihoods"]))
        picks = sum(sb["loglikelihoods"].index(max(sb["loglikelihoods"])) != sf["loglikelihoods"].index(max(sf["loglikelihoods"]))
                    for sb, sf in zip(b, f))
        metrics = {m: [base[task][m], fast[task][m]] for m in base[task] if m not in ("samples", "n")}
        per_task[task] = {"docs": base[task]["n"], "max_abs_loglik_diff": diff, "docs_with_other_choice": picks,
                          "metrics_hflm_vs_shared": metrics}
        print(f"  {task:14s} max |d loglik| {diff:.2e}  other choice in {picks}/{base[task]['n']} docs  {metrics}")
    speedup = runs["lm-eval HFLM"]["seconds"] / runs["shared contexts"]["seconds"]
    print(f"speed-up {speedup:.2f}x")
    write_json_atomic(a.out, {
        "model": a.model or "dense SmolLM2-135M (packaged)", "tasks": tasks, "limit": a.limit,
        "batch_size": a.batch_size, "threads": torch.get_num_threads(), "machine": cpu_name(),
        "seconds": {k: v["seconds"] for k, v in runs.items()}, "speedup": round(speedup, 2), "per_task": per_task})
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
