"""Log-probabilities of the tokens of a sequence, on either runtime: the step that perplexity and the
lm-evaluation-harness adapter share.

`score(ids, n)` returns, for the last n of `ids`, log p(ids[i] | ids[:i]) (float64) and whether ids[i]
was the most likely token (lm-eval's is_greedy). The native scorer runs the C forward from an empty
cache: the tokens before the first predicting position with no logits at all, then the predicting
positions in chunks, so the float32 logits held at once are [chunk, vocab] (64 x 128256 x 4 bytes =
33 MB at the 2B4T vocabulary) however long the window. The torch scorer runs the reference model
once over the sequence and keeps the logits of the last n positions only.
"""

from __future__ import annotations

import numpy as np

from ..errors import BitlmError


def log_softmax_pick(logits: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """logits float32 [n, V], targets int [n] -> (log p(target) float64 [n], target == argmax [n])."""
    x = logits.astype(np.float64)
    m = x.max(axis=1, keepdims=True)
    lse = np.log(np.exp(x - m).sum(axis=1)) + m[:, 0]
    rows = np.arange(len(targets))
    return x[rows, targets] - lse, logits.argmax(axis=1) == targets


class NativeScorer:
    """Scores on a NativeModel (engine/native.py). One sequence at a time: the model owns one cache."""

    runtime = "native"

    def __init__(self, nm, chunk: int = 64):
        self.nm, self.chunk = nm, chunk
        self.config, self.tokenizer = nm.config, nm.tokenizer

    def score(self, ids, n: int) -> tuple[np.ndarray, np.ndarray]:
        ids = np.asarray(ids, dtype=np.int32)
        T = len(ids)
        if not 1 <= n < T:
            raise BitlmError(f"cannot score {n} of {T} tokens: each scored token needs one before it")
        nm = self.nm
        nm.reset()
        first = T - n - 1  # position whose logits predict the first scored token, ids[T - n]
        if first:
            nm.forward(ids[:first], n_out=0)  # context only: fills the KV cache, no logits
        lps, greedy = [], []
        for s in range(first, T - 1, self.chunk):
            e = min(s + self.chunk, T - 1)
            logits = nm.forward(ids[s:e], n_out=e - s)  # [e - s, V]: predictions of ids[s+1 .. e]
            lp, g = log_softmax_pick(logits, ids[s + 1:e + 1])
            lps.append(lp)
            greedy.append(g)
        return np.concatenate(lps), np.concatenate(greedy)


class TorchScorer:
    """Scores on bitlm's torch model (BitNetForCausalLM): the reference."""

    runtime = "torch"

    def __init__(self, model):
        self.model = model
        self.config, self.tokenizer = model.config, model.tokenizer

    def score(self, ids, n: int) -> tuple[np.ndarray, np.ndarray]:
        import torch
        T = len(ids)
        if not 1 <= n < T:
            raise BitlmError(f"cannot score {n} of {T} tokens: each scored token needs one before it")
        x = torch.tensor([list(ids[:-1])], dtype=torch.long, device=self.model.device)
        with torch.inference_mode():
            logits = self.model(x, logits_to_keep=n)[0].float().cpu().numpy()  # [n, V]
        return log_softmax_pick(logits, np.asarray(ids[T - n:], dtype=np.int64))


def scorer_for(model):
    """The scorer of what cli.load_model returns: a NativeLM (native runtime) or a torch model."""
    from ..engine.native import NativeLM
    return NativeScorer(model.nm) if isinstance(model, NativeLM) else TorchScorer(model)
