"""Bit-packing of VQ indices.

Each row's codes form one little-endian bit stream: code ``j`` occupies bits
``[j*nbits, (j+1)*nbits)``; the stream is stored in int32 words, the last one
zero-padded; a 12-bit code may straddle two words. This is the storage form only:
the runtimes unpack the codes once, at load, into the narrowest integer type
(:mod:`vllm_kbvq.plugin.layout`), and no kernel reads packed words. Rows stay
independent, so a tensor-parallel slice along the output dimension is a row
slice of the packed words.
"""
from __future__ import annotations

import torch

__all__ = ["packed_words", "pack_codes", "unpack_codes"]


def packed_words(n_codes: int, nbits: int) -> int:
    """int32 words needed for one row of ``n_codes`` codes of ``nbits`` bits."""
    return (n_codes * nbits + 31) // 32


def _check_nbits(nbits: int) -> None:
    if not 1 <= nbits <= 16:
        raise ValueError(f"index width must be 1..16 bits, got {nbits}")


def pack_codes(codes: torch.Tensor, nbits: int) -> torch.Tensor:
    """Pack integer codes ``[..., n]`` (values < 2**nbits) into int32 ``[..., words]``."""
    _check_nbits(nbits)
    codes = codes.to(torch.int64)
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= (1 << nbits)):
        raise ValueError(f"codes out of range for {nbits}-bit indices")
    *lead, n = codes.shape
    words = packed_words(n, nbits)
    flat = codes.reshape(-1, n)
    off = torch.arange(n, dtype=torch.int64) * nbits
    word, shift = off // 32, off % 32
    # Accumulate in int64 words (as unsigned 32-bit values); bit ranges never
    # overlap, so addition is the same as bitwise or.
    acc = torch.zeros(flat.shape[0], words + 1, dtype=torch.int64)
    lo = (flat << shift) & 0xFFFFFFFF
    hi = flat >> (32 - shift)  # bits that spill into the next word (0 when none)
    acc.scatter_add_(1, word.expand_as(flat), lo)
    acc.scatter_add_(1, (word + 1).expand_as(flat), hi)
    acc = acc[:, :words]
    acc = torch.where(acc >= 2**31, acc - 2**32, acc)  # reinterpret as signed int32
    return acc.to(torch.int32).reshape(*lead, words)


def unpack_codes(packed: torch.Tensor, nbits: int, n_codes: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`; returns int64 ``[..., n_codes]``."""
    _check_nbits(nbits)
    *lead, words = packed.shape
    if words != packed_words(n_codes, nbits):
        raise ValueError(
            f"packed rows have {words} words, expected {packed_words(n_codes, nbits)} "
            f"for {n_codes} codes of {nbits} bits"
        )
    flat = packed.reshape(-1, words).to(torch.int64) & 0xFFFFFFFF
    flat = torch.cat([flat, torch.zeros_like(flat[:, :1])], dim=1)
    off = torch.arange(n_codes, dtype=torch.int64, device=packed.device) * nbits
    word, shift = off // 32, off % 32
    lo = flat[:, word] >> shift
    hi = flat[:, word + 1] << (32 - shift)
    codes = (lo | hi) & ((1 << nbits) - 1)
    return codes.reshape(*lead, n_codes)
