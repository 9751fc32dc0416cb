"""Q6_K: bitlm's quantizer read back by gguf-py's own dequantizer (the reference), plus the worked
example of formats/q6_k.py byte for byte."""

import numpy as np
import pytest

from bitlm.formats import q6_k

gguf = pytest.importorskip("gguf")


def test_gguf_dequantize_reads_our_bytes():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((8, 512)) * rng.uniform(0.01, 3, (8, 1))).astype(np.float32)
    x[3, :256] = 0  # an all-zero block
    data = q6_k.quantize(x)
    assert data.shape == (8, 2 * 210)
    theirs = gguf.quants.dequantize(data, gguf.GGMLQuantizationType.Q6_K)
    codes, sc, d = q6_k.quantize_codes(x)
    expect = (d.astype(np.float32)[:, None, None] * sc[:, :, None].astype(np.float32)
              * (codes.reshape(-1, 16, 16).astype(np.float32) - 32)).reshape(x.shape)
    assert np.array_equal(theirs, expect)  # the layout: gguf decodes exactly our codes and scales
    assert np.array_equal(q6_k.dequantize(data, 512), theirs)  # bitlm's reader agrees
    step = np.repeat(np.abs(d.astype(np.float32)[:, None] * sc.astype(np.float32)), 16, axis=1).reshape(x.shape)
    err = np.abs(theirs - x)
    inside = np.abs(x) <= 31.5 * step  # not clipped to the code range (a group scale rounds to int8)
    assert (err[inside] <= step[inside] * 0.5 + 1e-6).all()  # within half a step of its group
    assert np.sqrt((err ** 2).mean() / (x ** 2).mean()) < 0.03
    assert not theirs[3, :256].any()


def test_worked_example_bytes():
    # a block whose groups all have scale 1 * d: values are codes - 32 times the step
    codes = np.full((1, 256), 32, np.uint8)
    codes[0, 0], codes[0, 64] = 63, 0
    data = q6_k.pack(codes, np.ones((1, 16), np.int8), np.array([1.0], np.float16))[0]
    assert data[0] == 0x0F and not data[1:128].any()
    assert data[128] == 0x8B and (data[129:192] == 0xAA).all()
    assert (data[192:208] == 1).all() and bytes(data[208:210]) == b"\x00\x3c"
    back = gguf.quants.dequantize(data.reshape(1, -1), gguf.GGMLQuantizationType.Q6_K)[0]
    assert back[0] == 31 and back[64] == -32 and not np.delete(back, [0, 64]).any()
