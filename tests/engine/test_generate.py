"""Generation against full recomputation: the KV cache, greedy and seeded sampling, stops, the context,
text streaming and multi-turn chat, on the tiny random model."""

import random

import numpy as np
import pytest
import torch

import bitlm
from bitlm.engine.generate import ChatSession, Detokenizer, decode_one, generate, generate_text, prefill, stream_text
from bitlm.engine.sampling import SamplingParams, sample
from bitlm.errors import BitlmError
from helpers import finish

GREEDY = dict(temperature=0, stop_token_ids=[])  # no stop tokens: a fixed number of tokens


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return bitlm.load(tiny_model_dir)


@torch.no_grad()
def naive(model, ids, n, params=None, generator=None):
    """Reference: recompute the whole sequence for every new token, no cache."""
    seq = list(ids)
    for _ in range(n):
        logits = model(torch.tensor([seq]))[:, -1].float().numpy()
        token = logits.argmax(-1) if params is None else sample(logits, params, generator)
        seq.append(int(token[0]))
    return seq[len(ids):]


@torch.no_grad()
def test_cached_decode_equals_full_recomputation(model):
    ids = torch.randint(0, model.config.vocab_size, (1, 40))
    full = model(ids)[0]  # (40, V)
    cache = model.new_cache()
    first = prefill(model, ids[:, :5], cache)  # last position only
    chunk = model(ids[:, 5:17], cache=cache)[0]  # a chunk after a cached prefix: the masked path
    steps = [decode_one(model, t, cache) for t in ids[0, 17:].tolist()]
    assert cache.length == 40
    torch.testing.assert_close(torch.from_numpy(first[0]), full[4], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunk, full[5:17], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.from_numpy(np.concatenate(steps)), full[17:], atol=1e-5, rtol=1e-5)


def test_greedy_equals_naive_loop(model):
    prompt = model.tokenizer.encode("To be, or not to be")
    got = list(generate(model, prompt, max_new_tokens=24, **GREEDY))
    assert got == naive(model, prompt, 24)


def test_seeded_sampling_equals_naive_loop_and_repeats(model):
    prompt = model.tokenizer.encode("Shall I compare thee")
    opts = dict(temperature=1.3, top_k=50, top_p=0.9, seed=11, stop_token_ids=[])
    a = list(generate(model, prompt, max_new_tokens=12, **opts))
    p = SamplingParams(1.3, 50, 0.9, 11)
    assert a == naive(model, prompt, 12, p, p.generator())
    assert a == list(generate(model, prompt, max_new_tokens=12, **opts))
    assert a != list(generate(model, prompt, max_new_tokens=12, **{**opts, "seed": 12}))


def test_prompt_as_tensor_and_model_method(model):
    prompt = model.tokenizer.encode("The quick brown fox")
    ref = list(generate(model, prompt, max_new_tokens=8, **GREEDY))
    assert list(generate(model, torch.tensor([prompt]), max_new_tokens=8, **GREEDY)) == ref
    assert list(generate(model, torch.tensor(prompt), max_new_tokens=8, **GREEDY)) == ref
    assert list(generate(model, np.array(prompt), max_new_tokens=8, **GREEDY)) == ref
    assert model.generate("The quick brown fox", max_new_tokens=8, **GREEDY) == model.tokenizer.decode(ref)
    for bad in (torch.tensor([prompt, prompt]), torch.tensor(prompt, dtype=torch.float32), np.array([[prompt]])):
        with pytest.raises(BitlmError, match=r"prompt_ids: expected integer token ids of shape \(T,\) or \(1, T\)"):
            generate(model, bad)


def test_max_new_tokens(model):
    prompt = model.tokenizer.encode("Now is the winter")
    assert finish(generate(model, prompt, max_new_tokens=7, **GREEDY)) == (naive(model, prompt, 7), "length")
    assert finish(generate(model, prompt, max_new_tokens=0, **GREEDY)) == ([], "length")
    with pytest.raises(BitlmError, match="max_new_tokens"):
        generate(model, prompt, max_new_tokens=-1)


def test_stop_tokens(model):
    prompt = model.tokenizer.encode("Now is the winter")
    ref = list(generate(model, prompt, max_new_tokens=30, **GREEDY))  # == naive (test above)
    k = next(i for i in range(3, 30) if ref[i] not in ref[:i])  # a token first produced at step k
    tokens, reason = finish(generate(model, prompt, max_new_tokens=30, temperature=0, stop_token_ids=[ref[k]]))
    assert (tokens, reason) == (ref[:k], "stop")  # the stop token itself is not yielded
    ignored = generate(model, prompt, max_new_tokens=30, temperature=0, stop_token_ids=[ref[k]], ignore_eos=True)
    assert list(ignored) == ref


def test_default_stop_tokens_are_eos_and_eot(model, monkeypatch):
    tok = model.tokenizer
    eos, eot = tok.token_to_id("<|end_of_text|>"), tok.token_to_id("<|eot_id|>")
    prompt = tok.encode("Now is the winter")
    ref = naive(model, prompt, 5)
    # Make the model emit <|eot_id|> at the third step: bias its logit only then.
    real_forward = type(model).forward
    calls = []

    def forward(self, ids, cache=None, logits_to_keep=0):
        logits = real_forward(self, ids, cache, logits_to_keep)
        calls.append(1)
        if len(calls) == 3:
            logits[..., eot] = 1e4
        return logits

    monkeypatch.setattr(type(model), "forward", forward)
    assert finish(generate(model, prompt, max_new_tokens=5, temperature=0)) == (ref[:2], "stop")
    calls.clear()
    assert list(generate(model, prompt, max_new_tokens=5, temperature=0, ignore_eos=True))[:3] == ref[:2] + [eot]
    assert {eos, eot} <= set(tok.stop_token_ids)


def test_stop_strings_are_trimmed_and_never_emitted(model):
    tok = model.tokenizer
    prompt = "To be, or not to be"
    ref = list(generate(model, tok.encode(prompt), max_new_tokens=40, **GREEDY))
    text = tok.decode(ref)
    # a stop string that first appears well inside the text, spanning more than one character
    start = next(i for i in range(8, len(text) - 3) if text.find(text[i:i + 3]) == i and text[i:i + 3].strip())
    stop = text[start:start + 3]
    stream = stream_text(model, prompt, stop_strings=["\x00never", stop], max_new_tokens=40, **GREEDY)
    pieces = list(stream)
    assert "".join(pieces) == stream.text == text[:start]
    assert stream.finish_reason == "stop"
    # the token iterator stops right after the token that completes the stop string
    tokens = list(generate(model, tok.encode(prompt), max_new_tokens=40, stop_strings=[stop], **GREEDY))
    assert stop in tok.decode(tokens) and stop not in tok.decode(tokens[:-1])
    assert tokens == ref[:len(tokens)]


def single_char_ids(tok, s):
    ids = [tok.token_to_id(c) for c in s]
    assert None not in ids
    return ids


def test_detokenizer_holds_back_a_possible_stop_string(model):
    tok = model.tokenizer
    d = Detokenizer(tok, stop_strings=["abc"])
    assert [d.push(i) for i in single_char_ids(tok, "xab")] == ["x", "", ""]
    assert d.push(tok.token_to_id("d")) == "abd"  # a false alarm is released whole
    assert [d.push(i) for i in single_char_ids(tok, "yabc")] == ["y", "", "", ""]
    assert d.stopped and d.text == "xabdy" and d.push(tok.token_to_id("z")) == "" and d.flush() == ""
    d = Detokenizer(tok, stop_strings=["abc"])
    assert [d.push(i) for i in single_char_ids(tok, "qa")] == ["q", ""]
    assert d.flush() == "a" and d.text == "qa"  # at the end nothing is held back


def test_detokenizer_never_splits_a_utf8_character(model):
    tok = model.tokenizer
    text = "Zoë: naïve café ✓ 😀 日本語!"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > len(text) // 2  # bytes outside the tiny corpus come one by one
    d = Detokenizer(tok)
    pieces = [d.push(i) for i in ids] + [d.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_streamed_increments_concatenate_to_the_decoded_ids(model):
    tok = model.tokenizer
    rng = random.Random(5)
    for _ in range(5):  # arbitrary ids, invalid UTF-8 included: the increments still add up exactly
        ids = [rng.randrange(tok.vocab_size) for _ in range(60)]
        d = Detokenizer(tok)
        assert "".join([d.push(i) for i in ids] + [d.flush()]) == tok.decode(ids)
    stream = stream_text(model, "Thou art more lovely", max_new_tokens=30, **GREEDY)
    joined = "".join(stream)
    assert joined == tok.decode(stream.token_ids) == stream.text
    assert joined == generate_text(model, "Thou art more lovely", max_new_tokens=30, **GREEDY)
    s = stream.stats()
    assert s["new_tokens"] == 30 and s["prompt_tokens"] == len(tok.encode("Thou art more lovely"))
    assert s["finish_reason"] == "length"


def test_prompt_longer_than_context(model):
    ctx = model.config.max_position_embeddings
    with pytest.raises(BitlmError, match=f"the prompt is {ctx + 1} tokens, longer than the model's context of {ctx}"):
        generate(model, [5] * (ctx + 1), max_new_tokens=4)
    with pytest.raises(BitlmError, match="prompt is empty"):
        generate(model, [], max_new_tokens=4)


def test_generation_stops_when_the_context_is_full(model):
    ctx = model.config.max_position_embeddings
    prompt = [7] * (ctx - 3)
    tokens, reason = finish(generate(model, prompt, max_new_tokens=50, **GREEDY))
    assert (len(tokens), reason) == (3, "context")
    assert finish(generate(model, [7] * ctx, max_new_tokens=5, **GREEDY)) == ([], "context")


def test_chat_two_turns_reuse_the_cache_and_match_a_fresh_generation(model):
    tok = model.tokenizer
    chat = ChatSession(model, system="Be brief.", max_new_tokens=12, **GREEDY)
    first = chat.send("hello")
    ids1 = tok.encode_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}])
    reply1 = "".join(first)
    assert first.token_ids == naive(model, ids1, 12)
    assert chat.messages[-1] == {"role": "assistant", "content": reply1}

    second = chat.send("hi again")
    assert chat.cache.length >= len(ids1) - 1  # the first turn's prompt stays cached
    reply2 = "".join(second)
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"},
               {"role": "assistant", "content": reply1}, {"role": "user", "content": "hi again"}]
    assert second.token_ids == naive(model, tok.encode_chat(history), 12)
    assert chat.messages == history + [{"role": "assistant", "content": reply2}]

    chat.reset()
    assert chat.messages == [{"role": "system", "content": "Be brief."}]
    again = chat.reply("hello")  # the stale cache beyond the shared prefix must not leak in
    assert again == reply1


def test_chat_error_leaves_the_history_unchanged(model):
    chat = model.chat(max_new_tokens=4, **GREEDY)
    chat.reply("hello")
    before = list(chat.messages)
    with pytest.raises(BitlmError, match="conversation is .* tokens"):
        chat.send("x " * model.config.max_position_embeddings)
    assert chat.messages == before
    assert chat.reply("hello again")  # and the session still works
    assert len(chat.messages) == 4


def test_chat_needs_a_chat_template(model, monkeypatch):
    monkeypatch.setattr(model.tokenizer, "chat_template", None)
    with pytest.raises(BitlmError, match="no chat template"):
        ChatSession(model)
