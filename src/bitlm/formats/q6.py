"""Q6 rows: a float matrix (the output head / embedding, [V, H]) as 6-bit integers with one float32
scale per row, packed for the AVX-512 VBMI head kernel. 6 bits per weight (0.75 bytes), against 1 byte
for int8 rows and 2 for bf16: the head is the largest single read of a decode step.

Quantization (per row r, symmetric absmax): scale_r = max(max|E_r|, 1e-12) / 31,
q = clamp(round(E_r / scale_r), -31, 31) (round half to even), so E_r ~ q * scale_r. Stored as codes
u = q + 32 in 1..63 (0 unused), 6 bits each.

Layout
------
H is padded to Hp = 64 * ceil(H / 64) with code 32 (a zero weight). Each row is Hp / 64 groups of
48 bytes; group g holds columns 64g .. 64g+63 as one little-endian bit stream: column 64g + i is bits
6i .. 6i+5 of the group. So every 6 bytes hold 8 columns:

    bytes 6L .. 6L+5 of a group (L = 0..7), read as a 48-bit little-endian integer:
    bits  47..42  41..36  35..30  29..24  23..18  17..12  11..6   5..0
          c[8L+7] c[8L+6] c[8L+5] c[8L+4] c[8L+3] c[8L+2] c[8L+1] c[8L]

Why: `vpermb` spreads the 6-byte pieces over the 8 qwords of a zmm, and `vpmultishiftqb` with shifts
0, 6, ..., 42 then puts code 8L+j in byte j of qword L: one load, two shuffles and a mask give 64
codes in column order, ready for `vpdpbusd` against 64 consecutive int8 activations.

Worked example: a row of 64 columns with q = [1, -1, 0, 31, -31, 0, ..., 0] has codes
[33, 31, 32, 63, 1, 32, ...]; the first 6 bytes hold 33 | 31 << 6 | 32 << 12 | 63 << 18 | 1 << 24 |
32 << 30 | 32 << 36 | 32 << 42 = 0x820801FE07E1, little-endian: e1 07 fe 01 08 82; the other 42 bytes
repeat 20 08 82 (codes 32, 32, 32, 32 = 0x820820).

Integer product: sum_h x[h] * q[r, h] = sum_h x[h] * u[r, h] - 32 * sum_h x[h] (the offset trick).
"""

from __future__ import annotations

import numpy as np

GROUP = 64  # columns per group
GROUP_BYTES = 48
QMAX = 31
ZERO_CODE = 32


def padded_cols(h: int) -> int:
    return -(-h // GROUP) * GROUP


def quantize(e: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float [V, H] -> (q int8 [V, H] in -31..31, scale float32 [V]) with e ~ q * scale[:, None]."""
    e = np.asarray(e, dtype=np.float32)
    scale = (np.maximum(np.abs(e).max(axis=1), np.float32(1e-12)) / np.float32(QMAX)).astype(np.float32)
    q = np.clip(np.rint(e / scale[:, None]), -QMAX, QMAX).astype(np.int8)
    return q, scale


def pack(q: np.ndarray) -> np.ndarray:
    """int [V, H] in -31..31 -> uint8 [V, Hp / 64 * 48]."""
    q = np.asarray(q)
    if q.ndim != 2 or (q.size and (q.min() < -QMAX or q.max() > QMAX)):
        raise ValueError(f"q6.pack: expected a 2-D int matrix in [-{QMAX}, {QMAX}]")
    v, h = q.shape
    hp = padded_cols(h)
    codes = np.full((v, hp), ZERO_CODE, dtype=np.uint64)
    codes[:, :h] = q.astype(np.int64) + ZERO_CODE
    c = codes.reshape(v, hp // 8, 8)  # 8 columns -> one 48-bit piece
    piece = np.zeros((v, hp // 8), dtype=np.uint64)
    for j in range(8):
        piece |= c[:, :, j] << np.uint64(6 * j)
    out = piece.astype("<u8").view(np.uint8).reshape(v, hp // 8, 8)[:, :, :6]  # low 6 bytes
    return np.ascontiguousarray(out).reshape(v, hp // 8 * 6)


def unpack(packed: np.ndarray, h: int) -> np.ndarray:
    """uint8 [V, Hp / 64 * 48] -> int8 [V, h] in -31..31."""
    packed = np.asarray(packed, dtype=np.uint8)
    v = packed.shape[0]
    hp = padded_cols(h)
    if packed.shape != (v, hp // 8 * 6):
        raise ValueError(f"q6.unpack: shape {packed.shape} does not match {h} columns")
    b = np.zeros((v, hp // 8, 8), dtype=np.uint8)
    b[:, :, :6] = packed.reshape(v, hp // 8, 6)
    piece = b.view("<u8")[:, :, 0]
    codes = np.stack([(piece >> np.uint64(6 * j)) & np.uint64(63) for j in range(8)], axis=-1)
    return (codes.reshape(v, hp)[:, :h].astype(np.int16) - ZERO_CODE).astype(np.int8)
