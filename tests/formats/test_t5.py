"""T5 packed layout (1.6 bits): golden bytes from the worked example, every byte's digits, round trips."""

import itertools

import numpy as np
import pytest

from bitlm.formats import hf_packed, i2v, t5


def test_worked_example_golden_bytes():
    # the example drawn in t5's docstring: w = [+1, -1, 0, +1, -1]
    packed = t5.pack(np.array([[1, -1, 0, 1, -1]], dtype=np.int8))
    assert packed.shape == (1, 1, 64) and packed.dtype == np.uint8
    assert list(packed[0, 0, :4]) == [0xB9, 0x2B, 0x80, 0xD5]
    assert (packed[0, 0, 4:] == 0x80).all()


def test_every_digit_tuple_decodes_by_the_multiply_steps():
    # all 243 tuples: distinct bytes, and (3y) >> 8 on y_{j+1} = 3 y_j mod 256 gives each digit back;
    # checked here by plain integer arithmetic, independent of decode_digits
    for t in itertools.product(range(3), repeat=5):
        v = sum(d * 3 ** (4 - j) for j, d in enumerate(t))
        q = -(-256 * v // 243)
        assert int(t5.encode_digits(np.array(t))) == q
        y, got = q, []
        for _ in range(5):
            got.append(3 * y // 256)
            y = 3 * y % 256
        assert tuple(got) == t
        # the comparisons the SIMD kernels use instead of the shift
        y = q
        for d in t:
            assert d == (y >= 86) + (y >= 171)
            y = 3 * y % 256


def test_golden_bytes_second_row_block_and_column_block():
    # one +1 at row 17 (block 1, r 1), column 27 (block 1, column 7 = 4 j + i with j 1, i 3): byte
    # 4 * 1 + 3 = 7 of block (1, 1) holds digits 1, 2, 1, 1, 1 -> v = 81 + 54 + 13 = 148 -> q = 156
    w = np.zeros((18, 28), dtype=np.int8)
    w[17, 27] = 1
    packed = t5.pack(w)
    expect = np.full((2, 2, 64), 0x80, dtype=np.uint8)
    expect[1, 1, 7] = 156
    np.testing.assert_array_equal(packed, expect)


@pytest.mark.parametrize("n,k", [(1, 1), (16, 20), (17, 31), (5, 2560), (640, 60), (33, 100), (3, 6912)])
def test_round_trip(n, k):
    rng = np.random.default_rng(n * 1000 + k)
    w = rng.integers(-1, 2, size=(n, k), dtype=np.int8)
    packed = t5.pack(w)
    assert packed.shape == t5.packed_shape(n, k)
    np.testing.assert_array_equal(t5.unpack(packed, n, k), w)
    full = t5.unpack_codes(packed, n, k, padded=True)
    assert (full[n:] == 1).all() and (full[:, k:] == 1).all()


def test_bits_per_weight():
    # 2B4T shapes: 1.6 bits per weight (K = 6912 pads to 6920: 0.1%) against I2V's 2
    for n, k in [(2560, 2560), (6912, 2560), (2560, 6912)]:
        assert t5.pack(np.zeros((n, k), np.int8)).size * 8 / (n * k) <= 1.61
        assert np.prod(i2v.packed_shape(n, k)) * 8 / (n * k) == 2


def test_from_hf_packed_matches_i2v_codes():
    rng = np.random.default_rng(3)
    w = rng.integers(-1, 2, size=(37, 45), dtype=np.int8)
    hf = hf_packed.pack(w)
    np.testing.assert_array_equal(t5.unpack(t5.from_hf_packed(hf, 37), 37, 45), w)


def test_bad_input():
    with pytest.raises(ValueError, match="ternary"):
        t5.pack(np.array([[2]]))
    with pytest.raises(ValueError, match="does not match"):
        t5.unpack(np.zeros((1, 2, 64), np.uint8), 16, 20)
