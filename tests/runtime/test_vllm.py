"""vLLM (CPU build, compiled mode) serves KBVQ checkpoints exactly as the reference runtime computes them."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tiny_models import ARCH_NAMES, MIXED, TUNED
from vllm_kbvq.reference import load_kbvq_model

pytest.importorskip("vllm")

HELPERS = Path(__file__).parents[1] / "helpers"
# float32 end to end; measured differences are ~5e-7 (different summation order in vLLM's
# attention and norms), so this bound leaves room without hiding a wrong tensor (those give >1e-2).
LOGPROB_ATOL = 1e-4
PROMPTS = [[5, 17, 42, 99, 7], [250, 3, 3, 3], [77, 120, 64, 31, 200, 11, 9]]


def vllm_generate(model: Path, prompts, tmp_path: Path, max_tokens=8, eager=False, tp=1) -> list[dict]:
    out = tmp_path / f"vllm-tp{tp}.json"
    cmd = [sys.executable, str(HELPERS / "vllm_generate.py"), str(model), str(out), "--prompts", json.dumps(prompts),
           "--max-tokens", str(max_tokens), "--tp", str(tp)] + (["--eager"] if eager else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(out.read_text())


def reference_greedy(model, prompt: list[int], steps: int):
    """Plain greedy decoding with full recomputation: token ids and per-step log-softmax."""
    ids = torch.tensor([prompt])
    tokens, logprobs = [], []
    with torch.no_grad():
        for _ in range(steps):
            lp = torch.log_softmax(model(ids).logits[0, -1].float(), -1)
            nxt = int(lp.argmax())
            tokens.append(nxt)
            logprobs.append(lp)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return tokens, logprobs


def assert_matches_reference(model_dir: Path, results, prompts, atol=LOGPROB_ATOL):
    ref = load_kbvq_model(model_dir, dtype=torch.float32)  # the torch oracle
    worst = 0.0
    for prompt, res in zip(prompts, results):
        tokens, logprobs = reference_greedy(ref, prompt, len(res["ids"]))
        assert res["ids"] == tokens, f"prompt {prompt}: vLLM {res['ids']} != reference {tokens}"
        for step, top in enumerate(res["logprobs"]):
            assert len(top) >= 5
            for tok, lp in top.items():
                worst = max(worst, abs(logprobs[step][int(tok)].item() - lp))
    assert worst <= atol, f"top-5 logprobs differ by up to {worst:.2e}"
    return worst


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_vllm_matches_reference(arch, kbvq_tiny, tmp_path):
    model_dir = kbvq_tiny(arch)
    results = vllm_generate(model_dir, PROMPTS, tmp_path)
    assert_matches_reference(model_dir, results, PROMPTS)


def test_vllm_serves_row_scaled_finetuned_checkpoints(kbvq_tiny, tmp_path):
    """Row scale (folded into affine_s and lr_a) and fine-tuned tensors change values, not the format
    (routed and shared experts; the CPU-kernel test covers DeepSeek-V2's shared experts too)."""
    model_dir = kbvq_tiny("qwen2_moe", **TUNED)
    results = vllm_generate(model_dir, PROMPTS, tmp_path)
    assert_matches_reference(model_dir, results, PROMPTS)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_vllm_serves_mixed_precision_checkpoints(arch, kbvq_tiny, tmp_path):
    """Format version 2: the experts of one MoE layer at different widths, loaded into one vLLM MoE layer
    (one bank of stacked tensors per width pair) and served as the reference runtime computes them."""
    model_dir = kbvq_tiny(arch, **MIXED)
    assert_matches_reference(model_dir, vllm_generate(model_dir, PROMPTS, tmp_path), PROMPTS)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="vLLM's CPU build runs one core per rank")
@pytest.mark.parametrize("mixed", [False, True], ids=["uniform", "mixed"])
def test_tensor_parallel_2_matches_reference(mixed, kbvq_tiny, tmp_path):
    """Two tensor-parallel ranks on vLLM CPU (one core each): the codes split by rows (gate/up) and by
    input (down, shared down), the shift added once; greedy tokens and logprobs are the reference's."""
    model_dir = kbvq_tiny("qwen2_moe", **(MIXED if mixed else {}))  # routed and shared experts
    assert_matches_reference(model_dir, vllm_generate(model_dir, PROMPTS, tmp_path, tp=2), PROMPTS)


# ---- bad checkpoints fail when vLLM builds its config, before any worker starts ------------------

@pytest.fixture(scope="module")
def engine_config():
    from vllm.engine.arg_utils import EngineArgs
    from vllm.plugins import load_general_plugins

    load_general_plugins()  # what every vLLM process does: finds our entry point

    def build(model, quantization=None):
        return EngineArgs(model=str(model), quantization=quantization, dtype="float32",
                          max_model_len=256).create_engine_config()

    return build


def test_kbvq_checkpoint_is_detected_without_a_flag(kbvq_tiny, engine_config):
    for q in (None, "kbvq"):
        cfg = engine_config(kbvq_tiny("qwen2_moe"), q)
        assert cfg.model_config.quantization == "kbvq"
        assert type(cfg.quant_config).__name__ == "KBVQQuantConfig" and cfg.quant_config.kbvq.bits == 2


@pytest.mark.parametrize("case", ["missing", "shape", "dtype", "version", "bits", "arch"])
def test_bad_checkpoint_fails_at_vllm_load(case, kbvq_tiny, engine_config, tmp_path):
    from pydantic import ValidationError

    from bad_checkpoints import broken_copy
    from vllm_kbvq.format import FormatError

    ckpt, needle = broken_copy(kbvq_tiny("qwen2_moe"), tmp_path / "c", case)
    # the plugin's FormatError (from validate_checkpoint / KBVQConfig.from_dict), which vLLM's pydantic
    # config wraps: one error, whose cause is that FormatError with its message
    with pytest.raises(ValidationError, match=re.escape(needle)) as e:
        engine_config(ckpt)
    (err,) = e.value.errors()
    assert type(err["ctx"]["error"]) is FormatError and needle in str(err["ctx"]["error"])


def test_quantization_flag_that_disagrees_with_the_checkpoint(kbvq_tiny, engine_config):
    from pydantic import ValidationError

    # vLLM's own check (ModelConfig), once the plugin has named the checkpoint's method kbvq
    with pytest.raises(ValidationError, match=r"\(kbvq\) does not match .*\(fp8\)") as e:
        engine_config(kbvq_tiny("qwen2_moe"), "fp8")
    (err,) = e.value.errors()
    assert type(err["ctx"]["error"]) is ValueError


def test_unsupported_vllm_version_is_refused_by_name():
    from vllm_kbvq.plugin import UnsupportedVLLMVersion, check_vllm_version

    for ok in ("0.32.0", "0.33.1", "0.33.0rc1"):
        check_vllm_version(ok)
    for bad in ("0.31.2", "0.34.0", "1.0.0", "dev"):
        with pytest.raises(UnsupportedVLLMVersion, match=re.escape(f"vLLM 0.32.x to 0.33.x, found vLLM {bad};")):
            check_vllm_version(bad)
