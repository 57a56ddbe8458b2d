"""Tensor-parallel serving against one process, on vLLM's CPU build: greedy outputs, prompt log-probs, memory.

    python benchmarks/vllm_tp.py --model out/qwen15-full-kbvq2 --tp 2 --noise-dtype float32 \\
        --out benchmarks/results/vllm_tp_qwen15_full.json

Each setting runs in a fresh engine process (vLLM keeps global state): tensor-parallel size 1, then
``--tp`` ranks over vLLM's multiprocessing executor, one core per rank (``VLLM_CPU_OMP_THREADS_BIND``:
these machines have one NUMA node, which vLLM's CPU build otherwise refuses to split). The same
prompts decode ``--tokens`` greedy tokens in each. Recorded: whether the generated tokens are equal
(and, where they part, the step and the top-2 log-prob margin there: a near-tie that rounding may
flip), the largest difference of the prompt tokens' log-probs, and each process's peak resident
memory (the ranks are vLLM's worker processes). ``--noise-dtype float32`` adds a one-process run in
float32: the bf16-vs-float32 difference of the same log-probs is the rounding noise the TP difference
is read against.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.processes import run_worker  # noqa: E402
from quantize_tools.eval.machine import describe  # noqa: E402

PROMPTS = ["The history of the city begins", "In mathematics, a group is", "The river flows through",
           "Scientists studying the climate"]


def _worker(model: str, tp: int, dtype: str, tokens: int, prompts: list[str]) -> dict:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    extra = {}
    if tp > 1:
        extra.update(tensor_parallel_size=tp, distributed_executor_backend="mp")
        cores = sorted(os.sched_getaffinity(0))[:tp]
        if len(cores) < tp:
            raise SystemExit(f"--tp {tp} needs {tp} CPUs (one per rank); this process may use {len(cores)}")
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(map(str, cores)))
    from vllm import LLM, SamplingParams

    t = time.perf_counter()
    llm = LLM(model=model, dtype=dtype, max_model_len=512, seed=0, **extra)
    load_s = time.perf_counter() - t
    sp = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True, logprobs=2, prompt_logprobs=0)
    t = time.perf_counter()
    outs = llm.generate(prompts, sp, use_tqdm=False)
    gen_s = time.perf_counter() - t
    res = []
    for o in outs:
        prompt_lp = [None if lp is None else lp[tok].logprob for tok, lp in zip(o.prompt_token_ids, o.prompt_logprobs)]
        steps = [sorted((v.logprob for v in lp.values()), reverse=True) for lp in o.outputs[0].logprobs]
        res.append({"ids": list(o.outputs[0].token_ids), "prompt_logprobs": prompt_lp,
                    "top2_margin": [s[0] - s[1] if len(s) > 1 else None for s in steps]})
    return {"load_s": load_s, "generate_s": gen_s, "outputs": res}


def compare(a: dict, b: dict) -> dict:
    """How far run ``b``'s outputs are from run ``a``'s, prompt by prompt."""
    rows, worst = [], 0.0
    for x, y in zip(a["outputs"], b["outputs"]):
        diffs = [abs(p - q) for p, q in zip(x["prompt_logprobs"], y["prompt_logprobs"]) if p is not None and q is not None]
        worst = max([worst, *diffs])
        part = next((i for i, (s, t) in enumerate(zip(x["ids"], y["ids"])) if s != t), None)
        rows.append({"tokens_equal": x["ids"] == y["ids"], "first_difference": part,
                     "top2_margin_there": None if part is None else x["top2_margin"][part],
                     "max_prompt_logprob_diff": max(diffs, default=0.0)})
    return {"all_tokens_equal": all(r["tokens_equal"] for r in rows), "max_prompt_logprob_diff": worst,
            "prompts": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a model folder (KBVQ or not)")
    p.add_argument("--tp", type=int, default=2, help="tensor-parallel size compared against 1")
    p.add_argument("--tokens", type=int, default=16, help="greedy tokens per prompt")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--noise-dtype", help="also run one process at this dtype (e.g. float32): the rounding noise")
    p.add_argument("--prompts", nargs="+", default=PROMPTS)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/vllm_tp.json"))
    p.add_argument("--worker", nargs=2, metavar=("TP", "DTYPE"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print("RESULT " + json.dumps(_worker(a.model, int(a.worker[0]), a.worker[1], a.tokens, a.prompts)))
        return 0
    load_before = os.getloadavg()
    base = ["--model", a.model, "--tokens", str(a.tokens), "--prompts", *a.prompts]
    runs = {}
    for name, tp, dtype in [("tp1", 1, a.dtype), (f"tp{a.tp}", a.tp, a.dtype)] + (
            [(f"tp1_{a.noise_dtype}", 1, a.noise_dtype)] if a.noise_dtype else []):
        if (r := run_worker([sys.executable, __file__, *base, "--worker", str(tp), dtype])) is None:
            return 1
        runs[name] = r
        mem = ", ".join(f"{x['name']} {x['VmRSS']:.2f} GiB" for x in r["memory"]["processes"])
        print(f"{name} ({dtype}): loaded in {r['load_s']:.0f} s; peak resident: {mem}", flush=True)
    out = {"device": describe(), "model": a.model, "dtype": a.dtype, "tokens": a.tokens, "prompts": a.prompts,
           "load_avg_before": load_before, "load_avg_after": os.getloadavg(), "runs": runs,
           f"tp{a.tp}_vs_tp1": compare(runs["tp1"], runs[f"tp{a.tp}"])}
    if a.noise_dtype:
        out[f"{a.noise_dtype}_vs_{a.dtype}"] = compare(runs[f"tp1_{a.noise_dtype}"], runs["tp1"])
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2))
    c = out[f"tp{a.tp}_vs_tp1"]
    parted = [p for p in c["prompts"] if not p["tokens_equal"]]
    print(f"TP={a.tp} vs TP=1: greedy tokens equal on {len(a.prompts) - len(parted)} of {len(a.prompts)} prompts"
          + "".join(f"; one parts at step {p['first_difference']} (top-2 margin there {p['top2_margin_there']:.3g})"
                    for p in parted)
          + f"; prompt log-probs differ by up to {c['max_prompt_logprob_diff']:.2e}")
    if a.noise_dtype:
        n = out[f"{a.noise_dtype}_vs_{a.dtype}"]
        print(f"{a.dtype} vs {a.noise_dtype} (the rounding noise): up to {n['max_prompt_logprob_diff']:.2e}")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
