// AVX2 + FMA + F16C kernels (x86-64-v3: Zen 2-3, Haswell to Alder Lake, most laptops).  Only C headers
// here (see kernels.h).
//
// Vectors of 4 (2- and 3-bit), every code width and token count: no table, each row's codewords loaded
// whole (a float32 codebook for 8-bit codes, the float16 one for 16-bit codes) and multiplied into the
// activations by 8-lane FMAs, float32 sums.  About 3.5 instructions per code; Zen 3's gathers are
// microcoded, and tables read by them or by shuffles were slower here.
// 8-bit codes of other lengths, 16-bit activations: the lookup table of each sub-vector quantised to 16
// bits per group of sub-vectors of the same magnitude (as the AVX-512 path does; one float scale per
// group), held as a high (signed) and a low byte plane of 256 bytes, read 32 rows at a time by 16
// in-lane byte shuffles (one per 16-entry slice, on the code's low nibble) and a 4-level blend tree on
// its high nibble.  float32 activations and other shapes: a float32 table per sub-vector read with
// gathers (exact).  Many tokens with other lengths: the codes decoded row-major into a float32 tile for
// torch's float32 GEMM, never a bfloat16 GEMM, which is a scalar loop on CPUs without native bfloat16.
#include "kernels.h"

#if defined(__x86_64__)
#pragma GCC target("avx2,fma,f16c")
#include <immintrin.h>
#include <string.h>

namespace kbvq {
namespace {

int chunk_of(int K) { return K >= 4096 ? 1 : 4096 / K; }

// --- 8-bit codes, 16-bit activations: 16-bit tables as byte planes, shuffle lookups -------------------

constexpr int kGroup = 32;  // sub-vectors per table scale (int16 sums of 32 bytes cannot overflow)
// A group's bounds lie within a factor 2^kSpread: each lookup keeps >= 15 - kSpread bits of its own
// sub-vector's scale (11 here, against bfloat16 activations' 8).
constexpr int kSpread = 4;

// Sub-vectors per pass: one token's planes (512 bytes a sub-vector) stay in L1 while every row block
// reads them; a few tokens' in L2.
inline int u8_chunk(int m) { return m <= 1 ? 64 : m <= 4 ? 128 : 256; }
// per token: planes [chunk][2 x 256], then order, group ends and scales ([chunk] each), group count
inline size_t u8_token_bytes(int chunk) { return (size_t)chunk * (512 + 12) + 64; }

struct Planes {
  int8_t* hi;
  uint8_t* lo;
  int32_t* order;
  int32_t* end;
  float* scale;
  int* groups;
};

inline Planes planes_at(uint8_t* w, int chunk) {
  Planes p;
  p.hi = (int8_t*)w;
  p.lo = w + (size_t)chunk * 256;
  p.order = (int32_t*)(w + (size_t)chunk * 512);
  p.end = p.order + chunk;
  p.scale = (float*)(p.end + chunk);
  p.groups = (int*)(p.scale + chunk);
  return p;
}

size_t scratch_bytes(int n, int K, int d, int m) {
  (void)n;
  const int Kp = K < 256 ? 256 : K;
  const size_t gather = sizeof(float) * ((size_t)Kp * d + (size_t)m * chunk_of(Kp) * Kp);
  const size_t planes = sizeof(float) * 256 * (size_t)d + (size_t)m * u8_token_bytes(u8_chunk(m));
  return (gather > planes ? gather : planes) + 128;
}

inline float* align64(void* p) { return (float*)(((uintptr_t)p + 63) & ~(uintptr_t)63); }

// One sub-vector's 256 entries sum_i xs[i] cbt[i][k] (already scaled to int16 range) as a high (signed)
// and a low byte plane.  Packs interleave 128-bit lanes; each is undone by a qword permute.
template <int D>
inline void table_planes_d(const float* cbt, const __m256* xs, int d, int8_t* hi, uint8_t* lo) {
  const int nd = D ? D : d;
  for (int k = 0; k < 256; k += 32) {
    __m256i q[4];
    for (int c = 0; c < 4; ++c) {
      __m256 t = _mm256_mul_ps(xs[0], _mm256_load_ps(cbt + k + 8 * c));
      for (int i = 1; i < nd; ++i) t = _mm256_fmadd_ps(xs[i], _mm256_load_ps(cbt + (size_t)i * 256 + k + 8 * c), t);
      q[c] = _mm256_cvtps_epi32(t);
    }
    // entries k .. k + 15 and k + 16 .. k + 31 as int16, in order
    const __m256i w0 = _mm256_permute4x64_epi64(_mm256_packs_epi32(q[0], q[1]), 0xd8);
    const __m256i w1 = _mm256_permute4x64_epi64(_mm256_packs_epi32(q[2], q[3]), 0xd8);
    const __m256i m8 = _mm256_set1_epi16(0xff);
    const __m256i l = _mm256_packus_epi16(_mm256_and_si256(w0, m8), _mm256_and_si256(w1, m8));
    const __m256i h = _mm256_packs_epi16(_mm256_srai_epi16(w0, 8), _mm256_srai_epi16(w1, 8));
    _mm256_store_si256((__m256i*)(lo + k), _mm256_permute4x64_epi64(l, 0xd8));
    _mm256_store_si256((__m256i*)(hi + k), _mm256_permute4x64_epi64(h, 0xd8));
  }
}

inline void table_planes(const float* cbt, const __m256* xs, int d, int8_t* hi, uint8_t* lo) {
  if (d == 4)
    table_planes_d<4>(cbt, xs, d, hi, lo);
  else if (d == 2)
    table_planes_d<2>(cbt, xs, d, hi, lo);
  else
    table_planes_d<0>(cbt, xs, d, hi, lo);
}

// The planes of sub-vectors [j0, j1) for one token, grouped by the binary exponent of a bound on their
// entries, |table[j][k]| <= sum_i |x_j,i| max_k |codebook[k][i]| (cmax): within a group the bounds
// differ by less than 2^kSpread (an outlier channel does not drown the others).  Sub-vectors whose
// input is zero are left out.
void build_planes(const float* cbt, const float* cmax, int d, const float* x, int j0, int j1, Planes& pl) {
  float bound[256];
  int expo[256], count[66] = {0};  // bucket 0: skipped
  for (int j = j0; j < j1; ++j) {
    float s = 0.f;
    for (int i = 0; i < d; ++i) {
      const float v = x[(size_t)j * d + i];
      s += (v < 0 ? -v : v) * cmax[i];
    }
    uint32_t u;
    memcpy(&u, &s, 4);
    bound[j - j0] = s;
    expo[j - j0] = s > 0.f && s < 3.0e38f ? (int)((u >> 23) & 0xff) / kSpread + 1 : 0;
    ++count[expo[j - j0]];
  }
  int start[66], pos = 0;
  for (int e = 65; e >= 1; --e) start[e] = pos, pos += count[e];  // largest first
  const int used = pos;
  for (int j = j0; j < j1; ++j)
    if (expo[j - j0]) pl.order[start[expo[j - j0]]++] = j;
  int groups = 0;
  for (int p0 = 0; p0 < used;) {
    const int e = expo[pl.order[p0] - j0];
    int p1 = p0;
    float mx = 0.f;
    while (p1 < used && p1 - p0 < kGroup && expo[pl.order[p1] - j0] == e) {
      mx = bound[pl.order[p1] - j0] > mx ? bound[pl.order[p1] - j0] : mx;
      ++p1;
    }
    pl.end[groups] = p1;
    pl.scale[groups++] = mx / 32767.f;
    const float inv = 32767.f / mx;
    for (int p = p0; p < p1; ++p) {
      const float* xj = x + (size_t)pl.order[p] * d;
      __m256 xs[8];
      for (int i = 0; i < d; ++i) xs[i] = _mm256_set1_ps(xj[i] * inv);  // the scale folded into x
      table_planes(cbt, xs, d, pl.hi + (size_t)p * 256, pl.lo + (size_t)p * 256);
    }
    p0 = p1;
  }
  *pl.groups = groups;
}

// 32 codes -> their bytes of a 256-byte plane: a shuffle per 16-entry slice on the low nibble, then a
// blend tree on bits 4..7 (each moved to bit 7 of its byte, which is what a blend reads).
inline __m256i lookup32(__m256i c, __m256i low, __m256i s4, __m256i s5, __m256i s6, const uint8_t* t) {
#define KBVQ_SLICE(h) _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(_mm_load_si128((const __m128i*)(t + 16 * (h)))), low)
  __m256i half[2];
  for (int hh = 0; hh < 2; ++hh) {
    __m256i quad[2];
    for (int q = 0; q < 2; ++q) {
      const int h = 8 * hh + 4 * q;
      const __m256i a = _mm256_blendv_epi8(KBVQ_SLICE(h), KBVQ_SLICE(h + 1), s4);
      const __m256i b = _mm256_blendv_epi8(KBVQ_SLICE(h + 2), KBVQ_SLICE(h + 3), s4);
      quad[q] = _mm256_blendv_epi8(a, b, s5);
    }
    half[hh] = _mm256_blendv_epi8(quad[0], quad[1], s6);
  }
#undef KBVQ_SLICE
  return _mm256_blendv_epi8(half[0], half[1], c);
}

// One row block (64 rows, codes at `codes` + 64 j) over one token's planes, added into y[0..63].  Per
// group, the looked-up bytes are summed as int16 words split into even and odd rows, then combined
// (high * 256 + low) in int32 and scaled into float sums; the rows are put back in order at the end.
void lut_block(const uint8_t* codes, const Planes& pl, float* y) {
  alignas(32) float acc[2][4][8] = {};  // [32-row half][even 0-14, even 16-30, odd 1-15, odd 17-31]
  const __m256i m15 = _mm256_set1_epi8(15), m8 = _mm256_set1_epi16(0xff);
  for (int g = 0, p0 = 0; g < *pl.groups; p0 = pl.end[g++]) {
    const __m256 sc = _mm256_set1_ps(pl.scale[g]);
    for (int hh = 0; hh < 2; ++hh) {
      __m256i he = _mm256_setzero_si256(), ho = he, le = he, lo = he;
      for (int p = p0; p < pl.end[g]; ++p) {
        const __m256i c = _mm256_loadu_si256((const __m256i*)(codes + (size_t)pl.order[p] * 64 + 32 * hh));
        const __m256i low = _mm256_and_si256(c, m15);
        const __m256i s4 = _mm256_slli_epi16(c, 3), s5 = _mm256_slli_epi16(c, 2), s6 = _mm256_slli_epi16(c, 1);
        const __m256i vh = lookup32(c, low, s4, s5, s6, (const uint8_t*)pl.hi + (size_t)p * 256);
        he = _mm256_add_epi16(he, _mm256_srai_epi16(_mm256_slli_epi16(vh, 8), 8));
        ho = _mm256_add_epi16(ho, _mm256_srai_epi16(vh, 8));
        const __m256i vl = lookup32(c, low, s4, s5, s6, pl.lo + (size_t)p * 256);
        le = _mm256_add_epi16(le, _mm256_and_si256(vl, m8));
        lo = _mm256_add_epi16(lo, _mm256_srli_epi16(vl, 8));
      }
      for (int q = 0; q < 4; ++q) {
        const __m256i hw = q < 2 ? he : ho, lw = q < 2 ? le : lo;
        const __m128i h8 = q % 2 ? _mm256_extracti128_si256(hw, 1) : _mm256_castsi256_si128(hw);
        const __m128i l8 = q % 2 ? _mm256_extracti128_si256(lw, 1) : _mm256_castsi256_si128(lw);
        const __m256i v = _mm256_add_epi32(_mm256_slli_epi32(_mm256_cvtepi16_epi32(h8), 8), _mm256_cvtepu16_epi32(l8));
        _mm256_store_ps(acc[hh][q], _mm256_fmadd_ps(_mm256_cvtepi32_ps(v), sc, _mm256_load_ps(acc[hh][q])));
      }
    }
  }
  for (int hh = 0; hh < 2; ++hh)
    for (int q = 0; q < 2; ++q) {  // rows 32 hh + 16 q .. + 15 from even q and odd q
      const __m256 e = _mm256_load_ps(acc[hh][q]), o = _mm256_load_ps(acc[hh][2 + q]);
      const __m256 a = _mm256_unpacklo_ps(e, o), b = _mm256_unpackhi_ps(e, o);
      float* p = y + 32 * hh + 16 * q;
      _mm256_storeu_ps(p, _mm256_add_ps(_mm256_loadu_ps(p), _mm256_permute2f128_ps(a, b, 0x20)));
      _mm256_storeu_ps(p + 8, _mm256_add_ps(_mm256_loadu_ps(p + 8), _mm256_permute2f128_ps(a, b, 0x31)));
    }
}

void lut_u8(const uint8_t* codes, int n, int b0, int b1, const float* cbt, const float* cmax, int d, int m,
            const float* x, long ldx, float* y, long ldy, uint8_t* work) {
  const int chunk = u8_chunk(m);
  const size_t tb = u8_token_bytes(chunk), stride = (size_t)n * 64;
  for (int j0 = 0; j0 < n; j0 += chunk) {
    const int j1 = j0 + chunk < n ? j0 + chunk : n;
    for (int t = 0; t < m; ++t) {
      Planes pl = planes_at(work + t * tb, chunk);
      build_planes(cbt, cmax, d, x + t * ldx, j0, j1, pl);
    }
    for (int b = b0; b < b1; ++b) {
      if (b + 1 < b1)  // the next block's codes of this pass, visited in group order the prefetcher cannot follow
        for (int j = j0; j < j1; ++j) _mm_prefetch((const char*)(codes + (b + 1) * stride + (size_t)j * 64), _MM_HINT_T0);
      for (int t = 0; t < m; ++t)
        lut_block(codes + b * stride, planes_at(work + t * tb, chunk), y + t * ldy + (size_t)(b - b0) * 64);
    }
  }
}

// --- codewords loaded whole, d = 4: every code width, activation type and token count -------------------
// Eight float32 lanes per FMA hold two sub-vectors (their codewords side by side); each load serves MT
// tokens, and R rows share each token's activations, so R x MT accumulators stay in registers.

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// The codeword pair of codes a, b: float32 codebook [K][4] (8-bit codes: 4 KiB, in L1), or the float16
// codebook itself (16-bit codes: 32 KiB where float32 would be 64, past L1; ~20 % faster on Zen 3).
inline __m256 codeword_pair(const float* cbf, size_t a, size_t b) {
  return _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(cbf + a * 4)), _mm_loadu_ps(cbf + b * 4), 1);
}
inline __m256 codeword_pair(const uint16_t* cbh, size_t a, size_t b) {
  const __m128d lo = _mm_castsi128_pd(_mm_loadl_epi64((const __m128i*)(cbh + a * 4)));
  return _mm256_cvtph_ps(_mm_castpd_si128(_mm_loadh_pd(lo, (const double*)(cbh + b * 4))));
}
inline __m128 codeword(const float* cbf, size_t a) { return _mm_loadu_ps(cbf + a * 4); }
inline __m128 codeword(const uint16_t* cbh, size_t a) { return _mm_cvtph_ps(_mm_loadl_epi64((const __m128i*)(cbh + a * 4))); }

// Rows r0 .. r0 + R - 1 over sub-vectors [j0, j1) (j1 - j0 even, or j1 = n), added into yt[t][r0 ..].
template <typename Idx, typename CB, int MT, int R>
void dot_rows(const Idx* cbk, int j0, int j1, int r0, const CB* cb, const float* const* xt, float* const* yt) {
  __m256 acc[R][MT];
  for (int q = 0; q < R; ++q)
    for (int t = 0; t < MT; ++t) acc[q][t] = _mm256_setzero_ps();
  int j = j0;
  for (; j + 2 <= j1; j += 2) {
    __m256 xp[MT];
    for (int t = 0; t < MT; ++t) xp[t] = _mm256_loadu_ps(xt[t] + (size_t)j * 4);
    const Idx *c0 = cbk + (size_t)j * 64 + r0, *c1 = c0 + 64;
    for (int q = 0; q < R; ++q) {
      const __m256 w = codeword_pair(cb, c0[q], c1[q]);
      for (int t = 0; t < MT; ++t) acc[q][t] = _mm256_fmadd_ps(w, xp[t], acc[q][t]);
    }
  }
  if (j < j1) {  // odd n: the last sub-vector alone, in the low lanes
    const Idx* c0 = cbk + (size_t)j * 64 + r0;
    for (int q = 0; q < R; ++q) {
      const __m128 w = codeword(cb, c0[q]);
      for (int t = 0; t < MT; ++t)
        acc[q][t] = _mm256_add_ps(acc[q][t], _mm256_zextps128_ps256(_mm_mul_ps(w, _mm_loadu_ps(xt[t] + (size_t)j * 4))));
    }
  }
  for (int t = 0; t < MT; ++t)
    for (int q = 0; q < R; ++q) yt[t][r0 + q] += hsum(acc[q][t]);
}

constexpr int kDotChunk = 64;  // even

template <typename Idx, typename CB>
void dot_codes(const Idx* codes, int n, int b0, int b1, const CB* cb, int m, const float* x, long ldx, float* y,
               long ldy) {
  for (int b = b0; b < b1; ++b) {
    const Idx* cbk = codes + (size_t)b * n * 64;
    for (int t0 = 0; t0 < m;) {
      const int mt = m - t0 >= 3 ? 3 : m - t0;
      const float* xt[3];
      float* yt[3];
      for (int t = 0; t < mt; ++t) xt[t] = x + (t0 + t) * ldx, yt[t] = y + (t0 + t) * ldy + (size_t)(b - b0) * 64;
      // sub-vectors in chunks whose codes (64 rows each) and activations stay in L1 while every row
      // group of the block reads them: a row group reads only R of each 64-byte line of codes
      for (int j0 = 0; j0 < n; j0 += kDotChunk) {
        const int j1 = j0 + kDotChunk < n ? j0 + kDotChunk : n;
        for (int r0 = 0; r0 < 64; r0 += mt == 1 ? 8 : 4) {
          if (mt == 3)
            dot_rows<Idx, CB, 3, 4>(cbk, j0, j1, r0, cb, xt, yt);
          else if (mt == 2)
            dot_rows<Idx, CB, 2, 4>(cbk, j0, j1, r0, cb, xt, yt);
          else
            dot_rows<Idx, CB, 1, 8>(cbk, j0, j1, r0, cb, xt, yt);
        }
      }
      t0 += mt;
    }
  }
}

void f16_to_f32(const uint16_t* h, int n, float* out);

// lut_matvec's result from the codewords, d = 4
void dot_matvec(const Codes& codes, int b0, int b1, const uint16_t* codebook, int K, int m, const float* x, long ldx,
                float* y, long ldy, void* scratch) {
  if (codes.index_bytes == 2) {
    dot_codes((const uint16_t*)codes.data, codes.n, b0, b1, codebook, m, x, ldx, y, ldy);
    return;
  }
  float* cbf = align64(scratch);  // [K][4]
  f16_to_f32(codebook, K * 4, cbf);
  dot_codes((const uint8_t*)codes.data, codes.n, b0, b1, cbf, m, x, ldx, y, ldy);
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
  if (d == 4) {  // float32 sums of float16 codewords (exact), faster than tables here at every width
    dot_matvec(codes, b0, b1, codebook, K, m, x, ldx, y, ldy, scratch);
    return;
  }
  if (codes.index_bytes == 1 && !exact && d <= 8) {
    float* cbt = align64(scratch);  // [d][256], zeros past K
    float cmax[8] = {0};
    for (int i = 0; i < d; ++i)
      for (int k = 0; k < 256; ++k) {
        const float v = k < K ? _cvtsh_ss(codebook[(size_t)k * d + i]) : 0.f;
        cbt[(size_t)i * 256 + k] = v;
        cmax[i] = (v < 0 ? -v : v) > cmax[i] ? (v < 0 ? -v : v) : cmax[i];
      }
    lut_u8((const uint8_t*)codes.data, codes.n, b0, b1, cbt, cmax, d, m, x, ldx, y, ldy, (uint8_t*)(cbt + 256 * d));
    return;
  }
  float* cbt = align64(scratch);  // [d][K]
  for (int k = 0; k < K; ++k)
    for (int i = 0; i < d; ++i) cbt[(size_t)i * K + k] = _cvtsh_ss(codebook[(size_t)k * d + i]);
  float* tables = cbt + (size_t)K * d;
  if (codes.index_bytes == 1)
    lut_rows((const uint8_t*)codes.data, codes.n, b0, b1, cbt, K, d, m, x, ldx, y, ldy, tables);
  else
    lut_rows((const uint16_t*)codes.data, codes.n, b0, b1, cbt, K, d, m, x, ldx, y, ldy, tables);
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

// Row-major float32 rows [64 (b1 - b0)][n d] for a GEMM with the tile transposed: one codeword copy per
// code, eight rows per load of their codes.  cbf: [K][d] float32.
template <typename Idx>
void decode_rows_f32(const Idx* codes, int n, int b0, int b1, const float* cbf, int d, float* out) {
  const size_t in = (size_t)n * d;
  for (int b = b0; b < b1; ++b)
    for (int r0 = 0; r0 < 64; r0 += 8) {
      float* o = out + ((size_t)(b - b0) * 64 + r0) * in;
      for (int j = 0; j < n; ++j) {
        const Idx* c = codes + ((size_t)b * n + j) * 64 + r0;
        if (d == 4)
          for (int q = 0; q < 8; ++q) _mm_storeu_ps(o + q * in + (size_t)j * 4, _mm_loadu_ps(cbf + (size_t)c[q] * 4));
        else if (d == 2)
          for (int q = 0; q < 8; ++q) memcpy(o + q * in + (size_t)j * 2, cbf + (size_t)c[q] * 2, 8);
        else
          for (int q = 0; q < 8; ++q) memcpy(o + q * in + (size_t)j * d, cbf + (size_t)c[q] * d, sizeof(float) * d);
      }
    }
}

void decode_f32(const Codes& codes, int b0, int b1, const float* cbf, int K, int d, float* out) {
  (void)K;
  if (codes.index_bytes == 1)
    decode_rows_f32((const uint8_t*)codes.data, codes.n, b0, b1, cbf, d, out);
  else
    decode_rows_f32((const uint16_t*)codes.data, codes.n, b0, b1, cbf, d, out);
}

const Kernels kTable = {"avx2",  lut_matvec, scratch_bytes, decode_tile, gemv_f16, nullptr,
                        nullptr, nullptr,    f16_to_f32,    decode_f32,  4};

}  // namespace

const Kernels* avx2_kernels() { return &kTable; }

}  // namespace kbvq

#else
namespace kbvq {
const Kernels* avx2_kernels() { return nullptr; }
}  // namespace kbvq
#endif
