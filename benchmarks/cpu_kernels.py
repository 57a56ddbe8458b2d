"""The native CPU MoE kernel against vLLM CPU's own bf16 MoE, at the supported models' layer shapes.

    python benchmarks/cpu_kernels.py                       # all shapes, 2/3/4-bit, batch 1-64, 1 and 2 threads
    python benchmarks/cpu_kernels.py --models Mixtral-8x7B --bits 2 --threads 1

One MoE layer per model (benchmarks/shapes.py, plus the SmolLM2 testbed): random weights, random
top-k routing, bfloat16 activations. The baseline is vLLM's CPU fused-MoE op (``cpu_fused_moe`` on
its prepacked bf16 weights, AMX where the CPU has it) plus bf16 ``F.linear`` for the shared expert;
KBVQ is ``torch.ops.kbvq_cpu.moe`` plus ``torch.ops.kbvq_cpu.linear``, as the plugin calls them.
Each KBVQ point is the dispatcher's choice (``dispatch.cpu_gemm_min_tokens``); near the switch
point each regime is also timed forced (every expert through the lookup tables, every expert
through the tile GEMM, one run each), which is what locates it. Timings are interleaved (baseline, KBVQ, baseline, ...) and the medians
reported, with the machine's load average. By default the caches are evicted before each timed call
(``--cache cold``): a decode step reads each layer's experts from memory. GB/s counts the weight bytes of the experts the
routing touches (codes, codebooks, factors and affine for KBVQ; bf16 weights for the baseline).
Writes JSON (``--out``) and a plot of speed-up against batch (``--plot``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.shapes import SHAPES, MoEShape  # noqa: E402
from quantize_tools.eval.machine import describe  # noqa: E402
from quantize_tools.options import default_vector_dim  # noqa: E402
from vllm_kbvq.format import default_rank  # noqa: E402
from vllm_kbvq.kernels import cpu_moe, dispatch  # noqa: E402

# The all-experts SmolLM2 testbed (quantize_tools.testbed, qwen2_moe, 8 experts)
TESTBED = MoEShape.of(30, model_type="qwen2_moe", hidden_size=576, moe_intermediate_size=144, num_experts=8,
                      num_experts_per_tok=8, shared_expert_intermediate_size=384)
ALL = {**SHAPES, "testbed": TESTBED}
RANK_RATIO = 1 / 128  # the quantizer's default (quantize_tools.options)


def _vllm_moe():
    """vLLM CPU's bf16 MoE: (prepack(w), run(out, x, w13, w2, topk_weights, topk_ids)), or None."""
    try:
        from vllm import _custom_ops as ops
    except Exception:  # noqa: BLE001  (no vLLM CPU build: fall back to per-expert F.linear)
        return None
    # AMX tiles need the kernel's permission for this process (what torch does for oneDNN's AMX)
    isa = "amx" if torch.cpu._is_amx_tile_supported() and torch._C._cpu._init_amx() else "vec"
    return (lambda w: ops.cpu_prepack_moe_weight(w, isa),
            lambda out, x, w13, w2, tw, ti: ops.cpu_fused_moe(out, x, w13, w2, None, None, tw, ti, "silu", isa), isa)


def _per_expert_bf16(out, x, w13, w2, tw, ti):
    for e in torch.unique(ti).tolist():
        tok, pos = torch.where(ti == e)
        g, u = F.linear(x[tok], w13[e]).chunk(2, -1)
        out.index_add_(0, tok, (F.linear(F.silu(g) * u, w2[e]) * tw[tok, pos, None]).to(out.dtype))


def _kbvq_group(g, experts, shards, rows, inp, bits, rank):
    """Random tensors of one matrix group in the CPU kernels' layout (experts None: a linear)."""
    d = default_vector_dim(bits)
    k = 1 << (bits * d)
    lead = () if experts is None else (experts,)
    idx = torch.randint(0, k, (*lead, shards * rows, inp // d), generator=g, dtype=torch.int32)
    idx = idx.to(torch.uint8) if k <= 256 else idx
    h = lambda *s: (torch.randn(*s, generator=g) * 0.02).half()  # noqa: E731
    return [cpu_moe.cpu_layout(idx, shards), h(*lead, shards, k, d), h(*lead, shards * rows, rank) if rank else None,
            h(rank, inp) if rank else None, h(*lead, shards * rows), h(*lead, shards * rows)]


def _nbytes(tensors, experts_touched=None, n_experts=None):
    total = 0
    for t in tensors:
        if t is None:
            continue
        frac = experts_touched / n_experts if experts_touched is not None and t.dim() >= 2 and t.shape[0] == n_experts \
            else 1.0
        total += t.numel() * t.element_size() * frac
    return total


class _Evict:
    """Writes a buffer larger than the last-level cache before each timed call: in a decode step the
    other layers' weights have evicted this layer's, so its experts come from memory, not cache."""

    def __init__(self, on: bool):
        l3 = os.sysconf("SC_LEVEL3_CACHE_SIZE") if "SC_LEVEL3_CACHE_SIZE" in os.sysconf_names else 0
        self.buf = torch.empty(max(2 * max(l3, 0), 64 << 20) // 4) if on else None

    def __call__(self):
        if self.buf is not None:
            self.buf.add_(1.0)


def _median_ms(fns, reps, evict):
    """Interleaved: each rep runs every fn once; median milliseconds per fn."""
    for f in fns:
        f()  # warm-up
    times = [[] for _ in fns]
    for _ in range(reps):
        for i, f in enumerate(fns):
            evict()
            t = time.perf_counter()
            f()
            times[i].append(time.perf_counter() - t)
    return [1e3 * statistics.median(ts) for ts in times]


def bench_model(name: str, shape: MoEShape, bits_list, batches, reps, vllm_moe, evict, seed=0):
    g = torch.Generator().manual_seed(seed)
    geom = shape.geom
    H, inter, E, top, S = geom.hidden, geom.inter, geom.n_experts, geom.top_k, geom.shared_inter
    # vLLM pads each expert's intermediate size to a multiple of 32 for its kernel; so does the baseline
    Ip = -(-inter // 32) * 32 if vllm_moe is not None else inter
    w13 = torch.zeros(E, 2 * Ip, H, dtype=torch.bfloat16)
    w13[:, :inter], w13[:, Ip:Ip + inter] = ((torch.randn(E, 2, inter, H, generator=g) * 0.02).bfloat16()).unbind(1)
    w2 = torch.zeros(E, H, Ip, dtype=torch.bfloat16)
    w2[:, :, :inter] = (torch.randn(E, H, inter, generator=g) * 0.02).bfloat16()
    if vllm_moe is not None:
        prepack, run_bf16, _ = vllm_moe
        p13, p2 = prepack(w13), prepack(w2)
        base = lambda out, x, tw, ti: run_bf16(out, x, p13, p2, tw, ti)  # noqa: E731
    else:
        base = lambda out, x, tw, ti: _per_expert_bf16(out, x, w13, w2, tw, ti)  # noqa: E731
    if S:
        s13 = (torch.randn(2 * S, H, generator=g) * 0.02).bfloat16()
        s2 = (torch.randn(H, S, generator=g) * 0.02).bfloat16()
    q = {}
    for bits in bits_list:
        r13 = 2 * default_rank(inter, H, RANK_RATIO)
        r2 = default_rank(H, inter, RANK_RATIO)
        q[bits] = {"w13": _kbvq_group(g, E, 2, inter, H, bits, r13), "w2": _kbvq_group(g, E, 1, H, inter, bits, r2)}
        if S:
            q[bits]["s13"] = _kbvq_group(g, None, 2, S, H, bits, 2 * default_rank(S, H, RANK_RATIO))
            q[bits]["s2"] = _kbvq_group(g, None, 1, H, S, bits, default_rank(H, S, RANK_RATIO))
    rows = []
    for T in batches:
        x = (torch.randn(T, H, generator=g)).bfloat16()
        tw, ti = torch.randn(T, E, generator=g).softmax(-1).topk(top)
        tw, ti = tw.float(), ti.to(torch.int32)
        touched = len(torch.unique(ti))

        def bf16(x=x, tw=tw, ti=ti):
            out = torch.zeros_like(x)
            base(out, x, tw, ti)
            if S:
                gg, u = F.linear(x, s13).chunk(2, -1)
                out = out + F.linear(F.silu(gg) * u, s2)
            return out

        def kbvq(bits, gm, x=x, tw=tw, ti=ti):
            t = q[bits]

            def sw(codes):  # gm None: the dispatcher's switch point for these codes, as the plugin binds it
                return dispatch.cpu_gemm_min_tokens(codes) if gm is None else gm

            def run(x=x, tw=tw, ti=ti):
                out = cpu_moe.kbvq_moe_cpu(x, tw, ti, None, *t["w13"], *t["w2"], gemm_min_tokens=sw(t["w13"][0]))
                if S:
                    gg, u = cpu_moe.kbvq_linear_cpu(x, *t["s13"], gemm_min_tokens=sw(t["s13"][0])).chunk(2, -1)
                    out = out + cpu_moe.kbvq_linear_cpu(F.silu(gg) * u, *t["s2"], gemm_min_tokens=sw(t["s2"][0]))
                return out
            return run

        fns, labels = [bf16], [("bf16", None)]
        switch = {bits: dispatch.cpu_gemm_min_tokens(q[bits]["w13"][0]) for bits in bits_list}
        for bits in bits_list:
            fns.append(kbvq(bits, None))
            labels.append(("dispatch", bits))
        ms = _median_ms(fns, reps, evict)
        # each regime forced, once, where it could be the better one (the switch point's neighbourhood)
        probes = [(regime, bits, gm) for bits in bits_list for regime, gm, near in
                  (("lut", 10**9, T * top / E <= 4 * switch[bits]),
                   ("gemm", 1, T * top / E >= switch[bits] / 4)) if near]
        pms = _median_ms([kbvq(bits, gm) for _, bits, gm in probes], 1, evict)
        labels += [(regime, bits) for regime, bits, _ in probes]
        ms += pms
        bf16_bytes = 3 * inter * H * 2 * touched + (3 * S * H * 2 if S else 0)
        row = {"batch": T, "experts_touched": touched, "bf16_ms": ms[0], "bf16_GBps": bf16_bytes / ms[0] / 1e6}
        for (regime, bits), t in zip(labels[1:], ms[1:]):
            key = f"w{bits}"
            row.setdefault(key, {})[f"{regime}_ms"] = t
            if regime == "dispatch":
                qt = q[bits]
                qbytes = _nbytes(qt["w13"] + qt["w2"], touched, E) + (
                    _nbytes(qt["s13"] + qt["s2"]) if S else 0)
                row[key]["speedup"] = ms[0] / t
                row[key]["GBps"] = qbytes / t / 1e6
        rows.append(row)
        print(f"  {name:18s} batch {T:3d}: bf16 {ms[0]:8.2f} ms | " + " | ".join(
            f"w{b} {row[f'w{b}']['dispatch_ms']:7.2f} ms x{row[f'w{b}']['speedup']:.2f} "
            f"(lut {row[f'w{b}'].get('lut_ms', float('nan')):.1f}, gemm {row[f'w{b}'].get('gemm_ms', float('nan')):.1f})"
            for b in bits_list), flush=True)
    return {"shape": shape.asdict(), "runs": rows}


def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(res["threads"]), figsize=(6 * len(res["threads"]), 4.5), squeeze=False)
    for ax, (threads, models) in zip(axes[0], res["threads"].items()):
        for name, m in models.items():
            batches = [r["batch"] for r in m["runs"]]
            for bits in res["bits"]:
                ax.plot(batches, [r[f"w{bits}"]["speedup"] for r in m["runs"]], marker="o",
                        linestyle={2: "-", 3: "--", 4: ":"}[bits], label=f"{name} {bits}-bit")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xlabel("tokens in the batch")
        ax.set_ylabel("KBVQ kernel speed-up over vLLM CPU bf16 MoE")
        ax.set_title(f"{threads} thread(s), {res['device']}", fontsize=9)
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=list(ALL), default=list(ALL))
    p.add_argument("--bits", type=int, nargs="+", choices=(2, 3, 4), default=[2, 3, 4])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--reps", type=int, default=5, help="interleaved repetitions per point (median)")
    p.add_argument("--cache", choices=("cold", "warm"), default="cold",
                   help="cold: evict the caches before each timed call, as the other layers do in a decode step "
                        "(default); warm: the layer's weights may stay cached between calls")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu_kernels.json"))
    p.add_argument("--plot", type=Path, default=Path("benchmarks/results/cpu_kernels.png"))
    a = p.parse_args(argv)
    if not cpu_moe.available():
        print("the native CPU kernels are unavailable (see the warning above)", file=sys.stderr)
        return 1
    vllm_moe = _vllm_moe()
    small = dispatch.CPU_GEMM_SMALL_ROWS
    switch_points = ({f"{isa}/{b}": v for (isa, b), v in dispatch.CPU_GEMM_MIN_TOKENS.items()}
                     | {f"{isa}/{b} below {small} rows": v for (isa, b), v in dispatch.CPU_GEMM_MIN_TOKENS_SMALL.items()}
                     | {"other": dispatch.CPU_GEMM_MIN_TOKENS_OTHER})
    res = {"device": describe(),
           "kernel_isa": cpu_moe.isa(), "baseline": f"vllm cpu_fused_moe ({vllm_moe[2]})" if vllm_moe else
           "bf16 F.linear per expert", "cpu_gemm_min_tokens": switch_points, "bits": a.bits, "cache": a.cache,
           "load_avg_before": os.getloadavg(), "threads": {}}
    evict = _Evict(a.cache == "cold")
    for threads in a.threads:
        torch.set_num_threads(threads)
        print(f"{threads} thread(s), kernels {cpu_moe.isa()}, baseline {res['baseline']}", flush=True)
        res["threads"][str(threads)] = {name: bench_model(name, ALL[name], a.bits, a.batch, a.reps, vllm_moe, evict)
                                        for name in a.models}
    res["load_avg_after"] = os.getloadavg()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1))
    print(f"wrote {a.out} (load average before {res['load_avg_before']}, after {res['load_avg_after']})")
    try:
        plot(res, a.plot)
        print(f"wrote {a.plot}")
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
