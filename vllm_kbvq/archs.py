"""Per-architecture facts, as data: where experts live and what their tensors are called.

One entry per architecture. The quantizer, the reference runtime and the vLLM
plugin all read these entries; nothing else in the code branches on the
architecture. Checkpoint names are those of the Hugging Face safetensors files
(per-expert tensors, even where transformers fuses experts in memory).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

__all__ = ["ArchSpec", "ARCHS", "arch_for_config", "config_value", "WEIGHT_TYPES", "UnsupportedArchitectureError",
           "ModelConfigError", "MoEGeometry", "layer_prefix", "layer_index"]

# Canonical weight types; each arch maps them to its own projection names.
WEIGHT_TYPES = ("gate", "up", "down")
# Decoder layer ``i``'s tensors (checkpoint) and modules (transformers, vLLM) sit under this prefix.
LAYER_PREFIX = "model.layers.{layer}"
_LAYER_IN_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_prefix(layer: int) -> str:
    """``model.layers.{layer}.``: the prefix of a decoder layer's tensor and module names."""
    return LAYER_PREFIX.format(layer=layer) + "."


def layer_index(name: str) -> int | None:
    """The decoder layer a tensor or module name belongs to (None outside the layers)."""
    m = _LAYER_IN_NAME.search(name)
    return int(m.group(1)) if m else None


class UnsupportedArchitectureError(ValueError):
    pass


class ModelConfigError(ValueError):
    """A model config whose MoE sizes are missing or not positive integers."""


@dataclass(frozen=True)
class ArchSpec:
    name: str
    model_types: tuple[str, ...]
    # config attributes ("a|b": aliases, first found wins)
    num_experts_attr: str
    expert_intermediate_attr: str
    # checkpoint tensor prefixes ({layer}, {expert} are filled in)
    expert_prefix: str
    proj_names: dict[str, str]
    # the shared experts' total width is the product of these config values (empty: no shared experts)
    shared_intermediate_attrs: tuple[str, ...] = ()
    top_k_attr: str = "num_experts_per_tok"
    shared_prefix: str | None = None
    shared_proj_names: dict[str, str] = field(
        default_factory=lambda: {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
    )
    # in-memory (transformers) module attributes
    moe_attr: str = "mlp"  # decoder layer -> MoE block
    experts_attr: str = "experts"  # MoE block -> experts module
    shared_attr: str | None = None  # MoE block -> shared expert MLP
    # checkpoint-name fragment -> in-memory fragment, for non-expert tensors
    ckpt_renames: tuple[tuple[str, str], ...] = ()
    # vLLM's fused linears of a shared expert: module name -> the weight types it holds
    shared_fused: dict[str, tuple[str, ...]] = field(default_factory=lambda: {"gate_up_proj": ("gate", "up")})

    def expert_tensor(self, layer: int, expert: int, wtype: str, suffix: str = "weight") -> str:
        base = self.expert_prefix.format(layer=layer, expert=expert)
        return f"{base}.{self.proj_names[wtype]}.{suffix}"

    def shared_tensor(self, layer: int, wtype: str, suffix: str = "weight") -> str:
        if self.shared_prefix is None:
            raise ValueError(f"{self.name} has no shared experts")
        return f"{self.shared_prefix.format(layer=layer)}.{self.shared_proj_names[wtype]}.{suffix}"

    def shared_linear_types(self, module_prefix: str, layer: int) -> tuple[str, ...] | None:
        """Weight types a shared-expert linear module of ``layer`` holds (two when vLLM fuses them), else None."""
        if self.shared_prefix is None:
            return None
        base = self.shared_prefix.format(layer=layer) + "."
        if not module_prefix.startswith(base):
            return None
        name = module_prefix[len(base):]
        if name in self.shared_fused:
            return self.shared_fused[name]
        by_name = {v: k for k, v in self.shared_proj_names.items()}
        return (by_name[name],) if name in by_name else None

    def tensor(self, layer: int, group: str, member: int, wtype: str, suffix: str = "weight") -> str:
        """A checkpoint tensor of routed expert ``member`` (``group`` "experts") or of the shared expert."""
        if group == "experts":
            return self.expert_tensor(layer, member, wtype, suffix)
        return self.shared_tensor(layer, wtype, suffix)

    def num_experts(self, config) -> int:
        return int(config_value(config, self.num_experts_attr))

    def expert_intermediate(self, config) -> int:
        return int(config_value(config, self.expert_intermediate_attr))

    def to_memory_name(self, ckpt_name: str) -> str:
        for src, dst in self.ckpt_renames:
            ckpt_name = ckpt_name.replace(src, dst)
        return ckpt_name


def config_value(config, attr):
    """A config value by name; ``attr`` may list aliases (``"a|b"``): config.json files use either."""
    for name in attr.split("|"):
        if isinstance(config, dict):
            if name in config:
                return config[name]
        elif hasattr(config, name):
            return getattr(config, name)
    raise KeyError(f"model config has none of {attr.split('|')}")


ARCHS: dict[str, ArchSpec] = {
    a.name: a
    for a in (
        ArchSpec(
            name="qwen2_moe",  # Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B
            model_types=("qwen2_moe",),
            num_experts_attr="num_experts",
            expert_intermediate_attr="moe_intermediate_size",
            expert_prefix="model.layers.{layer}.mlp.experts.{expert}",
            proj_names={"gate": "gate_proj", "up": "up_proj", "down": "down_proj"},
            shared_prefix="model.layers.{layer}.mlp.shared_expert",
            shared_attr="shared_expert",
            shared_intermediate_attrs=("shared_expert_intermediate_size",),
        ),
        ArchSpec(
            name="qwen3_moe",  # Qwen3-30B-A3B
            model_types=("qwen3_moe",),
            num_experts_attr="num_experts|num_local_experts",  # transformers 5 writes the latter
            expert_intermediate_attr="moe_intermediate_size",
            expert_prefix="model.layers.{layer}.mlp.experts.{expert}",
            proj_names={"gate": "gate_proj", "up": "up_proj", "down": "down_proj"},
        ),
        ArchSpec(
            name="mixtral",  # Mixtral-8x7B
            model_types=("mixtral",),
            num_experts_attr="num_local_experts",
            expert_intermediate_attr="intermediate_size",
            expert_prefix="model.layers.{layer}.block_sparse_moe.experts.{expert}",
            proj_names={"gate": "w1", "up": "w3", "down": "w2"},
            ckpt_renames=((".block_sparse_moe.", ".mlp."),),
        ),
        ArchSpec(
            name="deepseek_v2",  # DeepSeek-V2-Lite
            model_types=("deepseek_v2",),
            num_experts_attr="n_routed_experts",
            expert_intermediate_attr="moe_intermediate_size",
            expert_prefix="model.layers.{layer}.mlp.experts.{expert}",
            proj_names={"gate": "gate_proj", "up": "up_proj", "down": "down_proj"},
            shared_prefix="model.layers.{layer}.mlp.shared_experts",
            shared_attr="shared_experts",
            shared_intermediate_attrs=("moe_intermediate_size", "n_shared_experts"),  # n experts of the routed width
        ),
    )
}


def arch_for_config(config) -> ArchSpec:
    """The entry for a model config (dict or PretrainedConfig); a clear error otherwise."""
    model_type = config_value(config, "model_type") if (
        isinstance(config, dict) and "model_type" in config or hasattr(config, "model_type")
    ) else None
    for arch in ARCHS.values():
        if model_type in arch.model_types:
            return arch
    supported = ", ".join(sorted(t for a in ARCHS.values() for t in a.model_types))
    raise UnsupportedArchitectureError(
        f"model_type {model_type!r} is not a supported Mixture-of-Experts architecture; "
        f"supported: {supported}"
    )


def _optional(config, attr: str):
    try:
        return config_value(config, attr)
    except KeyError:
        return None


def _positive_int(config, attr: str, source: str) -> int:
    v = _optional(config, attr)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ModelConfigError(f"{source}: {attr.replace('|', ' or ')} must be a positive integer, got {v!r}")
    return v


@dataclass(frozen=True)
class MoEGeometry:
    """The sizes of a model's MoE layers, read from its config once: every expert matrix's shape follows.

    The quantizer, its installers, the benchmarks' shape table and the testbed builders all take this one
    object instead of deriving expert count and widths again from the config.
    """

    arch: ArchSpec = field(repr=False)
    n_experts: int  # routed experts per layer
    top_k: int
    hidden: int
    inter: int  # width of one routed expert
    shared_inter: int | None  # all shared experts of a layer together; None without

    def __post_init__(self):
        for name in ("n_experts", "top_k", "hidden", "inter"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ModelConfigError(f"MoE geometry: {name} must be a positive integer, got {v!r}")
        if self.n_experts < 2:
            raise ModelConfigError(f"{self.n_experts} routed expert(s): not a Mixture-of-Experts model")
        if self.top_k > self.n_experts:
            raise ModelConfigError(f"top_k {self.top_k} is more than the {self.n_experts} routed experts")
        if self.shared_inter is not None and (self.arch.shared_prefix is None or self.shared_inter < 1):
            raise ModelConfigError(f"shared experts of width {self.shared_inter!r} in {self.arch.name}")

    @classmethod
    def from_config(cls, config, source: str = "config.json", arch: ArchSpec | None = None) -> MoEGeometry:
        """From a config.json dict or a transformers config; errors name ``source`` and the field. ``arch``:
        the entry to read it with (default: the config's model_type's)."""
        arch = arch or arch_for_config(config)
        n = _optional(config, arch.num_experts_attr)
        if not isinstance(n, bool) and isinstance(n, int) and n < 2:
            raise ModelConfigError(f"{source}: {arch.num_experts_attr.replace('|', ' or ')} is {n}: not a "
                                   "Mixture-of-Experts model (it needs 2 or more routed experts)")
        n = _positive_int(config, arch.num_experts_attr, source)
        shared = None
        if arch.shared_intermediate_attrs:  # a missing, null or 0 factor: no shared experts
            if all(_optional(config, attr) for attr in arch.shared_intermediate_attrs):
                shared = math.prod(_positive_int(config, attr, source) for attr in arch.shared_intermediate_attrs)
        return cls(arch, n, _positive_int(config, arch.top_k_attr, source), _positive_int(config, "hidden_size", source),
                   _positive_int(config, arch.expert_intermediate_attr, source), shared)

    @property
    def groups(self) -> tuple[tuple[str, int, int], ...]:
        """``(group, members, width)``: the routed experts, then the shared expert (one matrix of all of them)."""
        out = (("experts", self.n_experts, self.inter),)
        return out + ((("shared_experts", 1, self.shared_inter),) if self.shared_inter else ())
