"""GGUF out: llama.cpp's "bitnet" architecture (ternary projections as TQ2_0 or TQ1_0) and
bitnet.cpp's "bitnet-b1.58" (I2_S, formats/i2s.py). Reading them back: io/gguf_read.py.

TQ files: each projection is written as its exact codes (w in {-1, 0, 1}; the TQ block scale is then
1, exact in fp16) plus the per-tensor scale as a separate F32 tensor `blk.N.<name>.scale` of shape [1],
which llama.cpp's bitnet graph multiplies into the product. I2_S files: the codes and the per-tensor
float32 scale are one tensor, as bitnet.cpp stores them. Either way the ternary weights cross over
without any rounding; only the embedding takes the chosen --embed-type (f32 exact; f16/bf16 exact for
values they can represent; q8_0/q6_k quantized).

The file also carries `bitlm.config` (the HF config.json), so bitlm reads back exactly what it wrote,
down to the activation; other programs ignore the key.

Which graph runs the file elsewhere (a peer, not a clone):
  - llama.cpp "bitnet" (TQ): SiLU-gated feed-forward, so a relu2 model (such as 2B4T) runs there at
    the right speed but with the wrong activation; SwiGLU ("silu") models match. Activations are
    quantized to int8 per 256-element block (q8_K), not per token: close, not identical.
  - bitnet.cpp "bitnet-b1.58" (I2_S): relu^2, as 2B4T; a SiLU model runs there with the wrong activation.
  - both tie the head to token_embd, and need heads * head_dim == hidden_size.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from ..config import BitNetConfig
from ..errors import BitlmError
from .files import atomic_file

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
TERNARY_TYPES = ("tq2_0", "tq1_0", "i2_s")
EMBED_TYPES = ("f16", "bf16", "f32", "q8_0", "q6_k")
ROW_MULTIPLE = {"tq2_0": 256, "tq1_0": 256, "i2_s": 128}  # elements per row a ternary type needs
EMBED_ROW_MULTIPLE = {"q8_0": 32, "q6_k": 256}
ARCH = {"tq2_0": "bitnet", "tq1_0": "bitnet", "i2_s": "bitnet-b1.58"}
I2_S_FILE_TYPE = 40  # LLAMA_FTYPE_MOSTLY_I2_S in bitnet.cpp's fork (formats/i2s.py: not verified)
_CHUNK = 8192  # embedding rows quantized at a time (the 2B4T embedding is 1.3 GB in float32)

_LLAMA3_SPLIT = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}"


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


def _add_tokenizer(w, tok, cfg: BitNetConfig) -> None:
    """tokenizer.ggml.* as llama.cpp's convert_hf_to_gguf writes them for a byte-level BPE."""
    import gguf
    tj = json.loads(tok.tok.to_str())
    if (tj.get("model") or {}).get("type") != "BPE":
        raise BitlmError("GGUF export: only byte-level BPE tokenizers are supported")
    n = cfg.vocab_size
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
    eos = cfg.eos_token_ids or ([tok.token_to_id(tok.eos_token)] if tok.eos_token else [])
    if eos and eos[0] is not None:
        w.add_eos_token_id(eos[0])
    eot = tok.token_to_id("<|eot_id|>")
    if eot is not None:
        w.add_eot_token_id(eot)
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)


def check_exportable(cfg: BitNetConfig, ternary_type: str, embed_type: str) -> None:
    """Refuse, before any work, what the format or its runtimes cannot hold."""
    if ternary_type not in TERNARY_TYPES:
        raise BitlmError(f"GGUF ternary type {ternary_type!r} is not one of {', '.join(TERNARY_TYPES)}")
    if embed_type not in EMBED_TYPES:
        raise BitlmError(f"GGUF embedding type {embed_type!r} is not one of {', '.join(EMBED_TYPES)}")
    if not cfg.tie_word_embeddings:
        raise BitlmError("GGUF export: llama.cpp's and bitnet.cpp's bitnet graphs tie the head to "
                         "token_embd; this model has an untied lm_head")
    if cfg.q_size != cfg.hidden_size:
        raise BitlmError("GGUF export: llama.cpp's bitnet architecture needs heads * head_dim == hidden_size")
    need = ROW_MULTIPLE[ternary_type]
    for name, (out_f, in_f) in cfg.projection_shapes().items():
        if in_f % need:
            raise BitlmError(f"GGUF export: {name} rows have {in_f} elements; {ternary_type.upper()} needs a "
                             f"multiple of {need}")
    if embed_type in EMBED_ROW_MULTIPLE and cfg.hidden_size % EMBED_ROW_MULTIPLE[embed_type]:
        raise BitlmError(f"GGUF export: {embed_type} needs hidden_size to be a multiple of "
                         f"{EMBED_ROW_MULTIPLE[embed_type]}, not {cfg.hidden_size}")


def runtime_warning(cfg: BitNetConfig, ternary_type: str) -> str | None:
    """The one-line warning when the target runtime's graph cannot run this model as it is."""
    if ternary_type in ("tq2_0", "tq1_0") and cfg.hidden_act != "silu":
        return (f"llama.cpp's bitnet graph gates with SiLU; this {cfg.hidden_act} model will run there with "
                "the wrong activation (bitlm reads the file back exactly; for llama.cpp use a SiLU model)")
    if ternary_type == "i2_s" and cfg.hidden_act != "relu2":
        return (f"bitnet.cpp's bitnet-b1.58 graph uses relu^2; this {cfg.hidden_act} model will run there with "
                "the wrong activation (bitlm reads the file back exactly)")
    return None


def _embedding(rows: np.ndarray, embed_type: str):
    """(data, GGML type) of the embedding rows (float32 or bf16 bits) in embed_type."""
    import gguf

    from ..engine.native import bf16_to_f32, f32_to_bf16
    from ..formats import q6_k
    Q = gguf.GGMLQuantizationType
    if embed_type == "bf16":
        return (rows if rows.dtype == np.uint16 else f32_to_bf16(rows)), Q.BF16
    V, H = rows.shape
    dtype, qtype, width = {"f32": (np.float32, Q.F32, H), "f16": (np.float16, Q.F16, H),
                           "q8_0": (np.uint8, Q.Q8_0, H // 32 * 34), "q6_k": (np.uint8, Q.Q6_K, H // 256 * 210)}[embed_type]
    out = np.empty((V, width), dtype)
    for i in range(0, V, _CHUNK):
        r = rows[i:i + _CHUNK]
        r = bf16_to_f32(r) if r.dtype == np.uint16 else np.asarray(r, np.float32)
        if embed_type in ("f32", "f16"):
            out[i:i + _CHUNK] = r.astype(dtype)
        elif embed_type == "q8_0":
            out[i:i + _CHUNK] = gguf.quants.quantize(r, Q.Q8_0)
        else:
            out[i:i + _CHUNK] = q6_k.quantize(r)
    return out, qtype


def _gguf():
    """gguf-py (GGUFWriter, the TQ and Q8_0 quantizers): an extra of bitlm, needed to write GGUF only."""
    try:
        import gguf
    except ModuleNotFoundError:
        raise BitlmError("writing GGUF needs the gguf package, which is not installed: "
                         "pip install 'bitlm[gguf]'") from None
    return gguf


def write_gguf(path, cfg: BitNetConfig, arrays: dict, tokenizer, ternary_type: str = "tq2_0",
               embed_type: str = "f16", name: str = "bitlm-model", progress=None, warn=None) -> Path:
    """Write the model held as a native array dict (engine/native.py names; the embedding as rows,
    projections as arrays or st.Lazy) as a GGUF file, atomically. warn(msg) receives the one-line
    runtime warnings, if any."""
    gguf = _gguf()

    from ..engine.native import NORMS, PROJS, bf16_to_f32
    from ..formats import i2s, i2v
    from . import st
    check_exportable(cfg, ternary_type, embed_type)
    messages = [runtime_warning(cfg, ternary_type)]
    if tokenizer is None:
        messages.append("the model has no tokenizer: the GGUF gets no tokenizer.ggml.* metadata, so llama.cpp "
                        "and bitnet.cpp cannot load it (bitlm can, without text: bench)")
    for message in messages:
        if message and warn is not None:
            warn(message)
    arch = ARCH[ternary_type]
    path = Path(path)

    def f32(a):
        a = np.asarray(a)
        return bf16_to_f32(a) if a.dtype == np.uint16 else np.ascontiguousarray(a, dtype=np.float32)

    with atomic_file(path) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch)
        w.add_name(name)
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
        w.add_file_type({"tq2_0": int(gguf.LlamaFileType.MOSTLY_TQ2_0), "tq1_0": int(gguf.LlamaFileType.MOSTLY_TQ1_0),
                         "i2_s": I2_S_FILE_TYPE}[ternary_type])
        w.add_string("bitlm.config", json.dumps(cfg.to_hf()))
        if tokenizer is not None:
            _add_tokenizer(w, tokenizer, cfg)

        data, qt = _embedding(arrays["embed"], embed_type)
        # byte arrays (q8_0, q6_k): gguf-py derives the element shape from the byte shape itself
        w.add_tensor("token_embd.weight", data, raw_shape=None if data.dtype == np.uint8 else data.shape, raw_dtype=qt)
        w.add_tensor("output_norm.weight", f32(arrays["final_norm"]))
        shapes = cfg.projection_shapes()
        for l in range(cfg.num_hidden_layers):
            for hf_name in NORMS:
                w.add_tensor(f"blk.{l}.{BLOCK_TENSORS[hf_name]}.weight", f32(arrays[f"{l}.{hf_name}"]))
            for j, hf_name in enumerate(PROJS):
                n_out, n_in = shapes[hf_name]
                packed = arrays[f"{l}.{hf_name}"]
                packed = packed.make() if isinstance(packed, st.Lazy) else packed  # made one at a time
                codes = i2v.unpack(np.asarray(packed), n_out, n_in)
                g_name = f"blk.{l}.{BLOCK_TENSORS[hf_name]}"
                scale = np.float32(arrays["scales"][l, j])
                if ternary_type == "i2_s":
                    # raw type 36: gguf-py does not know it; int8 keeps its writer from re-deriving the
                    # shape from a byte count (it would look the type up in its size table)
                    w.add_tensor(g_name + ".weight", i2s.pack(codes, scale).view(np.int8),
                                 raw_shape=(n_out, n_in), raw_dtype=i2s.GGML_TYPE)
                else:
                    qt = gguf.GGMLQuantizationType.TQ2_0 if ternary_type == "tq2_0" else gguf.GGMLQuantizationType.TQ1_0
                    w.add_tensor(g_name + ".weight", gguf.quants.quantize(codes.astype(np.float32), qt), raw_dtype=qt)
                    w.add_tensor(g_name + ".scale", np.array([scale], np.float32))
                if progress is not None:
                    progress.update(1)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return path


def export_gguf(model, path, ternary_type: str = "tq2_0", embed_type: str = "f16") -> Path:
    """Write a packed torch BitNetForCausalLM as a GGUF file, atomically. Returns the path."""
    from ..engine.native import arrays_from_model
    check_exportable(model.config, ternary_type, embed_type)
    if model.linear_kind != "packed":
        raise BitlmError("GGUF export: convert the model to its packed form first (model.to_packed())")
    arrays = arrays_from_model(model, "f32")
    arrays.pop("head", None)
    name = Path(model.source["path"]).name if getattr(model, "source", None) else "bitlm-model"
    warn = lambda m: print(f"bitlm: warning: {m}", file=sys.stderr)  # noqa: E731
    return write_gguf(path, model.config, arrays, model.tokenizer, ternary_type, embed_type, name, warn=warn)
