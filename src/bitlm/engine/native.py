"""The native runtime: the whole forward pass in C (kernels/bitnet.c) on numpy arrays.

A NativeModel holds every weight as a numpy array (I2V-packed ternary projections, float norms, the
embedding, the head in the chosen format) plus its own KV cache, and hands the C core their pointers
once. Each step is then one call: `forward(tokens, n_out)` runs the tokens at the next positions and
returns the logits of the last n_out of them.

Head formats (`head=`): "f32" (exact), "bf16" (rows as the checkpoint stores them), "q8" (int8 rows
with a float scale per row: half the bytes of bf16, read by AVX-512 VNNI).
"""

from __future__ import annotations

import numpy as np

from ..errors import BitlmError
from ..formats import i2v

HEADS = ("f32", "bf16", "q8")
_F32, _BF16, _Q8 = 0, 1, 2
_NI, _NL = 19, 13  # bitnet.h: BN_NI, BN_NL


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round to nearest even, as torch's .bfloat16() does (finite values)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def _native():
    from ..kernels import _native as n  # raises ImportError when the library was not built
    return n


def quantize_head_rows(e: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """int8 rows with one float32 scale per row (absmax), and the row sums the VNNI trick needs."""
    e = np.asarray(e, dtype=np.float32)
    amax = np.abs(e).max(axis=1)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(e / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale, q.sum(axis=1, dtype=np.int32)


class NativeModel:
    def __init__(self, config, embed: np.ndarray, final_norm: np.ndarray, layers: list[dict],
                 head: np.ndarray | None = None, head_format: str = "q8", max_len: int | None = None):
        """layers: per block {"input_layernorm", "post_attention_layernorm", "self_attn.attn_sub_norm",
        "mlp.ffn_sub_norm": float32 arrays; "<proj>": (I2V uint8 array, scale) for the 7 projections}.
        embed: float32 or bf16-as-uint16 [vocab, hidden]; head: the same or None (tied to embed)."""
        if head_format not in HEADS:
            raise BitlmError(f"head format {head_format!r} is not one of {', '.join(HEADS)}")
        self.n = _native()
        c = self.config = config
        self.max_len = max_len or c.max_position_embeddings
        self.pos = 0
        keep = self._keep = []  # every array the C side points into stays alive here

        def arr(a, dtype):
            a = np.ascontiguousarray(a, dtype=dtype)
            keep.append(a)
            return a

        def ptr(a):
            return a.ctypes.data

        embed = arr(embed, embed.dtype)
        if embed.dtype not in (np.float32, np.uint16):
            raise BitlmError("native runtime: the embedding must be float32 or bf16 (as uint16)")
        rows = embed if head is None else arr(head, head.dtype)
        full = rows if rows.dtype == np.float32 else bf16_to_f32(rows)
        if head_format == "q8":
            hq, hs, hsum = (arr(a, a.dtype) for a in quantize_head_rows(full))
            head_ptrs, head_kind = (ptr(hq), ptr(hs), ptr(hsum)), _Q8
        elif head_format == "f32":
            head_ptrs, head_kind = (ptr(arr(full, np.float32)), 0, 0), _F32
        else:
            bits = rows if rows.dtype == np.uint16 else arr(f32_to_bf16(rows), np.uint16)
            head_ptrs, head_kind = (ptr(bits), 0, 0), _BF16
        from ..model import rope_tables
        cos, sin = (arr(t, np.float32) for t in rope_tables(c.head_dim, c.rope_theta, self.max_len))
        ints = [c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads,
                c.num_key_value_heads, c.head_dim, c.vocab_size, self.max_len, 0 if c.hidden_act == "relu2" else 1,
                ptr(cos), ptr(sin), ptr(arr(final_norm, np.float32)), ptr(embed), _F32 if embed.dtype == np.float32 else _BF16,
                head_kind, *head_ptrs, -1]
        assert len(ints) == _NI
        flts = [c.rms_norm_eps]
        self.k_cache, self.v_cache = [], []
        shapes = c.projection_shapes()
        for blk in layers:
            for name in ("input_layernorm", "post_attention_layernorm", "self_attn.attn_sub_norm", "mlp.ffn_sub_norm"):
                ints.append(ptr(arr(blk[name], np.float32)))
            for name, (n_out, n_in) in shapes.items():
                packed, scale = blk[name]
                if packed.shape != i2v.packed_shape(n_out, n_in) or packed.dtype != np.uint8:
                    raise BitlmError(f"native runtime: {name} is not I2V-packed uint8 {i2v.packed_shape(n_out, n_in)}")
                ints.append(ptr(arr(packed, np.uint8)))
                flts.append(float(scale))
            kc = arr(np.zeros((c.num_key_value_heads, self.max_len, c.head_dim), np.float32), np.float32)
            vc = arr(np.zeros_like(kc), np.float32)
            self.k_cache.append(kc)
            self.v_cache.append(vc)
            ints += [ptr(kc), ptr(vc)]
        self._ints = arr(np.array(ints, dtype=np.int64), np.int64)
        self._flts = arr(np.array(flts, dtype=np.float64), np.float64)
        self._handle = self.n.model_new(ptr(self._ints), len(self._ints), ptr(self._flts), len(self._flts))
        self.head_format = head_format

    # ---- from a torch model ------------------------------------------------------------------------
    @classmethod
    def from_model(cls, model, head: str = "q8", max_len: int | None = None) -> "NativeModel":
        """Convert a packed BitNetForCausalLM (its weights are copied into the native layout)."""
        import torch

        from ..bitlinear import PackedBitLinear

        def np_float(t):
            t = t.detach()
            return t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.float().numpy()

        layers = []
        for block in model.model.layers:
            d = {}
            for name in ("input_layernorm", "post_attention_layernorm", "self_attn.attn_sub_norm", "mlp.ffn_sub_norm"):
                d[name] = block.get_submodule(name).weight.detach().float().numpy()
            for name in model.config.projection_shapes():
                m = block.get_submodule(name)
                if not isinstance(m, PackedBitLinear):
                    raise BitlmError("native runtime: convert the model to its packed form first (to_packed())")
                d[name] = (i2v.from_hf_packed(m.weight.numpy(), m.out_features), float(m.weight_scale))
            layers.append(d)
        head_w = None if model.config.tie_word_embeddings else np_float(model.lm_head.weight)
        nm = cls(model.config, np_float(model.model.embed_tokens.weight), model.model.norm.weight.detach().float().numpy(),
                 layers, head=head_w, head_format=head, max_len=max_len)
        nm.tokenizer = model.tokenizer
        return nm

    # ---- running -----------------------------------------------------------------------------------
    def reset(self) -> None:
        self.pos = 0

    def truncate(self, length: int) -> None:
        self.pos = min(self.pos, length)

    def forward(self, tokens, n_out: int = 1) -> np.ndarray:
        """Run `tokens` at positions pos, pos+1, ...; float32 logits [n_out, vocab] of the last n_out."""
        t = np.ascontiguousarray(np.asarray(tokens, dtype=np.int32).reshape(-1))
        T = t.shape[0]
        if self.pos + T > self.max_len:
            raise BitlmError(f"sequence of {self.pos + T} tokens exceeds the context length {self.max_len}; "
                             "shorten the prompt or lower max_new_tokens")
        if T and (t.min() < 0 or t.max() >= self.config.vocab_size):
            raise BitlmError(f"token id out of range [0, {self.config.vocab_size})")
        n_out = min(n_out, T)
        out = np.empty((n_out, self.config.vocab_size), dtype=np.float32)
        if T:
            self.n.forward(self._handle, t.ctypes.data, T, self.pos, out.ctypes.data, n_out, 0)
            self.pos += T
        return out

    def hidden(self, tokens) -> np.ndarray:
        """Final-norm hidden states float32 [T, hidden] (advances the cache like forward)."""
        t = np.ascontiguousarray(np.asarray(tokens, dtype=np.int32).reshape(-1))
        out = np.empty((t.shape[0], self.config.hidden_size), dtype=np.float32)
        self.n.forward(self._handle, t.ctypes.data, t.shape[0], self.pos, out.ctypes.data, 0, 1)
        self.pos += t.shape[0]
        return out
