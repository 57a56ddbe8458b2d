"""The command-line front doors answer at once and in plain words: help, and the user errors a newcomer makes.

Everything here runs the real commands in subprocesses (``python -m``, as the console scripts do) and
never starts vLLM.
"""
import re
import subprocess
import sys
import time

import pytest

TIMEOUT_S = 60  # a hang (vLLM looking for a hub repo, say) fails here instead of waiting minutes


def _run(module: str, args: list[str], cwd=None, **kw) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=cwd,
                       timeout=TIMEOUT_S, **kw)
    return r, time.monotonic() - t0


def _one_error_line(r: subprocess.CompletedProcess, prog: str) -> str:
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr + r.stdout
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith(f"{prog}: error: ")]
    assert len(errors) == 1, r.stderr
    return errors[0]


# -- kbvq-serve --------------------------------------------------------------------------------

@pytest.mark.parametrize("args", [["--help"], ["-h"], []])
def test_serve_help_is_its_own(args):
    r, seconds = _run("vllm_kbvq.serve", args)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert out.startswith("usage: kbvq-serve CKPT")
    assert "`" not in out and "api_server" not in out and "Deprecat" not in out + r.stderr
    assert "vllm serve CKPT --quantization kbvq" in out and "--help-vllm" in out
    assert "VLLM_CPU_KVCACHE_SPACE" in out and "local KBVQ checkpoint directory" in out
    for opt in ("--port", "--host", "--max-model-len", "--served-model-name", "--gpu-memory-utilization",
                "--tensor-parallel-size"):
        assert re.search(rf"^\s+{opt}\b", out, re.M), opt
    assert len(out.splitlines()) < 80
    assert seconds < 5


def test_serve_help_imports_neither_vllm_nor_torch():
    script = ("import sys\nfrom vllm_kbvq.serve import main\nassert main(['--help']) == 0\n"
              "print('LOADED', sorted({m.split('.')[0] for m in sys.modules} & {'vllm', 'torch'}))")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=TIMEOUT_S)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == "LOADED []"


def test_serve_refuses_a_missing_relative_path_at_once(tmp_path):
    r, seconds = _run("vllm_kbvq.serve", ["out/no-such-ckpt", "--port", "8000"], cwd=tmp_path)
    line = _one_error_line(r, "kbvq-serve")
    assert "out/no-such-ckpt does not exist" in line and str(tmp_path) in line
    assert "local checkpoint directory" in line and "hf download" in line
    assert seconds < 10


def test_serve_refuses_a_file(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"not a checkpoint")
    r, seconds = _run("vllm_kbvq.serve", ["model.safetensors"], cwd=tmp_path)
    line = _one_error_line(r, "kbvq-serve")
    assert "model.safetensors is a file, not a directory" in line and "local checkpoint directory" in line
    assert seconds < 10


def test_serve_refuses_a_broken_checkpoint_in_one_line(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "qwen2_moe", ')  # cut off mid-write
    r, _ = _run("vllm_kbvq.serve", [str(tmp_path)])
    assert "config.json" in _one_error_line(r, "kbvq-serve")


def test_serve_wants_the_checkpoint_first():
    r, _ = _run("vllm_kbvq.serve", ["--port", "8000", "ckpt"])
    line = _one_error_line(r, "kbvq-serve")
    assert "CKPT comes first" in line and "--help" in line


# -- kbvq-eval ---------------------------------------------------------------------------------

def test_eval_help_shows_defaults_once_and_no_markup():
    r, _ = _run("quantize_tools.eval.evaluate", ["--help"])
    assert r.returncode == 0, r.stderr
    out = " ".join(r.stdout.split())  # argparse wraps lines anywhere
    assert re.search(r"--seqlen SEQLEN .*?\(default: 2048\)", out)
    assert re.search(r"--batch-size BATCH_SIZE .*?\(default: 8\)", out)
    assert "(default: None)" not in out and "(default: False)" not in out
    assert "``" not in r.stdout and ":mod:" not in r.stdout
    for opt in re.findall(r"^  (--[\w-]+)", r.stdout, re.M):
        # each option's own help text carries at most one default
        text = out.split(f" {opt} ", 1)[1].split(" --", 1)[0]
        assert text.count("(default:") <= 1, opt


def test_eval_missing_model_directory_is_one_line():
    r, _ = _run("quantize_tools.eval.evaluate", ["--model", "/nonexistent", "--tasks", "wikipedia"])
    line = _one_error_line(r, "kbvq-eval")
    assert "/nonexistent" in line


@pytest.mark.parametrize("args, words", [
    (["--model", "/nonexistent", "--seqlen", "0"], "--seqlen"),
    (["--model", "/nonexistent", "--batch-size", "x"], "--batch-size"),
    (["--seqlen", "128"], "--model"),
    (["--model", "/nonexistent", "--tasks", " , "], "--tasks"),
])
def test_eval_bad_options_are_one_line(args, words):
    r, _ = _run("quantize_tools.eval.evaluate", args)
    assert words in _one_error_line(r, "kbvq-eval")
