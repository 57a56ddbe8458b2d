"""The command-line front doors answer at once and in plain words: help, and the user errors a newcomer makes.

Everything here runs the real commands in subprocesses (``python -m``, as the console scripts do) and
never starts vLLM.
"""
import os
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


@pytest.mark.parametrize("n_cpus, ranks", [(2, 2), (16, 2), (7, 3), (4, 4)])
def test_serve_splits_the_cores_between_cpu_ranks(n_cpus, ranks):
    """Every core given to exactly one rank, in order, shares differing by at most one: parsed back the way
    vLLM reads VLLM_CPU_OMP_THREADS_BIND (rank lists split on "|", ids on ",")."""
    from vllm_kbvq.serve import cpu_bind

    cpus = list(range(3, 3 + n_cpus))  # the usable CPUs need not start at 0
    groups = [[int(c) for c in g.split(",")] for g in cpu_bind(cpus, ranks).split("|")]
    assert len(groups) == ranks and sum(groups, []) == cpus
    assert max(map(len, groups)) - min(map(len, groups)) <= 1


def test_serve_refuses_more_cpu_ranks_than_cores(kbvq_tiny, tmp_path):
    """Checked after the checkpoint, before vLLM starts: on CPU each tensor-parallel rank needs a core."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    env.pop("VLLM_CPU_OMP_THREADS_BIND", None)
    r, seconds = _run("vllm_kbvq.serve", [str(kbvq_tiny("qwen2_moe")), "--tensor-parallel-size", "512"], cwd=tmp_path,
                      env=env)
    line = _one_error_line(r, "kbvq-serve")
    assert "--tensor-parallel-size 512 on CPU needs at least one core per rank" in line


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


@pytest.mark.parametrize("bits, d", [(1, 4), (2, 4), (3, 4), (4, 2), (5, 2), (8, 2)])
def test_default_vector_length_lives_in_the_options(bits, d):
    """The API and the command line get one default vector length per bit width: the paper's d = 4 up to
    3 bits (256 / 4096 codewords), 2 above (4 bits: 256 codewords, where d = 4 would need 65,536)."""
    from quantize_tools.cli import build_parser, options_from_args
    from quantize_tools.options import QuantizeOptions

    opts = QuantizeOptions(bits=bits)
    assert opts.vector_dim == d and 2 ** (bits * d) <= 65536
    opts.validate()
    if bits in (2, 3, 4):  # the command line's --bits choices
        args = build_parser().parse_args(["--model", "m", "--output", "o", "--bits", str(bits)])
        assert options_from_args(args).vector_dim == d
        args = build_parser().parse_args(["--model", "m", "--output", "o", "--bits", str(bits), "--vector-dim", "1"])
        assert options_from_args(args).vector_dim == 1  # what the user gave is what runs


def test_command_line_options_reach_the_run_options():
    """Each flag lands in its option (the IDRE ablation turns the rank to 0 as well)."""
    from quantize_tools.cli import build_parser, options_from_args

    parse = lambda *a: options_from_args(build_parser().parse_args(["--model", "m", "--output", "o", *a]))  # noqa: E731
    plain, ablated = parse(), parse("--no-idre")
    assert plain.idre and plain.rank_ratio == 1 / 128
    assert not ablated.idre and ablated.rank_ratio == 0.0
    assert parse("--rank-ratio", "1/64").rank_ratio == 1 / 64 and parse("--rank-ratio", "0").idre is False
    tuned = parse("--finetune-steps", "7", "--finetune-lr", "0.5", "--seed", "3", "--bits-budget", "2.5")
    assert (tuned.finetune_steps, tuned.finetune_lr, tuned.seed, tuned.bits_budget) == (7, 0.5, 3, 2.5)
