"""Prompt lookup on text that does not quote its context: the adaptive schedule's pause after rejected
drafts (engine/speculative.py, Speculative.adaptive) against the same schedule without it.

The bundled model continues a short line, sampled (temperature 0.8, top-k off), for --new-tokens tokens
with each of --seeds seeds: plain decoding, then prompt lookup (k <= 8) with the pause and with
PAUSE_MAX = 0 (no pause: k stays at 1 after rejections, a 2-row verify every round). Tokens/s is the
median over --rounds rounds and the seeds; the counts are the first round's, summed over the seeds.

    python benchmarks/speculative_pause.py              # about 10 s
"""

from __future__ import annotations

import argparse
import statistics
import time

import bitlm
from bitlm.data import bundled_model_dir
from bitlm.engine import speculative as S
from bitlm.engine.generate import generate
from bitlm.engine.native import NativeLM
from bitlm.kernels import set_num_threads


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", "--new-tokens", type=int, default=300)
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("-t", "--threads", type=int, default=1)
    args = ap.parse_args(argv)
    set_num_threads(args.threads)
    lm = NativeLM(bitlm.load_native(bundled_model_dir(), head="q8"))
    ids = lm.tokenizer.encode("ROMEO:\nWhat light through yonder window breaks?\n")
    rates: dict[str, list[float]] = {}
    counts: dict[str, list[int]] = {}
    for rnd in range(args.rounds):
        for name in ("plain", "lookup, pause", "lookup, no pause"):
            S.PAUSE_MAX = 0 if name == "lookup, no pause" else 16
            for seed in range(args.seeds):
                spec = None if name == "plain" else S.Speculative("lookup", draft_max=8)
                t = time.perf_counter()
                it = generate(lm, ids, args.new_tokens, temperature=0.8, seed=seed, ignore_eos=True, speculative=spec)
                n = len(list(it))
                rates.setdefault(name, []).append(n / (time.perf_counter() - t))
                st = getattr(it, "speculative", None)
                if rnd == 0 and st is not None:
                    c = counts.setdefault(name, [0, 0, 0])
                    c[0], c[1], c[2] = c[0] + st.rounds, c[1] + st.drafted, c[2] + st.accepted
    S.PAUSE_MAX = 16
    base = statistics.median(rates["plain"])
    print(f"\n{args.threads} thread(s), {args.new_tokens} tokens x {args.seeds} seeds x {args.rounds} rounds, "
          "temperature 0.8")
    print("| decoding | tokens/s | x plain | rounds | drafted | accepted |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, r in rates.items():
        c = counts.get(name, ["-", "-", "-"])
        print(f"| {name} | {statistics.median(r):.0f} | {statistics.median(r) / base:.2f}x | {c[0]} | {c[1]} | {c[2]} |")


if __name__ == "__main__":
    main()
