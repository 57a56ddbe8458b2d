"""Triton kernels against the torch implementation (:mod:`vllm_kbvq.kernels.torch_moe`); run by
``tests/runtime/test_triton_moe.py``.

Without a GPU the kernels run in Triton's interpreter at small shapes; on a GPU the
same tests run compiled. The interpreter must be switched on before triton is first
imported (triton.language's own ``@jit`` helpers are decorated then), and in a full
test session vLLM imports triton early, so this file runs in its own process.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton")

from vllm_kbvq.kernels.dispatch import select, triton_block_m  # noqa: E402
from vllm_kbvq.kernels.torch_moe import kbvq_linear_torch, kbvq_moe_torch  # noqa: E402
from vllm_kbvq.kernels.triton_moe import align_pairs, kbvq_linear_triton, kbvq_moe_triton  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# Triton 3.9's interpreter multiplies bfloat16 dot operands wrongly (garbage of order 1e10 on
# a plain 16x16 tl.dot); bfloat16 is checked on a GPU only
HALF = [torch.float16, torch.bfloat16] if DEV == "cuda" else [torch.float16]
# bits -> (vector dim, index dtype): the paper's 2- and 3-bit settings and a 4-bit one
BITS = {2: (4, torch.uint8), 3: (4, torch.int16), 4: (2, torch.uint8)}


def _group(g, n_local, shards, rows, n_in, bits, rank):
    d, idt = BITS[bits]
    k = 2 ** (bits * d)
    total = shards * rows
    p = {
        "idx": torch.randint(0, k, (n_local, total, n_in // d), generator=g).to(idt),
        "codebook": (torch.randn(n_local, shards, k, d, generator=g) * 0.1).half(),
        "lr_a": (torch.randn(n_local, total, rank, generator=g) * 0.1).half() if rank else None,
        "lr_b": (torch.randn(rank, n_in, generator=g) * 0.1).half() if rank else None,
        "affine_s": (torch.randn(n_local, total, generator=g) * 0.05).half(),
        "affine_b": (torch.randn(n_local, total, generator=g) * 0.05).half(),
    }
    return {k_: None if v is None else v.to(DEV) for k_, v in p.items()}


def _experts(n_local, hidden, inter, bits, rank, seed=0):
    g = torch.Generator().manual_seed(seed)
    w13 = _group(g, n_local, 2, inter, hidden, bits, 2 * rank)
    w2 = _group(g, n_local, 1, hidden, inter, bits, rank)
    order = ("idx", "codebook", "lr_a", "lr_b", "affine_s", "affine_b")
    return [w13[k] for k in order] + [w2[k] for k in order]


def _routing(n_tok, n_experts, top_k, kind, g):
    """``kind``: 'random', 'all-to-one' (every token to expert 0 first), 'skewed' (a few experts only)."""
    if kind == "skewed":
        pool = torch.tensor([1, n_experts - 1])
        ids = torch.stack([pool[torch.randperm(2, generator=g)][:top_k] for _ in range(n_tok)])
    else:
        ids = torch.stack([torch.randperm(n_experts, generator=g)[:top_k] for _ in range(n_tok)])
        if kind == "all-to-one":
            ids = torch.stack([torch.cat([torch.zeros(1, dtype=torch.long), r[r != 0][: top_k - 1]]) for r in ids])
    return ids.to(DEV), torch.rand(n_tok, top_k, generator=g).to(DEV)


# (tokens, experts, top_k, bits, rank, routing, expert parallel): decode (GEMV) and grouped
# regimes, every grouped block size, zero-token / one-token / every-token experts
CASES = [
    (1, 8, 2, 2, 2, "random", False),
    (3, 8, 2, 3, 0, "all-to-one", False),
    (2, 8, 2, 3, 2, "random", True),
    (4, 8, 2, 4, 3, "random", True),
    (1, 4, 2, 2, 0, "skewed", False),
    (13, 8, 2, 2, 2, "all-to-one", False),
    (24, 8, 2, 3, 3, "skewed", True),
    (40, 8, 2, 4, 0, "random", False),
    (37, 6, 3, 2, 2, "random", True),
    (260, 4, 2, 2, 2, "random", False),
]


@pytest.mark.parametrize("n_tok,n_exp,top_k,bits,rank,kind,ep", CASES)
def test_moe_kernel_matches_torch_reference(n_tok, n_exp, top_k, bits, rank, kind, ep):
    hidden, inter = 64, 48
    g = torch.Generator().manual_seed(n_tok * 100 + bits)
    ids, weights = _routing(n_tok, n_exp, top_k, kind, g)
    expert_map = None
    n_local = n_exp
    if ep:  # this rank holds the odd experts
        n_local = n_exp // 2
        expert_map = torch.full((n_exp,), -1, dtype=torch.int32)
        expert_map[1::2] = torch.arange(n_local, dtype=torch.int32)
        expert_map = expert_map.to(DEV)
    params = _experts(n_local, hidden, inter, bits, rank, seed=bits)
    x = torch.randn(n_tok, hidden, generator=g).to(DEV)
    ref = kbvq_moe_torch(x, weights, ids, expert_map, *params)
    block_m = triton_block_m(ids.numel(), n_local)  # the kernel and block size the dispatcher picks
    out = kbvq_moe_triton(x, weights, ids, expert_map, *params, block_m=block_m)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    # activations in half precision: the grouped path multiplies in that dtype
    for dtype in HALF:
        xh = x.to(dtype)
        ref_h = kbvq_moe_torch(xh, weights, ids, expert_map, *params).float()
        err = (kbvq_moe_triton(xh, weights, ids, expert_map, *params, block_m=block_m).float() - ref_h).abs().max()
        assert err <= 0.02 * ref_h.abs().max(), dtype


@pytest.mark.parametrize("n_tok", [1, 24])  # the decode and the grouped kernel
def test_moe_kernel_with_row_scaled_affine(n_tok):
    """``--row-scale`` stores ``(1 + s) * row scale - 1`` in affine_s: values from -15/16 to 15, not near 0."""
    hidden, inter, n_exp = 64, 48, 8
    g = torch.Generator().manual_seed(7 + n_tok)
    ids, weights = _routing(n_tok, n_exp, 2, "random", g)
    params = _experts(n_exp, hidden, inter, 2, 2, seed=7)
    for i in (4, 10):  # affine_s of w13 and of w2
        shape = params[i].shape
        params[i] = (torch.exp(torch.empty(shape).uniform_(-2.7, 2.7, generator=g)) - 1).half().to(DEV)
    x = torch.randn(n_tok, hidden, generator=g).to(DEV)
    ref = kbvq_moe_torch(x, weights, ids, None, *params)
    out = kbvq_moe_triton(x, weights, ids, None, *params, block_m=triton_block_m(ids.numel(), n_exp))
    torch.testing.assert_close(out, ref, atol=1e-5 * float(ref.abs().max()), rtol=1e-4)


@pytest.mark.parametrize("n_tok,rank,bits", [(1, 2, 2), (5, 0, 3), (33, 3, 2), (65, 2, 4)])
def test_linear_kernel_matches_torch_reference(n_tok, rank, bits):
    g = torch.Generator().manual_seed(n_tok)
    idx, cb, lr_a, lr_b, s, b = _experts(1, 64, 32, bits, rank, seed=n_tok)[:6]
    x = torch.randn(2, n_tok, 64, generator=g).to(DEV)
    args = (idx[0], cb[0], None if lr_a is None else lr_a[0], lr_b, s[0], b[0])
    out = kbvq_linear_triton(x, *args, block_m=triton_block_m(2 * n_tok, 1))
    torch.testing.assert_close(out, kbvq_linear_torch(x, *args), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("block_m", [1, 4, 16])
def test_align_pairs_groups_every_local_pair_once(block_m):
    g = torch.Generator().manual_seed(block_m)
    n_local = 5
    slots = torch.randint(-1, n_local, (23,), generator=g)
    slots[:3] = 2  # one expert with several pairs; expert 4 is emptied below
    slots[slots == 4] = -1
    # device tensors only, no host sync (a graph break would fail fullgraph tracing)
    traced = torch.compile(align_pairs, fullgraph=True, backend="eager")
    pairs, block_slot = traced(slots.to(DEV), n_local, block_m)
    pairs, block_slot = pairs.cpu().tolist(), block_slot.cpu().tolist()
    assert len(pairs) == len(block_slot) * block_m
    seen = []
    for blk, e in enumerate(block_slot):
        members = [p for p in pairs[blk * block_m:(blk + 1) * block_m] if p != len(slots)]
        if e < 0:
            assert not members
        assert all(slots[p] == e for p in members)
        seen += members
    assert sorted(seen) == [p for p in range(len(slots)) if slots[p] >= 0]


def test_cuda_dispatch_uses_the_triton_kernels():
    cuda = torch.device("cuda")
    decode, prefill = select("moe", cuda, 8, 64), select("moe", cuda, 4096, 64)
    assert decode.func is kbvq_moe_triton and decode.keywords == {"block_m": None}
    assert prefill.func is kbvq_moe_triton and prefill.keywords == {"block_m": 64}
    assert select("linear", cuda, 1, 1).func is kbvq_linear_triton
    assert select("moe", torch.device("cpu"), 8, 64) is kbvq_moe_torch


def test_kernels_compile_for_sm90():
    """The GPU compiler (not the interpreter) accepts every kernel variant, for an H100/H200 target."""
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("triton_compile.py")
    r = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert r.stdout.count("ok ") == 5, r.stdout


def test_kernel_benchmark_script_runs(tmp_path):
    """``benchmarks/moe_kernels.py --smoke``: the GPU benchmark's plumbing, on a CPU (no timing claimed)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "moe_kernels.py"
    out = tmp_path / "smoke.json"
    r = subprocess.run([sys.executable, str(script), "--smoke", "--out", str(out)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [row["batch"] for row in result["rows"]] == [1, 4, 16]
    checked = [row for row in result["rows"] if "kbvq2_max_abs_err_vs_torch" in row]
    assert checked and all(row[f"kbvq{b}_max_abs_err_vs_torch"] < 1e-2 for row in checked for b in (2, 3))
