"""The kernel library alone, in C (tests/kernels/c/exact.c): natively, and for AArch64 under qemu-user
when a cross compiler is installed (apt: gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user-static),
which is how the NEON path is checked on an x86 machine."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
KDIR = ROOT / "src" / "bitlm" / "kernels"
LIBRARY = ["dispatch.c", "pool.c", "scalar.c", "avx2.c", "avx512vnni.c", "avx512vbmi.c", "amx.c", "neon.c",
           "convert.c"]


def _build_and_run(cc: str, out: Path, runner: list[str], extra: list[str]) -> str:
    src = [str(ROOT / "tests" / "kernels" / "c" / "exact.c")] + [str(KDIR / f) for f in LIBRARY]
    subprocess.run([cc, "-O2", "-std=c11", "-Wall", "-Werror", f"-I{KDIR}", *src, "-o", str(out), *extra,
                    "-lpthread", "-lm"], check=True, capture_output=True, text=True)
    res = subprocess.run([*runner, str(out)], capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


def test_native_paths_exact(tmp_path):
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler")
    out = _build_and_run(cc, tmp_path / "exact", [], [])
    assert "path scalar: exact" in out


def test_neon_path_exact_under_qemu(tmp_path):
    cc, qemu = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("qemu-aarch64-static")
    if cc is None or qemu is None:
        pytest.skip("no AArch64 cross compiler / qemu-user (see the module docstring)")
    out = _build_and_run(cc, tmp_path / "exact-arm", [qemu, "-cpu", "max"], ["-static"])
    assert "path neon: exact" in out and "path scalar: exact" in out
