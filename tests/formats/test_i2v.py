"""I2V packed layout: golden bytes from the worked example, round trips, the HF converter."""

import numpy as np
import pytest

from bitlm.formats import i2v


def test_worked_example_golden_bytes():
    # the example drawn in i2v's docstring: w = [+1, -1, 0, +1, -1]
    packed = i2v.pack(np.array([[1, -1, 0, 1, -1]], dtype=np.int8))
    assert packed.shape == (1, 1, 64)
    assert packed.dtype == np.uint8
    assert list(packed[0, 0, :4]) == [0x52, 0x54, 0x55, 0x56]
    assert (packed[0, 0, 4:] == 0x55).all()


def test_golden_bytes_second_row_block_and_column_block():
    # one non-padding code in row 17 (block 1, r 1), column 22 (block 1, s 1, j 2): byte 4*1+2 = 6
    # of block (1, 1) has code 2 at bits 3..2; every other code is a zero weight (code 1)
    w = np.zeros((18, 23), dtype=np.int8)
    w[17, 22] = 1
    packed = i2v.pack(w)
    assert packed.shape == (2, 2, 64)
    expect = np.full((2, 2, 64), 0x55, dtype=np.uint8)
    expect[1, 1, 6] = 0b01_01_10_01
    np.testing.assert_array_equal(packed, expect)


def test_bit_formula_matches_docstring():
    # byte b = 4r + j of block (rb, kb), bits 2s..2s+1 = code of (16rb + r, 16kb + 4s + j)
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 3, size=(32, 48), dtype=np.uint8)
    packed = i2v.pack(codes.astype(np.int8) - 1)
    for rb, kb, b, s in [(0, 0, 0, 0), (1, 2, 63, 3), (0, 1, 17, 2), (1, 0, 42, 1)]:
        r, j = divmod(b, 4)
        assert (packed[rb, kb, b] >> (2 * s)) & 3 == codes[16 * rb + r, 16 * kb + 4 * s + j]


@pytest.mark.parametrize("n,k", [(1, 1), (16, 16), (17, 31), (5, 2560), (640, 48), (33, 100)])
def test_round_trip(n, k):
    rng = np.random.default_rng(n * 1000 + k)
    w = rng.integers(-1, 2, size=(n, k), dtype=np.int8)
    packed = i2v.pack(w)
    assert packed.shape == i2v.packed_shape(n, k)
    np.testing.assert_array_equal(i2v.unpack(packed, n, k), w)
    np.testing.assert_array_equal(i2v.unpack_codes(packed, n, k), w + 1)


def test_padding_is_zero_weight():
    packed = i2v.pack(np.ones((3, 5), dtype=np.int8))
    full = i2v.unpack_codes(packed, 3, 5, padded=True)
    assert full.shape == (16, 16)
    assert (full[:3, :5] == 2).all()
    full[:3, :5] = i2v.PAD_CODE
    assert (full == i2v.PAD_CODE).all()


def test_rejects_non_ternary():
    with pytest.raises(ValueError, match="ternary"):
        i2v.pack(np.array([[0, 1, 2]], dtype=np.int8))


@pytest.mark.parametrize("out,k", [(8, 16), (6, 5), (2560, 64), (641, 37)])
def test_from_hf_packed(out, k):
    rng = np.random.default_rng(out + k)
    codes = rng.integers(0, 3, size=(out, k), dtype=np.uint8)
    # build the HF bytes by the stated rule, independently of formats/hf_packed
    q = -(-out // 4)
    hf = np.zeros((q, k), dtype=np.uint8)
    for row in range(out):
        i, r = divmod(row, q)
        hf[r] |= codes[row] << (2 * i)
    np.testing.assert_array_equal(i2v.from_hf_packed(hf, out), i2v.pack(codes.astype(np.int8) - 1))
