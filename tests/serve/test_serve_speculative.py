"""Speculative decoding in the server (`bitlm serve --speculative lookup`) on the bundled Shakespeare model,
whose greedy continuations of a repeated passage fall into loops that prompt lookup drafts often right
and often wrong.

The reference is bitlm.engine.generate in this process WITHOUT speculation for greedy requests (the
server's tokens must be plain decoding's, token for token), and generate(..., speculative=...) with the
same seed for sampled ones (the server makes the Speculator calls generate makes, from the request's
seeded generator). The scheduler is driven in-process for the boundaries (every max_tokens around a
round's size, stop tokens inside a round, a KV cache too small for the drafts), and through the real
HTTP app for the rest.
"""

from __future__ import annotations

import concurrent.futures
import itertools

import pytest

from bitlm.data import bundled_model_dir
from bitlm.engine.batch import BatchEngine
from bitlm.engine.generate import Detokenizer, generate, generate_text, stream_text
from bitlm.engine.native import NativeLM
from bitlm.engine.sampling import SamplingParams
from bitlm.engine.speculative import BatchDrafter, Speculative
from bitlm.io.native import load_native
from bitlm.serve.scheduler import GenRequest, Scheduler
from bitlm.serve.sequential_engine import SequentialEngine
from helpers import finish, first_layers
from test_server import metrics

PASSAGE = ("ROMEO:\nBut soft, what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n"
           "Arise, fair sun, and kill the envious moon,\nWho is already sick and pale with grief.\n")
PROMPT = PASSAGE + PASSAGE + PASSAGE[:40]  # 130 tokens
OTHER = ("KING RICHARD III:\nNow is the winter of our discontent\nMade glorious summer by this sun of York;\n"
         "And all the clouds that lour'd upon our house\nIn the deep bosom of the ocean buried.\n")
LOOKUP = Speculative("lookup", draft_max=8, ngram_max=3)  # the server's defaults
GREEDY = dict(temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def ref():
    return NativeLM(load_native(bundled_model_dir()))


def plain(ref, ids, n, **kw):
    """(tokens, finish reason) of plain decoding (no speculation)."""
    return finish(generate(ref, ids, n, **{**GREEDY, **kw}))


# ---- the scheduler in-process ------------------------------------------------------------------------
def drive(sched: Scheduler, reqs: list[GenRequest]) -> None:
    """The scheduler's loop without the event loop: each iteration frees, admits, plans, steps and
    applies, as Scheduler._loop does, until every request has ended."""
    sched.waiting.extend(reqs)
    for _ in range(10_000):
        if not sched.running and not sched.waiting:
            return
        to_free, sched._to_free = sched._to_free, []
        candidates = list(itertools.islice(sched.waiting, sched.max_seqs - len(sched.running)))
        sched._apply(*sched._iteration(to_free, candidates, list(sched.running)))
    raise AssertionError("the scheduler did not finish")


def request(tok, ids, max_tokens, spec=LOOKUP, stops=(), temperature=0.0, seed=None, stop_strings=()):
    return GenRequest(ids, SamplingParams(temperature, seed=seed), max_tokens, stops, Detokenizer(tok, stop_strings),
                      spec)


@pytest.fixture(scope="module", params=["batch", "sequential"])
def make_sched(request):
    nm = load_native(bundled_model_dir())  # its own model: the reference's forwards do not touch the engine's
    cls = BatchEngine if request.param == "batch" else SequentialEngine

    def make(max_seqs=4, kv_blocks=None, prefill_chunk=32):
        return Scheduler(cls(nm, max_seqs=max_seqs, kv_blocks=kv_blocks), max_seqs, prefill_chunk=prefill_chunk)
    return make


def test_scheduler_boundaries_equal_plain_decoding(make_sched, ref):
    """max_tokens at and around a round's k + 1 tokens and a stop token first met inside a round: the
    tokens, their count and the finish reason are plain decoding's; nothing past them is emitted."""
    tok = ref.tokenizer
    ids = tok.encode(PROMPT)
    want, _ = plain(ref, ids, 60)
    sched = make_sched()
    reqs = [request(tok, ids, n) for n in (1, 2, 3, 4, 8, 9, 10, 17, 60)]
    stop_at = [j for j in (1, 4, 9, 25) if want[j] not in want[:j]]  # a stop token first seen at j
    reqs += [request(tok, ids, 60, stops=[want[j]]) for j in stop_at]
    drive(sched, reqs)
    for r, n in zip(reqs, (1, 2, 3, 4, 8, 9, 10, 17, 60)):
        assert (r.token_ids, r.finish_reason) == (want[:n], "length"), n
        assert r.text == tok.decode(want[:n])
    for r, j in zip(reqs[9:], stop_at):
        assert (r.token_ids, r.finish_reason) == (want[:j], "stop"), j
    assert len(stop_at) >= 2
    assert sched.spec_accepted > 20 and sched.spec_drafted - sched.spec_accepted > 20  # both outcomes, often
    assert sched.spec_rounds < sum(len(r.token_ids) for r in reqs)  # rounds gave several tokens
    to_free, sched._to_free = sched._to_free, []
    sched._free(to_free)  # the sequences of the requests that ended last
    assert sched.engine.used_blocks == 0


def test_scheduler_stop_strings_equal_plain_decoding(make_sched, ref):
    tok = ref.tokenizer
    ids = tok.encode(PROMPT)
    full = tok.decode(plain(ref, ids, 60)[0])
    stops = [full[5:12], full[30:45], "\nAnd, and"]
    reqs = [request(tok, ids, 60, stop_strings=[s]) for s in stops]
    drive(make_sched(), reqs)
    for r, s in zip(reqs, stops):
        want = generate_text(ref, PROMPT, max_new_tokens=60, stop_strings=[s], **GREEDY)
        assert (r.text, r.finish_reason) == (want, "stop") and s not in r.text


def test_scheduler_with_a_kv_cache_too_small_for_everyones_drafts(make_sched, ref):
    """Four requests of up to 190 positions (12 blocks each) in 20 blocks: drafts are cut to the free
    blocks (never a failed step), requests are preempted and recomputed, and each output is still plain
    decoding's."""
    tok = ref.tokenizer
    prompts = [tok.encode(PROMPT), tok.encode(OTHER + OTHER), tok.encode(PASSAGE * 2), tok.encode(OTHER)]
    sched = make_sched(max_seqs=4, kv_blocks=20)
    reqs = [request(tok, p, 60) for p in prompts]
    drive(sched, reqs)
    for r, p in zip(reqs, prompts):
        assert r.error is None and (r.token_ids, r.finish_reason) == (plain(ref, p, 60)[0], "length")
    assert sched.preempted > 0 and sched.spec_accepted > 0


def test_scheduler_sampling_is_generates_speculative_sampling(make_sched, ref):
    """A seeded sampled request draws what generate(..., speculative=...) draws with that seed (the accept /
    reject rule, from the request's generator), beside other requests; top_k = 1 sampling is greedy."""
    tok = ref.tokenizer
    ids = tok.encode(PROMPT)
    kw = dict(temperature=0.8, ignore_eos=True)
    want = [finish(generate(ref, ids, 50, seed=s, speculative=LOOKUP, **kw))[0] for s in (1, 2)]
    assert want[0] != want[1]
    reqs = [request(tok, ids, 50, temperature=0.8, seed=s) for s in (1, 2)]
    reqs.append(GenRequest(ids, SamplingParams(1.0, top_k=1, seed=3), 40, (), Detokenizer(tok), LOOKUP))
    reqs.append(request(tok, tok.encode(OTHER), 30))
    drive(make_sched(), reqs)
    assert [r.token_ids for r in reqs[:2]] == want
    assert reqs[2].token_ids == plain(ref, ids, 40)[0]
    assert reqs[3].token_ids == plain(ref, tok.encode(OTHER), 30)[0]


@pytest.fixture(scope="module")
def early_exit():
    """The first 3 of the bundled model's 4 blocks: a draft model mostly right, sometimes wrong."""
    return first_layers(load_native(bundled_model_dir()), 3)


@pytest.mark.parametrize("engine", ["batch", "sequential"])
def test_scheduler_with_a_draft_model(engine, ref, early_exit):
    """--speculative draft: the draft model drafts for every request in batched steps of its own
    BatchEngine. Greedy requests (max_tokens around k + 1, a stop token, a prompt read in chunks beside
    the others) give plain decoding's tokens; a seeded sampled one gives generate()'s with the same draft
    model and seed; the draft sequences are freed with their requests."""
    tok = ref.tokenizer
    ids, other = tok.encode(PROMPT), tok.encode(OTHER + OTHER)
    want, _ = plain(ref, ids, 60)
    nm = load_native(bundled_model_dir())
    cls = BatchEngine if engine == "batch" else SequentialEngine
    drafter = BatchDrafter(BatchEngine(early_exit.nm, max_seqs=6, kv_blocks=6 * 16, max_len=256))
    sched = Scheduler(cls(nm, max_seqs=6), 6, prefill_chunk=32, drafter=drafter)
    spec = Speculative("draft", draft_max=6, draft_model=early_exit)
    stop = next(t for t in want[5:] if t not in want[:5])
    reqs = [request(tok, ids, n, spec) for n in (1, 7, 8, 60)] + [request(tok, ids, 60, spec, stops=[stop]),
                                                                  request(tok, other, 40, spec)]
    drive(sched, reqs)
    for r, n in zip(reqs, (1, 7, 8, 60)):
        assert (r.token_ids, r.finish_reason) == (want[:n], "length"), n
    assert (reqs[4].token_ids, reqs[4].finish_reason) == (want[:want.index(stop)], "stop")
    assert reqs[5].token_ids == plain(ref, other, 40)[0]
    assert 20 < sched.spec_accepted < sched.spec_drafted - 20  # right and wrong, often
    to_free, sched._to_free = sched._to_free, []
    sched._free(to_free)
    assert drafter.engine.used_blocks == 0 and not drafter.engine.sequences

    kw = dict(temperature=0.8, ignore_eos=True)
    wants = [finish(generate(ref, ids, 50, seed=s, speculative=spec, **kw))[0] for s in (1, 2)]
    reqs = [request(tok, ids, 50, spec, temperature=0.8, seed=s) for s in (1, 2)] + [request(tok, other, 30, spec)]
    drive(sched, reqs)
    assert [r.token_ids for r in reqs[:2]] == wants and wants[0] != wants[1]
    assert reqs[2].token_ids == plain(ref, other, 30)[0]


# ---- the HTTP app --------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["batch", "sequential"])
def server(request, start_server):
    return start_server(bundled_model_dir(), "--speculative", "lookup", "--max-seqs", 8, "--prefill-chunk", 32,
                        "--engine", request.param)


def test_http_greedy_equals_plain_with_drafts_accepted(server, ref):
    client = server.client()
    ids = ref.tokenizer.encode(PROMPT)
    want, _ = plain(ref, ids, 60)
    before = metrics(server)
    r = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=60, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == ref.tokenizer.decode(want) and r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 60)
    after = metrics(server)
    d = {k: after[k] - before[k] for k in ("bitlm_speculative_rounds_total", "bitlm_speculative_draft_tokens_total",
                                           "bitlm_speculative_accepted_tokens_total", "bitlm_generated_tokens_total")}
    assert d["bitlm_generated_tokens_total"] == 60
    assert d["bitlm_speculative_accepted_tokens_total"] > 0  # drafts were accepted ...
    assert d["bitlm_speculative_draft_tokens_total"] > d["bitlm_speculative_accepted_tokens_total"]  # ... and rejected
    # every round gives its accepted drafts and one token of the model's (the last may be cut by max_tokens)
    assert d["bitlm_speculative_rounds_total"] + d["bitlm_speculative_accepted_tokens_total"] >= 60
    assert d["bitlm_speculative_rounds_total"] < 60


def test_http_concurrent_streams_prefill_and_max_tokens(server, ref):
    """Streaming speculative decodes beside prompts being read in chunks (of 32 tokens, so several
    steps each) and chat: every output, finish reason and usage count is plain decoding's; a stream
    sends its tokens in order, one chunk each."""
    client = server.client()
    tok = ref.tokenizer
    jobs = [(PROMPT, n, True) for n in (1, 5, 9, 33)] + [(OTHER * 2, 40, False), (PASSAGE + OTHER, 25, True),
                                                          (PASSAGE * 2, 70, False)]

    def run(job):
        prompt, n, stream = job
        kw = dict(model=server.model, prompt=prompt, max_tokens=n, temperature=0, extra_body={"ignore_eos": True})
        if not stream:
            r = client.completions.create(**kw)
            return [r.choices[0].text], r.choices[0].finish_reason, r.usage.completion_tokens
        chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
        texts = [c.choices[0].text for c in chunks if c.choices and c.choices[0].text]
        return texts, [c.choices[0].finish_reason for c in chunks if c.choices][-1], chunks[-1].usage.completion_tokens

    def chat():
        messages = [{"role": "user", "content": PASSAGE + PASSAGE}]
        r = client.chat.completions.create(model=server.model, messages=messages, max_completion_tokens=30,
                                           temperature=0)
        return r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens

    before = metrics(server)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        chat_result = pool.submit(chat)
        results = list(pool.map(run, jobs, timeout=120))
    after = metrics(server)
    # more rounds than steps: steps checked the drafts of several requests at once
    assert (after["bitlm_speculative_rounds_total"] - before["bitlm_speculative_rounds_total"] >
            after["bitlm_engine_steps_total"] - before["bitlm_engine_steps_total"])
    for (prompt, n, stream), (texts, reason, used) in zip(jobs, results):
        want, _ = plain(ref, tok.encode(prompt), n)
        assert ("".join(texts), reason, used) == (tok.decode(want), "length", n), (prompt[:20], n)
        if stream:  # one chunk per token whose text is complete: as many as a plain stream sends
            assert len(texts) == len([p for p in _plain_pieces(tok, want) if p])
    ids = tok.encode_chat([{"role": "user", "content": PASSAGE + PASSAGE}])
    want, reason = finish(generate(ref, ids, 30, temperature=0))
    assert chat_result.result(timeout=60) == (tok.decode(want), reason, len(want))


def _plain_pieces(tok, tokens):
    d = Detokenizer(tok)
    return [d.push(t) for t in tokens] + [d.flush()]


def test_http_stop_and_seeded_sampling(server, ref):
    client = server.client()
    ids = ref.tokenizer.encode(PROMPT)
    full = ref.tokenizer.decode(plain(ref, ids, 60)[0])
    stop = full[20:26]
    r = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=60, temperature=0, stop=[stop],
                                  extra_body={"ignore_eos": True})
    want = stream_text(ref, ids, max_new_tokens=60, stop_strings=[stop], **GREEDY)
    assert (r.choices[0].text, r.choices[0].finish_reason) == ("".join(want), "stop")
    assert r.usage.completion_tokens == len(want.token_ids)  # the token completing the stop string counts
    kw = dict(model=server.model, prompt=PROMPT, max_tokens=40, temperature=0.8, top_p=0.95, seed=5,
              extra_body={"ignore_eos": True, "top_k": 40})
    want, _ = finish(generate(ref, ids, 40, temperature=0.8, top_k=40, top_p=0.95, seed=5, ignore_eos=True,
                              speculative=LOOKUP))
    got = [client.completions.create(**kw).choices[0].text for _ in range(2)]
    assert got == [ref.tokenizer.decode(want)] * 2
    assert got[0] != ref.tokenizer.decode(plain(ref, ids, 40)[0])  # it sampled


def test_http_draft_model(start_server, ref):
    """`bitlm serve --draft MODEL` (the bundled model drafting for itself: its greedy drafts are all
    right): greedy streams equal plain decoding, a seeded sampled request equals generate() with the
    same draft model and seed."""
    server = start_server(bundled_model_dir(), "--draft", bundled_model_dir(), "--draft-max", 5, "--prefill-chunk", 32)
    assert "speculative draft up to 5 drafts" in server.log()
    client = server.client()
    tok = ref.tokenizer
    jobs = [(PROMPT, 40), (OTHER * 2, 23), (PASSAGE, 9)]

    def run(job):
        chunks = client.completions.create(model=server.model, prompt=job[0], max_tokens=job[1], temperature=0,
                                           stream=True, extra_body={"ignore_eos": True})
        return "".join(c.choices[0].text for c in chunks if c.choices)

    before = metrics(server)
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        texts = list(pool.map(run, jobs, timeout=120))
    after = metrics(server)
    for (prompt, n), text in zip(jobs, texts):
        assert text == tok.decode(plain(ref, tok.encode(prompt), n)[0])
    drafted = after["bitlm_speculative_draft_tokens_total"] - before["bitlm_speculative_draft_tokens_total"]
    accepted = after["bitlm_speculative_accepted_tokens_total"] - before["bitlm_speculative_accepted_tokens_total"]
    assert drafted > 30 and accepted == drafted
    draft = NativeLM(load_native(bundled_model_dir()))
    want, _ = finish(generate(ref, tok.encode(PROMPT), 30, temperature=0.8, top_k=40, top_p=0.95, seed=9,
                              ignore_eos=True, speculative=Speculative("draft", draft_max=5, draft_model=draft)))
    r = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=30, temperature=0.8, top_p=0.95,
                                  seed=9, extra_body={"top_k": 40, "ignore_eos": True})
    assert r.choices[0].text == tok.decode(want) and r.usage.completion_tokens == 30
