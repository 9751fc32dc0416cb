"""Training throughput of the ternary model (BitLinear: fake-quantized weights and activations with
straight-through gradients) beside its full-precision twin (nn.Linear) of the same shape on this machine.

One step = forward, backward and an AdamW update of one batch, exactly as bitlm.train runs it. Each size
is timed `--repeats` times (after warm-up steps) alternating ternary and fp, and the median is reported.
Target (issue 4): the ternary step costs at most 1.3x the fp step.

    python benchmarks/train_throughput.py                # the sizes below, 1 thread
    python benchmarks/train_throughput.py --threads 2 --sizes small
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bitlm.config import preset
from bitlm.model import BitNetForCausalLM
from bitlm.train.losses import token_nll
from bitlm.train.trainer import init_weights, param_groups

SIZES = {  # name: (preset overrides, batch, context)
    "tiny": (dict(hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2), 8, 128),
    "small": (dict(hidden_size=256, intermediate_size=688, num_hidden_layers=6, num_attention_heads=8,
                   num_key_value_heads=4), 8, 256),
    "medium": (dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                    num_key_value_heads=4), 4, 256),
}


def make(kind: str, overrides: dict, context: int, vocab: int):
    torch.manual_seed(0)
    cfg = preset("small", **overrides, vocab_size=vocab, max_position_embeddings=context)
    model = BitNetForCausalLM(cfg, linear=kind)
    init_weights(model)
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3)
    return model, opt


def step(model, opt, batch):
    nll, n = token_nll(model, batch)
    (nll / n).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def time_steps(model, opt, batch, steps: int) -> float:
    t = time.perf_counter()
    for _ in range(steps):
        step(model, opt, batch)
    return (time.perf_counter() - t) / steps


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["tiny", "small", "medium"], choices=list(SIZES))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per repeat")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s); median of {args.repeats} x {args.steps} steps")
    print(f"{'size':8} {'params':>8} {'tokens':>6} {'ternary tok/s':>14} {'fp tok/s':>10} {'step ratio':>11}")
    for name in args.sizes:
        overrides, B, T = SIZES[name]
        batch = torch.randint(0, args.vocab, (B, T + 1), generator=torch.Generator().manual_seed(0))
        runs = {k: make(k, overrides, T, args.vocab) for k in ("latent", "fp")}
        for model, opt in runs.values():
            time_steps(model, opt, batch, 2)  # warm-up
        times = {k: [] for k in runs}
        for _ in range(args.repeats):
            for k, (model, opt) in runs.items():
                times[k].append(time_steps(model, opt, batch, args.steps))
        tern, fp = statistics.median(times["latent"]), statistics.median(times["fp"])
        params = sum(p.numel() for p in runs["fp"][0].parameters()) / 1e6
        print(f"{name:8} {params:7.1f}M {B * T:6d} {B * T / tern:14.0f} {B * T / fp:10.0f} {tern / fp:10.2f}x")


if __name__ == "__main__":
    main()
