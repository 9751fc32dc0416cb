"""I2V: ternary weights as 2-bit codes, 16 rows interleaved per block, laid out for VNNI kernels.

A weight matrix W [N, K] (N outputs, K inputs) with entries in {-1, 0, +1} is stored as codes
c = w + 1 in {0, 1, 2}, two bits each: exactly 2 bits per weight plus padding.

Blocks
------
N is padded to Np = 16 * ceil(N / 16) and K to Kp = 16 * ceil(K / 16); padding is a zero weight
(code 1), so the padded matrix is W with zero rows and columns added. The packed array is

    uint8 [Np / 16, Kp / 16, 64]      block (rb, kb) = rows 16*rb .. 16*rb+15, columns 16*kb .. 16*kb+15

and blocks of one row block are contiguous along K, so a kernel (or a thread) owning a row block
streams its bytes in order. Inside a block of 64 bytes:

    byte b = 4*r + j   (r = row in block 0..15, j = 0..3)

         bit  7 6   5 4   3 2   1 0
              +-----+-----+-----+-----+
              | c12 | c8  | c4  | c0  |   + j: the codes of row r at columns 12+j, 8+j, 4+j, j
              +-----+-----+-----+-----+        (shift s = 0..3 holds column 4*s + j)

Why: one 64-byte load puts bytes 4r..4r+3, that is 32-bit lane r, under row r. `(v >> 2s) & 3`
leaves in lane r the four codes of row r at columns 4s .. 4s+3, which is what `vpdpbusd` multiplies
with the four activation bytes x[4s .. 4s+3] broadcast to every lane. Four shifts of one load give
16 rows x 16 columns of products, each row summed in its own int32 lane: no horizontal reduction,
and the activation broadcast is shared by all rows (and by further row blocks). An AVX2 register
takes the first or second 32 bytes (rows 0-7 or 8-15) the same way with `vpmaddubsw`.

Worked example
--------------
N = 1, K = 5, w = [+1, -1, 0, +1, -1], so c = [2, 0, 1, 2, 0]; padded to 16 x 16 with code 1.
    byte 0 (r 0, j 0): columns 0, 4, 8, 12  -> codes 2, 0, 1, 1 -> 0b01_01_00_10 = 0x52
    byte 1 (r 0, j 1): columns 1, 5, 9, 13  -> codes 0, 1, 1, 1 -> 0b01_01_01_00 = 0x54
    byte 2 (r 0, j 2): columns 2, 6, 10, 14 -> codes 1, 1, 1, 1 -> 0b01_01_01_01 = 0x55
    byte 3 (r 0, j 3): columns 3, 7, 11, 15 -> codes 2, 1, 1, 1 -> 0b01_01_01_10 = 0x56
    bytes 4 .. 63 (padding rows 1 .. 15)                        -> 0x55
The packed array is uint8 [1, 1, 64] = 52 54 55 56 55 55 ... 55.

Integer product (the offset trick): with x int8 [K], sum_k x[k] * w[n, k]
= sum_k x[k] * c[n, k] - sum_k x[k]; the kernels compute the first sum (unsigned codes times signed
activations, as `vpdpbusd` wants) and subtract the row sum of x once per output.

Hugging Face layout
-------------------
The packed 2B4T checkpoint stores uint8 [ceil(out / 4), in]; bits 2i..2i+1 (LSB first) of byte
[r, c] hold the code of row i * ceil(out / 4) + r, column c (formats/hf_packed.py); `from_hf_packed`
converts it.
"""

from __future__ import annotations

import numpy as np

from . import hf_packed

ROWS = 16  # rows per block: one int32 lane per row in a 512-bit register
COLS = 16  # columns per block: 4 shifts x 4 bytes of one lane
BLOCK_BYTES = ROWS * COLS // 4  # 64: one cache line, one zmm load
PAD_CODE = 1  # code of a zero weight


def padded_shape(n: int, k: int) -> tuple[int, int]:
    """(Np, Kp): N and K rounded up to the block sizes."""
    return -(-n // ROWS) * ROWS, -(-k // COLS) * COLS


def packed_shape(n: int, k: int) -> tuple[int, int, int]:
    np_, kp = padded_shape(n, k)
    return np_ // ROWS, kp // COLS, BLOCK_BYTES


def _codes(w: np.ndarray) -> np.ndarray:
    """ternary int [N, K] in {-1, 0, 1} -> codes uint8 c = w + 1."""
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"i2v: expected a 2-D ternary matrix [N, K], got shape {w.shape}")
    if w.size and (w.min() < -1 or w.max() > 1):
        raise ValueError("i2v: weights must be ternary (-1, 0, 1)")
    return (w.astype(np.int16) + 1).astype(np.uint8)


def pack(w: np.ndarray) -> np.ndarray:
    """Ternary int [N, K] in {-1, 0, 1} -> packed uint8 [Np/16, Kp/16, 64]."""
    codes = _codes(w)
    n, k = codes.shape
    np_, kp = padded_shape(n, k)
    full = np.full((np_, kp), PAD_CODE, dtype=np.uint8)
    full[:n, :k] = codes
    # [rb, r, kb, s, j] -> [rb, kb, r, j, s]: byte (r, j) gathers shifts s = 0..3
    t = full.reshape(np_ // ROWS, ROWS, kp // COLS, 4, 4).transpose(0, 2, 1, 4, 3)
    out = t[..., 0] | (t[..., 1] << 2) | (t[..., 2] << 4) | (t[..., 3] << 6)
    return np.ascontiguousarray(out).reshape(np_ // ROWS, kp // COLS, BLOCK_BYTES)


def unpack_codes(packed: np.ndarray, n: int, k: int, padded: bool = False) -> np.ndarray:
    """packed uint8 [Np/16, Kp/16, 64] -> codes uint8 c = w + 1, [n, k] (or [Np, Kp] if padded)."""
    packed = np.asarray(packed, dtype=np.uint8)
    nb, kb, _ = packed_shape(n, k)
    if packed.shape != (nb, kb, BLOCK_BYTES):
        raise ValueError(f"i2v: packed shape {packed.shape} does not match [{nb}, {kb}, 64] for {n}x{k}")
    b = packed.reshape(nb, kb, ROWS, 4)  # [rb, kb, r, j]
    t = np.stack([(b >> (2 * s)) & 3 for s in range(4)], axis=-1)  # [rb, kb, r, j, s]
    full = t.transpose(0, 2, 1, 4, 3).reshape(nb * ROWS, kb * COLS)  # [rb, r, kb, s, j]
    return np.ascontiguousarray(full if padded else full[:n, :k])


def unpack(packed: np.ndarray, n: int, k: int) -> np.ndarray:
    """packed uint8 [Np/16, Kp/16, 64] -> ternary int8 [n, k] (padding dropped)."""
    return unpack_codes(packed, n, k).astype(np.int8) - 1


def from_hf_packed(packed: np.ndarray, out_features: int) -> np.ndarray:
    """Hugging Face packed uint8 [ceil(out/4), in] -> I2V packed uint8 [Np/16, Kp/16, 64]."""
    return pack(hf_packed.unpack(packed, out_features))
