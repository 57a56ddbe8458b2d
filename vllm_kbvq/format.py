"""The KBVQ checkpoint contract (format version 1).

This module is the single definition of what a KBVQ checkpoint holds; the
quantizer writes it, the reference runtime and the vLLM plugin read it.

A quantized matrix ``W`` (``oc x ic``), stored under the prefix of its original
``.weight`` tensor (e.g. ``model.layers.3.mlp.experts.5.gate_proj``), is

    y = (1 + affine_s) * (dequant(vq_codes, vq_codebook) @ x + lr_a @ (lr_b @ x)) + affine_b

Suffixes (chosen so no vLLM loader mistakes them for a weight, scale, zero or bias):

==============  ======================  =======  ==========================================
suffix          shape                   dtype    meaning
==============  ======================  =======  ==========================================
vq_codes        [oc, words]             int32    packed indices, see :mod:`vllm_kbvq.packing`
vq_codebook     [K, d]                  float16  k-means codebook of this matrix
lr_a            [oc, k]                 float16  private low-rank factor A_i     (k > 0)
lr_b            [k, ic]                 float16  shared basis B                  (k > 0)
affine_s        [oc]                    float16  channel scale s                 (BCOS)
affine_b        [oc]                    float16  channel shift b                 (BCOS)
==============  ======================  =======  ==========================================

``lr_b`` is shared by all routed experts of a layer and weight type; it is stored
once, under expert 0's prefix. A shared expert owns its own ``lr_b``. Without
BCOS, ``affine_s`` is 0 and ``affine_b`` is 0 (kept, so every checkpoint has the
same tensors and the runtime has one code path).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .archs import ARCHS, WEIGHT_TYPES
from .packing import packed_words

__all__ = [
    "QUANT_METHOD",
    "FORMAT_VERSION",
    "SUFFIXES",
    "KBVQConfig",
    "FormatError",
    "tensor_specs",
    "matrix_storage_bits",
    "default_rank",
    "validate_checkpoint",
    "checkpoint_tensors",
]

QUANT_METHOD = "kbvq"
FORMAT_VERSION = 1
SUFFIXES = ("vq_codes", "vq_codebook", "lr_a", "lr_b", "affine_s", "affine_b")
CODE_DTYPE = torch.int32
FLOAT_DTYPE = torch.float16
REPORT_FILE = "kbvq_report.json"


class FormatError(ValueError):
    """A checkpoint or config that does not follow the KBVQ format."""


def default_rank(oc: int, ic: int, ratio: float) -> int:
    """Shared-basis rank: ``max(1, round(min(oc, ic) * ratio))``; 0 when ratio is 0."""
    if ratio <= 0:
        return 0
    return max(1, round(min(oc, ic) * ratio))


@dataclass
class KBVQConfig:
    """``quantization_config`` of a KBVQ checkpoint."""

    bits: int
    vector_dim: int
    arch: str
    # rank per group ("experts", "shared_experts") and weight type ("gate", "up", "down")
    rank: dict[str, dict[str, int]]
    # decoder layers whose experts are quantized, and the shared-expert width (None: none)
    layers: list[int] = field(default_factory=list)
    shared_intermediate_size: int | None = None
    idre: bool = True
    bcos: bool = True
    rank_ratio: float = 1 / 128
    damp: float = 1e-2
    kmeans_iters: int = 100
    vq_method: str = "kmeans"
    seed: int = 42
    calibration: dict = field(default_factory=dict)
    quant_method: str = QUANT_METHOD
    format_version: int = FORMAT_VERSION

    @property
    def index_bits(self) -> int:
        return self.bits * self.vector_dim

    @property
    def codebook_size(self) -> int:
        return 1 << self.index_bits

    def to_dict(self) -> dict:
        d = asdict(self)
        d["codebook_size"] = self.codebook_size
        d["index_bits"] = self.index_bits
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "KBVQConfig":
        if not isinstance(d, dict):
            raise FormatError("quantization_config must be a JSON object")
        method = d.get("quant_method")
        if method != QUANT_METHOD:
            raise FormatError(f"quantization_config.quant_method is {method!r}, expected {QUANT_METHOD!r}")
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise FormatError(
                f"quantization_config.format_version is {version!r}; this vllm-kbvq reads "
                f"format version {FORMAT_VERSION} only"
            )
        for key in ("bits", "vector_dim", "arch", "rank", "layers"):
            if key not in d:
                raise FormatError(f"quantization_config is missing the field {key!r}")
        known = {f for f in cls.__dataclass_fields__}
        cfg = cls(**{k: v for k, v in d.items() if k in known})
        cfg.validate()
        if "codebook_size" in d and d["codebook_size"] != cfg.codebook_size:
            raise FormatError(
                f"quantization_config.codebook_size is {d['codebook_size']}, but bits={cfg.bits} and "
                f"vector_dim={cfg.vector_dim} give {cfg.codebook_size}"
            )
        return cfg

    def validate(self) -> None:
        if self.arch not in ARCHS:
            raise FormatError(f"quantization_config.arch {self.arch!r} is not one of {sorted(ARCHS)}")
        if not isinstance(self.bits, int) or not 1 <= self.bits <= 8:
            raise FormatError(f"quantization_config.bits must be an integer 1..8, got {self.bits!r}")
        if not isinstance(self.vector_dim, int) or self.vector_dim < 1:
            raise FormatError(f"quantization_config.vector_dim must be a positive integer, got {self.vector_dim!r}")
        if self.index_bits > 16:
            raise FormatError(
                f"bits*vector_dim = {self.index_bits} > 16: a codebook of 2^{self.index_bits} entries per "
                "matrix is not supported; use a smaller vector_dim"
            )
        for group, ranks in self.rank.items():
            for wtype, k in ranks.items():
                if not isinstance(k, int) or k < 0:
                    raise FormatError(f"quantization_config.rank.{group}.{wtype} must be a non-negative integer")

    @classmethod
    def from_model_dir(cls, path: str | Path) -> "KBVQConfig":
        cfg_file = Path(path) / "config.json"
        if not cfg_file.is_file():
            raise FormatError(f"{cfg_file} not found")
        with open(cfg_file) as f:
            config = json.load(f)
        if "quantization_config" not in config:
            raise FormatError(f"{cfg_file} has no quantization_config: not a KBVQ checkpoint")
        return cls.from_dict(config["quantization_config"])


def tensor_specs(oc: int, ic: int, cfg: KBVQConfig, rank: int, owns_basis: bool) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shapes and dtypes of the tensors of one quantized ``oc x ic`` matrix."""
    d = cfg.vector_dim
    if ic % d:
        raise FormatError(f"input size {ic} is not divisible by vector_dim {d}")
    specs = {
        "vq_codes": ((oc, packed_words(ic // d, cfg.index_bits)), CODE_DTYPE),
        "vq_codebook": ((cfg.codebook_size, d), FLOAT_DTYPE),
        "affine_s": ((oc,), FLOAT_DTYPE),
        "affine_b": ((oc,), FLOAT_DTYPE),
    }
    if rank > 0:
        specs["lr_a"] = ((oc, rank), FLOAT_DTYPE)
        if owns_basis:
            specs["lr_b"] = ((rank, ic), FLOAT_DTYPE)
    return specs


def matrix_storage_bits(oc: int, ic: int, cfg: KBVQConfig, rank: int, n_sharing: int = 1) -> float:
    """Bits stored for one matrix, the shared basis split over the ``n_sharing`` matrices that use it.

    Counts the packed code words as stored (padding included), which is what a
    user's disk and GPU hold.
    """
    bits = 0.0
    for suffix, (shape, dtype) in tensor_specs(oc, ic, cfg, rank, owns_basis=True).items():
        n = math.prod(shape) * torch.finfo(dtype).bits if dtype.is_floating_point else math.prod(shape) * 32
        bits += n / n_sharing if suffix == "lr_b" else n
    return bits


def checkpoint_tensors(path: str | Path) -> dict[str, tuple[str, tuple[int, ...], str]]:
    """``name -> (file, shape, dtype)`` from the safetensors headers of a checkpoint directory."""
    from safetensors import safe_open

    path = Path(path)
    files = sorted(p for p in path.glob("*.safetensors"))
    if not files:
        raise FormatError(f"no *.safetensors files in {path}")
    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            for name in h.keys():
                sl = h.get_slice(name)
                out[name] = (f.name, tuple(sl.get_shape()), sl.get_dtype())
    return out


_ST_DTYPES = {torch.int32: "I32", torch.float16: "F16"}


def expected_tensors(model_config: dict, cfg: KBVQConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every KBVQ tensor a checkpoint with this config must hold, with shape and dtype."""
    arch = ARCHS[cfg.arch]
    n = arch.num_experts(model_config)
    hidden = model_config["hidden_size"]
    inter = arch.expert_intermediate(model_config)
    out = {}

    def add(prefix_of, wtype, oc, ic, rank, owns):
        for suffix, spec in tensor_specs(oc, ic, cfg, rank, owns).items():
            out[prefix_of(suffix)] = spec

    for layer in cfg.layers:
        for wtype in WEIGHT_TYPES:
            oc, ic = (hidden, inter) if wtype == "down" else (inter, hidden)
            rank = cfg.rank.get("experts", {}).get(wtype, 0)
            for e in range(n):
                add(lambda s: arch.expert_tensor(layer, e, wtype, s), wtype, oc, ic, rank, e == 0)
            if cfg.shared_intermediate_size:
                si = cfg.shared_intermediate_size
                soc, sic = (hidden, si) if wtype == "down" else (si, hidden)
                srank = cfg.rank.get("shared_experts", {}).get(wtype, 0)
                add(lambda s: arch.shared_tensor(layer, wtype, s), wtype, soc, sic, srank, True)
    return out


def validate_checkpoint(path: str | Path) -> KBVQConfig:
    """Check a KBVQ checkpoint against its config before anything is built from it.

    Every expected tensor must be present with its exact shape and dtype, and no
    expert may still carry an unquantized ``.weight``. Errors name the tensor and
    file, so a broken checkpoint fails here rather than inside a kernel.
    """
    path = Path(path)
    if not path.is_dir():
        raise FormatError(f"checkpoint directory {path} does not exist")
    cfg = KBVQConfig.from_model_dir(path)
    with open(path / "config.json") as f:
        model_config = json.load(f)
    have = checkpoint_tensors(path)
    for name, (shape, dtype) in expected_tensors(model_config, cfg).items():
        if name not in have:
            raise FormatError(f"{path}: tensor {name} is missing")
        file, got_shape, got_dtype = have[name]
        if got_shape != shape:
            hint = ""
            if name.endswith("vq_codebook"):
                hint = (f" (bits={cfg.bits}, vector_dim={cfg.vector_dim} need {cfg.codebook_size} "
                        f"codewords of length {cfg.vector_dim})")
            elif name.endswith("vq_codes"):
                hint = f" (bits={cfg.bits}, vector_dim={cfg.vector_dim} give {cfg.index_bits}-bit indices)"
            raise FormatError(f"{path / file}: tensor {name} has shape {list(got_shape)}, expected {list(shape)}{hint}")
        if got_dtype != _ST_DTYPES[dtype]:
            raise FormatError(f"{path / file}: tensor {name} has dtype {got_dtype}, expected {_ST_DTYPES[dtype]}")
    from .archs import ARCHS

    arch = ARCHS[cfg.arch]
    for layer in cfg.layers:
        stale = arch.expert_tensor(layer, 0, "gate", "weight")
        if stale in have:
            raise FormatError(f"{path / have[stale][0]}: {stale} is unquantized, but layer {layer} is listed as KBVQ")
    return cfg
