"""What a quantization run can be asked to do: the options, their defaults and their valid ranges, and
the compute it runs on (device, CPU threads).

Kept free of torch so ``kbvq-quantize --help`` and option errors answer at once; the command line
reads its defaults from here, and the pipeline checks a run's options here before any work.

CPU threads, for the quantizer on machines it shares with other work:CPU threads for the quantizer on machines it shares with other work.

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
from dataclasses import dataclass
from pathlib import Path

__all__ = ["LayerOptions", "QuantizeOptions", "QuantizeError", "VQ_METHODS", "SCALAR_METHODS", "METHODS",
           "check_option", "check_device", "default_vector_dim", "configure_openmp", "available_cpus"]

VQ_METHODS = ("kmeans", "gptvq")  # nearest k-means codeword, or Hessian-aware assignment (quantize_tools.method.gptq)
SCALAR_METHODS = ("rtn", "gptq")  # the per-group scalar baselines (quantize_tools.method.scalar)
METHODS = ("kbvq",) + SCALAR_METHODS


class QuantizeError(ValueError):
    """A run that cannot start or finish as asked (bad option, output location, input model)."""


def check_option(opts, name: str, ok: bool, want: str) -> None:
    if not ok:
        raise QuantizeError(f"--{name.replace('_', '-')} must be {want}, got {getattr(opts, name)!r}")


def check_device(spec: str | None):
    """The torch device to compute on (``None``: CUDA if there is one), or an error naming ``--device``."""
    import torch  # here, not at the top: this module answers --help without torch

    if spec is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError, ValueError):
        raise QuantizeError(f"--device {spec!r} is not a device name: use cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise QuantizeError(f"--device {spec}: only cpu and cuda are supported")
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise QuantizeError(f"--device {spec}: no CUDA device is available (torch {torch.__version__} is {build}); "
                            "use --device cpu")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise QuantizeError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


KMEANS_SAMPLE = 0  # fit on all: a sample was measured 0.8 % worse in output error at Qwen1.5-MoE's shapes


def default_vector_dim(bits: int) -> int:
    """Vectors of 4 up to 3 bits (a 256- or 4096-entry codebook per matrix), of 2 above (4 bits: 256 entries,
    where vectors of 4 would need 65,536)."""
    return 4 if bits <= 3 else 2


@dataclass
class LayerOptions:
    bits: int = 2
    vector_dim: int | None = None  # None: default_vector_dim(bits)
    rank_ratio: float = 1 / 128
    idre: bool = True
    klt: bool = True  # False: plain SVD of the stacked weights (ablation)
    bcos: bool = True
    bcos_mode: str = "moment"
    bcos_min_tokens: int = 16
    damp: float = 1e-2
    kmeans_iters: int = 100
    # vectors per matrix the Lloyd iterations fit (at least 256 per codeword; 0: all); every vector is then
    # assigned. The testbeds' matrices hold fewer than 131,072 at every default width.
    kmeans_sample: int = KMEANS_SAMPLE
    vq_method: str = "kmeans"
    compare_plain_vq: bool = True
    seed: int = 42
    row_scale: bool = False  # normalise each residual row before k-means (folded into affine_s and lr_a)
    finetune_steps: int = 0  # Adam steps on the block-output error after the codes are fixed (0: none)
    finetune_lr: float = 1e-2  # relative: each tensor's step is this times its initial RMS (affine_s: absolute)
    finetune_batch: int = 1024  # calibration tokens per step
    finetune_reassign: bool = False  # after tuning, move each vector to its nearest tuned codeword
    # mixed precision: average bits per expert weight to allocate over the candidate widths (None: --bits)
    bits_budget: float | None = None
    candidate_widths: tuple[tuple[int, int], ...] = ((2, 4), (3, 2), (4, 2))  # (bits, vector_dim)

    def __post_init__(self):
        if self.vector_dim is None:
            self.vector_dim = default_vector_dim(self.bits)

    def validate(self) -> None:
        """Ranges of the options, as errors that name the command-line flag."""
        check_option(self, "bits", 1 <= self.bits <= 8, "an integer 1..8")
        # a power of 2: the GPU kernels load one vector with tl.arange, which takes powers of 2 only
        check_option(self, "vector_dim", self.vector_dim >= 1 and not self.vector_dim & (self.vector_dim - 1),
                     "a power of 2 (1, 2, 4, 8, ...)")
        if self.bits * self.vector_dim > 16:
            raise QuantizeError(f"--bits {self.bits} with --vector-dim {self.vector_dim} needs a "
                                f"2^{self.bits * self.vector_dim}-entry codebook per matrix; use a smaller --vector-dim")
        check_option(self, "rank_ratio", 0 <= self.rank_ratio <= 1, "between 0 and 1")
        check_option(self, "damp", math.isfinite(self.damp) and self.damp > 0, "a number > 0")
        check_option(self, "kmeans_iters", self.kmeans_iters >= 1, "a positive integer")
        check_option(self, "kmeans_sample", self.kmeans_sample >= 0, "an integer >= 0")
        check_option(self, "bcos_min_tokens", self.bcos_min_tokens >= 1, "a positive integer")
        check_option(self, "bcos_mode", self.bcos_mode in ("moment", "lstsq"), "moment or lstsq")
        check_option(self, "vq_method", self.vq_method in VQ_METHODS, " or ".join(VQ_METHODS))
        check_option(self, "seed", 0 <= self.seed < 2**63, "an integer >= 0")
        check_option(self, "finetune_steps", self.finetune_steps >= 0, "an integer >= 0")
        check_option(self, "finetune_lr", math.isfinite(self.finetune_lr) and self.finetune_lr > 0, "a number > 0")
        check_option(self, "finetune_batch", self.finetune_batch >= 1, "a positive integer")
        if self.bits_budget is not None:
            check_option(self, "bits_budget", math.isfinite(self.bits_budget) and self.bits_budget > 0, "a number > 0")
            widths = self.candidate_widths
            check_option(self, "candidate_widths", len(widths) >= 2 and len(set(widths)) == len(widths),
                         "at least two different widths")
            for bits, d in widths:
                check_option(self, "candidate_widths", 1 <= bits <= 8 and d >= 1 and not d & (d - 1) and bits * d <= 16,
                             "widths BITSxD with bits 1..8, D a power of 2 and bits*D <= 16")


@dataclass
class QuantizeOptions(LayerOptions):
    nsamples: int = 128
    seqlen: int = 512
    batch_size: int = 4  # calibration samples per forward
    device: str = "cpu"
    method: str = "kbvq"  # or a scalar baseline: "rtn", "gptq"
    group_size: int = 128  # scalar baselines only

    def validate(self) -> None:
        super().validate()
        for name in ("nsamples", "batch_size", "group_size"):
            check_option(self, name, getattr(self, name) >= 1, "a positive integer")
        check_option(self, "seqlen", self.seqlen >= 2, "an integer >= 2")
        check_option(self, "method", self.method in METHODS, " or ".join(METHODS))
        if self.method != "kbvq":
            for name, off in (("finetune_steps", 0), ("row_scale", False), ("bits_budget", None)):
                if getattr(self, name) != off:
                    raise QuantizeError(f"--{name.replace('_', '-')} applies to --method kbvq only, not "
                                        f"{self.method}")


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
