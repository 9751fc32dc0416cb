"""`bitlm eval ppl`: perplexity and bits per byte of a text, with a sliding window.

The method of Hugging Face's "Perplexity of fixed-length models": each file is one document, one
token stream (BOS first where the tokenizer has one, as each training document starts); windows of `ctx` tokens
start every `stride` tokens, and each window scores only the tokens that the previous window did not,
so every token after the first is scored exactly once, with up to ctx - stride tokens of context
already seen before it (stride = ctx - 1 gives each token the most context; stride = ctx / 2 is half
the work). Window k covers tokens [k * stride, min(k * stride + ctx, N)). Several files are scored
separately (no context crosses from one to the next) and their sums pooled:

    nll  = mean over the scored tokens of -log p(token | its window before it)   (nats)
    ppl  = exp(nll)
    bpb  = total NLL in bits / the texts' UTF-8 bytes

With a BOS in front, the scored tokens are exactly the text's tokens, so bpb prices every byte of it
and compares across tokenizers; without one (a tokenizer with no BOS) the first token goes unscored.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

from ..errors import BitlmError


def read_text(path) -> str:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BitlmError(f"{p}: no such file; --data takes a UTF-8 text file") from None
    except IsADirectoryError:
        raise BitlmError(f"{p}: is a directory; --data takes a UTF-8 text file") from None
    except UnicodeDecodeError as e:
        raise BitlmError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise BitlmError(f"{p}: the file holds no text")
    return text


def text_ids(tokenizer, text: str) -> list[int]:
    """The text as one document: the tokenizer's own special tokens, then BOS in front if the
    tokenizer has one and did not add it itself (never a second one)."""
    ids = tokenizer.encode(text)
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos):
        ids = [bos] + ids
    return ids


def windows(n_tokens: int, ctx: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, n_scored) of each window: tokens [begin, end), the last n_scored of them scored."""
    if ctx < 2:
        raise BitlmError(f"--ctx must be at least 2 tokens, got {ctx}")
    if not 1 <= stride < ctx:
        raise BitlmError(f"--stride must be between 1 and --ctx - 1 ({ctx - 1}): each window needs a token "
                         f"of context before its first scored token; got {stride}")
    out, prev_end = [], 1  # token 0 has nothing before it
    for begin in range(0, n_tokens, stride):
        end = min(begin + ctx, n_tokens)
        if end > prev_end:
            out.append((begin, end, end - prev_end))
        prev_end = end
        if end == n_tokens:
            break
    return out


def perplexity(scorer, texts: list[str], ctx: int, stride: int, progress: bool = True) -> dict:
    """Perplexity of the documents `texts` under the scorer's model (eval/scoring.py), as the module
    docstring says."""
    if isinstance(texts, str):
        texts = [texts]
    max_ctx = scorer.config.max_position_embeddings
    if ctx > max_ctx:
        raise BitlmError(f"--ctx {ctx} exceeds the model's context length {max_ctx}")
    docs = [text_ids(scorer.tokenizer, t) for t in texts]
    if sum(len(ids) - 1 for ids in docs) < 1:
        raise BitlmError("the text is a single token: nothing to score")
    plan = [(ids, w) for ids in docs for w in windows(len(ids), ctx, stride)]
    bar = None
    if progress:
        try:
            from tqdm import tqdm
        except ImportError:
            raise BitlmError("the progress bar needs tqdm (pip install tqdm), or pass --no-progress") from None
        bar = tqdm(total=sum(w[2] for _, w in plan), unit="tok", file=sys.stderr, dynamic_ncols=True,
                   desc="perplexity", leave=False)
    total, n_scored, greedy = 0.0, 0, 0
    t0 = time.perf_counter()
    try:
        for ids, (begin, end, n) in plan:
            lp, g = scorer.score(ids[begin:end], n)
            total -= float(lp.sum())
            n_scored += n
            greedy += int(g.sum())
            if bar is not None:
                bar.set_postfix(ppl=f"{math.exp(total / n_scored):.3f}", refresh=False)
                bar.update(n)
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return {"runtime": scorer.runtime, "documents": len(texts), "tokens": n_scored,
            "text_tokens": sum(len(ids) for ids in docs), "bytes": n_bytes,
            "ctx": ctx, "stride": stride, "windows": len(plan),
            "nll": total / n_scored, "ppl": math.exp(total / n_scored),
            "bpb": total / math.log(2) / n_bytes, "total_nll": total, "greedy_accuracy": greedy / n_scored,
            "seconds": seconds, "tokens_per_s": n_scored / seconds if seconds > 0 else None}


def format_result(r: dict, source: str) -> str:
    return "\n".join([
        "| model | data | runtime | ctx | stride | tokens | bytes | nll | ppl | bpb |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| {r['model']} | {source} | {r['runtime']}{'' if r.get('head') is None else ', head ' + r['head']} "
        f"| {r['ctx']} | {r['stride']} | {r['tokens']} | {r['bytes']} | {r['nll']:.4f} | {r['ppl']:.3f} "
        f"| {r['bpb']:.4f} |",
        "",
        f"{r['windows']} windows in {r['seconds']:.1f} s ({r['tokens_per_s'] or 0:.0f} tokens/s); "
        f"greedy accuracy {100 * r['greedy_accuracy']:.2f}%",
    ])
