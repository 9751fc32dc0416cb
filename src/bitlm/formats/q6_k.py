"""Q6_K: llama.cpp's 6-bit k-quant (GGML type 14), for GGUF token embeddings. gguf-py 0.19 can
dequantize it but not quantize it (its Q6_K.quantize_blocks raises NotImplementedError), so the
quantizer is here; gguf's dequantize is the reference a test holds it to.

One block = 256 weights in 210 bytes:

    ql[128]      low 4 bits of the 6-bit codes q (q = round(x / (d * sc)) + 32, in 0..63)
    qh[64]       high 2 bits
    scales[16]   int8, one per 16 weights
    d            float16 super-scale:  x = d * scales[j // 16] * (q[j] - 32)

Within each half h (weights 128h .. 128h + 127, bytes ql[64h .. 64h+63], qh[32h .. 32h+31]),
for l = 0..31:

    ql[64h + l]      = q[l]      | q[l + 64] << 4       (low nibbles)
    ql[64h + l + 32] = q[l + 32] | q[l + 96] << 4
    qh[32h + l]      = q[l] >> 4 | (q[l + 32] >> 4) << 2 | (q[l + 64] >> 4) << 4 | (q[l + 96] >> 4) << 6

(q indexed from the start of the half). Worked example: a half whose codes are all 32 (x = 0)
except q[0] = 63 and q[64] = 0 has ql[0] = 0x0F | 0x0 << 4 = 0x0F, ql[l] = 0x00 for the other
low-nibble bytes (32 = 0b10_0000: low nibble 0), and qh[0] = 3 | 2 << 2 | 0 << 4 | 2 << 6 = 0x8B,
qh[l] = 0b10_10_10_10 = 0xAA for l > 0.

The scales: each 16-weight group takes the signed value of largest magnitude m and the scale
m / -32 (so m itself is code 0, the end of the asymmetric range -32..31 with the most room); the
block's d maps the group scale of largest magnitude to -128. This is llama.cpp's choice of scale
without its rmse-weighted search over nearby scales (make_qx_quants): the bytes may differ from
llama-quantize's, the format is the same, and the error is at most half a step per group.
"""

from __future__ import annotations

import numpy as np

from ..errors import BitlmError

GGML_TYPE = 14
QK_K = 256
BLOCK_BYTES = 210


def _nearest_int(x: np.ndarray) -> np.ndarray:
    return np.rint(x).astype(np.int32)  # round half to even; ggml's nearest_int is the same trick


def quantize_codes(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes uint8 [blocks, 256] in 0..63, int8 scales [blocks, 16], float16 d [blocks]) of float
    rows whose size is a multiple of 256."""
    x = np.asarray(x, dtype=np.float32).reshape(-1, QK_K)
    if not np.isfinite(x).all():
        raise BitlmError("Q6_K: the values must be finite")
    g = x.reshape(len(x), 16, 16)
    arg = np.abs(g).argmax(axis=-1)
    m = np.take_along_axis(g, arg[..., None], axis=-1)[..., 0]  # signed extreme of each group
    scale = m / np.float32(-32)  # [blocks, 16]
    sarg = np.abs(scale).argmax(axis=-1)
    smax = np.take_along_axis(scale, sarg[:, None], axis=-1)[:, 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = np.where(smax != 0, np.float32(-128) / smax, 0).astype(np.float32)
    sc = np.minimum(127, _nearest_int(iscale[:, None] * scale)).astype(np.int8)
    d = np.where(iscale != 0, np.float32(1) / np.where(iscale != 0, iscale, 1), 0).astype(np.float16)
    step = d.astype(np.float32)[:, None] * sc.astype(np.float32)  # [blocks, 16]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(step[..., None] != 0, _nearest_int(g / step[..., None]), 0)
    codes = (np.clip(q, -32, 31) + 32).astype(np.uint8).reshape(len(x), QK_K)
    return codes, sc, d


def pack(codes: np.ndarray, sc: np.ndarray, d: np.ndarray) -> np.ndarray:
    """uint8 [blocks, 210] from quantize_codes' output (the layout above)."""
    q = codes.reshape(-1, 2, 4, 32)  # [blocks, half, quarter, l]
    lo, hi = q & 0xF, q >> 4
    ql = np.concatenate([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], axis=-1)
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)
    n = len(q)
    return np.concatenate([ql.reshape(n, 128), qh.reshape(n, 64), sc.view(np.uint8).reshape(n, 16),
                           d.astype("<f2").view(np.uint8).reshape(n, 2)], axis=1).astype(np.uint8)


def quantize(x: np.ndarray) -> np.ndarray:
    """Q6_K bytes of float rows [rows, cols] (cols % 256 == 0): uint8 [rows, cols / 256 * 210]."""
    x = np.asarray(x, dtype=np.float32)
    if x.shape[-1] % QK_K:
        raise BitlmError(f"Q6_K: rows of {x.shape[-1]} values; the format needs a multiple of {QK_K}")
    return pack(*quantize_codes(x)).reshape(*x.shape[:-1], x.shape[-1] // QK_K * BLOCK_BYTES)


def dequantize(data: np.ndarray, cols: int) -> np.ndarray:
    """float32 [rows, cols] from Q6_K bytes (the inverse of pack, for bitlm's reader)."""
    b = np.asarray(data, dtype=np.uint8).reshape(-1, BLOCK_BYTES)
    ql, qh = b[:, :128].reshape(-1, 2, 2, 32), b[:, 128:192].reshape(-1, 2, 1, 32)
    sc = b[:, 192:208].copy().view(np.int8).astype(np.float32)
    d = b[:, 208:210].copy().view("<f2").astype(np.float32)  # [blocks, 1]
    lo = np.concatenate([ql & 0xF, ql >> 4], axis=2)  # [blocks, half, quarter 0 1 2 3, l]
    hi = (qh >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3
    q = (lo | (hi << 4)).astype(np.float32).reshape(-1, 16, 16) - 32
    return (d[:, :, None] * sc[:, :, None] * q).reshape(-1, cols)
