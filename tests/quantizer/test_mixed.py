"""Mixed precision (``--bits-budget``): the allocation, the budget, determinism and resumption, bad budgets.

That a mixed checkpoint computes what the reference runtime computes is tested with the runtimes
(tests/runtime: layout slicing, CPU kernels, vLLM).
"""
import itertools
import json
import math
import random
import signal

import pytest

from interrupted import calib_file, checkpoint_digest, six_layer_model, stop_after_layers
from quantize_tools.cli import main as cli_main
from quantize_tools.method.mixed import AllocationError, Unit, allocate
from tiny_models import ARCH_NAMES, MIXED
from vllm_kbvq.format import KBVQConfig, checkpoint_tensors, expected_matrices, validate_checkpoint

_DTYPE_BITS = {"I32": 32, "F16": 16}


def _random_units(rng: random.Random, n: int, options: int) -> list[Unit]:
    """Costs and errors in any order: options off the convex hull, and ones that cost more for more error."""
    return [Unit(tuple(float(rng.randint(1, 60)) for _ in range(options)), tuple(rng.random() for _ in range(options)))
            for _ in range(n)]


def _total(units, choice, what):
    return sum(getattr(u, what)[c] for u, c in zip(units, choice))


def _hull_oracle(u: Unit) -> list[int]:
    """The options of the lower convex hull's falling part, by definition rather than by a scan: no other option
    is as cheap and as good (equal ones: the lower index stays), and none lies strictly above the chord of two
    options that bracket its cost. Cheapest first."""
    n = len(u.costs)

    def beaten(i, j):
        key = (u.costs[j], u.errors[j], j)
        return key < (u.costs[i], u.errors[i], i) and u.errors[j] <= u.errors[i]

    def above_a_chord(i):
        ci, ei = u.costs[i], u.errors[i]
        return any(u.costs[a] < ci < u.costs[b] and (ei - u.errors[a]) * (u.costs[b] - u.costs[a])
                   > (u.errors[b] - u.errors[a]) * (ci - u.costs[a]) for a in range(n) for b in range(n))

    return sorted((i for i in range(n) if not any(beaten(i, j) for j in range(n)) and not above_a_chord(i)),
                  key=lambda i: u.costs[i])


def _lagrangian_costs(units: list[Unit]) -> list[float]:
    """The total costs of the Lagrangian solutions (every unit at its least error + price x cost), over all
    prices: evaluated above, below and between every price at which some unit's best option changes."""
    prices = sorted({(u.errors[a] - u.errors[b]) / (u.costs[b] - u.costs[a]) for u in units
                     for a in range(len(u.costs)) for b in range(len(u.costs)) if u.costs[b] > u.costs[a]})
    positive = [p for p in prices if p > 0]
    probes = [max(positive, default=1.0) * 2 + 1e6, min(positive, default=1.0) / 2]
    probes += [(lo + hi) / 2 for lo, hi in zip(positive, positive[1:])]
    out = []
    for price in probes:
        choice = [min(range(len(u.costs)), key=lambda i, u=u: (u.errors[i] + price * u.costs[i], u.costs[i]))
                  for u in units]
        out.append(_total(units, choice, "costs"))
    return out


def test_allocation_against_exhaustive_search():
    """What allocate.py promises, against an exhaustive search of every choice: the greedy is optimal for what it
    has spent when it first meets an upgrade that does not fit (the largest Lagrangian solution within the
    budget), so never worse than the best choice costing that much, nor than the cheapest choice; after it, the
    budget is used (no unit's next hull step still fits); the hull is the convex hull; ties go to the lower unit."""
    rng = random.Random(0)
    exact = 0
    for _ in range(400):
        units = _random_units(rng, rng.randint(1, 5), rng.randint(2, 4))
        for u in units:
            assert u.hull() == _hull_oracle(u), u
        least, most = _total(units, [u.costs.index(min(u.costs)) for u in units], "costs"), sum(max(u.costs) for u in units)
        budget = rng.uniform(least, most)
        choice = allocate(units, budget)
        assert choice == allocate(units, budget)
        cost, got = _total(units, choice, "costs"), _total(units, choice, "errors")
        assert cost <= budget
        feasible = [(_total(units, combo, "costs"), _total(units, combo, "errors"))
                    for combo in itertools.product(*(range(len(u.costs)) for u in units))]

        def best(bits, feasible=feasible):
            return min(e for c, e in feasible if c <= bits + 1e-9)

        reached = max(c for c in _lagrangian_costs(units) if c <= budget)
        assert got <= best(reached) + 1e-12, (units, budget, choice)
        exact += got == pytest.approx(best(budget), abs=1e-12)
        cheapest = [min(range(len(u.costs)), key=lambda i, u=u: (u.costs[i], u.errors[i], i)) for u in units]
        assert got <= _total(units, cheapest, "errors") + 1e-12
        for u, c in zip(units, choice):  # the budget is used: each unit at a hull option, its next step too dear
            hull = _hull_oracle(u)
            assert c in hull
            if c != hull[-1]:
                assert cost + u.costs[hull[hull.index(c) + 1]] - u.costs[c] > budget, (units, budget, choice)
    assert exact > 350  # mostly (380 of 400) the optimum itself, not only within the bound
    on_a_line = Unit((2.0, 3.0, 4.0), (10.0, 8.0, 6.0))  # the middle option is a finer step, kept
    assert on_a_line.hull() == _hull_oracle(on_a_line) == [0, 1, 2]
    twins = [Unit((1.0, 2.0), (1.0, 0.0))] * 3
    assert allocate(twins, 4.0) == [1, 0, 0] and allocate(twins, 5.0) == [1, 1, 0]
    with pytest.raises(AllocationError, match="over the budget"):
        allocate([Unit((5.0, 9.0), (1.0, 0.5))], 4.0)


def test_allocation_is_optimal_at_every_price():
    """At a budget that a price per bit spends exactly (every unit at its option of least error + price x cost),
    no choice within the budget has less error, so the greedy must find that error: a hull that drops an option
    of diminishing returns (the middle of 2, 3, 4 bits) fails this."""
    rng = random.Random(1)
    for _ in range(300):
        units = [Unit(tuple(float(c) for c in rng.sample(range(1, 1000), k)), tuple(rng.random() for _ in range(k)))
                 for k in [rng.randint(2, 4) for _ in range(rng.randint(1, 5))]]
        price = rng.expovariate(100.0)
        lagrange = [min(range(len(u.costs)), key=lambda i, u=u: u.errors[i] + price * u.costs[i]) for u in units]
        budget = _total(units, lagrange, "costs")
        best = min(_total(units, combo, "errors") for combo in itertools.product(*(range(len(u.costs)) for u in units))
                   if _total(units, combo, "costs") <= budget)
        assert _total(units, allocate(units, budget), "errors") == pytest.approx(best, abs=1e-12)
    assert Unit((2.0, 3.0, 4.0), (10.0, 5.0, 4.0)).hull() == [0, 1, 2]  # diminishing returns: all three
    assert Unit((2.0, 3.0, 4.0), (10.0, 9.0, 0.0)).hull() == [0, 2]  # 3 bits buys less per bit than 4


def _layer_bits(path, cfg: KBVQConfig) -> dict[int, float]:
    """Bits per expert weight of each layer's KBVQ tensors, from the safetensors headers."""
    have = checkpoint_tensors(path)
    model_cfg = json.loads((path / "config.json").read_text())
    bits, weights = {}, {}
    for ref in expected_matrices(model_cfg, cfg):
        for suffix in ref.specs():
            _, shape, dtype = have[ref.name(suffix)]
            bits[ref.layer] = bits.get(ref.layer, 0) + math.prod(shape) * _DTYPE_BITS[dtype]
        weights[ref.layer] = weights.get(ref.layer, 0) + ref.oc * ref.ic
    return {layer: bits[layer] / weights[layer] for layer in bits}


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_budget_is_never_exceeded(arch, kbvq_tiny):
    """Every layer within the budget (counted from the stored tensors), the experts' widths mixed, the
    report's figures the checkpoint's, and the config format version 2."""
    path = kbvq_tiny(arch, **MIXED)
    cfg = validate_checkpoint(path)
    assert cfg.format_version == 2 and json.loads((path / "config.json").read_text())["quantization_config"][
        "format_version"] == 2
    per_layer = _layer_bits(path, cfg)
    assert max(per_layer.values()) <= MIXED["bits_budget"]
    report = json.loads((path / "kbvq_report.json").read_text())
    for rep in report["layers"]:
        assert rep["allocation"]["bits_per_weight"] == pytest.approx(per_layer[rep["layer"]], rel=1e-12)
        assert rep["allocation"]["error"] <= rep["allocation"]["error_cheapest"]
    assert report["summary"]["expert_bits_per_weight"] <= MIXED["bits_budget"]
    alloc = report["summary"]["allocation"]
    total = sum(sum(rep["routed_tokens"]) for rep in report["layers"])
    for unit, by_width in alloc["routed_tokens_by_width"].items():  # means over the experts each width went to
        counts = alloc["widths"]["experts"][unit]
        got = sum(mean * counts[w] for w, mean in by_width.items())
        assert got == pytest.approx(total, abs=0.05 * sum(counts.values()))  # means rounded to 0.1
    by_layer = alloc["routed_widths_by_layer"]  # against the widths the checkpoint's config gives each expert
    assert by_layer["layers"] == sorted(cfg.layers)
    for unit, wtype in (("gate_up", "gate"), ("down", "down")):
        for i, layer in enumerate(by_layer["layers"]):
            members = range(len(cfg.width_of[str(layer)]["experts"][wtype]))
            listed = [str(cfg.width(layer, "experts", wtype, e)) for e in members]
            assert {w: c[i] for w, c in by_layer["widths"][unit].items() if c[i]} == {w: listed.count(w) for w in listed}
    routed = {tuple(w) for layer in cfg.width_of.values() for w in [layer["experts"]["gate"], layer["experts"]["down"]]}
    assert any(len(set(w)) > 1 for w in routed), "the budget should give routed experts of one layer different widths"
    uniform = validate_checkpoint(kbvq_tiny(arch))  # what --bits writes stays format version 1
    assert uniform.format_version == 1 and "width_of" not in json.loads(
        (kbvq_tiny(arch) / "config.json").read_text())["quantization_config"]


def _cli(model_dir, out, calib, *extra):
    widths = ",".join(f"{b}x{d}" for b, d in MIXED["candidate_widths"])
    return ["--model", str(model_dir), "--output", str(out), "--nsamples", "4", "--seqlen", "32", "--kmeans-iters",
            "20", "--calib", str(calib), "--quiet", "--bits-budget", str(MIXED["bits_budget"]),
            "--candidate-widths", widths, *extra]


def test_mixed_run_is_deterministic_and_resumes_identically(tmp_path):
    """Killed after two layers and resumed == run straight through == run again; the widths chosen before
    the kill are those the resumed run installs for the layers after."""
    model_dir, calib = six_layer_model(tmp_path / "m"), calib_file(tmp_path)
    args = _cli(model_dir, tmp_path / "killed", calib)
    done = stop_after_layers(args, tmp_path / "killed", 2, signal.SIGKILL)
    assert 2 <= len(done) < 6
    assert cli_main(args + ["--resume"]) == 0
    for name in ("straight", "again"):
        assert cli_main(_cli(model_dir, tmp_path / name, calib)) == 0
    digest = checkpoint_digest(tmp_path / "straight")
    assert checkpoint_digest(tmp_path / "killed") == digest == checkpoint_digest(tmp_path / "again")
    cfg = validate_checkpoint(tmp_path / "straight")
    assert cfg.format_version == 2 and len(cfg.width_of) == 6


def test_bad_budgets_fail_clearly(tiny_model, tmp_path, capsys):
    model_dir, calib = tiny_model("mixtral"), calib_file(tmp_path)
    out = tmp_path / "out"
    assert cli_main(_cli(model_dir, out, calib)[:-4] + ["--bits-budget", "1.5"]) == 2
    err = capsys.readouterr().err
    assert "--bits-budget 1.5: this model's layers need at least" in err and "cheapest of --candidate-widths" in err
    assert not out.exists() and not (tmp_path / "out.kbvq-partial").exists()
    assert cli_main(_cli(model_dir, out, calib) + ["--method", "rtn"]) == 2
    assert "--bits-budget applies to --method kbvq only" in capsys.readouterr().err
    for bad in ("3x8", "2x4", "2x3,4x2", "2-4,4x2"):
        with pytest.raises(SystemExit):
            cli_main(_cli(model_dir, out, calib)[:-1] + [bad])
        assert "--candidate-widths" in capsys.readouterr().err


def test_width_of_errors_name_the_field(kbvq_tiny):
    """A version 2 config whose width_of disagrees with itself or the model fails at load, naming the field."""
    path = kbvq_tiny("qwen2_moe", **MIXED)
    q = json.loads((path / "config.json").read_text())["quantization_config"]
    layer = str(q["layers"][0])
    edits = {
        "gate and up widths differ": lambda d: d["width_of"][layer]["experts"]["up"].__setitem__(
            0, (d["width_of"][layer]["experts"]["gate"][0] + 1) % 3),
        "must be a list of indices into widths": lambda d: d["width_of"][layer]["experts"]["down"].__setitem__(0, 7),
        "one entry per layer": lambda d: d["width_of"].pop(layer),
        "width_of is missing": lambda d: d.pop("width_of"),
        "must be the narrowest": lambda d: d.__setitem__("bits", 4),
    }
    for needle, edit in edits.items():
        d = json.loads(json.dumps(q))
        edit(d)
        d.pop("codebook_size"), d.pop("index_bits")
        with pytest.raises(ValueError, match=needle):
            KBVQConfig.from_dict(d)
    d = json.loads(json.dumps(q))
    d["width_of"][layer]["experts"]["down"].append(0)
    cfg = KBVQConfig.from_dict(d)
    with pytest.raises(ValueError, match=r"must list 8 width\(s\), one per member"):
        expected_matrices(json.loads((path / "config.json").read_text()), cfg)
