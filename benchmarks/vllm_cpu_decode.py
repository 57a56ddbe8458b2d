"""vLLM CPU decode throughput: KBVQ checkpoints against their unquantized original, same settings.

    python benchmarks/vllm_cpu_decode.py --base out/testbed-qwen2_moe-e8 \\
        --kbvq out/testbed-qwen2_moe-e8-kbvq2 out/testbed-qwen2_moe-e8-kbvq3 --out benchmarks/results/vllm_cpu_decode.json

Each model is served by a fresh vLLM engine (CPU build, compiled mode, bfloat16 activations,
vLLM's own thread setting); after a warm-up, ``--batch`` prompts each decode ``--tokens`` tokens
(EOS ignored), ``--repeats`` times (median). Reported: output tokens per second and the per-step
latency for each model and batch size, its load time and peak resident memory (the engine's processes
together), and each KBVQ/base ratio, with the load average. ``--base`` may be left out for a model whose
unquantized original does not fit the machine. The KBVQ
experts run the native CPU kernels (vllm_kbvq/kernels/cpu) unless ``KBVQ_CPU_KERNELS=0``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.processes import run_worker  # noqa: E402
from quantize_tools.eval.machine import describe  # noqa: E402


def _worker(model: str, batches: list[int], tokens: int, dtype: str, repeats: int, profile: bool) -> dict:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    if profile:  # the engine in this process, so the profiler sees the model's ops
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams

    t = time.perf_counter()
    llm = LLM(model=model, dtype=dtype, max_model_len=512, seed=0)
    load_s = time.perf_counter() - t
    sp = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    prompts = [f"Story {i}: once upon a time" for i in range(max(batches))]
    llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)  # warm-up
    if profile:
        return {"model": model, "profile": _profile(llm, sp, prompts[:1], tokens)}
    rows = []
    for b in batches:
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            outs = llm.generate(prompts[:b], sp, use_tqdm=False)
            times.append(time.perf_counter() - t)
        dt = statistics.median(times)
        n = sum(len(o.outputs[0].token_ids) for o in outs)
        rows.append({"batch": b, "output_tokens": n, "seconds": dt, "tokens_per_s": n / dt,
                     "ms_per_step": 1000 * dt / tokens, "repeats_s": times})
    return {"model": model, "load_s": load_s, "runs": rows}


# op-name keywords -> part of a decode step (first match wins); everything else is "other model ops"
_PARTS = (("MoE experts", ("kbvq", "fused_moe", "moe")), ("attention", ("attention", "attn", "paged", "kv_cache")),
          ("dense linears (attention projections, router, lm head)", ("linear", "addmm", "aten::mm", "matmul",
                                                                      "onednn", "gemm")),
          ("sampling", ("sampl", "topk", "top_k", "argmax", "multinomial", "gumbel")))


def _profile(llm, sp, prompts, tokens: int) -> dict:
    """Where one batch-1 request's decode time goes: torch profiler self-CPU time by op, grouped."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        llm.generate(prompts, sp, use_tqdm=False)
    wall_ms = 1000 * (time.perf_counter() - t)
    events = [(e.key, e.self_cpu_time_total / 1000) for e in prof.key_averages()]
    parts = {name: 0.0 for name, _ in _PARTS}
    parts["other model ops"] = 0.0
    for key, ms in events:
        low = key.lower()
        part = next((name for name, words in _PARTS if any(w in low for w in words)), "other model ops")
        parts[part] += ms
    in_ops = sum(ms for _, ms in events)
    top = sorted(events, key=lambda kv: -kv[1])[:25]
    return {"wall_ms_per_step": wall_ms / tokens, "ms_per_step": {k: v / tokens for k, v in parts.items()},
            "outside torch ops (python: scheduling, input preparation, detokenizing)_ms_per_step":
                max(0.0, wall_ms - in_ops) / tokens,
            "top_ops_ms_per_step": {k: v / tokens for k, v in top}, "torch": torch.__version__,
            "note": "profiled run (profiler overhead included); in-process engine"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kbvq", required=True, nargs="+", help="KBVQ checkpoint directories")
    p.add_argument("--base", help="the unquantized checkpoint they were made from (left out where it does not fit "
                                  "the machine: then no ratios)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--repeats", type=int, default=3, help="timed runs per batch size (median)")
    p.add_argument("--tokens", type=int, default=32, help="output tokens per request")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/vllm_cpu_decode.json"))
    p.add_argument("--profile", action="store_true",
                   help="also profile one batch-1 request per model (torch profiler, in-process engine) and report "
                        "where a decode step's time goes: MoE experts, attention, dense linears, sampling, the rest")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print("RESULT " + json.dumps(_worker(a.worker, a.batch, a.tokens, a.dtype, a.repeats, a.profile)))
        return 0
    res, load_before = {}, os.getloadavg()
    models = ((("base", a.base),) if a.base else ()) + tuple((f"kbvq:{Path(k).name}", k) for k in a.kbvq)

    def worker(model, profile):
        cmd = [sys.executable, __file__, "--kbvq", *a.kbvq, "--worker", model, "--tokens",
               str(a.tokens), "--dtype", a.dtype, "--repeats", str(a.repeats), "--batch", *map(str, a.batch),
               *(["--profile"] if profile else [])]
        r = run_worker(cmd)
        return None if r is None else {**r, "peak_rss_gib": r["memory"]["total"]["VmRSS"],
                                       "peak_anon_gib": r["memory"]["total"]["RssAnon"]}

    for name, model in models:
        if (r := worker(model, False)) is None:
            return 1
        res[name] = r
        print(f"{name}: loaded in {r['load_s']:.0f} s, peak resident {r['peak_rss_gib']:.2f} GiB "
              f"({r['peak_anon_gib']:.2f} anonymous); " +
              ", ".join(f"batch {x['batch']} {x['tokens_per_s']:.1f} tok/s" for x in r["runs"]), flush=True)
    for name, model in models if a.profile else ():  # after the timings, in their own processes
        if (r := worker(model, True)) is None:
            return 1
        res[name]["profile"] = prof = r["profile"]
        print(f"{name}, one request: {prof['wall_ms_per_step']:.1f} ms per step: " + ", ".join(
            f"{k} {v:.2f}" for k, v in prof["ms_per_step"].items()) + f", outside torch ops "
            f"{prof['outside torch ops (python: scheduling, input preparation, detokenizing)_ms_per_step']:.2f}",
            flush=True)
    ratios = {} if not a.base else {name: dict(zip(map(str, a.batch), (k["tokens_per_s"] / b["tokens_per_s"]
                                                 for b, k in zip(res["base"]["runs"], r["runs"]))))
              for name, r in res.items() if name != "base"}
    out = {"device": describe(), "dtype": a.dtype,
           "tokens_per_request": a.tokens, "load_avg_before": load_before, "load_avg_after": os.getloadavg(),
           **res, "kbvq_over_base_throughput": ratios}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2))
    for name, r in ratios.items():
        print(f"{name} / base: " + ", ".join(f"batch {b} x{v:.2f}" for b, v in r.items()))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
