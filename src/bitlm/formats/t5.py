"""T5: ternary weights at 1.6 bits, five codes per byte, 16 rows interleaved per block like I2V.

A weight matrix W [N, K] with entries in {-1, 0, +1} is stored as codes c = w + 1 in {0, 1, 2}, five
codes to a byte (3^5 = 243 <= 256): 8 / 5 = 1.6 bits per weight, against log2(3) = 1.585 at the
information limit and 2 bits for I2V. Decode (M = 1) reads every weight byte once per token, so it
reads 20% fewer bytes than on I2V.

The byte of five codes
----------------------
Codes t0 .. t4 (t0 first) make the base-3 number v = 81 t0 + 27 t1 + 9 t2 + 3 t3 + t4 (0 .. 242),
stored as the byte q = ceil(256 v / 243): v / 243 as a fraction of 256, rounded up. Then

    y_0 = q,   y_{j+1} = 3 y_j mod 256,   t_j = floor(3 y_j / 256) = (3 y_j) >> 8

(multiplying the fraction by 3 moves the next digit above the byte; the mod drops the digits already
read). No division, no table: byte-wise adds (3y = y + y + y, wrapping) and one comparison or shift.
The rounding up keeps every y_j inside the interval of its digit: checked for all 243 bytes by
tests/formats/test_t5.py. (The same base-3 byte as llama.cpp's TQ1_0 uses; the blocks differ.)

Because t_j = (3 y_j - y_{j+1}) / 256 exactly, sum_j x_j t_j = (3 sum_j x_j y_j - sum_j x_j y_{j+1}) / 256:
the AVX-512 decode multiplies the raw bytes y_j (unsigned, as vpdpbusd wants) and never isolates a
code. The AVX2 decode uses the same identity one level up: with F_j = floor(3^j q / 256) (F_0 = 0),
t_j = F_{j+1} - 3 F_j, so sum_j x_j t_j = sum_{j=1..5} F_j (x_{j-1} - 3 x_j) with x_5 = 0, each F_j one
16-bit multiply-high of q << 8 by 3^j. The other kernels extract t_j with two unsigned comparisons
(y >= 86, y >= 171).

Blocks
------
N is padded to Np = 16 * ceil(N / 16) and K to Kp = 20 * ceil(K / 20); padding is a zero weight (code 1,
the byte 0x80 when all five are padding). The packed array is

    uint8 [Np / 16, Kp / 20, 64]      block (rb, kb) = rows 16*rb .. 16*rb+15, columns 20*kb .. 20*kb+19

blocks of one row block contiguous along K, as in I2V. Inside a block of 64 bytes:

    byte b = 4*r + i   (r = row in block 0..15, i = 0..3)

         q = ceil(256 * (81 t0 + 27 t1 + 9 t2 + 3 t3 + t4) / 243)
         t_j = code of row r at column 4*j + i       (j = 0..4)

so 32-bit lane r (bytes 4r .. 4r+3) is row r, as in I2V, and the lane of y_j holds the codes of columns
4j .. 4j+3: what vpdpbusd multiplies with the four activation bytes x[4j .. 4j+3] broadcast to every
lane. Five digit steps of one 64-byte load give 16 rows x 20 columns, each row in its own int32 lane.
The I2V ideas are kept: row blocks of 16, one activation broadcast shared by all rows, and the offset
trick sum_k x[k] w[n, k] = sum_k x[k] c[n, k] - sum_k x[k].

Worked example
--------------
N = 1, K = 5, w = [+1, -1, 0, +1, -1], so c = [2, 0, 1, 2, 0]; padded to 16 x 20 with code 1.
    byte 0 (r 0, i 0): columns 0, 4, 8, 12, 16  -> codes 2, 0, 1, 1, 1 -> v = 162 + 0 + 9 + 3 + 1 = 175
                                                 -> q = ceil(256 * 175 / 243) = ceil(184.36) = 185 = 0xB9
       decode: y = 185, 43, 129, 131, 137 -> (3y) >> 8 = 2, 0, 1, 1, 1
    byte 1 (r 0, i 1): columns 1, 5, 9, 13, 17  -> codes 0, 1, 1, 1, 1 -> v = 40  -> q = 43  = 0x2B
    byte 2 (r 0, i 2): columns 2, 6, 10, 14, 18 -> codes 1, 1, 1, 1, 1 -> v = 121 -> q = 128 = 0x80
    byte 3 (r 0, i 3): columns 3, 7, 11, 15, 19 -> codes 2, 1, 1, 1, 1 -> v = 202 -> q = 213 = 0xD5
    bytes 4 .. 63 (padding rows 1 .. 15)                               -> 0x80
The packed array is uint8 [1, 1, 64] = B9 2B 80 D5 80 80 ... 80.
"""

from __future__ import annotations

import numpy as np

from . import hf_packed

ROWS = 16  # rows per block: one int32 lane per row in a 512-bit register
COLS = 20  # columns per block: 5 digits x 4 bytes of one lane
BLOCK_BYTES = 64  # 16 rows x 4 bytes: one cache line, one zmm load
DIGITS = 5
PAD_CODE = 1  # code of a zero weight
_POW3 = np.array([81, 27, 9, 3, 1], dtype=np.int32)  # weight of digit j (t0 first)


def padded_shape(n: int, k: int) -> tuple[int, int]:
    """(Np, Kp): N rounded up to 16 rows and K to 20 columns."""
    return -(-n // ROWS) * ROWS, -(-k // COLS) * COLS


def packed_shape(n: int, k: int) -> tuple[int, int, int]:
    np_, kp = padded_shape(n, k)
    return np_ // ROWS, kp // COLS, BLOCK_BYTES


def encode_digits(t: np.ndarray) -> np.ndarray:
    """codes [..., 5] in {0, 1, 2} (t0 first) -> bytes q = ceil(256 v / 243), v their base-3 value."""
    v = (np.asarray(t, dtype=np.int32) * _POW3).sum(axis=-1)
    return ((v * 256 + 242) // 243).astype(np.uint8)


def decode_digits(q: np.ndarray) -> np.ndarray:
    """bytes q -> codes [..., 5] (t0 first) by the multiply-by-3 steps the kernels take."""
    y = np.asarray(q, dtype=np.int32)
    out = []
    for _ in range(DIGITS):
        out.append((3 * y) >> 8)
        y = (3 * y) & 255
    return np.stack(out, axis=-1).astype(np.uint8)


def _codes(w: np.ndarray) -> np.ndarray:
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"t5: expected a 2-D ternary matrix [N, K], got shape {w.shape}")
    if w.size and (w.min() < -1 or w.max() > 1):
        raise ValueError("t5: weights must be ternary (-1, 0, 1)")
    return (w.astype(np.int16) + 1).astype(np.uint8)


def pack_codes(codes: np.ndarray) -> np.ndarray:
    """codes uint8 [N, K] in {0, 1, 2} -> packed uint8 [Np/16, Kp/20, 64]."""
    n, k = codes.shape
    np_, kp = padded_shape(n, k)
    full = np.full((np_, kp), PAD_CODE, dtype=np.uint8)
    full[:n, :k] = codes
    # [Np, Kb, j, i] -> digits of byte (row, kb, i) in j order: [Np, Kb, i, j]
    d = full.reshape(np_, kp // COLS, DIGITS, 4).transpose(0, 1, 3, 2)
    q = encode_digits(d)  # [Np, Kb, 4]
    # rows 16rb .. 16rb+15 side by side in block (rb, kb): [Nb, 16, Kb, 4] -> [Nb, Kb, 16, 4]
    blocks = q.reshape(np_ // ROWS, ROWS, kp // COLS, 4).transpose(0, 2, 1, 3)
    return np.ascontiguousarray(blocks).reshape(np_ // ROWS, kp // COLS, BLOCK_BYTES)


def pack(w: np.ndarray) -> np.ndarray:
    """Ternary int [N, K] in {-1, 0, 1} -> packed uint8 [Np/16, Kp/20, 64]."""
    return pack_codes(_codes(w))


def unpack_codes(packed: np.ndarray, n: int, k: int, padded: bool = False) -> np.ndarray:
    """packed uint8 [Np/16, Kp/20, 64] -> codes uint8 c = w + 1, [n, k] (or [Np, Kp] if padded)."""
    packed = np.asarray(packed, dtype=np.uint8)
    nb, kb, _ = packed_shape(n, k)
    if packed.shape != (nb, kb, BLOCK_BYTES):
        raise ValueError(f"t5: packed shape {packed.shape} does not match [{nb}, {kb}, 64] for {n}x{k}")
    d = decode_digits(packed.reshape(nb, kb, ROWS, 4))  # [rb, kb, r, i, j]
    full = d.transpose(0, 2, 1, 4, 3).reshape(nb * ROWS, kb * COLS)  # [rb, r, kb, j, i]
    return np.ascontiguousarray(full if padded else full[:n, :k])


def unpack(packed: np.ndarray, n: int, k: int) -> np.ndarray:
    """packed uint8 [Np/16, Kp/20, 64] -> ternary int8 [n, k] (padding dropped)."""
    return unpack_codes(packed, n, k).astype(np.int8) - 1


def from_hf_packed(packed: np.ndarray, out_features: int) -> np.ndarray:
    """Hugging Face packed uint8 [ceil(out/4), in] -> T5 packed uint8 [Np/16, Kp/20, 64]."""
    return pack(hf_packed.unpack(packed, out_features))
