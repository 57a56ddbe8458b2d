"""Quantizer time, memory and output error for one MoE layer at a real model's shapes, projected to the model.

    python benchmarks/quantize_layer.py --device cuda --out benchmarks/results/quantize_layer.json
    python benchmarks/quantize_layer.py --device cpu --experts 4 --nsamples 16 --seqlen 512 --kmeans-iters 20 \\
        --kmeans-sample 131072 0 --out benchmarks/results/kmeans_sample_cpu.json

Builds one MoE layer with the shapes of ``--shape``: expert weights as ``benchmarks/random_moe.py``
writes them (each layer's experts share a rank-64 row space holding half their energy, plus noise),
correlated random calibration activations and routing from a random linear router. Runs the
quantizer's per-layer step (``quantize_tools.method.block.quantize_moe_block``: KLT, joint SVD, k-means
VQ, BCOS) at 2 bits with 256x4 codebooks, once per ``--kmeans-sample`` value (0: Lloyd fits every
vector), on the same weights and tokens. Reports seconds per layer, peak device memory, each weight
type's relative output error after BCOS, and the projected time for all the model's MoE layers (the
pipeline's per-layer forward passes are not included: they are small next to k-means).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.random_moe import SHARED_RANK, expert_group  # noqa: E402
from benchmarks.shapes import SHAPES  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="Qwen1.5-MoE-A2.7B", choices=list(SHAPES))
    p.add_argument("--experts", type=int, help="fewer routed experts than the model's (quicker runs)")
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--nsamples", type=int, default=256)
    p.add_argument("--seqlen", type=int, default=4096)
    p.add_argument("--kmeans-iters", type=int, default=100)
    p.add_argument("--kmeans-sample", type=int, nargs="+", default=[0],
                   help="vectors per matrix the Lloyd iterations fit (0: all); one run per value")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/quantize_layer.json"))
    args = p.parse_args(argv)

    from quantize_tools.eval.machine import describe
    from quantize_tools.method.block import quantize_moe_block
    from quantize_tools.method.idre import ranks_for
    from quantize_tools.options import LayerOptions
    from vllm_kbvq.format import KBVQConfig, matrix_shape

    shape = SHAPES[args.shape]
    n_exp = args.experts or shape.geom.n_experts
    geom = replace(shape.geom, n_experts=n_exp, top_k=min(shape.geom.top_k, n_exp))
    dev = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    weights = {}
    for group, n, width in geom.groups:
        for wtype in ("gate", "up", "down"):
            oc, ic = matrix_shape(wtype, geom.hidden, width)
            weights[group, wtype] = torch.stack(expert_group(n, oc, ic, SHARED_RANK, gen)).float().to(dev)
    n_tok = args.nsamples * args.seqlen
    mix = torch.randn(geom.hidden, geom.hidden, generator=gen) / geom.hidden ** 0.5
    x = (torch.randn(n_tok, geom.hidden, generator=gen) @ mix).to(dev)
    topk = (x @ torch.randn(geom.hidden, n_exp, generator=gen).to(dev)).topk(geom.top_k, -1).indices

    runs, load_before = [], os.getloadavg()
    for sample in args.kmeans_sample:
        opts = LayerOptions(bits=args.bits, kmeans_iters=args.kmeans_iters, compare_plain_vq=False,
                            kmeans_sample=sample)
        cfg = KBVQConfig(bits=opts.bits, vector_dim=opts.vector_dim, arch=geom.arch.name, rank=ranks_for(opts, geom),
                         layers=[0], shared_intermediate_size=geom.shared_inter, idre=True, bcos=True,
                         rank_ratio=opts.rank_ratio, damp=opts.damp, kmeans_iters=opts.kmeans_iters, seed=opts.seed)
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        _, report = quantize_moe_block(0, x, topk, lambda g, w: weights[g, w], geom, torch.nn.functional.silu, opts,
                                       cfg, device=dev)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t
        rel_err = {f"{g}.{w}": report[g][w]["rel_err"]["idre_vq_bcos"]
                   for g, _, _ in geom.groups for w in ("gate", "up", "down")}
        runs.append({"kmeans_sample": sample, "seconds_per_layer": seconds, "rel_err": rel_err,
                     "peak_memory_bytes": torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None,
                     # all the model's layers, where this one has all its experts
                     "projected_total_s": seconds * shape.moe_layers if n_exp == shape.geom.n_experts else None,
                     "load_after": os.getloadavg()})
        print(json.dumps(runs[-1]), flush=True)
    result = {
        "shape": args.shape, "experts": n_exp, "bits": args.bits, "calibration_tokens": n_tok,
        "kmeans_iters": args.kmeans_iters,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else describe(),
        "activations_bytes": x.numel() * x.element_size(), "moe_layers": shape.moe_layers,
        "load_before": load_before, "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
