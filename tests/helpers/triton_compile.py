"""Compile the KBVQ Triton kernels for an sm_90 GPU (H100/H200) without one: ``python triton_compile.py``.

Run in its own process, without ``TRITON_INTERPRET`` (the interpreter replaces the
compiler). Catches what the interpreter accepts but the GPU compiler rejects (layouts,
dtypes of ``tl.dot``, constexpr use). Prints one line per configuration; exit 1 on failure.
"""
import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from vllm_kbvq.kernels import triton_moe as m

# integer arguments the launcher passes as multiples of 16 on real shapes (as a launch would specialise)
ALIGNED = {"stride_ie", "stride_ir", "stride_x", "stride_out", "n_in", "n_cols", "n_out", "rows_per_shard",
           "stride_ae", "stride_lr", "stride_le"}


def compile_kernel(kernel, pointers: dict[str, str], constexprs: dict, num_warps: int = 4):
    """Compile ``kernel`` with pointer element types ``pointers`` (default fp16), i32 scalars, ``constexprs``."""
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*" + pointers.get(name, "fp16")
        else:
            sig[name] = "i32"
    attrs = {(i,): [["tt.divisibility", 16]] for i, (n, t) in enumerate(sig.items()) if t[0] == "*" or n in ALIGNED}
    return triton.compile(ASTSource(kernel, sig, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": 3})


GEMV_PTRS = {"x_ptr": "fp32", "slot_ptr": "i32", "pw_ptr": "fp32", "bx_ptr": "fp32", "out_ptr": "fp32"}
GROUPED_PTRS = {"pairs_ptr": "i32", "block_slot_ptr": "i32", "pw_ptr": "fp32", "bx_ptr": "fp32", "out_ptr": "fp32"}
CONFIGS = [
    ("gemv 2-bit gate/up", m._vq_gemv, {**GEMV_PTRS, "idx_ptr": "u8"},
     dict(S=2, K=256, D=4, GATED=True, HAS_LR=True, HAS_WEIGHT=False, BLOCK_R=32, BLOCK_J=32, BLOCK_K=16), 4),
    ("gemv 3-bit down", m._vq_gemv, {**GEMV_PTRS, "idx_ptr": "i16"},
     dict(S=1, K=4096, D=4, GATED=False, HAS_LR=False, HAS_WEIGHT=True, BLOCK_R=32, BLOCK_J=32, BLOCK_K=2), 4),
    ("grouped bf16 2-bit gate/up m64", m._vq_grouped_gemm, {**GROUPED_PTRS, "x_ptr": "bf16", "idx_ptr": "u8"},
     dict(S=2, K=256, D=4, GATED=True, HAS_LR=True, HAS_WEIGHT=False, DOT=tl.bfloat16, PREC="tf32",
          BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, BLOCK_R=16), 4),
    ("grouped fp16 3-bit down m128", m._vq_grouped_gemm, {**GROUPED_PTRS, "x_ptr": "fp16", "idx_ptr": "i16"},
     dict(S=1, K=4096, D=4, GATED=False, HAS_LR=True, HAS_WEIGHT=True, DOT=tl.float16, PREC="tf32",
          BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, BLOCK_R=16), 8),
    ("grouped fp32 4-bit down m16", m._vq_grouped_gemm, {**GROUPED_PTRS, "x_ptr": "fp32", "idx_ptr": "u8"},
     dict(S=1, K=256, D=2, GATED=False, HAS_LR=False, HAS_WEIGHT=True, DOT=tl.float32, PREC="ieee",
          BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, BLOCK_R=16), 4),
]


def main() -> int:
    failed = 0
    for name, kernel, ptrs, const, warps in CONFIGS:
        try:
            compile_kernel(kernel, ptrs, const, warps)
            print(f"ok   {name}")
        except Exception as e:  # noqa: BLE001 - report every configuration
            failed += 1
            print(f"FAIL {name}: {type(e).__name__}: {str(e)[:2000]}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
