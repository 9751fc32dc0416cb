"""Micro-benchmark of the native ternary GEMV (decode) at the 2B4T shapes, against the read-bandwidth bound.

    python benchmarks/kernel_gemv.py [--threads 1,2] [--paths avx512vnni,avx2] [--pool-mb 2048] [--prefill 128]

Weights are cold, as in decode: each call reads the next of enough copies of the matrix to fill
--pool-mb (past the last-level cache), so every byte comes from memory. The bound is the machine's
read bandwidth, measured with the same thread count by a SIMD read over a 2 GB buffer (the kernel
library's probe) and, for comparison, by numpy's float64 sum. Time per call is the median over
--repeats passes, Python call overhead included (it is part of every real call).
Never imported by the tests.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

from bitlm import kernels

# (in -> out): q and o, k and v, gate and up, down
SHAPES_2B4T = [(2560, 2560), (2560, 640), (2560, 6912), (6912, 2560)]
# per layer: q, k, v, o, gate, up, down; 30 layers
LAYER_MIX = {(2560, 2560): 2, (2560, 640): 2, (2560, 6912): 2, (6912, 2560): 1}
LAYERS = 30


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def read_bandwidth(buf: torch.Tensor, threads: int, repeats: int) -> float:
    """GB/s of the kernel library's SIMD read probe over buf with `threads` threads."""
    kernels.set_num_threads(threads)
    return buf.numel() * buf.element_size() / median_time(lambda: kernels.read_bandwidth_probe(buf), repeats) / 1e9


def cold_copies(k: int, n: int, pool_bytes: int) -> list[kernels.PackedTernary]:
    """Enough copies of one random n x k matrix to fill pool_bytes, each its own memory."""
    w = torch.randint(-1, 2, (n, k), dtype=torch.int8, generator=torch.Generator().manual_seed(n + k))
    one = kernels.pack(w)
    copies = max(2, -(-pool_bytes // one.nbytes))
    big = one.data.reshape(1, -1).expand(copies, -1).contiguous()
    return [kernels.PackedTernary(big[i].view(one.data.shape), n, k) for i in range(copies)]


def time_gemv(mats: list[kernels.PackedTernary], path: str, repeats: int) -> float:
    k, n = mats[0].k, mats[0].n
    x = torch.randint(-128, 128, (1, k), dtype=torch.int8)
    xsum = x.sum(dim=1, dtype=torch.int32)
    out = torch.empty(1, n, dtype=torch.int32)

    def one_pass():
        for p in mats:
            kernels.gemm(x, p, xsum=xsum, path=path, out=out)

    return median_time(one_pass, repeats) / len(mats)


def time_gemm(mat: kernels.PackedTernary, m: int, path: str, repeats: int) -> float:
    x = torch.randint(-128, 128, (m, mat.k), dtype=torch.int8)
    return median_time(lambda: kernels.gemm(x, mat, path=path), repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--paths", default=None, help="comma-separated kernel paths (default: the best and avx2)")
    ap.add_argument("--pool-mb", type=int, default=2048, help="cold-weight pool per shape (past every cache)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--prefill", type=int, default=128, help="M for one prefill GEMM row per shape (0: skip)")
    args = ap.parse_args()
    if not kernels.available():
        raise SystemExit(f"native kernels not available: {kernels.info()['error']}")
    info = kernels.info()
    threads = [int(t) for t in args.threads.split(",")]
    paths = args.paths.split(",") if args.paths else list(dict.fromkeys([info["path"], "avx2"]))
    paths = [p for p in paths if p in info["paths"]]
    print(f"cpu features: {' '.join(info['cpu_features'])}; paths {info['paths']}; load average "
          f"{os.getloadavg()[0]:.2f}; torch {torch.__version__}, numpy {np.__version__}")

    buf = torch.ones((2 << 30) // 8, dtype=torch.float64)
    arr = buf.numpy()
    npsum = buf.numel() * 8 / median_time(lambda: arr.sum(), args.repeats) / 1e9
    bw = {t: read_bandwidth(buf, t, args.repeats) for t in threads}
    del buf, arr
    for t in threads:
        print(f"read bandwidth, {t} thread(s): {bw[t]:.1f} GB/s (SIMD probe over 2 GB)")
    print(f"read bandwidth, numpy float64 sum over 2 GB (1 thread): {npsum:.1f} GB/s\n")

    header = f"{'shape (in->out)':>16} {'MB':>6} {'threads':>7} {'path':>11} {'us/call':>9} {'GB/s':>7} {'% of BW':>8}"
    print(header)
    print("-" * len(header))
    per_call = {}
    for k, n in SHAPES_2B4T:
        mats = cold_copies(k, n, args.pool_mb << 20)
        for t in threads:
            kernels.set_num_threads(t)
            for p in paths:
                sec = time_gemv(mats, p, args.repeats)
                per_call[(k, n, t, p)] = sec
                gbs = mats[0].nbytes / sec / 1e9
                print(f"{f'{k}->{n}':>16} {mats[0].nbytes / 1e6:6.2f} {t:7d} {p:>11} {sec * 1e6:9.1f} {gbs:7.1f} "
                      f"{100 * gbs / bw[t]:7.0f}%")
        del mats

    print("\ndecode, all 210 ternary projections of the 2B4T model (no head, no attention):")
    layer_bytes = sum(cnt * kernels.pack(torch.zeros(n, k, dtype=torch.int8)).nbytes for (k, n), cnt in LAYER_MIX.items())
    for t in threads:
        for p in paths:
            sec = LAYERS * sum(cnt * per_call[(k, n, t, p)] for (k, n), cnt in LAYER_MIX.items())
            bound = LAYERS * layer_bytes / (bw[t] * 1e9)
            print(f"  {t} thread(s) {p:>11}: {sec * 1e3:6.2f} ms/token for {LAYERS * layer_bytes / 1e6:.0f} MB "
                  f"(bound {bound * 1e3:.2f} ms: {100 * bound / sec:.0f}% of the bandwidth bound)")

    if args.prefill:
        print(f"\nprefill GEMM, M = {args.prefill} (weights warm), GOPS = 2*M*N*K / time:")
        for k, n in SHAPES_2B4T:
            mat = kernels.pack(torch.randint(-1, 2, (n, k), dtype=torch.int8))
            for t in threads:
                kernels.set_num_threads(t)
                for p in paths:
                    sec = time_gemm(mat, args.prefill, p, max(3, args.repeats // 2))
                    print(f"  {k}->{n} {t} thread(s) {p:>11}: {sec * 1e3:7.2f} ms  "
                          f"{2 * args.prefill * n * k / sec / 1e9:6.0f} GOPS")
    kernels.set_num_threads(0)


if __name__ == "__main__":
    main()
