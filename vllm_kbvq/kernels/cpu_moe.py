"""The native CPU kernels (C++ in ``cpu/``): build, load, layout and the Python entry points.

The sources are compiled at first use with torch's extension tools (ninja and the system C++
compiler, which vLLM's CPU backend needs anyway) into a cache directory keyed by the sources and
the torch version; ``python -m vllm_kbvq.kernels.cpu_moe`` builds them ahead of time (``make
install`` and the CPU image do). If the build fails the package warns once and stays on the
torch path of :mod:`.torch_moe`, which is also the oracle the kernels are tested against.

``KBVQ_CPU_KERNELS=0`` keeps the torch path; ``KBVQ_CPU_ISA`` forces an instruction-set path
(``amx``, ``avx512``, ``avx2``, ``portable``; default ``auto``, the best this CPU runs: ``amx`` is
``avx512`` plus bf16 GEMMs on the AMX tile unit, where the CPU has it and Linux grants it).

The kernels read codes in their own layout, made once at load by :func:`cpu_layout`:
``[..., S, blocks, n, 64]``, 64 rows of one sub-vector contiguous, so one byte permute (or one
gather) looks up 64 rows.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import sys
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

__all__ = ["available", "load", "isa", "set_isa", "available_isas", "cpu_layout", "is_cpu_layout", "kbvq_moe_cpu",
           "kbvq_linear_cpu", "ROWS_PER_BLOCK"]

SOURCE_DIR = Path(__file__).with_name("cpu")
SOURCES = ("moe_op.cpp", "isa_portable.cpp", "isa_avx2.cpp", "isa_avx512.cpp")
ROWS_PER_BLOCK = 64  # rows one lookup covers; the layout pads each shard to a multiple of it
# -fopenmp: at::parallel_for is a header template that runs serially unless the extension itself is
# built with OpenMP; the library then links libgomp.so.1, the soname torch has already loaded, so
# the kernels share torch's intra-op thread pool instead of starting a second one.
CFLAGS = ("-O3", "-std=c++17", "-fopenmp")
LDFLAGS = ("-fopenmp",)


def _disabled() -> bool:
    return os.environ.get("KBVQ_CPU_KERNELS", "1") in ("0", "false", "no")


def build_dir() -> Path:
    """Where the compiled library lives: ``$KBVQ_CACHE_DIR`` (default ``~/.cache/vllm_kbvq``), then one
    folder per source, flags and torch version, so an upgrade rebuilds instead of loading a stale library."""
    h = hashlib.sha256(" ".join((torch.__version__, *CFLAGS, *LDFLAGS)).encode())
    for name in (*SOURCES, "kernels.h"):
        h.update((SOURCE_DIR / name).read_bytes())
    root = Path(os.environ.get("KBVQ_CACHE_DIR") or Path.home() / ".cache" / "vllm_kbvq")
    return root / f"cpu_kernels-{h.hexdigest()[:16]}"


def _compile(verbose: bool = False) -> None:
    from torch.utils import cpp_extension

    out = build_dir()
    out.mkdir(parents=True, exist_ok=True)
    # torch's loader takes a file lock in the build folder, so concurrent processes (tensor-parallel
    # workers) build once and the others wait for it.
    cpp_extension.load(name="kbvq_cpu_" + out.name.split("-")[-1], sources=[str(SOURCE_DIR / s) for s in SOURCES],
                       extra_cflags=list(CFLAGS), extra_ldflags=list(LDFLAGS), build_directory=str(out),
                       is_python_module=False,
                       verbose=verbose)


def _register_fakes() -> None:
    """Shape functions of the native ops, so torch.compile traces a model that calls them directly."""
    torch.library.register_fake("kbvq_cpu::moe")(lambda x, *args: torch.empty_like(x))
    torch.library.register_fake("kbvq_cpu::linear")(
        lambda x, codes, codebook, lr_a, lr_b, affine_s, *args: x.new_empty(*x.shape[:-1], affine_s.shape[0]))


@functools.cache
def load() -> bool:
    """Build (first use) and load the kernels; False, with one warning, where that fails or is turned off."""
    if _disabled():
        return False
    try:
        _compile()
        _register_fakes()
        choice = os.environ.get("KBVQ_CPU_ISA", "auto") or "auto"
        torch.ops.kbvq_cpu.set_isa(choice)
    except Exception as e:  # a missing compiler, ninja or header: the torch path still works
        logger.warning("KBVQ: the native CPU kernels are unavailable (%s); CPU inference runs the slower torch "
                       "path. `python -m vllm_kbvq.kernels.cpu_moe --verbose` shows the build.", str(e).strip()[:500])
        return False
    return True


def available() -> bool:
    return load()


def isa() -> str:
    return torch.ops.kbvq_cpu.isa()


def set_isa(name: str) -> str:
    """Force an instruction-set path (``auto`` for the best); returns the one in use."""
    return torch.ops.kbvq_cpu.set_isa(name)


def available_isas() -> list[str]:
    return torch.ops.kbvq_cpu.available_isas().split(",")


def is_cpu_layout(codes: torch.Tensor, moe: bool) -> bool:
    return codes.dim() == (5 if moe else 4) and codes.shape[-1] == ROWS_PER_BLOCK


def cpu_layout(codes: torch.Tensor, shards: int) -> torch.Tensor:
    """Runtime indices ``[..., rows, n]`` (of :meth:`vllm_kbvq.plugin.layout.GroupLayout.shapes`, ``shards``
    equal fused matrices) -> the kernels' ``[..., shards, blocks, n, 64]``, each shard's rows padded
    with code 0 to whole blocks; uint8 for 8-bit indices, else int16 holding uint16."""
    *lead, rows, n = codes.shape
    if rows % shards:
        raise ValueError(f"{rows} rows do not split into {shards} equal matrices")
    per = rows // shards
    blocks = -(-per // ROWS_PER_BLOCK)
    if codes.dtype != torch.uint8:
        if codes.numel() and int(codes.max()) > 0xFFFF:
            raise ValueError("indices above 16 bits have no CPU kernel")
        codes = codes.to(torch.int32).where(codes < 0x8000, codes.to(torch.int32) - 0x10000).to(torch.int16)
    x = codes.reshape(*lead, shards, per, n)
    if blocks * ROWS_PER_BLOCK != per:
        x = torch.nn.functional.pad(x, (0, 0, 0, blocks * ROWS_PER_BLOCK - per))
    return x.reshape(*lead, shards, blocks, ROWS_PER_BLOCK, n).transpose(-1, -2).contiguous()


def kbvq_moe_cpu(x, topk_weights, topk_ids, expert_map, *groups, gemm_min_tokens: int) -> torch.Tensor:
    """:func:`.torch_moe.kbvq_moe_torch` (same arguments) on the native kernels, codes in :func:`cpu_layout`."""
    return torch.ops.kbvq_cpu.moe(x, topk_weights, topk_ids, expert_map, *groups, gemm_min_tokens)


def kbvq_linear_cpu(x, idx, codebook, lr_a, lr_b, affine_s, affine_b, *, gemm_min_tokens: int) -> torch.Tensor:
    """:func:`.torch_moe.kbvq_linear_torch` on the native kernels, codes in :func:`cpu_layout`."""
    return torch.ops.kbvq_cpu.linear(x, idx, codebook, lr_a, lr_b, affine_s, affine_b, gemm_min_tokens)


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m vllm_kbvq.kernels.cpu_moe",
                                description="Build the KBVQ native CPU kernels now (they are otherwise built at "
                                            "first use) and print the instruction-set paths this CPU runs.")
    p.add_argument("--verbose", action="store_true", help="show the compiler's output")
    a = p.parse_args(argv)
    if _disabled():
        print("KBVQ_CPU_KERNELS=0: the native kernels are turned off", file=sys.stderr)
        return 1
    _compile(verbose=a.verbose)
    torch.ops.kbvq_cpu.set_isa("auto")
    print(f"KBVQ CPU kernels built in {build_dir()}; instruction sets: {', '.join(available_isas())} "
          f"(using {isa()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
