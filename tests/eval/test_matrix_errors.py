"""The per-matrix diagnostic behind the page's testbed comparison, against direct computations."""
import json

import torch

from quantize_tools.eval import matrix_errors, results
from quantize_tools.method.gptq import rtn_quantize


def test_output_error_is_weight_error_on_an_orthonormal_basis_and_gptq_beats_rtn_out_of_sample():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(32, 64, generator=gen)
    mix = torch.randn(64, 64, generator=gen) / 8  # correlated input channels: what GPTQ's error feedback uses
    x, x_test = torch.randn(4096, 64, generator=gen) @ mix, torch.randn(2048, 64, generator=gen) @ mix
    basis = matrix_errors.matrix_errors(w, x, torch.eye(64), bits=3, vector_dim=2, group=128, damp=1e-2, seed=0)
    for m in ("rtn", "gptq", "plain_vq"):
        assert abs(basis[f"{m}_output"] - basis[f"{m}_weight"]) < 1e-6 * basis[f"{m}_weight"]
    direct = float(((rtn_quantize(w, 3, 128) - w) ** 2).sum() / (w**2).sum())
    assert abs(basis["rtn_weight"] - direct) < 1e-6 * direct
    held_out = matrix_errors.matrix_errors(w, x, x_test, bits=3, vector_dim=2, group=128, damp=1e-2, seed=0)
    assert held_out["gptq_output"] < held_out["rtn_output"]
    assert held_out["tokens"] == 4096 and held_out["test_tokens"] == 2048


def test_concentration_is_the_top_eigenvalues_share_of_the_trace():
    q, _ = torch.linalg.qr(torch.randn(64, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    ev = torch.tensor([10.0, 10.0] + [1.0] * 62, dtype=torch.float64)
    h = (q * ev) @ q.T  # 64 dims: the top 1/32 is 2 directions
    assert abs(matrix_errors.concentration(h) - 20 / 82) < 1e-9


def test_the_page_shows_the_record(tmp_path):
    def summary(gptq, plain, share):
        row = {"rtn_output": 0.04, "gptq_output": gptq, "plain_vq_output": plain, "gptq_over_rtn_output": gptq / 0.04,
               "plain_vq_over_rtn_output": plain / 0.04, "plain_vq_over_rtn_weight": 0.8,
               "input_top_1_32_share": share, "matrices": 96}
        return {f"experts.{m}": row for m in ("gate", "up", "down")}

    rec = {"layers": [0, 29], "bits": 3, "vector_dim": 2, "test_windows": 16,
           "testbeds": {"all-experts": {"summary": summary(0.02, 0.03, 0.4)},
                        "sparse": {"summary": summary(0.01, 0.036, 0.5)}}}
    (tmp_path / "matrix_errors.json").write_text(json.dumps(rec))
    results.render(tmp_path, tmp_path / "results.md", plot=False)
    page = (tmp_path / "results.md").read_text()
    assert "layers 0, 29 quantized alone at 3 bits from the FP weights (plain VQ: 64 x 2 k-means" in page
    assert "| sparse | experts.gate (96) | 0.0400 | 0.0100 | 0.0360 | 0.25 | 0.90 | 0.80 | 0.50 |" in page
    assert ("all-experts → sparse: GPTQ ÷ RTN 0.50 → 0.25, plain VQ ÷ RTN 0.75 → 0.90, input top-1/32 share "
            "0.40 → 0.50.") in page
    assert "| all-experts | matrix_errors |" not in page  # not mistaken for a cell record
