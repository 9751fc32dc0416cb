"""The Hugging Face packed BitNet layout (quantization_mode "offline"): uint8 [ceil(out/4), in].

Packing runs along the OUTPUT dimension in four stripes of R = ceil(out/4) rows. Codes are c = w + 1 in
{0, 1, 2}. Bits 2i..2i+1 (LSB first) of byte [r, col] hold row i*R + r, column col:

    byte[r, col] = c[r, col] | c[R + r, col] << 2 | c[2R + r, col] << 4 | c[3R + r, col] << 6

Worked example, out = 8, in = 1 (R = 2), w = [0, -1, 1, 1, -1, 0, 1, -1]^T:
    c = [1, 0, 2, 2, 0, 1, 2, 0]
    byte[0] = c0 | c2<<2 | c4<<4 | c6<<6 = 1 | 2<<2 | 0<<4 | 2<<6 = 0b10_00_10_01 = 0x89
    byte[1] = c1 | c3<<2 | c5<<4 | c7<<6 = 0 | 2<<2 | 1<<4 | 0<<6 = 0b00_01_10_00 = 0x18
When out is not a multiple of 4 the last stripe is short and its missing rows are zero bits (transformers
itself only reads the format when out % 4 == 0).
"""

from __future__ import annotations

import numpy as np

VALUES_PER_BYTE = 4


def packed_rows(out_features: int) -> int:
    return (out_features + VALUES_PER_BYTE - 1) // VALUES_PER_BYTE


def pack(w: np.ndarray) -> np.ndarray:
    """Ternary int [out, in] in {-1, 0, 1} -> uint8 [ceil(out/4), in]."""
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"pack: expected a 2-D ternary matrix, got shape {w.shape}")
    if w.size and (w.min() < -1 or w.max() > 1):
        raise ValueError("pack: weights must be ternary (-1, 0, 1)")
    out, cols = w.shape
    rows = packed_rows(out)
    codes = np.zeros((VALUES_PER_BYTE * rows, cols), dtype=np.uint8)
    codes[:out] = (w + 1).astype(np.uint8)
    codes[out:] = 0  # padding rows: zero bits, as transformers writes them
    packed = np.zeros((rows, cols), dtype=np.uint8)
    for i in range(VALUES_PER_BYTE):
        packed |= codes[i * rows:(i + 1) * rows] << np.uint8(2 * i)
    return packed


def unpack(packed: np.ndarray, out_features: int) -> np.ndarray:
    """uint8 [ceil(out/4), in] -> int8 [out, in] in {-1, 0, 1}. Raises on a code 3 (not ternary)."""
    packed = np.asarray(packed, dtype=np.uint8)
    rows = packed.shape[0]
    codes = np.concatenate([(packed >> np.uint8(2 * i)) & np.uint8(3) for i in range(VALUES_PER_BYTE)])
    codes = codes[:out_features]
    if codes.size and codes.max() > 2:
        raise ValueError("unpack: found the 2-bit code 3, which is not a ternary value")
    assert rows == packed_rows(out_features)
    return codes.astype(np.int8) - 1


def unpack_torch(packed, out_features: int, dtype=None):
    """The same as unpack, in torch (used on the reference compute path): a tensor of `dtype`."""
    import torch
    dtype = dtype or torch.float32
    shifts = torch.arange(0, 2 * VALUES_PER_BYTE, 2, dtype=torch.uint8, device=packed.device)
    codes = (packed.unsqueeze(0) >> shifts.view(-1, 1, 1)) & 3  # [4, R, in]
    codes = codes.reshape(-1, packed.shape[-1])[:out_features]
    return codes.to(dtype) - 1
