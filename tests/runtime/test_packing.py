import pytest
import torch

from vllm_kbvq.packing import pack_codes, packed_words, unpack_codes


@pytest.mark.parametrize("nbits", [1, 2, 3, 4, 5, 7, 8, 12, 16])
@pytest.mark.parametrize("n", [1, 7, 32, 33, 144])
def test_round_trip(nbits, n):
    codes = torch.randint(0, 1 << nbits, (3, 5, n), generator=torch.Generator().manual_seed(nbits * 100 + n))
    packed = pack_codes(codes, nbits)
    assert packed.dtype == torch.int32 and packed.shape == (3, 5, packed_words(n, nbits))
    assert torch.equal(unpack_codes(packed, nbits, n), codes)


def test_bit_layout_is_little_endian_stream():
    # Independent oracle: build the bit string by hand.
    codes = torch.tensor([[0xABC, 0x123, 0xFFF]])
    bits = "".join(format(int(c), "012b")[::-1] for c in codes[0])  # LSB first
    bits = bits.ljust(64, "0")
    words = [int(bits[i : i + 32][::-1], 2) for i in (0, 32)]
    words = [w - (1 << 32) if w >= 1 << 31 else w for w in words]
    assert pack_codes(codes, 12).tolist() == [words]


def test_row_slices_are_independent():
    codes = torch.randint(0, 4096, (6, 64))
    packed = pack_codes(codes, 12)
    # 32 codes of 12 bits are exactly 12 words: an input-dim split at 32 codes is a word split.
    assert torch.equal(pack_codes(codes[:, 32:], 12), packed[:, 12:])


def test_out_of_range_rejected():
    with pytest.raises(ValueError, match="out of range"):
        pack_codes(torch.tensor([[4]]), 2)
    with pytest.raises(ValueError, match="expected"):
        unpack_codes(torch.zeros(1, 3, dtype=torch.int32), 8, 4)
