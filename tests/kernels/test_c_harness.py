"""The kernel library alone, in C (tests/kernels/c/exact.c): every kernel path against the scalar and naive
references, whatever CPU runs the tests.

- natively: the paths this CPU has (AMX only here: no emulator offers it);
- the AVX-512 VNNI/VBMI kernels built on SIMDe's portable intrinsics (-DI2V_SIMDE, kernels/x86_avx512.h),
  run natively and under qemu-user as an AVX2-only CPU, so they are checked on any x86-64 CPU;
- the NEON kernels for AArch64 through a cross compiler, under qemu-user;
- on each, the attention kernels over the KV cache (kvops.c) against its scalar reference and the softmax
  numerators (vecops.c) against exp in double, natively built ones only (not the SIMDe-emulated AVX-512
  path);
- tests/kernels/c/whole_forward.c: the whole forward (bitnet.h) of a small random model on every natively
  built path and on NEON under qemu, against the scalar path;
- tests/kernels/c/ahead_walk.c: the lines p.v requests of the next unit's keys (bitnet_impl.h's ahead),
  recorded, natively and on NEON under qemu.

The tools (Debian/Ubuntu): apt-get install libsimde-dev gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user
(.ci/run installs them). Without them these tests skip on a developer's machine and fail in CI (CI set).
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
KDIR = ROOT / "src" / "bitlm" / "kernels"
HARNESS = ROOT / "tests" / "kernels" / "c" / "exact.c"
LIBRARY = ["dispatch.c", "pool.c", "scalar.c", "avx2.c", "amx.c", "neon.c", "convert.c", "kvops.c", "vecops.c"]
AVX512 = ["avx512vnni.c", "avx512vbmi.c"]
APT = "apt-get install libsimde-dev gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user"
CFLAGS = ["-std=c11", "-Wall", "-Werror", f"-I{KDIR}"]
X86 = platform.machine().lower() in ("x86_64", "amd64")


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false")


def _require(found, what: str):
    """found, or a skip naming what to install (a failure in CI, which must run every path)."""
    if found:
        return found
    msg = f"{what} not found; install it (Debian/Ubuntu: sudo {APT})"
    if _in_ci():
        pytest.fail(f"{msg}: CI must run this test (.ci/run installs it)")
    pytest.skip(msg)


def _which(*names: str) -> str | None:
    return next((p for p in map(shutil.which, names) if p), None)


def _objects(cc: str, d: Path, units: list[tuple[str, list[str]]]) -> list[str]:
    """Each (source, flags) compiled to an object in d, all at once (2 cores: a few seconds in all)."""
    d.mkdir(parents=True, exist_ok=True)
    jobs = []
    for src, flags in units:
        cmd = [cc, *CFLAGS, *flags, "-c", src, "-o", str(d / f"{Path(src).stem}.o")]
        jobs.append((cmd, subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)))
    for cmd, proc in jobs:
        err = proc.communicate()[1]
        assert proc.returncode == 0, f"{' '.join(cmd)}\n{err}"
    return [cmd[-1] for cmd, _ in jobs]


def _build(cc: str, d: Path, units: list[tuple[str, list[str]]], link: list[str], objs=()) -> Path:
    """The harness d/exact from units and the objects objs already made."""
    cmd = [cc, *_objects(cc, d, units), *objs, "-o", str(d / "exact"), *link, "-lpthread", "-lm"]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stderr}"
    return d / "exact"


def _sources(files: list[str], flags: list[str]) -> list[tuple[str, list[str]]]:
    return [(str(KDIR / f), flags) for f in files]


def _run(cmd: list[str]) -> str:
    """The harness's output; a mismatch on any path fails here (exit status 1, the MISMATCH lines shown)."""
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "MISMATCH" not in res.stdout and "FAILED" not in res.stdout, res.stdout
    return res.stdout


def _exact_paths(out: str) -> list[str]:
    return re.findall(r"^path (\w+): exact ", out, re.M)


def _features(out: str) -> list[str]:
    return re.search(r"^features: (.*)$", out, re.M).group(1).split()


@pytest.fixture(scope="module")
def host(tmp_path_factory) -> tuple[str, tuple[str, ...]]:
    """The host C compiler and the library's objects that both x86 builds share (all but dispatch.c and
    the AVX-512 kernels, which the SIMDe build compiles its own way)."""
    cc = _require(_which("gcc", "cc"), "a C compiler")
    common = [f for f in LIBRARY if f != "dispatch.c"]
    objs = _objects(cc, tmp_path_factory.mktemp("host"), _sources(common, ["-O2"]))
    return cc, tuple(objs)


@pytest.fixture(scope="module")
def simde_harness(host, tmp_path_factory) -> Path:
    """exact.c with the AVX-512 kernels on SIMDe. Those two files at -O0: at -O2 GCC spends minutes
    inlining the emulated intrinsics into the kernels' unrolled tiles; at -O0 they build in about a second
    and run the harness's small shapes in about one."""
    cc, objs = host
    if not X86:
        pytest.skip("the SIMDe build emulates the x86 AVX-512 kernels: x86-64 only")
    _require(_has_simde(cc), "SIMDe (libsimde-dev)")
    units = [(str(HARNESS), ["-O2", "-DI2V_SIMDE"]), *_sources(["dispatch.c"], ["-O2", "-DI2V_SIMDE"]),
             *_sources(AVX512, ["-O0", "-Wno-psabi", "-DI2V_SIMDE"])]
    return _build(cc, tmp_path_factory.mktemp("simde"), units, [], objs)


def _has_simde(cc: str) -> bool:
    res = subprocess.run([cc, "-E", "-x", "c", "-", "-o", os.devnull], input="#include <simde/x86/avx512.h>\n",
                         capture_output=True, text=True, check=False)
    return res.returncode == 0


def test_native_paths_exact(host, tmp_path):
    cc, objs = host
    units = [(str(HARNESS), ["-O2"]), *_sources(["dispatch.c", *AVX512], ["-O2"])]
    text = _run([str(_build(cc, tmp_path, units, [], objs))])
    paths = _exact_paths(text)
    assert "scalar" in paths
    if "avx2" in paths:  # kvops.c's x86 loops ran (AVX-512 ones where the CPU has them)
        assert re.search(r"^path avx2: exact .*attention kernels and softmax avx2", text, re.M), text
    from bitlm import kernels
    if kernels.available():  # the harness ran every path the binding offers on this CPU (AMX where it is)
        assert sorted(paths) == sorted(kernels.info()["paths"]), text


def test_avx512_kernels_exact_on_simde(simde_harness):
    text = _run([str(simde_harness)])
    assert "avx512vnni" in _exact_paths(text) and "amx" not in _exact_paths(text), text
    assert re.search(r"^path avx512vnni: exact .*q6 head kernel avx512vbmi.*SIMDe", text, re.M), text


def test_avx512_kernels_exact_on_an_avx2_only_cpu(simde_harness):
    """The SIMDe build under qemu-user as a Haswell (AVX2, no AVX-512): the emulated paths are offered and
    exact whatever CPUID says."""
    if not X86:
        pytest.skip("x86-64 only")
    qemu = _require(_which("qemu-x86_64", "qemu-x86_64-static"), "qemu-user (qemu-x86_64)")
    text = _run([qemu, "-cpu", "Haswell", str(simde_harness)])
    assert "avx512f" not in _features(text), text  # the CPU qemu showed had no AVX-512
    assert re.search(r"^path avx512vnni: exact .*q6 head kernel avx512vbmi.*SIMDe", text, re.M), text


def _cross_neon() -> tuple[str, str]:
    """The AArch64 cross compiler and qemu-user to run what it builds (x86-64 hosts only)."""
    if not X86:
        pytest.skip("the cross build targets AArch64 from x86-64; on ARM the native tests run NEON")
    cc = _require(_which("aarch64-linux-gnu-gcc"), "the AArch64 cross compiler (gcc-aarch64-linux-gnu)")
    qemu = _require(_which("qemu-aarch64", "qemu-aarch64-static"), "qemu-user (qemu-aarch64)")
    return cc, qemu


def test_neon_path_exact_under_qemu(tmp_path):
    cc, qemu = _cross_neon()
    units = [(str(HARNESS), ["-O2"]), *_sources(LIBRARY + AVX512, ["-O2"])]
    text = _run([qemu, "-cpu", "max", str(_build(cc, tmp_path, units, ["-static"]))])
    assert sorted(_exact_paths(text)) == ["neon", "scalar"], text
    assert re.search(r"^path neon: exact .*attention kernels and softmax neon", text, re.M), text  # kvops.c's NEON loops
    assert re.search(r"^path neon: exact .*q6 head kernel neon", text, re.M), text


AHEAD = ROOT / "tests" / "kernels" / "c" / "ahead_walk.c"


def _ahead_walk(cc: str, d: Path, link: list[str]) -> Path:
    """ahead_walk.c, which includes kvops.c itself (its prefetches recorded), and the rest of the library."""
    units = [(str(AHEAD), ["-O2"]), *_sources([f for f in LIBRARY + AVX512 if f != "kvops.c"], ["-O2"])]
    return _build(cc, d, units, link)


def test_pv_requests_the_ahead_stream_line_by_line(tmp_path):
    """tests/kernels/c/ahead_walk.c: each native p.v kernel requests exactly the lines of bitnet_impl.h's
    `ahead` stream (the next unit's keys in attention.c), each once, over calls of every shape; the scalar
    reference none."""
    cc = _require(_which("gcc", "cc"), "a C compiler")
    text = _run([str(_ahead_walk(cc, tmp_path, []))])
    assert re.search(r"^ahead walk: \d+ calls exact$", text, re.M), text


def test_neon_pv_requests_the_ahead_stream_under_qemu(tmp_path):
    cc, qemu = _cross_neon()
    text = _run([qemu, "-cpu", "max", str(_ahead_walk(cc, tmp_path, ["-static"]))])
    assert re.search(r"^ahead walk: \d+ calls exact$", text, re.M), text


def _runtime_files() -> list[str]:
    """Every C file the package builds (setup.py SOURCES) but the Python binding."""
    import ast
    tree = ast.parse((ROOT / "setup.py").read_text())
    sources = next(ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                   and any(getattr(t, "id", None) == "SOURCES" for t in node.targets))
    return [f for f in sources if f != "module.c"]


FORWARD = ROOT / "tests" / "kernels" / "c" / "whole_forward.c"  # not forward.c: objects are named by stem


def _forward_units() -> list[tuple[str, list[str]]]:
    """whole_forward.c and the runtime it drives."""
    return _sources(_runtime_files(), ["-O2", "-fno-strict-aliasing"]) + [(str(FORWARD), ["-O2"])]


def _forward_paths(text: str) -> set[str]:
    """The paths whole_forward.c compared with the scalar one, each in all 36 of its models."""
    paths = re.findall(r"^ok path (\w+) ", text, re.M)
    if not paths:
        pytest.skip("this CPU offers no kernel path but the scalar one")
    assert all(paths.count(p) == 36 for p in set(paths)), text
    return set(paths)


def test_the_whole_forward_on_every_native_path(tmp_path):
    """tests/kernels/c/whole_forward.c: bitnet.h's forward of a small random model (both weight formats,
    three KV kinds, int8 and 6-bit heads; a prefill, then decode steps) on each path this CPU has, against
    the scalar path, within float rounding."""
    cc = _require(_which("gcc", "cc"), "a C compiler")
    text = _run([str(_build(cc, tmp_path, _forward_units(), []))])
    assert "avx2" in _forward_paths(text) or not X86, text  # the x86-64 machines here all have AVX2


def test_the_whole_forward_on_neon_under_qemu(tmp_path):
    """The same for AArch64 under qemu-user: the NEON forward, attention and heads together (the only run
    of them: the Python package is built for the host)."""
    cc, qemu = _cross_neon()
    text = _run([qemu, "-cpu", "max", str(_build(cc, tmp_path, _forward_units(), ["-static"]))])
    assert _forward_paths(text) == {"neon"}, text


def test_the_whole_runtime_compiles_for_aarch64(tmp_path):
    """Every C file the package builds (setup.py SOURCES, all but the Python binding) compiles for AArch64
    without a warning: the forward, attention and head files, which exact.c does not build (kvops.c: its
    AVX2/AVX-512 kernels must stay behind their x86 guards; exact.c runs its NEON ones). An ARM user's
    install builds them all."""
    if not X86:
        pytest.skip("the cross build targets AArch64 from x86-64; on ARM the package build itself compiles them")
    cc = _require(_which("aarch64-linux-gnu-gcc"), "the AArch64 cross compiler (gcc-aarch64-linux-gnu)")
    files = _runtime_files()
    assert {"kvops.c", "attention.c", "forward.c", "head.c"} <= set(files)
    objs = _objects(cc, tmp_path, _sources(files, ["-O2", "-fno-strict-aliasing"]))
    assert len(objs) == len(files)
