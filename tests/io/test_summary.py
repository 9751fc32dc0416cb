"""bitlm.io.summary: sizes read from safetensors headers alone, checked against files built here."""

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

import bitlm
from bitlm.errors import BitlmError
from bitlm.io.st import read_header
from bitlm.io.summary import component, describe


def test_read_header_of_a_hand_built_file(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "b": {"dtype": "U8", "shape": [3], "data_offsets": [8, 11]}, "__metadata__": {"format": "pt"}}
    raw = json.dumps(header).encode()
    f = tmp_path / "x.safetensors"
    f.write_bytes(struct.pack("<Q", len(raw)) + raw + struct.pack("<2f", 1.0, 2.0) + b"\x01\x02\x03")
    tensors, start = read_header(f)
    assert start == 8 + len(raw) and tensors.pop("__metadata__") == {"format": "pt"} and tensors["b"] == {"dtype": "U8", "shape": [3], "data_offsets": [8, 11]}
    assert torch.equal(load_file(f)["b"], torch.tensor([1, 2, 3], dtype=torch.uint8))  # a valid file
    f.write_bytes(f.read_bytes()[:-1])
    with pytest.raises(BitlmError, match=r"x\.safetensors: truncated: the header promises 11 bytes of data, "
                                         r"the file holds 10"):
        read_header(f)
    f.write_bytes(struct.pack("<Q", 1 << 40) + raw)
    with pytest.raises(BitlmError, match="not a safetensors file"):
        read_header(f)
    f.write_bytes(struct.pack("<Q", 5) + b"{oops")
    with pytest.raises(BitlmError, match="not a safetensors file"):
        read_header(f)


@pytest.mark.parametrize("name,kind", [
    ("model.embed_tokens.weight", "embedding"),
    ("lm_head.weight", "head"),
    ("model.layers.3.self_attn.q_proj.weight", "ternary weights"),
    ("model.layers.3.mlp.down_proj.weight", "ternary weights"),
    ("model.layers.3.mlp.down_proj.weight_scale", "ternary scales"),
    ("model.layers.3.self_attn.attn_sub_norm.weight", "norms"),
    ("model.norm.weight", "norms"),
    ("model.layers.3.self_attn.rotary_emb.inv_freq", "other"),
])
def test_components(name, kind):
    assert component(name) == kind


def test_latent_untied_checkpoint(tmp_path):
    """A latent (online) checkpoint with an untied head: float weights, counted and sized from the file."""
    cfg = bitlm.preset("tiny", tie_word_embeddings=False, quantization_mode="online", torch_dtype="bfloat16")
    m = bitlm.BitNetForCausalLM(cfg, linear="latent")
    save_file({k: v.to(torch.bfloat16) for k, v in m.state_dict().items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf()))
    info = describe(tmp_path)
    stored = load_file(tmp_path / "model.safetensors")
    assert info["format"]["quantization_mode"] == "online" and "latent" in info["format"]["description"]
    assert info["bytes"]["head"] == 2 * stored["lm_head.weight"].numel() == 2 * 512 * 64
    ternary = sum(v.numel() for k, v in stored.items() if k.endswith("_proj.weight"))
    assert info["parameters"]["ternary"] == ternary and info["bytes"]["ternary weights"] == 2 * ternary
    assert info["bits_per_ternary_weight"] == 16.0
    assert info["parameters"]["head"] == 512 * 64
    assert info["format"]["dtypes"]["embedding"] == ["BF16"]


def test_sharded_checkpoint_sums_the_shards(tiny_model_dir, tmp_path):
    tensors = load_file(tiny_model_dir / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for fname, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(tmp_path / fname))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: f for f, keys in shards.items() for k in keys}}))
    (tmp_path / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    one, two = describe(tiny_model_dir), describe(tmp_path)
    for k in ("ternary weights", "ternary scales", "embedding", "norms"):
        assert one["bytes"][k] == two["bytes"][k] > 0
    assert two["bytes"]["total"] == sum((tmp_path / f).stat().st_size for f in shards)
    assert list(two["files"]) == sorted(shards)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(BitlmError, match="00002-of-00002.safetensors: missing"):
        describe(tmp_path)
