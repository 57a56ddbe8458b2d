"""A random-weight MoE model at a released model's layer shapes, for speed and memory benchmarks.

    python benchmarks/random_moe.py --out out/qwen15-shaped          # Qwen1.5-MoE-A2.7B shapes, 2 layers
    python benchmarks/random_moe.py --out out/qwen15-full --layers 24 --vocab 151936   # the whole model, 28.6 GB
    kbvq-quantize --model out/qwen15-shaped --output out/qwen15-shaped-kbvq2 --kmeans-iters 2 \\
        --nsamples 8 --seqlen 128 --no-plain-vq-report
    python benchmarks/vllm_cpu_decode.py --base out/qwen15-shaped --kbvq out/qwen15-shaped-kbvq2

Real hidden, expert, shared-expert and attention sizes and routing (benchmarks/shapes.py), any number
of layers and any vocabulary size. The model is written tensor by tensor into bfloat16 safetensors
shards (``--layers-per-shard`` decoder layers each, about 1.1 GB a layer at Qwen1.5-MoE's shapes),
so a model larger than the machine's memory is written with one shard in memory at a time. The
tokenizer is a byte-level BPE trained here on the packaged calibration text (``--tokenizer-vocab``
tokens); a larger ``--vocab`` pads the embedding, as released models do.

The weights are random, but not pure noise where that is cheap: each routed expert's gate, up and
down is ``A_i B + N_i``, a low-rank part whose row space ``B`` (rank ``--shared-rank``) is shared by
the layer's experts, plus noise of the same energy, so IDRE's joint SVD has something to find (on
pure noise every basis is as good as any other). Everything else is normal with std 0.02, norms 1,
biases 0. Quality means nothing here; speed, memory and the quantizer's work do. Every layer is
drawn from its own seed, so the same arguments give the same files.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.shapes import SHAPES, MoEShape  # noqa: E402
from quantize_tools.run_folder import normal_permissions  # noqa: E402
from vllm_kbvq.archs import WEIGHT_TYPES, MoEGeometry, layer_prefix  # noqa: E402
from vllm_kbvq.format import matrix_shape  # noqa: E402

STD = 0.02  # transformers' initializer_range
SHARED_RANK = 64  # rank of the row space a layer's routed experts share
# released configs' attention sizes, which benchmarks/shapes.py does not carry; "tiny" is for the tests
ATTENTION = {"Qwen1.5-MoE-A2.7B": {"num_attention_heads": 16, "num_key_value_heads": 16},
             "tiny": {"num_attention_heads": 2, "num_key_value_heads": 2}}
TINY = MoEShape.of(2, model_type="qwen2_moe", hidden_size=128, moe_intermediate_size=64, num_experts=8,
                   num_experts_per_tok=2, shared_expert_intermediate_size=128)


def tokenizer(vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from quantize_tools.calibration.corpus import calibration_texts

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(calibration_texts(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def model_config(geom: MoEGeometry, attention: dict, layers: int, vocab: int, eos: int):
    from transformers import Qwen2MoeConfig

    if geom.arch.name != "qwen2_moe":
        raise SystemExit(f"{geom.arch.name}: only Qwen2-MoE-shaped models are built so far")
    return Qwen2MoeConfig(
        vocab_size=vocab, hidden_size=geom.hidden, intermediate_size=geom.shared_inter,
        moe_intermediate_size=geom.inter, shared_expert_intermediate_size=geom.shared_inter,
        num_experts=geom.n_experts, num_experts_per_tok=geom.top_k, num_hidden_layers=layers,
        max_position_embeddings=4096, tie_word_embeddings=False, eos_token_id=eos, bos_token_id=eos,
        initializer_range=STD, architectures=["Qwen2MoeForCausalLM"], **attention)  # what serving engines read


def tensor_shapes(config) -> dict[str, tuple[int, ...]]:
    """Checkpoint name -> shape of every tensor, the routed experts by their per-expert checkpoint names
    (transformers fuses them in memory; its checkpoints keep one tensor per expert and matrix)."""
    from transformers import AutoModelForCausalLM

    geom = MoEGeometry.from_config(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    fused = f".{geom.arch.moe_attr}.{geom.arch.experts_attr}."
    shapes = {n: tuple(p.shape) for n, p in model.state_dict().items() if fused not in n}
    for layer in range(config.num_hidden_layers):
        for e in range(geom.n_experts):
            for w in WEIGHT_TYPES:
                shapes[geom.arch.expert_tensor(layer, e, w)] = matrix_shape(w, geom.hidden, geom.inter)
    return shapes


def _normal(shape, gen, std=STD) -> torch.Tensor:
    return (torch.randn(shape, generator=gen) * std).to(torch.bfloat16)


def expert_group(n: int, oc: int, ic: int, rank: int, gen: torch.Generator) -> list[torch.Tensor]:
    """``n`` matrices ``A_i B + N_i``: the rows of every ``A_i B`` lie in one rank-``rank`` space; the low-rank
    part and the noise each carry half the energy (total std 0.02)."""
    rank = min(rank, oc, ic)
    if rank == 0:
        return [_normal((oc, ic), gen) for _ in range(n)]
    b = torch.randn(rank, ic, generator=gen)
    out = []
    for _ in range(n):
        w = torch.randn(oc, rank, generator=gen) @ b
        w.mul_(STD / math.sqrt(2 * rank)).add_(torch.randn(oc, ic, generator=gen), alpha=STD / math.sqrt(2))
        out.append(w.to(torch.bfloat16))
    return out


def layer_tensors(geom: MoEGeometry, shapes: dict, layer: int, seed: int, shared_rank: int) -> dict[str, torch.Tensor]:
    """One decoder layer's tensors, from the layer's own seed."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + layer)
    prefix = layer_prefix(layer)
    out = {}
    for w in WEIGHT_TYPES:
        oc, ic = matrix_shape(w, geom.hidden, geom.inter)
        for e, t in enumerate(expert_group(geom.n_experts, oc, ic, shared_rank, gen)):
            out[geom.arch.expert_tensor(layer, e, w)] = t
    for name, shape in shapes.items():
        if name.startswith(prefix) and name not in out:
            if name.endswith("norm.weight"):
                out[name] = torch.ones(shape, dtype=torch.bfloat16)
            elif name.endswith(".bias"):
                out[name] = torch.zeros(shape, dtype=torch.bfloat16)
            else:
                out[name] = _normal(shape, gen)
    return out


def write_model(shape: MoEShape, attention: dict, out: Path, layers: int, vocab: int, tokenizer_vocab: int = 4096,
                seed: int = 0, shared_rank: int = SHARED_RANK, layers_per_shard: int = 2, progress: bool = True) -> Path:
    """Write the model to the new directory ``out``, one shard in memory at a time; returns ``out``.

    It is assembled in a hidden sibling folder and renamed into place when complete."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    out = Path(out).absolute()
    if out.exists():
        raise FileExistsError(f"{out} exists; choose a new directory")
    tok = tokenizer(min(tokenizer_vocab, vocab))
    config = model_config(shape.geom, attention, layers, max(vocab, len(tok)), tok.eos_token_id)
    geom = MoEGeometry.from_config(config)
    shapes = tensor_shapes(config)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        groups = [list(range(i, min(i + layers_per_shard, layers))) for i in range(0, layers, layers_per_shard)]
        total = len(groups) + 1
        weight_map, size = {}, 0
        bar = tqdm(total=layers, desc="random_moe layers", unit="layer", disable=not progress)
        for k, group in enumerate(groups, 1):
            tensors = {}
            for layer in group:
                tensors.update(layer_tensors(geom, shapes, layer, seed, shared_rank))
                bar.update()
            file = f"model-{k:05d}-of-{total:05d}.safetensors"
            save_file(tensors, str(tmp / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, file))
            size += sum(t.numel() * t.element_size() for t in tensors.values())
            del tensors
        bar.close()
        gen = torch.Generator().manual_seed(seed * 1_000_003 - 1)
        rest = {n: torch.ones(s, dtype=torch.bfloat16) if n.endswith("norm.weight") else _normal(s, gen)
                for n, s in shapes.items() if not n.startswith("model.layers.")}
        file = f"model-{total:05d}-of-{total:05d}.safetensors"
        save_file(rest, str(tmp / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(rest, file))
        size += sum(t.numel() * t.element_size() for t in rest.values())
        missing = set(shapes) - set(weight_map)
        if missing:
            raise AssertionError(f"tensors not written: {sorted(missing)[:5]}")
        (tmp / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
        config.dtype = torch.bfloat16
        config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        normal_permissions(tmp)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(ATTENTION), default="Qwen1.5-MoE-A2.7B",
                   help="layer shapes (tiny: a small model for the tests)")
    p.add_argument("--out", type=Path, required=True, help="new directory for the model (must not exist)")
    p.add_argument("--layers", type=int, default=2, help="decoder layers (the released Qwen1.5-MoE-A2.7B has 24)")
    p.add_argument("--vocab", type=int, default=4096, help="embedding rows (the released model has 151936)")
    p.add_argument("--tokenizer-vocab", type=int, default=4096,
                   help="tokens of the BPE trained here; the embedding is padded to --vocab")
    p.add_argument("--shared-rank", type=int, default=SHARED_RANK,
                   help="rank of the row space the experts of a layer share (0: pure noise)")
    p.add_argument("--layers-per-shard", type=int, default=2, help="decoder layers per safetensors file")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.out.exists():
        p.error(f"--out {a.out} exists; choose a new directory")
    for name in ("layers", "vocab", "tokenizer_vocab", "layers_per_shard"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    shape = TINY if a.shape == "tiny" else SHAPES[a.shape]
    path = write_model(shape, ATTENTION[a.shape], a.out, a.layers, a.vocab, a.tokenizer_vocab, a.seed, a.shared_rank,
                       a.layers_per_shard)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
