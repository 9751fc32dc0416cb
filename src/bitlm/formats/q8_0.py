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

Keys in tiles. The native runtime caches q8_0 *keys* (not values) in tiles of TILE = 16 keys, the same
bytes as the 16 rows, rearranged so that one 64-byte load holds 4 elements of 16 keys (lanes = keys): the
scores then run as integer dot products with no sums across a register's lanes (kernels/kvops.c). For
each q8_0 block b of the row, 16 x 34 = 544 bytes:

    bytes  0 ..  31   [ d of key 0 | d of key 1 | ... | d of key 15 ]             16 f16 scales
    bytes 32 ..  95   [ k0 q0..q3 | k1 q0..q3 | ... | k15 q0..q3 ]                group 0: elements 0..3
    bytes 96 .. 159   [ k0 q4..q7 | k1 q4..q7 | ... | k15 q4..q7 ]                group 1: elements 4..7
    ...
    bytes 480 .. 543  [ k0 q28..q31 | ... | k15 q28..q31 ]                        group 7

and the blocks of a tile one after another (head_dim 128: 4 x 544 = 2176 bytes = 16 rows of 136). Key j
of a cache sits in tile j // 16, lane j % 16; a tile starts where its first key's row would (the paged
pool's blocks hold whole tiles: block_size % 16 == 0).

The scores over such keys are llama.cpp's q8_0 dot: q is quantized to q8_0 too (this module's quantize),
each block's int8 dot is exact, and s = sum over blocks of isum_b * d_k,b * d_q,b * scale (kvops.c fixes
the float steps' order).
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


TILE = 16


def tile_keys(rows: np.ndarray) -> np.ndarray:
    """uint8 [..., n, row_bytes] q8_0 rows (quantize) -> the same bytes as tiles of TILE keys, n a multiple
    of TILE: the native cache's layout of q8_0 keys (module docstring)."""
    rows = np.asarray(rows, dtype=np.uint8)
    *lead, n, rb = rows.shape
    if n % TILE or rb % BLOCK_BYTES:
        raise ValueError(f"q8_0.tile_keys: {n} rows of {rb} bytes are not whole tiles of {TILE} rows of whole "
                         f"{BLOCK_BYTES}-byte blocks")
    b = rows.reshape(*lead, n // TILE, TILE, rb // BLOCK_BYTES, BLOCK_BYTES)
    b = np.moveaxis(b, -3, -2)  # [..., tiles, blocks, key, 34]
    d = b[..., :2]  # [..., tiles, blocks, key, 2]
    q = b[..., 2:].reshape(*b.shape[:-1], 8, 4)  # [..., tiles, blocks, key, group, 4]
    q = np.swapaxes(q, -3, -2)  # [..., tiles, blocks, group, key, 4]
    t = np.concatenate([d.reshape(*d.shape[:-2], 2 * TILE), q.reshape(*q.shape[:-3], 8 * TILE * 4)], axis=-1)
    return t.reshape(*lead, n, rb)


def untile_keys(tiles: np.ndarray) -> np.ndarray:
    """The inverse of tile_keys: tiles of TILE keys back to q8_0 rows."""
    tiles = np.asarray(tiles, dtype=np.uint8)
    *lead, n, rb = tiles.shape
    if n % TILE or rb % BLOCK_BYTES:
        raise ValueError(f"q8_0.untile_keys: {n} rows of {rb} bytes are not whole tiles of {TILE} rows")
    nb = rb // BLOCK_BYTES
    t = tiles.reshape(*lead, n // TILE, nb, TILE * BLOCK_BYTES)
    d = t[..., :2 * TILE].reshape(*t.shape[:-1], TILE, 2)
    q = np.swapaxes(t[..., 2 * TILE:].reshape(*t.shape[:-1], 8, TILE, 4), -3, -2)  # [..., key, group, 4]
    b = np.concatenate([d, q.reshape(*q.shape[:-2], 32)], axis=-1)  # [..., tiles, blocks, key, 34]
    return np.moveaxis(b, -2, -3).reshape(*lead, n, rb)
