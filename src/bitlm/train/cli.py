"""Command-line entry points of training: `add_train_parser`, `add_sft_parser`, `add_dpo_parser` add the
`train`, `sft` and `dpo` subcommands to an argparse subparsers object (bitlm's CLI wires them in);
`python -m bitlm.train` runs them on their own. Every flag may also come from --config FILE.yaml|.toml;
flags win over the file."""

from __future__ import annotations

import argparse
import sys

from ..errors import BitlmError

# flag -> TrainConfig field, where the two differ
RENAMES = {"layers": "num_hidden_layers", "heads": "num_attention_heads", "kv_heads": "num_key_value_heads",
           "act": "hidden_act"}


OPTIMISATION_FLAGS = [
    ("--lr", float, "peak learning rate of stage one (default 1.5e-3)"),
    ("--lr-stage1-end", float, "stage one decays (cosine) to this (default 8e-4)"),
    ("--lr-stage2", float, "the cooldown starts here (default 5e-4)"),
    ("--lr-final", float, "the cooldown ends here (default 0)"),
    ("--warmup-steps", int, "linear learning-rate warm-up (default 0)"),
    ("--stage1-fraction", float, "share of the steps in stage one (default 0.5)"),
    ("--weight-decay", float, "peak of the stage-one cosine weight decay (default 0.1)"),
    ("--grad-clip", float, "max gradient norm, 0 = off (default 1.0)"),
    ("--quant-warmup", int, "ramp quantization in over N steps: lambda = min(step / N, 1) "
                            "(fine-tuning; default 0)"),
]


def _common(p: argparse.ArgumentParser, task: str) -> None:
    g = p.add_argument_group("data and model")
    g.add_argument("--config", help="YAML or TOML file of options (keys are the flag names)")
    g.add_argument("--data", nargs="+", help="training files, directories or globs (.txt, .jsonl)")
    g.add_argument("--val-data", nargs="+", help="held-out files (sft/dpo; pretraining holds out --val-fraction)")
    g.add_argument("--out", help="run directory: checkpoint.pt, metrics.jsonl, loss.png, model/ (default runs/bitlm)")
    g.add_argument("--tokenizer", help="tokenizer.json (or its directory), or bpe:N to train a byte-level BPE "
                                       "of N tokens on the corpus (default bpe:8192, or the --init model's)")
    g.add_argument("--init", help="a BitNet or Llama model directory (or hub id) to start from")
    g.add_argument("--precision", choices=("ternary", "fp"), help="ternary (BitLinear, default) or fp twin")
    g.add_argument("--context", type=int, help="sequence length in tokens")
    if task == "pretrain":
        g.add_argument("--text-field", help="jsonl field holding the text (default text)")
        g.add_argument("--val-fraction", type=float, help="held-out share of the token stream (default 0.05)")
        g.add_argument("--preset", help="model shape: tiny (default), small, 2b4t")
        g.add_argument("--hidden-size", type=int)
        g.add_argument("--intermediate-size", type=int)
        g.add_argument("--layers", type=int)
        g.add_argument("--heads", type=int)
        g.add_argument("--kv-heads", type=int)
        g.add_argument("--act", choices=("relu2", "silu"))
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, help="optimizer steps (default: --epochs over the data)")
    g.add_argument("--epochs", type=float, help="passes over the data when --steps is unset (default 1)")
    g.add_argument("--batch-size", type=int, help="global batch in sequences (default 16)")
    g.add_argument("--grad-accum", type=int, help="micro-batches per step (default 1)")
    for flag, kind, text in OPTIMISATION_FLAGS:
        g.add_argument(flag, type=kind, help=text)
    g.add_argument("--seed", type=int)
    if task == "sft":
        g.add_argument("--loss-aggregation", choices=("sum", "mean"), help="over assistant tokens (default sum)")
    if task == "dpo":
        g.add_argument("--beta", type=float, help="DPO temperature (default 0.1)")
    g = p.add_argument_group("run")
    g.add_argument("--eval-every", type=int, help="validation every N steps (default 100)")
    g.add_argument("--eval-batches", type=int, help="validation batches (default 20)")
    g.add_argument("--log-every", type=int, help="metrics row every N steps (default 1)")
    g.add_argument("--checkpoint-every", type=int, help="default 500 (and at the end, and on SIGTERM)")
    g.add_argument("--resume", action="store_true", default=None, help="continue from OUT/checkpoint.pt exactly")
    g.add_argument("--stop-at-step", type=int, help="checkpoint and stop after this step (time-boxed jobs)")
    g.add_argument("--save-dtype", choices=("float32", "bfloat16", "float16"),
                   help="dtype of the non-ternary tensors of the saved model (default float32)")
    g.add_argument("--distributed", choices=("ddp", "fsdp"), help="under torchrun: DDP (default) or FSDP2")
    g.add_argument("--device", help="auto (default: cuda when there is one), cpu or cuda")
    g.add_argument("--amp", choices=("auto", "none", "bf16"),
                   help="bf16: autocast the forward pass; auto (default): bf16 on a GPU, none on the CPU")
    g.add_argument("--threads", type=int, help="torch CPU threads per process (default: torch's choice)")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    g.add_argument("--no-plot", dest="plot", action="store_false", default=None)
    p.set_defaults(func=_runner(task))


def _runner(task: str):
    def run_cli(args: argparse.Namespace) -> int:
        import dataclasses

        from . import TrainConfig, make_config, run
        fields = {f.name for f in dataclasses.fields(TrainConfig)}
        # only our own options: the parent parser may add its own (--verbose, ...)
        flags = {RENAMES.get(k, k): v for k, v in vars(args).items() if RENAMES.get(k, k) in fields}
        cfg = make_config(getattr(args, "config", None), **{**flags, "task": task})
        summary = run(cfg)
        if summary.get("out") and _is_main():
            print(_describe(summary))
        return 0
    return run_cli


def _is_main() -> bool:
    import os
    return os.environ.get("RANK", "0") == "0"


def _describe(s: dict) -> str:
    parts = [f"{'trained' if s['finished'] else 'stopped after'} {s['steps']} steps"]
    if s.get("train"):
        parts.append(f"train loss {s['train']['loss']:.4f}")
    if s.get("val"):
        v = s["val"]
        parts.append(f"val loss {v['loss']:.4f}" + (f" (ppl {v['ppl']:.2f})" if "ppl" in v else "")
                     + (f", margin {v['margin']:.3f}" if "margin" in v else ""))
    parts.append(f"model in {s['model']}" if s.get("model") else f"resume with --resume --out {s['out']}")
    return "; ".join(parts)


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("train", help="pre-train a BitNet b1.58 model from scratch",
                              description="Pre-train a BitNet b1.58 (or --precision fp) model on text.")
    _common(p, "pretrain")
    return p


def add_sft_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("sft", help="supervised fine-tuning on chat jsonl (messages)",
                              description="Fine-tune on `messages` jsonl through the chat template; "
                                          "the loss counts assistant tokens only.")
    _common(p, "sft")
    return p


def add_dpo_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("dpo", help="direct preference optimisation on prompt/chosen/rejected jsonl",
                              description="DPO against a frozen copy of the --init model.")
    _common(p, "dpo")
    return p


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bitlm.train")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_parser(sub)
    add_sft_parser(sub)
    add_dpo_parser(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except BitlmError as e:
        print(f"bitlm: error: {e}", file=sys.stderr)
        return 2
