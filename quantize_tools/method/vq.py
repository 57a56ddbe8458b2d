"""Vector quantization of weight residuals (paper §2.1): k-means++ seeding and Lloyd iterations.

Batched over matrices (one codebook per expert matrix), in torch, so the same
code runs on CPU and CUDA. Decoding is the runtime's own
(:func:`vllm_kbvq.kernels.torch_moe.dequantize_rows`). Every random draw comes from an explicit generator,
so a run is reproducible from its seed.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["kmeans", "vq_quantize", "to_vectors", "from_vectors", "assign_faiss", "assign_torch"]

# Max floats in one [groups, chunk, K] distance block; bounds memory at ~256 MB.
_BLOCK = 1 << 26


def to_vectors(w: torch.Tensor, d: int) -> torch.Tensor:
    """``[..., oc, ic]`` -> ``[..., oc * ic/d, d]``: contiguous sub-vectors along the input dim."""
    *lead, oc, ic = w.shape
    if ic % d:
        raise ValueError(f"input size {ic} is not divisible by the vector dimension {d}")
    return w.reshape(*lead, oc * (ic // d), d)


def from_vectors(v: torch.Tensor, oc: int, ic: int) -> torch.Tensor:
    *lead, _, _ = v.shape
    return v.reshape(*lead, oc, ic)


def _assign(points: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Nearest centroid per point; points ``[G, N, d]``, centroids ``[G, K, d]`` -> ``[G, N]``.

    On CPU this is faiss' exact flat L2 search: about 10x faster than the torch
    form below, which materialises every point-centroid distance (measured on
    the 2-core dev machine, 166K 4-d points, 256 centroids: 0.02 s vs 0.2 s).
    """
    if points.device.type == "cpu":
        return assign_faiss(points, centroids)
    return assign_torch(points, centroids)


def assign_faiss(points: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    import faiss

    g, n, d = points.shape
    out = torch.empty(g, n, dtype=torch.int64)
    faiss.omp_set_num_threads(torch.get_num_threads())
    # faiss' BLAS path is ~10x faster than its default loop for 4-d vectors
    # (20K points, 256 centroids: 2.4 ms vs 43 ms); by default it takes the
    # BLAS path only for very large query batches.
    faiss.cvar.distance_compute_blas_threshold = 1
    for i in range(g):
        index = faiss.IndexFlatL2(d)
        index.add(centroids[i].contiguous().numpy())
        _, nearest = index.search(points[i].contiguous().numpy(), 1)
        out[i] = torch.from_numpy(nearest[:, 0])
    return out


def assign_torch(points: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    g, n, _ = points.shape
    k = centroids.shape[1]
    c_norm = (centroids * centroids).sum(-1)  # [G, K]
    chunk = max(1, _BLOCK // max(1, g * k))
    out = torch.empty(g, n, dtype=torch.int64, device=points.device)
    ct = centroids.transpose(1, 2)
    for s in range(0, n, chunk):
        p = points[:, s : s + chunk]
        out[:, s : s + chunk] = torch.baddbmm(c_norm[:, None, :], p, ct, alpha=-2).argmin(-1)
    return out


def _sample(points: torch.Tensor, m: int, gen: torch.Generator) -> torch.Tensor:
    """``m`` random points of each group (``[G, m, d]``), or all of them (no draw) where there are no more."""
    g, n, d = points.shape
    if n <= m:
        return points
    idx = torch.stack([torch.randperm(n, generator=gen)[:m] for _ in range(g)]).to(points.device)
    return torch.gather(points, 1, idx[..., None].expand(-1, -1, d))


def _kmeanspp(points: torch.Tensor, k: int, gen: torch.Generator, max_points: int) -> torch.Tensor:
    points = _sample(points, max_points, gen)  # seed from a random subsample: same quality, bounded cost
    g, n, d = points.shape
    ar = torch.arange(g, device=points.device)
    # [d, G, N]: a point-centroid distance is d adds of contiguous rows, in the order a sum over the last
    # dim of [G, N, d] takes (the same floats), ~4x faster than that reduction over 2-4 elements
    cols = points.permute(2, 0, 1).contiguous()

    def dist(c: torch.Tensor) -> torch.Tensor:  # squared distance of every point to c [G, d]: [G, N]
        out = (cols[0] - c[:, 0:1]).square_()
        for i in range(1, d):
            out += (cols[i] - c[:, i:i + 1]).square_()
        return out

    cent = torch.empty(g, k, d, dtype=points.dtype, device=points.device)
    first = torch.randint(n, (g,), generator=gen).to(points.device)
    cent[:, 0] = points[ar, first]
    dmin = dist(cent[:, 0])
    for j in range(1, k):
        # D^2 sampling by inverse CDF (torch.multinomial is ~100x slower here).
        # Where every point already coincides with a centroid (fewer distinct
        # points than codewords), draw uniformly: the codeword is a duplicate.
        cdf = dmin.to(torch.float64).cumsum(-1)
        total = cdf[:, -1:]
        if not bool((total > 0).all()):
            cdf = torch.where(total > 0, cdf, torch.arange(1, n + 1, device=cdf.device, dtype=cdf.dtype).expand(g, n))
        u = torch.rand(g, 1, generator=gen, dtype=torch.float64).to(cdf.device) * cdf[:, -1:]
        pick = torch.searchsorted(cdf, u)[:, 0].clamp_max(n - 1)
        cent[:, j] = points[ar, pick]
        torch.minimum(dmin, dist(cent[:, j]), out=dmin)
    return cent


def kmeans(
    points: torch.Tensor, k: int, iters: int = 100, seed: int = 0, max_init_points: int = 1 << 16,
    progress: Callable[[str], None] | None = None, max_fit_points: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means with k-means++ seeding, batched: points ``[G, N, d]`` -> (centroids ``[G, K, d]``, assignment ``[G, N]``).

    ``max_fit_points`` > 0: the Lloyd iterations run on a random subsample of that many points per group
    (at least 256 per centroid), drawn after the seeding, and the assignment returned is the subsample's;
    where ``N`` is no larger, nothing changes (no draw is made). ``progress`` hears each stage and Lloyd
    iteration (a layer's k-means runs for minutes on a busy CPU)."""
    say = progress or (lambda msg: None)
    points = points.to(torch.float32)
    g, n, d = points.shape
    gen = torch.Generator().manual_seed(seed)
    say("k-means++ seeding")
    cent = _kmeanspp(points, k, gen, max(max_init_points, k))
    if max_fit_points:
        points = _sample(points, max(max_fit_points, 256 * k), gen)
    assign = _assign(points, cent)
    for it in range(iters):
        say(f"k-means iteration {it + 1}/{iters}")
        sums = torch.zeros(g, k, d, dtype=torch.float32, device=points.device)
        sums.scatter_add_(1, assign[..., None].expand(-1, -1, d), points)
        counts = torch.zeros(g, k, dtype=torch.float32, device=points.device)
        counts.scatter_add_(1, assign, torch.ones_like(assign, dtype=torch.float32))
        # Empty clusters keep their previous centroid.
        cent = torch.where(counts[..., None] > 0, sums / counts.clamp_min(1)[..., None], cent)
        new_assign = _assign(points, cent)
        if torch.equal(new_assign, assign):
            break
        assign = new_assign
    return cent, assign


def vq_quantize(w: torch.Tensor, bits: int, d: int, iters: int = 100, seed: int = 0,
                progress: Callable[[str], None] | None = None,
                max_fit_points: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """VQ of matrices ``w`` ``[G, oc, ic]`` -> (codes ``[G, oc, ic/d]`` int64, codebooks ``[G, 2^(bits*d), d]`` fp16).

    The codebook is fitted on at most ``max_fit_points`` vectors of each matrix (0: all; see :func:`kmeans`);
    the final assignment is of every vector, against the float16 codebook that is stored, so the codes are
    optimal for what the runtime decodes.
    """
    g, oc, ic = w.shape
    k = 1 << (bits * d)
    cent, _ = kmeans(to_vectors(w.to(torch.float32), d), k, iters=iters, seed=seed, progress=progress,
                     max_fit_points=max_fit_points)
    codebook = cent.to(torch.float16)
    codes = _assign(to_vectors(w.to(torch.float32), d), codebook.to(torch.float32))
    return codes.reshape(g, oc, ic // d), codebook
