"""q8_0 (the 8-bit KV cache's rows): bitlm's numpy reference against gguf-py's Q8_0 quantizer and
dequantizer (llama.cpp's reference, ported), the worked example of formats/q8_0.py byte for byte, and the
zero padding of a short last block. The C store is held to this reference in tests/engine/test_native.py."""

import numpy as np
import pytest

from bitlm.formats import ggml_blocks, q8_0

gguf = pytest.importorskip("gguf")


def rows(seed=0, shape=(16, 128)):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * rng.uniform(0.01, 30, (shape[0], 1))).astype(np.float32)
    if shape[1] >= 32:
        x[3, :32] = 0  # an all-zero block: d = 0, q = 0
        x[4, :32] = np.arange(-16, 16) + 0.5  # d = 1 (amax 127 below): halves, roundf's ties away from zero
        x[4, 31] = 127
    return x


def test_bytes_equal_gguf_quantize_and_read_back_by_gguf():
    x = rows()
    ours = q8_0.quantize(x)
    assert ours.shape == (16, q8_0.row_bytes(128)) == (16, 136)
    theirs = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0)
    assert np.array_equal(ours, theirs)
    back = gguf.quants.dequantize(ours, gguf.GGMLQuantizationType.Q8_0)
    assert np.array_equal(q8_0.dequantize(ours, 128), back)
    assert np.array_equal(ggml_blocks.q8_0_values(ours).reshape(16, 128), back)
    d = np.repeat(ours.reshape(16, 4, 34)[:, :, :2].copy().view("<f2").astype(np.float32), 32, axis=2).reshape(16, 128)
    assert (np.abs(back - x) <= 0.5 * d + 1e-3 * np.abs(x) + 1e-30).all()  # half a step (d rounded to f16)
    assert not back[3, :32].any()


def test_worked_example():
    x = np.zeros(32, np.float32)
    x[:3] = [1.0, -0.5, 0.25]
    b = q8_0.quantize(x)
    assert bytes(b[:6]) == bytes.fromhex("08207fc02000") and not b[6:].any()
    assert np.array_equal(q8_0.dequantize(b, 32)[:3], np.array([0.99993896, -0.50390625, 0.25195312], np.float32))


@pytest.mark.parametrize("n", [6, 16, 48])
def test_a_short_last_block_is_zero_padded(n):
    x = rows(1, (5, n))
    padded = np.zeros((5, -(-n // 32) * 32), np.float32)
    padded[:, :n] = x
    assert q8_0.row_bytes(n) == -(-n // 32) * 34
    assert np.array_equal(q8_0.quantize(x), q8_0.quantize(padded))
    back = q8_0.dequantize(q8_0.quantize(padded), padded.shape[1])[:, :n]
    assert np.array_equal(q8_0.dequantize(q8_0.quantize(x), n), back)
    with pytest.raises(ValueError, match="bytes do not hold"):
        q8_0.dequantize(q8_0.quantize(x), n + 32)
