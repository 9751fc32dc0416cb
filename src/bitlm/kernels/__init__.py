"""Native ternary x int8 kernels on the I2V layout (formats/i2v.py, 2 bits) or the T5 layout
(formats/t5.py, 1.6 bits; PackedTernary.fmt, WEIGHT_FORMATS), and their thin binding.

torch is imported inside the functions that take tensors, never at import: the native runtime
(engine/native.py) loads `_native` through this package and must stay torch-free.

The C library (i2v.h, one file per instruction set, dispatch.c, pool.c) is built by setup.py during
`pip install`; `_native` (module.c) passes it raw pointers from torch's data_ptr(), zero-copy. If it
cannot load, everything here still works on the pure-torch path, slower, after a one-line warning.

    available() -> bool                 info() -> dict          summary() -> str (for `bitlm doctor`)
    set_num_threads(n) -> int           pack(codes, fmt="i2v") / from_hf_packed(packed, out_features) -> PackedTernary
    gemm(xq, packed) -> int32 [M, N]    quantize(x) -> (xq int8 [M, K], s float32 [M, 1], xsum int32 [M])
    linear(x, packed, weight_scale) -> float32 [..., N]   (quantize + gemm + rescale, one native call)
    q6_gemv(xq, packed_q6, h) -> int32 [M, V]             (the 6-bit output head, formats/q6.py)

Exactness: gemm returns the integer sums xq @ W^T exactly, on every path.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..formats import hf_packed, i2v, q6, t5

if TYPE_CHECKING:
    import torch

try:
    from . import _native
    _LOAD_ERROR: str | None = None
except ImportError as e:  # not built (no compiler at install time) or built for another Python
    _native = None
    _built = any(p.name.startswith("_native.") for p in Path(__file__).parent.iterdir())
    _LOAD_ERROR = str(e) if _built else "the extension bitlm.kernels._native was not built"
    logging.getLogger("bitlm").warning("bitlm: native kernels unavailable (%s); using the slower pure-torch path",
                                       _LOAD_ERROR)

PATHS = ("scalar", "avx2", "avx512vnni", "amx", "neon")  # indices as in i2v.h
# packed ternary weight formats, indices as i2v.h's I2V_FMT_*: 2 bits (formats/i2v.py) or 1.6 (formats/t5.py)
WEIGHT_FORMATS = ("i2v", "t5")
_FORMAT_MODULES = {"i2v": i2v, "t5": t5}


def format_module(fmt: str):
    """The formats/ module of a weight format name (i2v or t5)."""
    if fmt not in _FORMAT_MODULES:
        raise ValueError(f"unknown weight format {fmt!r}: expected one of {', '.join(WEIGHT_FORMATS)}")
    return _FORMAT_MODULES[fmt]


def available() -> bool:
    return _native is not None


def _path_index(path: str | int | None) -> int:
    """None -> -1 (the best path, or BITLM_KERNEL); a name or index -> its index, checked."""
    if path is None:
        return -1
    idx = PATHS.index(path) if isinstance(path, str) else int(path)
    if _native is None or not _native.path_supported(idx):
        raise ValueError(f"kernel path {path!r} is not available on this machine ({info()['paths']})")
    return idx


def info() -> dict:
    """What `bitlm doctor` prints: CPU features found, the kernel path in use, threads."""
    if _native is None:
        import torch
        return {"available": False, "error": _LOAD_ERROR, "path": "torch", "paths": [], "threads": torch.get_num_threads(),
                "cpu_features": [], "layout": "i2v"}
    return {
        "available": True,
        "path": PATHS[_native.best_path()],
        "paths": [p for i, p in enumerate(PATHS) if _native.path_supported(i)],
        "cpu_features": _native.cpu_features().split(),
        "threads": _native.num_threads(),
        "layout": "i2v",
    }


def summary() -> str:
    """One line for `bitlm doctor`: the kernel path in use, the CPU features found, the threads."""
    i = info()
    if not i["available"]:
        return f"native kernels: not available ({i['error']}); pure-torch path"
    return (f"native kernels: {i['path']} (supported: {', '.join(i['paths'])}; CPU features: "
            f"{' '.join(i['cpu_features']) or 'none'}), {i['threads']} threads, layout {i['layout']}")


def set_num_threads(n: int) -> int:
    """Threads of the kernel pool (n <= 0: one per available CPU); returns the number in use."""
    if _native is not None:
        return _native.set_num_threads(int(n))
    import torch
    return torch.get_num_threads()


@dataclass(eq=False)
class PackedTernary:
    """Ternary weights W [n, k] packed in format fmt: I2V, data uint8 [ceil(n/16), ceil(k/16), 64], or
    T5 (1.6 bits), data uint8 [ceil(n/16), ceil(k/20), 64]."""

    data: torch.Tensor
    n: int
    k: int
    fmt: str = "i2v"
    _dense: torch.Tensor | None = field(default=None, repr=False)  # torch fallback: float32 [n, k]

    def __post_init__(self):
        import torch
        want = format_module(self.fmt).packed_shape(self.n, self.k)
        if tuple(self.data.shape) != want or self.data.dtype != torch.uint8:
            raise ValueError(f"PackedTernary: data must be uint8 {list(want)}, got {self.data.dtype} "
                             f"{list(self.data.shape)}")
        if not self.data.is_contiguous():
            self.data = self.data.contiguous()

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    def codes(self) -> torch.Tensor:
        """The ternary weights int8 [n, k] in {-1, 0, 1}."""
        import torch
        return torch.from_numpy(format_module(self.fmt).unpack(self.data.numpy(), self.n, self.k))

    def gemm(self, xq: torch.Tensor, xsum: torch.Tensor | None = None, path: str | None = None) -> torch.Tensor:
        return gemm(xq, self, xsum=xsum, path=path)

    @classmethod
    def cat(cls, parts: list[PackedTernary]) -> PackedTernary:
        """Stack matrices of one input width along the outputs (q|k|v, gate|up): one call, one stream.

        Row blocks are whole 16-row units, so every part but the last needs n % 16 == 0.
        """
        import torch
        if not parts or any(p.k != parts[0].k or p.fmt != parts[0].fmt for p in parts):
            raise ValueError("PackedTernary.cat: parts must share their input width and format")
        if any(p.n % i2v.ROWS for p in parts[:-1]):
            raise ValueError(f"PackedTernary.cat: all but the last part need a multiple of {i2v.ROWS} outputs")
        return cls(torch.cat([p.data for p in parts]), sum(p.n for p in parts), parts[0].k, parts[0].fmt)


def pack(codes: torch.Tensor | np.ndarray, fmt: str = "i2v") -> PackedTernary:
    """Ternary weights int [N, K] in {-1, 0, 1} (quant.quantize_weights' codes) -> PackedTernary in fmt."""
    import torch
    w = codes.cpu().numpy() if isinstance(codes, torch.Tensor) else np.asarray(codes)
    return PackedTernary(torch.from_numpy(format_module(fmt).pack(w)), w.shape[0], w.shape[1], fmt)


def from_hf_packed(packed: torch.Tensor | np.ndarray, out_features: int) -> PackedTernary:
    """Hugging Face packed uint8 [ceil(out/4), in] (a PackedBitLinear's `weight`) -> PackedTernary.

    Native: one pass in C over all threads (the 2B4T model's 210 matrices in well under a second);
    otherwise formats/i2v.py's numpy reference (from_hf_packed_array).
    """
    import torch
    a = packed.cpu().numpy() if isinstance(packed, torch.Tensor) else np.asarray(packed)
    return PackedTernary(torch.from_numpy(from_hf_packed_array(a, out_features)), out_features, a.shape[1])


def from_hf_packed_array(packed: np.ndarray, out_features: int, fmt: str = "i2v") -> np.ndarray:
    """from_hf_packed on numpy, without torch (the native file converter): uint8 [ceil(out/4), in] ->
    I2V uint8 [Np/16, Kp/16, 64] (or T5 uint8 [Np/16, Kp/20, 64] for fmt "t5"), in C where built, else
    the formats/ module's reference."""
    mod = format_module(fmt)
    packed = np.asarray(packed)
    if packed.dtype != np.uint8 or packed.ndim != 2 or packed.shape[0] != hf_packed.packed_rows(out_features):
        raise ValueError(f"from_hf_packed: expected uint8 [{hf_packed.packed_rows(out_features)}, in], got "
                         f"{packed.dtype} {list(packed.shape)}")
    packed = np.ascontiguousarray(packed)
    k = packed.shape[1]
    if _native is None:
        return mod.from_hf_packed(packed, out_features)
    out = np.empty(mod.packed_shape(out_features, k), dtype=np.uint8)
    _native.from_hf_fmt(WEIGHT_FORMATS.index(fmt), packed.ctypes.data, out_features, k, out.ctypes.data)
    return out


def _as_rows(t: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    if t.dtype != dtype or t.dim() != 2 or t.device.type != "cpu":
        raise TypeError(f"{name} must be a 2-D CPU {dtype} tensor, got {t.dtype} {list(t.shape)} on {t.device}")
    return t if t.stride(1) == 1 else t.contiguous()


def gemm(xq: torch.Tensor, packed: PackedTernary, xsum: torch.Tensor | None = None, path: str | None = None,
         out: torch.Tensor | None = None) -> torch.Tensor:
    """Exact integer product xq [M, K] int8 @ W^T -> int32 [M, N].

    xsum (int32 [M], the row sums of xq, as quantize returns them) saves one pass over xq; path forces
    one of PATHS (tests, benchmarks); out (int32 [M, N], rows contiguous) is written in place.
    """
    import torch
    xq = _as_rows(xq, torch.int8, "xq")
    m, k = xq.shape
    if k != packed.k:
        raise ValueError(f"gemm: xq has {k} columns, the weights {packed.k}")
    if out is None:
        out = torch.empty(m, packed.n, dtype=torch.int32)
    elif out.dtype != torch.int32 or tuple(out.shape) != (m, packed.n) or out.stride(1) != 1:
        raise ValueError(f"gemm: out must be int32 [{m}, {packed.n}] with contiguous rows")
    if _native is None:
        if packed._dense is None:
            packed._dense = packed.codes().float()
        # float32 is exact here: every partial sum is an integer below 128 * K < 2**24 for K < 131072
        out.copy_(xq.float() @ packed._dense.t())
        return out
    if xsum is not None:
        if xsum.dtype != torch.int32 or xsum.numel() != m or not xsum.is_contiguous():
            raise ValueError(f"gemm: xsum must be a contiguous int32 tensor of {m} row sums")
        xsum_ptr = xsum.data_ptr()
    else:
        xsum_ptr = 0
    _native.gemm_fmt(WEIGHT_FORMATS.index(packed.fmt), xq.data_ptr(), xq.stride(0), xsum_ptr, m, k,
                     packed.data.data_ptr(), packed.n, out.data_ptr(), out.stride(0), _path_index(path))
    return out


def linear(x: torch.Tensor, packed: PackedTernary, weight_scale: torch.Tensor | float,
           path: str | None = None) -> torch.Tensor:
    """The BitLinear inference forward in one native call: float32 [..., N].

    y = (xq @ W^T) * (weight_scale / s) with (xq, s) = quant.quantize_activations(x): bit for bit what
    bitlinear.PackedBitLinear computes (in float32), without the intermediate tensors.
    """
    import torch
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    ws = float(weight_scale)
    if _native is None or packed.fmt != "i2v":  # the one-call C linear is I2V's; T5 quantizes, then gemm
        xq, s, xsum = quantize(x2, path=path)
        return (gemm(xq, packed, xsum=xsum, path=path).float() * (torch.tensor([ws]) / s)).reshape(*lead, packed.n)
    x2 = _as_rows(x2 if x2.dtype == torch.float32 else x2.float(), torch.float32, "x")
    m, k = x2.shape
    if k != packed.k:
        raise ValueError(f"linear: x has {k} features, the weights {packed.k}")
    y = torch.empty(m, packed.n, dtype=torch.float32)
    _native.linear(x2.data_ptr(), x2.stride(0), m, k, packed.data.data_ptr(), packed.n, ws, y.data_ptr(),
                   packed.n, _path_index(path))
    return y.reshape(*lead, packed.n)


def q6_gemv(xq: torch.Tensor, packed: torch.Tensor, h: int, xsum: torch.Tensor | None = None,
            path: str | None = None) -> torch.Tensor:
    """Exact int32 [M, V] = xq [M, h] int8 @ q^T for Q6 rows (formats/q6.py: uint8 [V, 48 * ceil(h/64)]).

    The 6-bit output head: logits = result * (row scale / s). AVX-512 VBMI when the CPU has it (on the
    avx512vnni and amx paths), else the scalar reference.
    """
    import torch
    xq = _as_rows(xq, torch.int8, "xq")
    m, k = xq.shape
    hp = q6.padded_cols(h)
    if k != h or packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] != hp // 64 * 48:
        raise ValueError(f"q6_gemv: xq [M, {h}] int8 and packed uint8 [V, {hp // 64 * 48}] expected")
    packed = packed.contiguous()
    v = packed.shape[0]
    if _native is None:
        w = torch.from_numpy(q6.unpack(packed.numpy(), h)).float()
        return (xq.float() @ w.t()).to(torch.int32)  # exact: |partial sums| <= 31 * 128 * h < 2**24
    if hp != k or xq.stride(0) != k:
        xp = torch.zeros(m, hp, dtype=torch.int8)
        xp[:, :k] = xq
        xq = xp
    out = torch.empty(m, v, dtype=torch.int32)
    _native.q6_gemv(packed.data_ptr(), v, h, xq.data_ptr(), xq.stride(0), 0 if xsum is None else xsum.data_ptr(), m,
                    out.data_ptr(), v, _path_index(path))
    return out


def quantize(x: torch.Tensor, path: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token absmax int8 (quant.quantize_activations, bit for bit) plus the row sums for gemm.

    x float [M, K] -> (xq int8 [M, K], s float32 [M, 1] with x ~ xq / s, xsum int32 [M]).
    """
    import torch
    if _native is None:
        from .. import quant
        xq, s = quant.quantize_activations(x)
        return xq, s, xq.sum(dim=-1, dtype=torch.int32)
    x = _as_rows(x if x.dtype == torch.float32 else x.float(), torch.float32, "x")
    m, k = x.shape
    xq = torch.empty(m, k, dtype=torch.int8)
    s = torch.empty(m, 1, dtype=torch.float32)
    xsum = torch.empty(m, dtype=torch.int32)
    _native.quantize(x.data_ptr(), x.stride(0), m, k, xq.data_ptr(), k, s.data_ptr(), xsum.data_ptr(),
                     _path_index(path))
    return xq, s, xsum


def read_bandwidth_probe(buf: torch.Tensor) -> int:
    """Read every byte of a contiguous CPU tensor with SIMD loads on all pool threads (benchmarks)."""
    if _native is None:
        raise RuntimeError("the bandwidth probe needs the native library")
    return _native.read_bytes(buf.data_ptr(), buf.numel() * buf.element_size())


__all__ = ["PATHS", "WEIGHT_FORMATS", "PackedTernary", "format_module", "available", "from_hf_packed", "gemm", "info", "linear", "pack", "q6_gemv",
           "quantize", "set_num_threads", "summary"]
