"""A random-weight MoE model at a released model's layer shapes, for speed benchmarks.

    python benchmarks/random_moe.py --out out/qwen15-shaped          # Qwen1.5-MoE-A2.7B shapes, 2 layers
    kbvq-quantize --model out/qwen15-shaped --output out/qwen15-shaped-kbvq2 --kmeans-iters 2 \\
        --nsamples 8 --seqlen 128 --no-plain-vq-report
    python benchmarks/vllm_cpu_decode.py --base out/qwen15-shaped --kbvq out/qwen15-shaped-kbvq2

Real hidden, expert, shared-expert and attention sizes and routing (benchmarks/shapes.py), but
few layers and a small vocabulary (a byte-level BPE trained here on the packaged calibration
text), so it builds, quantizes and serves on a CPU machine in minutes. The weights are random
(normal, std 0.02): quality means nothing here, speed and memory do.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.shapes import SHAPES  # noqa: E402

# released configs' attention sizes, which benchmarks/shapes.py does not carry
ATTENTION = {"Qwen1.5-MoE-A2.7B": {"num_attention_heads": 16, "num_key_value_heads": 16}}


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


def build(name: str, out: Path, layers: int, vocab: int, seed: int = 0) -> Path:
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    shape = SHAPES[name].geom
    if shape.arch.name != "qwen2_moe":
        raise SystemExit(f"{name}: only Qwen2-MoE-shaped models are built so far")
    tok = tokenizer(vocab)
    cfg = Qwen2MoeConfig(
        vocab_size=len(tok), hidden_size=shape.hidden, intermediate_size=shape.shared_inter,
        moe_intermediate_size=shape.inter, shared_expert_intermediate_size=shape.shared_inter,
        num_experts=shape.n_experts, num_experts_per_tok=shape.top_k, num_hidden_layers=layers,
        max_position_embeddings=4096, tie_word_embeddings=False, eos_token_id=tok.eos_token_id,
        bos_token_id=tok.eos_token_id, **ATTENTION[name])
    torch.manual_seed(seed)
    model = Qwen2MoeForCausalLM(cfg).to(torch.bfloat16)
    out.mkdir(parents=True, exist_ok=False)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(ATTENTION), default="Qwen1.5-MoE-A2.7B")
    p.add_argument("--out", type=Path, required=True, help="new directory for the model (must not exist)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=4096)
    a = p.parse_args(argv)
    if a.out.exists():
        p.error(f"--out {a.out} exists; choose a new directory")
    print(f"wrote {build(a.shape, a.out, a.layers, a.vocab)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
