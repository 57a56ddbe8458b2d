"""The native CPU kernels against the torch implementation (the oracle), every instruction-set path.

Random shapes, routings (experts with no token, expert-parallel ``-1`` slots), bits 2/3/4 with the
project's vector dims and a 16-bit index width, ranks 0 and > 0, float32 and bfloat16 inputs, the
lookup-table and the tile-GEMM regimes. Float32 inputs get float32 tables (or float32 codeword sums) on
every path; with bfloat16 inputs the AVX-512 and AVX2 paths quantise their 8-bit codes' tables to 16
bits, far below bfloat16's own rounding.
"""
import os
import subprocess
import sys

import pytest
import torch

from tiny_models import ARCH_NAMES, MIXED, TUNED
from vllm_kbvq.format import KBVQConfig
from vllm_kbvq.kernels import cpu_moe, dispatch
from vllm_kbvq.kernels.torch_moe import kbvq_linear_torch, kbvq_moe_torch
from vllm_kbvq.plugin.cpu_model import KernelExperts, load_kbvq_model
from vllm_kbvq.plugin.layout import moe_layouts
from vllm_kbvq.reference import KBVQExperts

if not cpu_moe.available():
    pytest.skip("the native CPU kernels did not build here", allow_module_level=True)

ISAS = cpu_moe.available_isas()
# max |native - torch| / max |torch|: float32 tables sum in another order (~1e-7)
RTOL = {"amx": 1e-5, "avx512": 1e-5, "avx2": 1e-5, "portable": 1e-5,
        "bfloat16": 2 ** -7}  # both sides round to bfloat16 last: one ulp of the largest value, twice
LUT, GEMM = 10**9, 1  # gemm_min_tokens forcing one regime
CONFIGS = [(2, 4), (3, 4), (4, 2), (2, 8), (2, 2)]  # (bits, vector_dim): 8-, 12-, 8-, 16- and 4-bit indices


@pytest.fixture(params=ISAS)
def isa(request):
    before = cpu_moe.isa()
    assert cpu_moe.set_isa(request.param) == request.param
    yield request.param
    cpu_moe.set_isa(before)


def _group(g, cfg, experts, shards, rows, inp, rank):
    """Random runtime tensors of one matrix group (``experts`` None: a linear), as GroupLayout.shapes()."""
    lead = () if experts is None else (experts,)
    dtype = moe_layouts(cfg, 64, 64)["w13"].index_dtype
    idx = torch.randint(0, cfg.codebook_size, (*lead, shards * rows, inp // cfg.vector_dim), generator=g).to(dtype)
    cb = (torch.randn(*lead, shards, cfg.codebook_size, cfg.vector_dim, generator=g) * 0.2).half()

    def h(*s, scale=0.2):
        return (torch.randn(*s, generator=g) * scale).half()

    a = h(*lead, shards * rows, rank) if rank else None
    b = h(rank, inp) if rank else None
    return [idx, cb, a, b, h(*lead, shards * rows), h(*lead, shards * rows)]


def _native(group, shards):
    return [cpu_moe.cpu_layout(group[0], shards), *group[1:]]


def _close(out, ref, isa, what):
    err = float((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30))
    assert err <= RTOL[isa], f"{what}: relative error {err:.2e} > {RTOL[isa]:.0e}"


CASES = [  # hidden, inter, experts, top_k, tokens, rank
    (128, 96, 8, 2, 5, 8), (256, 200, 6, 3, 3, 0), (64, 136, 5, 4, 1, 4), (192, 64, 16, 2, 33, 6)]


# 65536-entry codebooks (16-bit indices) are slow to build tables for: two cases of them
MOE_PARAMS = [(b, d, c) for b, d in CONFIGS for c in range(len(CASES)) if b * d < 16 or c % 2 == 0]


@pytest.mark.parametrize("bits,d,case", MOE_PARAMS, ids=[f"w{b}d{d}-{c}" for b, d, c in MOE_PARAMS])
def test_moe_matches_torch(isa, bits, d, case):
    hidden, inter, experts, top_k, tokens, rank = CASES[case]
    g = torch.Generator().manual_seed(100 * case + 10 * bits + d)
    cfg = KBVQConfig(bits=bits, vector_dim=d, arch="mixtral", rank={})
    w13 = _group(g, cfg, experts, 2, inter, hidden, 2 * rank)
    w2 = _group(g, cfg, experts, 1, hidden, inter, rank)
    x = torch.randn(tokens, hidden, generator=g)
    # the last expert gets no token; some (token, k) go to another expert-parallel rank's experts
    logits = torch.randn(tokens, experts + 3, generator=g)
    logits[:, experts - 1] = -1e9
    weights, ids = logits.softmax(-1).topk(top_k)
    expert_map = torch.cat([torch.arange(experts, dtype=torch.int32), torch.full((3,), -1, dtype=torch.int32)])
    n13, n2 = _native(w13, 2), _native(w2, 1)
    for dtype in (torch.float32, torch.bfloat16):
        xd = x.to(dtype)
        ref = kbvq_moe_torch(xd, weights, ids, expert_map, *w13, *w2)
        for regime, gm in (("lut", LUT), ("gemm", GEMM), ("mixed", 3)):
            out = cpu_moe.kbvq_moe_cpu(xd, weights, ids, expert_map, *n13, *n2, gemm_min_tokens=gm)
            assert out.dtype == dtype and out.shape == x.shape
            _close(out, ref, isa if dtype == torch.float32 else "bfloat16", f"{regime} {dtype}")


@pytest.mark.parametrize("bits,d", CONFIGS[:3], ids=[f"w{b}d{d}" for b, d in CONFIGS[:3]])
@pytest.mark.parametrize("fused,rank", [(True, 6), (False, 0), (False, 3), (True, 20)])  # 20: two 16-wide rank chunks
def test_linear_matches_torch(isa, bits, d, fused, rank):
    g = torch.Generator().manual_seed(bits * 7 + rank)
    cfg = KBVQConfig(bits=bits, vector_dim=d, arch="qwen2_moe", rank={})
    shards = 2 if fused else 1
    lin = _group(g, cfg, None, shards, 72, 160, rank)
    x = torch.randn(3, 5, 160, generator=g)  # leading dims kept
    ref = kbvq_linear_torch(x, *lin)
    for gm in (LUT, GEMM):
        out = cpu_moe.kbvq_linear_cpu(x, *_native(lin, shards), gemm_min_tokens=gm)
        assert out.shape == (3, 5, shards * 72)
        _close(out, ref, isa, f"gemm_min_tokens={gm}")


@pytest.mark.parametrize("bits,d", CONFIGS[:3], ids=[f"w{b}d{d}" for b, d in CONFIGS[:3]])
def test_gemm_bf16_token_groups(isa, bits, d):
    """bf16 GEMM regime past one 16-token tile (AMX: a partial last group) with an input that is no
    multiple of 32 (padded k-steps)."""
    g = torch.Generator().manual_seed(50 + bits)
    cfg = KBVQConfig(bits=bits, vector_dim=d, arch="qwen2_moe", rank={})
    lin = _group(g, cfg, None, 1, 136, 200, 4)
    x = torch.randn(37, 200, generator=g).bfloat16()
    ref = kbvq_linear_torch(x, *lin)
    _close(cpu_moe.kbvq_linear_cpu(x, *_native(lin, 1), gemm_min_tokens=GEMM), ref, "bfloat16", "37 tokens")


def test_dispatch_routes_by_layout():
    """The custom ops send CPU-layout codes to the kernels and plain runtime codes to torch."""
    g = torch.Generator().manual_seed(0)
    cfg = KBVQConfig(bits=2, vector_dim=4, arch="mixtral", rank={})
    w13, w2 = _group(g, cfg, 4, 2, 64, 128, 4), _group(g, cfg, 4, 1, 128, 64, 2)
    x = torch.randn(3, 128, generator=g)
    w, ids = torch.rand(3, 2, generator=g), torch.randint(0, 4, (3, 2), generator=g)
    plain = torch.ops.kbvq.moe(x, w, ids, None, *w13, *w2)
    torch.testing.assert_close(plain, kbvq_moe_torch(x, w, ids, None, *w13, *w2), atol=0, rtol=0)
    native = torch.ops.kbvq.moe(x, w, ids, None, *_native(w13, 2), *_native(w2, 1))
    _close(native, plain, cpu_moe.isa(), "dispatch")
    assert dispatch.uses_cpu_kernels(torch.device("cpu"))
    # bound once per layer: the native op for CPU-layout codes (same result), the custom op otherwise
    assert dispatch.bind("moe", w13[0]) is torch.ops.kbvq.moe
    bound = dispatch.bind("moe", _native(w13, 2)[0])
    torch.testing.assert_close(bound(x, w, ids, None, *_native(w13, 2), *_native(w2, 1)), native, atol=0, rtol=0)
    lin = _group(g, cfg, None, 1, 64, 128, 0)
    torch.testing.assert_close(dispatch.bind("linear", _native(lin, 1)[0])(x, *_native(lin, 1)),
                               torch.ops.kbvq.linear(x, *_native(lin, 1)), atol=0, rtol=0)


def test_switch_point_by_width_and_rows():
    """The dispatch table's switch point for codes of each width, and for matrices under CPU_GEMM_SMALL_ROWS rows."""
    isa = cpu_moe.isa()
    for dtype, width in ((torch.uint8, 1), (torch.int16, 2)):
        for rows in (144, 2048):
            codes = cpu_moe.cpu_layout(torch.zeros(rows, 8, dtype=torch.int32).to(dtype), 1)
            want = dispatch.CPU_GEMM_MIN_TOKENS.get((isa, width), dispatch.CPU_GEMM_MIN_TOKENS_OTHER)
            if rows < dispatch.CPU_GEMM_SMALL_ROWS:
                want = dispatch.CPU_GEMM_MIN_TOKENS_SMALL.get((isa, width), want)
            assert dispatch.cpu_gemm_min_tokens(codes) == want
            assert dispatch.bind("linear", codes).keywords == {"gemm_min_tokens": want}


def test_cpu_layout():
    """Rows padded per shard to whole 64-row blocks, 64 rows of one sub-vector contiguous, uint16 kept."""
    codes = torch.randint(0, 65536, (3, 2 * 70, 5), dtype=torch.int32)
    lay = cpu_moe.cpu_layout(codes, 2)
    assert lay.shape == (3, 2, 2, 5, 64) and lay.dtype == torch.int16
    back = lay.to(torch.int32) & 0xFFFF  # int16 holds the uint16 bits
    for s in range(2):
        full = back[:, s].transpose(-1, -2).reshape(3, 128, 5)
        assert torch.equal(full[:, :70], codes[:, s * 70:(s + 1) * 70])
        assert not full[:, 70:].any()
    small = torch.randint(0, 256, (64, 3), dtype=torch.uint8)
    assert torch.equal(cpu_moe.cpu_layout(small, 1)[0, 0], small.T)
    with pytest.raises(ValueError, match="equal matrices"):
        cpu_moe.cpu_layout(small, 3)


def test_bad_input_is_named():
    g = torch.Generator().manual_seed(1)
    cfg = KBVQConfig(bits=2, vector_dim=4, arch="mixtral", rank={})
    w13, w2 = _group(g, cfg, 2, 2, 64, 64, 0), _group(g, cfg, 2, 1, 64, 64, 0)
    x, w, ids = torch.randn(2, 64), torch.rand(2, 1), torch.zeros(2, 1, dtype=torch.long)
    with pytest.raises(RuntimeError, match="w13_vq_codes must be in the CPU layout"):
        cpu_moe.kbvq_moe_cpu(x, w, ids, None, *w13, *_native(w2, 1), gemm_min_tokens=LUT)
    with pytest.raises(RuntimeError, match="hidden size 32"):
        cpu_moe.kbvq_moe_cpu(x[:, :32], w, ids, None, *_native(w13, 2), *_native(w2, 1), gemm_min_tokens=LUT)
    with pytest.raises(RuntimeError, match="not available on this CPU.*available: "):
        cpu_moe.set_isa("sse1")
    with pytest.raises(RuntimeError, match="in the CPU kernels' layout on meta"):
        dispatch.bind("moe", _native(w13, 2)[0].to("meta"))


def test_failed_build_warns_and_falls_back(tmp_path):
    """No compiler: one warning naming the way to see the build, and the torch path."""
    code = ("import logging, torch; logging.basicConfig();"
            "from vllm_kbvq.kernels import cpu_moe, dispatch;"
            "print('available', cpu_moe.available(), dispatch.uses_cpu_kernels(torch.device('cpu')))")
    env = {**os.environ, "KBVQ_CACHE_DIR": str(tmp_path), "CXX": str(tmp_path / "no-compiler")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "available False False" in proc.stdout
    assert proc.stderr.count("native CPU kernels are unavailable") == 1
    assert "python -m vllm_kbvq.kernels.cpu_moe --verbose" in proc.stderr


_VARIANTS = {"uniform": {}, "rowscale-ft": TUNED, "mixed": MIXED}


@pytest.mark.parametrize("arch,variant", [(a, "uniform") for a in ARCH_NAMES] + [
    ("qwen2_moe", "rowscale-ft"), ("deepseek_v2", "rowscale-ft")] + [(a, "mixed") for a in ARCH_NAMES])
def test_reference_runtime_on_the_kernels(arch, variant, kbvq_tiny):
    """load_kbvq_model on CPU runs the kernels by default: its logits are the torch path's, and so are
    its greedy tokens (also for a checkpoint with row scales folded into affine_s and tuned tensors, and
    for one of mixed widths: one kernel call per bank of experts of one width pair)."""
    path = kbvq_tiny(arch, **_VARIANTS[variant])
    torch_model = load_kbvq_model(path, cpu_kernels=False)
    native = load_kbvq_model(path)
    assert all(isinstance(m, KernelExperts) for m in native.modules() if isinstance(m, KBVQExperts))
    ids = torch.randint(1, 300, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = torch_model(ids).logits, native(ids).logits
        _close(b, a, cpu_moe.isa(), arch)
        greedy = [m.generate(ids[:1], max_new_tokens=6, do_sample=False)[0].tolist() for m in (torch_model, native)]
    assert greedy[0] == greedy[1]


@pytest.mark.parametrize("bits,d", [(2, 4), (4, 2)], ids=["w2d4", "w4d2"])
def test_outlier_input_channels_keep_precision(isa, bits, d):
    """Activations with outlier channels (LLMs have them): a sub-vector of the input 1e4 times the others,
    whose codes select a zero codeword, must not cost the other sub-vectors their precision."""
    g = torch.Generator().manual_seed(5)
    cfg = KBVQConfig(bits=bits, vector_dim=d, arch="qwen2_moe", rank={})
    idx, cb, *rest = _group(g, cfg, None, 1, 352, 512, 0)  # 6 row blocks: a pass of 4, one of 2
    cb[0, 0] = 0
    idx[:, 28 // d:32 // d] = 0
    x = torch.randn(2, 512, generator=g)
    x[:, 28:32] = 1e4
    x = x.bfloat16()  # the paths with 16-bit tables (AVX-512: 8-bit codes; AVX2: 8-bit codes of d = 2)
    ref = kbvq_linear_torch(x, idx, cb, *rest)
    _close(cpu_moe.kbvq_linear_cpu(x, *_native([idx, cb, *rest], 1), gemm_min_tokens=LUT), ref, "bfloat16", "outlier")
