"""A whole-model kbvq-quantize run, measured: wall time, each layer's seconds, peak memory, disk written.

    python benchmarks/quantize_model.py --out benchmarks/results/quantize_qwen15_full.json -- \\
        --model out/qwen15-full --output out/qwen15-full-kbvq2 --bits 2 --nsamples 16 --seqlen 512 \\
        --kmeans-iters 20 --kmeans-sample 131072 --no-plain-vq-report

Everything after ``--`` goes to ``kbvq-quantize`` unchanged (add ``--resume`` to continue an interrupted
run: the JSON then gains one entry per session in ``sessions``). The child's memory is sampled from
/proc every second: resident set (``VmRSS``) and its anonymous part (``RssAnon``: what the run itself
holds; the rest is checkpoint pages mapped while they are read, which the kernel can drop). Each layer's
seconds come from the report's per-layer ``seconds``; the machine and its load are recorded, as for
every figure here. Each memory sample is also put down to the stage the quantizer's progress line named at
that moment (``peak_anon_gib_by_stage``: the start-up checks, a layer's capture, each weight type's KLT and
joint SVD, k-means, BCOS, the forward, writing the checkpoint), so a peak can be traced to its stage, and
each layer's least and most are kept (``anon_gib_by_layer``: memory held from one layer to the next shows as
growth). The progress line is still shown. With ``--quiet`` there is no progress line and no stage.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.processes import watch  # noqa: E402
from quantize_tools.eval.machine import describe  # noqa: E402


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def _option(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args and args.index(name) + 1 < len(args) else None


class Stages:
    """Follows the quantizer's progress output (passed on to our stderr) and keeps, per stage, the peak anonymous
    memory sampled while that stage was the last one named. A stage is the text after ``layer N:`` in the bar
    with every number made ``#`` (so 24 layers and 20 Lloyd iterations make one stage), ``start-up`` before
    any layer, ``writing the checkpoint`` at the end."""

    _LAYER = re.compile(r"layer (\d+): ([^\]]*)\]")

    def __init__(self):
        self.now, self.layer = "start-up", None
        self.peak: dict[str, dict] = {}
        self.by_layer: dict[int, tuple[float, float]] = {}

    def follow(self, stream) -> None:
        buf = ""
        for chunk in iter(lambda: stream.read1(4096), b""):  # a pipe from Popen: buffered, with read1
            sys.stderr.buffer.write(chunk)
            sys.stderr.flush()
            buf += chunk.decode(errors="replace")
            *lines, buf = re.split(r"[\r\n]", buf)
            for line in lines:
                self.see(line)

    def see(self, line: str) -> None:
        if "writing the checkpoint" in line:
            self.now, self.layer = "writing the checkpoint", None
        elif (m := self._LAYER.findall(line)):
            layer, stage = m[-1]
            self.now, self.layer = re.sub(r"\d+", "#", stage.strip()), int(layer)

    def sample(self, kb: dict) -> None:
        gib = round(kb["RssAnon"] / 2**20, 2)
        p = self.peak.get(self.now)
        if p is None or gib > p["anon_gib"]:
            self.peak[self.now] = {"anon_gib": gib, "rss_gib": round(kb["VmRSS"] / 2**20, 2), "layer": self.layer}
        if self.layer is not None:  # a layer's least and most: memory that stays from layer to layer shows as growth
            low, high = self.by_layer.get(self.layer, (gib, gib))
            self.by_layer[self.layer] = (min(low, gib), max(high, gib))


def run(quantize_args: list[str]) -> dict:
    output = Path(_option(quantize_args, "--output") or "")
    cmd = [sys.executable, "-m", "quantize_tools.cli", *quantize_args]
    load_before = os.getloadavg()
    t = time.time()
    stages = Stages()
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE)
    reader = threading.Thread(target=stages.follow, args=(proc.stderr,), daemon=True)
    reader.start()
    mem = watch(proc, interval=1.0, on_sample=stages.sample)
    reader.join(timeout=10)
    wall = time.time() - t
    session = {"command": ["kbvq-quantize", *quantize_args], "returncode": proc.returncode, "wall_s": round(wall, 1),
               "peak_rss_gib": mem["total"]["VmRSS"], "peak_anon_gib": mem["total"]["RssAnon"],
               "peak_file_mapped_gib": mem["total"]["RssFile"],
               "peak_anon_gib_by_stage": dict(sorted(stages.peak.items(), key=lambda kv: -kv[1]["anon_gib"])),
               "anon_gib_by_layer": {str(k): {"min": lo, "max": hi} for k, (lo, hi) in sorted(stages.by_layer.items())},
               "load_avg_before": load_before, "load_avg_after": os.getloadavg()}
    report_file = output / "kbvq_report.json"
    if proc.returncode == 0 and report_file.is_file():
        report = json.loads(report_file.read_text())
        session["layer_seconds"] = {str(r["layer"]): r.get("seconds") for r in report["layers"]}
        session["disk_written_bytes"] = _dir_bytes(output)
        session["report_run"] = report.get("run")
        summary = report.get("summary", {})
        session["summary"] = {k: summary.get(k) for k in ("expert_bits_per_weight", "checkpoint_bytes",
                                                          "unquantized_bf16_bytes", "mean_output_rel_err")}
    return session


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    ap = argparse.ArgumentParser(usage="%(prog)s --out FILE -- KBVQ-QUANTIZE ARGS", description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="record file (JSON); an existing one gains this session")
    args = ap.parse_args(argv[:cut])
    if cut == len(argv):
        ap.error("give kbvq-quantize's arguments after --")
    session = run(argv[cut + 1:])
    record = json.loads(args.out.read_text()) if args.out.is_file() else {"machine": describe(), "sessions": []}
    record["sessions"].append(session)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1))
    print(json.dumps({k: v for k, v in session.items() if k != "layer_seconds"}, indent=1))
    return session["returncode"]


if __name__ == "__main__":
    sys.exit(main())
