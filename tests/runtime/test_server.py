"""End to end: the real OpenAI-compatible vLLM server (CPU build) on loopback, serving the 2-bit testbed.

The testbed is the SmolLM2-based Qwen2-MoE (8 experts + shared expert, real pretrained weights)
quantized at 2 bits with light calibration settings so CI can afford it. The server runs in
vLLM's default compiled mode; its greedy outputs must equal the reference runtime's, and a
burst of concurrent requests must return what the same requests return one at a time.
"""
from concurrent.futures import ThreadPoolExecutor

import pytest

from quantize_tools.testbed.server import post_json as _post
from test_vllm import assert_matches_reference

pytest.importorskip("vllm")

STARTUP_TIMEOUT_S = 600
BURST = 32
SERVED_NAME = "testbed-kbvq2"


@pytest.fixture(scope="session")
def testbed_kbvq2(tmp_path_factory):
    from quantize_tools import cli
    from quantize_tools.testbed import build as testbed

    d = tmp_path_factory.mktemp("testbed")
    testbed.build_testbed("qwen2_moe", 8, d / "fp", overwrite=True)
    assert cli.main(["--model", str(d / "fp"), "--output", str(d / "q2"), "--bits", "2", "--nsamples", "8",
                     "--seqlen", "128", "--kmeans-iters", "8", "--no-plain-vq-report", "--quiet"]) == 0
    return d / "q2"


@pytest.fixture(scope="module")
def server(testbed_kbvq2, tmp_path_factory):
    from quantize_tools.testbed.server import ServerProcess, free_port

    srv = ServerProcess(testbed_kbvq2, tmp_path_factory.mktemp("server") / "server.log", port=free_port(),
                        args=("--dtype", "float32", "--max-model-len", "1024", "--served-model-name", SERVED_NAME),
                        env={"VLLM_CPU_KVCACHE_SPACE": "1"}, startup_timeout=STARTUP_TIMEOUT_S)
    with srv as base:
        yield base


def _complete(base, prompt, max_tokens=8, logprobs=None):
    body = {"model": SERVED_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    if logprobs:
        body["logprobs"] = logprobs
    return _post(f"{base}/v1/completions", body)["choices"][0]


def greedy_over_http(base: str, model_dir, texts, max_tokens=6) -> tuple[list, list]:
    """Token-id prompts of ``texts``, and the server's greedy ids with top-5 logprobs for each."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = [tok(t).input_ids for t in texts]
    results = []
    for ids in prompts:
        # token-id prompts and per-token logprobs; "ignore_eos" keeps the length fixed
        choice = _post(f"{base}/v1/completions", {
            "model": SERVED_NAME, "prompt": ids, "max_tokens": max_tokens, "temperature": 0, "logprobs": 5,
            "ignore_eos": True, "return_tokens_as_token_ids": True})["choices"][0]
        lp = choice["logprobs"]
        results.append({
            "ids": [int(t.split(":")[1]) for t in lp["tokens"]],
            "logprobs": [{k.split(":")[1]: v for k, v in top.items()} for top in lp["top_logprobs"]],
        })
        assert choice["text"] == tok.decode(results[-1]["ids"])
    return prompts, results


def test_completions_match_reference(server, testbed_kbvq2):
    texts = ["The capital of France is", "def fibonacci(n):", "Water boils at a temperature of"]
    prompts, results = greedy_over_http(server, testbed_kbvq2, texts)
    # 30 layers of float32 summation-order noise: a looser bound than the 2-layer tiny models
    worst = assert_matches_reference(testbed_kbvq2, results, prompts, atol=1e-3)
    print(f"testbed: max top-5 logprob difference vLLM vs reference {worst:.2e}")


def test_chat_completion(server):
    out = _post(f"{server}/v1/chat/completions", {
        "model": SERVED_NAME, "max_tokens": 16, "temperature": 0,
        "messages": [{"role": "user", "content": "What is the capital of France?"}]})
    msg = out["choices"][0]["message"]
    assert msg["role"] == "assistant" and msg["content"].strip()
    assert out["usage"]["completion_tokens"] > 0


def test_concurrent_burst_equals_sequential(server):
    prompts = [f"Fact number {i}: the" for i in range(BURST)]
    sequential = [_complete(server, p)["text"] for p in prompts[:6]]
    with ThreadPoolExecutor(BURST) as pool:
        burst = list(pool.map(lambda p: _complete(server, p)["text"], prompts))
    assert all(isinstance(t, str) and t for t in burst)
    assert burst[:6] == sequential
    # and the rest equal their own sequential runs
    assert [_complete(server, p)["text"] for p in prompts[6:]] == burst[6:]


def test_eval_through_the_server_matches_the_reference_runtime(server, testbed_kbvq2):
    """kbvq-eval --server (vLLM's completions endpoint, lm-eval's API client) scores what the in-process runtime scores."""
    pytest.importorskip("lm_eval")
    from quantize_tools.eval import evaluate as ev

    tasks = ["wikipedia", "arc_easy", "winogrande"]
    kw = dict(seqlen=128, ppl_windows=2, limit=6, log_samples=True, progress=False)
    remote = ev.evaluate(ev.Target(SERVED_NAME, server=server, tokenizer=str(testbed_kbvq2), batch_size=4),
                         tasks, **kw)
    local = ev.evaluate(ev.Target(str(testbed_kbvq2), batch_size=4), tasks, **kw)
    assert remote["kind"] == "server" and local["kind"] == "kbvq"
    r, loc = remote["perplexity"]["wikipedia"], local["perplexity"]["wikipedia"]
    assert r["tokens"] == loc["tokens"] == 2 * 127
    assert r["nll"] == pytest.approx(loc["nll"], rel=1e-4)
    for task in ("arc_easy", "winogrande"):
        for a, b in zip(remote["zero_shot"][task]["samples"], local["zero_shot"][task]["samples"]):
            assert a["doc_id"] == b["doc_id"]
            assert a["loglikelihoods"] == pytest.approx(b["loglikelihoods"], abs=2e-3)
        assert remote["zero_shot"][task]["acc"] == local["zero_shot"][task]["acc"]
