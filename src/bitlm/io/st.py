"""safetensors without torch: memory-mapped numpy views for reading, a streaming writer.

The file format: an 8-byte little-endian header length, a JSON header {name: {dtype, shape,
data_offsets: [begin, end]}, "__metadata__": {str: str}}, then the tensor bytes. bf16 has no numpy
dtype, so it is read and written as uint16 bit patterns (names ending the same, dtype "BF16").
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
from pathlib import Path

import numpy as np

from ..errors import BitlmError
from .files import atomic_file

_NP = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64, "I8": np.int8, "U8": np.uint8,
       "I16": np.int16, "U16": np.uint16, "I32": np.int32, "I64": np.int64, "BOOL": np.bool_, "U32": np.uint32,
       "U64": np.uint64}
# bits per element of every dtype the format defines (safetensors 0.6), read or not: a header naming
# another is malformed; one naming a dtype numpy lacks (F8_E4M3, ...) is whole but cannot be mapped
_BITS = {**{k: 8 * np.dtype(v).itemsize for k, v in _NP.items()}, "C64": 64, "F4": 4, "F6_E2M3": 6,
         "F6_E3M2": 6, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8}
_ST = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.float64): "F64",
       np.dtype(np.int8): "I8", np.dtype(np.uint8): "U8", np.dtype(np.int16): "I16", np.dtype(np.int32): "I32",
       np.dtype(np.int64): "I64", np.dtype(np.uint16): "U16"}
_ALIGN = 64  # tensor data starts on 64-byte boundaries: SIMD loads straight from the mapping
PAD = "__pad"  # names of the padding tensors that keep them there (skipped by open_arrays)


_MAX_HEADER = 100 << 20  # bytes of JSON header accepted: a real one is a few MB at most
_MAX_DIMS = 32


class DamagedFile(BitlmError):
    """A safetensors file that is not whole or not well formed. .reason says what is wrong, without
    the file name or the advice, for callers that word their own message (the native cache)."""

    def __init__(self, path, reason: str):
        super().__init__(f"{path}: {reason}; write or download it again")
        self.reason = reason


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_entries(path, header, data_size: int) -> None:
    """Each tensor entry: a dtype, a shape and data offsets that hold exactly that many bytes, and the
    entries together tile the data section (data_size bytes) from 0 to its end without gaps or overlaps,
    as the reference reader (safetensors) demands. Sizes are Python ints: a shape of 2**40 x 2**40
    cannot wrap around, and nothing is allocated or mapped before it fits the file."""
    if not isinstance(header, dict):
        raise DamagedFile(path, "not a safetensors file (its header is not a JSON object)")
    meta = header.get("__metadata__", {})
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise DamagedFile(path, "malformed __metadata__ (it must map names to strings)")
    spans = []
    for name, v in header.items():
        if name == "__metadata__":
            continue
        try:
            (b, e), shape, dt = v["data_offsets"], v["shape"], v["dtype"]
            ok = _is_int(b) and _is_int(e) and 0 <= b <= e and isinstance(shape, list) and \
                len(shape) <= _MAX_DIMS and all(_is_int(d) and d >= 0 for d in shape) and \
                isinstance(dt, str) and dt in _BITS and (e - b) * 8 == math.prod(shape) * _BITS[dt]
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise DamagedFile(path, f"tensor {name!r} has a malformed header entry ({str(v)[:120]})")
        spans.append((b, e, name))
    end = 0
    for b, e, name in sorted(spans):
        if b != end:
            what = "overlaps the tensor before it" if b < end else f"leaves a gap of {b - end} bytes before it"
            raise DamagedFile(path, f"tensor {name!r} {what} (data_offsets [{b}, {e}])")
        end = e
    if end != data_size:
        if end > data_size:
            raise DamagedFile(path, f"truncated: the header promises {end} bytes of data, the file holds "
                                    f"{data_size}")
        raise DamagedFile(path, f"{data_size - end} bytes after the last tensor (the header accounts for "
                                f"{end} of {data_size})")


def read_header(path) -> tuple[dict, int]:
    """(header dict, offset of the data section). Reads only the header (its length is checked against
    the file's size and a cap before any of it is read)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            raw = f.read(8)
            if len(raw) != 8:
                raise DamagedFile(path, f"not a safetensors file (only {len(raw)} bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > min(_MAX_HEADER, size - 8):
                what = "truncated" if n <= _MAX_HEADER else "not a safetensors file"
                raise DamagedFile(path, f"{what}: its header length is {n} bytes, the file has {size}")
            text = f.read(n)
            if len(text) != n:
                raise DamagedFile(path, f"truncated: its header length is {n} bytes, it could read {len(text)}")
        header = json.loads(text)
    except OSError as e:
        raise BitlmError(f"{path}: cannot read ({e.strerror or e})") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise DamagedFile(path, f"not a safetensors file (its header is not JSON: {str(e)[:120]})") from None
    _check_entries(path, header, size - 8 - n)
    return header, 8 + n


def open_arrays(path) -> tuple[dict[str, np.ndarray], dict]:
    """name -> read-only memory-mapped array (BF16 as uint16), and the __metadata__ dict."""
    header, start = read_header(path)
    return map_arrays(path, header, start), header.get("__metadata__") or {}


def map_arrays(path, header: dict, start: int) -> dict[str, np.ndarray]:
    """open_arrays' arrays from a header read_header has already read and checked (header, start)."""
    for name, info in header.items():
        if name != "__metadata__" and not name.startswith(PAD) and info["dtype"] not in _NP:
            raise BitlmError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
    try:
        mm = np.memmap(path, dtype=np.uint8, mode="r")
    except OSError as e:
        raise BitlmError(f"{path}: cannot map ({e.strerror or e})") from None
    except ValueError:  # an empty file cannot be mapped; read_header refuses those first
        raise DamagedFile(path, "empty") from None
    out = {}
    for name, info in header.items():
        if name == "__metadata__" or name.startswith(PAD):
            continue
        b, e = info["data_offsets"]
        out[name] = mm[start + b:start + e].view(_NP[info["dtype"]]).reshape(info["shape"])
    return out


class Lazy:
    """A tensor made only when it is written (shape and dtype known up front): big files are written
    one tensor in memory at a time."""

    def __init__(self, shape, dtype, make, st_dtype: str | None = None):
        self.shape, self.dtype, self.make = tuple(shape), np.dtype(dtype), make
        self.st_dtype = st_dtype or _ST[self.dtype]
        self.nbytes = int(np.prod(self.shape)) * self.dtype.itemsize


def _root(a: np.ndarray) -> np.ndarray:
    """The array a view was made from, through every level of views (a memmap's views are memmaps too)."""
    while isinstance(a, np.ndarray) and isinstance(a.base, np.ndarray):
        a = a.base
    return a


def file_span(a: np.ndarray) -> tuple[str, int] | None:
    """(file name, byte offset) of an array that open_arrays mapped from a file, else None. Views of
    a memmap are memmaps too, but carry the root's offset, so the offset is taken from the root."""
    root = _root(a)
    if not isinstance(root, np.memmap) or not getattr(root, "filename", None):
        return None
    return root.filename, a.ctypes.data - root.ctypes.data + root.offset


def prefetch_to_page_cache(a: np.ndarray) -> None:
    """Have a file-mapped array's pages read into the page cache by a background thread (the
    embedding: the native runtime reads its rows with pread, so they are then copies from the page
    cache, not 0.3 ms disk reads, and never resident in this process). One WILLNEED for the whole range
    would read only the first read-ahead window (the kernel caps it), so it is asked for in 2 MB
    pieces."""
    import threading
    span = file_span(a)
    if span is None or not hasattr(os, "posix_fadvise"):
        return
    filename, start = span
    end = start + a.nbytes

    def prefetch():
        try:
            fd = os.open(filename, os.O_RDONLY)
            try:
                for off in range(start, end, 2 << 20):
                    os.posix_fadvise(fd, off, min(2 << 20, end - off), os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)
        except OSError:
            pass  # advice only

    threading.Thread(target=prefetch, name="bitlm-prefetch", daemon=True).start()


def advise_huge_pages(arrays: dict[str, np.ndarray]) -> None:
    """Ask for 2 MB pages on the file mappings under `arrays` (MADV_HUGEPAGE): where the kernel keeps
    the file's page cache in large folios (ext4, xfs, ... on recent kernels), pages faulted in from disk
    then come in 2 MB folios mapped by one page-table entry each, and a decode streaming the weights
    skips a page walk every 4 KB (benchmarks/README.md: "huge pages for mapped weights"). Advice only:
    pages already cached in 4 KB folios stay so (release_page_cache makes a fresh file's go back)."""
    import mmap
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return
    roots = {}
    for a in arrays.values():
        root = _root(a)
        if isinstance(root, np.memmap) and getattr(root, "_mmap", None) is not None:
            roots[id(root._mmap)] = root._mmap
    for m in roots.values():
        with contextlib.suppress(OSError, ValueError):
            m.madvise(mmap.MADV_HUGEPAGE)


def release_page_cache(path) -> None:
    """Write a new file's dirty pages to disk and drop them from the page cache. Pages made by write()
    sit in 4 KB folios; once dropped, the first load reads them back through the mapping, where the
    kernel can allocate 2 MB folios (advise_huge_pages): one disk read of the file on its first load
    buys faster decoding for as long as it stays cached. Advice only: errors are ignored."""
    if not hasattr(os, "posix_fadvise"):
        return
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_to_memory(arrays: dict[str, np.ndarray], names) -> dict[str, np.ndarray]:
    """Copies of the named file-mapped arrays in one anonymous mapping that asks for transparent huge
    pages, read with pread (the file's pages go to the page cache, never into this process's resident
    set, so the peak is one copy). 2 MB pages instead of 4 KB ones spare the streaming reads a page
    walk every 4 KB: benchmarks/weights_in_memory.py measured decode 3-5% faster and prompt processing
    4% slower here."""
    import mmap
    huge = 2 << 20
    names = list(names)
    spans = {n: file_span(arrays[n]) for n in names}
    if any(v is None for v in spans.values()):
        raise BitlmError(f"read_to_memory: {[n for n, v in spans.items() if v is None]} are not mapped from a file")
    size = sum(-(-arrays[n].nbytes // 64) * 64 for n in names) + huge
    buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        buf.madvise(mmap.MADV_HUGEPAGE)
    base = np.frombuffer(buf, np.uint8)
    off = -base.ctypes.data % huge  # the tensors start on a huge-page boundary
    out, files = {}, {}
    try:
        for n in names:
            a = arrays[n]
            filename, start = spans[n]
            if filename not in files:
                files[filename] = os.open(filename, os.O_RDONLY)
            view = memoryview(base[off:off + a.nbytes])
            done = 0
            while done < a.nbytes:
                got = os.preadv(files[filename], [view[done:done + (64 << 20)]], start + done)
                if got <= 0:
                    raise BitlmError(f"{filename}: tensor {n!r} ends early (the file was truncated?); "
                                     "write or download it again")
                done += got
            out[n] = base[off:off + a.nbytes].view(a.dtype).reshape(a.shape)
            off += -(-a.nbytes // 64) * 64
    except OSError as e:
        raise BitlmError(f"reading weights into memory: {e}") from None
    finally:
        for fd in files.values():
            os.close(fd)
    return out


def _layout(tensors: dict) -> tuple[list, int]:
    """[(name, dtype name, array or Lazy, offset)] with the padding tensors that keep each aligned, and
    the data section's size in bytes."""
    items = []
    offset = 0
    for name, v in tensors.items():
        if isinstance(v, Lazy):
            dt, a = v.st_dtype, v
        else:
            dt, a = v if isinstance(v, tuple) else (_ST[np.dtype(v.dtype)], v)
        gap = -offset % _ALIGN
        if gap:  # safetensors allows no holes: an explicit padding tensor keeps the next one aligned
            items.append((f"{PAD}{len(items)}", "U8", np.zeros(gap, np.uint8), offset))
            offset += gap
        items.append((name, dt, a, offset))
        offset += a.nbytes
    return items, offset


def data_size(tensors: dict) -> int:
    """The bytes of the data section write() makes of these tensors (a writer can record it in the
    metadata, for a reader to check the file against)."""
    return _layout(tensors)[1]


def write(path, tensors: dict, metadata: dict[str, str], progress=None) -> None:
    """Write tensors atomically (a unique temporary file beside `path`, renamed over it when complete:
    concurrent writers of one path never mix their bytes), streaming. A value is an array, (dtype
    name, array) for BF16 bit patterns stored as uint16, or a Lazy. progress.update(1) is called after
    each tensor (io/progress.Progress)."""
    path = Path(path)
    items, _ = _layout(tensors)
    header = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}}
    for name, dt, a, off in items:
        header[name] = {"dtype": dt, "shape": list(a.shape), "data_offsets": [off, off + a.nbytes]}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % _ALIGN)  # the data section starts aligned too
    try:
        with atomic_file(path) as tmp, open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            pos = 0
            for name, dt, a, off in items:
                f.write(b"\0" * (off - pos))
                if isinstance(a, Lazy):
                    made = np.asarray(a.make(), dtype=a.dtype)
                    if made.shape != a.shape:
                        raise ValueError(f"{name}: made {made.shape}, declared {a.shape}")
                    a = made
                f.write(np.ascontiguousarray(a).reshape(-1).view(np.uint8).data)
                pos = off + a.nbytes
                if progress is not None:
                    progress.update(1)
    except OSError as e:  # a full disk, a directory that cannot be written
        raise BitlmError(f"{path}: cannot write ({e.strerror or e})") from None
