"""Micro-benchmark of the native ternary GEMV (decode) at the 2B4T shapes, against the read-bandwidth bound.

    python benchmarks/kernel_gemv.py [--threads 1,2] [--paths avx512vnni,avx2] [--weights i2v,t5] [--pool-mb 2048]
        [--prefill 128]

Weights are cold, as in decode: each call reads the next of enough copies of the matrix to fill
--pool-mb (past the last-level cache), so every byte comes from memory. The bound is the machine's
read bandwidth: the kernel library's SIMD read probe (same thread count) over the very same pool,
run alternately with the GEMV passes so that both see the same load from other processes (the
machine may be shared); "% of BW" is the median of the paired ratios. numpy's float64 sum over
2 GB is printed for comparison. The peer row per shape is torch's bf16 GEMV (F.linear, what a bf16
transformers model runs) on cold weights the same way. Time per call is the median over --repeats passes, Python call
overhead included (it is part of every real call). Never imported by the tests.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

from bitlm import kernels
from bitlm.formats import q6

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


def cold_copies(k: int, n: int, pool_bytes: int, fmt: str = "i2v") -> tuple[torch.Tensor, list[kernels.PackedTernary]]:
    """(the pool, views of it): enough copies of one random n x k matrix in format fmt to fill pool_bytes."""
    w = torch.randint(-1, 2, (n, k), dtype=torch.int8, generator=torch.Generator().manual_seed(n + k))
    one = kernels.pack(w, fmt)
    copies = max(2, -(-pool_bytes // one.nbytes))
    big = one.data.reshape(1, -1).expand(copies, -1).contiguous()
    return big, [kernels.PackedTernary(big[i].view(one.data.shape), n, k, fmt) for i in range(copies)]


def time_gemv(big: torch.Tensor, mats: list[kernels.PackedTernary], path: str, repeats: int) -> tuple[float, float, float]:
    """(seconds per call, probe GB/s, median of paired probe-time / gemv-time ratios)."""
    k, n = mats[0].k, mats[0].n
    x = torch.randint(-128, 128, (1, k), dtype=torch.int8)
    xsum = x.sum(dim=1, dtype=torch.int32)
    out = torch.empty(1, n, dtype=torch.int32)

    def one_pass():
        for p in mats:
            kernels.gemm(x, p, xsum=xsum, path=path, out=out)

    one_pass()
    gemv, probe = [], []
    for _ in range(repeats):  # alternate, so both see the same background load
        t0 = time.perf_counter()
        kernels.read_bandwidth_probe(big)
        t1 = time.perf_counter()
        one_pass()
        t2 = time.perf_counter()
        probe.append(t1 - t0)
        gemv.append(t2 - t1)
    ratio = statistics.median(p / g for p, g in zip(probe, gemv))
    return statistics.median(gemv) / len(mats), big.numel() / statistics.median(probe) / 1e9, ratio


def q6_head_copies(pool_bytes: int, v: int = 128256, h: int = 2560) -> torch.Tensor:
    """Copies of a random Q6 head [copies, v, 48 * h / 64] filling about pool_bytes."""
    q = np.random.default_rng(0).integers(-31, 32, size=(v // 16, h), dtype=np.int8)
    one = np.tile(q6.pack(q), (16, 1))
    copies = max(2, -(-pool_bytes // one.nbytes))
    return torch.from_numpy(np.ascontiguousarray(np.broadcast_to(one, (copies,) + one.shape)))


def time_q6(head: torch.Tensor, repeats: int) -> tuple[float, float, float]:
    """(seconds per head GEMV, probe GB/s, median paired probe/GEMV ratio), as time_gemv."""
    h = head.shape[2] // 48 * 64
    x = torch.randint(-128, 128, (1, h), dtype=torch.int8)
    kernels.q6_gemv(x, head[0], h)
    gemv, probe = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        kernels.read_bandwidth_probe(head)
        t1 = time.perf_counter()
        for c in range(head.shape[0]):
            kernels.q6_gemv(x, head[c], h)
        t2 = time.perf_counter()
        probe.append(t1 - t0)
        gemv.append(t2 - t1)
    ratio = statistics.median(p / g for p, g in zip(probe, gemv))
    return statistics.median(gemv) / head.shape[0], head.numel() / statistics.median(probe) / 1e9, ratio


def time_torch_bf16(k: int, n: int, threads: list[int], pool_bytes: int, repeats: int):
    """[(threads, seconds per call, bytes per matrix)] for torch.nn.functional.linear in bf16, cold."""
    w = torch.randn(n, k, dtype=torch.bfloat16)
    copies = max(2, -(-pool_bytes // (w.numel() * 2)))
    big = w.reshape(1, -1).expand(copies, -1).contiguous()
    mats = [big[i].view(n, k) for i in range(copies)]
    x = torch.randn(1, k, dtype=torch.bfloat16)
    saved, rows = torch.get_num_threads(), []
    for t in threads:
        torch.set_num_threads(t)
        sec = median_time(lambda: [torch.nn.functional.linear(x, m) for m in mats], repeats) / copies
        rows.append((t, sec, w.numel() * 2))
    torch.set_num_threads(saved)
    return rows


def time_gemm(mat: kernels.PackedTernary, m: int, path: str, repeats: int) -> float:
    x = torch.randint(-128, 128, (m, mat.k), dtype=torch.int8)
    out = torch.empty(m, mat.n, dtype=torch.int32)  # reused, as a runtime's scratch is: a fresh
    return median_time(lambda: kernels.gemm(x, mat, path=path, out=out), repeats)  # one page-faults


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--paths", default=None, help="comma-separated kernel paths (default: all but scalar)")
    ap.add_argument("--pool-mb", type=int, default=2048, help="cold-weight pool per shape (past every cache)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--prefill", type=int, default=128, help="M for one prefill GEMM row per shape (0: skip)")
    ap.add_argument("--no-peer", action="store_true", help="skip the torch bf16 GEMV rows")
    ap.add_argument("--weights", default="i2v", help="comma-separated weight formats: i2v (2 bits), t5 (1.6 bits)")
    args = ap.parse_args()
    if not kernels.available():
        raise SystemExit(f"native kernels not available: {kernels.info()['error']}")
    info = kernels.info()
    threads = [int(t) for t in args.threads.split(",")]
    paths = args.paths.split(",") if args.paths else [p for p in info["paths"] if p != "scalar"]
    paths = [p for p in paths if p in info["paths"]]
    gemv_paths = [p for p in paths if p != "amx"]  # AMX runs the VNNI kernel below 16 rows
    print(f"cpu features: {' '.join(info['cpu_features'])}; paths {info['paths']}; load average "
          f"{os.getloadavg()[0]:.2f}; torch {torch.__version__}, numpy {np.__version__}")

    buf = torch.ones((2 << 30) // 8, dtype=torch.float64)
    arr = buf.numpy()
    npsum = buf.numel() * 8 / median_time(arr.sum, args.repeats) / 1e9
    bw = {t: read_bandwidth(buf, t, args.repeats) for t in threads}
    del buf, arr
    for t in threads:
        print(f"read bandwidth, {t} thread(s): {bw[t]:.1f} GB/s (SIMD probe over 2 GB)")
    print(f"read bandwidth, numpy float64 sum over 2 GB (1 thread): {npsum:.1f} GB/s\n")

    tiny = kernels.pack(torch.zeros(16, 16, dtype=torch.int8))
    xt, yt = torch.zeros(1, 16, dtype=torch.int8), torch.empty(1, 16, dtype=torch.int32)
    overhead = median_time(lambda: [kernels.gemm(xt, tiny, out=yt) for _ in range(1000)], args.repeats) / 1000
    print(f"per-call overhead from Python (a 16 x 16 GEMV, included in every row below): {overhead * 1e6:.1f} us\n")

    fmts = args.weights.split(",")
    header = (f"{'shape (in->out)':>16} {'weights':>7} {'MB':>6} {'threads':>7} {'path':>11} {'us/call':>9} "
              f"{'GB/s':>7} {'probe GB/s':>10} {'% of BW':>8}")
    print(header)
    print("-" * len(header))
    per_call = {}
    for k, n in SHAPES_2B4T:
        for f in fmts:
            big, mats = cold_copies(k, n, args.pool_mb << 20, f)
            for t in threads:
                kernels.set_num_threads(t)
                for p in gemv_paths:
                    sec, probe, ratio = time_gemv(big, mats, p, args.repeats)
                    per_call[(k, n, t, p, f)] = (sec, sec * ratio)  # time, and the bound in the same window
                    gbs = mats[0].nbytes / sec / 1e9
                    print(f"{f'{k}->{n}':>16} {f:>7} {mats[0].nbytes / 1e6:6.2f} {t:7d} {p:>11} {sec * 1e6:9.1f} "
                          f"{gbs:7.1f} {probe:10.1f} {100 * ratio:7.0f}%")
            del big, mats
        if not args.no_peer:  # the peer: a bf16 GEMV in torch, what transformers' bf16 model runs
            for t, sec, nbytes in time_torch_bf16(k, n, threads, args.pool_mb << 20, args.repeats):
                ours = min(per_call[(k, n, t, p, f)][0] for p in gemv_paths for f in fmts)
                print(f"{f'{k}->{n}':>16} {'bf16':>7} {nbytes / 1e6:6.2f} {t:7d} {'torch':>11} {sec * 1e6:9.1f} "
                      f"{nbytes / sec / 1e9:7.1f} {'':>10} {'':>8}  ({sec / ours:.1f}x our time)")

    print("\ndecode, all 210 ternary projections of the 2B4T model (no head, no attention):")
    for f in fmts:
        layer_bytes = sum(cnt * kernels.pack(torch.zeros(n, k, dtype=torch.int8), f).nbytes
                          for (k, n), cnt in LAYER_MIX.items())
        for t in threads:
            for p in gemv_paths:
                sec = LAYERS * sum(cnt * per_call[(k, n, t, p, f)][0] for (k, n), cnt in LAYER_MIX.items())
                bound = LAYERS * sum(cnt * per_call[(k, n, t, p, f)][1] for (k, n), cnt in LAYER_MIX.items())
                print(f"  {f} {t} thread(s) {p:>11}: {sec * 1e3:6.2f} ms/token for {LAYERS * layer_bytes / 1e6:.0f} "
                      f"MB (paired bound {bound * 1e3:.2f} ms: {100 * bound / sec:.0f}% of the bandwidth bound)")

    print("\noutput head 128256 x 2560 in Q6 rows (formats/q6.py, 246 MB), cold, paired with the probe:")
    head = q6_head_copies(args.pool_mb << 20)
    for t in threads:
        kernels.set_num_threads(t)
        sec, probe, ratio = time_q6(head, args.repeats)
        print(f"  {t} thread(s): {sec * 1e3:6.2f} ms/token, {head[0].numel() / sec / 1e9:5.1f} GB/s "
              f"(probe {probe:.1f} GB/s): {100 * ratio:.0f}% of the bandwidth bound")
    del head

    if args.prefill:
        print(f"\nprefill GEMM, M = {args.prefill} (weights warm), GOPS = 2*M*N*K / time:")
        for k, n in SHAPES_2B4T:
            for f in fmts:
                mat = kernels.pack(torch.randint(-1, 2, (n, k), dtype=torch.int8), f)
                for t in threads:
                    kernels.set_num_threads(t)
                    for p in paths:
                        sec = time_gemm(mat, args.prefill, p, max(3, args.repeats // 2))
                        print(f"  {k}->{n} {f} {t} thread(s) {p:>11}: {sec * 1e3:7.2f} ms  "
                              f"{2 * args.prefill * n * k / sec / 1e9:6.0f} GOPS")
    kernels.set_num_threads(0)


if __name__ == "__main__":
    main()
