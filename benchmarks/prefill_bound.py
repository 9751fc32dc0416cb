"""How close the AVX2 prefill GEMM is to what the core can issue.

    python benchmarks/prefill_bound.py [--rounds 9] [--m 48]

Builds benchmarks/avx2_issue_bound.c with the system C compiler into a shared library: loops that time
the clock (a chain of dependent scalar adds) and 12 independent vpmaddubsw + vpaddw pairs, the inner
step of every AVX2 int8 GEMM (each pair: 32 multiply-adds into an int16 accumulator). Their rate is the
ceiling. bitlm's GEMM runs 1 thread at the four matrix shapes of the 2B4T model with M = --m activation
rows (48: the native runtime's micro-batch), warm weights, alternately with the ceiling loop (each
GEMM timing next to a loop of the same length), so that both see the same neighbours on a shared
machine; per shape, the median over the rounds of GEMM multiply-adds/s over the loop's. Never imported
by the tests.
"""

from __future__ import annotations

import argparse
import ctypes
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from bitlm import kernels

SHAPES_2B4T = [(2560, 2560), (2560, 640), (2560, 6912), (6912, 2560)]  # (in, out): q/o, k/v, gate/up, down
HERE = Path(__file__).resolve().parent


def build_loops(tmp: Path) -> ctypes.CDLL:
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise SystemExit("prefill_bound.py: no C compiler (cc, gcc or clang) on PATH to build avx2_issue_bound.c")
    lib = tmp / "avx2_issue_bound.so"
    subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(lib), str(HERE / "avx2_issue_bound.c")], check=True)
    loops = ctypes.CDLL(str(lib))
    loops.issue_seconds.argtypes = [ctypes.c_int, ctypes.c_long]
    loops.issue_seconds.restype = ctypes.c_double
    return loops


LOOP_CLOCK, LOOP_MADD, LOOP_ADD, LOOP_PAIRS, LOOP_TILE = range(5)
PAIRS_MACS = 12 * 32  # multiply-adds per iteration of LOOP_PAIRS and LOOP_TILE


def gemm_seconds(x: torch.Tensor, xsum: torch.Tensor, packed, out: torch.Tensor, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        kernels.gemm(x, packed, xsum=xsum, out=out)
        times.append(time.perf_counter() - t)
    return min(times)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--m", type=int, default=48, help="activation rows per GEMM (default 48, the micro-batch)")
    args = ap.parse_args(argv)
    info = kernels.info()
    if info["path"] != "avx2":
        print(f"note: the kernel path here is {info['path']}, not avx2; the ceiling below is AVX2's")
    kernels.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        loops = build_loops(Path(tmp))
        n = 2_000_000
        ghz = [4 * n / loops.issue_seconds(LOOP_CLOCK, n) / 1e9 for _ in range(3)]
        cycles = {name: statistics.median(loops.issue_seconds(which, n) for _ in range(3)) * statistics.median(ghz) * 1e9 / n
                  for name, which in (("vpmaddubsw", LOOP_MADD), ("vpaddw", LOOP_ADD),
                                      ("vpmaddubsw + vpaddw", LOOP_PAIRS), ("the AVX2 tile's step", LOOP_TILE))}
        clock = statistics.median(ghz)
        print(f"clock {clock:.2f} GHz; cycles per 12: " + ", ".join(f"{k} {v:.2f}" for k, v in cycles.items()))
        print(f"ceiling: {PAIRS_MACS / cycles['vpmaddubsw + vpaddw']:.1f} multiply-adds per cycle per core\n")
        print("| shape (in x out) | M | G multiply-adds/s | ceiling, same moments | % of the ceiling | per cycle |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for k, n_out in SHAPES_2B4T:
            packed = kernels.pack(torch.randint(-1, 2, (n_out, k), dtype=torch.int8, generator=g))
            x = torch.randint(-128, 128, (args.m, k), dtype=torch.int8, generator=g)
            xsum, out = x.sum(dim=1, dtype=torch.int32), torch.empty(args.m, n_out, dtype=torch.int32)
            macs = args.m * n_out * k
            sec = gemm_seconds(x, xsum, packed, out)
            iters = max(1000, int(sec * clock * 1e9 / cycles["vpmaddubsw + vpaddw"]))  # a loop as long as one GEMM
            rates, ceilings = [], []
            for _ in range(args.rounds):
                ceilings.append(min(PAIRS_MACS * iters / loops.issue_seconds(LOOP_PAIRS, iters) for _ in range(3)))
                rates.append(macs / gemm_seconds(x, xsum, packed, out))
            share = statistics.median(r / c for r, c in zip(rates, ceilings))
            rate = statistics.median(rates)
            print(f"| {k} x {n_out} | {args.m} | {rate / 1e9:.1f} | {statistics.median(ceilings) / 1e9:.1f} | "
                  f"{100 * share:.0f}% | {rate / (clock * 1e9):.1f} |")


if __name__ == "__main__":
    main()
