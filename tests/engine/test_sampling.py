"""Sampling against hand-computed cases: greedy, top-k, top-p on a dyadic distribution, seeds, and the
frequencies of many draws against the softmax."""

import math

import pytest
import torch

from bitlm.engine.sampling import SamplingParams, process_logits, sample, top_k_filter, top_p_filter
from bitlm.errors import BitlmError

# Probabilities that are exact in binary, so the cumulative sums are exact too.
DYADIC = torch.tensor([0.125, 0.5, 0.0625, 0.25, 0.0625])


def kept(logits: torch.Tensor) -> set[int]:
    return set(torch.nonzero(torch.isfinite(logits)).flatten().tolist())


def test_greedy_is_argmax_first_on_ties():
    logits = torch.tensor([[0.1, 3.0, -1.0, 3.0], [5.0, 4.0, 4.5, -2.0], [-3.0, -2.0, -1.0, -0.5]])
    p = SamplingParams(temperature=0, top_k=1, top_p=0.1)
    assert sample(logits, p).tolist() == [1, 0, 3]
    assert p.greedy and not SamplingParams(temperature=0.5).greedy


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([1.0, 5.0, 3.0, 4.0, 2.0])
    assert kept(top_k_filter(logits, 2)) == {1, 3}
    assert kept(top_k_filter(logits, 1)) == {1}
    assert kept(top_k_filter(logits, 0)) == {0, 1, 2, 3, 4}  # 0 = off
    assert kept(top_k_filter(logits, 9)) == {0, 1, 2, 3, 4}
    kept_logits = top_k_filter(logits, 3)
    assert kept_logits[[1, 2, 3]].tolist() == [5.0, 3.0, 4.0]  # kept values unchanged


@pytest.mark.parametrize("p,expected", [
    (1e-6, {1}),             # always at least the most likely token
    (0.4, {1}),              # 0.5 alone reaches 0.4
    (0.7, {1, 3}),           # 0.5 + 0.25 = 0.75 >= 0.7
    (0.8, {1, 3, 0}),        # 0.875 >= 0.8
    (1.0, {0, 1, 2, 3, 4}),  # off
])
def test_top_p_keeps_the_smallest_set_reaching_p(p, expected):
    assert kept(top_p_filter(DYADIC.log(), p)) == expected
    batch = torch.stack([DYADIC.log(), DYADIC.log().flip(0)])  # row-wise, whatever the order of tokens
    out = top_p_filter(batch, p)
    assert kept(out[0]) == expected
    assert kept(out[1]) == {4 - i for i in expected}


def test_top_p_with_tied_tail_keeps_exactly_one_of_the_ties():
    out = top_p_filter(DYADIC.log(), 0.9)  # 0.875 < 0.9: one of the two 0.0625 tokens is needed
    assert len(kept(out)) == 4 and {0, 1, 3} <= kept(out)


def test_top_k_then_top_p_after_temperature():
    logits = (DYADIC.log() * 2)  # at temperature 2 the distribution is DYADIC again
    p = SamplingParams(temperature=2.0, top_k=3, top_p=0.7)
    out = process_logits(logits, p)
    assert kept(out) == {1, 3}
    assert torch.allclose(out.softmax(-1)[[1, 3]], torch.tensor([2 / 3, 1 / 3]))


def test_same_seed_same_tokens_other_seed_other_tokens():
    logits = torch.zeros(64, 512)  # uniform over 512 tokens, 64 draws
    p = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=1234)
    a = sample(logits, p, p.generator())
    b = sample(logits, p, p.generator())
    c = sample(logits, SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=99), SamplingParams(seed=99).generator())
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_frequencies_match_the_softmax(temperature):
    logits = torch.tensor([2.0, 0.5, -1.0, 1.0, 0.0])
    n = 40_000
    p = SamplingParams(temperature=temperature, top_k=0, top_p=1.0, seed=7)
    draws = sample(logits.expand(n, -1), p, p.generator())
    freq = torch.bincount(draws, minlength=5).double() / n
    expected = torch.softmax(logits.double() / temperature, -1)
    # binomial standard error is at most 0.5/sqrt(n) = 0.0025; allow 4 of them
    assert (freq - expected).abs().max() < 4 * 0.5 / math.sqrt(n), (freq, expected)


def test_top_p_sampling_draws_only_the_nucleus_in_proportion():
    n = 20_000
    p = SamplingParams(temperature=1.0, top_k=0, top_p=0.7, seed=3)
    draws = sample(DYADIC.log().expand(n, -1), p, p.generator())
    counts = torch.bincount(draws, minlength=5)
    assert counts[[0, 2, 4]].sum() == 0
    assert abs(counts[1].item() / n - 2 / 3) < 0.015


@pytest.mark.parametrize("kwargs,match", [
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"top_k": 2.5}, "top_k"),
    ({"seed": "x"}, "seed"),
])
def test_bad_parameters_are_refused(kwargs, match):
    with pytest.raises(BitlmError, match=match):
        SamplingParams(**kwargs)
