"""What a measurement ran on, recorded beside its figures: timings from two records compare only on one machine.

``platform.processor()`` says only ``x86_64`` on Linux, which cannot tell two shared machines apart, so
the CPU's model name comes from ``/proc/cpuinfo`` where there is one.
"""
from __future__ import annotations

import os
import platform

__all__ = ["cpu_name", "describe", "machine"]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        name = None
    return name or platform.processor() or platform.machine()


def machine() -> dict:
    return {"cpu": cpu_name(), "cores": os.cpu_count()}


def describe() -> str:
    """One line for a benchmark record, e.g. ``AMD EPYC, 2 CPUs``."""
    return f"{cpu_name()}, {os.cpu_count()} CPUs"
