// AMX kernels (AMX-TILE, AMX-BF16): the avx512 path of isa_avx512.cpp plus its many-token kernel,
// gemm_bf16, as decoded bfloat16 tiles multiplied by TDPBF16PS.  Only C headers here (see kernels.h).
//
// From a few tokens per expert on, decoding the codes once and multiplying on the AMX tile unit
// costs less than one lookup pass per token.  A 64-row block is decoded kAmxSteps k-steps (32
// inputs each) at a time into B tiles (VNNI: 16 rows of input pairs x 16 output rows, 1 KiB, in
// L1), and multiplied by 16 tokens at a time (activations rounded to bfloat16, padded to whole
// tiles).  The four B tiles of a step hold the block's rows in "quad" order: tile q, column c is row
// 16 (c / 4) + 4 q + c % 4, the order byte unpacking produces; results are put back in place.
//
// Compiled on every x86-64 machine, like isa_avx512.cpp (the build needs no AMX, only a compiler that
// knows its intrinsics); moe_op.cpp offers the "amx" path only where the CPU has AVX-512 and
// amx_usable() says the CPU has AMX and Linux lets this process use it.
#include "kernels.h"

#if defined(__x86_64__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

// The kernels, for AVX-512 and AMX; the two functions this file exports come after the pop below.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,fma,f16c,amx-tile,amx-bf16,avx512bf16")
#include <immintrin.h>

#include "isa_avx512_inline.h"

namespace kbvq {
namespace {

constexpr int kAmxSteps = 8;

struct alignas(64) TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

struct AmxWork {
  int in, kpad, mpad;  // inputs, inputs padded to 32, tokens padded to 16
  uint8_t* planes;     // 8-bit codes: [d / 2][4][256] bytes of each codeword pair's bfloat16 bits
  uint32_t* pairs;     // [K][d / 2] codeword pairs as bfloat16 x 2 (the codebook in bfloat16)
  uint16_t* xb;        // bfloat16 activations as A tiles [mpad / 16][kpad / 32][16][32], zero padded
  uint8_t* panel;      // [kAmxSteps][4][16][64] B tiles
  float* acc;          // [mpad / 16][4][16][16] results of each token group
};

inline size_t amx_round(size_t b) { return (b + 63) & ~(size_t)63; }

size_t amx_scratch_bytes(int n, int K, int d, int m) {
  const size_t in = (size_t)n * d, kpad = (in + 31) / 32 * 32, mpad = ((size_t)m + 15) / 16 * 16;
  return 64 + amx_round((size_t)(d / 2) * 1024) + amx_round((size_t)K * (d / 2) * 4) + amx_round(mpad * kpad * 2) +
         amx_round((size_t)kAmxSteps * 4096) + amx_round(mpad / 16 * 4096);
}

AmxWork amx_work(void* scratch, int n, int K, int d, int m) {
  AmxWork w;
  w.in = n * d;
  w.kpad = (w.in + 31) / 32 * 32;
  w.mpad = (m + 15) / 16 * 16;
  uint8_t* p = (uint8_t*)align64(scratch);
  w.planes = p, p += amx_round((size_t)(d / 2) * 1024);
  w.pairs = (uint32_t*)p, p += amx_round((size_t)K * (d / 2) * 4);
  w.xb = (uint16_t*)p, p += amx_round((size_t)w.mpad * w.kpad * 2);
  w.panel = p, p += amx_round((size_t)kAmxSteps * 4096);
  w.acc = (float*)p;
  return w;
}

// B-tile rows kp of k-step s for the 64 rows of sub-vector codes c (8-bit): input k = 32 s + 2 kp is
// component k % d of sub-vector k / d; the four bytes of its pair come from four table lookups.
// tt: the pair's four byte planes (4 registers each), held in registers across sub-vectors.
inline void pair_rows_u8(const uint8_t* c, const __m512i (&tt)[4][4], uint8_t* rows_q0, size_t q_stride) {
  const __m512i idx = _mm512_loadu_si512(c);
  const __mmask64 m = _mm512_movepi8_mask(idx);
  __m512i b[4];
  for (int i = 0; i < 4; ++i) b[i] = lookup(idx, m, tt[i]);
  const __m512i lo01 = _mm512_unpacklo_epi8(b[0], b[1]), hi01 = _mm512_unpackhi_epi8(b[0], b[1]);
  const __m512i lo23 = _mm512_unpacklo_epi8(b[2], b[3]), hi23 = _mm512_unpackhi_epi8(b[2], b[3]);
  // lane L of quad q: rows 16 L + 4 q .. + 3
  _mm512_store_si512(rows_q0, _mm512_unpacklo_epi16(lo01, lo23));
  _mm512_store_si512(rows_q0 + q_stride, _mm512_unpackhi_epi16(lo01, lo23));
  _mm512_store_si512(rows_q0 + 2 * q_stride, _mm512_unpacklo_epi16(hi01, hi23));
  _mm512_store_si512(rows_q0 + 3 * q_stride, _mm512_unpackhi_epi16(hi01, hi23));
}

// The same for 16-bit codes: each quad's 16 rows gathered as codeword pairs.
inline void pair_rows_u16(const uint16_t* c, const uint32_t* pairs, int dp, int p, uint8_t* rows_q0, size_t q_stride) {
  // quad q, column 4 L + r: row 16 L + 4 q + r (codes 0..31 in c0, 32..63 in c1: index bit 5 picks c1)
  alignas(64) static const uint16_t kSel[4][32] = {
      {0, 1, 2, 3, 16, 17, 18, 19, 32, 33, 34, 35, 48, 49, 50, 51},
      {4, 5, 6, 7, 20, 21, 22, 23, 36, 37, 38, 39, 52, 53, 54, 55},
      {8, 9, 10, 11, 24, 25, 26, 27, 40, 41, 42, 43, 56, 57, 58, 59},
      {12, 13, 14, 15, 28, 29, 30, 31, 44, 45, 46, 47, 60, 61, 62, 63}};
  const __m512i c0 = _mm512_loadu_si512(c), c1 = _mm512_loadu_si512(c + 32);
  for (int q = 0; q < 4; ++q) {
    const __m512i codes16 = _mm512_permutex2var_epi16(c0, _mm512_load_si512(kSel[q]), c1);
    __m512i idx = _mm512_cvtepu16_epi32(_mm512_castsi512_si256(codes16));
    if (dp > 1) idx = _mm512_add_epi32(_mm512_mullo_epi32(idx, _mm512_set1_epi32(dp)), _mm512_set1_epi32(p));
    _mm512_store_si512(rows_q0 + q * q_stride, _mm512_i32gather_epi32(idx, pairs, 4));
  }
}

void gemm_amx(const Codes& codes, int b0, int b1, const uint16_t* codebook, int K, int d, int m, const float* x,
              long ldx, float* y, long ldy, void* scratch) {
  const int n = codes.n, dp = d / 2;
  AmxWork w = amx_work(scratch, n, K, d, m);
  // the codebook as bfloat16, [K][d]: read as uint32, component pairs (2p, 2p + 1) in VNNI order.
  // Vectorised: every call converts a whole codebook, and small experts make many calls.
  f16_to_bf16(codebook, (size_t)K * d, (uint16_t*)w.pairs);
  if (codes.index_bytes == 1)  // 8-bit codes: the pairs' four bytes as byte planes for the permutes
    for (int p = 0; p < dp; ++p) {
      uint8_t* pl = w.planes + (size_t)p * 1024;
      for (int k = 0; k < 256; k += 16) {
        const __mmask16 live = K - k >= 16 ? (__mmask16)0xffff : K > k ? (__mmask16)((1u << (K - k)) - 1) : 0;
        const __m512i idx = _mm512_add_epi32(_mm512_mullo_epi32(_mm512_add_epi32(_mm512_set1_epi32(k),
                                                                                 _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9,
                                                                                                   10, 11, 12, 13, 14, 15)),
                                                                _mm512_set1_epi32(dp)),
                                             _mm512_set1_epi32(p));
        const __m512i v = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live, idx, w.pairs, 4);
        for (int i = 0; i < 4; ++i) _mm_storeu_si128((__m128i*)(pl + 256 * i + k), _mm512_cvtepi32_epi8(_mm512_srli_epi32(v, 8 * i)));
      }
    }
  const int steps = w.kpad / 32, groups = w.mpad / 16;
  // activations as A tiles, [group][step][16 tokens][32 inputs]: each tile one contiguous KiB
  for (int t = 0; t < w.mpad; ++t)
    for (int i = 0; i < w.kpad; i += 16) {
      uint16_t* a = w.xb + (((size_t)(t / 16) * steps + i / 32) * 16 + t % 16) * 32 + i % 32;
      _mm256_storeu_si256((__m256i*)a, f32_to_bf16_16(x + (size_t)t * ldx + i, t < m ? w.in - i : 0));
    }
  // C and A tiles have as many rows as there are tokens (up to 16): the tile unit's time goes with them
  TileConfig cfg = {};
  cfg.palette = 1;
  for (int t = 0; t < 6; ++t) cfg.rows[t] = t < 5 && m < 16 ? m : 16, cfg.colsb[t] = 64;
  _tile_loadconfig(&cfg);
  const size_t q_stride = 1024, step_bytes = 4096;
  for (int b = b0; b < b1; ++b) {
    const uint8_t* cb8 = (const uint8_t*)codes.data + (size_t)b * n * 64 * codes.index_bytes;
    for (int s0 = 0; s0 < steps; s0 += kAmxSteps) {
      const int s1 = s0 + kAmxSteps < steps ? s0 + kAmxSteps : steps;
      // B-tile row kp of step s: inputs k = 32 s + 2 kp, k + 1, pair p = (k % d) / 2 of sub-vector k / d;
      // one pair's rows at a time, so its tables stay in registers
      for (int p = 0; p < dp; ++p) {
        __m512i tt[4][4];
        if (codes.index_bytes == 1)
          for (int i = 0; i < 4; ++i)
            for (int r = 0; r < 4; ++r) tt[i][r] = _mm512_load_si512(w.planes + (size_t)p * 1024 + 256 * i + 64 * r);
        for (int s = s0; s < s1; ++s)
          for (int kp = p; kp < 16; kp += dp) {  // kp % dp == p
            uint8_t* row = w.panel + (size_t)(s - s0) * step_bytes + (size_t)kp * 64;
            const int k = 32 * s + 2 * kp, j = k / d;
            if (k >= w.in) {
              for (int q = 0; q < 4; ++q) _mm512_store_si512(row + q * q_stride, _mm512_setzero_si512());
            } else if (codes.index_bytes == 1) {
              pair_rows_u8(cb8 + (size_t)j * 64, tt, row, q_stride);
            } else {
              pair_rows_u16((const uint16_t*)cb8 + (size_t)j * 64, w.pairs, dp, p, row, q_stride);
            }
          }
      }
      for (int g = 0; g < groups; ++g) {
        float* acc = w.acc + (size_t)g * 1024;
        if (s0 == 0) {
          _tile_zero(0);
          _tile_zero(1);
          _tile_zero(2);
          _tile_zero(3);
        } else {
          _tile_loadd(0, acc, 64);
          _tile_loadd(1, acc + 256, 64);
          _tile_loadd(2, acc + 512, 64);
          _tile_loadd(3, acc + 768, 64);
        }
        for (int s = s0; s < s1; ++s) {
          const uint8_t* bt = w.panel + (size_t)(s - s0) * step_bytes;
          _tile_loadd(4, w.xb + ((size_t)g * steps + s) * 512, 64);
          _tile_loadd(5, bt, 64);
          _tile_dpbf16ps(0, 4, 5);
          _tile_loadd(5, bt + q_stride, 64);
          _tile_dpbf16ps(1, 4, 5);
          _tile_loadd(5, bt + 2 * q_stride, 64);
          _tile_dpbf16ps(2, 4, 5);
          _tile_loadd(5, bt + 3 * q_stride, 64);
          _tile_dpbf16ps(3, 4, 5);
        }
        _tile_stored(0, acc, 64);
        _tile_stored(1, acc + 256, 64);
        _tile_stored(2, acc + 512, 64);
        _tile_stored(3, acc + 768, 64);
      }
    }
    // acc[g][q][t][c]: token 16 g + t, row 16 (c / 4) + 4 q + c % 4 of the block
    for (int t = 0; t < m; ++t) {
      const float* a = w.acc + (size_t)(t / 16) * 1024 + (size_t)(t % 16) * 16;
      float* yt = y + t * ldy + (size_t)(b - b0) * 64;
      for (int q = 0; q < 4; ++q)
        for (int c = 0; c < 16; ++c) yt[16 * (c / 4) + 4 * q + c % 4] += a[q * 256 + c];
    }
  }
  _tile_release();
}

}  // namespace
}  // namespace kbvq
#pragma GCC pop_options

// Baseline x86-64 code from here: moe_op.cpp calls both functions on every CPU (amx_kernels() to list
// the paths, amx_usable() to ask whether bfloat16 GEMMs are native), so neither may hold an AVX-512
// instruction (copying the table below would be one, compiled for AVX-512).
namespace kbvq {

// AMX in the CPU (CPUID.7.0:EDX bits 22, 24) and the kernel's permission for this process to use
// the tile state (Linux asks for it once per process: arch_prctl ARCH_REQ_XCOMP_PERM).
bool amx_usable() {
  unsigned a, b, c, dx;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &dx) || !(dx & (1u << 22)) || !(dx & (1u << 24))) return false;
  unsigned long mask = 0;
  if (syscall(SYS_arch_prctl, 0x1022 /* ARCH_GET_XCOMP_PERM */, &mask) == 0 && (mask & (1ul << 18))) return true;
  return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
}

// avx512's table (lookups, decode, low-rank, conversions), with gemm_bf16 on the AMX tile unit
const Kernels* amx_kernels() {
  static const Kernels table = [] {
    Kernels t = *avx512_kernels();
    t.name = "amx";
    t.gemm_bf16 = gemm_amx;
    t.gemm_scratch_bytes = amx_scratch_bytes;
    return t;
  }();
  return &table;
}

}  // namespace kbvq

#else
namespace kbvq {
const Kernels* amx_kernels() { return nullptr; }
bool amx_usable() { return false; }
}  // namespace kbvq
#endif
