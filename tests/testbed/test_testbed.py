"""The SmolLM2-derived MoE testbeds must compute what their dense oracle computes.

Everything else in the project trusts these checkpoints as "unquantized equals dense", so the
oracle is checked on logits after a full save/reload round trip, not on in-memory objects.
"""

import copy
import hashlib
import os
import re
import shutil

import pytest
import torch
from safetensors import safe_open

from quantize_tools.testbed import build as tb

transformers = pytest.importorskip("transformers")

SENTENCES = [
    "The Rhine flows from the Swiss Alps through Germany and the Netherlands to the North Sea.",
    "In 1858, the Virgin Mary reputedly appeared to Saint Bernadette Soubirous at Lourdes.",
    "def add(a, b):\n    return a + b  # the quick brown fox jumps over the lazy dog",
]
# Exactness is checked in float64 (eager experts), where a power-of-two expert count gives
# differences of 0 to 1e-12. In float32, the path users run, splitting the FFN only changes the
# summation order, so the bound is the dense model's own float32 rounding error (its logits
# against its float64 logits, 1.1e-4 on these sentences whose logits are ~10-30) times two.
# Measured MoE-vs-dense float32 gaps: 0 to 1.4e-4 (6.8e-5 to 9.5e-5 with grouped_mm, E=8).
TOL64 = 1e-9
FP32_NOISE_FACTOR = 2.0
# qwen3_moe's linearised q/k norm (q/k scaled by 2**-24, norm weight sqrt(eps)*2**24 rounded to
# float32) is an identity only up to float32 rounding: 1.3e-5 against SmolLM2 in float64.
TOL64_QWEN3_VS_SMOLLM2 = 1e-4


@pytest.fixture(autouse=True)
def _drop_checkpoints(request):
    """Each build writes ~0.5 GB; do not keep them in pytest's retained tmp dirs."""
    path = request.getfixturevalue("tmp_path") if "tmp_path" in request.fixturenames else None
    yield
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def dense():
    model, tokenizer = tb.load_dense_model()
    return model, tokenizer


@pytest.fixture(scope="module")
def dense_logits(dense):
    return _logits(dense[0], dense[1])


@pytest.fixture(scope="module")
def dense_logits64(dense):
    model64 = copy.deepcopy(dense[0]).to(torch.float64)
    return _logits(model64, dense[1])


@pytest.fixture(scope="module")
def tol32(dense_logits, dense_logits64):
    noise = _max_diff(dense_logits, dense_logits64)
    assert 0 < noise < 1e-3  # fp32 is not exact, but the dense model itself is sane
    return FP32_NOISE_FACTOR * noise


def _load(path, dtype):
    # grouped_mm, transformers' default experts kernel, has no float64 version
    kw = {"experts_implementation": "eager"} if dtype == torch.float64 else {}
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw).eval()


def _logits(model, tokenizer):
    with torch.no_grad():
        return [model(tokenizer(s, return_tensors="pt").input_ids).logits for s in SENTENCES]


def _max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def _keys(path):
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        return list(f.keys())


def _tensor(path, name):
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        return f.get_tensor(name)


def _sha256(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _build(dense, layout, experts, out, **kw):
    model, tokenizer = dense
    return tb.build_testbed(layout, experts, out, dense_model=model, tokenizer=tokenizer, **kw)


EXPERT_NAMES = {
    "mixtral": "model.layers.0.block_sparse_moe.experts.{e}.{p}.weight",
    "qwen2_moe": "model.layers.0.mlp.experts.{e}.{p}.weight",
    "qwen3_moe": "model.layers.0.mlp.experts.{e}.{p}.weight",
}
PROJ = {"mixtral": ("w1", "w3", "w2")}


@pytest.mark.parametrize("layout,experts", [("mixtral", 8), ("qwen2_moe", 4), ("qwen2_moe", 8)])
def test_moe_reproduces_dense_smollm2(
    dense, dense_logits, dense_logits64, tol32, tmp_path, layout, experts
):
    out = _build(dense, layout, experts, tmp_path / "ckpt")
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= set(
        os.listdir(out)
    )

    # per-expert tensor names on disk, holding the dense slices exactly
    keys = set(_keys(out))
    gate_n, up_n, down_n = PROJ.get(layout, ("gate_proj", "up_proj", "down_proj"))
    plan = tb.expert_plan(layout, experts)
    dense_sd = dense[0].state_dict()
    last = experts - 1
    rows = plan.expert_slice(last)
    name = EXPERT_NAMES[layout]
    for p in (gate_n, up_n, down_n):
        assert name.format(e=last, p=p) in keys
    assert not any("gate_up_proj" in k for k in keys)
    assert torch.equal(
        _tensor(out, name.format(e=last, p=gate_n)),
        dense_sd["model.layers.0.mlp.gate_proj.weight"][rows],
    )
    assert torch.equal(
        _tensor(out, name.format(e=last, p=down_n)),
        dense_sd["model.layers.0.mlp.down_proj.weight"][:, rows] * experts,
    )
    if layout == "qwen2_moe":
        assert "model.layers.0.mlp.shared_expert.down_proj.weight" in keys
        assert "model.layers.0.mlp.shared_expert_gate.weight" in keys
        assert not _tensor(out, "model.layers.0.self_attn.q_proj.bias").any()

    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer(SENTENCES[0]).input_ids == dense[1](SENTENCES[0]).input_ids
    model = _load(out, torch.float32)
    assert model.config.num_experts_per_tok == experts
    assert _max_diff(_logits(model, tokenizer), dense_logits) <= tol32
    del model
    assert _max_diff(_logits(_load(out, torch.float64), tokenizer), dense_logits64) <= TOL64


def test_qwen3_moe_matches_its_dense_twin_and_smollm2(
    dense, dense_logits, dense_logits64, tol32, tmp_path
):
    out = _build(dense, "qwen3_moe", 8, tmp_path / "ckpt")
    keys = set(_keys(out))
    assert "model.layers.0.mlp.experts.7.gate_proj.weight" in keys
    assert "model.layers.0.self_attn.q_norm.weight" in keys
    twin = tb.qwen3_dense_twin(dense[0])
    model = _load(out, torch.float32)
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    assert model.config.testbed["equals_base_model"] is True
    moe = _logits(model, dense[1])
    assert _max_diff(moe, _logits(twin, dense[1])) <= tol32
    assert _max_diff(moe, dense_logits) <= tol32
    del model
    moe64 = _logits(_load(out, torch.float64), dense[1])
    assert _max_diff(moe64, _logits(twin.to(torch.float64), dense[1])) <= TOL64
    assert _max_diff(moe64, dense_logits64) <= TOL64_QWEN3_VS_SMOLLM2


def test_qwen3_moe_unit_norm_is_a_different_model_with_an_exact_twin(dense, dense_logits, tmp_path):
    out = _build(dense, "qwen3_moe", 4, tmp_path / "ckpt", qk_norm="unit")
    model = _load(out, torch.float64)
    assert model.config.testbed["equals_base_model"] is False
    moe = _logits(model, dense[1])
    twin = tb.qwen3_dense_twin(dense[0], qk_norm="unit").to(torch.float64)
    assert _max_diff(moe, _logits(twin, dense[1])) <= TOL64
    assert _max_diff(moe, dense_logits) > 1.0  # honest: not SmolLM2 (measured ~40)


def test_build_is_deterministic(dense, tmp_path):
    a = _build(dense, "qwen2_moe", 4, tmp_path / "a")
    b = tb.build_testbed("qwen2_moe", 4, tmp_path / "b", dense_model=dense[0], tokenizer=dense[1])
    for name in sorted(os.listdir(a)):
        assert _sha256(a / name) == _sha256(b / name), name
    assert sorted(os.listdir(a)) == sorted(os.listdir(b))


def test_bfloat16_checkpoint_rounds_like_the_dense_model(dense, tmp_path):
    out = _build(dense, "mixtral", 4, tmp_path / "bf16", dtype="bfloat16")
    w2 = _tensor(out, "model.layers.3.block_sparse_moe.experts.1.w2.weight")
    assert w2.dtype == torch.bfloat16
    ref = dense[0].state_dict()["model.layers.3.mlp.down_proj.weight"][:, 384:768]
    assert torch.equal(w2, ref.to(torch.bfloat16) * 4)  # power-of-two scale: exact
    cfg = transformers.AutoConfig.from_pretrained(out)
    assert str(cfg.dtype).removeprefix("torch.") == "bfloat16"


def test_existing_output_is_refused_and_left_untouched(dense, tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(tb.TestbedError, match=re.escape(str(out))):
        _build(dense, "mixtral", 4, out)
    assert os.listdir(out) == ["keep.txt"]
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no partial sibling left behind


def test_overwrite_replaces_atomically(dense, tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    _build(dense, "mixtral", 4, out, overwrite=True)
    assert "stale.txt" not in os.listdir(out)
    assert "model.safetensors" in os.listdir(out)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_failed_write_leaves_nothing(dense, tmp_path, monkeypatch):
    def boom(model, directory):
        (directory / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(tb, "_save_model", boom)
    with pytest.raises(OSError, match="disk full"):
        _build(dense, "mixtral", 4, tmp_path / "ckpt")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "layout,experts,shared,message",
    [
        ("mixtral", 5, None, "valid expert counts"),
        ("qwen2_moe", 64, None, "VQ vector length"),
        ("qwen2_moe", 8, 386, "shared expert size 386"),
        ("qwen3_moe", 8, 128, "no shared expert"),
        ("deepseek", 8, None, "unknown layout"),
        ("mixtral", 0, None, "positive integer"),
    ],
)
def test_bad_plans_fail_clearly(layout, experts, shared, message):
    with pytest.raises(tb.TestbedError, match=message):
        tb.expert_plan(layout, experts, shared)


def test_expert_sizes():
    assert tb.expert_plan("qwen2_moe", 8) == tb.ExpertPlan("qwen2_moe", 8, 144, 384)
    assert tb.expert_plan("mixtral", 4).expert_size == 384
    assert tb.expert_plan("qwen3_moe", 16).expert_size == 96


def test_cli_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f").write_text("")
    with pytest.raises(SystemExit) as exc:
        tb.main(["--layout", "mixtral", "--experts", "4", "--output", str(tmp_path / "x")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "not empty" in err
    with pytest.raises(SystemExit):
        tb.main(["--help"])
    assert "SmolLM2" in capsys.readouterr().out
