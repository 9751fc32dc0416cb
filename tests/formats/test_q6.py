"""Q6 rows: golden bytes from the worked example, round trips, the quantizer's bounds."""

import numpy as np
import pytest

from bitlm.formats import q6


def test_worked_example_golden_bytes():
    q = np.zeros((1, 64), dtype=np.int8)
    q[0, :5] = [1, -1, 0, 31, -31]
    packed = q6.pack(q)
    assert packed.shape == (1, 48)
    assert packed[0, :6].tobytes().hex() == "e107fe010882"
    assert packed[0, 6:].tobytes().hex() == "200882" * 14


def test_bit_formula():
    # column 64g + 8L + j: bits 6j..6j+5 of bytes 6L..6L+5 of group g, little-endian, code q + 32
    rng = np.random.default_rng(1)
    q = rng.integers(-31, 32, size=(3, 200), dtype=np.int8)
    packed = q6.pack(q)
    for v, col in [(0, 0), (1, 63), (2, 64), (0, 199), (2, 137)]:
        g, rest = divmod(col, 64)
        L, j = divmod(rest, 8)
        piece = int.from_bytes(packed[v, g * 48 + 6 * L: g * 48 + 6 * L + 6].tobytes(), "little")
        assert (piece >> (6 * j)) & 63 == q[v, col] + 32


@pytest.mark.parametrize("v,h", [(1, 1), (3, 64), (5, 100), (17, 2560), (2, 129)])
def test_round_trip(v, h):
    q = np.random.default_rng(v * h).integers(-31, 32, size=(v, h), dtype=np.int8)
    packed = q6.pack(q)
    assert packed.shape == (v, q6.padded_cols(h) // 64 * 48)
    np.testing.assert_array_equal(q6.unpack(packed, h), q)


def test_quantize_bounds_and_error():
    e = np.random.default_rng(0).standard_normal((50, 300)).astype(np.float32)
    q, scale = q6.quantize(e)
    assert q.min() >= -31 and q.max() <= 31
    assert (np.abs(q).max(axis=1) == 31).all()  # the absmax of each row maps to +-31
    assert np.abs(q * scale[:, None] - e).max() <= scale.max() / 2 * (1 + 1e-6)


def test_rejects_out_of_range():
    with pytest.raises(ValueError):
        q6.pack(np.array([[32]]))
