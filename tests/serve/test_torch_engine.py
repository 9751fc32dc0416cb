"""The torch model under the server (serve/torch_engine.py, `bitlm serve --runtime torch`; on a GPU,
`--device cuda`): the engine's step logits against plain forwards of the torch model, its KV block
accounting, and a real server process on the CPU whose greedy outputs equal bitlm.engine.generate's on the
same torch model in this process (an independent path: one KV cache, no scheduler)."""

from __future__ import annotations

import concurrent.futures
import re

import httpx
import numpy as np
import pytest
import torch
from helpers import finish

import bitlm
from bitlm.engine.generate import generate
from bitlm.errors import BitlmError
from bitlm.serve.torch_engine import TorchEngine


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return bitlm.load(tiny_model_dir)


def forward_last(model, ids) -> np.ndarray:
    """Logits of the last of `ids` from one forward over all of them, without a cache."""
    with torch.inference_mode():
        return model(torch.tensor([ids]))[0, -1].float().numpy()


def test_steps_equal_plain_forwards(model):
    eng = TorchEngine(model, max_seqs=3, block_size=16)
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, model.config.vocab_size, n).tolist() for n in (40, 5, 23)]
    sids = [eng.add_sequence() for _ in seqs]
    own = [model.new_cache() for _ in seqs]  # each sequence alone, fed the same chunks
    done = [0, 0, 0]
    for sizes in ([17, 1, 9], [1, 1, 14], [22, 3, 0]):  # prompt chunks beside single tokens
        work = [(sid, s[d:d + k]) for sid, s, d, k in zip(sids, seqs, done, sizes) if k]
        for (sid, toks), row in zip(work, eng.step(work)):
            i = sids.index(sid)
            done[i] += len(toks)
            assert row.dtype == np.float32 and row.shape == (model.config.vocab_size,)
            # the same chunks through a cache of its own: the same bits (other sequences do not leak in)
            np.testing.assert_array_equal(row, model.last_logits(toks, own[i])[0])
            # one forward over the whole prefix: equal to float rounding (attention over a cache slice
            # vs fresh keys, 4e-6 measured on logits of about 15)
            np.testing.assert_allclose(row, forward_last(model, seqs[i][:done[i]]), rtol=0, atol=5e-5)
    assert done == [40, 5, 23] and [eng.seq_len(s) for s in sids] == done
    assert eng.used_blocks == 3 + 1 + 2 and eng.free_blocks == eng.total_blocks - 6
    assert eng.total_blocks == 3 * 16  # default: max_seqs full contexts of 256


def test_refused_steps_consume_nothing_and_freed_caches_start_empty(model):
    eng = TorchEngine(model, max_seqs=2, kv_blocks=3, block_size=16)
    a, b = eng.add_sequence(), eng.add_sequence()
    with pytest.raises(BitlmError, match="all 2 sequences are in use"):
        eng.add_sequence()
    eng.step([(a, list(range(20)))])  # 2 blocks
    assert eng.blocks_needed(b, 17) == 2 and eng.blocks_needed(a, 12) == 0
    for work, message in (([(b, list(range(17)))], "needs 2 KV blocks and 1 are free"),
                          ([(a, [1]), (a, [2])], "appears twice"),
                          ([(b, [model.config.vocab_size])], "out of range"),
                          ([(b, [])], "at least one token"),
                          ([(a, [0] * (256 - 19))], "exceed the context length 256"),
                          ([(7, [1])], "not live")):
        with pytest.raises(BitlmError, match=message):
            eng.step(work)
        assert (eng.seq_len(a), eng.seq_len(b), eng.used_blocks) == (20, 0, 2)
    eng.truncate(a, 5)
    assert eng.seq_len(a) == 5 and eng.used_blocks == 1
    row = eng.step([(a, [9, 8])])[0]  # after the truncation: positions 5 and 6 follow tokens 0..4
    np.testing.assert_allclose(row, forward_last(model, [0, 1, 2, 3, 4, 9, 8]), rtol=0, atol=5e-5)
    eng.free_sequence(a)
    assert eng.used_blocks == 0
    c = eng.add_sequence()  # reuses a's cache, which starts empty
    np.testing.assert_array_equal(eng.step([(c, [3, 4, 5])])[0], model.last_logits([3, 4, 5], model.new_cache())[0])


def test_max_len_cuts_the_context(model):
    eng = TorchEngine(model, max_seqs=1, max_len=40)
    assert eng.max_len == 40 and eng.total_blocks == 3
    sid = eng.add_sequence()
    with pytest.raises(BitlmError, match="41 tokens exceed the context length 40"):
        eng.step([(sid, [1] * 41)])
    assert TorchEngine(model, max_len=10_000).max_len == 256  # never past the model's


# ---- a real server on the torch model --------------------------------------------------------------
PROMPTS = ["To be, or not to be", "Now is the winter", "Shall I compare thee", "The quick brown fox"]


def reference(model, ids, max_tokens, **kw):
    """(text, finish_reason) of bitlm.engine.generate, greedy."""
    tokens, reason = finish(generate(model, ids, max_new_tokens=max_tokens, temperature=0, **kw))
    return model.tokenizer.decode(tokens), reason


@pytest.fixture(scope="module")
def server(start_server, tiny_model_dir):
    # the default prefill chunk (256) takes each short prompt in one step, as generate's prefill does,
    # and the default KV budget (max_seqs full contexts) never preempts: each sequence runs the same
    # forwards as generate, so the greedy tokens are the same bit for bit
    return start_server(tiny_model_dir, "--runtime", "torch", "--max-seqs", 4)


def test_server_on_the_torch_model_equals_generate(server, model):
    assert re.search(r"\(TorchEngine, 4 sequences, context 256, KV blocks 64 of 16 positions\)", server.log())
    client = server.client()
    expected = [reference(model, model.tokenizer.encode(p), 24, ignore_eos=True) for p in PROMPTS]
    assert len({text for text, _ in expected}) == len(PROMPTS)

    def run(prompt):
        r = client.completions.create(model=server.model, prompt=prompt, max_tokens=24, temperature=0,
                                      extra_body={"ignore_eos": True})
        return r.choices[0].text, r.choices[0].finish_reason

    with concurrent.futures.ThreadPoolExecutor(4) as pool:  # side by side in the engine's steps
        assert list(pool.map(run, PROMPTS, timeout=120)) == expected
    messages = [{"role": "user", "content": "Shall I compare thee?"}]
    text, finish = reference(model, model.tokenizer.encode_chat(messages), 20)
    chunks = list(client.chat.completions.create(model=server.model, messages=messages, max_tokens=20,
                                                 temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == finish
    m = httpx.get(server.url + "/metrics", timeout=10).text
    assert re.search(r"^bitlm_preemptions_total 0(\.0)?$", m, re.M), m


def test_engine_batch_is_for_the_native_runtime(capsys, monkeypatch):
    from bitlm.cli import main
    monkeypatch.setattr("bitlm.cli._load_on", lambda *a: pytest.fail("a model was loaded"))
    assert main(["serve", "--runtime", "torch", "--engine", "batch"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bitlm: error: bitlm serve: --engine batch runs the native runtime; ") and err.count("\n") == 1
