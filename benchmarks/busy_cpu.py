"""Quantizer run time on an idle machine against the same run beside a busy process (issue 23).

    python benchmarks/busy_cpu.py --model out/testbed-qwen2_moe-e8 --out benchmarks/results/busy_cpu.json

Runs ``kbvq-quantize`` with the demo's settings (2-bit, 32 x 512 calibration tokens, no plain-VQ
report) twice, alternating: alone, then while another process spins one core (``while True:
pass``, what any other job on a shared 2-core VM does). Reports each run's wall time, the median
seconds per MoE layer from ``kbvq_report.json``, the busy/idle ratio, the OpenMP wait policy and
thread count the runs used, and the load average before and after each run. By default the runs
use the policy kbvq-quantize sets (``OMP_WAIT_POLICY=PASSIVE``); ``--omp-wait-policy ACTIVE`` makes
the workers spin without end, the other extreme (libgomp's own default, with the variable unset,
spins a while and then sleeps; quantize_tools/options.py has two-layer figures for it).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from quantize_tools.eval.machine import cpu_name

QUANTIZE_ARGS = ("--bits", "2", "--nsamples", "32", "--seqlen", "512", "--no-plain-vq-report", "--quiet")


def _run(model: Path, out: Path, busy: bool, env: dict, extra: list[str]) -> dict:
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    load_before = os.getloadavg()
    t = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "quantize_tools.cli", "--model", str(model), "--output", str(out),
                               *QUANTIZE_ARGS, *extra], env=env, capture_output=True, text=True)
    finally:
        wall = time.perf_counter() - t
        if spinner is not None:
            spinner.kill()
            spinner.wait()
    if proc.returncode:
        raise SystemExit(f"kbvq-quantize failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    report = json.loads((out / "kbvq_report.json").read_text())
    layer_s = [layer["seconds"] for layer in report["layers"]]
    row = {"busy": busy, "wall_s": round(wall, 1), "layers": len(layer_s),
           "median_layer_s": statistics.median(layer_s), "layer_s": layer_s,
           "cpu_threads": report["run"].get("cpu_threads"), "omp_wait_policy": report["run"].get("omp_wait_policy"),
           "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
    shutil.rmtree(out)
    print(json.dumps({k: v for k, v in row.items() if k != "layer_s"}), flush=True)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=Path("out/testbed-qwen2_moe-e8"), help="model to quantize")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/busy_cpu.json"), help="JSON written here")
    p.add_argument("--omp-wait-policy", choices=("PASSIVE", "ACTIVE"), default=None,
                   help="set OMP_WAIT_POLICY for the runs (default: what kbvq-quantize chooses)")
    p.add_argument("--repeats", type=int, default=1, help="idle/busy pairs, alternating")
    p.add_argument("extra", nargs="*", help="more kbvq-quantize options (after --)")
    args = p.parse_args(argv)
    if not (args.model / "config.json").is_file():
        p.error(f"--model {args.model}: no config.json (build the testbed: python -m quantize_tools.testbed "
                "--layout qwen2_moe --experts 8 --output out/testbed-qwen2_moe-e8)")
    env = dict(os.environ)
    if args.omp_wait_policy:
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy
    rows = []
    with tempfile.TemporaryDirectory(prefix="busy-cpu-") as tmp:
        for r in range(args.repeats):
            for busy in (False, True):
                rows.append(_run(args.model, Path(tmp) / f"q{r}{int(busy)}", busy, env, args.extra))
    idle = statistics.median(r["wall_s"] for r in rows if not r["busy"])
    busy = statistics.median(r["wall_s"] for r in rows if r["busy"])
    result = {
        "what": "kbvq-quantize wall time, idle vs beside one process spinning a core",
        "model": str(args.model), "quantize_args": list(QUANTIZE_ARGS) + args.extra,
        "cpus": os.cpu_count(), "machine": cpu_name(),
        "idle_wall_s": idle, "busy_wall_s": busy, "busy_over_idle": round(busy / idle, 2),
        "median_layer_s": {"idle": statistics.median(x for r in rows if not r["busy"] for x in r["layer_s"]),
                           "busy": statistics.median(x for r in rows if r["busy"] for x in r["layer_s"])},
        "runs": rows,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
