"""The sparse-routed testbed's pieces against planted structure, and k = E against the exact testbed."""
import pytest
import torch
import torch.nn.functional as F

from quantize_tools.testbed import build as tb, sparse as st


def _planted(groups=4, per=12, dim=32, seed=0):
    """Rows near ``groups`` orthogonal directions, shuffled; returns (rows, true group of each row)."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(dim, dim, generator=g))[0][:groups]
    truth = torch.arange(groups).repeat_interleave(per)
    perm = torch.randperm(groups * per, generator=g)
    rows = basis[truth] + 0.15 * torch.randn(groups * per, dim, generator=g)
    return F.normalize(rows[perm], dim=1), truth[perm]


def _same_partition(clusters, truth):
    return sorted(sorted(truth[c].tolist()) for c in clusters) == sorted([g] * (truth == g).sum().item()
                                                                         for g in truth.unique().tolist())


def test_balanced_kmeans_recovers_planted_groups_in_equal_sizes():
    rows, truth = _planted()
    clusters = st.balanced_kmeans(rows, 4, seed=3)
    assert [len(c) for c in clusters] == [12] * 4
    assert all(len(set(truth[c].tolist())) == 1 for c in clusters)
    assert sorted(torch.cat(clusters).tolist()) == list(range(48))
    # balance is enforced even when the data would rather not split evenly
    skewed = torch.cat([rows[truth == 0], rows[truth == 0] + 0.01, rows[truth == 1]])
    assert [len(c) for c in st.balanced_kmeans(F.normalize(skewed, dim=1), 3)] == [12] * 3
    with pytest.raises(ValueError, match="equal groups"):
        st.balanced_kmeans(rows, 5)


def test_fit_layer_finds_planted_experts_and_routes_to_them():
    """An FFN whose neuron groups each answer one input subspace: top-1 routing loses almost nothing."""
    torch.manual_seed(0)
    hidden, groups, per = 32, 4, 8
    basis = torch.linalg.qr(torch.randn(hidden, hidden))[0]
    sub = [basis[:, 8 * g:8 * g + 8] for g in range(groups)]  # 4 orthogonal 8-dim subspaces
    truth = torch.arange(groups).repeat_interleave(per)
    perm = torch.randperm(groups * per)
    gate = torch.stack([sub[t] @ torch.randn(8) for t in truth])[perm]  # neuron rows in its group's subspace
    up = torch.stack([sub[t] @ torch.randn(8) for t in truth])[perm]
    down = torch.randn(hidden, groups * per)
    topic = torch.randint(groups, (2048,))
    centers = torch.randn(groups, 8)
    # each token lives in one subspace, around that topic's centre (a linear router needs a mean to see)
    x = torch.stack([sub[t] @ (centers[t] + 0.3 * torch.randn(8)) for t in topic])
    groups_found, shared_ix, router, fit = st.fit_layer(x, gate, up, down, groups, 1)
    assert shared_ix.numel() == 0
    assert all(len(set(truth[perm][ix].tolist())) == 1 for ix in groups_found)
    owner = {int(truth[perm][ix[0]]): e for e, ix in enumerate(groups_found)}
    picked = torch.topk(x.double() @ router.double().T, 1).indices.flatten()
    want = torch.tensor([owner[int(t)] for t in topic])
    # a linear router fitted to output norms misses only tokens whose expert output is near zero
    # (measured: 99.3 % agreement, 2.6 % error; a random router gives ~25 % and ~100 %)
    assert (picked == want).float().mean() > 0.98
    assert fit.rel_err < 0.05
    assert sum(fit.tokens_per_expert) == 2048


@pytest.fixture(scope="module")
def dense():
    return tb.load_dense_model()[0]


def test_top_k_equal_to_experts_is_the_exact_testbed(dense):
    exact = tb.build_moe_model("qwen2_moe", 8, dense).state_dict()
    same = tb.build_moe_model("qwen2_moe", 8, dense, top_k=8).state_dict()
    assert exact.keys() == same.keys()
    assert all(torch.equal(exact[k], same[k]) for k in exact)


def test_bad_top_k_is_refused_by_name(tmp_path, capsys):
    with pytest.raises(tb.TestbedError, match="top_k must be between 1 and the expert count 8"):
        tb.build_testbed("qwen2_moe", 8, tmp_path / "x", top_k=9)
    with pytest.raises(SystemExit):
        tb.main(["--experts", "8", "--top-k", "0", "--output", str(tmp_path / "y")])
    assert "--top-k must be between 1 and --experts (8), got 0" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_sparse_build_is_deterministic_and_routes_top_k(dense):
    """Same calibration tokens, same bytes; and the model really routes each token to k of E experts."""
    tok = tb.load_dense_model()[1]
    tokens = st.router_calibration(tok)[:2, :128]
    a = tb.build_moe_model("qwen2_moe", 16, dense, top_k=4, router_tokens=tokens)
    b = tb.build_moe_model("qwen2_moe", 16, dense, top_k=4, router_tokens=tokens)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.config.num_experts_per_tok == 4 and a.config.norm_topk_prob
    counts = a.config.testbed["routed_tokens_per_expert"]
    assert counts["min"] < counts["max"]  # uneven, as in a trained MoE
