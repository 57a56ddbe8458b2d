"""A quantizer run stopped part-way, as a user or a job scheduler stops it: shared by the resume tests."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tiny_models import tiny_config, tiny_tokenizer

REPO = Path(__file__).resolve().parents[2]


def six_layer_model(path: Path) -> Path:
    """A tiny Qwen3-MoE with six MoE layers: room to stop after two."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("qwen3_moe")
    cfg.num_hidden_layers = 6
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def _as_in_a_terminal() -> None:
    """The run takes Ctrl-C as it would in a user's terminal, even when the test suite was started
    with SIGINT ignored (a background job of a shell without job control: children inherit that)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def stop_after_layers(args: list[str], output: Path, layers: int, sig, timeout: float = 300) -> list[int]:
    """Run ``kbvq-quantize args``, send ``sig`` once ``layers`` layers are done; the finished layer list."""
    proc = subprocess.Popen([sys.executable, "-m", "quantize_tools.cli", *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_as_in_a_terminal)
    progress = output.with_name(output.name + ".kbvq-partial") / "progress.json"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if progress.is_file():
            try:
                if len(json.loads(progress.read_text())["done"]) >= layers:
                    break
            except (json.JSONDecodeError, KeyError):
                pass
        if proc.poll() is not None:
            pytest.fail("the run finished before it could be stopped")
        time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail(f"the run did not finish {layers} layers in {timeout:.0f} s")
    proc.send_signal(sig)
    proc.wait(timeout=120)
    return json.loads(progress.read_text())["done"]
