"""Tiny randomly initialised MoE checkpoints of each supported architecture (head_dim 64)."""
from __future__ import annotations

from pathlib import Path

import torch

COMMON = dict(vocab_size=320, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1, max_position_embeddings=512, tie_word_embeddings=False)


def tiny_config(arch: str):
    from transformers import DeepseekV2Config, MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

    if arch == "qwen2_moe":
        return Qwen2MoeConfig(**COMMON, intermediate_size=256, moe_intermediate_size=64,
                              shared_expert_intermediate_size=128, num_experts=8, num_experts_per_tok=2,
                              norm_topk_prob=False)
    if arch == "qwen3_moe":
        return Qwen3MoeConfig(**COMMON, head_dim=64, intermediate_size=256, moe_intermediate_size=64,
                              num_experts=8, num_experts_per_tok=2, norm_topk_prob=True)
    if arch == "mixtral":
        return MixtralConfig(**COMMON, intermediate_size=96, num_local_experts=4, num_experts_per_tok=2)
    if arch == "deepseek_v2":
        # MLA dimensions as in the real model: vLLM's CPU MLA backend rejects small ones.
        # MLA has no grouped KV heads: num_key_value_heads equals num_attention_heads, as in the real model.
        return DeepseekV2Config(**{**COMMON, "num_key_value_heads": 2}, intermediate_size=256, moe_intermediate_size=64, n_routed_experts=8,
                                n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
                                kv_lora_rank=512, q_lora_rank=None, qk_rope_head_dim=64, qk_nope_head_dim=128,
                                v_head_dim=128, topk_method="greedy", n_group=1, topk_group=1,
                                routed_scaling_factor=1.0)
    raise ValueError(arch)


ARCH_NAMES = ("qwen2_moe", "qwen3_moe", "mixtral", "deepseek_v2")
# quantizer options of a checkpoint with row-scaled codebooks and fine-tuned continuous tensors (kbvq_tiny(arch, **TUNED))
TUNED = {"row_scale": True, "finetune_steps": 20, "finetune_batch": 128}
# a mixed-precision checkpoint (format version 2): these widths and budget give every architecture's tiny
# model layers whose routed experts have different widths (vectors of 4 and of 2; DeepSeek-V2's 8-bit indices
# beside 4-bit ones); at the tiny shapes a 2-bit d=4 codebook costs 2 bits per weight, so the default
# candidates would not mix
MIXED = {"bits_budget": 3.0, "candidate_widths": ((1, 4), (2, 2), (4, 2))}


def make_tiny_model(arch: str, path: Path, seed: int = 0) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=torch.float32)
    # Random init leaves routers near-uniform; sharper routing exercises uneven token counts.
    for name, p in model.named_parameters():
        if name.endswith("mlp.gate.weight"):
            p.data.normal_(0, 0.5)
    model.save_pretrained(path, safe_serialization=True)
    tiny_tokenizer().save_pretrained(path)
    return path


TEXT = (
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step. "
    "To be or not to be, that is the question. All that glitters is not gold. The early bird catches the worm. "
)


def tiny_tokenizer():
    """A byte-level BPE trained here on a few sentences: real tokenizer files, no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=COMMON["vocab_size"], special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT] * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
