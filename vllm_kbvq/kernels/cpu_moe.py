"""The native CPU kernels (C++ in ``cpu/``): build, load, layout and the Python entry points.

The sources are compiled at first use with torch's extension tools (ninja and the system C++
compiler, which vLLM's CPU backend needs anyway) into a cache directory keyed by the sources and
the torch version; ``python -m vllm_kbvq.kernels.cpu_moe`` builds them ahead of time (``make
install`` and the CPU image do). If the build fails the package warns once and stays on the
torch path of :mod:`.torch_moe`, which is also the oracle the kernels are tested against.

One process builds, under an ``fcntl.flock`` beside the cache folder (released by the kernel when
its holder dies, however it is stopped), into a private folder renamed into place when complete;
the others wait for the lock, saying so on stderr, then load the finished library directly.

``KBVQ_CPU_KERNELS=0`` keeps the torch path; ``KBVQ_CPU_ISA`` forces an instruction-set path
(``amx``, ``avx512``, ``avx2``, ``portable``; default ``auto``, the best this CPU runs: ``amx`` is
``avx512`` plus bf16 GEMMs on the AMX tile unit, where the CPU has it and Linux grants it).

The kernels read codes in their own layout, made once at load by :func:`cpu_layout`:
``[..., S, blocks, n, 64]``, 64 rows of one sub-vector contiguous, so one byte permute (or one
gather) looks up 64 rows.
"""
from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import os
import shutil
import sys
import time
import uuid
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

__all__ = ["available", "load", "isa", "set_isa", "available_isas", "cpu_layout", "is_cpu_layout", "kbvq_moe_cpu",
           "kbvq_linear_cpu", "ROWS_PER_BLOCK"]

SOURCE_DIR = Path(__file__).with_name("cpu")
# One file per instruction set, each compiled for its own by a `#pragma GCC target` (kernels.h); all are
# built on every machine, and moe_op.cpp picks among them at run time from what the CPU has.
SOURCES = ("moe_op.cpp", "isa_portable.cpp", "isa_avx2.cpp", "isa_avx512.cpp", "isa_amx.cpp")
HEADERS = ("kernels.h", "isa_avx512_inline.h")  # included by the sources, so part of the build's key too
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
    for name in (*SOURCES, *HEADERS):
        h.update((SOURCE_DIR / name).read_bytes())
    root = Path(os.environ.get("KBVQ_CACHE_DIR") or Path.home() / ".cache" / "vllm_kbvq")
    return root / f"cpu_kernels-{h.hexdigest()[:16]}"


def lock_path() -> Path:
    """The build lock, beside :func:`build_dir`: an ``fcntl.flock`` that the kernel drops when its holder
    dies, whatever stopped it (SIGTERM, SIGKILL, the OOM killer), so a killed build never blocks a later one."""
    out = build_dir()
    return out.with_name(out.name + ".lock")


_STAMP = "complete"  # written last in the private folder, before it is moved into place


def _library(out: Path) -> Path:
    return out / f"kbvq_cpu_{out.name.split('-')[-1]}.so"  # cpp_extension names it <name>.so


def _ops_loaded() -> bool:
    """Whether this process has the kbvq_cpu ops already (loading the library twice registers them twice,
    which raises; ``python -m`` may import this module twice, as ``__main__`` and by its package name)."""
    try:
        return hasattr(torch.ops.kbvq_cpu, "isa")
    except RuntimeError:
        return False


def _is_built(out: Path) -> bool:
    return (out / _STAMP).is_file() and _library(out).is_file()


def _remove(path: Path) -> None:
    """Delete a build folder no one uses: renamed first to a temporary name (one the next builder clears if
    this process dies on the way), so nothing half-deleted keeps its name."""
    aside = path.with_name(f"{path.name.split('.tmp-')[0]}.tmp-stale-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, aside)
    except OSError:
        aside = path
    shutil.rmtree(aside, ignore_errors=True)


def _flock(fd: int, what: Path, poll_s: float = 0.5, say_every_s: float = 30.0) -> None:
    """Take the exclusive lock on ``fd``, saying on stderr (at once, then every ``say_every_s``) while another
    process holds it. The holder's death releases it, so this cannot outwait a dead process."""
    start, said = time.monotonic(), None
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        waited = time.monotonic() - start
        if said is None or waited - said >= say_every_s:
            try:
                holder = what.read_text().strip() or "?"
            except OSError:
                holder = "?"
            print(f"KBVQ: another process (pid {holder}) is building the native CPU kernels; waiting for its lock "
                  f"{what} ({waited:.0f} s so far; a build takes about a minute)", file=sys.stderr, flush=True)
            said = waited
        time.sleep(poll_s)


def _build(out: Path, verbose: bool) -> None:
    """Build into a private folder beside ``out`` and rename it to ``out`` when complete (the caller holds the
    lock). Loads the library into this process (from the private folder, the same file after the rename)."""
    from torch.utils import cpp_extension

    for stale in out.parent.glob(out.name + ".tmp-*"):  # builds that were killed: no one else builds now
        _remove(stale)
    if out.exists():  # a folder without the stamp: an older, non-atomic build, maybe interrupted
        _remove(out)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    print(f"KBVQ: building the native CPU kernels in {out} (once for these sources and this torch; about a "
          f"minute)", file=sys.stderr, flush=True)
    try:
        so = cpp_extension.load(name=_library(out).stem, sources=[str(SOURCE_DIR / s) for s in SOURCES],
                                extra_cflags=list(CFLAGS), extra_ldflags=list(LDFLAGS), build_directory=str(tmp),
                                is_python_module=False, verbose=verbose)
        if Path(so).name != _library(out).name:  # a versioned name (an earlier load of this name in-process)
            os.rename(so, tmp / _library(out).name)
        (tmp / _STAMP).write_text(f"{torch.__version__}\n")
        try:
            os.rename(tmp, out)
        except OSError:  # `out` made meanwhile by a process outside this lock (an older vllm_kbvq)
            if not _is_built(out):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _compile(verbose: bool = False) -> Path:
    """Load the kernels into this process, building them first where no complete build is cached; returns the
    library's path. A complete build folder only ever appears whole (renamed into place), so a process that
    finds one loads it without the build tools or a lock (vLLM's workers start fast)."""
    out = build_dir()
    if _ops_loaded():
        return _library(out)
    if not _is_built(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        lock = lock_path()
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)  # not inherited by the compilers
        try:
            _flock(fd, lock)
            if not _is_built(out):  # else another process built it while this one waited
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                _build(out, verbose)
                return _library(out)
        finally:
            os.close(fd)  # releases the lock
    torch.ops.load_library(str(_library(out)))
    return _library(out)


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
