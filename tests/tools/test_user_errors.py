"""What a user gets wrong: nothing they had is lost, and every mistake is a one-line error naming it."""
import hashlib
import json
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bad_checkpoints import corrupt_cases
from interrupted import REPO, six_layer_model, stop_after_layers
from quantize_tools.cli import main as cli_main
from tiny_models import TEXT
from vllm_kbvq.format import FormatError


def _tree(d: Path) -> dict:
    return {str(f.relative_to(d)): hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(d.rglob("*"))
            if f.is_file()}


def _cli(model_dir, out, *extra, calib=None):
    calib_args = ["--calib", str(calib)] if calib else []
    return ["--model", str(model_dir), "--output", str(out), "--nsamples", "4", "--seqlen", "32",
            "--kmeans-iters", "3", "--quiet", *calib_args, *extra]


def _refused(capsys, argv, *needles):
    """Exit 2 with one line naming the problem, no traceback, and nothing written for it."""
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for n in needles:
        assert n in err, err
    return err


@pytest.fixture
def model(tiny_model, tmp_path):
    """A private copy of the tiny model, so a test that fails to protect it cannot hurt the others."""
    return Path(shutil.copytree(tiny_model("qwen2_moe"), tmp_path / "model"))


def test_output_that_overlaps_the_input_is_refused_whatever_overwrite_says(model, tmp_path, capsys):
    before = _tree(model)
    (tmp_path / "link").symlink_to(model)
    # a missing --calib file would fail later: the output check must come first
    late = ["--calib", str(tmp_path / "no-such-calib.txt"), "--overwrite"]
    for out in (model, model / "sub", tmp_path, tmp_path / "link", tmp_path / "link" / "sub"):
        _refused(capsys, _cli(model, out, *late), "overlaps --model")
    _refused(capsys, _cli(tmp_path / "link", model, *late), "overlaps --model")
    assert _tree(model) == before
    assert not list(tmp_path.glob("*.kbvq-partial"))


def test_overwrite_replaces_only_an_earlier_kbvq_output(model, tmp_path, capsys):
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT * 20)
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    _refused(capsys, _cli(model, user, "--overwrite", calib=calib), "not a kbvq-quantize output", "kbvq_report.json")
    assert (user / "notes.txt").read_text() == "mine" and len(list(user.iterdir())) == 1
    afile = tmp_path / "afile"
    afile.write_text("mine")
    _refused(capsys, _cli(model, afile, "--overwrite", calib=calib), "not a directory")
    assert afile.read_text() == "mine"

    out = tmp_path / "q"
    assert cli_main(_cli(model, out, calib=calib)) == 0
    _refused(capsys, _cli(model, out, calib=calib), "already holds a kbvq-quantize output", "--overwrite")
    first = _tree(out)
    assert cli_main(_cli(model, out, "--seed", "7", "--overwrite", calib=calib)) == 0
    second = _tree(out)
    assert second.keys() == first.keys() and second != first  # replaced by the new run
    assert not list(tmp_path.glob(".q.kbvq-old*")) and not (tmp_path / "q.kbvq-partial").exists()
    # written readable for a server running as another user, like the other files
    for f in out.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) & 0o044 == 0o044, f


def test_output_given_as_dot_or_a_link_and_a_users_lookalike_folder(model, tmp_path, capsys, monkeypatch):
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT * 20)
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    assert cli_main(_cli(model, ".", calib=calib)) == 0
    assert (here / "kbvq_report.json").is_file() and not list(tmp_path.glob("*.kbvq-partial"))
    # a folder of the user's that looks like the set-aside name survives an --overwrite next to it
    lookalike = tmp_path / ".here.kbvq-old"
    lookalike.mkdir()
    (lookalike / "mine.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    assert cli_main(_cli(model, "here", "--seed", "5", "--overwrite", calib=calib)) == 0
    assert (lookalike / "mine.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [".here.kbvq-old"]
    # a link to an empty folder (a mounted volume, say): the checkpoint goes into the folder it points to
    empty = tmp_path / "volume"
    empty.mkdir()
    (tmp_path / "link").symlink_to(empty)
    assert cli_main(_cli(model, tmp_path / "link", calib=calib)) == 0
    assert (tmp_path / "link").is_symlink() and (empty / "kbvq_report.json").is_file()
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 ".encode("latin-1") * 400)
    _refused(capsys, _cli(model, tmp_path / "o", calib=bad), "not UTF-8")
    _refused(capsys, _cli(model, tmp_path / "o", "--seqlen", "1", calib=calib), "--seqlen")


def test_bad_options_fail_before_any_work(model, tmp_path, capsys):
    late = ["--calib", str(tmp_path / "no-such-calib.txt")]
    out = tmp_path / "out"
    if not torch.cuda.is_available():
        _refused(capsys, _cli(model, out, "--device", "cuda", *late), "--device cuda", "no CUDA device")
    _refused(capsys, _cli(model, out, "--device", "tpu9", *late), "--device 'tpu9'")
    _refused(capsys, _cli(model, out, "--vector-dim", "3", *late), "--vector-dim must be a power of 2")
    _refused(capsys, _cli(model, out, "--bits", "4", "--vector-dim", "5", *late), "--vector-dim")
    for flag, value in (("--damp", "-1"), ("--damp", "nan"), ("--rank-ratio", "2"), ("--seed", "-3"),
                        ("--nsamples", "0"), ("--kmeans-iters", "x")):
        with pytest.raises(SystemExit) as e:
            cli_main(_cli(model, out, flag, value, *late))
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"argument {flag}" in err and "Traceback" not in err, err
    assert not out.exists() and not (tmp_path / "out.kbvq-partial").exists()


def test_the_api_checks_its_options_too(model, tmp_path):
    from quantize_tools.pipeline import QuantizeError, QuantizeOptions, quantize

    tokens = torch.randint(1, 320, (2, 16))
    for bad in (dict(damp=-1.0), dict(kmeans_iters=0), dict(vq_method="x"), dict(device="tpu9"), dict(method="awq")):
        with pytest.raises(QuantizeError, match="--"):
            quantize(model, tmp_path / "o", tokens, QuantizeOptions(**bad), progress=False)
    assert not (tmp_path / "o").exists()


def test_corrupted_checkpoints_are_named_not_tracebacks(kbvq_tiny, tmp_path):
    """Every file truncated, bad JSON, and a wrong type or range in every quantization_config field:
    the reference loader and kbvq-serve's start-up check both refuse with the file or field named."""
    from vllm_kbvq.reference import load_kbvq_model
    from vllm_kbvq.serve import StartupError, check_startup

    src = kbvq_tiny("qwen2_moe")
    cases = corrupt_cases(src)
    assert len(cases) > 50
    wrong = []
    for case, edit, needle in cases:
        ckpt = tmp_path / case
        shutil.copytree(src, ckpt)
        edit(ckpt)
        try:
            load_kbvq_model(ckpt)
            wrong.append(f"{case}: loaded")
        except FormatError as e:
            if needle not in str(e):
                wrong.append(f"{case}: load error without {needle!r}: {e}")
        except Exception as e:  # noqa: BLE001 - what the test is for
            wrong.append(f"{case}: {type(e).__name__}: {e}")
        try:
            check_startup(str(ckpt))
            wrong.append(f"{case}: kbvq-serve would start")
        except StartupError as e:
            if needle not in str(e):
                wrong.append(f"{case}: serve error without {needle!r}: {e}")
        except Exception as e:  # noqa: BLE001
            wrong.append(f"{case}: kbvq-serve {type(e).__name__}: {e}")
        shutil.rmtree(ckpt)
    assert not wrong, "\n".join(wrong)


def test_truncated_input_model_is_named(model, tmp_path, capsys):
    shard = model / "model.safetensors"
    whole = shard.read_bytes()
    shard.write_bytes(whole[: len(whole) // 2])
    _refused(capsys, _cli(model, tmp_path / "o"), "model.safetensors", "truncated")
    shard.write_bytes(whole)
    (model / "config.json").write_text("{")
    _refused(capsys, _cli(model, tmp_path / "o"), "config.json: not valid JSON")


# ---- the demo's quantize step: interrupted, then rerun -------------------------------------------


def test_demo_settings_resume_an_interrupted_run_and_reuse_a_finished_one(tmp_path):
    from quantize_tools.testbed import demo

    model_dir = six_layer_model(tmp_path / "m")
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT * 200)
    out = tmp_path / "q"
    args = demo.quantize_argv(model_dir, out, 2) + ["--calib", str(calib), "--nsamples", "8", "--seqlen", "64"]
    done = stop_after_layers(args, out, 2, signal.SIGINT)  # Ctrl-C, as a user would
    assert 2 <= len(done) < 6 and not out.exists()

    rerun = subprocess.run([sys.executable, "-m", "quantize_tools.cli", *args], cwd=REPO, capture_output=True,
                           text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{len(done)} of 6 MoE layers already done" in rerun.stdout
    straight = tmp_path / "straight"
    assert cli_main(demo.quantize_argv(model_dir, straight, 2) + args[-6:]) == 0
    for name in _tree(straight):
        if name.endswith(".safetensors") or name in ("config.json", "model.safetensors.index.json"):
            assert _tree(out)[name] == _tree(straight)[name], name

    again = subprocess.run([sys.executable, "-m", "quantize_tools.cli", *args], cwd=REPO, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0 and "nothing to do" in again.stdout, again.stdout + again.stderr
    other = subprocess.run([sys.executable, "-m", "quantize_tools.cli", *args, "--seed", "3"], cwd=REPO,
                           capture_output=True, text=True, timeout=600)
    assert other.returncode == 0 and "nothing to do" not in other.stdout
    assert json.loads((out / "config.json").read_text())["quantization_config"]["seed"] == 3
