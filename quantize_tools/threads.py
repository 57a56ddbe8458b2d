"""CPU threads for the quantizer on machines it shares with other work.

A layer's quantization is thousands of small torch and faiss ops, each an OpenMP parallel
region. OpenMP workers that spin at the end of each region (libgomp's default, when
``OMP_WAIT_POLICY`` is unset, spins a while before it sleeps) lose their core to any other busy
process and then hold up the region for a scheduler time slice. Measured on the 2-core dev machine,
the first two layers of the demo testbed (2 threads, seconds per layer): libgomp's default 14
idle, 37 beside one process spinning a core, 155 beside a test run; ``GOMP_SPINCOUNT=20000`` 14 /
37; ``OMP_WAIT_POLICY=PASSIVE`` (waiting workers sleep at once) 13-16 idle, 25 beside the
spinning process. ``benchmarks/busy_cpu.py`` measures the whole 30-layer run with the policy set
here. The policy is read once, when torch loads OpenMP, so it is set before torch is imported.

The thread count follows the CPUs this process may use (affinity mask, cgroup CPU quota), capped
by torch's default (the machine's physical cores, which a CPU-limited container over-counts).
"""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path

__all__ = ["configure_openmp", "available_cpus"]


def configure_openmp() -> bool:
    """Make waiting OpenMP workers sleep, unless the user chose a policy; False if torch is already loaded."""
    if "torch" in sys.modules:
        return False
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return True


def _cgroup_quota() -> float | None:
    """CPUs granted by the cgroup CPU quota (v2 ``cpu.max`` or v1 ``cfs_quota_us``), None if unlimited."""
    try:
        text = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if text and text[0] != "max":
            return int(text[0]) / int(text[1])
        return None
    except (OSError, ValueError, IndexError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup quota (rounded down, at least 1)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        n = min(n, max(1, math.floor(quota)))
    return max(1, n)
