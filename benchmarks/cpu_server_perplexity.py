"""Held-out perplexity of a KBVQ checkpoint through vLLM's CPU server, against the reference runtime.

    python benchmarks/cpu_server_perplexity.py --ckpt out/testbed-qwen2_moe-e8-kbvq2 \\
        --out benchmarks/results/cpu_server_perplexity.json

The same Wikipedia windows (``kbvq-eval``'s held-out text, ``--seqlen`` tokens, the first
``--ppl-windows``) are scored four ways: the reference runtime (``load_kbvq_model``, float32), and
``kbvq-serve`` in bfloat16 with the native CPU kernels, in bfloat16 on the torch path
(``KBVQ_CPU_KERNELS=0``: what bf16 alone costs, the noise floor the kernels are judged against) and
in float32 with the kernels. Reported: each perplexity and its relative difference from the
reference runtime's.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from quantize_tools.eval import evaluate as ev  # noqa: E402
from quantize_tools.testbed.server import ServerProcess, free_port  # noqa: E402

SERVED = "kbvq"
RUNS = (  # name, server dtype, environment
    ("server bf16, native kernels", "bfloat16", {}),
    ("server bf16, torch path", "bfloat16", {"KBVQ_CPU_KERNELS": "0"}),
    ("server float32, native kernels", "float32", {}),
)


def _ppl(target: ev.Target, seqlen: int, windows: int) -> dict:
    t = time.perf_counter()
    r = ev.evaluate(target, ["wikipedia"], seqlen=seqlen, ppl_windows=windows, progress=False)["perplexity"]["wikipedia"]
    return {**r, "seconds": time.perf_counter() - t}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, type=Path, help="a KBVQ checkpoint directory")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--ppl-windows", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=4, help="concurrent requests")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu_server_perplexity.json"))
    a = p.parse_args(argv)
    res = {"ckpt": str(a.ckpt), "seqlen": a.seqlen, "windows": a.ppl_windows, "load_avg_before": os.getloadavg()}
    print("reference runtime (float32) ...", flush=True)
    ref = _ppl(ev.Target(str(a.ckpt), batch_size=a.batch_size), a.seqlen, a.ppl_windows)
    res["reference runtime"] = ref
    print(f"  perplexity {ref['perplexity']:.4f} ({ref['seconds']:.0f} s)", flush=True)
    logs = Path(tempfile.mkdtemp(prefix="kbvq-server-ppl-"))
    print(f"server logs in {logs}", flush=True)
    for name, dtype, env in RUNS:
        print(f"{name} ...", flush=True)
        srv = ServerProcess(a.ckpt, logs / f"{name.replace(' ', '_').replace(',', '')}.log", port=free_port(),
                            args=("--dtype", dtype, "--max-model-len", str(a.seqlen + 16), "--served-model-name",
                                  SERVED), env={"VLLM_CPU_KVCACHE_SPACE": "2", **env})
        with srv as url:
            r = _ppl(ev.Target(SERVED, server=url, tokenizer=str(a.ckpt), batch_size=a.batch_size), a.seqlen,
                     a.ppl_windows)
        r["rel_diff_vs_reference"] = r["perplexity"] / ref["perplexity"] - 1
        res[name] = r
        print(f"  perplexity {r['perplexity']:.4f} ({100 * r['rel_diff_vs_reference']:+.3f} % vs the reference runtime, "
              f"{r['seconds']:.0f} s)", flush=True)
    res["load_avg_after"] = os.getloadavg()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
