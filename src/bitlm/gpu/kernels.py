"""Triton kernels of the W1.58A8 product on the Hugging Face packed layout, and their launchers.

The weights stay as the checkpoint stores them (formats/hf_packed.py): uint8 W [R, K], R = ceil(N/4),
bits 2i..2i+1 of byte [r, k] holding output row i*R + r. No repacking at load: a tile of BLOCK_R packed
rows is loaded once and unpacked in registers by four shifts into the four output stripes
rows r, R + r, 2R + r, 3R + r ("pack, store, load, unpack, compute"), so one byte of weight memory
feeds four outputs and the bytes read per product are exactly the checkpoint's 2 bits per weight.

    quantize_rows(x)            x [M, K] float -> xq int8 [M, K], s float32 [M]  (bitlm.quant, bit for bit)
    gemv(x, W, scale, N)        decode: the quantization fused in, int32 sums widened from int8 products
    gemm(xq, s, W, scale, N)    prefill and batches: tl.dot on int8 tiles with int32 accumulation
    bitlinear(x, W, scale, N)   y [M, N] = (xq @ Wq^T) * scale / s in x's dtype: gemv for M = 1, else gemm

With raw=True gemv and gemm return the int32 sums xq @ Wq^T themselves (for the exact tests).

Bit-for-bit agreement with bitlm.quant.quantize_activations (torch, float32):
  s = 127 / max(amax|x|, 1e-5)   torch computes a scalar over a tensor as reciprocal(t) * 127: so here,
                                 IEEE 1 / t (tl.div_rn; Triton's `/` may be approximate on a GPU),
                                 then a float32 product
  xq = clamp(round_half_even(x * s), -128, 127)
                                 round half to even as torch.round: v + 1.5*2^23 - 1.5*2^23 rounds a
                                 float32 |v| < 2^22 to the nearest integer, ties to even, in IEEE
                                 arithmetic. The product x * s must be rounded to float32 first, as
                                 torch rounds it: the launches pass enable_fp_fusion=False so that the
                                 compiler does not contract x * s + c into one fma.
The epilogue computes acc * (scale / s) with the same two IEEE operations as PackedBitLinear.forward, then
rounds to the output dtype to nearest even (bf16 by integer arithmetic on the bits: see _store).

Block sizes are fixed per path (no autotuning: the interpreter would run every candidate); the GPU sizes
are first choices, not measured (benchmarks/gpu_kernels.py is the place to tune them). Under the
interpreter (TRITON_INTERPRET=1, tensors on the CPU) larger blocks are used: each block is one numpy
operation there, and the kernels' code is the same for every block size.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..formats import hf_packed


def interpreted() -> bool:
    """True when these kernels were built by Triton's interpreter (TRITON_INTERPRET=1 at import)."""
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(_quantize_kernel, InterpretedFunction)


# ---- device functions ----------------------------------------------------------------------------
@triton.jit
def _row_scale(x_row, K, BLOCK_K: tl.constexpr):
    # s = 127 / max(amax|x|, 1e-5) of one row (float32), by a pass over K
    amax = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        xv = tl.load(x_row + k, mask=k < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(xv))
    # torch evaluates 127 / t as reciprocal(t) * 127 (Tensor.__rtruediv__): the same two roundings here
    return tl.div_rn(1.0, tl.maximum(tl.max(amax, axis=0), 1e-5)) * 127.0


@triton.jit
def _store(ptrs, acc, f, ok, OUT: tl.constexpr):
    # int32 sums -> memory: the sums (OUT_RAW), acc * f cast by the store (OUT_CAST), or the bits of
    # bf16(acc * f) rounded to nearest even by integer arithmetic (OUT_BF16_BITS; int16 storage): the
    # interpreter's float32 -> bf16 cast truncates, and these bits are the same on a GPU and under it.
    # (One store per branch: a GPU compile refuses a helper whose returns differ in type.)
    if OUT == 0:
        tl.store(ptrs, acc, mask=ok)
    elif OUT == 1:
        tl.store(ptrs, (acc.to(tl.float32) * f).to(ptrs.dtype.element_ty), mask=ok)
    else:
        u = (acc.to(tl.float32) * f).to(tl.uint32, bitcast=True)
        u = u + 0x7FFF + ((u >> 16) & 1)
        tl.store(ptrs, (u >> 16).to(tl.int16), mask=ok)


@triton.jit
def _store_stripe(y_row, acc, f, n, r_ok, N, OUT: tl.constexpr):
    # the outputs n (one stripe) of one row; the last stripe is short when N % 4 != 0
    _store(y_row + n, acc, f, r_ok & (n < N), OUT)


@triton.jit
def _store_tile(rows, acc, f, n, m_ok, r_ok, N, OUT: tl.constexpr):
    # the outputs n (one stripe) of the rows m: a [BLOCK_M, BLOCK_R] tile
    _store(rows + n[None, :], acc, f, m_ok[:, None] & (r_ok & (n < N))[None, :], OUT)


# ---- kernels -------------------------------------------------------------------------------------
@triton.jit
def _quantize_kernel(x_ptr, xq_ptr, s_ptr, K, stride_x, stride_q, BLOCK_K: tl.constexpr):
    # one program per row: x [M, K] float -> xq int8 [M, K], s float32 [M]
    m = tl.program_id(0)
    x_row = x_ptr + m * stride_x
    s = _row_scale(x_row, K, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        xv = tl.load(x_row + k, mask=k < K, other=0.0).to(tl.float32)
        q = (xv * s + 12582912.0) - 12582912.0  # round half to even (see the module's docstring)
        q = tl.minimum(tl.maximum(q, -128.0), 127.0)
        tl.store(xq_ptr + m * stride_q + k, q.to(tl.int8), mask=k < K)
    tl.store(s_ptr + m, s)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, scale_ptr, y_ptr, K, R, N, stride_x, stride_y,
                 BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, OUT: tl.constexpr):
    # grid (cdiv(R, BLOCK_R), M): program (p, m) makes outputs i*R + r, r in its BLOCK_R packed rows, of
    # row m. The activation row is quantized here (it is small and read from cache; fusing saves the
    # launch and the int8 round trip that dominate at M = 1): pass 1 its scale, pass 2 the products.
    pid = tl.program_id(0)
    m = tl.program_id(1)
    x_row = x_ptr + m * stride_x
    s = _row_scale(x_row, K, BLOCK_K)
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < R
    # int32 [BLOCK_R, BLOCK_K] partial sums per stripe, reduced along K once at the end
    acc0 = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.int32)
    acc1 = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.int32)
    acc2 = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.int32)
    acc3 = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        xv = tl.load(x_row + k, mask=k_ok, other=0.0).to(tl.float32)
        q = (xv * s + 12582912.0) - 12582912.0  # round half to even (see the module's docstring)
        xq = tl.minimum(tl.maximum(q, -128.0), 127.0).to(tl.int32)[None, :]  # [1, BLOCK_K]; 0 past K
        wb = tl.load(w_ptr + r[:, None] * K + k[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0)
        wb = wb.to(tl.int32)
        # the four stripes' weights (code c = w + 1 in bits 2i..2i+1) times xq, widened to int32:
        # |sum| <= 128 K, exact
        acc0 += (((wb >> 0) & 3) - 1) * xq
        acc1 += (((wb >> 2) & 3) - 1) * xq
        acc2 += (((wb >> 4) & 3) - 1) * xq
        acc3 += (((wb >> 6) & 3) - 1) * xq
    y_row = y_ptr + m * stride_y
    f = tl.div_rn(tl.load(scale_ptr), s)  # weight_scale / s, as PackedBitLinear
    _store_stripe(y_row, tl.sum(acc0, axis=1), f, 0 * R + r, r_ok, N, OUT)
    _store_stripe(y_row, tl.sum(acc1, axis=1), f, 1 * R + r, r_ok, N, OUT)
    _store_stripe(y_row, tl.sum(acc2, axis=1), f, 2 * R + r, r_ok, N, OUT)
    _store_stripe(y_row, tl.sum(acc3, axis=1), f, 3 * R + r, r_ok, N, OUT)


@triton.jit
def _gemm_kernel(xq_ptr, s_ptr, w_ptr, scale_ptr, y_ptr, M, K, R, N, stride_q, stride_y,
                 BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, OUT: tl.constexpr):
    # grid (cdiv(M, BLOCK_M), cdiv(R, BLOCK_R)): a [BLOCK_M, 4 * BLOCK_R] block of outputs, as four
    # [BLOCK_M, BLOCK_R] stripe tiles sharing each loaded [BLOCK_K, BLOCK_R] tile of packed bytes.
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    m_ok = m < M
    r_ok = r < R
    acc0 = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.int32)
    acc1 = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.int32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.int32)
    acc3 = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        a = tl.load(xq_ptr + m[:, None] * stride_q + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0)
        # W^T tile [BLOCK_K, BLOCK_R]: the bytes of packed rows r, contiguous along k in memory
        wb = tl.load(w_ptr + r[None, :] * K + k[:, None], mask=k_ok[:, None] & r_ok[None, :], other=0)
        # the four stripes' weights as int8 {-1, 0, 1}; int8 x int8 -> int32 dots (exact)
        acc0 = tl.dot(a, ((wb >> 0) & 3).to(tl.int8) - 1, acc0, out_dtype=tl.int32)
        acc1 = tl.dot(a, ((wb >> 2) & 3).to(tl.int8) - 1, acc1, out_dtype=tl.int32)
        acc2 = tl.dot(a, ((wb >> 4) & 3).to(tl.int8) - 1, acc2, out_dtype=tl.int32)
        acc3 = tl.dot(a, ((wb >> 6) & 3).to(tl.int8) - 1, acc3, out_dtype=tl.int32)
    s = tl.load(s_ptr + m, mask=m_ok, other=1.0)
    f = tl.div_rn(tl.load(scale_ptr) + tl.zeros([BLOCK_M], dtype=tl.float32), s)[:, None]  # [BLOCK_M, 1]
    rows = y_ptr + m[:, None] * stride_y
    _store_tile(rows, acc0, f, 0 * R + r, m_ok, r_ok, N, OUT)
    _store_tile(rows, acc1, f, 1 * R + r, m_ok, r_ok, N, OUT)
    _store_tile(rows, acc2, f, 2 * R + r, m_ok, r_ok, N, OUT)
    _store_tile(rows, acc3, f, 3 * R + r, m_ok, r_ok, N, OUT)


# ---- launchers -----------------------------------------------------------------------------------
OUT_RAW, OUT_CAST, OUT_BF16_BITS = 0, 1, 2


def _output(M: int, N: int, dtype: torch.dtype, raw: bool, device):
    """(the tensor returned, the tensor the kernel writes, OUT)."""
    if raw:
        y = torch.empty((M, N), dtype=torch.int32, device=device)
        return y, y, OUT_RAW
    y = torch.empty((M, N), dtype=dtype, device=device)
    if dtype == torch.bfloat16:
        return y, y.view(torch.int16), OUT_BF16_BITS
    return y, y, OUT_CAST


# (BLOCK_R, BLOCK_K) of gemv; (BLOCK_M, BLOCK_R, BLOCK_K) of gemm; BLOCK_K of quantize_rows
# gemm's BLOCK_M is the largest: a smaller M takes the power of two >= M (at least 16, tl.dot's minimum).
# The GPU's are chosen from ptxas's report for sm_80 (tests/gpu/test_triton_compile.py), not from timings:
# gemm (64, 32, 64) with 4 warps used 255 registers and spilled; (32, 64, 64) with 8 uses 180, no spill.
GPU_BLOCKS = {"gemv": (8, 256), "gemm": (32, 64, 64), "quantize": 1024}
GPU_WARPS = {"gemv": 4, "gemm": 8, "quantize": 4}
INTERPRETER_BLOCKS = {"gemv": (128, 1024), "gemm": (64, 64, 256), "quantize": 4096}


def _blocks(kind: str, device: torch.device):
    return (GPU_BLOCKS if device.type == "cuda" and not interpreted() else INTERPRETER_BLOCKS)[kind]


def _warps(kind: str) -> int:
    return GPU_WARPS[kind]


def _check(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, out_features: int) -> None:
    if x.dim() != 2 or packed.dim() != 2 or x.shape[1] != packed.shape[1]:
        raise ValueError(f"triton bitlinear: x {tuple(x.shape)} and packed weights {tuple(packed.shape)} "
                         "do not make a product (expected x [M, K], weights [ceil(N/4), K])")
    if packed.dtype != torch.uint8 or packed.shape[0] != hf_packed.packed_rows(out_features):
        raise ValueError(f"triton bitlinear: weights must be uint8 [{hf_packed.packed_rows(out_features)}, K] "
                         f"for {out_features} outputs, got {packed.dtype} {tuple(packed.shape)}")
    if scale.dtype != torch.float32 or scale.numel() != 1:
        raise ValueError("triton bitlinear: weight_scale must be one float32")
    if not (x.device == packed.device == scale.device):
        raise ValueError(f"triton bitlinear: tensors on different devices ({x.device}, {packed.device}, {scale.device})")
    if x.device.type == "cpu" and not interpreted():
        from ..errors import BitlmError
        raise BitlmError("the Triton kernels got CPU tensors but were compiled for a GPU: on the CPU they run "
                         "only under Triton's interpreter (set TRITON_INTERPRET=1 before bitlm loads them)")


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x float [M, K] -> (xq int8 [M, K], s float32 [M]), as quant.quantize_activations."""
    x = x.contiguous()  # the kernels step along K by 1 (a no-op for the model's activations)
    M, K = x.shape
    xq = torch.empty((M, K), dtype=torch.int8, device=x.device)
    s = torch.empty((M,), dtype=torch.float32, device=x.device)
    if M:
        _quantize_kernel[(M,)](x, xq, s, K, x.stride(0), xq.stride(0), BLOCK_K=_blocks("quantize", x.device),
                               num_warps=_warps("quantize"), enable_fp_fusion=False)
    return xq, s


def gemv(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, out_features: int, raw: bool = False,
         blocks: tuple[int, int] | None = None) -> torch.Tensor:
    """x float [M, K] -> y [M, N] in x's dtype (int32 sums if raw), the quantization fused in."""
    _check(x, packed, scale, out_features)
    x, packed = x.contiguous(), packed.contiguous()
    M, K = x.shape
    R = packed.shape[0]
    y, store, out = _output(M, out_features, x.dtype, raw, x.device)
    block_r, block_k = blocks or _blocks("gemv", x.device)
    if M and R:
        _gemv_kernel[(triton.cdiv(R, block_r), M)](
            x, packed, scale, store, K, R, out_features, x.stride(0), y.stride(0),
            BLOCK_R=block_r, BLOCK_K=block_k, OUT=out, num_warps=_warps("gemv"), enable_fp_fusion=False)
    return y


def gemm(xq: torch.Tensor, s: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, out_features: int,
         out_dtype: torch.dtype = torch.float32, raw: bool = False,
         blocks: tuple[int, int, int] | None = None) -> torch.Tensor:
    """xq int8 [M, K], s float32 [M] -> y [M, N] of out_dtype (int32 sums if raw)."""
    _check(xq, packed, scale, out_features)
    if xq.dtype != torch.int8 or s.shape != (xq.shape[0],) or s.dtype != torch.float32:
        raise ValueError("triton gemm: expected xq int8 [M, K] and s float32 [M]")
    xq, s, packed = xq.contiguous(), s.contiguous(), packed.contiguous()
    M, K = xq.shape
    R = packed.shape[0]
    y, store, out = _output(M, out_features, out_dtype, raw, xq.device)
    block_m, block_r, block_k = blocks or _blocks("gemm", xq.device)
    block_m = min(block_m, max(16, triton.next_power_of_2(M)))
    if M and R:
        _gemm_kernel[(triton.cdiv(M, block_m), triton.cdiv(R, block_r))](
            xq, s, packed, scale, store, M, K, R, out_features, xq.stride(0), y.stride(0),
            BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=block_k, OUT=out, num_warps=_warps("gemm"),
            enable_fp_fusion=False)
    return y


def bitlinear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, out_features: int) -> torch.Tensor:
    """y [M, N] = (xq @ Wq^T) * scale / s in x's dtype, for x float [M, K]: the fused gemv at M = 1
    (decode), else one quantization pass and the int8 tl.dot gemm (prefill, batches)."""
    x = x.contiguous()
    if x.shape[0] == 1:
        return gemv(x, packed, scale, out_features)
    xq, s = quantize_rows(x)
    return gemm(xq, s, packed, scale, out_features, out_dtype=x.dtype)
