"""Memory-mapped weights against weights read into memory on huge pages (`--mmap` / `--no-mmap`).

Both models are opened in one process from the same native file (the synthetic 2B4T one bitlm bench
uses) and measured in turns, the first of the two alternating, so the machine's drift falls on both
alike: tgN and ppN as llama-bench runs
them, the median of each and of the per-turn ratios, and each load time.

    python benchmarks/weights_in_memory.py --threads 2 --turns 6
"""

from __future__ import annotations

import argparse
import statistics
import time

from bitlm.engine import bench
from bitlm.io.native import open_native
from bitlm.kernels import set_num_threads


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--pp", type=int, default=128)
    ap.add_argument("--tg", type=int, default=32)
    ap.add_argument("--head", choices=("q8", "q6"), default="q6")
    args = ap.parse_args(argv)
    set_num_threads(args.threads)
    path = bench.synthetic_native_file("2b4t", args.head)
    models, load = {}, {}
    for name, mmap in (("mmap", True), ("memory", False)):
        t = time.perf_counter()
        models[name] = open_native(path, max_len=args.pp + args.tg + 1, mmap=mmap)
        load[name] = time.perf_counter() - t
    src = bench._TokenSource(0, models["mmap"].config.vocab_size)
    prompt = src.tokens(args.pp)
    tests = {f"tg{args.tg}": lambda nm, tok: bench._generate(nm, tok, args.tg),
             f"pp{args.pp}": lambda nm, tok: bench._prefill(nm, prompt)}
    n = {f"tg{args.tg}": args.tg, f"pp{args.pp}": args.pp}
    rates = {(m, k): [] for m in models for k in tests}
    for name, nm in models.items():  # warm-up
        for test in tests.values():
            test(nm, 1)
    for turn in range(args.turns):
        tok = src.token()
        order = list(models.items())
        for k, test in tests.items():
            for name, nm in order if turn % 2 == 0 else order[::-1]:  # who goes first alternates
                t = time.perf_counter()
                test(nm, tok)
                rates[(name, k)].append(n[k] / (time.perf_counter() - t))
    print(f"2B4T shape, head {args.head}, {args.threads} thread(s), {args.turns} turns; load: "
          + ", ".join(f"{m} {s:.2f} s" for m, s in load.items()))
    print("| test | mmap t/s | memory t/s | memory / mmap (median of turns) | turns |")
    print("| --- | ---: | ---: | ---: | --- |")
    for k in tests:
        ratios = [a / b for a, b in zip(rates[("memory", k)], rates[("mmap", k)])]
        print(f"| {k} | {statistics.median(rates[('mmap', k)]):.2f} | {statistics.median(rates[('memory', k)]):.2f} | "
              f"{statistics.median(ratios):.3f} | {', '.join(f'{r:.2f}' for r in ratios)} |")


if __name__ == "__main__":
    main()
