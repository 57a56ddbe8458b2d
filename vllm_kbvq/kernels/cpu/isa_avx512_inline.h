// Small AVX-512 helpers shared by isa_avx512.cpp and isa_amx.cpp.  Include it after the file's
// `#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,...")` and <immintrin.h>.
// Everything here has internal linkage (an unnamed namespace): each file keeps its own copy, compiled
// for its own instruction set, so the linker never merges one with code built for another (kernels.h).
#pragma once
#include <stddef.h>
#include <stdint.h>

namespace kbvq {
namespace {

inline float* align64(void* p) { return (float*)(((uintptr_t)p + 63) & ~(uintptr_t)63); }

// 64 bytes of a 256-entry byte plane (t: four registers), one per code byte of idx; high_half: the
// codes >= 128 (their sign bits), which read t[2], t[3].
inline __m512i lookup(__m512i idx, __mmask64 high_half, const __m512i* t) {
  return _mm512_mask_blend_epi8(high_half, _mm512_permutex2var_epi8(t[0], idx, t[1]),
                                _mm512_permutex2var_epi8(t[2], idx, t[3]));
}

#pragma GCC push_options
#pragma GCC target("avx512bf16")
// n float16 values as bfloat16 (a codebook, for the bf16 dot products and the AMX tiles)
inline void f16_to_bf16(const uint16_t* h, size_t n, uint16_t* out) {
  for (size_t i = 0; i < n; i += 16) {
    const __mmask16 k = n - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1);
    _mm256_mask_storeu_epi16(out + i, k, (__m256i)_mm512_cvtneps_pbh(_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, h + i))));
  }
}

// 16 float32 activations as bfloat16, zeros past the first `left` (none when left <= 0)
inline __m256i f32_to_bf16_16(const float* x, int left) {
  const __mmask16 k = left >= 16 ? (__mmask16)0xffff : left > 0 ? (__mmask16)((1u << left) - 1) : (__mmask16)0;
  return (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(k, x));
}
#pragma GCC pop_options

}  // namespace
}  // namespace kbvq
