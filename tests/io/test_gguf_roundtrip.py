"""HF -> GGUF (each ternary type, each embedding type) -> bitlm: the same logits as the HF checkpoint.

The reference for a lossy embedding type is the HF model with its embedding replaced by the values
gguf-py's own dequantizer reads from the same bytes (or numpy's float16 / torch's bfloat16 rounding):
with those, the logits must be bit-equal, so the only difference a GGUF makes is the embedding's
quantization, and the ternary weights, scales, norms and config cross over exactly."""

import json

import numpy as np
import pytest
import torch

import bitlm
from bitlm.errors import BitlmError
from bitlm.formats import q6_k
from bitlm.io import gguf_read
from bitlm.io.gguf import export_gguf
from helpers import make_tiny_model_dir

gguf = pytest.importorskip("gguf")

SHAPE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)
PROMPT = "To be, or not to be, that is the question"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tiny_tokenizer_dir):
    return make_tiny_model_dir(tmp_path_factory.mktemp("m256"), tiny_tokenizer_dir, **SHAPE)


@pytest.fixture(scope="module")
def model(hf_dir):
    return bitlm.load(hf_dir)


def expected_embedding(e: np.ndarray, embed_type: str) -> np.ndarray:
    Q = gguf.GGMLQuantizationType
    if embed_type == "f32":
        return e
    if embed_type == "f16":
        return e.astype(np.float16).astype(np.float32)
    if embed_type == "bf16":
        return torch.from_numpy(e).bfloat16().float().numpy()
    if embed_type == "q8_0":
        return gguf.quants.dequantize(gguf.quants.quantize(e, Q.Q8_0), Q.Q8_0)
    return gguf.quants.dequantize(q6_k.quantize(e), Q.Q6_K)


def logits(m, ids):
    with torch.no_grad():
        return m(torch.tensor([ids]))[0]


# every ternary type with the lossless embedding, every embedding type with some ternary type
@pytest.mark.parametrize("ttype, etype", [("tq2_0", "f32"), ("tq1_0", "f32"), ("i2_s", "f32"), ("i2_s", "f16"),
                                          ("tq2_0", "bf16"), ("tq1_0", "q8_0"), ("i2_s", "q6_k")])
def test_logits_through_gguf(hf_dir, model, tmp_path, ttype, etype):
    path = export_gguf(model, tmp_path / "m.gguf", ttype, etype)
    back = bitlm.load(path)
    ids = model.tokenizer.encode(PROMPT)
    assert back.tokenizer.encode(PROMPT) == ids
    ref = bitlm.load(hf_dir)
    with torch.no_grad():
        e = ref.model.embed_tokens.weight.numpy()
        ref.model.embed_tokens.weight.copy_(torch.from_numpy(expected_embedding(e, etype)))
    assert torch.equal(logits(back, ids), logits(ref, ids))
    if etype == "f32":
        assert torch.equal(logits(back, ids), logits(model, ids))


@pytest.mark.parametrize("ttype", ["tq2_0", "i2_s"])
def test_native_runtime_runs_the_gguf_as_the_checkpoint(hf_dir, model, tmp_path, ttype):
    pytest.importorskip("bitlm.kernels._native")
    from bitlm.io.native import load_native
    path = export_gguf(model, tmp_path / "m.gguf", ttype, "f32")
    ids = model.tokenizer.encode(PROMPT)
    a = load_native(hf_dir).forward(ids, len(ids))
    b = gguf_read.load_native(path).forward(ids, len(ids))
    assert np.array_equal(a, b)


def test_tokenizer_and_template_cross_over(model, tmp_path):
    path = export_gguf(model, tmp_path / "m.gguf", "i2_s", "f16")
    tok = bitlm.load(path).tokenizer
    src = model.tokenizer
    for text in [PROMPT, "  two  spaces\nand a newline 12345 it's", "<|eot_id|>User: hi", ""]:
        assert tok.encode(text) == src.encode(text)
        assert tok.decode(src.encode(text), skip_special_tokens=False) == src.decode(src.encode(text), skip_special_tokens=False)
    msgs = [{"role": "user", "content": "Hello"}]
    assert tok.chat_template == src.chat_template
    assert tok.encode_chat(msgs) == src.encode_chat(msgs)
    assert tok.stop_token_ids == src.stop_token_ids


def test_llama3_pre_tokenizer(tmp_path):
    """A tokenizer that splits as Llama 3 does (pre "llama-bpe") comes back splitting the same way."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    from bitlm.io.gguf_read import LLAMA3_SPLIT
    from helpers import CORPUS
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([CORPUS] * 20, trainer=trainer)
    d = tmp_path / "tok"
    d.mkdir()
    tok.save(str(d / "tokenizer.json"))
    tj = json.loads((d / "tokenizer.json").read_text())
    tj["model"]["ignore_merges"] = True  # as Llama 3's tokenizer.json
    (d / "tokenizer.json").write_text(json.dumps(tj))
    (d / "tokenizer_config.json").write_text('{"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}')
    m = bitlm.load(make_tiny_model_dir(tmp_path / "m", d, vocab_size=400, **SHAPE))
    path = export_gguf(m, tmp_path / "m.gguf", "tq2_0", "f32")
    assert gguf.GGUFReader(path).fields["tokenizer.ggml.pre"].contents() == "llama-bpe"
    back = bitlm.load(path).tokenizer
    for text in ["Hello world", "it's 1234567 o'clock\n\n  x", "The quick brown fox's tail!!\r\nok", CORPUS]:
        assert back.encode(text) == m.tokenizer.encode(text)


def test_a_foreign_llama_cpp_file(model, tmp_path):
    """A file as llama.cpp's converter writes one (written here with gguf-py's writer, independently of
    bitlm's): architecture "bitnet", no bitlm.config, weights as codes times the scale in every TQ2_0
    block (d = the scale in float16), no scale tensors. bitlm derives the config (SiLU for "bitnet")
    and reads the scale from the blocks."""
    cfg = model.config
    path = tmp_path / "foreign.gguf"
    w = gguf.GGUFWriter(str(path), "bitnet")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_tensor("token_embd.weight", model.model.embed_tokens.weight.detach().numpy())
    w.add_tensor("output_norm.weight", model.model.norm.weight.detach().numpy())
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
             "self_attn.attn_sub_norm": "attn_sub_norm", "mlp.ffn_sub_norm": "ffn_sub_norm",
             "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    ref = bitlm.load(model.source["path"])
    for i, block in enumerate(model.model.layers):
        for hf, g in names.items():
            m = block.get_submodule(hf)
            if hasattr(m, "codes"):
                s16 = np.float16(float(m.weight_scale))
                ref.model.layers[i].get_submodule(hf).weight_scale.fill_(float(s16))
                vals = m.codes(torch.float32).numpy() * np.float32(s16)
                w.add_tensor(f"blk.{i}.{g}.weight", gguf.quants.quantize(vals, gguf.GGMLQuantizationType.TQ2_0),
                             raw_dtype=gguf.GGMLQuantizationType.TQ2_0)
            else:
                w.add_tensor(f"blk.{i}.{g}.weight", m.weight.detach().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    back = bitlm.load(path, tokenizer=False)
    assert back.config.hidden_act == "silu" and back.config.tie_word_embeddings
    assert back.config.num_key_value_heads == cfg.num_key_value_heads
    silu = bitlm.load(make_tiny_model_dir(tmp_path / "silu", None, **SHAPE, hidden_act="silu"))
    # the reference: the source's weights in a SiLU model, its scales rounded to float16 as the blocks hold them
    with torch.no_grad():
        silu.load_state_dict(ref.state_dict())
    ids = model.tokenizer.encode(PROMPT)
    assert torch.equal(logits(back, ids), logits(silu, ids))


def test_export_refusals(model, tiny_model_dir, tmp_path):
    with pytest.raises(BitlmError, match="multiple of 128"):
        export_gguf(bitlm.load(tiny_model_dir), tmp_path / "x.gguf", "i2_s")
    narrow = bitlm.load(make_tiny_model_dir(tmp_path / "n", None, hidden_size=128, intermediate_size=256,
                                            num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(BitlmError, match="q6_k needs hidden_size"):
        export_gguf(narrow, tmp_path / "x.gguf", "i2_s", "q6_k")
    untied = bitlm.load(make_tiny_model_dir(tmp_path / "u", None, **SHAPE, tie_word_embeddings=False))
    with pytest.raises(BitlmError, match="untied"):
        export_gguf(untied, tmp_path / "x.gguf", "i2_s")
    assert not list(tmp_path.glob("*.gguf*"))


def test_runtime_warnings(model, tmp_path, capfd):
    export_gguf(model, tmp_path / "a.gguf", "tq2_0", "f32")
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and "SiLU" in err and "relu2" in err
    export_gguf(model, tmp_path / "b.gguf", "i2_s", "f32")
    assert capfd.readouterr().err == ""


def test_padding_ids_decode_to_nothing(model, tmp_path):
    """Ids the tokenizer lacks (the model's vocab_size is larger) are written as [PADn] tokens of type
    UNUSED, as llama.cpp's converter does, and decode to nothing, as in the source tokenizer."""
    path = export_gguf(model, tmp_path / "m.gguf", "i2_s", "f32")
    src, tok = model.tokenizer, bitlm.load(path).tokenizer
    missing = [i for i in range(model.config.vocab_size) if src.tok.id_to_token(i) is None]
    assert missing  # the tiny tokenizer has fewer tokens than the model's 512
    ids = src.encode("To be") + missing[:3]
    assert tok.decode(ids) == src.decode(ids) == "To be"
