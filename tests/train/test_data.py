import json

import pytest
import torch

from bitlm.engine.tokenizer import Tokenizer
from bitlm.errors import BitlmError
from bitlm.train import data


def test_token_splits_by_hand():
    stream = torch.arange(25)
    s = data.TokenSplits.from_stream(stream, context=4, val_fraction=0.2)  # last 5 tokens held out
    # 20 training tokens give (20 - 1) // 4 = 4 rows of 5, overlapping by one token
    assert s.train.tolist() == [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8], [8, 9, 10, 11, 12], [12, 13, 14, 15, 16]]
    assert s.val.tolist() == [[20, 21, 22, 23, 24]]


def test_sampler_is_a_permutation_per_epoch_and_deterministic():
    a, b = data.Sampler(7, seed=3), data.Sampler(7, seed=3)
    first, second = a.rows(0, 7), a.rows(7, 7)
    assert sorted(first) == sorted(second) == list(range(7))
    assert first != second  # a new order each epoch (seed + epoch)
    assert b.rows(5, 6) == first[5:] + second[:4]  # any position, without replaying the ones before


def test_bpe_tokenizer_round_trips(corpus_file):
    docs = data.read_documents([corpus_file])
    tok = data.load_tokenizer("bpe:300", docs)
    assert tok.vocab_size == 300
    assert tok.decode(tok.encode("To be, or not to be", add_special_tokens=False)) == "To be, or not to be"
    stream = data.encode_documents(tok, docs)
    assert stream[0] == tok.bos_token_id and stream[-1] == tok.token_to_id("<|end_of_text|>")


def test_jsonl_corpus_and_tokenizer_json(tmp_path, tiny_tokenizer_dir):
    f = tmp_path / "c.jsonl"
    f.write_text(json.dumps({"text": "Now is the winter"}) + "\n\n" + json.dumps({"text": "of our discontent"}) + "\n")
    assert data.read_documents(f) == ["Now is the winter", "of our discontent"]
    tok = data.load_tokenizer(str(tiny_tokenizer_dir / "tokenizer.json"))
    assert tok.chat_template  # read with its tokenizer_config.json


def test_empty_corpus(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(BitlmError, match="^empty corpus"):
        data.read_documents(tmp_path / "empty.txt")


def test_malformed_jsonl_line_is_named(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "fine"}\n\n{"text": "broken"\n')
    with pytest.raises(BitlmError, match=r"bad\.jsonl:3: malformed JSON line") as e:
        data.read_documents(f)
    assert "\n" not in str(e.value)


def test_corpus_smaller_than_one_batch():
    s = data.TokenSplits.from_stream(torch.arange(30), context=8, val_fraction=0.0)
    with pytest.raises(BitlmError, match="smaller than one batch: 3 sequences for a global batch of 4"):
        data.check_enough(s.train.shape[0], 4, "training corpus")


def _tok(tiny_tokenizer_dir) -> Tokenizer:
    return Tokenizer.from_dir(tiny_tokenizer_dir)


def test_assistant_mask_hand_built(tiny_tokenizer_dir):
    tok = _tok(tiny_tokenizer_dir)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "To be?"},
            {"role": "assistant", "content": "Or not."}, {"role": "user", "content": "Sure?"},
            {"role": "assistant", "content": "Yes."}]
    ids, mask = data.encode_chat_masked(tok, msgs)
    # by hand: the BitNet template's text, cut where the replies start and end
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    expect_ids = (enc("<|begin_of_text|>System: Be brief.<|eot_id|>User: To be?<|eot_id|>Assistant: ")
                  + enc("Or not.<|eot_id|>") + enc("User: Sure?<|eot_id|>Assistant: ") + enc("Yes.<|eot_id|>"))
    assert ids == expect_ids
    spans, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            spans.append(cur)
            cur = []
    spans.append(cur)
    assert [tok.decode(s, skip_special_tokens=False) for s in spans] == ["Or not.<|eot_id|>", "Yes.<|eot_id|>"]
    # the context before each reply is exactly the inference-time prompt
    prompt = tok.encode_chat(msgs[:2], add_generation_prompt=True)
    assert ids[:len(prompt)] == prompt and mask[:len(prompt)] == [0] * len(prompt)


def test_chat_without_assistant_is_refused(tiny_tokenizer_dir, tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(BitlmError, match=r"c\.jsonl:1: no assistant message"):
        data.load_chat([f], _tok(tiny_tokenizer_dir), 64)
