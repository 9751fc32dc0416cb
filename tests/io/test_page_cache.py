"""The native file's pages: a file just written leaves the page cache (st.release_page_cache), so its
first load faults it back in through a mapping that asks for 2 MB pages (st.advise_huge_pages). What
the kernel then allocates depends on the kernel and the filesystem, so these tests check what bitlm
asks for (the mapping's VM flags) and what it leaves cached (mincore), not the page sizes."""

import ctypes
import mmap
import os
import sys

import numpy as np
import pytest

from bitlm.io import st
from helpers import resident_pages, vm_flags

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"),
                                reason="MADV_HUGEPAGE, mincore and /proc/self/smaps are Linux's")


def cached_page_set(path) -> set[int]:
    """The indices of the file's pages that are in the page cache: mincore over a fresh read-only
    mapping, which touches none of them."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
    libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
    finally:
        os.close(fd)
    try:
        return resident_pages(addr, size)
    finally:
        libc.munmap(addr, size)


def write_file(path, n=3 << 20):
    st.write(path, {"a": np.arange(n, dtype=np.uint8)}, {"k": "v"})


def test_a_written_file_leaves_the_page_cache(tmp_path):
    path = tmp_path / "f.safetensors"
    write_file(path)
    before = cached_page_set(path)
    st.release_page_cache(path)
    after = cached_page_set(path)
    assert len(before) == -(-os.path.getsize(path) // mmap.PAGESIZE) and not after, (len(before), len(after))
    arrays, _ = st.open_arrays(path)  # and it reads back whole
    assert np.array_equal(arrays["a"], np.arange(3 << 20, dtype=np.uint8))


def test_mapped_weights_ask_for_huge_pages(tmp_path):
    path = tmp_path / "f.safetensors"
    write_file(path)
    arrays, _ = st.open_arrays(path)
    addr = arrays["a"].ctypes.data
    assert "hg" not in vm_flags(addr)
    st.advise_huge_pages(arrays)
    assert "hg" in vm_flags(addr)


def test_files_made_for_the_cache_leave_the_page_cache(tmp_path):
    """ensure_file (every conversion for the native runtime, bench's random models) releases what its
    build wrote."""
    from bitlm.io.native import ensure_file
    path = tmp_path / "made.safetensors"
    assert ensure_file(path, {"test": 1}, lambda: write_file(path)) is True  # built here
    assert path.exists() and not cached_page_set(path)


def test_the_native_runtime_maps_weights_for_huge_pages(tiny_model_dir, tmp_path, monkeypatch):
    pytest.importorskip("bitlm.kernels._native")
    import bitlm
    monkeypatch.setenv("BITLM_CACHE", str(tmp_path / "cache"))
    nm = bitlm.load_native(tiny_model_dir, tokenizer=False)
    proj = next(v for k, v in nm.arrays.items() if k.endswith("mlp.down_proj"))
    assert "hg" in vm_flags(proj.ctypes.data)
    assert "hg" in vm_flags(nm.arrays["scales"].ctypes.data)
    off = bitlm.load_native(tiny_model_dir, tokenizer=False, mmap=False)  # copies on anonymous huge pages
    assert "hg" in vm_flags(next(v for k, v in off.arrays.items() if k.endswith("mlp.down_proj")).ctypes.data)
