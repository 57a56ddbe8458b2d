"""MoE layer shapes of the paper's models, for the benchmarks (from each model's config.json)."""
from __future__ import annotations

from typing import NamedTuple


class MoEShape(NamedTuple):
    hidden: int
    inter: int  # per routed expert
    experts: int  # routed
    top_k: int
    shared_inter: int | None  # all shared experts together; None without
    moe_layers: int
    arch: str  # vllm_kbvq.archs key


SHAPES = {
    "Qwen1.5-MoE-A2.7B": MoEShape(2048, 1408, 60, 4, 5632, 24, "qwen2_moe"),
    "Qwen3-30B-A3B": MoEShape(2048, 768, 128, 8, None, 48, "qwen3_moe"),
    "Mixtral-8x7B": MoEShape(4096, 14336, 8, 2, None, 32, "mixtral"),
    "DeepSeek-V2-Lite": MoEShape(2048, 1408, 64, 6, 2816, 26, "deepseek_v2"),
}
