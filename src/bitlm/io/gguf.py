"""GGUF out, for llama.cpp's "bitnet" architecture, with the ternary projections as TQ2_0 or TQ1_0.

Each projection is written as its exact codes (w in {-1, 0, 1}; the TQ block scale is then 1, exact in
fp16) plus the per-tensor scale as a separate F32 tensor `blk.N.<name>.scale` of shape [1], which
llama.cpp multiplies into the product. So the ternary weights cross over without any rounding.

What llama.cpp does differently (it is a peer, not a clone):
  - it quantizes activations to int8 per 256-element block (q8_K), not per token;
  - its bitnet graph uses SiLU in the feed-forward, so a relu2 model (such as 2B4T) runs there at the
    right speed but not with the right activation; SwiGLU ("silu") models match;
  - the head is always tied to token_embd, and rows must be multiples of 256 elements.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..bitlinear import PackedBitLinear
from ..errors import BitlmError
from ..model import BitNetForCausalLM

# HF names (within a block) -> GGUF names
BLOCK_TENSORS = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.attn_sub_norm": "attn_sub_norm",
    "mlp.ffn_sub_norm": "ffn_sub_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
TERNARY_TYPES = ("tq2_0", "tq1_0")
EMBED_TYPES = ("f32", "f16", "bf16", "q8_0")
QK_K = 256

_LLAMA3_SPLIT = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}"


def _qtype(name: str):
    import gguf
    return {"tq2_0": gguf.GGMLQuantizationType.TQ2_0, "tq1_0": gguf.GGMLQuantizationType.TQ1_0,
            "f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
            "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[name]


def _quantize(array: np.ndarray, qtype: str) -> tuple[np.ndarray, object]:
    import gguf
    t = _qtype(qtype)
    if qtype == "f32":
        return array.astype(np.float32), t
    if qtype == "f16":
        return array.astype(np.float16), t
    return gguf.quants.quantize(array.astype(np.float32), t), t


def _pre_tokenizer(tj: dict, source: str) -> str:
    """The llama.cpp pre-tokenizer name that splits text the way this tokenizer.json does."""
    pre = tj.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Split", "ByteLevel"] and _LLAMA3_SPLIT in json.dumps(steps[0].get("pattern", {})).replace("\\\\", "\\"):
        return "llama-bpe"
    raise BitlmError(f"{source}: pre-tokenizer {kinds} has no llama.cpp equivalent known to bitlm "
                     "(supported: GPT-2 byte-level, Llama 3)")


def _add_tokenizer(w, model: BitNetForCausalLM) -> None:
    import gguf
    tok = model.tokenizer
    if tok is None:
        raise BitlmError("GGUF export: the model has no tokenizer (tokenizer.json); llama.cpp needs one")
    tj = json.loads(tok.tok.to_str())
    if (tj.get("model") or {}).get("type") != "BPE":
        raise BitlmError("GGUF export: only byte-level BPE tokenizers are supported")
    n = model.config.vocab_size
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [gguf.TokenType.UNUSED] * n
    for text, i in tj["model"]["vocab"].items():
        if i < n:
            tokens[i], types[i] = text, gguf.TokenType.NORMAL
    for added in tj.get("added_tokens", []):
        i = added["id"]
        if i >= n:
            raise BitlmError(f"GGUF export: token {added['content']!r} has id {i} >= vocab_size {n}")
        tokens[i] = added["content"]
        types[i] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"].get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(_pre_tokenizer(tj, "tokenizer.json"))
    w.add_token_list(tokens)
    w.add_token_types([int(t) for t in types])
    w.add_token_merges(merges)
    if tok.bos_token_id is not None:
        w.add_bos_token_id(tok.bos_token_id)
        w.add_add_bos_token(tok.encode("a")[:1] == [tok.bos_token_id])
    eos = model.config.eos_token_ids or ([tok.token_to_id(tok.eos_token)] if tok.eos_token else [])
    if eos and eos[0] is not None:
        w.add_eos_token_id(eos[0])
    eot = tok.token_to_id("<|eot_id|>")
    if eot is not None:
        w.add_eot_token_id(eot)
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)


def export_gguf(model: BitNetForCausalLM, path, ternary_type: str = "tq2_0", embed_type: str = "f16") -> Path:
    """Write `model` (packed form) as a llama.cpp GGUF file, atomically. Returns the path."""
    import gguf
    cfg = model.config
    if ternary_type not in TERNARY_TYPES:
        raise BitlmError(f"GGUF ternary type {ternary_type!r} is not one of {', '.join(TERNARY_TYPES)}")
    if embed_type not in EMBED_TYPES:
        raise BitlmError(f"GGUF embedding type {embed_type!r} is not one of {', '.join(EMBED_TYPES)}")
    if not cfg.tie_word_embeddings:
        raise BitlmError("GGUF export: llama.cpp's bitnet architecture ties the head to token_embd; "
                         "this model has an untied lm_head")
    if cfg.q_size != cfg.hidden_size:
        raise BitlmError("GGUF export: llama.cpp's bitnet architecture needs heads * head_dim == hidden_size")
    for name, (out_f, in_f) in cfg.projection_shapes().items():
        if in_f % QK_K:
            raise BitlmError(f"GGUF export: {name} rows have {in_f} elements; {ternary_type.upper()} needs a "
                             f"multiple of {QK_K}")
    if cfg.hidden_size % 32 and embed_type == "q8_0":
        raise BitlmError("GGUF export: q8_0 needs hidden_size to be a multiple of 32")
    if model.linear_kind != "packed":
        raise BitlmError("GGUF export: convert the model to its packed form first (model.to_packed())")

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, "bitnet")
        w.add_name(Path(model.source["path"]).name if model.source else "bitlm-model")
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_block_count(cfg.num_hidden_layers)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count(cfg.num_attention_heads)
        w.add_head_count_kv(cfg.num_key_value_heads)
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        w.add_vocab_size(cfg.vocab_size)
        w.add_file_type(gguf.LlamaFileType.MOSTLY_TQ2_0 if ternary_type == "tq2_0" else gguf.LlamaFileType.MOSTLY_TQ1_0)
        _add_tokenizer(w, model)

        def f32(t: torch.Tensor) -> np.ndarray:
            return t.detach().float().cpu().numpy()

        data, qt = _quantize(f32(model.model.embed_tokens.weight), embed_type)
        w.add_tensor("token_embd.weight", data, raw_dtype=qt)
        w.add_tensor("output_norm.weight", f32(model.model.norm.weight))
        for i, block in enumerate(model.model.layers):
            for hf_name, g_name in BLOCK_TENSORS.items():
                m = block.get_submodule(hf_name)
                if isinstance(m, PackedBitLinear):
                    data, qt = _quantize(m.codes(torch.float32).numpy(), ternary_type)
                    w.add_tensor(f"blk.{i}.{g_name}.weight", data, raw_dtype=qt)
                    w.add_tensor(f"blk.{i}.{g_name}.scale", f32(m.weight_scale).reshape(1))
                else:
                    w.add_tensor(f"blk.{i}.{g_name}.weight", f32(m.weight))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
