"""The config dataclass: presets, the Hugging Face mapping, validation."""

import pytest

from bitlm.config import BitNetConfig, preset
from bitlm.errors import BitlmError

# microsoft/bitnet-b1.58-2B-4T's config.json as published (REFERENCE.md).
HF_2B4T = {
    "architectures": ["BitNetForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "relu2", "hidden_size": 2560,
    "initializer_range": 0.02, "intermediate_size": 6912, "max_position_embeddings": 4096,
    "model_type": "bitnet", "rms_norm_eps": 1e-05, "num_attention_heads": 20, "num_hidden_layers": 30,
    "num_key_value_heads": 5, "rope_theta": 500000.0, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 128256,
    "quantization_config": {"quant_method": "bitnet", "linear_class": "autobitlinear",
                            "quantization_mode": "offline"},
}


def test_2b4t_preset_matches_the_released_config():
    a, b = preset("2b4t"), BitNetConfig.from_hf(HF_2B4T)
    for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rope_theta",
              "rms_norm_eps", "tie_word_embeddings", "quantization_mode", "linear_class"):
        assert getattr(a, f) == getattr(b, f), f
    assert b.head_dim == 128
    assert b.num_parameters()["total"] == 2_412_820_480  # the published count


def test_hf_round_trip_keeps_unknown_keys():
    c = BitNetConfig.from_hf(HF_2B4T)
    d = c.to_hf()
    assert d["initializer_range"] == 0.02 and d["use_cache"] is True
    assert BitNetConfig.from_hf(d) == c


def test_rope_parameters_of_newer_transformers():
    d = {k: v for k, v in HF_2B4T.items() if k != "rope_theta"}
    d["rope_parameters"] = {"rope_type": "default", "rope_theta": 12345.0}
    assert BitNetConfig.from_hf(d).rope_theta == 12345.0
    d["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0}
    with pytest.raises(BitlmError, match="rope_type 'yarn'"):
        BitNetConfig.from_hf(d)


@pytest.mark.parametrize("change,match", [
    ({"num_key_value_heads": 3}, "not a multiple"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"hidden_size": 0}, "hidden_size"),
    ({"model_type": "llama"}, "model_type"),
    ({"attention_bias": True}, "no biases"),
])
def test_invalid_configs(change, match):
    with pytest.raises(BitlmError, match=match):
        BitNetConfig.from_hf({**HF_2B4T, **change})


def test_unknown_preset():
    with pytest.raises(BitlmError, match="unknown preset"):
        preset("70b")
