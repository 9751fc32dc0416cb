"""I2_S: bitnet.cpp's ternary tensor type (GGML type 36 in its llama.cpp fork), x86 layout.

A whole tensor of n = rows * cols weights (cols a multiple of 128) is one byte string:

    bytes [0, n/4)          the 2-bit codes, in blocks of 128 weights = 32 bytes, in row-major
                            order of the weights (a block never crosses a row when cols % 128 == 0)
    bytes [n/4, n/4 + 4)    the per-tensor scale, float32 little-endian (w = scale * value)
    bytes [n/4 + 4, n/4+32) reserved (zero here); ggml_nbytes() of the fork counts n/4 + 32

Codes (unsigned, value + 1):   0 -> -1     1 -> 0     2 -> +1     (3 is never written; the fork's
dequantizer reads it as 0 but its dot-product kernels as +2, so bitlm refuses it)

Inside a block of 128 weights j = 0..127 (x86 build: QK_I2_S = 128, ACT_PARALLEL defined):
weight j sits in byte j % 32 of the block, at bits (7 - 2*(j//32), 6 - 2*(j//32)):

    byte b (0..31) of a block:   bit 7 6 | 5 4 | 3 2 | 1 0
                                   w[b]  |w[b+32]|w[b+64]|w[b+96]

so the four 32-weight quarters of the block are four bit planes of the same 32 bytes: one 256-bit
load, shifted right by 6, 4, 2, 0 and masked with 3, gives the codes of weights 0-31, 32-63, 64-95,
96-127 in order, ready for vpmaddubsw against 32 int8 activations each (bitnet.cpp's
ggml_vec_dot_i2_i8_s subtracts sum(x) afterwards for the +1 offset: REFERENCE.md).

Worked example, one block whose weights are all 0 (code 1) except
    w[0] = +1 (code 2), w[32] = -1 (code 0), w[64] = +1 (code 2), w[127] = -1 (code 0):
    byte 0  = (2 << 6) | (0 << 4) | (2 << 2) | (1 << 0) = 0b10_00_10_01 = 0x89
    byte 31 = (1 << 6) | (1 << 4) | (1 << 2) | (0 << 0) = 0b01_01_01_00 = 0x54
    bytes 1..30 = 0b01_01_01_01 = 0x55
and with scale 0.5 the tensor's 64 bytes (128 weights: 32 of codes + 32 of scale block) end in
    00 00 00 3f  00 * 28.

Where this comes from (read, not copied, with the search tools, December 2026):
  - the quantizer: microsoft/BitNet src/ggml-bitnet-mad.cpp, quantize_i2_s: the scale is the
    tensor's max |w| (for a tensor that is already scale * {-1, 0, 1}, that is the scale itself),
    |w| < 1e-6 is coded 1, otherwise sign -> 2 or 0; the x86 ACT_PARALLEL branch packs weight j of
    block i into byte i*32 + j%32 shifted by 6 - 2*(j/32); the scale is stored as one float at byte
    n/4 and the function returns n/4 + 32 bytes ("32B for alignment");
  - the reader: the fork's dequantize_row_i2_s (ggml-cpu/quants.c; copied verbatim into several
    third-party repositories the search tools hold): byte gp of each 32-byte block gives weights
    gp, 32 + gp, 64 + gp, 96 + gp from shifts 6, 4, 2, 0, through the table {-1, 0, +1, 0} times the
    scale, and the AVX2 dot product (ggml_vec_dot_i2_i8_s_1x1) shifts the same 32 bytes by 6, 4, 2, 0
    against activations 0-31, 32-63, 64-95, 96-127: the quantizer's layout, read back the same way;
  - the type: GGML_TYPE_I2_S = 36 in the fork's ggml.h; its type_traits say block size 1, type size
    1, and ggml_nbytes() special-cases I2_S to nbytes / 4 + 32: a GGUF reader must size an I2_S
    tensor as n/4 + 32 bytes, which the gguf Python package (0.19) does not know (type 36 is not in
    its GGMLQuantizationType), so bitlm writes it through GGUFWriter.add_tensor_info with the raw
    type number and reads GGUF files with its own parser (io/gguf_read.py);
  - the loader and graph: the fork's src/llama.cpp maps "bitnet-b1.58" and "bitnet-25" to
    build_bitnet_158 (relu^2 feed-forward, attn_sub_norm and ffn_sub_norm, head tied to token_embd,
    no separate weight-scale tensors); the older "bitnet" architecture goes to build_bitnet (SiLU,
    with blk.N.*.scale tensors). The official microsoft/bitnet-b1.58-2B-4T-gguf file holds 332
    tensors: 210 I2_S projections, 121 F32 norms and an F16 token_embd (kv dumps in
    microsoft/BitNet issues #226 and #373).

Not verified (no fork build or official file on this machine): that bitnet.cpp loads a file bitlm
writes (bitlm's reader and writer agree with each other and with the layout above); general.file_type
for I2_S (40, LLAMA_FTYPE_MOSTLY_I2_S per a third-party reading of the fork's llama.h; another says
41; loaders do not use it); which token_embd types the fork accepts beyond F16 (it inherits
llama.cpp's get_rows, which handles F32, F16, Q8_0 and Q6_K; BF16 depends on the fork's ggml age).
ARM builds (QK_I2_S = 64, 16-byte groups) and x86 builds without ACT_PARALLEL (a "1x4" layout that
interleaves 4 rows per byte) write different bytes for the same type id: such files are not
portable, and bitlm reads and writes only the x86 ACT_PARALLEL layout, the one of the official file.
"""

from __future__ import annotations

import numpy as np

from ..errors import BitlmError

GGML_TYPE = 36  # GGML_TYPE_I2_S in bitnet.cpp's llama.cpp fork
BLOCK = 128  # weights per block (QK_I2_S on x86)
BLOCK_BYTES = 32
TAIL = 32  # the scale (4 bytes) and 28 reserved bytes after the codes


def nbytes(n: int) -> int:
    """Bytes of an I2_S tensor of n weights."""
    return n // 4 + TAIL


def pack(w: np.ndarray, scale: float) -> np.ndarray:
    """uint8 [n/4 + 32] from ternary values w in {-1, 0, 1} (any shape, n % 128 == 0) and the scale."""
    w = np.asarray(w)
    if w.size % BLOCK:
        raise BitlmError(f"I2_S: {w.size} weights is not a multiple of {BLOCK}")
    if w.size and (w.min() < -1 or w.max() > 1 or (w.dtype.kind == "f" and not np.array_equal(w, np.rint(w)))):
        raise BitlmError("I2_S: weights must be ternary values -1, 0, 1")
    # code = w + 1 in uint8 arithmetic: -1 (0xFF) wraps to 0
    c = (w.astype(np.int8, copy=False).view(np.uint8) + np.uint8(1)).reshape(-1, 4, BLOCK_BYTES)  # [blocks, quarter, byte]
    codes = (c[:, 0] << 6) | (c[:, 1] << 4) | (c[:, 2] << 2) | c[:, 3]  # [blocks, 32]
    tail = np.zeros(TAIL, np.uint8)
    tail[:4] = np.frombuffer(np.float32(scale).astype("<f4").tobytes(), np.uint8)
    return np.concatenate([codes.reshape(-1), tail])


def unpack(data: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, np.float32]:
    """(int8 values in {-1, 0, 1} of `shape`, float32 scale) from an I2_S byte string. Code 3 (never
    written by bitnet.cpp) is refused: it would mean the bytes are not I2_S."""
    n = int(np.prod(shape))
    data = np.asarray(data, dtype=np.uint8).reshape(-1)
    if n % BLOCK or data.size != nbytes(n):
        raise BitlmError(f"I2_S: {data.size} bytes cannot hold {n} weights (expected {nbytes(n)}, "
                         f"and a multiple of {BLOCK} weights)")
    b = data[: n // 4].reshape(-1, 1, BLOCK_BYTES)
    c = (b >> np.array([6, 4, 2, 0], np.uint8).reshape(1, 4, 1)) & 3  # [blocks, quarter, byte]
    if (c == 3).any():
        raise BitlmError("I2_S: code 3 found; the data is not an I2_S tensor (or is damaged)")
    scale = data[n // 4: n // 4 + 4].view("<f4")[0]
    return (c.astype(np.int8) - 1).reshape(shape), np.float32(scale)
