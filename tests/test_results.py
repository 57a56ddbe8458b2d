"""The results page: each testbed's records land in its own table, and the claims are computed from them."""
import json

from quantize_tools import results


def _record(tmp, sub, key, method, bits, ppl, *, bpw=None, others=0.0, fallbacks=None):
    d = tmp / sub if sub else tmp
    d.mkdir(parents=True, exist_ok=True)
    rec = {"cell": key, "method": method, "bits": bits, "commands": [f"cmd-{sub}-{key}"],
           "perplexity": {"wikipedia": ppl, "lambada_text": 2 * ppl},
           "zero_shot": {t: {m: 0.5} for t, m, _ in results.ZERO_SHOT}, "eval_seconds": 600.0,
           "eval_other_cores": others}
    if bits:
        rec.update(expert_bits_per_weight=bpw, quantize_seconds=120.0, quantize_other_cores=0.0,
                   quantize_summary={"bcos_fallback_experts": fallbacks})
    (d / f"{key}.json").write_text(json.dumps(rec))


def test_two_tables_and_their_claims(tmp_path):
    recs, doc = tmp_path / "records", tmp_path / "doc" / "results.md"
    _record(recs, "", "fp", "FP", None, 16.0)
    _record(recs, "", "kbvq-w2", "KBVQ", 2, 70.0, bpw=2.37)
    _record(recs, "", "plain-vq-w2", "plain VQ", 2, 2000.0, bpw=2.27, others=1.0)
    _record(recs, "sparse", "fp", "FP", None, 30.0)
    _record(recs, "sparse", "kbvq-w2", "KBVQ", 2, 400.0, bpw=2.37, fallbacks=7)
    _record(recs, "sparse", "plain-vq-w2", "plain VQ", 2, 500.0, bpw=2.27, fallbacks=0)
    _record(recs, "sparse", "gptq-g128-w2", "GPTQ g128", 2, 300.0, bpw=2.32)
    _record(recs, "sparse", "gptq-g64-w2", "GPTQ g64", 2, 450.0, bpw=2.57)
    results.render(recs, doc, plot=False)
    page = doc.read_text()
    first, second = page.split("## The sparse-routed testbed")
    # all-experts: (70 - 16) / (2000 - 16) = 0.027; the shared-CPU eval time is starred
    assert "54.00 vs 1984.00 (ratio 0.027) | holds" in first
    plain = next(line for line in first.splitlines() if line.startswith("| plain VQ | 2 |"))
    assert plain.endswith("| 2.0 | 10.0* |")
    # sparse: (400 - 30) / (500 - 30) = 0.787 fails the 0.5 rule; GPTQ's 300 beats KBVQ's 400
    assert "370.00 vs 470.00 (ratio 0.787) | does not hold" in second
    assert "| 2-bit KBVQ beats GPTQ g128 | 400.00 vs 300.00 at 2.370 vs 2.320 bits/weight | does not hold |" in second
    # the sparse-only GPTQ g64 row: in the second table and its claims, not in the first
    assert "| 2-bit KBVQ beats GPTQ g64 | 400.00 vs 450.00 at 2.370 vs 2.570 bits/weight | holds |" in second
    assert "| GPTQ g64 |" not in first and "| GPTQ g64 | 2 | 2.570 |" in second
    kbvq_row = next(line for line in second.splitlines() if line.startswith("| KBVQ | 2 |"))
    assert kbvq_row.endswith("| 7 |")  # BCOS fallbacks column, sparse table only
    assert "cmd-sparse-kbvq-w2" in second and "cmd-sparse-kbvq-w2" not in first
