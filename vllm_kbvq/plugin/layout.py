"""Runtime layout of KBVQ matrices on one tensor-parallel rank, and the loaders that fill it.

The checkpoint stores each matrix on its own (packed codes, codebook, ``A``,
``B``, affine). At run time a layer may fuse several matrices into one output
(vLLM's ``gate_up_proj`` of a shared expert, the ``w13`` of routed experts), and
tensor parallelism cuts rows (column-parallel) or the input (row-parallel).
This module is the one place that maps one to the other; it is pure torch so
the tensor-parallel arithmetic is testable without vLLM.

Loading has vLLM's two phases. :func:`load_tensor` copies each checkpoint tensor,
in its own dtype, into a parameter of :meth:`GroupLayout.load_shapes`: the codes
stay packed, this rank's rows only, each row whole (the rows of the packed bit
stream are independent, but an input window need not start on a word). After
all are loaded, :func:`process_codes` unpacks the codes and cuts the input window,
which gives the runtime tensors of :meth:`GroupLayout.shapes`.

Per matrix group on one rank, with ``S`` fused shards of ``rows_s`` rows each:

============  ===========================  =================================================
tensor        shape                        content
============  ===========================  =================================================
``idx``       [rows, in/d] uint8|int16     codeword of every vector (int32 above 15 bits)
``codebook``  [S, K, d] float16            the shards' codebooks, stacked
``lr_a``      [rows, sum(k_s)] float16     block diagonal: shard s uses columns of its k_s
``lr_b``      [sum(k_s), in] float16       the shards' bases, stacked (one ``B·x`` for all)
``affine_s``  [rows] float16               channel scale (applied as ``1 + s``)
``affine_b``  [rows] float16               channel shift; zero on ranks > 0 when the input
                                           is split, so the all-reduce adds it once
============  ===========================  =================================================

Indices are kept unpacked in the narrowest integer type, so the torch path
gathers directly; for 2-bit ``d=4`` and 4-bit ``d=2`` (8-bit indices) that is as
small as the packed form, for 3-bit ``d=4`` (12-bit) a third larger.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..format import SUFFIXES, FormatError, KBVQConfig, Width, tensor_specs
from ..kernels.cpu_moe import cpu_layout
from ..packing import unpack_codes

__all__ = ["GroupLayout", "Bank", "load_tensor", "process_codes", "moe_layouts", "moe_banks", "shared_layout"]


@dataclass(frozen=True)
class GroupLayout:
    """One fused group of KBVQ matrices as held by one rank.

    ``rows`` are the full (unsharded) output sizes of the fused matrices, ``in_features``
    the full input size; ``split_out`` / ``split_in`` say which of them tensor
    parallelism divides by ``tp_size``.
    """

    width: Width
    rows: tuple[int, ...]
    in_features: int
    ranks: tuple[int, ...]
    tp_rank: int = 0
    tp_size: int = 1
    split_out: bool = False
    split_in: bool = False

    def __post_init__(self):
        d = self.width.vector_dim
        for full in (*self.rows, self.in_features):
            if full % self.tp_size:
                raise FormatError(f"size {full} is not divisible by tensor-parallel size {self.tp_size}")
        if self.local_in % d:
            raise FormatError(
                f"input size {self.in_features} split {self.tp_size} ways gives {self.local_in} per rank, "
                f"not a multiple of vector_dim {d}: use a smaller tensor-parallel size"
            )
        if len(self.ranks) != len(self.rows):
            raise ValueError("one rank per fused matrix")

    # -- sizes on this rank ---------------------------------------------------------------
    @property
    def local_rows(self) -> tuple[int, ...]:
        return tuple(r // self.tp_size for r in self.rows) if self.split_out else self.rows

    @property
    def local_in(self) -> int:
        return self.in_features // self.tp_size if self.split_in else self.in_features

    @property
    def index_dtype(self) -> torch.dtype:
        bits = self.width.index_bits
        return torch.uint8 if bits <= 8 else torch.int16 if bits <= 15 else torch.int32

    @property
    def rank_total(self) -> int:
        return sum(self.ranks)

    def shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """The runtime tensors, what the kernels take."""
        rows, k = sum(self.local_rows), self.rank_total
        out = {
            "vq_codes": ((rows, self.local_in // self.width.vector_dim), self.index_dtype),
            "vq_codebook": ((len(self.rows), self.width.codebook_size, self.width.vector_dim), torch.float16),
            "affine_s": ((rows,), torch.float16),
            "affine_b": ((rows,), torch.float16),
        }
        if k:
            out["lr_a"] = ((rows, k), torch.float16)
            out["lr_b"] = ((k, self.local_in), torch.float16)
        return out

    def load_shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """The tensors as :func:`load_tensor` fills them: :meth:`shapes`, but the codes packed in the
        checkpoint's dtype, whole rows (every input) of this rank's rows."""
        out = self.shapes()
        out["vq_codes"] = tensor_specs(sum(self.local_rows), self.in_features, self.width, 0, False)["vq_codes"]
        return out

    # -- slicing ------------------------------------------------------------------------------
    def _row_window(self, shard: int) -> tuple[int, int, int]:
        """(start in the runtime rows, start in the checkpoint rows, length) of ``shard``."""
        local = self.local_rows
        start = sum(local[:shard])
        src = self.tp_rank * local[shard] if self.split_out else 0
        return start, src, local[shard]

    def _in_window(self) -> tuple[int, int]:
        return (self.tp_rank * self.local_in if self.split_in else 0), self.local_in


def _expect(name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise FormatError(f"tensor {name} has shape {list(tensor.shape)}, expected {list(shape)}")


def _checkpoint_spec(layout: GroupLayout, suffix: str, shard: int, name: str):
    """Shape and dtype the checkpoint holds for ``suffix`` of matrix ``shard`` (see :mod:`vllm_kbvq.format`)."""
    if suffix not in SUFFIXES:
        raise FormatError(f"tensor {name}: unknown KBVQ suffix {suffix!r}")
    specs = tensor_specs(layout.rows[shard], layout.in_features, layout.width, layout.ranks[shard], owns_basis=True)
    if suffix not in specs:
        raise FormatError(f"tensor {name} is unexpected: its matrix has rank 0 (no low-rank factors)")
    return specs[suffix]


def load_tensor(dst: torch.Tensor, suffix: str, loaded: torch.Tensor, shard: int, layout: GroupLayout,
                name: str = "") -> None:
    """Copy this rank's part of one checkpoint tensor (matrix ``shard`` of the group) into ``dst``,
    a tensor of :meth:`GroupLayout.load_shapes`; the codes stay packed until :func:`process_codes`.

    ``name`` is the checkpoint tensor's name, used in errors.
    """
    name = name or suffix
    shape, dtype = _checkpoint_spec(layout, suffix, shard, name)
    if loaded.dtype != dtype:
        raise FormatError(f"tensor {name} has dtype {loaded.dtype}, expected {dtype}")
    _expect(name, loaded, shape)
    row0, src_row0, nrows = layout._row_window(shard)
    in0, nin = layout._in_window()
    k_off, k = sum(layout.ranks[:shard]), layout.ranks[shard]
    if suffix == "vq_codebook":
        dst[shard].copy_(loaded)
    elif suffix == "lr_a":
        dst[row0:row0 + nrows, k_off:k_off + k].copy_(loaded[src_row0:src_row0 + nrows])
    elif suffix == "lr_b":
        dst[k_off:k_off + k].copy_(loaded[:, in0:in0 + nin])
    else:  # per row: vq_codes (whole packed rows), affine_s, affine_b
        part = loaded[src_row0:src_row0 + nrows]
        if suffix == "affine_b" and layout.split_in and layout.tp_rank > 0:
            part = torch.zeros_like(part)  # the partial sums are all-reduced: add the shift once
        dst[row0:row0 + nrows].copy_(part)


def process_codes(packed: torch.Tensor, layout: GroupLayout, cpu_kernels: bool = False) -> torch.Tensor:
    """The runtime indices (``vq_codes`` of :meth:`GroupLayout.shapes`) from the loaded packed codes
    (of :meth:`GroupLayout.load_shapes`), each with the same leading (expert) dimensions; with
    ``cpu_kernels``, re-laid out for them (:func:`vllm_kbvq.kernels.cpu_moe.cpu_layout`).

    Unpacks one matrix at a time, so the int64 intermediate stays one expert's size.
    """
    (rows, words), packed_dtype = layout.load_shapes()["vq_codes"]
    shape, dtype = layout.shapes()["vq_codes"]
    if packed.dim() < 2 or tuple(packed.shape[-2:]) != (rows, words) or packed.dtype != packed_dtype:
        raise ValueError(f"packed vq_codes are {packed.dtype} {list(packed.shape)}, expected {packed_dtype} "
                         f"[..., {rows}, {words}] (of GroupLayout.load_shapes)")
    lead, d = packed.shape[:-2], layout.width.vector_dim
    in0, nin = layout._in_window()
    out = torch.empty((*lead, *shape), dtype=dtype, device=packed.device)
    for src, dst in zip(packed.reshape(-1, rows, words), out.view(-1, *shape)):
        dst.copy_(unpack_codes(src, layout.width.index_bits, layout.in_features // d)[:, in0 // d:(in0 + nin) // d])
    return cpu_layout(out, len(layout.rows)) if cpu_kernels else out


def moe_layouts(cfg: KBVQConfig, hidden: int, inter: int, tp_rank: int = 0, tp_size: int = 1,
                w13: Width | None = None, w2: Width | None = None) -> dict[str, GroupLayout]:
    """Routed experts: ``w13`` (gate and up fused, rows split) and ``w2`` (down, input split), of the
    widths given (default: the config's)."""
    k = cfg.rank.get("experts", {})
    return {
        "w13": GroupLayout(w13 or cfg.default_width, (inter, inter), hidden, (k.get("gate", 0), k.get("up", 0)),
                           tp_rank, tp_size, split_out=True),
        "w2": GroupLayout(w2 or cfg.default_width, (hidden,), inter, (k.get("down", 0),), tp_rank, tp_size,
                          split_in=True),
    }


@dataclass(frozen=True)
class Bank:
    """The routed experts of one layer that share a width pair (gate/up, down), in one set of stacked tensors:
    ``experts`` are their global ids, in slot order. A uniform checkpoint has one bank of every expert."""

    experts: tuple[int, ...]
    layouts: dict[str, GroupLayout]

    def slot_map(self, n_experts: int, local: list[int] | None = None) -> torch.Tensor:
        """Global expert id -> slot in this bank, -1 for the experts of other banks (the ops skip them).
        ``local``: the experts this rank holds (expert parallelism), the others mapped to -1 too."""
        out = torch.full((n_experts,), -1, dtype=torch.int32)
        held = self.held(local)
        out[list(held)] = torch.arange(len(held), dtype=torch.int32)
        return out

    def held(self, local: list[int] | None = None) -> tuple[int, ...]:
        """The bank's experts held on this rank, in slot order."""
        if local is None:
            return self.experts
        keep = set(local)
        return tuple(e for e in self.experts if e in keep)


def moe_banks(cfg: KBVQConfig, layer: int, n_experts: int, hidden: int, inter: int, tp_rank: int = 0,
              tp_size: int = 1) -> list[Bank]:
    """The layer's routed experts grouped by width pair, narrowest first (one bank when all share a width)."""
    pairs: dict[tuple[Width, Width], list[int]] = {}
    for e in range(n_experts):
        key = (cfg.width(layer, "experts", "gate", e), cfg.width(layer, "experts", "down", e))
        pairs.setdefault(key, []).append(e)
    return [Bank(tuple(experts), moe_layouts(cfg, hidden, inter, tp_rank, tp_size, *key))
            for key, experts in sorted(pairs.items())]


def shared_layout(cfg: KBVQConfig, layer: int, wtypes: tuple[str, ...], rows: tuple[int, ...], in_features: int,
                  tp_rank: int = 0, tp_size: int = 1, split_out: bool = False, split_in: bool = False) -> GroupLayout:
    """A shared expert's linear holding ``wtypes`` (``("gate", "up")`` when fused)."""
    k = cfg.rank.get("shared_experts", {})
    widths = {cfg.width(layer, "shared_experts", w, 0) for w in wtypes}
    if len(widths) != 1:
        raise FormatError(f"layer {layer}: the shared expert's {wtypes} have different widths, but are fused")
    return GroupLayout(widths.pop(), rows, in_features, tuple(k.get(w, 0) for w in wtypes), tp_rank, tp_size,
                       split_out=split_out, split_in=split_in)
