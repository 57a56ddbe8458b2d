"""vLLM (CPU build, compiled mode) serves KBVQ checkpoints exactly as the reference runtime computes them."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tiny_models import ARCH_NAMES
from vllm_kbvq.reference import load_kbvq_model

pytest.importorskip("vllm")

HERE = Path(__file__).parent
# float32 end to end; measured differences are ~5e-7 (different summation order in vLLM's
# attention and norms), so this bound leaves room without hiding a wrong tensor (those give >1e-2).
LOGPROB_ATOL = 1e-4
PROMPTS = [[5, 17, 42, 99, 7], [250, 3, 3, 3], [77, 120, 64, 31, 200, 11, 9]]


def vllm_generate(model: Path, prompts, tmp_path: Path, max_tokens=8, eager=False) -> list[dict]:
    out = tmp_path / "vllm.json"
    cmd = [sys.executable, str(HERE / "vllm_generate.py"), str(model), str(out), "--prompts", json.dumps(prompts),
           "--max-tokens", str(max_tokens)] + (["--eager"] if eager else [])
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
    ref = load_kbvq_model(model_dir, dtype=torch.float32)
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
