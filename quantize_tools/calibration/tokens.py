"""Calibration text -> token windows.

Texts are joined with the tokenizer's end-of-sequence token, tokenized once and
cut into non-overlapping windows; a seeded draw picks which windows are used.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

__all__ = ["CalibrationError", "read_texts", "token_windows", "calibration_tokens"]


class CalibrationError(ValueError):
    pass


def read_texts(path: str | Path) -> list[str]:
    """A ``.jsonl`` file (one ``{"text": ...}`` per line) or any plain-text file."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"calibration file {path} does not exist")
    try:
        return _read_texts(path)
    except UnicodeDecodeError as e:
        raise CalibrationError(f"calibration file {path} is not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise CalibrationError(f"calibration file {path} cannot be read ({e.strerror})") from None


def _read_texts(path: Path) -> list[str]:
    if path.suffix == ".jsonl":
        texts = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise CalibrationError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                    raise CalibrationError(f"{path}:{lineno}: each line needs a string field \"text\"")
                texts.append(rec["text"])
    else:
        texts = [path.read_text(encoding="utf-8")]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise CalibrationError(f"calibration file {path} holds no text")
    return texts


def token_windows(tokenizer, texts: list[str], seqlen: int) -> torch.Tensor:
    """Texts joined with EOS, tokenized once, cut into non-overlapping ``[n, seqlen]`` windows."""
    sep = tokenizer.eos_token or "\n\n"
    ids = tokenizer(sep.join(texts), add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    n = ids.numel() // seqlen
    return ids[: n * seqlen].reshape(n, seqlen)


def calibration_tokens(tokenizer, texts: list[str], nsamples: int, seqlen: int, seed: int = 42) -> torch.Tensor:
    """``[nsamples, seqlen]`` token ids drawn from ``texts``."""
    if nsamples < 1 or seqlen < 2:
        raise CalibrationError(f"need nsamples >= 1 and seqlen >= 2, got {nsamples} and {seqlen}")
    windows = token_windows(tokenizer, texts, seqlen)
    n_windows = windows.shape[0]
    if n_windows < nsamples:
        raise CalibrationError(
            f"calibration text has {n_windows} windows of {seqlen} tokens; "
            f"{nsamples} were asked for (give more text, or lower --nsamples / --seqlen)"
        )
    pick = torch.randperm(n_windows, generator=torch.Generator().manual_seed(seed))[:nsamples]
    return windows[pick.sort().values].clone()
