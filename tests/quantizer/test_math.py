"""The method's math against independent oracles."""
import pytest
import torch

from quantize_tools.method import vq
from quantize_tools.method.bcos import OutputStats, fit_affine
from quantize_tools.method.idre import CovarianceAccumulator, joint_svd, klt
from quantize_tools.method.vq import assign_faiss, assign_torch, kmeans, to_vectors, vq_quantize
from vllm_kbvq.kernels.torch_moe import dequantize_rows


def _data(n=4, oc=24, ic=32, tokens=500, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, oc, ic, generator=g, dtype=torch.float64)
    # correlated, anisotropic inputs, like real activations
    x = torch.randn(tokens, ic, generator=g, dtype=torch.float64) @ torch.randn(ic, ic, generator=g, dtype=torch.float64)
    return w, x


def test_full_rank_reconstructs_exactly():
    w, x = _data()
    acc = CovarianceAccumulator(32)
    acc.add(x)
    res = joint_svd(w.float(), klt(acc.covariance(), damp=0.0), rank=32)
    approx = res.a.double() @ res.b.double()
    # exact up to the fp16 storage of A and B; the residual carries that rounding
    assert torch.allclose(approx + res.residual.double(), w, atol=1e-5)
    assert (res.residual.abs().max() / w.abs().max()) < 5e-3
    assert abs(res.rho - 1.0) < 1e-9


def test_klt_identity_output_error_equals_frobenius_in_klt_space():
    w, x = _data(n=1)
    acc = CovarianceAccumulator(32)
    acc.add(x)
    t = klt(acc.covariance(), damp=0.0)
    assert torch.allclose(t.u @ t.u.T, acc.covariance(), rtol=1e-8, atol=1e-8)
    delta = torch.randn(24, 32, dtype=torch.float64)
    output_sq_err = ((x @ delta.T) ** 2).sum() / (x.shape[0] - 1)
    assert torch.allclose(output_sq_err, (delta @ t.u).pow(2).sum(), rtol=1e-8)


def test_rank_captures_more_energy_and_less_output_error():
    w, x = _data()
    acc = CovarianceAccumulator(32)
    acc.add(x)
    t = klt(acc.covariance())
    rhos, errs = [], []
    for k in (1, 4, 16):
        r = joint_svd(w.float(), t, k)
        rhos.append(r.rho)
        errs.append(((x.float() @ r.residual.transpose(1, 2)) ** 2).sum().item())
    assert rhos == sorted(rhos) and errs == sorted(errs, reverse=True)


@pytest.mark.parametrize("n, oc, ic", [(3, 20, 32), (1, 12, 40), (2, 5, 40)])
def test_joint_svd_basis_is_the_stacks_top_right_singular_space(n, oc, ic):
    """Against a full SVD of the stacked KLT-space weights: taller and wider stacks (the second and third
    take the smaller row Gram), so both routes give the top-k right singular space and its energy share."""
    w, x = _data(n=n, oc=oc, ic=ic)
    acc = CovarianceAccumulator(ic)
    acc.add(x)
    t = klt(acc.covariance())
    k = 4
    res = joint_svd(w.float(), t, k)
    s, vh = torch.linalg.svd((w.float().double() @ t.u).reshape(n * oc, ic), full_matrices=False)[1:]
    want = vh[:k].T @ vh[:k]  # projector onto the oracle's top-k right singular space
    got = res.b.double() @ t.u  # B = V_k^T U^{-1}: B U spans the same space, from fp16-stored B
    assert torch.allclose(got @ got.T, torch.eye(k, dtype=torch.float64), atol=2e-3)  # orthonormal rows
    assert torch.allclose(got.T @ got, want, atol=2e-3)
    assert res.rho == pytest.approx(float((s[:k] ** 2).sum() / (s ** 2).sum()), rel=1e-9)
    approx = res.a.double() @ res.b.double() + res.residual.double()
    assert torch.allclose(approx, w, atol=1e-5)


def test_damping_bounds_inverse():
    x = torch.randn(100, 8, dtype=torch.float64)
    x[:, 7] = 0  # a dead channel: zero eigenvalue
    acc = CovarianceAccumulator(8)
    acc.add(x)
    t = klt(acc.covariance(), damp=1e-2)
    # exactly the dead channel's eigenvalue is raised: the live ones (about 1) are far above 1e-2 x their mean
    assert t.clamped == 1 and torch.isfinite(t.u_inv).all()
    assert t.eigenvalues.min() == pytest.approx(1e-2 * torch.linalg.eigvalsh(acc.covariance()).clamp_min(0).mean())
    assert torch.allclose(t.u @ t.u_inv, torch.eye(8, dtype=torch.float64), atol=1e-8)


def test_kmeans_recovers_separated_clusters():
    g = torch.Generator().manual_seed(1)
    centers = torch.randn(1, 16, 4, generator=g) * 10
    pts = centers[:, torch.arange(16).repeat_interleave(50)] + 0.01 * torch.randn(1, 800, 4, generator=g)
    cent, assign = kmeans(pts, 16, iters=50, seed=3)
    # every true center is matched by a learned centroid
    d = torch.cdist(centers[0], cent[0]).min(-1).values
    assert d.max() < 0.05


def _kmeanspp_reference(points, k, gen, max_points):
    """k-means++ seeding written plainly, one group at a time, drawing what ``vq._kmeanspp`` draws."""
    g, n, d = points.shape
    if n > max_points:
        idx = torch.stack([torch.randperm(n, generator=gen)[:max_points] for _ in range(g)])
        points, n = torch.stack([points[i, idx[i]] for i in range(g)]), max_points
    first = torch.randint(n, (g,), generator=gen)
    picks = [[int(first[i])] for i in range(g)]
    dmin = torch.stack([((points[i] - points[i, picks[i][0]]) ** 2).sum(-1) for i in range(g)])
    for _ in range(1, k):
        u = torch.rand(g, 1, generator=gen, dtype=torch.float64)
        for i in range(g):
            cdf = dmin[i].double().cumsum(0)
            if cdf[-1] <= 0:  # every point is a centroid already: uniform
                cdf = torch.arange(1, n + 1, dtype=torch.float64)
            pick = min(int(torch.searchsorted(cdf, u[i] * cdf[-1])), n - 1)
            picks[i].append(pick)
            dmin[i] = torch.minimum(dmin[i], ((points[i] - points[i, pick]) ** 2).sum(-1))
    return torch.stack([points[i, picks[i]] for i in range(g)])


@pytest.mark.parametrize("g,n,d,k,max_points", [(3, 500, 4, 64, 1 << 16), (2, 900, 2, 16, 300), (2, 40, 8, 16, 1 << 16),
                                                (1, 60, 1, 32, 1 << 16)])
def test_kmeanspp_seeding_equals_the_plain_form(g, n, d, k, max_points):
    """The batched seeding (distances as d row adds) picks exactly the plain form's points, subsampled or not,
    with fewer distinct points than codewords (rounded points: duplicates) or not."""
    pts = torch.randn(g, n, d, generator=torch.Generator().manual_seed(n))
    if n < k * 4:
        pts = pts.round()
    want = _kmeanspp_reference(pts, k, torch.Generator().manual_seed(9), max_points)
    assert torch.equal(vq._kmeanspp(pts, k, torch.Generator().manual_seed(9), max_points), want)


def test_faiss_and_torch_assignment_agree():
    g = torch.Generator().manual_seed(2)
    pts, cent = torch.randn(3, 1000, 4, generator=g), torch.randn(3, 64, 4, generator=g)
    assert torch.equal(assign_faiss(pts, cent), assign_torch(pts, cent))


def test_vq_is_deterministic_and_bounded():
    w = torch.randn(2, 32, 64, generator=torch.Generator().manual_seed(4))
    c1, b1 = vq_quantize(w, 2, 4, iters=10, seed=7)
    c2, b2 = vq_quantize(w, 2, 4, iters=10, seed=7)
    assert torch.equal(c1, c2) and torch.equal(b1, b2)
    err2 = (dequantize_rows(c1, b1[:, None]) - w).norm() / w.norm()
    c3, b3 = vq_quantize(w, 3, 2, iters=10, seed=7)
    err3 = (dequantize_rows(c3, b3[:, None]) - w).norm() / w.norm()
    assert err3 < err2 < 0.6
    assert to_vectors(w, 4).shape == (2, 32 * 16, 4)


def test_bcos_matches_channel_mean_and_std():
    g = torch.Generator().manual_seed(5)
    y = torch.randn(400, 6, generator=g, dtype=torch.float64) * 3 + 1
    y_hat = 0.7 * y + 0.2 * torch.randn(400, 6, generator=g, dtype=torch.float64) - 0.5
    st = OutputStats(6)
    st.add(y, y_hat)
    s, b = fit_affine(st, "moment")
    corrected = (1 + s) * y_hat + b
    assert torch.allclose(corrected.mean(0), y.mean(0), atol=1e-9)
    assert torch.allclose(corrected.std(0), y.std(0), atol=1e-9)
    # error bookkeeping from running sums equals the direct computation
    assert abs(st.sq_error(s, b) - ((corrected - y) ** 2).sum().item()) < 1e-6 * st.energy()
    # least squares is the best slope: never worse than moment matching
    s2, b2 = fit_affine(st, "lstsq")
    assert st.sq_error(s2, b2) <= st.sq_error(s, b) + 1e-9
    # and it is each channel's ordinary least-squares line y ~ (1 + s) y_hat + b, solved directly
    for c in range(6):
        design = torch.stack([y_hat[:, c], torch.ones(400, dtype=torch.float64)], 1)
        slope, shift = torch.linalg.lstsq(design, y[:, c:c + 1]).solution[:, 0]
        assert (1 + s2[c]).item() == pytest.approx(slope.item(), rel=1e-9) and b2[c].item() == pytest.approx(shift.item(), rel=1e-9, abs=1e-12)


def test_kmeans_sample_changes_nothing_where_matrices_are_smaller():
    """Matrices with at most ``max_fit_points`` vectors (every testbed matrix at the default) are fitted on
    all of them, with the same random draws: bit-identical codes and codebooks."""
    w = torch.randn(3, 64, 128, generator=torch.Generator().manual_seed(5))
    full = vq_quantize(w, 2, 4, iters=10, seed=3)
    capped = vq_quantize(w, 2, 4, iters=10, seed=3, max_fit_points=64 * 128 // 4)
    assert all(torch.equal(a, b) for a, b in zip(full, capped))


def test_kmeans_on_a_sample_then_every_vector_assigned():
    """Above the cap, Lloyd runs on a sample of max(cap, 256 per codeword) vectors, then every vector gets its
    nearest stored codeword (checked by brute force), and the distortion stays within 2 % of a fit on all."""
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(40, 4, generator=gen) * 3
    points = centers[torch.randint(40, (60_000,), generator=gen)] + torch.randn(60_000, 4, generator=gen) * 0.3
    w = points.reshape(1, 600, 400)
    cent, assign = kmeans(to_vectors(w, 4), 64, iters=30, seed=1, max_fit_points=1000)
    assert assign.shape == (1, 256 * 64)  # the sample: at least 256 points per codeword
    v = to_vectors(w, 4)[0]

    def distortion(sample):  # 1 bit in vectors of 4: 16 codewords, fitted on 4096 of the 60,000 vectors
        codes, codebook = vq_quantize(w, 1, 4, iters=30, seed=1, max_fit_points=sample)
        nearest = torch.cdist(v, codebook[0].float()).argmin(-1)
        assert torch.equal(codes.reshape(-1), nearest)
        return float((codebook[0].float()[codes.reshape(-1)] - v).pow(2).sum())

    full, sampled = distortion(0), distortion(1000)
    assert sampled != full and sampled <= 1.02 * full, (sampled, full)
