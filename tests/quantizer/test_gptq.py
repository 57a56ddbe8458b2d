"""GPTQ-style error feedback (scalar and vector) and RTN against independent oracles."""
import torch

from quantize_tools.method.gptq import gptq_quantize, gptvq_assign, rtn_quantize, second_moment
from quantize_tools.method.vq import assign_torch, kmeans, to_vectors


def _problem(oc=48, ic=64, tokens=2000, d=4, k=16, seed=0, correlated=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(oc, ic, generator=g)
    x = torch.randn(tokens, ic, generator=g)
    if correlated:
        x = x @ (torch.randn(ic, ic, generator=g) * 0.3 + torch.eye(ic))
    cb, _ = kmeans(to_vectors(w, d)[None], k, iters=10, seed=seed)
    return w, x, cb[0]


def _nearest(w, cb):
    d = cb.shape[1]
    return assign_torch(to_vectors(w, d)[None], cb[None])[0].reshape(w.shape[0], -1)


def _decode(codes, cb):
    return cb[codes].reshape(codes.shape[0], -1)


def test_white_inputs_give_the_nearest_codeword():
    """With H = c I there is nothing to compensate: the assignment is plain nearest-neighbour."""
    w, _, cb = _problem()
    h = torch.eye(w.shape[1], dtype=torch.float64) * 2.5
    assert torch.equal(gptvq_assign(w, h, cb), _nearest(w, cb))


def test_error_feedback_lowers_the_output_error():
    # many vectors per codeword, as in a real matrix (a codebook fitted to few points leaves little to gain)
    w, x, cb = _problem(oc=256, ic=128, tokens=4000, k=64)
    h = second_moment(x.split(500), x.shape[1], "cpu")
    torch.testing.assert_close(h, (x.double().T @ x.double()) / x.shape[0], rtol=1e-5, atol=1e-5)  # float32 products

    def out_err(codes):
        return ((x @ (w - _decode(codes, cb)).T) ** 2).sum().item()

    plain, hessian = out_err(_nearest(w, cb)), out_err(gptvq_assign(w, h, cb))
    assert hessian < 0.85 * plain, (hessian, plain)


def _gptq_columns(w, h, grid, damp):
    """GPTQ as its paper states it (Frantar et al. 2022, Alg. 1 without lazy batching), scalar grid, float64."""
    w = w.double().clone()
    h = h.double().clone()
    h += damp * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=torch.float64)
    u = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    codes = torch.empty(w.shape, dtype=torch.int64)
    for j in range(w.shape[1]):
        q = (w[:, j, None] - grid.double()[None, :]).abs().argmin(-1)
        codes[:, j] = q
        err = (w[:, j] - grid.double()[q]) / u[j, j]
        w[:, j + 1:] -= err[:, None] * u[j, j + 1:][None, :]
    return codes


def test_vector_dim_one_is_gptq_with_a_fixed_grid():
    """d = 1: the blocked, lazily updated assignment equals textbook column-by-column GPTQ."""
    w, x, _ = _problem(oc=20, ic=40, d=1)
    grid = torch.linspace(-2, 2, 9)
    h = second_moment([x], x.shape[1], "cpu")
    got = gptvq_assign(w, h, grid[:, None], damp=1e-2, block=16)
    assert torch.equal(got, _gptq_columns(w, h, grid, 1e-2))


def test_rtn_picks_the_nearest_point_of_each_group_grid():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(6, 36, generator=g)  # the last group is 4 wide
    q = rtn_quantize(w, bits=3, group_size=8)
    for r in range(6):
        for c0 in range(0, 36, 8):
            grp = w[r, c0:c0 + 8]
            lo, hi = min(grp.min().item(), 0.0), max(grp.max().item(), 0.0)
            scale = (hi - lo) / 7
            zero = round(-lo / scale)
            points = torch.tensor([(k - zero) * scale for k in range(8)])
            brute = points[(grp[:, None] - points[None, :]).abs().argmin(-1)]
            torch.testing.assert_close(q[r, c0:c0 + 8], brute, atol=1e-6, rtol=0)
    assert len(torch.unique(q[0, 32:])) <= 4 and not torch.equal(q, rtn_quantize(w, 3, 12))


def test_gptq_with_white_inputs_is_rtn_and_beats_it_on_correlated_ones():
    """White or merely uneven (diagonal H) inputs: RTN; correlated ones: a lower output error."""
    w, x, _ = _problem(oc=64, ic=128, tokens=4000)
    # uncorrelated inputs, of equal or of very unequal sizes: H diagonal, so is the Cholesky factor of its
    # (damped) inverse, and no column's error is carried to another: GPTQ is RTN
    uneven = torch.rand(128, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 100 + 1e-3
    for h_diag in (torch.eye(128, dtype=torch.float64), torch.diag(uneven)):
        for group in (32, 48):  # 48: a shorter last group
            torch.testing.assert_close(gptq_quantize(w, h_diag, 2, group), rtn_quantize(w, 2, group), atol=1e-6, rtol=0)
    h = second_moment([x], 128, "cpu")

    def out_err(q):
        return ((x @ (w - q).T) ** 2).sum().item()

    assert out_err(gptq_quantize(w, h, 2, 32)) < 0.85 * out_err(rtn_quantize(w, 2, 32))
