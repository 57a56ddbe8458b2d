"""Quantizer speed and memory for one MoE layer at a real model's shapes (random weights), projected to the model.

    python benchmarks/quantize_layer.py --device cuda --out benchmarks/results/quantize_layer.json

Builds one MoE layer with the shapes of ``--shape`` (random weights, random
correlated calibration activations, routing from a random linear router) on the
device and runs the quantizer's per-layer step (``quantize_tools.method.block.
quantize_moe_block``: KLT, joint SVD, k-means VQ, BCOS) with the paper's
settings: 2-bit, 256x4 codebooks, k-means++ and 100 iterations, 256 x 4096
calibration tokens. Reports seconds per layer, peak device memory, and the
projected time for all the model's MoE layers (the per-layer forward passes of
the pipeline are not included: they are small next to k-means).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from shapes import SHAPES  # benchmarks/ is the script's directory


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="Qwen1.5-MoE-A2.7B", choices=list(SHAPES))
    p.add_argument("--experts", type=int, help="override the number of routed experts (smoke runs)")
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--nsamples", type=int, default=256)
    p.add_argument("--seqlen", type=int, default=4096)
    p.add_argument("--kmeans-iters", type=int, default=100)
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/quantize_layer.json"))
    args = p.parse_args(argv)

    from dataclasses import replace

    from quantize_tools.method.block import quantize_moe_block
    from quantize_tools.method.idre import ranks_for
    from quantize_tools.options import LayerOptions
    from vllm_kbvq.format import KBVQConfig, matrix_shape

    shape = SHAPES[args.shape]
    n_layers = shape.moe_layers
    n_exp = args.experts or shape.geom.n_experts
    geom = replace(shape.geom, n_experts=n_exp, top_k=min(shape.geom.top_k, n_exp))
    hidden, inter, top_k, shared_inter = geom.hidden, geom.inter, geom.top_k, geom.shared_inter
    dev = torch.device(args.device)
    opts = LayerOptions(bits=args.bits, kmeans_iters=args.kmeans_iters, compare_plain_vq=False)
    cfg = KBVQConfig(bits=opts.bits, vector_dim=opts.vector_dim, arch=geom.arch.name,
                     rank=ranks_for(opts, geom), layers=[0],
                     shared_intermediate_size=shared_inter, idre=True, bcos=True, rank_ratio=opts.rank_ratio,
                     damp=opts.damp, kmeans_iters=opts.kmeans_iters, seed=opts.seed)

    g = torch.Generator(device=dev).manual_seed(0)
    n_tok = args.nsamples * args.seqlen
    mix = torch.randn(hidden, hidden, generator=g, device=dev) / hidden ** 0.5
    x = torch.cat([torch.randn(c, hidden, generator=g, device=dev) @ mix
                   for c in torch.full((n_tok // 65536 + 1,), 65536).tolist()])[:n_tok]
    router = torch.randn(hidden, n_exp, generator=g, device=dev)
    topk = torch.cat([(c @ router).topk(top_k, dim=-1).indices for c in x.split(65536)])

    def weights(group, wtype):
        n, width = (n_exp, inter) if group == "experts" else (1, shared_inter)
        return torch.randn(n, *matrix_shape(wtype, hidden, width), generator=g, device=dev) * 0.02

    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    _, report = quantize_moe_block(0, x, topk, weights, geom, torch.nn.functional.silu, opts, cfg, device=dev)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
    result = {
        "shape": args.shape, "experts": n_exp, "bits": args.bits, "calibration_tokens": n_tok,
        "kmeans_iters": args.kmeans_iters, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "seconds_per_layer": seconds, "peak_memory_bytes": peak,
        "activations_bytes": x.numel() * x.element_size(), "moe_layers": n_layers,
        "projected_total_s": seconds * n_layers,
    }
    print(json.dumps(result, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
