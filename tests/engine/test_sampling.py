"""Sampling against hand-computed cases: greedy, top-k, top-p on a dyadic distribution, seeds, and the
frequencies of many draws against the softmax."""

import math

import numpy as np
import pytest

from bitlm.engine.sampling import SamplingParams, nucleus, process_logits, sample, top_k_filter, top_p_filter
from bitlm.errors import BitlmError

# Probabilities that are exact in binary, so the cumulative sums are exact too.
DYADIC = np.array([0.125, 0.5, 0.0625, 0.25, 0.0625], dtype=np.float32)
LOG_DYADIC = np.log(DYADIC)


def kept(logits: np.ndarray) -> set[int]:
    return set(np.flatnonzero(np.isfinite(logits)).tolist())


def test_greedy_is_argmax_first_on_ties():
    logits = np.array([[0.1, 3.0, -1.0, 3.0], [5.0, 4.0, 4.5, -2.0], [-3.0, -2.0, -1.0, -0.5]])
    p = SamplingParams(temperature=0, top_k=1, top_p=0.1)
    assert sample(logits, p).tolist() == [1, 0, 3]
    assert p.greedy and not SamplingParams(temperature=0.5).greedy


def test_top_k_keeps_the_k_largest():
    logits = np.array([1.0, 5.0, 3.0, 4.0, 2.0])
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
    assert kept(top_p_filter(LOG_DYADIC, p)) == expected
    batch = np.stack([LOG_DYADIC, LOG_DYADIC[::-1]])  # row-wise, whatever the order of tokens
    out = top_p_filter(batch, p)
    assert kept(out[0]) == expected
    assert kept(out[1]) == {4 - i for i in expected}


def test_top_p_with_tied_tail_keeps_exactly_one_of_the_ties():
    out = top_p_filter(LOG_DYADIC, 0.9)  # 0.875 < 0.9: one of the two 0.0625 tokens is needed
    assert len(kept(out)) == 4 and {0, 1, 3} <= kept(out)


def full_sort_nucleus(logits: np.ndarray, p: float) -> set[int]:
    """The definition, by a sort of the whole row in float64."""
    probs = np.exp(logits.astype(np.float64) - logits.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    mass_before = np.cumsum(probs[order]) - probs[order]
    return set(order[mass_before < p].tolist())


@pytest.mark.parametrize("scale", [0.1, 1.0, 4.0])  # from a nucleus of thousands of tokens to a handful
def test_nucleus_of_a_large_vocabulary_equals_a_full_sort(scale):
    rng = np.random.default_rng(int(scale * 10))
    logits = (rng.standard_normal(50_000) * scale).astype(np.float32)
    for p in (0.05, 0.5, 0.9, 0.99):
        got = nucleus(logits, p)
        assert set(got.tolist()) == full_sort_nucleus(logits, p)
        assert np.all(np.diff(logits[got]) <= 1e-6)  # most likely first (to the rounding of exp)


def test_uniform_nucleus_is_exactly_the_share_p():
    got = nucleus(np.zeros(1000, dtype=np.float32), 0.5)  # past the first 64 candidates: widened
    assert len(got) == 500


def test_nothing_to_sample_is_an_error():
    for top_p in (1.0, 0.9):
        with pytest.raises(BitlmError, match="nothing to sample"):
            sample(np.full((1, 4), -np.inf), SamplingParams(temperature=1.0, top_k=0, top_p=top_p))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_logits_are_an_error(bad):
    logits = np.array([[0.0, 1.0, bad, 2.0]])
    for params in (SamplingParams(temperature=0), SamplingParams(temperature=1.0, top_k=0, top_p=0.9)):
        with pytest.raises(BitlmError, match="NaN or \\+inf"):
            sample(logits, params)


@pytest.mark.parametrize("top_k,top_p", [(0, 0.999), (0, 1.0), (4, 0.999)])
def test_frequencies_when_every_token_is_in_the_nucleus(top_k, top_p):
    probs = np.array([0.01, 0.04, 0.15, 0.8])  # top-p 0.999 keeps all four
    n = 40_000
    p = SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p, seed=9)
    draws = sample(np.broadcast_to(np.log(probs), (n, 4)), p, p.generator())
    freq = np.bincount(draws, minlength=4) / n
    assert np.abs(freq - probs).max() < 4 * 0.5 / math.sqrt(n), freq


def test_top_k_then_top_p_after_temperature():
    logits = LOG_DYADIC * 2  # at temperature 2 the distribution is DYADIC again
    p = SamplingParams(temperature=2.0, top_k=3, top_p=0.7)
    out = process_logits(logits, p)
    assert kept(out) == {1, 3}
    probs = np.exp(out - out.max())
    np.testing.assert_allclose((probs / probs.sum())[[1, 3]], [2 / 3, 1 / 3], rtol=1e-6)


def test_same_seed_same_tokens_other_seed_other_tokens():
    logits = np.zeros((64, 512))  # uniform over 512 tokens, 64 draws
    p = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=1234)
    a = sample(logits, p, p.generator())
    b = sample(logits, p, p.generator())
    c = sample(logits, SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=99), SamplingParams(seed=99).generator())
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_frequencies_match_the_softmax(temperature):
    logits = np.array([2.0, 0.5, -1.0, 1.0, 0.0])
    n = 40_000
    p = SamplingParams(temperature=temperature, top_k=0, top_p=1.0, seed=7)
    draws = sample(np.broadcast_to(logits, (n, 5)), p, p.generator())
    freq = np.bincount(draws, minlength=5) / n
    expected = np.exp(logits / temperature) / np.exp(logits / temperature).sum()
    # binomial standard error is at most 0.5/sqrt(n) = 0.0025; allow 4 of them
    assert np.abs(freq - expected).max() < 4 * 0.5 / math.sqrt(n), (freq, expected)


def test_top_p_sampling_draws_only_the_nucleus_in_proportion():
    n = 20_000
    p = SamplingParams(temperature=1.0, top_k=0, top_p=0.7, seed=3)
    draws = sample(np.broadcast_to(LOG_DYADIC, (n, 5)), p, p.generator())
    counts = np.bincount(draws, minlength=5)
    assert counts[[0, 2, 4]].sum() == 0
    assert abs(counts[1] / n - 2 / 3) < 0.015


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
