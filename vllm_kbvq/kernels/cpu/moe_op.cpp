// torch.ops.kbvq_cpu: the KBVQ MoE layer and linear on CPU in one native call each.
//
// One call runs every routed expert of every token: gate/up, SiLU * up, down, the shared low-rank
// term (B x once per token), the channel affine and the routing-weighted sum.  Each expert matrix is
// read from its codes: through a lookup table per token (kernels.h) while an expert has few tokens,
// or, from gemm_min_tokens tokens on, by the instruction set's many-token kernel (AMX tiles; for AVX2's
// vectors of 4 its lookup kernel, codeword FMAs, serves every count) or decoded one tile of rows at a time into a buffer the size of a tile and multiplied
// by torch's GEMM (a bf16 tile where the CPU multiplies bf16 natively, else float32: torch's bf16 GEMM
// is a scalar loop there).  No dequantized matrix is ever held whole.  Work is split over torch's
// intra-op threads.
//
// Tensors are those of vllm_kbvq.plugin.layout, with the codes re-laid out by
// vllm_kbvq.kernels.cpu_moe.cpu_layout: [(E,) S, blocks, n, 64], uint8 or int16 (read as uint16).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "kernels.h"

namespace kbvq {
namespace {

bool cpu_has_avx512() {
#if defined(__x86_64__)
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

bool cpu_has_avx2() {
#if defined(__x86_64__)
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

std::vector<std::string> supported() {
  std::vector<std::string> out;
  if (amx_kernels() && cpu_has_avx512() && amx_usable()) out.push_back("amx");
  if (avx512_kernels() && cpu_has_avx512()) out.push_back("avx512");
  if (avx2_kernels() && cpu_has_avx2()) out.push_back("avx2");
  out.push_back("portable");
  return out;
}

const Kernels* by_name(const std::string& name) {
  if (name == "amx") return amx_kernels();
  if (name == "avx512") return avx512_kernels();
  if (name == "avx2") return avx2_kernels();
  return portable_kernels();
}

const Kernels* g_kernels = nullptr;

// bfloat16 GEMMs run natively (AVX512-BF16 or AMX): torch's bf16 mm is then oneDNN's; elsewhere (AVX2,
// Zen 3, most laptops) it is a generic scalar loop 10-30x slower than its float32 GEMM.
bool cpu_has_native_bf16() {
#if defined(__x86_64__)
  return __builtin_cpu_supports("avx512bf16") || amx_usable();
#else
  return false;
#endif
}

// Decoded rows per GEMM call: a tile in L2, never a whole matrix.
constexpr size_t kTileBytes = 1024 * 1024;

const Kernels& kernels() {
  if (!g_kernels) g_kernels = by_name(supported().front());
  return *g_kernels;
}

// "auto" (the best this CPU runs) or one of supported(); returns the name now in use.
std::string set_isa(const std::string& name) {
  const auto ok = supported();
  const std::string pick = name == "auto" ? ok.front() : name;
  if (std::find(ok.begin(), ok.end(), pick) == ok.end()) {
    std::string list;
    for (const auto& s : ok) list += (list.empty() ? "" : ", ") + s;
    TORCH_CHECK(false, "KBVQ CPU kernels: instruction set '", name, "' is not available on this CPU (available: ",
                list, ", or auto)");
  }
  g_kernels = by_name(pick);
  return g_kernels->name;
}

std::string isa() { return kernels().name; }

std::string available_isas() {
  std::string list;
  for (const auto& s : supported()) list += (list.empty() ? "" : ",") + s;
  return list;
}

// Per-thread scratch, grown on demand and reused across calls.  Slots 0-2: the row kernels (on every
// thread); 3: the op's own activation buffers (on the calling thread), so a call makes no ATen ops
// but its output's allocation (each costs microseconds, and a testbed step makes ~90 calls).
uint8_t* scratch(size_t bytes, int slot) {
  thread_local std::vector<uint8_t> buf[4];
  if (buf[slot].size() < bytes) buf[slot].resize(bytes);
  return buf[slot].data();
}

const uint16_t* f16(const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr<at::Half>()); }

// the rows of a [rows, cols] float32 / bfloat16 / float16 tensor as float32
void load_rows(const at::Tensor& x, int64_t cols, int64_t rows, float* out) {
  at::Tensor xc = x.is_contiguous() ? x : x.contiguous();
  const auto dt = xc.scalar_type();
  if (dt != at::kFloat && dt != at::kBFloat16 && dt != at::kHalf) xc = xc.to(at::kFloat);
  const char* base = (const char*)xc.data_ptr();
  const size_t esz = xc.element_size();
  const auto sdt = xc.scalar_type();
  at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const char* src = base + (size_t)r * cols * esz;
      float* dst = out + r * cols;
      if (sdt == at::kFloat)
        std::memcpy(dst, src, sizeof(float) * cols);
      else if (sdt == at::kBFloat16)
        for (int64_t c = 0; c < cols; ++c) dst[c] = static_cast<float>(((const at::BFloat16*)src)[c]);
      else
        for (int64_t c = 0; c < cols; ++c) dst[c] = static_cast<float>(((const at::Half*)src)[c]);
    }
  });
}

// float32 rows into a new tensor of `x`'s dtype (float32, bfloat16 or float16; else via .to())
at::Tensor store_rows(const float* y, at::IntArrayRef shape, const at::Tensor& like) {
  const auto dt = like.scalar_type();
  at::Tensor out = at::empty(shape, like.options().dtype(dt == at::kBFloat16 || dt == at::kHalf ? dt : at::kFloat));
  const int64_t n = out.numel();
  void* dst = out.data_ptr();
  const auto odt = out.scalar_type();
  at::parallel_for(0, n, 4096, [&](int64_t i0, int64_t i1) {
    if (odt == at::kFloat)
      std::memcpy((float*)dst + i0, y + i0, sizeof(float) * (i1 - i0));
    else if (odt == at::kBFloat16)
      for (int64_t i = i0; i < i1; ++i) ((at::BFloat16*)dst)[i] = at::BFloat16(y[i]);
    else
      for (int64_t i = i0; i < i1; ++i) ((at::Half*)dst)[i] = at::Half(y[i]);
  });
  return out.scalar_type() == dt ? out : out.to(dt);
}

// an integer index tensor's values as int64
std::vector<int64_t> read_index(const at::Tensor& t) {
  std::vector<int64_t> v(t.numel());
  if (t.is_contiguous() && t.scalar_type() == at::kInt) {
    const int32_t* p = t.data_ptr<int32_t>();
    std::copy(p, p + v.size(), v.begin());
  } else if (t.is_contiguous() && t.scalar_type() == at::kLong) {
    const int64_t* p = t.data_ptr<int64_t>();
    std::copy(p, p + v.size(), v.begin());
  } else {
    const at::Tensor l = t.to(at::kLong).contiguous();
    std::copy(l.data_ptr<int64_t>(), l.data_ptr<int64_t>() + v.size(), v.begin());
  }
  return v;
}

// One expert's fused matrices (S shards of `rows` rows each), or a shared expert's linear.
struct Group {
  const uint8_t* codes;  // [S][blocks][n][64]
  int index_bytes, S, blocks, n, K, d, rows, r;
  const uint16_t* codebook;  // [S][K][d]
  const uint16_t* lr_a;      // [S * rows][r] or null
  const uint16_t* affine_s;  // [S * rows]
  const uint16_t* affine_b;
  size_t shard_bytes() const { return (size_t)blocks * n * 64 * index_bytes; }
  int in() const { return n * d; }
};

// The tensors of one group argument list (codes, codebook, lr_a, lr_b, affine_s, affine_b), checked.
struct GroupTensors {
  at::Tensor codes, codebook, lr_a, lr_b, affine_s, affine_b;
  bool has_lr;
  int experts, S, blocks, n, K, d, rows, r;

  GroupTensors(const char* what, bool moe, const at::Tensor& c, const at::Tensor& cb,
               const std::optional<at::Tensor>& a, const std::optional<at::Tensor>& b, const at::Tensor& s,
               const at::Tensor& sh) {
    const int lead = moe ? 1 : 0;
    TORCH_CHECK(c.dim() == 4 + lead && c.size(-1) == 64, what, "_vq_codes must be in the CPU layout [",
                moe ? "E, " : "", "S, blocks, n, 64] (vllm_kbvq.kernels.cpu_moe.cpu_layout), got ", c.sizes());
    TORCH_CHECK(c.scalar_type() == at::kByte || c.scalar_type() == at::kShort, what,
                "_vq_codes must be uint8 or int16, got ", c.scalar_type());
    TORCH_CHECK(cb.dim() == 3 + lead && cb.scalar_type() == at::kHalf, what,
                "_vq_codebook must be float16 [", moe ? "E, " : "", "S, K, d], got ", cb.scalar_type(), " ",
                cb.sizes());
    codes = c.contiguous();
    codebook = cb.contiguous();
    experts = moe ? c.size(0) : 1;
    S = c.size(lead);
    blocks = c.size(lead + 1);
    n = c.size(lead + 2);
    K = cb.size(-2);
    d = cb.size(-1);
    TORCH_CHECK(cb.size(lead) == S && (!moe || cb.size(0) == experts), what, "_vq_codebook ", cb.sizes(),
                " does not match codes ", c.sizes());
    TORCH_CHECK(K <= (c.scalar_type() == at::kByte ? 256 : 65536), what, "_vq_codebook has ", K,
                " codewords, more than its ", c.scalar_type(), " codes can index");
    TORCH_CHECK(s.scalar_type() == at::kHalf && sh.scalar_type() == at::kHalf && s.dim() == 1 + lead &&
                    s.sizes() == sh.sizes() && s.size(-1) % S == 0,
                what, "_affine_s/_affine_b must be float16 [", moe ? "E, " : "", "rows], got ", s.sizes());
    affine_s = s.contiguous();
    affine_b = sh.contiguous();
    rows = s.size(-1) / S;
    TORCH_CHECK(rows <= blocks * 64 && rows > (blocks - 1) * 64, what, "_vq_codes have ", blocks,
                " blocks of 64 rows for ", rows, " rows per shard");
    has_lr = a.has_value() && b.has_value();
    TORCH_CHECK(a.has_value() == b.has_value(), what, "_lr_a and ", what, "_lr_b come together");
    r = 0;
    if (has_lr) {
      TORCH_CHECK(a->scalar_type() == at::kHalf && b->scalar_type() == at::kHalf, what, "_lr_a/_lr_b must be float16");
      TORCH_CHECK(a->dim() == 2 + lead && a->size(-2) == S * rows && b->dim() == 2 && b->size(1) == n * d &&
                      a->size(-1) == b->size(0),
                  what, "_lr_a ", a->sizes(), " / ", what, "_lr_b ", b->sizes(), " do not fit rows ", S * rows,
                  " and input ", n * d);
      lr_a = a->contiguous();
      lr_b = b->contiguous();
      r = b->size(0);
    }
  }

  Group expert(int e) const {
    Group g;
    g.index_bytes = codes.element_size();
    g.S = S, g.blocks = blocks, g.n = n, g.K = K, g.d = d, g.rows = rows, g.r = r;
    g.codes = (const uint8_t*)codes.data_ptr() + (size_t)e * S * g.shard_bytes();
    g.codebook = f16(codebook) + (size_t)e * S * K * d;
    g.lr_a = has_lr ? f16(lr_a) + (size_t)e * S * rows * r : nullptr;
    g.affine_s = f16(affine_s) + (size_t)e * S * rows;
    g.affine_b = f16(affine_b) + (size_t)e * S * rows;
    return g;
  }

  const uint16_t* basis() const { return has_lr ? f16(lr_b) : nullptr; }
  int in() const { return n * d; }
};

// W_s x for the rows [64 b0, 64 b1) of shard s into y [m][64 (b1 - b0)]: decode a tile of rows at a
// time, transposed (float32, or bfloat16 when the activations are and the CPU multiplies bf16 natively),
// and hand it to torch's GEMM.
void tile_gemm(const Group& g, int s, int b0, int b1, int m, const float* X, long ldx, bool bf16, float* y) {
  static const bool native_bf16 = cpu_has_native_bf16();
  bf16 = bf16 && native_bf16;
  const Kernels& k = kernels();
  const int in = g.in(), d = g.d, ld = (b1 - b0) * 64;
  // float32 tiles row-major where the instruction set decodes them so (one codeword copy per code),
  // multiplied transposed; else decode_tile's transposed tiles, with the codebook as float32 planes
  const bool row_major = !bf16 && k.decode_f32;
  const size_t esz = bf16 ? 2 : 4;
  const int tile_blocks = std::max<int>(1, kTileBytes / (64 * in * esz));
  float* cb = (float*)scratch(sizeof(float) * (size_t)g.K * d + (size_t)tile_blocks * 64 * in * esz, 1);
  uint8_t* tile = (uint8_t*)(cb + (size_t)g.K * d);
  const uint16_t* cbh = g.codebook + (size_t)s * g.K * d;
  if (row_major)
    k.f16_to_f32(cbh, g.K * d, cb);  // [K][d]
  else
    for (int kk = 0; kk < g.K; ++kk)
      for (int i = 0; i < d; ++i) cb[(size_t)i * g.K + kk] = half_to_float(cbh[(size_t)kk * d + i]);  // [d][K]
  const auto dt = bf16 ? at::kBFloat16 : at::kFloat;
  at::Tensor x = at::from_blob(const_cast<float*>(X), {m, in}, {ldx, 1}, at::TensorOptions().dtype(at::kFloat));
  if (bf16) x = x.to(at::kBFloat16);
  const Codes codes{g.codes + (size_t)s * g.shard_bytes(), g.index_bytes, g.n};
  for (int t0 = b0; t0 < b1; t0 += tile_blocks) {
    const int t1 = std::min(b1, t0 + tile_blocks), nrows = (t1 - t0) * 64;
    at::Tensor wt;
    if (row_major) {
      k.decode_f32(codes, t0, t1, cb, g.K, d, (float*)tile);
      wt = at::from_blob(tile, {nrows, in}, at::TensorOptions().dtype(at::kFloat)).t();
    } else {
      k.decode_tile(codes, t0, t1, cb, g.K, d, bf16, tile);
      wt = at::from_blob(tile, {in, nrows}, at::TensorOptions().dtype(dt));
    }
    at::Tensor out = at::from_blob(y + (t0 - b0) * 64, {m, nrows}, {ld, 1}, at::TensorOptions().dtype(at::kFloat));
    if (bf16)
      out.copy_(at::mm(x, wt));
    else
      at::mm_out(out, x, wt);
  }
}

// Y[t][s * rows + r] = (1 + affine_s) * (W_s x_t + A (B x_t)) + affine_b for the rows r of blocks
// [b0, b1) of shard s and the m tokens X (rows ldx apart); BX: B x_t (rows ldbx apart) or null.
void rows_forward(const Group& g, int s, int b0, int b1, int m, const float* X, long ldx, const float* BX, long ldbx,
                  float* Y, long ldy, bool gemm, bool bf16) {
  const Kernels& k = kernels();
  const int nrows = (b1 - b0) * 64;
  const int r0 = b0 * 64, r1 = std::min(b1 * 64, g.rows), row0 = s * g.rows;
  float* ybuf = (float*)scratch(sizeof(float) * (size_t)nrows * (2 * m + 2), 0);
  float *lr = ybuf + (size_t)nrows * m, *scale = lr + (size_t)nrows * m, *shift = scale + nrows;  // lr: [m][nrows]
  k.f16_to_f32(g.affine_s + row0 + r0, r1 - r0, scale);  // applied as 1 + s
  k.f16_to_f32(g.affine_b + row0 + r0, r1 - r0, shift);
  const Codes codes{g.codes + (size_t)s * g.shard_bytes(), g.index_bytes, g.n};
  if (gemm && g.d == k.lut_all_tokens_d) gemm = false;  // its lookup kernel is also its many-token kernel
  if (gemm && bf16 && k.gemm_bf16 && g.d % 2 == 0) {
    std::fill(ybuf, ybuf + (size_t)nrows * m, 0.f);
    k.gemm_bf16(codes, b0, b1, g.codebook + (size_t)s * g.K * g.d, g.K, g.d, m, X, ldx, ybuf, nrows,
                scratch(k.gemm_scratch_bytes(g.n, g.K, g.d, m), 2));
  } else if (gemm) {
    tile_gemm(g, s, b0, b1, m, X, ldx, bf16, ybuf);
  } else {
    std::fill(ybuf, ybuf + (size_t)nrows * m, 0.f);
    k.lut_matvec(codes, b0, b1, g.codebook + (size_t)s * g.K * g.d, g.K, g.d, m, X, ldx, ybuf, nrows, !bf16,
                 scratch(k.scratch_bytes(g.n, g.K, g.d, m), 2));
  }
  const uint16_t* a = g.lr_a ? g.lr_a + (size_t)(row0 + r0) * g.r : nullptr;
  if (a && k.lowrank)
    k.lowrank(a, r1 - r0, g.r, g.r, m, BX, ldbx, lr, nrows);
  else if (a)
    for (int t = 0; t < m; ++t) k.gemv_f16(a, r1 - r0, g.r, g.r, BX + t * ldbx, lr + (size_t)t * nrows);
  for (int t = 0; t < m; ++t) {
    const float *yt = ybuf + (size_t)t * nrows, *lt = lr + (size_t)t * nrows;
    float* out = Y + t * ldy + row0;
    for (int r = r0; r < r1; ++r) out[r] = (yt[r - r0] + (a ? lt[r - r0] : 0.f)) * (1.f + scale[r - r0]) + shift[r - r0];
  }
}

// A unit of parallel work: blocks [b0, b1) of shard s of expert e, on its tokens.
struct Item {
  int e, s, b0, b1;
};

// Splits each (expert, shard) into row chunks so there are a few items per thread.
std::vector<Item> plan(const std::vector<int>& experts, int S, int blocks) {
  std::vector<Item> items;
  const int threads = at::get_num_threads();
  const int units = std::max<int>(1, experts.size() * S);
  int per = std::max(1, std::min(blocks, (4 * threads + units - 1) / units));
  if (threads == 1) per = 1;
  const int chunk = std::max(1, (blocks + per - 1) / per);
  for (int e : experts)
    for (int s = 0; s < S; ++s)
      for (int b = 0; b < blocks; b += chunk) items.push_back({e, s, b, std::min(blocks, b + chunk)});
  return items;
}

// Runs every (expert, shard, chunk) of `items`: expert e's tokens are X rows [off[e], off[e] + cnt[e]).
void run_items(const GroupTensors& gt, const std::vector<Item>& items, const std::vector<int64_t>& off,
               const std::vector<int64_t>& cnt, const float* X, long ldx, const float* BX, long ldbx, float* Y,
               long ldy, int64_t gemm_min_tokens, bool bf16) {
  at::parallel_for(0, items.size(), 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const Item& it = items[i];
      const int64_t o = off[it.e], m = cnt[it.e];
      rows_forward(gt.expert(it.e), it.s, it.b0, it.b1, m, X + o * ldx, ldx, BX ? BX + o * ldbx : nullptr, ldbx,
                   Y + o * ldy, ldy, m >= gemm_min_tokens, bf16);
    }
  });
}

// out[p] = B x[p] for the P rows of X (ldx apart), out rows r apart.
void basis_all(const uint16_t* B, int r, int in, int64_t P, const float* X, long ldx, float* out) {
  const Kernels& k = kernels();
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) k.gemv_f16(B, r, in, in, X + p * ldx, out + p * r);
  });
}

at::Tensor moe(const at::Tensor& x, const at::Tensor& topk_weights, const at::Tensor& topk_ids,
               const std::optional<at::Tensor>& expert_map, const at::Tensor& w13_codes, const at::Tensor& w13_codebook,
               const std::optional<at::Tensor>& w13_lr_a, const std::optional<at::Tensor>& w13_lr_b,
               const at::Tensor& w13_affine_s, const at::Tensor& w13_affine_b, const at::Tensor& w2_codes,
               const at::Tensor& w2_codebook, const std::optional<at::Tensor>& w2_lr_a,
               const std::optional<at::Tensor>& w2_lr_b, const at::Tensor& w2_affine_s,
               const at::Tensor& w2_affine_b, int64_t gemm_min_tokens) {
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu(), "x must be a CPU [tokens, hidden] tensor");
  const GroupTensors g13("w13", true, w13_codes, w13_codebook, w13_lr_a, w13_lr_b, w13_affine_s, w13_affine_b);
  const GroupTensors g2("w2", true, w2_codes, w2_codebook, w2_lr_a, w2_lr_b, w2_affine_s, w2_affine_b);
  const int64_t T = x.size(0), H = x.size(1), top = topk_ids.size(1), E = g13.experts;
  TORCH_CHECK(g13.S == 2 && g13.in() == H, "w13 must fuse gate and up over the hidden size ", H, ", got ", g13.S,
              " shards over ", g13.in());
  const int I = g13.rows;
  TORCH_CHECK(g2.S == 1 && g2.experts == E && g2.in() == I && g2.rows == H, "w2 must map ", I, " to ", H,
              " for ", E, " experts");
  TORCH_CHECK(topk_ids.dim() == 2 && topk_ids.size(0) == T && topk_weights.sizes() == topk_ids.sizes(),
              "topk_ids/topk_weights must be [tokens, top_k]");
  if (T == 0) return at::empty({T, H}, x.options());

  // local slot of every (token, k); -1: another expert-parallel rank's expert
  std::vector<int64_t> slot = read_index(topk_ids);
  if (expert_map.has_value()) {
    const std::vector<int64_t> map = read_index(*expert_map);
    for (auto& v : slot) {
      TORCH_CHECK(v >= 0 && v < (int64_t)map.size(), "expert id ", v, " outside the expert map of ", map.size());
      v = map[v];
    }
  }
  std::vector<int64_t> cnt(E, 0), off(E, 0);
  for (int64_t i = 0; i < T * top; ++i) {
    TORCH_CHECK(slot[i] < E, "expert slot ", slot[i], " out of range for ", E, " local experts");
    if (slot[i] >= 0) ++cnt[slot[i]];
  }
  std::vector<int> used;
  int64_t P = 0;
  for (int e = 0; e < E; ++e) {
    off[e] = P;
    P += cnt[e];
    if (cnt[e]) used.push_back(e);
  }
  std::vector<int64_t> pair_of(T * top, -1), token(P), fill(off);
  for (int64_t i = 0; i < T * top; ++i)
    if (slot[i] >= 0) {
      pair_of[i] = fill[slot[i]]++;
      token[pair_of[i]] = i / top;
    }
  std::vector<float> w(T * top);
  if (topk_weights.is_contiguous() && topk_weights.scalar_type() == at::kFloat) {
    std::copy(topk_weights.data_ptr<float>(), topk_weights.data_ptr<float>() + T * top, w.begin());
  } else {
    const at::Tensor wf = topk_weights.to(at::kFloat).contiguous();
    std::copy(wf.data_ptr<float>(), wf.data_ptr<float>() + T * top, w.begin());
  }

  const bool bf16 = x.scalar_type() == at::kBFloat16;
  const int r13 = g13.has_lr ? g13.r : 0, r2 = g2.has_lr ? g2.r : 0;
  // the op's buffers: routed inputs in pair order (grouped by expert) [P][H], gate/up [P][2I],
  // SiLU * up [P][I], down [P][H], B x [P][r13] and [P][r2], tokens' inputs [T][H], output [T][H],
  // B x per token [T][r13]
  float* X = (float*)scratch(sizeof(float) * (size_t)(P * (2 * H + 3 * I + r13 + r2) + T * (2 * H + r13)), 3);
  float *hp = X + P * H, *act = hp + P * 2 * I, *y2 = act + P * I, *bx = y2 + P * H, *bx2 = bx + P * r13;
  float *xt = bx2 + P * r2, *o = xt + T * H, *bxt = o + T * H;
  load_rows(x, H, T, xt);  // converted once, then copied in pair order
  for (int64_t p = 0; p < P; ++p) std::memcpy(X + p * H, xt + token[p] * H, sizeof(float) * H);
  if (g13.has_lr) {  // B x once per token, then in pair order
    basis_all(g13.basis(), g13.r, H, T, xt, H, bxt);
    for (int64_t p = 0; p < P; ++p) std::memcpy(bx + p * r13, bxt + token[p] * r13, sizeof(float) * r13);
  }
  run_items(g13, plan(used, 2, g13.blocks), off, cnt, X, H, g13.has_lr ? bx : nullptr, g13.r, hp, 2 * I,
            gemm_min_tokens, bf16);
  at::parallel_for(0, P, 16, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      for (int i = 0; i < I; ++i) {
        const float gate = hp[p * 2 * I + i];
        act[p * I + i] = gate / (1.f + std::exp(-gate)) * hp[p * 2 * I + I + i];
      }
  });
  if (g2.has_lr) basis_all(g2.basis(), g2.r, I, P, act, I, bx2);
  run_items(g2, plan(used, 1, g2.blocks), off, cnt, act, I, g2.has_lr ? bx2 : nullptr, g2.r, y2, H, gemm_min_tokens,
            bf16);
  // the routing-weighted sum, one token per task
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      float* ot = o + t * H;
      std::fill(ot, ot + H, 0.f);
      for (int64_t k = 0; k < top; ++k) {
        const int64_t p = pair_of[t * top + k];
        if (p < 0) continue;
        const float wk = w[t * top + k];
        for (int64_t h = 0; h < H; ++h) ot[h] += wk * y2[p * H + h];
      }
    }
  });
  return store_rows(o, {T, H}, x);
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& codebook,
                  const std::optional<at::Tensor>& lr_a, const std::optional<at::Tensor>& lr_b,
                  const at::Tensor& affine_s, const at::Tensor& affine_b, int64_t gemm_min_tokens) {
  TORCH_CHECK(x.device().is_cpu(), "x must be a CPU tensor");
  const GroupTensors g("linear", false, codes, codebook, lr_a, lr_b, affine_s, affine_b);
  const int64_t in = g.n * g.d, outf = (int64_t)g.S * g.rows;
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == in, "x of shape ", x.sizes(), " has ", x.size(-1), " features, the matrix takes ", in);
  const int64_t T = x.numel() / in;
  const int r = g.has_lr ? g.r : 0;
  float* xf = (float*)scratch(sizeof(float) * (size_t)T * (in + r + outf), 3);
  float *bx = xf + T * in, *yf = bx + T * r;
  if (T) {
    load_rows(x.reshape({T, in}), in, T, xf);
    if (g.has_lr) basis_all(g.basis(), g.r, in, T, xf, in, bx);
    run_items(g, plan({0}, g.S, g.blocks), {0}, {T}, xf, in, g.has_lr ? bx : nullptr, g.r, yf, outf, gemm_min_tokens,
              x.scalar_type() == at::kBFloat16);
  }
  auto shape = x.sizes().vec();
  shape.back() = outf;
  return store_rows(yf, shape, x);
}

}  // namespace
}  // namespace kbvq

TORCH_LIBRARY(kbvq_cpu, m) {
  m.def(
      "moe(Tensor x, Tensor topk_weights, Tensor topk_ids, Tensor? expert_map, Tensor w13_codes, "
      "Tensor w13_codebook, Tensor? w13_lr_a, Tensor? w13_lr_b, Tensor w13_affine_s, Tensor w13_affine_b, "
      "Tensor w2_codes, Tensor w2_codebook, Tensor? w2_lr_a, Tensor? w2_lr_b, Tensor w2_affine_s, "
      "Tensor w2_affine_b, int gemm_min_tokens) -> Tensor");
  m.def(
      "linear(Tensor x, Tensor codes, Tensor codebook, Tensor? lr_a, Tensor? lr_b, Tensor affine_s, "
      "Tensor affine_b, int gemm_min_tokens) -> Tensor");
  m.def("set_isa(str name) -> str", &kbvq::set_isa);
  m.def("isa() -> str", &kbvq::isa);
  m.def("available_isas() -> str", &kbvq::available_isas);
}

TORCH_LIBRARY_IMPL(kbvq_cpu, CPU, m) {
  m.impl("moe", &kbvq::moe);
  m.impl("linear", &kbvq::linear);
}
