"""Speculative decoding (engine/speculative.py) against plain decoding.

Greedy: the same tokens, finish reason and cache afterwards as plain decoding, with both drafters, on
drafts that are mostly right and mostly wrong, at stop tokens, stop strings, max_new_tokens and the
context limit. That identity rests on the native runtime's batch invariance (a row's logits are the same
bits whether it runs alone or among k + 1 rows), which the first test checks on every kernel path, head
and KV type this machine has: were it broken, the identity tests could pass or fail by luck.
Sampled: the first two tokens' joint distribution against the exact one computed from the model, by a
chi-square test that a wrong acceptance rule fails (shown in the test)."""

import math

import numpy as np
import pytest

import bitlm
from bitlm.data import bundled_model_dir
from bitlm.engine import speculative as spec_mod
from bitlm.engine.generate import ChatSession, generate, stream_text
from bitlm.engine.sampling import SamplingParams, distribution
from bitlm.engine.speculative import PromptLookup, Speculative, Speculator, accept_drafts, shared_prefix_len
from bitlm.errors import BitlmError
from helpers import finish, first_layers, make_tiny_model_dir

if not __import__("bitlm.kernels", fromlist=["available"]).available():
    pytest.skip("native kernels not built", allow_module_level=True)
from bitlm.engine.native import NativeLM, NativeModel, arrays_from_model  # noqa: E402
from bitlm.kernels import info  # noqa: E402

PATHS = info()["paths"]
GREEDY = dict(temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # 320 positions: rounds across the 256-key attention chunks
    return bitlm.load(make_tiny_model_dir(tmp_path_factory.mktemp("spec_tiny"), None, max_position_embeddings=320),
                      tokenizer=False)


@pytest.fixture(scope="module")
def other(tmp_path_factory):
    """Another random tiny model of the same vocabulary: its drafts are nearly always wrong."""
    return bitlm.load(make_tiny_model_dir(tmp_path_factory.mktemp("spec_other"), None, seed=1), tokenizer=False)


@pytest.fixture(scope="module")
def shakespeare():
    """The bundled model: greedy, it falls into loops that prompt lookup drafts well (about half right)."""
    return NativeLM(bitlm.load_native(bundled_model_dir(), head="q8"))


@pytest.fixture(scope="module")
def early_exit():
    """The first 3 of the bundled model's 4 blocks: a draft mostly right (70% greedy), sometimes wrong."""
    return first_layers(bitlm.load_native(bundled_model_dir(), head="q8"), 3)


def passage_prompt(model):
    text = ("ROMEO:\nBut soft, what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n"
            "Arise, fair sun, and kill the envious moon,\nWho is already sick and pale with grief.\n")
    return model.tokenizer.encode(text + text + text[:40])


# ---- batch invariance: what greedy identity rests on ------------------------------------------------
@pytest.mark.parametrize("path", PATHS)
def test_a_rows_logits_are_the_same_bits_alone_or_among_many(tiny, path):
    """Plain decoding runs one row per forward (and the last prompt row among the prompt's); a
    speculative round runs k + 1 rows. Every row's logits must be bit-identical either way, also after
    a rollback over positions that held other tokens, for every head and KV type: the integer products
    are exact, and every float step (norms, quantization, RoPE, attention over key chunks at fixed
    positions merged in order, the head's dequantization) is done per row in one order. 17 and 33 rows reach AMX's
    GEMM (from 16 rows), 60 the micro-batch split (48)."""
    rng = np.random.default_rng(0)
    V = tiny.config.vocab_size
    for head in ("f32", "bf16", "q8", "q6"):
        arrays = arrays_from_model(tiny, head)
        for kv in ("f16", "f32", "q8_0"):
            nm = NativeModel(tiny.config, arrays, max_len=300, kv=kv, path=path)
            nm.rope_chunk = 5  # RoPE rows filled in the middle of rounds and rollbacks
            ids = rng.integers(0, V, 300).astype(np.int32)
            # (240, 30): rows on both sides of the 256-key attention chunks
            for P, B in ((1, 2), (5, 2), (30, 9), (40, 17), (60, 33), (100, 60), (240, 30)):
                nm.reset()
                plain = [nm.forward(ids[:P], 1)[0]] + [nm.forward(ids[i:i + 1], 1)[0] for i in range(P, P + B - 1)]
                nm.reset()
                nm.forward(ids[:P - 1], 0)
                batched = nm.forward(ids[P - 1:P - 1 + B], B)
                assert np.array_equal(np.stack(plain), batched), (head, kv, P, B)
                nm.truncate(P - 1)  # roll back, write other tokens there, roll back again
                nm.forward(rng.integers(0, V, B + 3).astype(np.int32), 0)
                nm.truncate(P - 1)
                assert np.array_equal(nm.forward(ids[P - 1:P - 1 + B], B), batched), (head, kv, P, B, "rollback")


# ---- prompt lookup ------------------------------------------------------------------------------------
def test_prompt_lookup_proposes_what_followed_the_longest_latest_match():
    pl = PromptLookup(ngram_max=3, ngram_min=1)
    #        0  1  2  3  4  5  6  7  8  9
    ids = [5, 6, 7, 8, 9, 6, 7, 1, 2, 6, 7]
    # suffix 3-gram (2, 6, 7) never occurred; 2-gram (6, 7) at 1 and 5: the latest, followed by 1, 2, 6
    assert pl.propose(ids, 3) == ([1, 2, 6], None)
    assert pl.propose(ids + [8], 4) == ([9, 6, 7, 1], None)  # (6, 7, 8) occurred at 1: 3-gram wins
    assert pl.propose(ids + [8, 3], 4) == ([], None)  # 3 never occurred
    assert pl.propose([4, 4, 4, 4], 5) == ([4], None)  # history rewritten: index rebuilt; (4, 4, 4) at 0
    assert pl.propose([4], 5) == ([], None)
    assert PromptLookup(2, 2).propose([1, 2, 3, 9, 3], 2) == ([], None)  # only the 1-gram (3) matched
    # the incremental index equals one built at once
    rng = np.random.default_rng(0)
    seq = rng.integers(0, 6, 300).tolist()
    grown, whole = PromptLookup(3, 1), None
    for n in range(2, 300, 7):
        whole = PromptLookup(3, 1)
        assert grown.propose(seq[:n], 4) == whole.propose(seq[:n], 4)


def test_shared_prefix_len():
    a = list(range(100))
    for n in (0, 1, 37, 99, 100):
        b = a[:n] + [-1] * 5
        assert shared_prefix_len(a, b) == n
    assert shared_prefix_len(a, a[:40]) == 40 and shared_prefix_len([], a) == 0


def test_accept_drafts_greedy_hand_case():
    rows = np.full((4, 6), -1.0, np.float32)
    rows[0, 2] = rows[1, 3] = rows[2, 5] = rows[3, 0] = 1.0
    p = SamplingParams(temperature=0)
    assert accept_drafts(rows, [2, 3, 5], None, p) == ([2, 3, 5, 0], 3)  # all right: the bonus token
    assert accept_drafts(rows, [2, 4, 5], None, p) == ([2, 3], 1)  # the first wrong one: the correction
    assert accept_drafts(rows[:1], [], None, p) == ([2], 0)
    with pytest.raises(BitlmError, match="expected logits"):
        accept_drafts(rows, [2], None, p)


# ---- greedy: the same tokens as plain decoding ------------------------------------------------------------
def assert_same(model, prompt, spec, **opts):
    """Plain and speculative generation give the same tokens and finish reason and leave the same cache."""
    c1, c2 = model.new_cache(), None
    plain = finish(generate(model, prompt, cache=c1, **opts))
    n1 = c1.length
    c2 = model.new_cache()
    it = generate(model, prompt, cache=c2, speculative=spec, **opts)
    got = finish(it)
    assert got == plain
    assert c2.length <= len(prompt) + len(plain[0]) and c2.length >= n1
    return plain, it.speculative


@pytest.mark.parametrize("path", PATHS)
def test_greedy_equals_plain_on_every_kernel_path(tiny, other, path):
    lm = NativeLM(NativeModel.from_model(tiny, head="q8", path=path))
    same = NativeLM(NativeModel.from_model(tiny, head="q8", path=path))
    wrong = NativeLM(NativeModel.from_model(other, head="q8", path=path))
    prompt = np.random.default_rng(1).integers(0, 512, 20).tolist() * 3
    for spec, rate in ((Speculative("lookup", draft_max=5), None), (Speculative("draft", draft_model=same), 1.0),
                       (Speculative("draft", draft_max=3, draft_model=wrong), 0.1),
                       (Speculative("draft", draft_max=3, draft_model=wrong, adaptive=False), 0.1)):
        (tokens, reason), stats = assert_same(lm, prompt, spec, max_new_tokens=60, **GREEDY)
        assert len(tokens) == 60 and reason == "length" and stats.drafted > 0
        if rate == 1.0:  # the target drafting for itself: every draft accepted, k + 1 tokens a round
            assert stats.accepted == stats.drafted and stats.rounds == 60 // 9 + 1
        elif rate is not None:
            assert stats.acceptance_rate < rate
            if spec.adaptive:  # k falls from 3 to 1 after rejections, then drafting pauses for 1, 2, 4 .. rounds
                assert stats.drafted <= stats.rounds // 2 + 4 * stats.accepted
            else:  # 3 drafted every round but the last two (room for fewer tokens)
                assert stats.drafted >= 3 * (stats.rounds - 2)


def test_greedy_equals_plain_where_drafts_are_often_right_and_often_wrong(shakespeare, early_exit):
    prompt = passage_prompt(shakespeare)
    for spec in (Speculative("lookup"), Speculative("lookup", draft_max=3, ngram_max=1, adaptive=False),
                 Speculative("draft", draft_max=6, draft_model=early_exit),
                 Speculative("draft", draft_max=4, draft_model=early_exit, adaptive=False)):
        (tokens, reason), stats = assert_same(shakespeare, prompt, spec, max_new_tokens=100, **GREEDY)
        assert len(tokens) == 100
        assert 0.2 < stats.acceptance_rate < 0.98, stats  # both outcomes, many times
        assert stats.drafted - stats.accepted > 10


def test_greedy_boundaries(shakespeare, early_exit):
    """max_new_tokens at and around k + 1, stop tokens inside a round, stop strings, the context limit."""
    prompt = passage_prompt(shakespeare)
    plain, _ = finish(generate(shakespeare, prompt, 60, **GREEDY))
    lookup = Speculative("lookup", draft_max=4, adaptive=False)
    draft = Speculative("draft", draft_max=4, draft_model=early_exit, adaptive=False)
    for spec in (lookup, draft):
        for n in list(range(0, 12)) + [31]:
            assert assert_same(shakespeare, prompt, spec, max_new_tokens=n, **GREEDY)[0] == (plain[:n], "length")
        for j in (0, 3, 7, 20):  # a stop token first seen at position j
            stop = plain[j]
            want = plain[:plain.index(stop)]
            got, _ = assert_same(shakespeare, prompt, spec, max_new_tokens=60, temperature=0, stop_token_ids=[stop])
            assert got == (want, "stop")
        text = shakespeare.tokenizer.decode(plain)
        for s in (text[5:12], text[30:45], "\nAnd, and"):
            a = stream_text(shakespeare, prompt, stop_strings=[s], max_new_tokens=60, **GREEDY)
            b = stream_text(shakespeare, prompt, stop_strings=[s], max_new_tokens=60, speculative=spec, **GREEDY)
            assert ("".join(a), a.token_ids, a.finish_reason) == ("".join(b), b.token_ids, b.finish_reason)
            assert b.finish_reason == "stop" and s not in b.text
        ctx = shakespeare.config.max_position_embeddings
        for room in (0, 1, 2, 5, 13):  # the context fills up: finish "context", never a forward past it
            p = (prompt * 2)[:ctx - room]
            got, _ = assert_same(shakespeare, p, spec, max_new_tokens=50, **GREEDY)
            assert len(got[0]) == room and got[1] == ("context" if room < 50 else "length")


def test_greedy_chat_equals_plain_chat(shakespeare, early_exit):
    for spec in (Speculative("lookup"), Speculative("draft", draft_model=early_exit)):
        a = ChatSession(shakespeare, system="Speak.", max_new_tokens=30, **GREEDY)
        b = ChatSession(shakespeare, system="Speak.", max_new_tokens=30, speculative=spec, **GREEDY)
        for msg in ("Who art thou?", "Say it again, and again."):
            ra, rb = a.send(msg), b.send(msg)
            assert "".join(ra) == "".join(rb) and ra.token_ids == rb.token_ids
            assert rb.stats()["draft_tokens"] > 0
        assert a.messages == b.messages


def test_a_caller_that_runs_the_target_itself(shakespeare, early_exit):
    """A server's scheduler drives the rounds with its own forwards (Speculator's protocol)."""
    prompt, nm = passage_prompt(shakespeare), shakespeare.nm
    plain, _ = finish(generate(shakespeare, prompt, 50, **GREEDY))
    for spec in (Speculative("lookup"), Speculative("draft", draft_model=early_exit)):
        sp = Speculator(spec, shakespeare, SamplingParams(temperature=0))
        nm.reset()
        nm.forward(prompt[:-1], 0)
        history = list(prompt)
        while len(history) < len(prompt) + 50:
            draft = sp.propose(history, len(prompt) + 50 - len(history) - 1)
            tokens, accepted = sp.accept(nm.forward([history[-1]] + draft, len(draft) + 1))
            nm.truncate(len(history) + accepted)
            history += tokens
        assert history[len(prompt):] == plain and nm.pos == len(history) - 1
        assert sp.stats.accepted > 0 and sp.stats.rounds < 50
    with pytest.raises(BitlmError, match="call propose"):
        sp.accept(nm.forward([1], 1))


def test_stream_stats_and_early_close_leave_a_consistent_cache(shakespeare):
    prompt = passage_prompt(shakespeare)
    s = stream_text(shakespeare, prompt, max_new_tokens=40, speculative=Speculative("lookup"), **GREEDY)
    "".join(s)
    st = s.stats()
    assert st["new_tokens"] == 40 and st["draft_tokens"] >= st["accepted_tokens"] > 0
    assert st["acceptance_rate"] == st["accepted_tokens"] / st["draft_tokens"]
    # closed in the middle of a round: the cache holds only the prompt and what was yielded
    cache = shakespeare.new_cache()
    gen = generate(shakespeare, prompt, 40, cache=cache, speculative=Speculative("lookup", draft_max=8), **GREEDY)
    got = [next(gen) for _ in range(5)]
    gen.close()
    assert cache.length <= len(prompt) + 5
    rest, _ = finish(generate(shakespeare, prompt + got, 10, cache=cache, **GREEDY))
    assert got + rest == finish(generate(shakespeare, prompt, 15, **GREEDY))[0]


def test_torch_model_runs_speculative_decoding_greedy_up_to_near_ties(tiny):
    """The torch model is not batch-invariant (its rows differ by about 1e-6 between one and k + 1 rows),
    so greedy identity holds only up to near-ties: each token is the argmax of a full recomputation to
    within 1e-4 of the maximum."""
    import torch
    prompt = np.random.default_rng(2).integers(0, 512, 12).tolist() * 3
    for spec in (Speculative("lookup"), Speculative("draft", draft_model=tiny)):
        tokens, reason = finish(generate(tiny, prompt, 20, speculative=spec, **GREEDY))
        assert len(tokens) == 20 and reason == "length"
        with torch.no_grad():
            full = tiny(torch.tensor([prompt + tokens]))[0, len(prompt) - 1:-1].numpy()
        assert np.all(full.max(-1) - full[np.arange(20), tokens] < 1e-4)


# ---- sampling: the target distribution exactly ------------------------------------------------------------
def chi2_bound(df: int, z: float = 3.719) -> float:
    """The chi-square quantile for an upper tail of 1e-4 (z = 3.719), by Wilson and Hilferty's cube-root
    normal approximation (within 1% of the exact quantile from df = 10 up)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def exact_two_tokens(nm, prompt, params):
    """P(t1, t2) float64 [V, V] from the model: P(t1 | prompt) P(t2 | prompt, t1), each the distribution
    plain sampling draws from."""
    nm.reset()
    p1 = distribution(nm.forward(prompt, 1), params)[0]
    joint = np.zeros((p1.size, p1.size))
    for t in np.flatnonzero(p1):
        nm.reset()
        joint[t] = p1[t] * distribution(nm.forward(prompt + [int(t)], 1), params)[0]
    return joint


def chi2_stat(counts, joint, n):
    """Pearson's statistic over the cells of expected count >= 5, the rest pooled into one cell; and df."""
    exp = joint.ravel() * n
    obs = counts.ravel().astype(np.float64)
    big = exp >= 5
    e = np.append(exp[big], exp[~big].sum())
    o = np.append(obs[big], obs[~big].sum())
    if e[-1] < 5:
        e, o = e[:-1], o[:-1]  # folded into nothing: the small cells' counts are checked below
    return float(((o - e) ** 2 / e).sum()), e.size - 1


def two_token_counts(lm, prompt, params, spec, n):
    V = lm.config.vocab_size
    counts = np.zeros((V, V), np.int64)
    cache = lm.new_cache()
    for seed in range(n):
        p = SamplingParams(params.temperature, params.top_k, params.top_p, seed)
        t1, t2 = generate(lm, prompt, 2, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, seed=seed,
                          ignore_eos=True, cache=cache, speculative=spec)
        counts[t1, t2] += 1
    return counts


@pytest.fixture(scope="module")
def v16(tmp_path_factory):
    """Target and draft with a vocabulary of 16: the joint of two tokens has at most 256 cells."""
    t = bitlm.load(make_tiny_model_dir(tmp_path_factory.mktemp("v16"), None, vocab_size=16), tokenizer=False)
    d = bitlm.load(make_tiny_model_dir(tmp_path_factory.mktemp("v16d"), None, vocab_size=16, seed=3), tokenizer=False)
    return (NativeModel.from_model(t, head="f32"), NativeLM(NativeModel.from_model(t, head="f32")),
            NativeLM(NativeModel.from_model(d, head="f32")))


N_DRAWS = 20000


@pytest.mark.parametrize("method", ["lookup", "draft"])
def test_sampled_tokens_follow_the_target_distribution(v16, monkeypatch, method):
    """The first two tokens' joint distribution from N_DRAWS speculative generations (fixed seeds) against
    the exact one, chi-square at a 1e-4 tail. The first token is decided by the accept/reject rule on
    the first draft; the second by the next draft, the bonus token, or a second round.
    Lookup: the prompt's suffix (1, 2) occurred before, so 3 is drafted first (q one-hot); temperature 0.9
    and top-k 10 (drafts outside the top 10 have p = 0). Draft model: another random model's q;
    temperature 1.3 and top-p 0.9. No draw may land on a pair of probability zero.
    The same test on broken rules, which must fail it: accepting every draft (the draft's distribution
    instead of the target's) and, for the draft model, accepting with probability p(x) ignoring q(x)."""
    nm, lm, dm = v16
    prompt = [1, 2, 3, 4, 1, 2, 3, 4, 1, 2]
    if method == "lookup":
        params, spec = SamplingParams(3.0, 10, 1.0), Speculative("lookup", draft_max=3)
    else:
        params, spec = SamplingParams(4.0, 0, 0.9), Speculative("draft", draft_max=3, draft_model=dm)
    joint = exact_two_tokens(nm, prompt, params)
    assert (joint == 0).sum() > 20  # the filters leave out many pairs

    counts = two_token_counts(lm, prompt, params, spec, N_DRAWS)
    stat, df = chi2_stat(counts, joint, N_DRAWS)
    assert counts[joint == 0].sum() == 0
    assert stat < chi2_bound(df), (stat, df)

    broken = [lambda p_x, q_x, g: True]
    if method == "draft":
        broken.append(lambda p_x, q_x, g: g.random() < p_x)
    for rule in broken:
        monkeypatch.setattr(spec_mod, "_accept", rule)
        n = 1000
        stat, df = chi2_stat(two_token_counts(lm, prompt, params, spec, n), joint, n)
        assert stat > chi2_bound(df), (stat, df)


def test_distribution_is_what_sample_draws_from():
    import torch
    x = np.random.default_rng(0).normal(size=(3, 50)).astype(np.float32) * 3
    for params in (SamplingParams(0.7, 0, 1.0), SamplingParams(1.0, 5, 1.0), SamplingParams(1.2, 20, 0.6)):
        got = distribution(x, params)
        ref = torch.tensor(x, dtype=torch.float64) / params.temperature
        if params.top_k:
            kth = ref.topk(params.top_k, -1).values[:, -1:]
            ref = ref.masked_fill(ref < kth, -math.inf)
        probs = ref.softmax(-1)
        if params.top_p < 1:  # keep the most likely tokens until their sum reaches top_p
            srt, order = probs.sort(-1, descending=True)
            drop = (srt.cumsum(-1) - srt) >= params.top_p
            probs = probs.scatter(-1, order, srt.masked_fill(drop, 0.0))
            probs = probs / probs.sum(-1, keepdim=True)
        np.testing.assert_allclose(got, probs.numpy(), atol=1e-6)
    assert (distribution(x, SamplingParams(0)) == np.eye(50)[x.argmax(-1)]).all()


# ---- bad input ------------------------------------------------------------------------------------------
def test_bad_options_and_incompatible_drafts_are_one_line_errors(tiny, tmp_path):
    lm = NativeLM(NativeModel.from_model(tiny, head="q8"))
    with pytest.raises(BitlmError, match="not one of"):
        Speculative("ngram")
    with pytest.raises(BitlmError, match="draft_max must be an integer >= 1"):
        Speculative("lookup", draft_max=0)
    with pytest.raises(BitlmError, match="ngram_min .* above ngram_max"):
        Speculative("lookup", ngram_max=2, ngram_min=3)
    with pytest.raises(BitlmError, match="needs a draft model"):
        Speculative("draft")
    with pytest.raises(BitlmError, match="takes no draft model"):
        Speculative("lookup", draft_model=lm)
    small = bitlm.load(make_tiny_model_dir(tmp_path / "v100", None, vocab_size=100), tokenizer=False)
    with pytest.raises(BitlmError, match="vocabulary has 100 tokens and the target's 512"):
        generate(lm, [1, 2], 4, speculative=Speculative("draft", draft_model=NativeLM(NativeModel.from_model(small))))
    with pytest.raises(BitlmError, match="the target model itself"):
        generate(lm, [1, 2], 4, speculative=Speculative("draft", draft_model=NativeLM(lm.nm)))
    with pytest.raises(BitlmError, match="expected a bitlm.engine.speculative.Speculative"):
        generate(lm, [1, 2], 4, speculative="lookup")


def _schedule(sp, outcomes, vocab=8):
    """The k asked for in each round of an external-drafting Speculator (the server's path: want, drafted,
    accept), every draft token 1, the target's greedy choice 1 (accepted) or 2 (rejected) in each row."""
    ks = []
    for accept_all in outcomes:
        k = sp.want(100)
        sp.drafted([1] * k, None)
        rows = np.zeros((k + 1, vocab), np.float32)
        rows[:, 1 if accept_all else 2] = 1.0
        tokens, accepted = sp.accept(rows)
        assert accepted == (k if accept_all else 0) and len(tokens) == accepted + 1
        ks.append(k)
    return ks


def test_adaptive_schedule_pauses_after_rejections_at_k_1(monkeypatch):
    # k falls 3, 2, 1 on rejections; each rejection at k = 1 pauses drafting for 1, 2, 4, 8, 16, 16 rounds
    greedy = SamplingParams(temperature=0)
    sp = Speculator(Speculative("lookup", draft_max=3), None, greedy, external=True)
    want = [3, 2, 1]
    for pause in (1, 2, 4, 8, 16, 16):
        want += [0] * pause + [1]
    assert _schedule(sp, [False] * len(want)) == want
    # an accepted round grows k by 2 and forgets the pauses: the next rejection at k = 1 pauses 1 round
    sp = Speculator(Speculative("lookup", draft_max=3), None, greedy, external=True)
    assert _schedule(sp, [False, False, False, False, True, True, False, False, False, False]) == \
        [3, 2, 1, 0, 1, 3, 3, 2, 1, 0]
    # fixed k never pauses; PAUSE_MAX = 0 turns the pause off
    fixed = Speculator(Speculative("lookup", draft_max=3, adaptive=False), None, greedy, external=True)
    assert _schedule(fixed, [False] * 6) == [3] * 6
    monkeypatch.setattr(spec_mod, "PAUSE_MAX", 0)
    sp = Speculator(Speculative("lookup", draft_max=3), None, greedy, external=True)
    assert _schedule(sp, [False] * 6) == [3, 2, 1, 1, 1, 1]
