"""I2_S (bitnet.cpp): the worked example of formats/i2s.py byte for byte, and the layout against a
direct transcription of its rule (weight j of a block -> byte j % 32, shift 6 - 2 * (j // 32))."""

import numpy as np
import pytest

from bitlm.errors import BitlmError
from bitlm.formats import i2s


def test_worked_example_bytes():
    w = np.zeros(128, np.int8)
    w[0], w[32], w[64], w[127] = 1, -1, 1, -1
    data = i2s.pack(w, 0.5)
    assert data.size == 32 + 32
    assert data[0] == 0x89 and data[31] == 0x54
    assert (data[1:31] == 0x55).all()
    assert bytes(data[32:36]) == b"\x00\x00\x00\x3f" and not data[36:].any()
    back, scale = i2s.unpack(data, (1, 128))
    assert np.array_equal(back[0], w) and scale == np.float32(0.5)


def test_layout_rule_on_random_tensor():
    rng = np.random.default_rng(0)
    w = rng.integers(-1, 2, size=(3, 256)).astype(np.int8)
    data = i2s.pack(w, 1.25)
    flat = w.reshape(-1)
    for i in range(flat.size // 128):  # the rule, element by element
        for j in range(128):
            byte = data[i * 32 + j % 32]
            assert (byte >> (6 - 2 * (j // 32))) & 3 == flat[i * 128 + j] + 1
    assert data[flat.size // 4: flat.size // 4 + 4].view("<f4")[0] == np.float32(1.25)
    back, scale = i2s.unpack(data, w.shape)
    assert np.array_equal(back, w) and scale == np.float32(1.25)


def test_refuses_bad_input():
    with pytest.raises(BitlmError, match="multiple of 128"):
        i2s.pack(np.zeros(64, np.int8), 1.0)
    with pytest.raises(BitlmError, match="ternary"):
        i2s.pack(np.full(128, 2, np.int8), 1.0)
    data = i2s.pack(np.zeros(128, np.int8), 1.0)
    with pytest.raises(BitlmError, match="cannot hold"):
        i2s.unpack(data[:-1], (128,))
    data[5] = 0xFF
    with pytest.raises(BitlmError, match="code 3"):
        i2s.unpack(data, (128,))
