"""vLLM CPU decode throughput: KBVQ checkpoints against their unquantized original, same settings.

    python benchmarks/vllm_cpu_decode.py --base out/testbed-qwen2_moe-e8 \\
        --kbvq out/testbed-qwen2_moe-e8-kbvq2 out/testbed-qwen2_moe-e8-kbvq3 --out benchmarks/results/vllm_cpu_decode.json

Each model is served by a fresh vLLM engine (CPU build, compiled mode, bfloat16 activations,
vLLM's own thread setting); after a warm-up, ``--batch`` prompts each decode ``--tokens`` tokens
(EOS ignored), ``--repeats`` times (median). Reported: output tokens per second and the per-step
latency for each model and batch size, and each KBVQ/base ratio, with the load average. The KBVQ
experts run the native CPU kernels (vllm_kbvq/kernels/cpu) unless ``KBVQ_CPU_KERNELS=0``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _worker(model: str, batches: list[int], tokens: int, dtype: str, repeats: int) -> dict:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM, SamplingParams

    t = time.perf_counter()
    llm = LLM(model=model, dtype=dtype, max_model_len=512, seed=0)
    load_s = time.perf_counter() - t
    sp = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    prompts = [f"Story {i}: once upon a time" for i in range(max(batches))]
    llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)  # warm-up
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kbvq", required=True, nargs="+", help="KBVQ checkpoint directories")
    p.add_argument("--base", required=True, help="the unquantized checkpoint they were made from")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--repeats", type=int, default=3, help="timed runs per batch size (median)")
    p.add_argument("--tokens", type=int, default=32, help="output tokens per request")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/vllm_cpu_decode.json"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print("RESULT " + json.dumps(_worker(a.worker, a.batch, a.tokens, a.dtype, a.repeats)))
        return 0
    res, load_before = {}, os.getloadavg()
    for name, model in (("base", a.base), *((f"kbvq:{Path(k).name}", k) for k in a.kbvq)):
        cmd = [sys.executable, __file__, "--kbvq", *a.kbvq, "--base", a.base, "--worker", model, "--tokens",
               str(a.tokens), "--dtype", a.dtype, "--repeats", str(a.repeats), "--batch", *map(str, a.batch)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not line:
            print(proc.stderr[-4000:], file=sys.stderr)
            return 1
        res[name] = json.loads(line[-1][7:])
        print(f"{name}: " + ", ".join(f"batch {r['batch']} {r['tokens_per_s']:.1f} tok/s" for r in res[name]["runs"]),
              flush=True)
    ratios = {name: dict(zip(map(str, a.batch), (k["tokens_per_s"] / b["tokens_per_s"]
                                                 for b, k in zip(res["base"]["runs"], r["runs"]))))
              for name, r in res.items() if name != "base"}
    out = {"device": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs", "dtype": a.dtype,
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
