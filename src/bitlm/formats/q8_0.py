"""q8_0: llama.cpp's 8-bit block format (GGML type 8), here the element type of the KV cache `--kv q8_0`:
a row of head_dim keys or values as blocks of 32, each an f16 scale d and 32 int8 codes q, value d * q.
34 bytes per 32 values (8.5 bits a value): 0.53 of the f16 cache's bytes, which decode at long context
reads for every token.

Quantization (per block, as llama.cpp's quantize_row_q8_0_ref): amax = max |x|, d = amax / 127 (float32),
q = roundf(x * (1 / d)) (round half away from zero; q = 0 when d = 0), then d stored as f16 (round to
nearest even). A row whose length is not a multiple of 32 gets a last block padded with zeros (llama.cpp
asks head_dim % 32 == 0; padding lets every head_dim use the type).

Layout of one block, 34 bytes, little-endian:

    byte   0    1    2    3    4   ...   33
         [ d (f16)  | q0 | q1 | q2 | ... | q31 ]       value i = float(d) * q_i

and a row of n values is ceil(n / 32) blocks one after another (head_dim 128: 4 blocks, 136 bytes).

Worked example: x = [1.0, -0.5, 0.25, 0, ..., 0] (32 values): amax = 1, d = 1/127 = 0.007874016,
1/d = 127.0, q = [127, -64 (-63.5 rounds away from zero), 32 (31.75), 0, ...]; d as f16 is 0x2008
(0.0078735...), so the bytes are 08 20 7f c0 20 00 ... 00 and the values read back are
[0.99993896, -0.50390625, 0.25195312, 0, ...].
"""

from __future__ import annotations

import numpy as np

BLOCK = 32
BLOCK_BYTES = 34


def row_bytes(n: int) -> int:
    """Bytes of one row of n values."""
    return -(-n // BLOCK) * BLOCK_BYTES


def quantize(x: np.ndarray) -> np.ndarray:
    """float32 [..., n] -> uint8 [..., row_bytes(n)], bit-exact with the C store (kvops.c bn_q8_0_row)."""
    x = np.asarray(x, dtype=np.float32)
    n = x.shape[-1]
    nb = -(-n // BLOCK)
    blocks = np.zeros((*x.shape[:-1], nb * BLOCK), np.float32)
    blocks[..., :n] = x
    blocks = blocks.reshape(*x.shape[:-1], nb, BLOCK)
    amax = np.abs(blocks).max(axis=-1)
    d = (amax / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    y = (blocks * inv[..., None]).astype(np.float32)
    # roundf: half away from zero; |y| <= 127 so |y| + 0.5 is exact in float64
    q = (np.sign(y) * np.floor(np.abs(y).astype(np.float64) + 0.5)).astype(np.int8)
    out = np.empty((*x.shape[:-1], nb, BLOCK_BYTES), np.uint8)
    out[..., :2] = d.astype("<f2")[..., None].view(np.uint8)
    out[..., 2:] = q.view(np.uint8)
    return out.reshape(*x.shape[:-1], nb * BLOCK_BYTES)


def dequantize(data: np.ndarray, n: int) -> np.ndarray:
    """uint8 [..., row_bytes(n)] -> float32 [..., n]: d * q, the values attention computes with."""
    data = np.asarray(data, dtype=np.uint8)
    if data.shape[-1] != row_bytes(n):
        raise ValueError(f"q8_0.dequantize: rows of {data.shape[-1]} bytes do not hold {n} values "
                         f"({row_bytes(n)} bytes)")
    b = np.ascontiguousarray(data).reshape(*data.shape[:-1], -1, BLOCK_BYTES)
    d = np.ascontiguousarray(b[..., :2]).view("<f2").astype(np.float32)
    q = np.ascontiguousarray(b[..., 2:]).view(np.int8).astype(np.float32)
    return (d * q).reshape(*data.shape[:-1], -1)[..., :n]
