"""RTN and GPTQ baselines through the layer-streaming pipeline: plain checkpoints of dequantized weights."""
import json

import pytest
import torch
from safetensors import safe_open

from quantize_tools.method.gptq import rtn_quantize
from quantize_tools.method.scalar import scalar_bits_per_weight
from quantize_tools.pipeline import QuantizeOptions, quantize
from vllm_kbvq.archs import WEIGHT_TYPES, arch_for_config


def _tensors(d):
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            out.update({k: h.get_tensor(k).float() for k in h.keys()})
    return out


def _rtn_oracle(w, bits, group_size):
    """Per row, per run of ``group_size`` inputs (the last one shorter): the asymmetric min/max grid (0 on it,
    2^bits points, zero point rounded) and each weight's nearest point on it, by search over the points."""
    out = torch.empty_like(w, dtype=torch.float64)
    for c0 in range(0, w.shape[1], group_size):
        grp = w[:, c0:c0 + group_size].double()
        lo, hi = grp.min(1).values.clamp(max=0), grp.max(1).values.clamp(min=0)
        scale = (hi - lo) / (2**bits - 1)
        zero = torch.round(-lo / scale)
        points = (torch.arange(2**bits, dtype=torch.float64)[None, :] - zero[:, None]) * scale[:, None]
        nearest = (grp[:, :, None] - points[:, None, :]).abs().argmin(-1)
        out[:, c0:c0 + group_size] = points.gather(1, nearest)
    return out.float()


def _tokens(n=8, seqlen=64, seed=0):
    return torch.randint(1, 320, (n, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ["qwen2_moe", "mixtral"])
def test_rtn_checkpoint_is_the_rounded_original(arch, tiny_model, tmp_path):
    """Expert (and shared-expert) weights equal per-group RTN of the originals; everything else is copied."""
    src = tiny_model(arch)
    cfg = json.loads((src / "config.json").read_text())
    spec = arch_for_config(cfg)
    report = quantize(src, tmp_path / "rtn", _tokens(), QuantizeOptions(method="rtn", bits=3, group_size=48),
                      progress=False)
    a, b = _tensors(src), _tensors(tmp_path / "rtn")
    assert set(a) == set(b)
    assert "quantization_config" not in json.loads((tmp_path / "rtn" / "config.json").read_text())
    quantized = {spec.expert_tensor(layer, e, w) for layer in range(cfg["num_hidden_layers"])
                 for e in range(spec.num_experts(cfg)) for w in WEIGHT_TYPES}
    if spec.shared_prefix:
        quantized |= {spec.shared_tensor(layer, w) for layer in range(cfg["num_hidden_layers"]) for w in WEIGHT_TYPES}
    quantized &= set(a)
    assert quantized
    assert any(a[name].shape[1] % 48 for name in quantized)  # a shorter last group is among them
    for name in a:
        want = rtn_quantize(a[name], 3, 48) if name in quantized else a[name]
        torch.testing.assert_close(b[name], want, atol=1e-6, rtol=0, msg=name)
        if name in quantized:
            torch.testing.assert_close(b[name], _rtn_oracle(a[name], 3, 48), atol=1e-6, rtol=0, msg=name)
    # bits counted from the quantized tensors' shapes: 3 per weight, and a 16-bit scale and zero point per group
    bits = sum(a[n].numel() * 3 + a[n].shape[0] * -(-a[n].shape[1] // 48) * 32 for n in quantized)
    weights = sum(a[n].numel() for n in quantized)
    assert report["summary"]["expert_weights"] == weights
    assert report["summary"]["expert_bits_per_weight"] == pytest.approx(bits / weights, rel=1e-12)
    ic = a[spec.expert_tensor(0, 0, "down")].shape[1]
    assert scalar_bits_per_weight(3, 48, ic) == pytest.approx(3 + -(-ic // 48) * 32 / ic, rel=1e-12)


def test_gptq_lowers_output_error_and_loads_as_a_plain_model(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    src = tiny_model("mixtral")
    reports = {m: quantize(src, tmp_path / m, _tokens(16, 64), QuantizeOptions(method=m, bits=2, group_size=32),
                           progress=False)["summary"] for m in ("rtn", "gptq")}
    for w in WEIGHT_TYPES:
        assert reports["gptq"]["mean_output_rel_err"][w] < reports["rtn"]["mean_output_rel_err"][w], w
    assert reports["gptq"]["expert_bits_per_weight"] == reports["rtn"]["expert_bits_per_weight"]
    # every 32-wide group of a GPTQ row holds at most 2^bits distinct values
    t = _tensors(tmp_path / "gptq")["model.layers.0.block_sparse_moe.experts.1.w2.weight"]
    groups = t.reshape(t.shape[0], -1, 32)
    assert max(len(torch.unique(g)) for g in groups.reshape(-1, 32)) <= 4
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "gptq", dtype=torch.float32)
    with torch.no_grad():
        assert torch.isfinite(model(_tokens(1, 16)).logits).all()
