"""Tensor names of the Hugging Face BitNet checkpoint (model_type "bitnet"), as data."""

from __future__ import annotations

from ..config import BitNetConfig

EMBED = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"
FINAL_NORM = "model.norm.weight"
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def layer(i: int, name: str) -> str:
    return f"model.layers.{i}.{name}"


def block_norms(cfg: BitNetConfig) -> dict[str, int]:
    """Per-block RMSNorm modules and their sizes."""
    return {
        "input_layernorm": cfg.hidden_size,
        "post_attention_layernorm": cfg.hidden_size,
        "self_attn.attn_sub_norm": cfg.q_size,
        "mlp.ffn_sub_norm": cfg.intermediate_size,
    }
