// Portable C++ kernels: any CPU (the aarch64 path, and x86-64 without AVX2). Plain loops the
// compiler may vectorise; a float32 lookup table, so no precision is lost beyond float32 sums.
#include <string.h>

#include "kernels.h"

namespace kbvq {

float half_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);  // inf, nan
  } else if (exp) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (!man) {
    bits = sign;
  } else {  // subnormal: normalise
    exp = 113;
    while (!(man & 0x400u)) {
      man <<= 1;
      --exp;
    }
    bits = sign | (exp << 23) | ((man & 0x3ffu) << 13);
  }
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
}

uint16_t float_to_bfloat16(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  // nan stays nan
  return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

namespace {

// Sub-vectors per pass: about 16 KiB of float32 table per token, so the tables stay in cache while
// every row block reads them, and each block's codes for the pass stay in L1 across the tokens.
int chunk_of(int K) { return K >= 4096 ? 1 : 4096 / K; }

size_t scratch_bytes(int n, int K, int d, int m) {
  (void)n;
  return sizeof(float) * ((size_t)K * d + (size_t)m * chunk_of(K) * K);
}

template <typename Idx>
void lut_rows(const Idx* codes, int n, int b0, int b1, const float* cb, int K, int d, int m, const float* x, long ldx,
              float* y, long ldy, float* tables) {
  const int jc = chunk_of(K);
  const size_t per_token = (size_t)jc * K;
  for (int j0 = 0; j0 < n; j0 += jc) {
    const int j1 = j0 + jc < n ? j0 + jc : n;
    for (int t = 0; t < m; ++t)
      for (int j = j0; j < j1; ++j) {  // tables[t][j - j0][k] = <codebook[k], x_t,j>
        float* tab = tables + t * per_token + (size_t)(j - j0) * K;
        const float* xj = x + t * ldx + (size_t)j * d;
        for (int k = 0; k < K; ++k) {
          float s = 0.f;
          for (int i = 0; i < d; ++i) s += cb[k * d + i] * xj[i];
          tab[k] = s;
        }
      }
    for (int b = b0; b < b1; ++b) {
      const Idx* cbk = codes + (size_t)b * n * 64;
      for (int t = 0; t < m; ++t) {
        float* yb = y + t * ldy + (size_t)(b - b0) * 64;
        for (int j = j0; j < j1; ++j) {
          const float* tab = tables + t * per_token + (size_t)(j - j0) * K;
          const Idx* c = cbk + (size_t)j * 64;
          for (int r = 0; r < 64; ++r) yb[r] += tab[c[r]];
        }
      }
    }
  }
}

void lut_matvec(const Codes& codes, int b0, int b1, const uint16_t* codebook, int K, int d, int m, const float* x,
                long ldx, float* y, long ldy, bool exact, void* scratch) {
  (void)exact;  // float32 tables always
  float* cb = (float*)scratch;
  for (int i = 0; i < K * d; ++i) cb[i] = half_to_float(codebook[i]);
  float* tables = cb + (size_t)K * d;
  if (codes.index_bytes == 1)
    lut_rows((const uint8_t*)codes.data, codes.n, b0, b1, cb, K, d, m, x, ldx, y, ldy, tables);
  else
    lut_rows((const uint16_t*)codes.data, codes.n, b0, b1, cb, K, d, m, x, ldx, y, ldy, tables);
}

void gemv_f16(const uint16_t* a, int rows, int cols, long lda, const float* x, float* y) {
  for (int i = 0; i < rows; ++i) {
    const uint16_t* ai = a + (size_t)i * lda;
    float s = 0.f;
    for (int c = 0; c < cols; ++c) s += half_to_float(ai[c]) * x[c];
    y[i] = s;
  }
}

template <typename Idx>
void decode_rows(const Idx* codes, int n, int b0, int b1, const float* cbt, int K, int d, bool bf16, void* out) {
  const size_t ld = (size_t)(b1 - b0) * 64;
  for (int b = b0; b < b1; ++b)
    for (int j = 0; j < n; ++j) {
      const Idx* c = codes + ((size_t)b * n + j) * 64;
      for (int i = 0; i < d; ++i) {
        const float* plane = cbt + (size_t)i * K;
        const size_t o = ((size_t)j * d + i) * ld + (size_t)(b - b0) * 64;
        if (bf16)
          for (int r = 0; r < 64; ++r) ((uint16_t*)out)[o + r] = float_to_bfloat16(plane[c[r]]);
        else
          for (int r = 0; r < 64; ++r) ((float*)out)[o + r] = plane[c[r]];
      }
    }
}

void decode_tile(const Codes& codes, int b0, int b1, const float* cbt, int K, int d, bool bf16, void* out) {
  if (codes.index_bytes == 1)
    decode_rows((const uint8_t*)codes.data, codes.n, b0, b1, cbt, K, d, bf16, out);
  else
    decode_rows((const uint16_t*)codes.data, codes.n, b0, b1, cbt, K, d, bf16, out);
}

void f16_to_f32(const uint16_t* h, int n, float* out) {
  for (int i = 0; i < n; ++i) out[i] = half_to_float(h[i]);
}

template <typename Idx>
void decode_rows_f32(const Idx* codes, int n, int b0, int b1, const float* cbf, int d, float* out) {
  const size_t in = (size_t)n * d;
  for (int b = b0; b < b1; ++b)
    for (int j = 0; j < n; ++j) {
      const Idx* c = codes + ((size_t)b * n + j) * 64;
      for (int r = 0; r < 64; ++r) memcpy(out + ((size_t)(b - b0) * 64 + r) * in + (size_t)j * d, cbf + (size_t)c[r] * d,
                                          sizeof(float) * d);
    }
}

void decode_f32(const Codes& codes, int b0, int b1, const float* cbf, int K, int d, float* out) {
  (void)K;
  if (codes.index_bytes == 1)
    decode_rows_f32((const uint8_t*)codes.data, codes.n, b0, b1, cbf, d, out);
  else
    decode_rows_f32((const uint16_t*)codes.data, codes.n, b0, b1, cbf, d, out);
}

const Kernels kTable = {"portable", lut_matvec, scratch_bytes, decode_tile, gemv_f16, nullptr, nullptr, nullptr,
                        f16_to_f32, decode_f32};

}  // namespace

const Kernels* portable_kernels() { return &kTable; }

}  // namespace kbvq
