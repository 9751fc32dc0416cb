"""Loading and saving Hugging Face directories: round trips, the tokenizer, bad files, atomic writes."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import bitlm
from bitlm.errors import BitlmError


def copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_round_trip_is_bit_exact(tiny_model_dir, tmp_path):
    a = bitlm.load(tiny_model_dir)
    a.save_pretrained(tmp_path / "again")
    b = bitlm.load(tmp_path / "again")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    fa, fb = load_file(tiny_model_dir / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)
    ids = torch.randint(0, a.config.vocab_size, (2, 7))
    assert torch.equal(a(ids), b(ids))


def test_tied_head_is_not_stored_and_shares_the_embedding(tiny_model_dir):
    m = bitlm.load(tiny_model_dir)
    assert "lm_head.weight" not in load_file(tiny_model_dir / "model.safetensors")
    assert m.lm_head.weight is m.model.embed_tokens.weight


def test_tokenizer_and_chat_template_reachable(tiny_model_dir, tmp_path):
    m = bitlm.load(tiny_model_dir)
    tok = m.tokenizer
    assert tok.decode(tok.encode("To be, or not to be")) == "To be, or not to be"
    assert tok.encode("hi")[0] == tok.bos_token_id  # the post-processor adds BOS itself
    text = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert text == "<|begin_of_text|>System: Be brief.<|eot_id|>User: Hi<|eot_id|>Assistant: "
    ids = tok.encode_chat([{"role": "user", "content": "Hi"}])
    assert ids.count(tok.bos_token_id) == 1
    assert tok.token_to_id("<|eot_id|>") in tok.stop_token_ids
    m.save_pretrained(tmp_path / "s")
    assert bitlm.load(tmp_path / "s").tokenizer.chat_template == tok.chat_template


def test_bf16_storage_round_trip(tiny_model_dir, tmp_path):
    m = bitlm.load(tiny_model_dir)
    m.config.torch_dtype = "bfloat16"
    m.save_pretrained(tmp_path / "bf")
    stored = load_file(tmp_path / "bf" / "model.safetensors")
    assert stored["model.embed_tokens.weight"].dtype == torch.bfloat16
    b = bitlm.load(tmp_path / "bf")
    b.save_pretrained(tmp_path / "bf2")
    again = load_file(tmp_path / "bf2" / "model.safetensors")
    assert all(torch.equal(stored[k], again[k]) for k in stored)


# ---- bad input: one clear line naming the file or field ------------------------------------------
def expect_error(match, fn, *args):
    with pytest.raises(BitlmError, match=match) as e:
        fn(*args)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_missing_directory_and_config(tmp_path):
    expect_error("no such model directory", bitlm.load, tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    expect_error(r"config\.json: missing", bitlm.load, tmp_path / "empty")


def test_malformed_config(tiny_model_dir, tmp_path):
    d = copy_model(tiny_model_dir, tmp_path / "m")
    (d / "config.json").write_text("{not json")
    expect_error("not valid JSON", bitlm.load, d)


@pytest.mark.parametrize("qc,match", [
    ({"quant_method": "gptq"}, "quant_method must be 'bitnet'"),
    ({"quant_method": "bitnet", "quantization_mode": "sideways"}, "quantization_mode"),
    ({"quant_method": "bitnet", "linear_class": "fancylinear"}, "linear_class"),
])
def test_unknown_quantization_config(tiny_model_dir, tmp_path, qc, match):
    d = copy_model(tiny_model_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = qc
    (d / "config.json").write_text(json.dumps(cfg))
    msg = expect_error(match, bitlm.load, d)
    assert "config.json" in msg


def test_truncated_and_missing_weights(tiny_model_dir, tmp_path):
    d = copy_model(tiny_model_dir, tmp_path / "m")
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    expect_error("model.safetensors.*truncated", bitlm.load, d)
    f.unlink()
    expect_error("no model.safetensors", bitlm.load, d)


def rewrite_tensor(d, key, value):
    t = load_file(d / "model.safetensors")
    if value is None:
        del t[key]
    else:
        t[key] = value
    save_file(t, d / "model.safetensors", metadata={"format": "pt"})


def test_wrong_shape_dtype_missing_tensor_and_bad_codes(tiny_model_dir, tmp_path):
    key = "model.layers.1.mlp.down_proj.weight"
    d = copy_model(tiny_model_dir, tmp_path / "a")
    rewrite_tensor(d, key, torch.zeros(3, 3, dtype=torch.uint8))
    assert key in expect_error("has shape", bitlm.load, d)
    d = copy_model(tiny_model_dir, tmp_path / "b")
    rewrite_tensor(d, key, torch.zeros(16, 172))
    expect_error("expected uint8", bitlm.load, d)
    d = copy_model(tiny_model_dir, tmp_path / "c")
    rewrite_tensor(d, key, None)
    expect_error("is missing", bitlm.load, d)
    d = copy_model(tiny_model_dir, tmp_path / "e")
    rewrite_tensor(d, key, torch.full((16, 172), 0xFF, dtype=torch.uint8))
    expect_error("code 3", bitlm.load, d)
    one_bad = torch.full((16, 172), 0x55, dtype=torch.uint8)  # code 1 (a zero weight) everywhere...
    one_bad[7, 99] = 0x55 | 0x30  # ... but one code 3, in bits 4-5 of one byte
    rewrite_tensor(d, key, one_bad)
    expect_error("code 3", bitlm.load, d)
    d = copy_model(tiny_model_dir, tmp_path / "f")
    rewrite_tensor(d, "model.norm.weight", torch.ones(64, dtype=torch.int32))
    expect_error("expected a float dtype", bitlm.load, d)


def test_hub_repo_id_offline_gives_a_clear_message(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    msg = expect_error("could not download 'someorg/bitnet-missing'", bitlm.load, "someorg/bitnet-missing")
    assert "local directory" in msg


def test_save_is_atomic(tiny_model_dir, tmp_path):
    d = copy_model(tiny_model_dir, tmp_path / "m")
    before = {f.name: f.read_bytes() for f in d.iterdir()}
    m = bitlm.load(d)

    def broken_save(path):
        raise OSError("disk full")

    m.tokenizer.save = broken_save  # fail in the middle of writing the new directory
    with pytest.raises(OSError, match="disk full"):
        m.save_pretrained(d)
    assert {f.name: f.read_bytes() for f in d.iterdir()} == before
    assert sorted(os.listdir(tmp_path)) == ["m"]  # no temporary leftovers


def test_transformers_reads_the_saved_tokenizer(tiny_model_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    m = bitlm.load(tiny_model_dir)
    m.save_pretrained(tmp_path / "s")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "s")
    text = "Shall I compare thee to a summer's day?"
    assert hf_tok(text)["input_ids"] == m.tokenizer.encode(text)
    chat = [{"role": "user", "content": "Hi"}]
    assert hf_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        m.tokenizer.apply_chat_template(chat)
