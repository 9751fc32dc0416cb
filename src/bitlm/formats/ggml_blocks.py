"""Readers of llama.cpp's block formats that a bitnet GGUF holds besides I2_S (formats/i2s.py) and
Q6_K (formats/q6_k.py), in numpy, so that reading a GGUF needs no gguf package. Writing uses gguf-py's
quantizers (io/gguf.py); tests hold these readers to gguf-py's dequantizers.

TQ2_0 (type 35), 256 weights in 66 bytes:  qs[64], d (float16).
    Weight j = 128h + 32s + l (half h, shift s, lane l) is the 2-bit code (qs[32h + l] >> 2s) & 3,
    value code - 1, times d. Example: qs[0] = 0b00_01_10_10 -> weights 0, 32, 64, 96 are
    +1, +1, 0, -1 (codes 2, 2, 1, 0, from the low bits up).

TQ1_0 (type 34), 256 weights in 54 bytes:  qs[48], qh[4], d (float16).
    Five trits per byte as a base-3 fraction: a byte b holds t0..t4 (each in 0..2) as
    b = ceil((t0*81 + t1*27 + t2*9 + t3*3 + t4) * 256 / 243), so that multiplying by 3^k (mod 256)
    brings trit k to the top and (b * 3) >> 8 reads it. qs[0..31] hold weights 0..159 (trit k of
    byte l is weight 32k + l), qs[32..47] weights 160..239 (16k + l), qh[0..3] weights 240..255 with
    four trits each (4k + l). Value = trit - 1, times d.

Q8_0 (type 8), 32 weights in 34 bytes:  d (float16), qs[32] int8; value = d * qs.
"""

from __future__ import annotations

import numpy as np

QK_K = 256
TQ1_0, TQ2_0, Q8_0 = 34, 35, 8
BLOCK = {TQ1_0: (256, 54), TQ2_0: (256, 66), Q8_0: (32, 34)}  # weights, bytes


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view("<f2").astype(np.float32)


def tq2_0_trits(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int8 values in {-1, 0, 1} [blocks, 256], float32 d [blocks]) of TQ2_0 bytes."""
    b = np.asarray(data, np.uint8).reshape(-1, 66)
    qs = b[:, :64].reshape(-1, 2, 1, 32)
    c = (qs >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3  # [blocks, half, shift, lane]
    return c.reshape(-1, QK_K).astype(np.int8) - 1, _f16(b[:, 64:66])[:, 0]


def tq1_0_trits(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int8 values in {-1, 0, 1} [blocks, 256], float32 d [blocks]) of TQ1_0 bytes."""
    b = np.asarray(data, np.uint8).reshape(-1, 54)
    pow3 = np.array([1, 3, 9, 27, 81], np.uint8)

    def trits(bytes_, k):  # [blocks, k, lanes]: byte * 3^k (mod 256), top trit
        shifted = bytes_[:, None, :] * pow3[:k].reshape(1, k, 1)  # uint8 arithmetic wraps mod 256
        return ((shifted.astype(np.uint16) * 3) >> 8).reshape(len(b), -1)

    t = np.concatenate([trits(b[:, :32], 5), trits(b[:, 32:48], 5), trits(b[:, 48:52], 4)], axis=1)
    return t.astype(np.int8) - 1, _f16(b[:, 52:54])[:, 0]


def q8_0_values(data: np.ndarray) -> np.ndarray:
    """float32 values [blocks * 32] of Q8_0 bytes."""
    b = np.asarray(data, np.uint8).reshape(-1, 34)
    return (_f16(b[:, :2]) * np.ascontiguousarray(b[:, 2:]).view(np.int8).astype(np.float32)).reshape(-1)
