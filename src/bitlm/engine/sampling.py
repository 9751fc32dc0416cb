"""From logits to the next token: temperature, top-k, top-p (nucleus), and a seeded draw.

The order is the one Hugging Face transformers uses: scale by 1/temperature, then keep the top-k logits,
then keep the smallest set of most likely tokens whose probability reaches top-p, then draw from the
renormalised softmax. Temperature 0 is greedy: the argmax, with no randomness at all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

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

    def generator(self) -> torch.Generator:
        """A CPU generator seeded with `seed` (or from the OS when seed is None)."""
        g = torch.Generator()
        if self.seed is None:
            g.seed()
        else:
            g.manual_seed(self.seed)
        return g


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Logits (..., V) with everything below the k-th largest set to -inf (ties at the k-th all stay)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (..., 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability sums to at least p (at least one)."""
    if p >= 1:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each one
    drop_sorted = mass_before >= p  # the first token has mass_before 0 < p: always kept
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def process_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Float32 logits (..., V) after temperature, top-k and top-p; -inf marks a token that cannot be drawn.

    Only for temperature > 0 (greedy needs no processing).
    """
    x = logits.float() / params.temperature
    x = top_k_filter(x, params.top_k)
    return top_p_filter(x, params.top_p)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V)."""
    if params.greedy:
        return logits.argmax(dim=-1)
    probs = process_logits(logits, params).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
