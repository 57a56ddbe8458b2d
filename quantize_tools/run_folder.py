"""The run's output folder: a killed run never leaves a loadable half checkpoint, and can be resumed.

A run writes into ``<output>.kbvq-partial``: one safetensors file per finished MoE layer and
``progress.json`` (which layers are done, and the fingerprint of the options, model and calibration
tokens that made them). The folder is moved to ``<output>`` only when everything is written; an
interrupted run keeps its finished layers for ``--resume``, which replays them only if the fingerprint
matches. Nothing a user had is replaced: ``--overwrite`` replaces only an earlier kbvq-quantize output.
JSON files are written whole or not at all.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from vllm_kbvq.format import REPORT_FILE, load_json

from .options import QuantizeError

__all__ = ["PARTIAL_SUFFIX", "PROGRESS_FILE", "fingerprint", "partial_dir", "is_kbvq_output", "check_output",
           "prepare", "read_progress", "write_progress", "previous_result", "keep_interrupted", "move_into_place",
           "write_json_atomic", "normal_permissions"]

PARTIAL_SUFFIX = ".kbvq-partial"  # the run's folder until it is complete
PROGRESS_FILE = "progress.json"


def fingerprint(model_dir: Path, opts, tokens) -> str:
    """What a run's finished layers depend on: its options, the input model's path and the calibration tokens."""
    h = hashlib.sha256()
    settings = dataclasses.asdict(opts)
    if opts.bits_budget is None:  # uniform runs fingerprint as before mixed precision existed
        del settings["bits_budget"], settings["candidate_widths"]
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    h.update(str(model_dir.resolve()).encode())
    h.update(tokens.numpy().tobytes())
    return h.hexdigest()


def partial_dir(output: Path) -> Path:
    """Where a run writes before its result is complete."""
    return output.parent / (output.name + PARTIAL_SUFFIX)


def is_kbvq_output(directory: Path) -> bool:
    """A finished kbvq-quantize output: it holds ``kbvq_report.json``, which every run writes last."""
    return (directory / REPORT_FILE).is_file()


def check_output(model_dir: Path, output: Path, overwrite: bool = False, resume: bool | str = False) -> None:
    """Refuse, before any work, an output that would lose what a user had.

    The output (and its partial folder) may not be, contain or lie inside the input model,
    symlinks resolved, whatever ``overwrite`` says; ``overwrite`` replaces only a previous
    kbvq-quantize output (see :func:`is_kbvq_output`) or an interrupted run's partial folder.
    """
    model, output = Path(model_dir).resolve(), Path(os.path.abspath(output))
    for target in (output, partial_dir(output)):
        t = target.resolve()
        if t == model or model in t.parents or t in model.parents:
            raise QuantizeError(f"--output {output} overlaps --model {model_dir} ({t} and {model}): write the "
                                "quantized checkpoint to a separate directory")
    if output.exists() or output.is_symlink():
        if not output.is_dir():
            raise QuantizeError(f"--output {output} exists and is not a directory")
        try:
            has_files = any(output.iterdir())
        except OSError as e:
            raise QuantizeError(f"--output {output}: cannot be read ({e.strerror})") from None
        if has_files:
            if not is_kbvq_output(output):
                raise QuantizeError(
                    f"--output {output} is not empty and is not a kbvq-quantize output (it has no {REPORT_FILE}); "
                    "--overwrite replaces only an earlier kbvq-quantize output: choose another --output")
            if not overwrite and resume is False:  # resuming: decided once the run's fingerprint is known
                raise QuantizeError(f"--output {output} already holds a kbvq-quantize output; pass --overwrite "
                                    "to replace it")
    partial = partial_dir(output)
    if resume == "auto":
        pass  # continue the interrupted run if it has these settings, else start over
    elif resume:
        if not (partial / PROGRESS_FILE).is_file():
            raise QuantizeError(f"--resume: no interrupted run found at {partial}")
    elif (partial.exists() or partial.is_symlink()) and not partial.is_dir():
        raise QuantizeError(f"{partial} exists and is not a directory; remove it")
    elif partial.exists() and not overwrite:
        raise QuantizeError(
            f"an interrupted run left {partial}; pass --resume to continue it or --overwrite to start over")
    parent = output.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise QuantizeError(f"--output {output}: cannot write in {parent}")


def prepare(model_dir: Path, output: Path, overwrite: bool, resume: bool | str, run_fingerprint: str) -> bool:
    """Make the partial folder ready; True when an interrupted run is continued."""
    check_output(model_dir, output, overwrite, resume)
    partial = partial_dir(output)
    state = read_progress(partial)
    if resume and state is not None:
        if state.get("fingerprint") == run_fingerprint:
            return True
        if resume != "auto":
            raise QuantizeError(f"--resume: {partial} was made with other options, model or calibration data; "
                                "rerun with the same arguments or use --overwrite")
        print(f"kbvq-quantize: {partial} holds an interrupted run with other settings; starting over")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    return False


def read_progress(partial: Path, strict: bool = True) -> dict | None:
    """The state an interrupted run left (``None``: there is none); an unreadable one is an error if ``strict``."""
    if not (partial / PROGRESS_FILE).is_file():
        return None
    try:
        state = load_json(partial / PROGRESS_FILE, QuantizeError)
        if not isinstance(state, dict) or not isinstance(state.get("done"), list):
            raise QuantizeError(f"{partial / PROGRESS_FILE} is not a kbvq-quantize progress file")
    except QuantizeError:
        if strict:
            raise
        return None
    return state


def write_progress(partial: Path, state: dict) -> None:
    write_json_atomic(partial / PROGRESS_FILE, state)


def previous_result(output: Path, run_fingerprint: str, overwrite: bool, resume: bool | str,
                    progress: bool) -> dict | None:
    """Under ``resume``, a finished output of these very settings (its report: nothing to do), else None;
    a finished output of other settings is an error unless ``overwrite``."""
    if not (resume and is_kbvq_output(output)):
        return None
    previous = load_json(output / REPORT_FILE, QuantizeError)
    run = previous.get("run") if isinstance(previous, dict) else None
    if resume == "auto" and isinstance(run, dict) and run.get("fingerprint") == run_fingerprint:
        if progress:
            print(f"kbvq-quantize: {output} already holds the result of these settings; nothing to do")
        return previous
    if not overwrite:
        other = " of other settings" if resume == "auto" else ""
        raise QuantizeError(f"--output {output} holds a kbvq-quantize output{other}; pass --overwrite to replace it")
    return None


def keep_interrupted(partial: Path, output: Path) -> None:
    """After a failed or interrupted run: keep the partial folder if it has finished layers to resume from
    (or the whole result), else remove it."""
    state = read_progress(partial, strict=False) or {}
    done = state.get("done", []) if isinstance(state.get("done"), list) else []
    if (partial / REPORT_FILE).is_file():
        print(f"kbvq-quantize: the finished result could not be moved to {output}; it is kept in {partial}")
    elif not done and partial.exists():
        shutil.rmtree(partial)
    elif partial.exists():
        print(f"kbvq-quantize: interrupted; {len(done)} finished layer(s) kept in {partial} (rerun the same "
              "command with --resume, or --resume auto, to continue)")


def move_into_place(partial: Path, output: Path, overwrite: bool) -> None:
    """Move the finished run to ``output``.

    An earlier KBVQ output there is set aside, then deleted. An existing empty folder (also a link
    to one, a mount point or the working directory) is filled in place, config.json and the report
    last, so it stays the folder the user made."""
    old = None
    if output.exists() and any(output.iterdir()):
        if not (overwrite and is_kbvq_output(output)):
            raise QuantizeError(f"--output {output} was filled by something else during the run; the result is "
                                f"left in {partial}")
        old = Path(tempfile.mkdtemp(prefix=f".{output.name}.kbvq-old-", dir=output.parent))
        os.replace(output, old / "previous")
        os.replace(partial, output)
        shutil.rmtree(old)  # holds only what was moved there; a symlink is removed, not followed
    elif output.exists():
        last = ("config.json", REPORT_FILE)
        for f in sorted(partial.iterdir(), key=lambda f: (f.name in last, last.index(f.name) if f.name in last else 0)):
            shutil.move(str(f), str(output / f.name))
        partial.rmdir()
    else:
        os.replace(partial, output)


def write_json_atomic(path: Path, obj) -> None:
    """Write to ``<name>.tmp`` beside ``path``, then rename: readers see the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def normal_permissions(directory: Path) -> None:
    """mkdtemp makes 0700 dirs and safetensors writes 0600 files: give the usual umask modes, so a
    server running as another user can read the checkpoint."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
