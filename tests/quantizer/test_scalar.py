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
    for name in a:
        want = rtn_quantize(a[name], 3, 48) if name in quantized else a[name]
        torch.testing.assert_close(b[name], want, atol=1e-6, rtol=0, msg=name)
    ic = {w: t.shape[1] for w, t in ((w, a[spec.expert_tensor(0, 0, w)]) for w in WEIGHT_TYPES)}
    assert report["summary"]["expert_bits_per_weight"] >= min(scalar_bits_per_weight(3, 48, i) for i in ic.values())


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
