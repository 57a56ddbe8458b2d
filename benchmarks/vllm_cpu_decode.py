"""vLLM CPU decode throughput: a KBVQ checkpoint against its unquantized original, same settings, one run.

    python benchmarks/vllm_cpu_decode.py --kbvq out/testbed-qwen2_moe-e8-kbvq2 \\
        --base out/testbed-qwen2_moe-e8 --out benchmarks/results/vllm_cpu_decode.json

Each model is served by a fresh vLLM engine (CPU build, compiled mode, bfloat16
activations); after a warm-up, ``--batch`` short prompts each decode ``--tokens``
tokens (EOS ignored). Reported: output tokens per second and the per-step latency,
for each model and batch size, and the KBVQ/base ratio. The torch CPU path of
KBVQ dequantizes the routed experts' weights at every step, so this measures
that path's cost, not the Triton GPU kernels.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path


def _worker(model: str, batches: list[int], tokens: int, dtype: str) -> dict:
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
        t = time.perf_counter()
        outs = llm.generate(prompts[:b], sp, use_tqdm=False)
        dt = time.perf_counter() - t
        n = sum(len(o.outputs[0].token_ids) for o in outs)
        rows.append({"batch": b, "output_tokens": n, "seconds": dt, "tokens_per_s": n / dt,
                     "ms_per_step": 1000 * dt / tokens})
    return {"model": model, "load_s": load_s, "runs": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kbvq", required=True, help="KBVQ checkpoint directory")
    p.add_argument("--base", required=True, help="the unquantized checkpoint it was made from")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--tokens", type=int, default=32, help="output tokens per request")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/vllm_cpu_decode.json"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print("RESULT " + json.dumps(_worker(a.worker, a.batch, a.tokens, a.dtype)))
        return 0
    res = {}
    for name, model in (("base", a.base), ("kbvq", a.kbvq)):
        cmd = [sys.executable, __file__, "--kbvq", a.kbvq, "--base", a.base, "--worker", model, "--tokens",
               str(a.tokens), "--dtype", a.dtype, "--batch", *map(str, a.batch)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not line:
            print(proc.stderr[-4000:], file=sys.stderr)
            return 1
        res[name] = json.loads(line[-1][7:])
    ratios = [k["tokens_per_s"] / b["tokens_per_s"] for b, k in zip(res["base"]["runs"], res["kbvq"]["runs"])]
    out = {"device": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs", "dtype": a.dtype,
           "tokens_per_request": a.tokens, **res,
           "kbvq_over_base_throughput": dict(zip(map(str, a.batch), ratios))}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2))
    for b, rb, rk, r in zip(a.batch, res["base"]["runs"], res["kbvq"]["runs"], ratios):
        print(f"batch {b:3d}: base {rb['tokens_per_s']:7.1f} tok/s, KBVQ {rk['tokens_per_s']:7.1f} tok/s, "
              f"ratio {r:.2f}")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
