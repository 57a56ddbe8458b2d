"""The anchor a CPU user would pick instead: the same bf16 model in llama.cpp, quantized by its own tools.

    python benchmarks/llama_cpp.py convert out/qwen15-full out/qwen15-full-bf16.gguf
    llama-quantize out/qwen15-full-bf16.gguf out/qwen15-full-Q2_K.gguf Q2_K 2
    python benchmarks/llama_cpp.py bench --llama-bench build/bin/llama-bench --threads 2 \\
        --gguf out/qwen15-full-Q2_K.gguf --out benchmarks/results/llama_cpp_qwen15_full.json

``convert`` writes a Hugging Face Qwen2-MoE checkpoint (Qwen1.5-MoE-A2.7B's architecture) as a bfloat16
GGUF, streaming: one layer's tensors in memory at a time. llama.cpp's own converter refuses a tokenizer it
does not know by hash, which the hub-free random model's byte-level BPE is; the tensors and hyper-parameters
are written here under llama.cpp's names, norms and the router in float32 as its converter keeps them, the
vocabulary padded to the embedding's rows as that converter pads it. ``bench`` runs ``llama-bench`` (decode
at batch 1: ``-p 0 -n TOKENS``) on each file with the process' peak memory sampled from /proc, and records
file sizes, the machine and its load.

It runs in the project's environment (``gguf`` comes with its ``testbed`` extra); llama.cpp itself is a
benchmark dependency only, never a runtime one, built apart (docs/performance.md gives the commands).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.processes import watch  # noqa: E402
from quantize_tools.eval.machine import describe  # noqa: E402
from quantize_tools.shards import CheckpointError, ShardReader  # noqa: E402

# Hugging Face config key -> GGUF writer method, per architecture (llama.cpp's names for the same numbers).
ARCHS = {
    "qwen2_moe": {
        "gguf_arch": "qwen2moe",
        "hparams": {
            "max_position_embeddings": "add_context_length", "hidden_size": "add_embedding_length",
            "num_hidden_layers": "add_block_count", "intermediate_size": "add_feed_forward_length",
            "num_attention_heads": "add_head_count", "num_key_value_heads": "add_head_count_kv",
            "rms_norm_eps": "add_layer_norm_rms_eps", "num_experts": "add_expert_count",
            "num_experts_per_tok": "add_expert_used_count", "moe_intermediate_size": "add_expert_feed_forward_length",
            "shared_expert_intermediate_size": "add_expert_shared_feed_forward_length",
        },
        "experts": "model.layers.{layer}.mlp.experts.{expert}.{proj}.weight",
        "stacked": "model.layers.{layer}.mlp.experts.{proj}",  # the name llama.cpp's tensor map knows
        "float32": ("norm", "bias", "mlp.gate.weight", "shared_expert_gate"),  # kept out of quantization
    },
}


def _raw(t: torch.Tensor, f32: bool, name: str) -> np.ndarray:
    """A tensor's data as the GGUF stores it: float32, or bfloat16's bits (numpy has no bfloat16)."""
    if f32:
        return t.float().contiguous().numpy()
    if t.dtype != torch.bfloat16:
        raise SystemExit(f"tensor {name} is {t.dtype}: this writer keeps matrices in bfloat16")
    return t.contiguous().view(torch.int16).numpy()


def _vocab(model: Path, n_vocab: int) -> tuple[list[str], list[int], list[str]]:
    """Tokens, their types and merges of a byte-level BPE ``tokenizer.json``, padded to ``n_vocab``."""
    import gguf

    tok = json.loads((model / "tokenizer.json").read_text())
    if tok["model"]["type"] != "BPE":
        raise SystemExit(f"{model}/tokenizer.json: a {tok['model']['type']} tokenizer; this writer takes BPE")
    by_id = {i: t for t, i in tok["model"]["vocab"].items()}
    special = {a["id"] for a in tok.get("added_tokens", []) if a.get("special")}
    for a in tok.get("added_tokens", []):
        by_id[a["id"]] = a["content"]
    tokens, types = [], []
    for i in range(n_vocab):
        if i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    return tokens, types, merges


def convert(model: Path, out: Path) -> None:
    import gguf
    from tqdm import tqdm

    config = json.loads((model / "config.json").read_text())
    spec = ARCHS.get(config.get("model_type"))
    if spec is None:
        raise SystemExit(f"{model}: model_type {config.get('model_type')!r}; this writer knows {', '.join(ARCHS)}")
    if out.exists():
        raise SystemExit(f"{out} exists; give another name or remove it")
    shards = ShardReader(model)
    n_layers = config["num_hidden_layers"]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[spec["gguf_arch"].upper()], n_layers)
    plan = []  # (gguf name, [source names], float32?)
    expert_parts = {n for n in shards.names() if ".experts." in n and ".shared_expert" not in n}
    for name in sorted(n for n in shards.names() if n not in expert_parts):
        stem, suffix = name.rsplit(".", 1)
        target = names.get_name(stem)
        if target is None:
            raise SystemExit(f"{model}: no llama.cpp name for tensor {name}")
        plan.append((f"{target}.{suffix}", [name], any(k in name for k in spec["float32"])))
    for layer in range(n_layers):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            parts = [spec["experts"].format(layer=layer, expert=e, proj=proj) for e in range(config["num_experts"])]
            missing = [p for p in parts if p not in shards]
            if missing:
                raise SystemExit(f"{model}: expert tensor {missing[0]} is missing")
            plan.append((names.get_name(spec["stacked"].format(layer=layer, proj=proj)) + ".weight", parts, False))

    partial = out.with_name(out.name + ".partial")
    w = gguf.GGUFWriter(partial, spec["gguf_arch"])
    w.add_name(model.name)
    for key, method in spec["hparams"].items():
        getattr(w, method)(config[key])
    rope = config.get("rope_parameters") or {}
    w.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    w.add_file_type(gguf.LlamaFileType.MOSTLY_BF16)
    tokens, types, merges = _vocab(model, config["vocab_size"])
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for key, add in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id)):
        if config.get(key) is not None:
            add(config[key])
    for target, parts, f32 in plan:
        shape = [len(parts), *shards.shape(parts[0])] if len(parts) > 1 else list(shards.shape(parts[0]))
        if target.endswith("ffn_gate_inp_shexp.weight"):
            shape = [shape[-1]]  # [1, hidden] in transformers, a vector in llama.cpp
        n = int(np.prod(shape))
        if f32:
            w.add_tensor_info(target, shape, np.dtype(np.float32), n * 4)
        else:
            w.add_tensor_info(target, shape, np.dtype(np.uint16), n * 2, raw_dtype=gguf.GGMLQuantizationType.BF16)
    if partial.exists():
        raise SystemExit(f"{partial} exists: another conversion is writing it, or one was killed; remove it first")
    partial.touch()
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for _, parts, f32 in tqdm(plan, desc="gguf tensors", unit="tensor"):
            t = torch.stack([shards.get(p) for p in parts]) if len(parts) > 1 else shards.get(parts[0])
            w.write_tensor_data(_raw(t, f32, parts[0]).reshape(-1))
            shards.release()  # unmap what was read: the resident set stays one layer's tensors
        w.close()
        os.replace(partial, out)
    finally:
        if partial.exists():
            partial.unlink()
    print(f"wrote {out}: {len(plan)} tensors, {out.stat().st_size / 1e9:.2f} GB")


def bench(llama_bench: str, ggufs: list[Path], threads: int, tokens: int, repeats: int) -> dict:
    load_before = os.getloadavg()
    runs = []
    for f in ggufs:
        with tempfile.TemporaryFile("w+") as fout:
            cmd = [llama_bench, "-m", str(f), "-p", "0", "-n", str(tokens), "-t", str(threads), "-r", str(repeats),
                   "-o", "json"]
            proc = subprocess.Popen(cmd, stdout=fout, stderr=subprocess.DEVNULL, text=True)
            mem = watch(proc, interval=0.2)
            fout.seek(0)
            text = fout.read()
        if proc.returncode:
            raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode})")
        (result,) = json.loads(text)
        runs.append({"gguf": str(f), "file_bytes": f.stat().st_size, "command": cmd,
                     "decode_tok_s": result["avg_ts"], "decode_tok_s_stddev": result["stddev_ts"],
                     "samples_tok_s": result.get("samples_ts"), "model_type": result.get("model_type"),
                     "cpu_info": result.get("cpu_info"), "build_commit": result.get("build_commit"),
                     "peak_rss_gib": mem["total"]["VmRSS"], "peak_anon_gib": mem["total"]["RssAnon"],
                     "peak_file_mapped_gib": mem["total"]["RssFile"]})
        print(f"{f.name}: {result['avg_ts']:.2f} tok/s (batch 1, {threads} threads), peak resident "
              f"{mem['total']['VmRSS']} GiB ({mem['total']['RssAnon']} anonymous)")
    return {"machine": describe(), "load_avg_before": load_before, "load_avg_after": os.getloadavg(),
            "threads": threads, "tokens": tokens, "repeats": repeats, "runs": runs}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert", help="a Hugging Face MoE checkpoint as a bfloat16 GGUF, streaming")
    c.add_argument("model", type=Path)
    c.add_argument("out", type=Path)
    b = sub.add_parser("bench", help="llama-bench's batch-1 decode on each GGUF, with peak memory")
    b.add_argument("--llama-bench", required=True, help="path of llama.cpp's llama-bench binary")
    b.add_argument("--gguf", type=Path, nargs="+", required=True)
    b.add_argument("--threads", type=int, default=os.cpu_count())
    b.add_argument("--tokens", type=int, default=64, help="tokens generated per repeat (default 64)")
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--out", type=Path, help="record file (JSON)")
    args = ap.parse_args(argv)
    if args.cmd == "convert":
        try:
            convert(args.model, args.out)
        except CheckpointError as e:
            raise SystemExit(f"llama_cpp.py convert: {e}") from None
        return 0
    record = bench(args.llama_bench, args.gguf, args.threads, args.tokens, args.repeats)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
