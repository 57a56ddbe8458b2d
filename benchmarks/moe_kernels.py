"""MoE-layer latency on GPU: KBVQ Triton kernels (2- and 3-bit) against a fused BF16 MoE, one run.

    python benchmarks/moe_kernels.py --out benchmarks/results/moe_kernels.json

For each layer shape below and each batch size, with random weights and random
top-k routing (the same for every method):

* ``kbvq2`` / ``kbvq3``: ``vllm_kbvq.kernels.triton_moe.kbvq_moe_triton`` at the paper's
  2-bit (256x4 codebooks) and 3-bit (4096x4) settings, rank ratio 1/128;
* the BF16 baseline, named in the output: vLLM's ``fused_experts`` where vLLM is
  importable, else torch's fused grouped GEMM (``torch._grouped_mm``) over tokens
  sorted by expert, never a Python loop over experts;
* the BF16 memory-bandwidth bound: bytes of the experts the routing touches
  divided by the device's peak bandwidth, and each method's achieved GB/s
  (its own bytes read / its time).

Times are CUDA-graph replays (``triton.testing.do_bench_cudagraph``), as vLLM runs
decode. Writes JSON and, if matplotlib is installed, a plot beside it.

``--smoke`` runs the whole script on a CPU at a tiny shape through Triton's
interpreter: a check that the script works, not a measurement.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from functools import partial
from pathlib import Path

import torch

from shapes import SHAPES, MoEShape  # benchmarks/ is the script's directory

BATCHES = [1, 2, 4, 8, 16, 32, 64, 128, 256]
SMOKE_SHAPE = {"tiny": MoEShape.of(1, model_type="mixtral", hidden_size=64, intermediate_size=32, num_local_experts=8,
                                   num_experts_per_tok=2)}
# bits -> (vector dim, index dtype) as the runtime layout holds them
SETTINGS = {2: (4, torch.uint8), 3: (4, torch.int16)}
# peak HBM bandwidth, bytes/s, by device-name substring (first match wins)
PEAK_BW = [("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("A100", 2.0e12)]


def peak_bandwidth(name: str) -> float | None:
    return next((bw for key, bw in PEAK_BW if key in name), None)


def kbvq_experts(n, hidden, inter, bits, rank_ratio, dev, seed=0):
    """Random runtime tensors (``vllm_kbvq.plugin.layout`` shapes) for ``n`` experts, in the op's argument order."""
    g = torch.Generator(device=dev).manual_seed(seed)
    d, idt = SETTINGS[bits]
    k = 2 ** (bits * d)

    def group(shards, rows, n_in):
        r = max(1, round(min(rows, n_in) * rank_ratio))
        total = shards * rows
        return [
            torch.randint(0, k, (n, total, n_in // d), generator=g, device=dev).to(idt),
            (torch.randn(n, shards, k, d, generator=g, device=dev) * 0.02).half(),
            (torch.randn(n, total, shards * r, generator=g, device=dev) * 0.02).half(),
            (torch.randn(shards * r, n_in, generator=g, device=dev) * 0.02).half(),
            torch.zeros(n, total, dtype=torch.float16, device=dev),
            torch.zeros(n, total, dtype=torch.float16, device=dev),
        ]

    return group(2, inter, hidden) + group(1, hidden, inter)


def kbvq_bytes(params, touched: int, n: int) -> int:
    """Bytes read for ``touched`` of ``n`` experts: their per-expert tensors, plus the per-layer bases."""
    total = 0
    for i, t in enumerate(params):
        per_layer = i in (3, 9)  # lr_b of w13 and w2
        total += t.numel() * t.element_size() * (1 if per_layer else touched / n)
    return int(total)


def bf16_grouped_moe(x, topk_weights, topk_ids, w13, w2):
    """Fused BF16 MoE: tokens sorted by expert, two grouped GEMMs, weighted sum. No host sync."""
    n_tok, top_k = topk_ids.shape
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(w13.shape[0], dtype=torch.int32, device=x.device).scatter_add_(
        0, flat, torch.ones_like(flat, dtype=torch.int32))
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    xs = x[order // top_k]
    h = torch._grouped_mm(xs, w13.transpose(-2, -1), offs=offs)
    gate, up = h.chunk(2, dim=-1)
    y = torch._grouped_mm(torch.nn.functional.silu(gate) * up, w2.transpose(-2, -1), offs=offs)
    out = torch.empty_like(y)
    out[order] = y
    return (out.view(n_tok, top_k, -1) * topk_weights[..., None].to(y.dtype)).sum(1)


def bf16_baseline(dev):
    """(name, fn(x, topk_weights, topk_ids, w13, w2)) of the best fused BF16 MoE that runs here.

    vLLM's ``fused_experts`` when it imports and runs (vLLM's CPU build exports a stub
    that raises), else torch's grouped GEMM.
    """
    try:
        from vllm.model_executor.layers.fused_moe import fused_experts

        def vllm_moe(x, w, i, w13, w2):
            return fused_experts(x, w13, w2, w, i)

        g = torch.Generator(device=dev).manual_seed(0)
        w13 = torch.randn(4, 64, 32, generator=g, device=dev).bfloat16()
        x = torch.randn(3, 32, generator=g, device=dev).bfloat16()
        ids = torch.tensor([[0, 1], [2, 3], [1, 2]], device=dev, dtype=torch.int32)
        vllm_moe(x, torch.full((3, 2), 0.5, device=dev), ids, w13, w13[:, :32, :].transpose(1, 2).contiguous())
        return "vllm.fused_experts", vllm_moe
    except Exception:  # noqa: BLE001 - no usable vLLM here
        return "torch._grouped_mm", bf16_grouped_moe


def time_ms(fn) -> float:
    if not torch.cuda.is_available():  # --smoke: wall time of one call, only to exercise the script
        t = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - t)
    import triton.testing as tt
    try:
        return tt.do_bench_cudagraph(fn, rep=100)
    except Exception:  # noqa: BLE001 - graph capture unsupported: plain timing
        return tt.do_bench(fn, rep=100)


def run(shapes, batches, bits_list, rank_ratio, dev) -> dict:
    from vllm_kbvq.kernels.dispatch import triton_block_m
    from vllm_kbvq.kernels.torch_moe import kbvq_moe_torch_static
    from vllm_kbvq.kernels.triton_moe import kbvq_moe_triton

    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (Triton interpreter, not a measurement)"
    peak = peak_bandwidth(name)
    base_name, base_fn = bf16_baseline(dev)
    rows = []
    for shape in shapes:
        sh = {**SHAPES, **SMOKE_SHAPE}[shape]
        hidden, inter, n, top_k = sh.geom.hidden, sh.geom.inter, sh.geom.n_experts, sh.geom.top_k
        g = torch.Generator(device=dev).manual_seed(1)
        w13 = torch.randn(n, 2 * inter, hidden, generator=g, device=dev, dtype=torch.bfloat16) * 0.02
        w2 = torch.randn(n, hidden, inter, generator=g, device=dev, dtype=torch.bfloat16) * 0.02
        expert_bytes = 3 * hidden * inter * 2
        kb = {b: kbvq_experts(n, hidden, inter, b, rank_ratio, dev, seed=b) for b in bits_list}
        for batch in batches:
            x = torch.randn(batch, hidden, generator=g, device=dev, dtype=torch.bfloat16)
            ids = torch.stack([torch.randperm(n, generator=g, device=dev)[:top_k] for _ in range(batch)])
            w = torch.softmax(torch.randn(batch, top_k, generator=g, device=dev), -1)
            touched = int(torch.unique(ids).numel())
            bound_ms = 1e3 * touched * expert_bytes / peak if peak else None
            row = {"shape": shape, "batch": batch, "experts_touched": touched, "bf16_bound_ms": bound_ms}
            # partial, not a closure: the call holds this batch's tensors (w13, w2 are deleted after the shape)
            t = time_ms(partial(base_fn, x, w, ids, w13, w2))
            row["bf16"] = {"method": base_name, "ms": t, "GBps": touched * expert_bytes / t / 1e6}
            block_m = triton_block_m(ids.numel(), n)  # the kernel the dispatcher picks at this batch
            for b, params in kb.items():
                if batch == 4:  # the kernel against the torch reference at this shape
                    ref = kbvq_moe_torch_static(x, w, ids, None, *params).float()
                    err = (kbvq_moe_triton(x, w, ids, None, *params, block_m=block_m).float() - ref).abs().max().item()
                    row[f"kbvq{b}_max_abs_err_vs_torch"] = err
                t = time_ms(partial(kbvq_moe_triton, x, w, ids, None, *params, block_m=block_m))
                nbytes = kbvq_bytes(params, touched, n)
                row[f"kbvq{b}"] = {"ms": t, "GBps": nbytes / t / 1e6, "speedup_vs_bf16": row["bf16"]["ms"] / t,
                                   "pct_peak_bw": 100 * nbytes / t / 1e9 / peak if peak else None}
            rows.append(row)
            print(_fmt(row, bits_list), flush=True)
        del w13, w2, kb
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return {"device": name, "peak_bandwidth_Bps": peak, "bf16_baseline": base_name, "rank_ratio": rank_ratio,
            "torch": torch.__version__, "rows": rows}


def _fmt(row, bits_list) -> str:
    s = f"{row['shape']:>18} b={row['batch']:<4} bf16 {row['bf16']['ms']:8.4f} ms"
    if row["bf16_bound_ms"] is not None:
        s += f" (bound {row['bf16_bound_ms']:.4f})"
    for b in bits_list:
        r = row[f"kbvq{b}"]
        s += f" | kbvq{b} {r['ms']:8.4f} ms x{r['speedup_vs_bf16']:.2f}"
        if r["pct_peak_bw"] is not None:
            s += f" {r['pct_peak_bw']:.0f}%bw"
    return s


def plot(result: dict, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return
    shapes = sorted({r["shape"] for r in result["rows"]})
    fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        rows = [r for r in result["rows"] if r["shape"] == shape]
        bs = [r["batch"] for r in rows]
        ax.plot(bs, [r["bf16"]["ms"] for r in rows], "o-", label=f"BF16 ({result['bf16_baseline']})")
        if rows[0]["bf16_bound_ms"] is not None:
            ax.plot(bs, [r["bf16_bound_ms"] for r in rows], "k--", label="BF16 bandwidth bound")
        for key in [k for k in rows[0] if k.startswith("kbvq") and isinstance(rows[0][k], dict)]:
            ax.plot(bs, [r[key]["ms"] for r in rows], "o-", label=key)
        ax.set(xscale="log", yscale="log", xlabel="batch (tokens)", ylabel="MoE layer ms", title=shape)
        ax.legend(fontsize=7)
    fig.suptitle(result["device"])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES), metavar="SHAPE",
                   help=f"layer shapes (default: all of {', '.join(SHAPES)})")
    p.add_argument("--batch", type=int, nargs="+", default=BATCHES, help="tokens per step")
    p.add_argument("--bits", type=int, nargs="+", default=sorted(SETTINGS), choices=sorted(SETTINGS))
    p.add_argument("--rank-ratio", type=float, default=1 / 128)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/moe_kernels.json"))
    p.add_argument("--smoke", action="store_true",
                   help="CPU, tiny shape, Triton interpreter: checks the script runs; measures nothing")
    args = p.parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
        shapes, batches, dev = list(SMOKE_SHAPE), [1, 4, 16], torch.device("cpu")
    elif torch.cuda.is_available():
        shapes, batches, dev = args.shapes, args.batch, torch.device("cuda")
    else:
        p.error("needs a CUDA GPU: the Triton kernels and the BF16 baseline are GPU code "
                "(--smoke checks the script on a CPU; tests/runtime/test_triton_moe.py checks the kernels)")
    result = run(shapes, batches, args.bits, args.rank_ratio, dev)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    plot(result, args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
