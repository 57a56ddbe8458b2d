"""The ``torch.ops.kbvq`` custom ops and the one place that decides which implementation runs.

``torch.ops.kbvq.moe`` and ``torch.ops.kbvq.linear`` are what the vLLM methods call: custom ops,
so torch.compile treats them as opaque and a CUDA graph sees one call. Each call asks
:func:`select` for an implementation from the op, the input's device and its shape (token-expert
pairs per local expert), as AQLM's kernel table does; nothing else in the package chooses.
``KBVQ_DISABLE_TRITON=1`` keeps CUDA on the torch path, ``KBVQ_CPU_KERNELS=0`` the CPU (for
comparisons and debugging). The CPU kernels read codes in their own layout, which the loaders make
when :func:`uses_cpu_kernels` says so; tensors in the plain runtime layout run the torch path.
A layer whose weights are fixed asks :func:`bind` once instead: codes in the CPU layout get the
native op itself, so a compiled graph calls C++ with no Python in between.
"""
from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable

import torch

from . import cpu_moe
from .torch_moe import kbvq_linear_torch, kbvq_moe_torch, kbvq_moe_torch_static

logger = logging.getLogger(__name__)

__all__ = ["select", "bind", "triton_block_m", "uses_cpu_kernels", "cpu_gemm_min_tokens", "DECODE_MAX_PAIRS_PER_EXPERT",
           "CPU_GEMM_MIN_TOKENS", "CPU_GEMM_MIN_TOKENS_SMALL", "CPU_GEMM_SMALL_ROWS", "moe", "linear"]

# The Triton GEMV kernel while the average local expert gets at most this many (token, expert)
# pairs, the grouped GEMM above. Provisional, not yet measured on a GPU:
# benchmarks/moe_kernels.py (its --out JSON record) is what should set it.
DECODE_MAX_PAIRS_PER_EXPERT = 1
# Grouped GEMM: pairs per block by pairs per expert. Each block decodes its expert's weights again,
# so larger blocks amortise decoding, but padding every expert's run to the block wastes work.
# Provisional as above (benchmarks/moe_kernels.py).
BLOCK_M_SMALL, BLOCK_M_SMALL_UP_TO = 16, 16
BLOCK_M_LARGE, BLOCK_M_LARGE_FROM = 128, 128
BLOCK_M_MEDIUM = 64

# CPU kernels: an expert (or shared linear) with at least this many tokens has its codes decoded once
# and multiplied by a GEMM (bf16 tiles on AMX where the CPU has it, else torch's GEMM a tile at a
# time); below, each token reads the codes through its own lookup table (or gathers, 16-bit codes).
# Keyed by (instruction set, bytes per code): the crossover of the two, bf16, one thread, cold
# caches, one expert at Qwen1.5-MoE's and Mixtral's shapes (8-bit codes: 4.5-5 and 5-6 tokens;
# 16-bit: ~5 and 6-8). Matrices of fewer rows than CPU_GEMM_SMALL_ROWS (the testbed's 144) pay for
# a token's tables with fewer lookups, so the GEMM wins sooner there (8-bit: ~3 tokens).
# benchmarks/cpu_kernels.py times both regimes around the switch point at every supported shape
# (results in benchmarks/results/cpu_kernels.json).
# AVX2 (Zen 3, measured 2026-12-07, one thread): vectors of 4 run one codeword-FMA kernel in both
# regimes (faster than tables at every token count there), so the switch point only matters for other
# vector lengths: 8-bit codes of d = 2 (4-bit) cross over at ~4 tokens (Qwen1.5-MoE's expert) and
# ~3 (the testbed's); 16-bit codes of d = 8 always take the float32 tile GEMM (a 65,536-entry table
# per sub-vector costs 4-60x more).
CPU_GEMM_MIN_TOKENS = {("amx", 1): 5, ("amx", 2): 8, ("avx2", 1): 4, ("avx2", 2): 1}
CPU_GEMM_SMALL_ROWS = 512
CPU_GEMM_MIN_TOKENS_SMALL = {("amx", 1): 3, ("avx2", 1): 3}
CPU_GEMM_MIN_TOKENS_OTHER = 12  # torch's GEMM on decoded tiles: the crossover at Qwen1.5-MoE's shape


def cpu_gemm_min_tokens(codes: torch.Tensor) -> int:
    """The CPU kernels' switch point for ``codes`` (in :func:`.cpu_moe.cpu_layout`: their width and rows
    per matrix) on this CPU's instruction set."""
    key, rows = (cpu_moe.isa(), codes.element_size()), codes.shape[-3] * cpu_moe.ROWS_PER_BLOCK
    if rows < CPU_GEMM_SMALL_ROWS and key in CPU_GEMM_MIN_TOKENS_SMALL:
        return CPU_GEMM_MIN_TOKENS_SMALL[key]
    return CPU_GEMM_MIN_TOKENS.get(key, CPU_GEMM_MIN_TOKENS_OTHER)


# op -> implementation where no kernel applies: the CPU, or CUDA without Triton
_TORCH: dict[str, dict[str, Callable[..., torch.Tensor]]] = {
    "cpu": {"moe": kbvq_moe_torch, "linear": kbvq_linear_torch},
    "cuda": {"moe": kbvq_moe_torch_static, "linear": kbvq_linear_torch},  # no host syncs
}


def triton_block_m(pairs: int, n_local: int) -> int | None:
    """The Triton kernel for ``pairs`` (token, expert) pairs over ``n_local`` experts: ``None`` for the
    GEMV, else the grouped GEMM's pairs per block."""
    per_expert = pairs / n_local
    if per_expert <= DECODE_MAX_PAIRS_PER_EXPERT:
        return None
    if per_expert <= BLOCK_M_SMALL_UP_TO:
        return BLOCK_M_SMALL
    return BLOCK_M_MEDIUM if per_expert < BLOCK_M_LARGE_FROM else BLOCK_M_LARGE


@functools.cache
def _triton():
    """The Triton kernels module, or None when triton is missing or ``KBVQ_DISABLE_TRITON=1``."""
    if os.environ.get("KBVQ_DISABLE_TRITON", "0") not in ("", "0"):
        return None
    try:
        from . import triton_moe
    except ImportError as e:
        logger.warning("KBVQ: triton is not importable (%s); CUDA runs the slower torch path", e)
        return None
    return triton_moe


def uses_cpu_kernels(device: torch.device) -> bool:
    """Whether weights loaded onto ``device`` should take the CPU kernels' code layout
    (:func:`.cpu_moe.cpu_layout`): a CPU device, with the kernels built."""
    return torch.device(device).type == "cpu" and cpu_moe.available()


def select(op: str, device: torch.device, pairs: int, n_local: int) -> Callable[..., torch.Tensor]:
    """The implementation of ``op`` ("moe" or "linear") on codes in the runtime layout, for inputs on
    ``device`` with ``pairs`` (token, expert) pairs over ``n_local`` local experts (a linear: tokens
    over one). Codes in the CPU kernels' layout go through :func:`bind`."""
    if device.type == "cuda" and (kernels := _triton()) is not None:
        fn = kernels.kbvq_moe_triton if op == "moe" else kernels.kbvq_linear_triton
        return functools.partial(fn, block_m=triton_block_m(pairs, n_local))
    try:
        return _TORCH[device.type][op]
    except KeyError:
        raise NotImplementedError(f"no KBVQ {op} implementation for device type {device.type!r}") from None


def bind(op: str, codes: torch.Tensor) -> Callable[..., torch.Tensor]:
    """What a layer holding ``codes`` calls for ``op`` ("moe" or "linear"), chosen once at load: codes in
    the CPU kernels' layout get the native ``torch.ops.kbvq_cpu`` op with its switch point bound (the
    ``torch.ops.kbvq`` custom op would run ~75 µs of Python per call around a kernel that takes
    10-40 µs at small shapes); other codes get the ``torch.ops.kbvq`` custom op, which selects per call."""
    if cpu_moe.is_cpu_layout(codes, moe=op == "moe"):
        if codes.device.type != "cpu" or not cpu_moe.available():
            raise RuntimeError(f"KBVQ codes in the CPU kernels' layout on {codes.device}, "
                               "where those kernels do not run")
        return functools.partial(getattr(torch.ops.kbvq_cpu, op), gemm_min_tokens=cpu_gemm_min_tokens(codes))
    return getattr(torch.ops.kbvq, op)


def _moe(x, topk_weights, topk_ids, expert_map, *groups):
    if cpu_moe.is_cpu_layout(groups[0], moe=True):
        return bind("moe", groups[0])(x, topk_weights, topk_ids, expert_map, *groups)
    return select("moe", x.device, topk_ids.numel(), groups[0].shape[0])(x, topk_weights, topk_ids, expert_map, *groups)


def _linear(x, *tensors):
    if cpu_moe.is_cpu_layout(tensors[0], moe=False):
        return bind("linear", tensors[0])(x, *tensors)
    return select("linear", x.device, x.numel() // x.shape[-1], 1)(x, *tensors)


def _custom_op(op: str, impl, signature: Callable[..., torch.Tensor]):
    """``torch.ops.kbvq.<op>`` running ``impl``, with ``signature``'s schema (the torch implementation's)."""
    return torch.library.custom_op(f"kbvq::{op}", impl, mutates_args=(),
                                   schema=torch.library.infer_schema(signature, mutates_args=()))


moe = _custom_op("moe", _moe, kbvq_moe_torch)
moe.register_fake(lambda x, *args: torch.empty_like(x))
linear = _custom_op("linear", _linear, kbvq_linear_torch)
# output features from affine_s, one per row whatever the codes' layout
linear.register_fake(lambda x, idx, codebook, lr_a, lr_b, affine_s, affine_b: x.new_empty(*x.shape[:-1], affine_s.shape[0]))
