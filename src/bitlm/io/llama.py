"""Full-precision Llama checkpoints (config.json model_type "llama" + safetensors) as a starting point for
fine-tuning down to 1.58 bits.

The Llama block is the BitNet block without the two sub-norms and with SwiGLU (hidden_act "silu") in
place of relu2, and the tensor names are the same. So the map is: every tensor by its own name, the
q/k/v/o/gate/up/down weights into BitLinear latent weights, and attn_sub_norm / ffn_sub_norm added with
weight 1. Quantization is then ramped in by the trainer (BitLinear.quant_strength, the lambda warm-up).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import BitNetConfig
from ..errors import BitlmError
from ..model import BitNetForCausalLM
from . import names
from .hf import _Tensors

# Llama tensors that have no counterpart (none today) and BitNet tensors that Llama lacks (set to 1).
ADDED_NORMS = ("self_attn.attn_sub_norm", "mlp.ffn_sub_norm")


def is_llama_dir(path) -> bool:
    f = Path(path) / "config.json"
    try:
        return json.loads(f.read_text()).get("model_type") == "llama"
    except (OSError, ValueError, AttributeError):
        return False


def llama_config(d: dict, source: str = "config.json") -> BitNetConfig:
    """The BitNet config of the same shapes as a Llama config.json dict (SwiGLU, latent weights)."""
    if d.get("model_type") != "llama":
        raise BitlmError(f"{source}: model_type is {d.get('model_type')!r}, expected 'llama'")
    if d.get("hidden_act", "silu") != "silu":
        raise BitlmError(f"{source}: hidden_act {d.get('hidden_act')!r}; only Llama's 'silu' (SwiGLU) maps")
    keep = {k: v for k, v in d.items() if k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "max_position_embeddings", "rope_theta", "rope_parameters",
        "rope_scaling", "rms_norm_eps", "tie_word_embeddings", "bos_token_id", "eos_token_id",
        "pad_token_id", "attention_bias", "mlp_bias")}
    keep.update(model_type="bitnet", hidden_act="silu", torch_dtype="float32")
    keep.setdefault("tie_word_embeddings", False)  # Llama's default, unlike BitNet's
    cfg = BitNetConfig.from_hf(keep, source=source)
    return cfg.replace(quantization_mode="offline")


def load_llama(path, linear: str = "latent") -> BitNetForCausalLM:
    """A BitNet model (training form by default) initialised from a Llama checkpoint directory."""
    path = Path(path)
    f = path / "config.json"
    try:
        d = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise BitlmError(f"{f}: not a readable config.json ({e})") from None
    cfg = llama_config(d, str(f))
    t = _Tensors(path)
    model = BitNetForCausalLM(cfg, linear=linear)
    V, H = cfg.vocab_size, cfg.hidden_size
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(t.get(names.EMBED, (V, H)))
        if not cfg.tie_word_embeddings:
            model.lm_head.weight.copy_(t.get(names.LM_HEAD, (V, H)))
        model.model.norm.weight.copy_(t.get(names.FINAL_NORM, (H,)))
        for i, block in enumerate(model.model.layers):
            for name, size in names.block_norms(cfg).items():
                w = block.get_submodule(name).weight
                if name in ADDED_NORMS:
                    w.fill_(1.0)
                else:
                    w.copy_(t.get(names.layer(i, name) + ".weight", (size,)))
            for name, shape in cfg.projection_shapes().items():
                block.get_submodule(name).weight.copy_(t.get(names.layer(i, name) + ".weight", shape))
    model.source = {"path": str(path), "format": "llama"}
    from ..engine.tokenizer import Tokenizer
    model.tokenizer = Tokenizer.from_dir(path, cfg)
    return model
