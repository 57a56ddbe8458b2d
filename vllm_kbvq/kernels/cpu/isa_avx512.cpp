// AVX-512 (F, BW, VL, VBMI) kernels.  Only C headers here (see kernels.h).
//
// 8-bit codes (K <= 256): the lookup table of each sub-vector j, table[j][k] = <codebook[k], x_j>,
// is quantised to 16 bits per group of up to kGroup sub-vectors (one float scale per group) and held
// as two byte planes, high (signed) and low (unsigned), four 64-byte registers each.  A group holds
// sub-vectors whose tables have the same binary order of magnitude (activations have outlier
// channels: one shared scale would drown the small sub-vectors in the large one's rounding).  One VBMI byte
// permute pair then looks up 64 rows at once; the planes' sums are kept in int16 across a group and
// combined (high * 256 + low) in int32 before the scale.  A 16-bit table loses about 2^-16 of the
// group's largest entry per lookup, far below float16 codebooks' own rounding; one byte plane
// (an int8 table) would be ~2x faster in the lookups but loses ~1% of the output.
// 16-bit codes with d a multiple of 4: no table, each codeword gathered and multiplied in directly.
// Other 16-bit codes, and 8-bit codes with float32 activations (exact): a float32 table per
// sub-vector, read with 16-lane gathers.
#include "kernels.h"

#if defined(__x86_64__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,fma,f16c")
#include <immintrin.h>

#include "isa_avx512_inline.h"

namespace kbvq {
namespace {

constexpr int kGroup = 32;   // sub-vectors per table scale (int16 sums of 32 bytes cannot overflow)
constexpr int kChunk = 256;  // sub-vectors per table pass for one token: 2 x 64 KiB of planes, L2-resident
// A group's bounds lie within a factor 2^kSpread: each lookup keeps >= 15 - kSpread bits of its own
// sub-vector's scale (11 here, against bfloat16 activations' 8), and random inputs need few groups.
constexpr int kSpread = 4;

// Sub-vectors per pass for m tokens: the m tokens' planes stay in L2 (<= ~512 KiB).
inline int u8_chunk(int m) {
  int c = (1024 / (m > 0 ? m : 1)) / kGroup * kGroup;
  return c < kGroup ? kGroup : c > kChunk ? kChunk : c;
}
// per token: planes [chunk][2 x 256], then order, group ends and scales ([chunk] each)
inline size_t u8_token_bytes(int chunk) { return (size_t)chunk * (512 + 12) + 64; }

// One token's tables for a pass: plane p holds sub-vector order[p]; group g is planes
// [end[g-1], end[g]) with scale scale[g].
struct Planes {
  int8_t* hi;
  uint8_t* lo;
  int32_t* order;
  int32_t* end;
  float* scale;
  int groups;
};

inline Planes planes_at(uint8_t* w, int chunk) {
  Planes p;
  p.hi = (int8_t*)w;
  p.lo = w + (size_t)chunk * 256;
  p.order = (int32_t*)(w + (size_t)chunk * 512);
  p.end = p.order + chunk;
  p.scale = (float*)(p.end + chunk);
  p.groups = 0;
  return p;
}
inline int gather_chunk(int K) { return K >= 4096 ? 1 : 4096 / K; }

size_t scratch_bytes(int n, int K, int d, int m) {
  const size_t cbt = sizeof(float) * (size_t)(K < 256 ? 256 : K) * d;
  const size_t vbmi = (size_t)m * u8_token_bytes(u8_chunk(m));
  const int Kp = K < 256 ? 256 : K;
  const size_t gather = sizeof(float) * (size_t)m * gather_chunk(Kp) * Kp;
  const size_t dot = 2 * ((size_t)K * d + (size_t)m * n * d);  // bfloat16 codebook and activations
  const size_t most = vbmi > gather ? vbmi : gather;
  return cbt + (most > dot ? most : dot) + 256;
}

// cbt: [d][Kp] float32, the codebook transposed (zeros past K).  d = 2 or 4 (the project's dims for
// 8-bit codes) 16 codewords at a time: widened, then component i picked out by permutes.
void transpose_codebook(const uint16_t* codebook, int K, int Kp, int d, float* cbt) {
  int k0 = 0;
  if (d == 2 || d == 4) {
    for (; k0 + 16 <= K; k0 += 16) {
      __m512 v[4];
      for (int c = 0; c < d; ++c)
        v[c] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(codebook + (size_t)k0 * d + 16 * c)));
      for (int i = 0; i < d; ++i) {
        // lane j: element d j + i of the concatenated pair (codewords j of the pair's 32 / d)
        const __m512i idx = _mm512_add_epi32(_mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3,
                                                                                  4, 5, 6, 7),
                                                                _mm512_set1_epi32(d)),
                                             _mm512_set1_epi32(i));
        __m512 out;
        if (d == 2) {
          out = _mm512_permutex2var_ps(v[0], _mm512_add_epi32(idx, _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 16, 16, 16,
                                                                                     16, 16, 16, 16, 16)),
                                       v[1]);
        } else {
          const __m512 lo = _mm512_permutex2var_ps(v[0], idx, v[1]), hi = _mm512_permutex2var_ps(v[2], idx, v[3]);
          out = _mm512_shuffle_f32x4(lo, hi, 0x44);
        }
        _mm512_storeu_ps(cbt + (size_t)i * Kp + k0, out);
      }
    }
  }
  for (int i = 0; i < d; ++i)
    for (int k = k0; k < Kp; ++k) cbt[(size_t)i * Kp + k] = k < K ? _cvtsh_ss(codebook[(size_t)k * d + i]) : 0.f;
}

// table[k..k+15] = sum_i x[i] * cbt[i][k..k+15] (planes `stride` floats apart), d unrolled where the
// project's vector dims are (1, 2, 4, 8), a loop elsewhere.
template <int D>
inline __m512 dot16(const float* cbt, size_t stride, const __m512* xb, int d, int k) {
  __m512 t = _mm512_mul_ps(xb[0], _mm512_loadu_ps(cbt + k));
  const int n = D ? D : d;
  for (int i = 1; i < n; ++i) t = _mm512_fmadd_ps(xb[i], _mm512_loadu_ps(cbt + i * stride + k), t);
  return t;
}

// --- 8-bit codes: quantised table, byte permutes ------------------------------------------------

// One sub-vector's 256 table entries, already scaled to int16 range (|entry| <= 32767), as a high
// (signed) and a low byte plane: 64 entries at a time, rounded to int32, saturated to int16 by two
// packs (which interleave 128-bit lanes) and split into bytes by two byte permutes that also undo
// the interleave.
template <int D>
inline void table_planes_d(const float* cbt, const __m512* xb, int d, uint8_t* hi, uint8_t* lo) {
  // entry e (< 64) sits in word 8 (r / 4) + 4 (e / 16 % 2) + r % 4 (r = e % 16) of pack (e / 32)
  alignas(64) static const uint8_t kSplit[2][64] = {
#define W(e) (uint8_t)(((e) / 32) * 64 + 2 * (8 * ((e) % 16 / 4) + 4 * ((e) / 16 % 2) + (e) % 4))
#define R8(e) W(e), W(e + 1), W(e + 2), W(e + 3), W(e + 4), W(e + 5), W(e + 6), W(e + 7)
      {R8(0), R8(8), R8(16), R8(24), R8(32), R8(40), R8(48), R8(56)},
#undef W
#define W(e) (uint8_t)(((e) / 32) * 64 + 2 * (8 * ((e) % 16 / 4) + 4 * ((e) / 16 % 2) + (e) % 4) + 1)
      {R8(0), R8(8), R8(16), R8(24), R8(32), R8(40), R8(48), R8(56)},
#undef W
#undef R8
  };
  const __m512i lo_idx = _mm512_load_si512(kSplit[0]), hi_idx = _mm512_load_si512(kSplit[1]);
  for (int k = 0; k < 256; k += 64) {
    __m512i q[4];
    for (int c = 0; c < 4; ++c) q[c] = _mm512_cvtps_epi32(dot16<D>(cbt, 256, xb, d, k + 16 * c));
    const __m512i p01 = _mm512_packs_epi32(q[0], q[1]), p23 = _mm512_packs_epi32(q[2], q[3]);
    _mm512_storeu_si512(hi + k, _mm512_permutex2var_epi8(p01, hi_idx, p23));
    _mm512_storeu_si512(lo + k, _mm512_permutex2var_epi8(p01, lo_idx, p23));
  }
}

inline void table_planes(const float* cbt, const __m512* xb, int d, uint8_t* hi, uint8_t* lo) {
  if (d == 4)
    table_planes_d<4>(cbt, xb, d, hi, lo);
  else if (d == 2)
    table_planes_d<2>(cbt, xb, d, hi, lo);
  else
    table_planes_d<0>(cbt, xb, d, hi, lo);
}

// The planes of sub-vectors [j0, j1) for one token, grouped by the binary exponent of a bound on
// their entries, |table[j][k]| <= sum_i |x_j,i| max_k |codebook[k][i]| (cmax): within a group the
// bounds differ by less than 2^kSpread.  Sub-vectors whose input is zero are left out.
void build_planes(const float* cbt, const float* cmax, int d, const float* x, int j0, int j1, Planes& pl) {
  float bound[kChunk];
  int expo[kChunk], count[257] = {0};  // bucket 0: skipped
  for (int j = j0; j < j1; ++j) {
    float s = 0.f;
    for (int i = 0; i < d; ++i) {
      const float v = x[(size_t)j * d + i];
      s += (v < 0 ? -v : v) * cmax[i];
    }
    uint32_t u;
    __builtin_memcpy(&u, &s, 4);
    bound[j - j0] = s;
    expo[j - j0] = s > 0.f ? (int)((u >> 23) & 0xff) / kSpread + 1 : 0;  // 0: skipped
    ++count[expo[j - j0]];
  }
  int start[257], pos = 0;
  for (int e = 256; e >= 1; --e) start[e] = pos, pos += count[e];  // largest first
  const int used = pos;
  for (int j = j0; j < j1; ++j)
    if (expo[j - j0]) pl.order[start[expo[j - j0]]++] = j;
  pl.groups = 0;
  for (int p0 = 0; p0 < used;) {
    const int e = expo[pl.order[p0] - j0];
    int p1 = p0;
    float mx = 0.f;
    while (p1 < used && p1 - p0 < kGroup && expo[pl.order[p1] - j0] == e) {
      mx = bound[pl.order[p1] - j0] > mx ? bound[pl.order[p1] - j0] : mx;
      ++p1;
    }
    pl.end[pl.groups] = p1;
    pl.scale[pl.groups++] = mx / 32767.f;
    const float inv = 32767.f / mx;
    for (int p = p0; p < p1; ++p) {
      const float* xj = x + (size_t)pl.order[p] * d;
      __m512 xb[16];
      for (int i = 0; i < d; ++i) xb[i] = _mm512_set1_ps(xj[i] * inv);  // the scale folded into x
      table_planes(cbt, xb, d, (uint8_t*)pl.hi + (size_t)p * 256, pl.lo + (size_t)p * 256);
    }
    p0 = p1;
  }
}

// NB row blocks (64 rows each, codes nb_stride bytes apart) over one token's planes.  The planes
// are visited in group order, not the codes' order, which the hardware prefetcher cannot follow:
// pf (if set) is the next blocks' codes for this pass, pf_n sub-vectors of them, fetched meanwhile.
// The looked-up bytes are summed as int16 words split by shifts into even and odd rows (port 0),
// not widened (port 5, which the permutes already keep busy); the rows are put back in order once,
// at the end.
template <int NB>
void lut_blocks(const uint8_t* codes, size_t nb_stride, const Planes& pl, float* y, const uint8_t* pf, int pf_n) {
  int ahead = 0;
  // acc[b][0]: rows 0, 2, .., 30; [1]: 32, .., 62; [2]: 1, .., 31; [3]: 33, .., 63
  __m512 acc[NB][4];
  for (int b = 0; b < NB; ++b)
    for (int q = 0; q < 4; ++q) acc[b][q] = _mm512_setzero_ps();
  const __m512i low_byte = _mm512_set1_epi16(0xff);
  for (int g = 0, p0 = 0; g < pl.groups; p0 = pl.end[g++]) {
    __m512i he[NB], ho[NB], le[NB], lo[NB];  // int16 sums: high / low plane, even / odd rows
    for (int b = 0; b < NB; ++b) he[b] = ho[b] = le[b] = lo[b] = _mm512_setzero_si512();
    for (int p = p0; p < pl.end[g]; ++p) {
      const __m512i* ph = (const __m512i*)(pl.hi + (size_t)p * 256);
      const __m512i* plo = (const __m512i*)(pl.lo + (size_t)p * 256);
      const __m512i th[4] = {_mm512_load_si512(ph), _mm512_load_si512(ph + 1), _mm512_load_si512(ph + 2),
                             _mm512_load_si512(ph + 3)};
      const __m512i tl[4] = {_mm512_load_si512(plo), _mm512_load_si512(plo + 1), _mm512_load_si512(plo + 2),
                             _mm512_load_si512(plo + 3)};
      const uint8_t* cj = codes + (size_t)pl.order[p] * 64;
      if (pf && ahead < pf_n) {
        for (int b = 0; b < NB; ++b) _mm_prefetch((const char*)(pf + b * nb_stride + (size_t)ahead * 64), _MM_HINT_T0);
        ++ahead;
      }
      for (int b = 0; b < NB; ++b) {
        const __m512i idx = _mm512_loadu_si512(cj + b * nb_stride);
        const __mmask64 m = _mm512_movepi8_mask(idx);
        const __m512i vh = lookup(idx, m, th), vl = lookup(idx, m, tl);
        he[b] = _mm512_add_epi16(he[b], _mm512_srai_epi16(_mm512_slli_epi16(vh, 8), 8));
        ho[b] = _mm512_add_epi16(ho[b], _mm512_srai_epi16(vh, 8));
        le[b] = _mm512_add_epi16(le[b], _mm512_and_si512(vl, low_byte));
        lo[b] = _mm512_add_epi16(lo[b], _mm512_srli_epi16(vl, 8));
      }
    }
    const __m512 sc = _mm512_set1_ps(pl.scale[g]);
    for (int b = 0; b < NB; ++b)
      for (int q = 0; q < 4; ++q) {
        const __m512i hw = q < 2 ? he[b] : ho[b], lw = q < 2 ? le[b] : lo[b];
        const __m256i hh = q % 2 ? _mm512_extracti64x4_epi64(hw, 1) : _mm512_castsi512_si256(hw);
        const __m256i ll = q % 2 ? _mm512_extracti64x4_epi64(lw, 1) : _mm512_castsi512_si256(lw);
        const __m512i v = _mm512_add_epi32(_mm512_slli_epi32(_mm512_cvtepi16_epi32(hh), 8), _mm512_cvtepu16_epi32(ll));
        acc[b][q] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v), sc, acc[b][q]);
      }
  }
  const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i second = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  for (int b = 0; b < NB; ++b)
    for (int h = 0; h < 2; ++h) {  // rows 32 h .. 32 h + 31 from the even and odd halves h
      float* p = y + b * 64 + 32 * h;
      _mm512_storeu_ps(p, _mm512_add_ps(_mm512_loadu_ps(p), _mm512_permutex2var_ps(acc[b][h], first, acc[b][2 + h])));
      _mm512_storeu_ps(p + 16,
                       _mm512_add_ps(_mm512_loadu_ps(p + 16), _mm512_permutex2var_ps(acc[b][h], second, acc[b][2 + h])));
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
      *(int*)(work + t * tb + tb - 64) = pl.groups;
    }
    // up to four blocks at a time: each token's planes are loaded once per four blocks (L2 -> L1 traffic
    // bound the lookups), and the blocks' codes for this pass are reused across the tokens
    for (int b = b0, nb; b < b1; b += nb) {
      nb = b1 - b >= 4 ? 4 : b1 - b >= 2 ? 2 : 1;
      for (int t = 0; t < m; ++t) {
        Planes pl = planes_at(work + t * tb, chunk);
        pl.groups = *(const int*)(work + t * tb + tb - 64);
        float* yt = y + t * ldy + (size_t)(b - b0) * 64;
        const uint8_t* pf = t == 0 && b + nb < b1 ? codes + (b + nb) * stride + (size_t)j0 * 64 : nullptr;
        if (nb == 4)
          lut_blocks<4>(codes + b * stride, stride, pl, yt, pf, j1 - j0);
        else if (nb == 2)
          lut_blocks<2>(codes + b * stride, stride, pl, yt, pf, j1 - j0);
        else
          lut_blocks<1>(codes + b * stride, stride, pl, yt, nullptr, 0);
      }
    }
  }
}

inline __m512i load16(const uint8_t* c) { return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)c)); }
inline __m512i load16(const uint16_t* c) { return _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)c)); }

// --- 16-bit codes or exact: float32 table, gathers -----------------------------------------------------

template <typename Idx>
void lut_f32(const Idx* codes, int n, int b0, int b1, const float* cbt, int K, int d, int m, const float* x,
             long ldx, float* y, long ldy, float* tables) {
  const int jc = gather_chunk(K);
  const size_t per_token = (size_t)jc * K;
  for (int j0 = 0; j0 < n; j0 += jc) {
    const int j1 = j0 + jc < n ? j0 + jc : n;
    for (int t = 0; t < m; ++t)
      for (int j = j0; j < j1; ++j) {
        const float* xj = x + t * ldx + (size_t)j * d;
        float* tab = tables + t * per_token + (size_t)(j - j0) * K;
        __m512 xb[16];
        for (int i = 0; i < d; ++i) xb[i] = _mm512_set1_ps(xj[i]);
        // K is a power of two >= 16 (padded to 256 for 8-bit codes)
        if (d == 4)
          for (int k = 0; k < K; k += 16) _mm512_storeu_ps(tab + k, dot16<4>(cbt, K, xb, d, k));
        else if (d == 2)
          for (int k = 0; k < K; k += 16) _mm512_storeu_ps(tab + k, dot16<2>(cbt, K, xb, d, k));
        else
          for (int k = 0; k < K; k += 16) _mm512_storeu_ps(tab + k, dot16<0>(cbt, K, xb, d, k));
      }
    for (int b = b0; b < b1; ++b) {
      const Idx* cbk = codes + (size_t)b * n * 64;
      for (int t = 0; t < m; ++t) {
        __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int j = j0; j < j1; ++j) {
          const float* tab = tables + t * per_token + (size_t)(j - j0) * K;
          const Idx* c = cbk + (size_t)j * 64;
          for (int q = 0; q < 4; ++q) acc[q] = _mm512_add_ps(acc[q], _mm512_i32gather_ps(load16(c + 16 * q), tab, 4));
        }
        float* yb = y + t * ldy + (size_t)(b - b0) * 64;
        for (int q = 0; q < 4; ++q) _mm512_storeu_ps(yb + 16 * q, _mm512_add_ps(_mm512_loadu_ps(yb + 16 * q), acc[q]));
      }
    }
  }
}

// --- 16-bit codes, d a multiple of 4: codewords gathered whole, no table --------------------------
// A table of 4096+ entries per sub-vector costs more to build than the rows it serves, so each
// code's codeword is gathered instead, four components (8 bytes) at a time, eight rows per gather,
// and multiplied into the activations directly.  bfloat16 activations: codewords and activations
// as bfloat16 pairs into vdpbf16ps (the rounding a bf16 model's own weights have), each gather
// shared by up to three tokens; float32 activations (or no AVX512-BF16): float16 codewords widened,
// float32 FMAs, exact.

constexpr int kCodeAhead = 48;  // sub-vectors (128 bytes of codes each) prefetched ahead

bool has_bf16_dot() { return __builtin_cpu_supports("avx512bf16"); }

// rows 4q..4q+3 x components 0..3 in acc[q] (q < 16) -> the 64 row sums added into y
inline void add_rows_4x4(const __m512* acc, float* y) {
  const __m512i perm = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  for (int g = 0; g < 4; ++g) {
    const __m512 a0 = acc[4 * g], a1 = acc[4 * g + 1], a2 = acc[4 * g + 2], a3 = acc[4 * g + 3];
    const __m512 s01 = _mm512_add_ps(_mm512_shuffle_ps(a0, a1, 0x88), _mm512_shuffle_ps(a0, a1, 0xdd));
    const __m512 s23 = _mm512_add_ps(_mm512_shuffle_ps(a2, a3, 0x88), _mm512_shuffle_ps(a2, a3, 0xdd));
    // lane 4L + i: row L of acc[4g + i]
    const __m512 s = _mm512_add_ps(_mm512_shuffle_ps(s01, s23, 0x88), _mm512_shuffle_ps(s01, s23, 0xdd));
    float* p = y + 16 * g;
    _mm512_storeu_ps(p, _mm512_add_ps(_mm512_loadu_ps(p), _mm512_permutexvar_ps(perm, s)));
  }
}

// eight code indices of 16 bits -> qword indices of quarter q of their codewords (dq quarters each)
inline __m256i quarter_index(const uint16_t* c, int dq, int q) {
  const __m256i i = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)c));
  return dq == 1 ? i : _mm256_add_epi32(_mm256_mullo_epi32(i, _mm256_set1_epi32(dq)), _mm256_set1_epi32(q));
}

// float16 codewords ([K][d] as qwords), float32 activations: one token, blocks [b0, b1)
void dot_f16(const uint16_t* codes, int n, int b0, int b1, const uint16_t* codebook, int d, int m, const float* x,
             long ldx, float* y, long ldy) {
  const int dq = d / 4;
  for (int b = b0; b < b1; ++b) {
    const uint16_t* cbk = codes + (size_t)b * n * 64;
    for (int t = 0; t < m; ++t) {
      const float* xt = x + t * ldx;
      __m512 acc[16];
      for (int q = 0; q < 16; ++q) acc[q] = _mm512_setzero_ps();
      for (int j = 0; j < n; ++j)
        for (int q = 0; q < dq; ++q) {
          const __m512 xp = _mm512_broadcast_f32x4(_mm_loadu_ps(xt + (size_t)j * d + 4 * q));
          const uint16_t* c = cbk + (size_t)j * 64;
          for (int h = 0; h < 8; ++h) {
            const __m512i w = _mm512_i32gather_epi64(quarter_index(c + 8 * h, dq, q), codebook, 8);
            acc[2 * h] = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm512_castsi512_si256(w)), xp, acc[2 * h]);
            acc[2 * h + 1] = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm512_extracti64x4_epi64(w, 1)), xp, acc[2 * h + 1]);
          }
        }
      add_rows_4x4(acc, y + t * ldy + (size_t)(b - b0) * 64);
    }
  }
}

#pragma GCC push_options
#pragma GCC target("avx512bf16")
// MT tokens of one block: cbq the codebook as bfloat16 qwords [K][dq], xq[t] token t's activations
// as bfloat16 qwords [n * dq]
template <int MT>
void dot_bf16_block(const uint16_t* cbk, int n, int dq, const uint64_t* cbq, const uint64_t* const* xq, float* const* yt) {
  __m512 acc[MT][8];
  for (int t = 0; t < MT; ++t)
    for (int h = 0; h < 8; ++h) acc[t][h] = _mm512_setzero_ps();
  for (int j = 0; j < n; ++j)
    for (int q = 0; q < dq; ++q) {
      __m512bh xp[MT];
      for (int t = 0; t < MT; ++t) xp[t] = (__m512bh)_mm512_set1_epi64((long long)xq[t][(size_t)j * dq + q]);
      const uint16_t* c = cbk + (size_t)j * 64;
      if (q == 0) {  // the gathers' latency leaves the hardware prefetcher behind on the code stream
        _mm_prefetch((const char*)(c + 64 * kCodeAhead), _MM_HINT_T0);
        _mm_prefetch((const char*)(c + 64 * kCodeAhead + 32), _MM_HINT_T0);
      }
      for (int h = 0; h < 8; ++h) {
        const __m512bh w = (__m512bh)_mm512_i32gather_epi64(quarter_index(c + 8 * h, dq, q), cbq, 8);
        for (int t = 0; t < MT; ++t) acc[t][h] = _mm512_dpbf16_ps(acc[t][h], w, xp[t]);
      }
    }
  // acc[h] lanes 2r, 2r + 1: the two halves of row 8h + r
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  for (int t = 0; t < MT; ++t)
    for (int h = 0; h < 8; h += 2) {
      const __m512 s = _mm512_add_ps(_mm512_permutex2var_ps(acc[t][h], even, acc[t][h + 1]),
                                     _mm512_permutex2var_ps(acc[t][h], odd, acc[t][h + 1]));
      float* p = yt[t] + 8 * h;
      _mm512_storeu_ps(p, _mm512_add_ps(_mm512_loadu_ps(p), s));
    }
}

void dot_bf16(const uint16_t* codes, int n, int b0, int b1, const uint16_t* codebook, int K, int d, int m,
              const float* x, long ldx, float* y, long ldy, uint16_t* work) {
  const int dq = d / 4;
  uint16_t* cbb = work;  // [K][d] bfloat16
  uint16_t* xb = work + (size_t)K * d;  // [m][n * d] bfloat16
  f16_to_bf16(codebook, (size_t)K * d, cbb);
  const int in = n * d;
  for (int t = 0; t < m; ++t)
    for (int i = 0; i < in; i += 16) {
      const __mmask16 k = in - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (in - i)) - 1);
      _mm256_mask_storeu_epi16(xb + (size_t)t * in + i, k, f32_to_bf16_16(x + t * ldx + i, in - i));
    }
  const uint64_t* cbq = (const uint64_t*)cbb;
  for (int b = b0; b < b1; ++b) {
    const uint16_t* cbk = codes + (size_t)b * n * 64;
    for (int t0 = 0; t0 < m; t0 += 3) {
      const int mt = m - t0 < 3 ? m - t0 : 3;
      const uint64_t* xq[3];
      float* yt[3];
      for (int t = 0; t < mt; ++t) {
        xq[t] = (const uint64_t*)(xb + (size_t)(t0 + t) * in);
        yt[t] = y + (t0 + t) * ldy + (size_t)(b - b0) * 64;
      }
      if (mt == 3)
        dot_bf16_block<3>(cbk, n, dq, cbq, xq, yt);
      else if (mt == 2)
        dot_bf16_block<2>(cbk, n, dq, cbq, xq, yt);
      else
        dot_bf16_block<1>(cbk, n, dq, cbq, xq, yt);
    }
  }
}
#pragma GCC pop_options

void lut_matvec(const Codes& codes, int b0, int b1, const uint16_t* codebook, int K, int d, int m, const float* x,
                long ldx, float* y, long ldy, bool exact, void* scratch) {
  if (codes.index_bytes == 2 && d % 4 == 0) {
    const uint16_t* c = (const uint16_t*)codes.data;
    if (!exact && has_bf16_dot())
      dot_bf16(c, codes.n, b0, b1, codebook, K, d, m, x, ldx, y, ldy, (uint16_t*)align64(scratch));
    else
      dot_f16(c, codes.n, b0, b1, codebook, d, m, x, ldx, y, ldy);
    return;
  }
  float* cbt = align64(scratch);
  const int Kp = K < 256 ? 256 : K;  // 8-bit codes: a whole 256-entry table
  transpose_codebook(codebook, K, Kp, d, cbt);
  if (codes.index_bytes == 2) {
    lut_f32((const uint16_t*)codes.data, codes.n, b0, b1, cbt, Kp, d, m, x, ldx, y, ldy, cbt + (size_t)Kp * d);
  } else if (exact) {
    lut_f32((const uint8_t*)codes.data, codes.n, b0, b1, cbt, Kp, d, m, x, ldx, y, ldy, cbt + (size_t)Kp * d);
  } else {
    float cmax[16] = {0};  // d <= 8 for 8-bit indices
    for (int i = 0; i < d; ++i) {
      __m512 mx = _mm512_setzero_ps();
      for (int k = 0; k < 256; k += 16) mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_loadu_ps(cbt + i * 256 + k)));
      cmax[i] = _mm512_reduce_max_ps(mx);
    }
    lut_u8((const uint8_t*)codes.data, codes.n, b0, b1, cbt, cmax, d, m, x, ldx, y, ldy, (uint8_t*)(cbt + 256 * d));
  }
}

void gemv_f16(const uint16_t* a, int rows, int cols, long lda, const float* x, float* y) {
  const int tail = cols & 15;
  const __mmask16 tm = (__mmask16)((1u << tail) - 1);
  for (int i = 0; i < rows; ++i) {
    const uint16_t* ai = a + (size_t)i * lda;
    __m512 s = _mm512_setzero_ps();
    int c = 0;
    for (; c + 16 <= cols; c += 16)
      s = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(ai + c))), _mm512_loadu_ps(x + c), s);
    if (tail)
      s = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(tm, ai + c)), _mm512_maskz_loadu_ps(tm, x + c), s);
    y[i] = _mm512_reduce_add_ps(s);
  }
}

// In-register transpose of 16 rows of 16 floats: r[c] becomes column c.
inline void transpose16(__m512 (&r)[16]) {
  __m512 t[16], u[16];
  for (int i = 0; i < 16; i += 2) t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]), t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  for (int g = 0; g < 4; ++g) {  // u[4g + q], 128-bit lane L: column 4L + q of rows 4g .. 4g + 3
    u[4 * g] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], 0x44);
    u[4 * g + 1] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], 0xee);
    u[4 * g + 2] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0x44);
    u[4 * g + 3] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0xee);
  }
  for (int q = 0; q < 4; ++q) {  // a 4 x 4 transpose of 128-bit lanes
    const __m512 a0 = _mm512_shuffle_f32x4(u[q], u[4 + q], 0x44), a1 = _mm512_shuffle_f32x4(u[q], u[4 + q], 0xee);
    const __m512 a2 = _mm512_shuffle_f32x4(u[8 + q], u[12 + q], 0x44), a3 = _mm512_shuffle_f32x4(u[8 + q], u[12 + q], 0xee);
    r[q] = _mm512_shuffle_f32x4(a0, a2, 0x88);
    r[4 + q] = _mm512_shuffle_f32x4(a0, a2, 0xdd);
    r[8 + q] = _mm512_shuffle_f32x4(a1, a3, 0x88);
    r[12 + q] = _mm512_shuffle_f32x4(a1, a3, 0xdd);
  }
}

// y[t][i] = sum_c a[i][c] bx[t][c] for m tokens: 16 rows of A transposed in registers once, then
// rank-many FMAs per token, instead of a dot product and a horizontal sum per row and token.
void lowrank_f16(const uint16_t* a, int rows, int r, long lda, int m, const float* bx, long ldbx, float* y, long ldy) {
  for (int i0 = 0; i0 < rows; i0 += 16) {
    const int nr = rows - i0 < 16 ? rows - i0 : 16;
    const __mmask16 rm = (__mmask16)((1u << nr) - 1);
    for (int c0 = 0; c0 < r; c0 += 16) {
      const int nc = r - c0 < 16 ? r - c0 : 16;
      const __mmask16 cm = (__mmask16)((1u << nc) - 1);
      __m512 col[16];
      for (int i = 0; i < 16; ++i)
        col[i] = i < nr ? _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(cm, a + (size_t)(i0 + i) * lda + c0)) : _mm512_setzero_ps();
      transpose16(col);
      for (int t = 0; t < m; ++t) {
        float* yt = y + t * ldy + i0;
        __m512 acc = c0 ? _mm512_maskz_loadu_ps(rm, yt) : _mm512_setzero_ps();
        const float* b = bx + t * ldbx + c0;
        for (int c = 0; c < nc; ++c) acc = _mm512_fmadd_ps(col[c], _mm512_set1_ps(b[c]), acc);
        _mm512_mask_storeu_ps(yt, rm, acc);
      }
    }
  }
}

// float32 -> bfloat16, round to nearest even (inputs are finite: decoded float16 codewords)
inline __m256i to_bf16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff),
                                                         _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
}


template <typename Idx>
void decode_rows(const Idx* codes, int n, int b0, int b1, const float* cbt, int K, int d, bool bf16, void* out) {
  const size_t ld = (size_t)(b1 - b0) * 64;
  for (int b = b0; b < b1; ++b)
    for (int j = 0; j < n; ++j) {
      const Idx* c = codes + ((size_t)b * n + j) * 64;
      const __m512i idx[4] = {load16(c), load16(c + 16), load16(c + 32), load16(c + 48)};
      for (int i = 0; i < d; ++i) {
        const float* plane = cbt + (size_t)i * K;
        const size_t o = ((size_t)j * d + i) * ld + (size_t)(b - b0) * 64;
        for (int q = 0; q < 4; ++q) {
          const __m512 v = _mm512_i32gather_ps(idx[q], plane, 4);
          if (bf16)
            _mm256_storeu_si256((__m256i*)((uint16_t*)out + o + 16 * q), to_bf16(v));
          else
            _mm512_storeu_ps((float*)out + o + 16 * q, v);
        }
      }
    }
}

// 8-bit codes to bfloat16: the low and high bytes of each codeword component as two 256-byte planes,
// looked up 64 rows at a time like the tables (three times the gathers' speed here).
void decode_u8_bf16(const uint8_t* codes, int n, int b0, int b1, const float* cbt, int K, int d, uint16_t* out) {
  const size_t ld = (size_t)(b1 - b0) * 64;
  const __m512i p0 = _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11), p1 = _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15);
  alignas(64) uint8_t planes[512];
  for (int i = 0; i < d; ++i) {
    for (int k = 0; k < 256; ++k) {
      const uint32_t u = k < K ? float_to_bfloat16(cbt[(size_t)i * K + k]) : 0u;
      planes[k] = (uint8_t)(u & 0xff);
      planes[256 + k] = (uint8_t)(u >> 8);
    }
    const __m512i* pp = (const __m512i*)planes;
    const __m512i tl[4] = {_mm512_load_si512(pp), _mm512_load_si512(pp + 1), _mm512_load_si512(pp + 2),
                           _mm512_load_si512(pp + 3)};
    const __m512i th[4] = {_mm512_load_si512(pp + 4), _mm512_load_si512(pp + 5), _mm512_load_si512(pp + 6),
                           _mm512_load_si512(pp + 7)};
    for (int b = b0; b < b1; ++b)
      for (int j = 0; j < n; ++j) {
        const __m512i idx = _mm512_loadu_si512(codes + ((size_t)b * n + j) * 64);
        const __mmask64 m = _mm512_movepi8_mask(idx);
        const __m512i vl = lookup(idx, m, tl), vh = lookup(idx, m, th);
        const __m512i a = _mm512_unpacklo_epi8(vl, vh), c = _mm512_unpackhi_epi8(vl, vh);
        uint16_t* o = out + ((size_t)j * d + i) * ld + (size_t)(b - b0) * 64;
        _mm512_storeu_si512(o, _mm512_permutex2var_epi64(a, p0, c));
        _mm512_storeu_si512(o + 32, _mm512_permutex2var_epi64(a, p1, c));
      }
  }
}

void decode_tile(const Codes& codes, int b0, int b1, const float* cbt, int K, int d, bool bf16, void* out) {
  if (codes.index_bytes == 1 && bf16)
    decode_u8_bf16((const uint8_t*)codes.data, codes.n, b0, b1, cbt, K, d, (uint16_t*)out);
  else if (codes.index_bytes == 1)
    decode_rows((const uint8_t*)codes.data, codes.n, b0, b1, cbt, K, d, bf16, out);
  else
    decode_rows((const uint16_t*)codes.data, codes.n, b0, b1, cbt, K, d, bf16, out);
}

void f16_to_f32(const uint16_t* h, int n, float* out) {
  for (int i = 0; i < n; i += 16) {
    const __mmask16 k = n - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1);
    _mm512_mask_storeu_ps(out + i, k, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, h + i)));
  }
}

const Kernels kTable = {"avx512", lut_matvec, scratch_bytes, decode_tile, gemv_f16, lowrank_f16, nullptr, nullptr,
                        f16_to_f32};

}  // namespace

const Kernels* avx512_kernels() { return &kTable; }

}  // namespace kbvq

#else
namespace kbvq {
const Kernels* avx512_kernels() { return nullptr; }
}  // namespace kbvq
#endif
