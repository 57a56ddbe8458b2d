// AVX2 + FMA + F16C kernels (x86-64-v3): a float32 lookup table per sub-vector, read with 8-lane
// gathers.  Only C headers here (see kernels.h).
#include "kernels.h"

#if defined(__x86_64__)
#pragma GCC target("avx2,fma,f16c")
#include <immintrin.h>
#include <string.h>

namespace kbvq {
namespace {

int chunk_of(int K) { return K >= 4096 ? 1 : 4096 / K; }

size_t scratch_bytes(int n, int K, int d, int m) {
  (void)n;
  return sizeof(float) * ((size_t)K * d + (size_t)m * chunk_of(K) * K) + 64;
}

// table[k] = sum_i x[i] * cbt[i][k]: the codebook transposed, so 8 codewords per instruction.
void build_table(const float* cbt, int K, int d, const float* x, float* table) {
  int k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 s = _mm256_mul_ps(_mm256_set1_ps(x[0]), _mm256_loadu_ps(cbt + k));
    for (int i = 1; i < d; ++i) s = _mm256_fmadd_ps(_mm256_set1_ps(x[i]), _mm256_loadu_ps(cbt + (size_t)i * K + k), s);
    _mm256_storeu_ps(table + k, s);
  }
  for (; k < K; ++k) {
    float s = 0.f;
    for (int i = 0; i < d; ++i) s += x[i] * cbt[(size_t)i * K + k];
    table[k] = s;
  }
}

inline __m256i load8(const uint8_t* c) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)c)); }
inline __m256i load8(const uint16_t* c) { return _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)c)); }

template <typename Idx>
void lut_rows(const Idx* codes, int n, int b0, int b1, const float* cbt, int K, int d, int m, const float* x, long ldx,
              float* y, long ldy, float* tables) {
  const int jc = chunk_of(K);
  const size_t per_token = (size_t)jc * K;
  for (int j0 = 0; j0 < n; j0 += jc) {
    const int j1 = j0 + jc < n ? j0 + jc : n;
    for (int t = 0; t < m; ++t)
      for (int j = j0; j < j1; ++j)
        build_table(cbt, K, d, x + t * ldx + (size_t)j * d, tables + t * per_token + (size_t)(j - j0) * K);
    for (int b = b0; b < b1; ++b) {
      const Idx* cbk = codes + (size_t)b * n * 64;
      for (int t = 0; t < m; ++t) {
        __m256 acc[8];
        for (int g = 0; g < 8; ++g) acc[g] = _mm256_setzero_ps();
        for (int j = j0; j < j1; ++j) {
          const float* tab = tables + t * per_token + (size_t)(j - j0) * K;
          const Idx* c = cbk + (size_t)j * 64;
          for (int g = 0; g < 8; ++g) acc[g] = _mm256_add_ps(acc[g], _mm256_i32gather_ps(tab, load8(c + 8 * g), 4));
        }
        float* yb = y + t * ldy + (size_t)(b - b0) * 64;
        for (int g = 0; g < 8; ++g) _mm256_storeu_ps(yb + 8 * g, _mm256_add_ps(_mm256_loadu_ps(yb + 8 * g), acc[g]));
      }
    }
  }
}

void lut_matvec(const Codes& codes, int b0, int b1, const uint16_t* codebook, int K, int d, int m, const float* x,
                long ldx, float* y, long ldy, bool exact, void* scratch) {
  (void)exact;  // float32 tables always
  float* cbt = (float*)scratch;  // [d][K]
  for (int k = 0; k < K; ++k)
    for (int i = 0; i < d; ++i) cbt[(size_t)i * K + k] = _cvtsh_ss(codebook[(size_t)k * d + i]);
  float* tables = cbt + (size_t)K * d;
  if (codes.index_bytes == 1)
    lut_rows((const uint8_t*)codes.data, codes.n, b0, b1, cbt, K, d, m, x, ldx, y, ldy, tables);
  else
    lut_rows((const uint16_t*)codes.data, codes.n, b0, b1, cbt, K, d, m, x, ldx, y, ldy, tables);
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

void gemv_f16(const uint16_t* a, int rows, int cols, long lda, const float* x, float* y) {
  for (int i = 0; i < rows; ++i) {
    const uint16_t* ai = a + (size_t)i * lda;
    __m256 s = _mm256_setzero_ps();
    int c = 0;
    for (; c + 8 <= cols; c += 8)
      s = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(ai + c))), _mm256_loadu_ps(x + c), s);
    float r = hsum(s);
    for (; c < cols; ++c) r += _cvtsh_ss(ai[c]) * x[c];
    y[i] = r;
  }
}

// float32 -> bfloat16, round to nearest even (inputs are finite: decoded float16 codewords)
inline __m128i to_bf16(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff),
                                                         _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1))));
  const __m256i h = _mm256_srli_epi32(r, 16);
  return _mm_packus_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

template <typename Idx>
void decode_rows(const Idx* codes, int n, int b0, int b1, const float* cbt, int K, int d, bool bf16, void* out) {
  const size_t ld = (size_t)(b1 - b0) * 64;
  for (int b = b0; b < b1; ++b)
    for (int j = 0; j < n; ++j) {
      const Idx* c = codes + ((size_t)b * n + j) * 64;
      __m256i idx[8];
      for (int g = 0; g < 8; ++g) idx[g] = load8(c + 8 * g);
      for (int i = 0; i < d; ++i) {
        const float* plane = cbt + (size_t)i * K;
        const size_t o = ((size_t)j * d + i) * ld + (size_t)(b - b0) * 64;
        for (int g = 0; g < 8; ++g) {
          const __m256 v = _mm256_i32gather_ps(plane, idx[g], 4);
          if (bf16)
            _mm_storeu_si128((__m128i*)((uint16_t*)out + o + 8 * g), to_bf16(v));
          else
            _mm256_storeu_ps((float*)out + o + 8 * g, v);
        }
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
  int i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(h + i))));
  for (; i < n; ++i) out[i] = _cvtsh_ss(h[i]);
}

const Kernels kTable = {"avx2", lut_matvec, scratch_bytes, decode_tile, gemv_f16, nullptr, nullptr, nullptr,
                        f16_to_f32};

}  // namespace

const Kernels* avx2_kernels() { return &kTable; }

}  // namespace kbvq

#else
namespace kbvq {
const Kernels* avx2_kernels() { return nullptr; }
}  // namespace kbvq
#endif
