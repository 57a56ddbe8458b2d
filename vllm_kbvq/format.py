"""The KBVQ checkpoint contract (format versions 1 and 2).

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

Every matrix has a :class:`Width`: its bits per weight and vector dimension, which fix the codebook's
size (``2^(bits*d)`` codewords of length ``d``) and the packed index width. In format version 1 all
matrices have the config's ``bits`` and ``vector_dim``. Version 2 (mixed precision, written by
``--bits-budget``) lists the candidate widths in ``widths`` (``[[bits, vector_dim], ...]``) and gives
each matrix one of them in ``width_of``: ``{layer: {group: {weight type: [index into widths, one
per member]}}}``; ``bits`` and ``vector_dim`` are then the narrowest width. The gate and up matrices
of one expert share a width (the runtime fuses them into one ``w13``).

Which matrices a checkpoint holds, their names and shapes (:func:`layer_matrices`,
:func:`matrix_shape`) and which tensors each one stores (:func:`tensor_specs`,
:class:`QuantizedMatrix`) are defined here and nowhere else.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .archs import ARCHS, WEIGHT_TYPES, ModelConfigError, MoEGeometry
from .packing import packed_words

__all__ = [
    "QUANT_METHOD",
    "FORMAT_VERSION",
    "READ_VERSIONS",
    "Width",
    "SUFFIXES",
    "GROUPS",
    "KBVQConfig",
    "FormatError",
    "MatrixRef",
    "QuantizedMatrix",
    "matrix_shape",
    "layer_matrices",
    "is_kbvq_tensor",
    "tensor_specs",
    "spec_bits",
    "expected_matrices",
    "default_rank",
    "validate_checkpoint",
    "checkpoint_tensors",
    "DTYPE_BITS",
    "load_json",
    "SCHEMA",
]

QUANT_METHOD = "kbvq"
FORMAT_VERSION = 2  # the newest; a checkpoint of uniform width is still written as version 1
READ_VERSIONS = (1, 2)
SUFFIXES = ("vq_codes", "vq_codebook", "lr_a", "lr_b", "affine_s", "affine_b")
GROUPS = ("experts", "shared_experts")  # the routed experts of a layer, and its shared expert
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


@dataclass(frozen=True, order=True)
class Width:
    """A matrix's bit width: ``bits`` per weight in vectors of ``vector_dim`` weights."""

    bits: int
    vector_dim: int

    @property
    def index_bits(self) -> int:
        return self.bits * self.vector_dim

    @property
    def codebook_size(self) -> int:
        return 1 << self.index_bits

    def __str__(self) -> str:
        return f"{self.bits}-bit d={self.vector_dim}"

    def check(self) -> None:
        if not (_is_int(self.bits) and 1 <= self.bits <= 8 and _is_power_of_2(self.vector_dim)):
            # a power of 2: the GPU kernels load one vector with tl.arange, which takes powers of 2 only
            raise FormatError(f"width [{self.bits!r}, {self.vector_dim!r}]: bits must be an integer 1..8 and "
                              "vector_dim a power of 2 (1, 2, 4, 8, ...)")
        if self.index_bits > 16:
            raise FormatError(
                f"bits*vector_dim = {self.index_bits} > 16: a codebook of 2^{self.index_bits} entries per "
                "matrix is not supported; use a smaller vector_dim"
            )


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
    # how the stored values were made; the runtime reads none of these (the tensors carry everything)
    row_scale: bool = False
    finetune_steps: int = 0
    calibration: dict = field(default_factory=dict)
    # mixed precision (format version 2): the candidate widths and each matrix's; None: all of bits/vector_dim
    widths: list[list[int]] | None = None
    width_of: dict[str, dict[str, dict[str, list[int]]]] | None = None
    bits_budget: float | None = None  # the --bits-budget that chose width_of (informational)
    quant_method: str = QUANT_METHOD

    @property
    def format_version(self) -> int:
        return 1 if self.width_of is None else 2

    @property
    def default_width(self) -> Width:
        return Width(self.bits, self.vector_dim)

    @property
    def index_bits(self) -> int:
        return self.default_width.index_bits

    @property
    def codebook_size(self) -> int:
        return self.default_width.codebook_size

    def width(self, layer: int, group: str, wtype: str, member: int) -> Width:
        """The width of one matrix."""
        if self.width_of is None:
            return self.default_width
        return Width(*self.widths[self.width_of[str(layer)][group][wtype][member]])

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.width_of is None:  # version 1 has no such fields
            for key in ("widths", "width_of", "bits_budget"):
                d.pop(key)
        d["format_version"] = self.format_version
        d["codebook_size"] = self.codebook_size
        d["index_bits"] = self.index_bits
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "quantization_config") -> KBVQConfig:
        """Checked against :data:`SCHEMA`; errors name ``source`` (e.g. the config.json path) and the field."""
        if not isinstance(d, dict):
            raise FormatError(f"{source}: quantization_config must be a JSON object, got {type(d).__name__}")
        method = d.get("quant_method")
        if method != QUANT_METHOD:
            raise FormatError(f"{source}: quantization_config.quant_method is {method!r}, expected {QUANT_METHOD!r}")
        version = d.get("format_version")
        if not _is_int(version) or version not in READ_VERSIONS:
            raise FormatError(
                f"{source}: quantization_config.format_version is {version!r}; this vllm-kbvq reads "
                f"format versions {', '.join(map(str, READ_VERSIONS))}"
            )
        mixed = d.get("width_of") is not None
        if mixed != (version == 2):
            raise FormatError(f"{source}: quantization_config.format_version is {version}, but width_of is "
                              f"{'set' if mixed else 'missing'}: version 2 (mixed widths) has width_of, version 1 not")
        for key in ("bits", "vector_dim", "arch", "rank", "layers") + (("widths",) if mixed else ()):
            if key not in d:
                raise FormatError(f"{source}: quantization_config is missing the field {key!r}")
        for key in _DERIVED:  # not fields: checked here, and against bits and vector_dim below
            ok, want = SCHEMA[key]
            if key in d and not ok(d[key]):
                raise FormatError(f"{source}: quantization_config.{key} must be {want}, got {d[key]!r}")
        known = {f for f in cls.__dataclass_fields__}
        cfg = cls(**{k: v for k, v in d.items() if k in known})
        try:
            cfg.validate()
        except FormatError as e:
            raise FormatError(f"{source}: {e}") from None
        for key, value in (("codebook_size", cfg.codebook_size), ("index_bits", cfg.index_bits)):
            if key in d and d[key] != value:
                raise FormatError(
                    f"{source}: quantization_config.{key} is {d[key]!r}, but bits={cfg.bits} and "
                    f"vector_dim={cfg.vector_dim} give {value}"
                )
        return cfg

    def validate(self) -> None:
        """Every field against :data:`SCHEMA`, then what the fields allow together."""
        for key, (ok, want) in SCHEMA.items():
            if key not in _DERIVED and not ok(getattr(self, key)):
                raise FormatError(f"quantization_config.{key} must be {want}, got {getattr(self, key)!r}")
        self.default_width.check()
        if self.width_of is not None:
            self._validate_widths()

    def _validate_widths(self) -> None:
        """``widths`` and ``width_of`` (version 2) against each other and ``layers``; member counts are
        checked against the model's config in :func:`expected_matrices`."""
        if not isinstance(self.widths, list) or not self.widths or not all(
                isinstance(w, list) and len(w) == 2 for w in self.widths):
            raise FormatError(f"quantization_config.widths must be a list of [bits, vector_dim], got {self.widths!r}")
        for w in self.widths:
            Width(*w).check()
        if min(Width(*w) for w in self.widths) != self.default_width:
            raise FormatError(f"quantization_config.bits and vector_dim ({self.default_width}) must be the narrowest "
                              f"of widths {self.widths}")
        want = {str(i) for i in self.layers}
        if not isinstance(self.width_of, dict) or set(self.width_of) != want:
            got = sorted(self.width_of) if isinstance(self.width_of, dict) else self.width_of
            raise FormatError(f"quantization_config.width_of must have one entry per layer {sorted(want)}, got {got}")
        for layer, groups in self.width_of.items():
            where = f"quantization_config.width_of[{layer!r}]"
            if not isinstance(groups, dict) or not set(groups) <= set(self.rank) or "experts" not in groups:
                raise FormatError(f"{where} must map the groups of rank ({sorted(self.rank)}) to weight types")
            for group, per_wtype in groups.items():
                if not isinstance(per_wtype, dict) or set(per_wtype) != set(WEIGHT_TYPES):
                    raise FormatError(f"{where}[{group!r}] must map each of {list(WEIGHT_TYPES)} to a list")
                for wtype, idx in per_wtype.items():
                    if not isinstance(idx, list) or not all(_is_int(i) and 0 <= i < len(self.widths) for i in idx):
                        raise FormatError(f"{where}[{group!r}][{wtype!r}] must be a list of indices into widths "
                                          f"(0..{len(self.widths) - 1}), got {idx!r}")
                if per_wtype["gate"] != per_wtype["up"]:
                    raise FormatError(f"{where}[{group!r}]: gate and up widths differ; an expert's gate and up "
                                      "share one width (the runtime fuses them)")

    @classmethod
    def from_model_dir(cls, path: str | Path) -> KBVQConfig:
        cfg_file = Path(path) / "config.json"
        config = load_json(cfg_file)
        if not isinstance(config, dict):
            raise FormatError(f"{cfg_file}: not a JSON object")
        if "quantization_config" not in config:
            raise FormatError(f"{cfg_file} has no quantization_config: not a KBVQ checkpoint")
        return cls.from_dict(config["quantization_config"], source=str(cfg_file))


def load_json(path: str | Path, error: type[Exception] = FormatError):
    """A JSON file's content, or ``error`` naming the file (missing, unreadable or not JSON)."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path} not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"{path}: cannot be read ({e})") from None
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
                    "the file may be truncated") from None


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_power_of_2(v) -> bool:
    return _is_int(v) and v >= 1 and not v & (v - 1)


def _is_number(v) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _is_ranks(v) -> bool:
    return isinstance(v, dict) and all(
        g in ("experts", "shared_experts") and isinstance(r, dict)
        and all(w in WEIGHT_TYPES and _is_int(k) and k >= 0 for w, k in r.items())
        for g, r in v.items())


_DERIVED = ("codebook_size", "index_bits")  # written for readers; follow from bits and vector_dim
# The type and range of every quantization_config field, checked in one place: (predicate, what it must be).
SCHEMA: dict[str, tuple] = {
    "bits": (lambda v: _is_int(v) and 1 <= v <= 8, "an integer 1..8"),
    "vector_dim": (_is_power_of_2, "a power of 2 (1, 2, 4, 8, ...)"),
    "arch": (lambda v: isinstance(v, str) and v in ARCHS, f"one of {sorted(ARCHS)}"),
    "rank": (_is_ranks, 'an object {"experts"|"shared_experts": {"gate"|"up"|"down": integer >= 0}}'),
    "layers": (lambda v: isinstance(v, list) and all(_is_int(i) and i >= 0 for i in v) and len(set(v)) == len(v),
               "a list of distinct layer indices (integers >= 0)"),
    "shared_intermediate_size": (lambda v: v is None or (_is_int(v) and v >= 1), "null or a positive integer"),
    "idre": (lambda v: isinstance(v, bool), "true or false"),
    "bcos": (lambda v: isinstance(v, bool), "true or false"),
    "rank_ratio": (lambda v: _is_number(v) and 0 <= v <= 1, "a number between 0 and 1"),
    "damp": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "kmeans_iters": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "vq_method": (lambda v: isinstance(v, str), "a string"),
    "seed": (_is_int, "an integer"),
    "row_scale": (lambda v: isinstance(v, bool), "true or false"),
    "finetune_steps": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "calibration": (lambda v: isinstance(v, dict), "a JSON object"),
    "bits_budget": (lambda v: v is None or (_is_number(v) and v > 0), "null or a number > 0"),
    "codebook_size": (lambda v: _is_int(v) and v >= 2, "an integer >= 2"),
    "index_bits": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
}


def matrix_shape(wtype: str, hidden: int, inter: int) -> tuple[int, int]:
    """``(out, in)`` of an expert matrix of width ``inter``: down maps it back to ``hidden``, gate and up the reverse."""
    return (hidden, inter) if wtype == "down" else (inter, hidden)


def is_kbvq_tensor(name: str) -> bool:
    """Whether a checkpoint tensor name is one of a quantized matrix's tensors."""
    return name.rsplit(".", 1)[-1] in SUFFIXES


def tensor_specs(oc: int, ic: int, width: Width, rank: int, owns_basis: bool) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shapes and dtypes of the tensors of one quantized ``oc x ic`` matrix of ``width``."""
    d = width.vector_dim
    if ic % d:
        raise FormatError(f"input size {ic} is not divisible by vector_dim {d}")
    specs = {
        "vq_codes": ((oc, packed_words(ic // d, width.index_bits)), CODE_DTYPE),
        "vq_codebook": ((width.codebook_size, d), FLOAT_DTYPE),
        "affine_s": ((oc,), FLOAT_DTYPE),
        "affine_b": ((oc,), FLOAT_DTYPE),
    }
    if rank > 0:
        specs["lr_a"] = ((oc, rank), FLOAT_DTYPE)
        if owns_basis:
            specs["lr_b"] = ((rank, ic), FLOAT_DTYPE)
    return specs


_BITS = {CODE_DTYPE: 32, FLOAT_DTYPE: 16}


def spec_bits(specs: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> int:
    """Bits the tensors of :func:`tensor_specs` take in a checkpoint."""
    return sum(math.prod(shape) * _BITS[dtype] for shape, dtype in specs.values())


@dataclass(frozen=True)
class MatrixRef:
    """One quantized matrix of a checkpoint: where its tensors are, its shape and its basis rank."""

    layer: int
    group: str  # one of GROUPS
    member: int  # routed expert index; 0 for the shared expert
    wtype: str  # one of archs.WEIGHT_TYPES
    oc: int
    ic: int
    rank: int
    prefix: str  # the original ``.weight`` tensor's name without ``.weight``
    width: Width

    @property
    def owns_basis(self) -> bool:
        """The matrix that stores ``lr_b``: routed expert 0 for its layer and weight type; a shared expert its own."""
        return self.member == 0

    def name(self, suffix: str) -> str:
        return f"{self.prefix}.{suffix}"

    def specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return tensor_specs(self.oc, self.ic, self.width, self.rank, self.owns_basis)


def layer_matrices(geom: MoEGeometry, cfg: KBVQConfig, layer: int) -> list[MatrixRef]:
    """Every quantized matrix of one MoE layer: per weight type, the routed experts then the shared expert."""
    arch, hidden = geom.arch, geom.hidden
    out = []
    for wtype in WEIGHT_TYPES:
        groups = [("experts", geom.n_experts, geom.inter)]
        if cfg.shared_intermediate_size:
            if arch.shared_prefix is None:
                raise FormatError(f"quantization_config.shared_intermediate_size is {cfg.shared_intermediate_size}, "
                                  f"but {arch.name} has no shared experts (use null)")
            groups.append(("shared_experts", 1, cfg.shared_intermediate_size))
        for group, members, width in groups:
            oc, ic = matrix_shape(wtype, hidden, width)
            rank = cfg.rank.get(group, {}).get(wtype, 0)
            if cfg.width_of is not None:
                listed = cfg.width_of[str(layer)].get(group, {}).get(wtype)
                if listed is None or len(listed) != members:
                    raise FormatError(f"quantization_config.width_of[{str(layer)!r}][{group!r}][{wtype!r}] must list "
                                      f"{members} width(s), one per member, got {listed!r}")
            for m in range(members):
                prefix = arch.tensor(layer, group, m, wtype).removesuffix(".weight")
                out.append(MatrixRef(layer, group, m, wtype, oc, ic, rank, prefix, cfg.width(layer, group, wtype, m)))
    return out


@dataclass
class QuantizedMatrix:
    """The stored tensors of one quantized matrix, by their format names (``lr_b`` only where it is stored)."""

    vq_codes: torch.Tensor
    vq_codebook: torch.Tensor
    affine_s: torch.Tensor
    affine_b: torch.Tensor
    lr_a: torch.Tensor | None = None
    lr_b: torch.Tensor | None = None

    def tensors(self, ref: MatrixRef) -> dict[str, torch.Tensor]:
        """Checkpoint name -> tensor, exactly the tensors :func:`tensor_specs` lists for ``ref``."""
        return {ref.name(s): getattr(self, s).contiguous() for s in ref.specs()}

    @classmethod
    def read(cls, tensors: dict[str, torch.Tensor], ref: MatrixRef) -> QuantizedMatrix:
        """The matrix ``ref`` from checkpoint tensors by name (a ``KeyError`` names a missing one)."""
        return cls(**{s: tensors[ref.name(s)] for s in ref.specs()})


# bits per element of the safetensors dtypes that checkpoint_tensors reports
DTYPE_BITS = {"F64": 64, "F32": 32, "I64": 64, "I32": 32, "F16": 16, "BF16": 16, "I16": 16, "U16": 16, "I8": 8,
              "U8": 8, "BOOL": 8}


def checkpoint_tensors(path: str | Path) -> dict[str, tuple[str, tuple[int, ...], str]]:
    """``name -> (file, shape, dtype)`` from the safetensors headers of a checkpoint directory."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    files = sorted(p for p in path.glob("*.safetensors"))
    if not files:
        raise FormatError(f"no *.safetensors files in {path}")
    out = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as h:
                for name in h.keys():
                    sl = h.get_slice(name)
                    out[name] = (f.name, tuple(sl.get_shape()), sl.get_dtype())
        except (SafetensorError, OSError) as e:
            raise FormatError(f"{f}: not a readable safetensors file ({e}); it may be truncated or "
                              "still being copied") from None
    return out


_ST_DTYPES = {torch.int32: "I32", torch.float16: "F16"}


def expected_matrices(model_config: dict, cfg: KBVQConfig) -> list[MatrixRef]:
    """Every quantized matrix a checkpoint with this config holds."""
    try:
        geom = MoEGeometry.from_config(model_config, "config.json", ARCHS[cfg.arch])
    except ModelConfigError as e:
        raise FormatError(str(e)) from None
    return [ref for layer in cfg.layers for ref in layer_matrices(geom, cfg, layer)]


def _check_tensor(path: Path, have: dict, ref: MatrixRef, suffix: str, shape, dtype) -> None:
    name = ref.name(suffix)
    if name not in have:
        raise FormatError(f"{path}: tensor {name} is missing")
    file, got_shape, got_dtype = have[name]
    if got_shape != shape:
        w = ref.width
        hint = ""
        if suffix == "vq_codebook":
            hint = f" (bits={w.bits}, vector_dim={w.vector_dim} need {w.codebook_size} codewords of length {w.vector_dim})"
        elif suffix == "vq_codes":
            hint = f" (bits={w.bits}, vector_dim={w.vector_dim} give {w.index_bits}-bit indices)"
        raise FormatError(f"{path / file}: tensor {name} has shape {list(got_shape)}, expected {list(shape)}{hint}")
    if got_dtype != _ST_DTYPES[dtype]:
        raise FormatError(f"{path / file}: tensor {name} has dtype {got_dtype}, expected {_ST_DTYPES[dtype]}")


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
    model_config = load_json(path / "config.json")
    have = checkpoint_tensors(path)
    try:
        expected = expected_matrices(model_config, cfg)
    except FormatError as e:
        raise FormatError(f"{path / 'config.json'}: {str(e).removeprefix('config.json: ')}") from None
    for ref in expected:
        for suffix, (shape, dtype) in ref.specs().items():
            _check_tensor(path, have, ref, suffix, shape, dtype)
    arch = ARCHS[cfg.arch]
    for layer in cfg.layers:
        stale = arch.expert_tensor(layer, 0, "gate", "weight")
        if stale in have:
            raise FormatError(f"{path / have[stale][0]}: {stale} is unquantized, but layer {layer} is listed as KBVQ")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = load_json(index)
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise FormatError(f"{index} has no \"weight_map\" object of tensor names to file names")
        for name, file in weight_map.items():
            if name not in have or have[name][0] != file:
                raise FormatError(f"{index}: names {name} in {file}, which does not hold it")
    return cfg
