"""Decode of one sequence at depth through the paged KV pool (BatchEngine, what `bitlm serve` runs),
for several block sizes, beside the model's own cache (a pool of its own: blocks of 256 positions in
order), in one process, alternating.

    python benchmarks/pool_decode.py [--shape 2b4t] [--depth 4000] [--steps 48] [--kv q8_0]
                                     [--block-size 16 64] [--rounds 3] [-t 2]

A random model of the preset's shape (`bitlm bench --shape`'s file, head q6, weights t5). Each round
fills the context to --depth positions (untimed), then times --steps decode steps of random tokens, for
every block size and then for the NativeModel's own cache. Tokens a second, each round's value and the
median. Never imported by the tests.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from bitlm import kernels
from bitlm.engine import bench
from bitlm.engine.batch import BatchEngine
from bitlm.io.native import open_native


def pool_rate(eng: BatchEngine, depth: int, steps: int, rng: np.random.Generator, V: int) -> float:
    sid = eng.add_sequence()
    for i in range(0, depth, 512):
        eng.step([(sid, rng.integers(0, V, min(512, depth - i)), 0)])
    t0 = time.perf_counter()
    for _ in range(steps):
        eng.step([(sid, rng.integers(0, V, 1))])
    rate = steps / (time.perf_counter() - t0)
    eng.free_sequence(sid)
    return rate


def own_rate(nm, depth: int, steps: int, rng: np.random.Generator, V: int) -> float:
    nm.reset()
    for i in range(0, depth, 512):
        nm.forward(rng.integers(0, V, min(512, depth - i)).astype(np.int32), n_out=0)
    t0 = time.perf_counter()
    for _ in range(steps):
        nm.forward(rng.integers(0, V, 1).astype(np.int32))
    return steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="2b4t")
    ap.add_argument("--depth", type=int, default=4000)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--kv", default="q8_0")
    ap.add_argument("--block-size", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("-t", "--threads", type=int, default=2)
    args = ap.parse_args()
    kernels.set_num_threads(args.threads)
    nm = open_native(bench.synthetic_native_file(args.shape, "q6", weights="t5"),
                     max_len=args.depth + args.steps + 1, kv=args.kv)
    V = nm.config.vocab_size
    rng = np.random.default_rng(0)
    engines = {f"pool, block_size {bs}": BatchEngine(nm, max_seqs=1, block_size=bs) for bs in args.block_size}
    rates: dict[str, list[float]] = {name: [] for name in [*engines, "own cache"]}
    for _ in range(args.rounds):
        for name, eng in engines.items():
            rates[name].append(pool_rate(eng, args.depth, args.steps, rng, V))
        rates["own cache"].append(own_rate(nm, args.depth, args.steps, rng, V))
    print(f"decode at {args.depth} positions, {args.shape}, kv {args.kv}, {args.threads} threads, "
          f"{args.steps} steps a round")
    print("| cache | t/s each round | median |\n| --- | --- | ---: |")
    for name, r in rates.items():
        print(f"| {name} | {', '.join(f'{x:.2f}' for x in r)} | {statistics.median(r):.2f} |")


if __name__ == "__main__":
    main()
