"""MoE layer shapes of the paper's models, for the benchmarks: each model's config.json fields, read into the
geometry the quantizer and runtime use (:class:`vllm_kbvq.archs.MoEGeometry`)."""
from __future__ import annotations

from dataclasses import dataclass

from vllm_kbvq.archs import MoEGeometry


@dataclass(frozen=True)
class MoEShape:
    geom: MoEGeometry
    moe_layers: int

    @classmethod
    def of(cls, moe_layers: int, **config) -> MoEShape:
        return cls(MoEGeometry.from_config(config, "benchmarks/shapes.py"), moe_layers)

    def asdict(self) -> dict:
        """The figures the benchmarks' JSON records carry."""
        g = self.geom
        return {"hidden": g.hidden, "inter": g.inter, "experts": g.n_experts, "top_k": g.top_k,
                "shared_inter": g.shared_inter, "moe_layers": self.moe_layers, "arch": g.arch.name}


SHAPES = {
    "Qwen1.5-MoE-A2.7B": MoEShape.of(24, model_type="qwen2_moe", hidden_size=2048, moe_intermediate_size=1408,
                                     num_experts=60, num_experts_per_tok=4, shared_expert_intermediate_size=5632),
    "Qwen3-30B-A3B": MoEShape.of(48, model_type="qwen3_moe", hidden_size=2048, moe_intermediate_size=768,
                                 num_experts=128, num_experts_per_tok=8),
    "Mixtral-8x7B": MoEShape.of(32, model_type="mixtral", hidden_size=4096, intermediate_size=14336,
                                num_local_experts=8, num_experts_per_tok=2),
    "DeepSeek-V2-Lite": MoEShape.of(26, model_type="deepseek_v2", hidden_size=2048, moe_intermediate_size=1408,
                                    n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=2),
}
