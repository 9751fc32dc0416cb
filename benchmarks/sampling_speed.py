"""Time to pick one token from the logits of a 128256-token vocabulary (Llama 3's, the 2B4T model's):
bitlm's numpy sampler beside Hugging Face transformers' own logits warpers (temperature, top-k, top-p,
then torch.multinomial), the same logits and settings, alternating, in one process.

    python benchmarks/sampling_speed.py [--rounds 7] [--draws 50]

Settings: llama.cpp's defaults (temperature 0.8, top-k 40, top-p 0.95), top-p alone (top-k off) and
plain temperature sampling. The logits are random normal times 3 (a spread like a language model's).
Milliseconds per token, median over the rounds of each round's mean. Never imported by the tests.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from bitlm.engine.sampling import SamplingParams, sample

V = 128256
SETTINGS = [(0.8, 40, 0.95), (0.8, 0, 0.95), (0.8, 0, 1.0)]


def transformers_sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                        g: torch.Generator) -> int:
    warpers = [TemperatureLogitsWarper(temperature)]
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1:
        warpers.append(TopPLogitsWarper(top_p))
    scores = logits
    for w in warpers:
        scores = w(None, scores)
    return int(torch.multinomial(scores.softmax(-1), 1, generator=g))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--draws", type=int, default=50, help="tokens drawn per engine per round")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    logits_np = (np.random.default_rng(0).standard_normal((1, V)) * 3).astype(np.float32)
    logits_t = torch.from_numpy(logits_np.copy())
    print(f"vocabulary {V}, {args.draws} draws x {args.rounds} rounds, ms per token (median of rounds)\n")
    print("| temperature, top-k, top-p | bitlm (numpy) | transformers warpers + multinomial | ratio |")
    print("| --- | ---: | ---: | ---: |")
    for t, k, p in SETTINGS:
        params = SamplingParams(t, k, p, seed=0)
        rng, g = params.generator(), torch.Generator().manual_seed(0)
        ours, theirs = [], []
        sample(logits_np, params, rng), transformers_sample(logits_t, t, k, p, g)  # warm-up
        for _ in range(args.rounds):
            s = time.perf_counter()
            for _ in range(args.draws):
                sample(logits_np, params, rng)
            ours.append((time.perf_counter() - s) / args.draws * 1e3)
            s = time.perf_counter()
            for _ in range(args.draws):
                transformers_sample(logits_t, t, k, p, g)
            theirs.append((time.perf_counter() - s) / args.draws * 1e3)
        a, b = statistics.median(ours), statistics.median(theirs)
        print(f"| {t}, {k or 'off'}, {p if p < 1 else 'off'} | {a:.2f} | {b:.2f} | {b / a:.1f}x |")


if __name__ == "__main__":
    main()
