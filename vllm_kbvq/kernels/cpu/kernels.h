// The instruction-set-specific kernels of the KBVQ CPU op, behind one table of function pointers.
//
// Each isa_*.cpp file defines one table, compiled for its instruction set with `#pragma GCC
// target` (isa_amx.cpp's is isa_avx512.cpp's with the AMX GEMM); they include no torch (or other
// C++ library) header, so no inline function compiled for AVX-512 can be picked by the linker for
// code that runs on a CPU without it.  Every file is compiled on every machine; moe_op.cpp picks
// the table at run time from what the CPU supports.
#pragma once
#include <stddef.h>
#include <stdint.h>

namespace kbvq {

// Codes of one matrix shard in the CPU layout: [blocks][n][64], block b holding rows 64b..64b+63,
// one code per (row, sub-vector j), 64 rows of one j contiguous (rows past the last are padding).
struct Codes {
  const void* data;
  int index_bytes;  // 1 (uint8) or 2 (uint16)
  int n;            // sub-vectors per row (input / d)
};

struct Kernels {
  const char* name;
  // For each of m tokens t: y[t][r] += sum_j <codebook[code(r, j)], x[t][j*d : j*d+d]> over the rows
  // of blocks [b0, b1), y[t] indexed from block b0's first row; token rows are ldx / ldy apart.
  // Each block's codes are read once for all m tokens.  codebook: [K][d] float16 bits.  exact: float32
  // tables (float32 activations); otherwise a path may use narrower tables that lose no more than
  // 16-bit activations already do.  scratch: scratch_bytes(n, K, d, m).
  void (*lut_matvec)(const Codes& codes, int b0, int b1, const uint16_t* codebook, int K, int d, int m,
                     const float* x, long ldx, float* y, long ldy, bool exact, void* scratch);
  size_t (*scratch_bytes)(int n, int K, int d, int m);
  // The rows of blocks [b0, b1) decoded and transposed for a GEMM: out[j*d + i][r] = codebook[code(r, j)][i]
  // for r from block b0's first row (out rows 64 (b1 - b0) apart), as float32 or (bf16) bfloat16.
  // cbt: the codebook as float32 planes [d][K].
  void (*decode_tile)(const Codes& codes, int b0, int b1, const float* cbt, int K, int d, bool bf16, void* out);
  // y[i] = sum_c a[i][c] x[c], a: [rows][cols] float16 bits, row stride lda.
  void (*gemv_f16)(const uint16_t* a, int rows, int cols, long lda, const float* x, float* y);
  // y[t][i] = sum_c a[i][c] bx[t][c] for m tokens (the low-rank term of a row block); nullptr: gemv_f16
  // per token.
  void (*lowrank)(const uint16_t* a, int rows, int r, long lda, int m, const float* bx, long ldbx, float* y, long ldy);
  // lut_matvec's result for many tokens, bfloat16 activations, d even: the codes decoded once and
  // multiplied on a matrix unit; nullptr where the instruction set has none (a torch GEMM then).
  void (*gemm_bf16)(const Codes& codes, int b0, int b1, const uint16_t* codebook, int K, int d, int m,
                    const float* x, long ldx, float* y, long ldy, void* scratch);
  size_t (*gemm_scratch_bytes)(int n, int K, int d, int m);
  // out[i] = float16 bits h[i] as float32, i < n.
  void (*f16_to_f32)(const uint16_t* h, int n, float* out);
  // The rows of blocks [b0, b1) decoded row-major, out[r][j*d + i] = codebook[code(r, j)][i] as float32
  // (rows n d apart), for a float32 GEMM against the tile transposed; cbf: the codebook as float32
  // [K][d].  nullptr: decode_tile's transposed tile instead.
  void (*decode_f32)(const Codes& codes, int b0, int b1, const float* cbf, int K, int d, float* out);
  // Vectors of this length take lut_matvec at every token count, its fastest many-token kernel too
  // (AVX2: codewords multiplied in directly); 0: none.
  int lut_all_tokens_d;
};

const Kernels* portable_kernels();
const Kernels* avx2_kernels();    // nullptr where not built (not x86-64)
const Kernels* avx512_kernels();  // nullptr where not built; needs AVX-512 F/BW/VL and VBMI
const Kernels* amx_kernels();     // avx512's, plus gemm_bf16 on AMX (isa_amx.cpp); nullptr where not built
bool amx_usable();                // the CPU has AMX-TILE and AMX-BF16 and the OS lets this process use them

float half_to_float(uint16_t h);
uint16_t float_to_bfloat16(float f);  // round to nearest even

}  // namespace kbvq
