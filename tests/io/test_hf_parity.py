"""Parity with Hugging Face transformers' BitNetForCausalLM on tiny random models, both formats."""

import json

import pytest
import torch

import bitlm

transformers = pytest.importorskip("transformers")
from transformers import BitNetConfig as HFConfig  # noqa: E402
from transformers import BitNetForCausalLM as HFModel  # noqa: E402

CASES = {
    # name: (config overrides, packed format allowed: transformers reads packed weights only when out % 4 == 0)
    "gqa-relu2-untied": dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                             hidden_act="relu2", tie_word_embeddings=False),
    "mha-silu-tied": dict(hidden_size=48, intermediate_size=128, num_attention_heads=3, num_key_value_heads=3,
                          hidden_act="silu", tie_word_embeddings=True),
    "ragged-gqa-relu2": dict(hidden_size=36, intermediate_size=44, num_attention_heads=6, num_key_value_heads=2,
                             hidden_act="relu2", tie_word_embeddings=True),  # not multiples of 16
    "odd-latent-only": dict(hidden_size=30, intermediate_size=58, num_attention_heads=5, num_key_value_heads=1,
                            hidden_act="silu", tie_word_embeddings=False),  # out % 4 != 0: latent only
}
PACKED_OK = {"gqa-relu2-untied", "mha-silu-tied", "ragged-gqa-relu2"}
VOCAB = 311


def hf_latent_dir(tmp_path, overrides, seed=0):
    """A random transformers BitNet model saved with latent float32 weights, quantization online."""
    torch.manual_seed(seed)
    cfg = HFConfig(vocab_size=VOCAB, num_hidden_layers=2, max_position_embeddings=96, bos_token_id=None,
                   eos_token_id=None, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                   **overrides)
    model = HFModel(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)  # non-trivial norm weights: a wrong norm would show
            else:
                p.normal_(0, 0.5)
    d = tmp_path / "latent"
    model.save_pretrained(d)
    c = json.loads((d / "config.json").read_text())
    c["quantization_config"] = {"quant_method": "bitnet", "linear_class": "autobitlinear",
                                "quantization_mode": "online"}
    (d / "config.json").write_text(json.dumps(c))
    return d


def hf_load(d):
    return HFModel.from_pretrained(d, dtype=torch.float32).eval()


def greedy_hf(model, ids, n):
    for _ in range(n):  # full recomputation each step: independent of any cache
        nxt = model(ids).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids


def greedy_ours(model, ids, n):
    cache = model.new_cache(ids.shape[0])
    logits = model(ids, cache, logits_to_keep=1)
    out = ids
    for _ in range(n):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        out = torch.cat([out, nxt], dim=1)
        logits = model(nxt, cache)
    return out


def rel_err(a, b):
    return float((a - b).abs().max() / a.abs().max())


@pytest.mark.parametrize("case", list(CASES))
def test_latent_format_matches_transformers(tmp_path, case):
    d = hf_latent_dir(tmp_path, CASES[case])
    ref, ours = hf_load(d), bitlm.load(d)
    assert type(ref.model.layers[0].self_attn.q_proj).__name__ == "AutoBitLinear"  # quantized reference
    ids = torch.randint(0, VOCAB, (2, 19))
    with torch.no_grad():
        assert rel_err(ref(ids).logits, ours(ids)) <= 1e-4
        prompt = ids[:1, :5]
        assert torch.equal(greedy_hf(ref, prompt, 20), greedy_ours(ours, prompt, 20))


@pytest.mark.parametrize("case", sorted(PACKED_OK))
def test_packed_format_matches_transformers(tmp_path, case):
    ours_latent = bitlm.load(hf_latent_dir(tmp_path, CASES[case]))
    packed = tmp_path / "packed"
    ours_latent.save_pretrained(packed)
    cfg = json.loads((packed / "config.json").read_text())
    assert cfg["quantization_config"]["quantization_mode"] == "offline"
    ref, ours = hf_load(packed), bitlm.load(packed)
    assert ref.model.layers[0].mlp.up_proj.weight.dtype == torch.float32  # unpacked by transformers
    ids = torch.randint(0, VOCAB, (3, 11))
    with torch.no_grad():
        assert rel_err(ref(ids).logits, ours(ids)) <= 1e-4
        assert torch.equal(ours(ids), ours_latent(ids))  # quantized at load == packed on disk
        prompt = ids[:1, :4]
        assert torch.equal(greedy_hf(ref, prompt, 20), greedy_ours(ours, prompt, 20))


def test_older_bitlinear_class_with_inverted_scale(tmp_path):
    """linear_class "bitlinear" stores 1/scale and divides; transformers' BitLinear reads it so."""
    from safetensors.torch import load_file, save_file
    ours = bitlm.load(hf_latent_dir(tmp_path, CASES["gqa-relu2-untied"]))
    d = tmp_path / "old"
    ours.save_pretrained(d)
    tensors = load_file(d / "model.safetensors")
    for k in tensors:
        if k.endswith("weight_scale"):
            tensors[k] = 1.0 / tensors[k]
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["linear_class"] = "bitlinear"
    (d / "config.json").write_text(json.dumps(cfg))
    ref, back = hf_load(d), bitlm.load(d)
    assert type(ref.model.layers[0].self_attn.q_proj).__name__ == "BitLinear"
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        assert rel_err(ref(ids).logits, back(ids)) <= 1e-4
        assert rel_err(ours(ids), back(ids)) <= 1e-5


def test_bf16_latent_checkpoint(tmp_path):
    """A -bf16 style checkpoint: latent weights stored in bfloat16, quantized at load."""
    d = hf_latent_dir(tmp_path, CASES["gqa-relu2-untied"])
    m = HFModel.from_pretrained(d, dtype=torch.bfloat16)
    bf = tmp_path / "bf16"
    m.save_pretrained(bf)
    ref = HFModel.from_pretrained(bf, dtype=torch.float32).eval()  # bf16 values, computed in float32
    ours = bitlm.load(bf)
    ids = torch.randint(0, VOCAB, (1, 13))
    with torch.no_grad():
        assert rel_err(ref(ids).logits, ours(ids)) <= 1e-4
