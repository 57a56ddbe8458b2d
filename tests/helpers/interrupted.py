"""A quantizer run stopped part-way, as a user or a job scheduler stops it: shared by the resume tests."""
import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tiny_models import TEXT, tiny_config, tiny_tokenizer

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


def checkpoint_digest(d: Path) -> dict[str, str]:
    """sha256 of a checkpoint's tensors, config and index: equal digests, bit-identical results."""
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(d.iterdir())
            if f.suffix == ".safetensors" or f.name in ("config.json", "model.safetensors.index.json")}


def calib_file(tmp_path: Path, repeats: int = 20) -> Path:
    """A plain-text calibration file of the tiny tokenizer's sentences."""
    p = tmp_path / "calib.txt"
    p.write_text(TEXT * repeats)
    return p


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
