"""From logits to the next token: temperature, top-k, top-p (nucleus), and a seeded draw.

The order is the one Hugging Face transformers uses: scale by 1/temperature, then keep the top-k logits,
then keep the smallest set of most likely tokens whose probability reaches top-p, then draw from the
renormalised softmax. Temperature 0 is greedy: the argmax, with no randomness at all.

numpy, not torch: the native runtime generates without importing torch. Nothing here sorts the whole
vocabulary: top-k is a linear-time partition, and top-p sorts only the most likely candidates, widening
the set until the nucleus ends inside it (a full sort of 128256 logits took 16 ms a token, half as long
as the forward of the 2B4T model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import BitlmError


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each token. top_k=0 and top_p=1 switch those filters off; seed=None draws fresh."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    seed: int | None = None

    def __post_init__(self):
        t, k, p = self.temperature, self.top_k, self.top_p
        if not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise BitlmError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise BitlmError(f"top_k must be an integer >= 0 (0 = off), got {k!r}")
        if not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise BitlmError(f"top_p must be in (0, 1] (1 = off), got {p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise BitlmError(f"seed must be an integer, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self) -> np.random.Generator:
        """A generator seeded with `seed` (or from the OS when seed is None)."""
        return np.random.default_rng(self.seed)


def top_k_filter(logits, k: int) -> np.ndarray:
    """Float32 logits (..., V) with everything below the k-th largest set to -inf (ties at the k-th all stay)."""
    x = np.asarray(logits, dtype=np.float32)
    V = x.shape[-1]
    if k <= 0 or k >= V:
        return x
    kth = np.partition(x, V - k, axis=-1)[..., V - k:V - k + 1]
    return np.where(x < kth, np.float32(-np.inf), x)


def _drawable(x: np.ndarray) -> np.ndarray:
    """The ids of one row of logits that can be drawn (not -inf), in id order."""
    ids = np.flatnonzero(x > -np.inf)
    if ids.size == 0:
        raise BitlmError("every token's logit is -inf: there is nothing to sample")
    return ids


def nucleus(logits, p: float) -> np.ndarray:
    """The token ids of the smallest set of most likely tokens whose probability sums to at least p
    (at least one), most likely first, from one row of logits (V,) (-inf: cannot be drawn)."""
    x = np.asarray(logits, dtype=np.float32)
    ids = _drawable(x)
    v = x if ids.size == x.size else x[ids]
    w = np.exp(v - v.max())  # float32, as torch's softmax; the sums below in float64
    total = float(w.sum(dtype=np.float64))
    n = min(ids.size, 64)
    while True:
        top = np.argpartition(-w, n - 1)[:n] if n < ids.size else np.arange(ids.size)
        top = top[np.argsort(-w[top])]
        probs = w[top].astype(np.float64) / total
        mass_before = np.cumsum(probs) - probs  # probability of the tokens ranked above each one
        count = int(np.count_nonzero(mass_before < p))  # the first has mass_before 0 < p: always kept
        if count < n or n == ids.size:
            return ids[top[:count]]
        n = min(ids.size, 8 * n)  # the nucleus may go on past the n most likely: widen


def top_p_filter(logits, p: float) -> np.ndarray:
    """Float32 logits (..., V) keeping, in each row, the smallest set of most likely tokens whose
    probability sums to at least p (at least one); the others -inf."""
    x = np.asarray(logits, dtype=np.float32)
    if p >= 1:
        return x
    rows = x.reshape(-1, x.shape[-1])
    out = np.full_like(rows, -np.inf)
    for r, row in enumerate(rows):
        keep = nucleus(row, p)
        out[r, keep] = row[keep]
    return out.reshape(x.shape)


def process_logits(logits, params: SamplingParams) -> np.ndarray:
    """Float32 logits (..., V) after temperature, top-k and top-p; -inf marks a token that cannot be drawn.

    Only for temperature > 0 (greedy needs no processing).
    """
    return top_p_filter(_temperature_top_k(logits, params), params.top_p)


def _temperature_top_k(logits, params: SamplingParams) -> np.ndarray:
    return top_k_filter(np.asarray(logits, dtype=np.float32) / np.float32(params.temperature), params.top_k)


def _check_logits(logits, what: str) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float32)
    if x.ndim != 2:
        raise BitlmError(f"{what}: expected logits of shape (batch, vocab), got {x.shape}")
    if not np.all(np.isfinite(x) | (x == -np.inf)):
        raise BitlmError(f"{what}: the logits hold NaN or +inf (the model's output overflowed); "
                         "check the model's weights")
    return x


def _support(row: np.ndarray, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """The ids that one row of logits (after temperature and top-k) can draw, and their float32 weights
    exp(v - max): top-p's nucleus (most likely first), else every drawable id (in id order)."""
    if top_p < 1:
        ids = nucleus(row, top_p)
        v = row[ids]
    else:
        ids = _drawable(row)  # in id order: the whole row needs no copy
        v = row if ids.size == row.size else row[ids]
    return ids, np.exp(v - v.max())


def sample(logits, params: SamplingParams, generator: np.random.Generator | None = None) -> np.ndarray:
    """Next token ids (B,) int64 from logits (B, V) (a numpy array, or anything np.asarray takes)."""
    x = _check_logits(logits, "sample")
    if params.greedy:
        return x.argmax(axis=-1)  # the first of equal maxima
    rng = generator if generator is not None else params.generator()
    x = _temperature_top_k(x, params)
    out = np.empty(x.shape[0], dtype=np.int64)
    for r, row in enumerate(x):
        ids, w = _support(row, params.top_p)
        cum = np.cumsum(w, dtype=np.float64)
        i = int(np.searchsorted(cum, rng.random() * cum[-1], side="right"))
        out[r] = ids[min(i, ids.size - 1)]
    return out


def distribution(logits, params: SamplingParams) -> np.ndarray:
    """Float64 probabilities (B, V) that `sample` draws each row's token from: after temperature, top-k
    and top-p, normalised (exact speculative decoding compares these). Greedy: one-hot at the argmax."""
    x = _check_logits(logits, "distribution")
    out = np.zeros(x.shape, dtype=np.float64)
    if params.greedy:
        out[np.arange(x.shape[0]), x.argmax(axis=-1)] = 1.0
        return out
    x = _temperature_top_k(x, params)
    for r, row in enumerate(x):
        ids, w = _support(row, params.top_p)
        w = w.astype(np.float64)
        out[r, ids] = w / w.sum()
    return out


def draw(probs: np.ndarray, generator: np.random.Generator) -> int:
    """One id from float64 probabilities (V,) (not necessarily normalised), drawn as `sample` draws."""
    cum = np.cumsum(probs, dtype=np.float64)
    if not cum[-1] > 0:
        raise BitlmError("draw: the probabilities are all zero: there is nothing to sample")
    i = int(np.searchsorted(cum, generator.random() * cum[-1], side="right"))
    if i >= probs.shape[-1]:  # u * total rounded up to the total: the last id that can be drawn
        i = int(np.flatnonzero(probs)[-1])
    return i
