"""The first N decoder layers of a checkpoint, bf16 or KBVQ, as a servable model of its own.

    python benchmarks/cut_layers.py out/qwen15-full out/qwen15-full-l8 --layers 8
    python benchmarks/cut_layers.py out/qwen15-full-kbvq2 out/qwen15-full-kbvq2-l8 --layers 8

Why: a 24-layer Qwen1.5-MoE-shaped model is 28.6 GB in bf16, more than a 24 GB machine holds, so the
bf16-vs-KBVQ decode ratio is measured on both cut to the same first layers (the same tensors, bit for bit:
each is copied, never recomputed). Embeddings, final norm and lm_head are kept; ``num_hidden_layers`` (and
for KBVQ, ``quantization_config.layers`` / ``width_of``) are rewritten. Streams one input shard at a time;
writes into a hidden folder renamed into place, and never over an existing one.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_SKIP = {"model.safetensors.index.json", "config.json", "kbvq_report.json"}  # rewritten, or about all layers


def keep(name: str, n_layers: int) -> bool:
    m = _LAYER.match(name)
    return m is None or int(m.group(1)) < n_layers


def cut(src: Path, dst: Path, n_layers: int) -> dict:
    """Write ``src``'s first ``n_layers`` decoder layers to ``dst``; returns the written config."""
    config = json.loads((src / "config.json").read_text())
    have = int(config["num_hidden_layers"])
    if not 1 <= n_layers <= have:
        raise SystemExit(f"--layers {n_layers}: {src} has {have} decoder layers")
    if dst.exists():
        raise SystemExit(f"{dst} exists: choose a new folder (nothing is overwritten)")
    shards = sorted(src.glob("*.safetensors"))
    if not shards:
        raise SystemExit(f"{src}: no *.safetensors files")
    config["num_hidden_layers"] = n_layers
    if isinstance(config.get("layer_types"), list):  # one entry per layer
        config["layer_types"] = config["layer_types"][:n_layers]
    if isinstance(config.get("mlp_only_layers"), list):  # layer indices
        config["mlp_only_layers"] = [i for i in config["mlp_only_layers"] if i < n_layers]
    q = config.get("quantization_config")
    if q is not None:
        q["layers"] = [i for i in q["layers"] if i < n_layers]
        if q.get("width_of") is not None:
            q["width_of"] = {k: v for k, v in q["width_of"].items() if int(k) < n_layers}
    tmp = dst.parent / f".{dst.name}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    weight_map, written, total = {}, [], 0
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            names = [n for n in f.keys() if keep(n, n_layers)]
            if not names:
                continue
            tensors = {n: f.get_tensor(n) for n in names}
        out = f"model-{len(written) + 1:05d}.safetensors"
        save_file(tensors, str(tmp / out), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update({n: out for n in names})
        written.append(out)
        print(f"{shard.name}: {len(names)} tensors -> {out}", flush=True)
    final = {f"model-{i + 1:05d}-of-{len(written):05d}.safetensors": old for i, old in enumerate(written)}
    for new, old in final.items():
        (tmp / old).rename(tmp / new)
    rename = {old: new for new, old in final.items()}
    index = {"metadata": {"total_size": total}, "weight_map": {n: rename[s] for n, s in sorted(weight_map.items())}}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in _SKIP:
            shutil.copy2(f, tmp / f.name)
    tmp.rename(dst)
    return config


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + " " + __doc__.split("\n\n")[2],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", type=Path, help="a Hugging Face model folder (bf16 or a kbvq-quantize output)")
    ap.add_argument("dst", type=Path, help="the new folder (must not exist)")
    ap.add_argument("--layers", type=int, required=True, help="how many decoder layers to keep, from the first")
    args = ap.parse_args(argv)
    cut(args.src, args.dst, args.layers)
    print(f"wrote {args.dst}: the first {args.layers} layers of {args.src}")


if __name__ == "__main__":
    sys.exit(main())
