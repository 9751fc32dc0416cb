"""The BitNet b1.58 transformer in one file: RMSNorm, RoPE, attention with a KV cache, sub-norms, the
relu2 (or SwiGLU) feed-forward, blocks and the causal LM.

Module names follow the Hugging Face checkpoint exactly (model.layers.N.self_attn.q_proj, ...), so a
state dict maps one to one. Every q/k/v/o/gate/up/down projection is ternary; the embedding, the norms
and the output head are not. The projections come in three kinds (`linear=`):
    "packed"  PackedBitLinear: 2-bit weights, int8 activations, integer sums (inference)
    "latent"  BitLinear: latent float weights, fake quantization, straight-through gradients (training)
    "fp"      nn.Linear: the full-precision twin of the same architecture (baselines)
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .bitlinear import BitLinear, PackedBitLinear
from .config import BitNetConfig
from .errors import BitlmError

LINEAR_KINDS = ("packed", "latent", "fp")


def make_linear(kind: str, in_features: int, out_features: int) -> nn.Module:
    if kind == "packed":
        return PackedBitLinear(in_features, out_features)
    if kind == "latent":
        return BitLinear(in_features, out_features)
    if kind == "fp":
        return nn.Linear(in_features, out_features, bias=False)
    raise ValueError(f"linear kind must be one of {LINEAR_KINDS}, got {kind!r}")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()  # statistics in float32 whatever the model dtype
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_tables(head_dim: int, theta: float, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin float32 (max_len, head_dim) for Llama's rotate-half RoPE (computed as transformers does)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = torch.arange(max_len, dtype=torch.float32)[:, None] * inv_freq[None, :]  # (L, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (L, hd)
    return emb.cos(), emb.sin()


class Rotary(nn.Module):
    """RoPE tables for positions [0, max_len), Llama's rotate-half convention."""

    def __init__(self, head_dim: int, theta: float, max_len: int):
        super().__init__()
        cos, sin = rope_tables(head_dim, theta, max_len)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, start: int, length: int, dtype: torch.dtype):
        return self.cos[start:start + length].to(dtype), self.sin[start:start + length].to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin  # x (B, nh, T, hd); cos, sin (T, hd)


class KVCache:
    """Preallocated keys and values, (B, n_kv_heads, max_len, head_dim) per layer.

    `length` is the number of positions already written; a forward pass writes positions
    [length, length + T) in every layer and then advances it.
    """

    def __init__(self, config: BitNetConfig, batch_size: int = 1, max_len: int | None = None,
                 dtype: torch.dtype = torch.float32, device=None):
        self.max_len = max_len or config.max_position_embeddings
        shape = (batch_size, config.num_key_value_heads, self.max_len, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        end = self.length + k.shape[2]
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def reset(self) -> None:
        self.length = 0

    def truncate(self, length: int) -> None:
        """Forget positions >= length (for example to reuse a shared prompt prefix)."""
        self.length = min(self.length, length)


class Attention(nn.Module):
    def __init__(self, config: BitNetConfig, linear: str):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        h = config.hidden_size
        self.q_proj = make_linear(linear, h, config.q_size)
        self.k_proj = make_linear(linear, h, config.kv_size)
        self.v_proj = make_linear(linear, h, config.kv_size)
        self.o_proj = make_linear(linear, config.q_size, h)
        self.attn_sub_norm = RMSNorm(config.q_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, cache: KVCache | None, layer: int):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.update(layer, k, v)  # (B, nkv, past + T, hd)
        if T == 1:
            mask, causal = None, False  # one new query sees every cached key
        elif past == 0:
            mask, causal = None, True
        else:  # query i (absolute position past + i) sees keys 0 .. past + i
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            causal = False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           enable_gqa=self.n_kv != self.n_heads)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return self.o_proj(self.attn_sub_norm(y))


class MLP(nn.Module):
    def __init__(self, config: BitNetConfig, linear: str):
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = make_linear(linear, h, i)
        self.up_proj = make_linear(linear, h, i)
        self.down_proj = make_linear(linear, i, h)
        self.ffn_sub_norm = RMSNorm(i, config.rms_norm_eps)
        self.act = config.hidden_act

    def forward(self, x):
        g = self.gate_proj(x)
        g = F.relu(g).square() if self.act == "relu2" else F.silu(g)
        return self.down_proj(self.ffn_sub_norm(g * self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, config: BitNetConfig, linear: str):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, linear)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, linear)

    def forward(self, x, cos, sin, cache, layer):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer)
        return h + self.mlp(self.post_attention_layernorm(h))


class BitNetModel(nn.Module):
    def __init__(self, config: BitNetConfig, linear: str):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([Block(config, linear) for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = Rotary(config.head_dim, config.rope_theta, config.max_position_embeddings)


class BitNetForCausalLM(nn.Module):
    """The causal LM. Call it on token ids (B, T) to get float logits (B, T, vocab).

    `tokenizer` (bitlm.engine.tokenizer.Tokenizer) is set by bitlm.load when the checkpoint has one.
    """

    def __init__(self, config: BitNetConfig, linear: str = "packed"):
        super().__init__()
        if linear not in LINEAR_KINDS:
            raise ValueError(f"linear must be one of {LINEAR_KINDS}, got {linear!r}")
        self.config = config
        self.linear_kind = linear
        self.model = BitNetModel(config, linear)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.tokenizer = None
        self.source = None  # where it was loaded from, and in which on-disk format

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def new_cache(self, batch_size: int = 1, max_len: int | None = None) -> KVCache:
        return KVCache(self.config, batch_size, max_len, dtype=self.dtype, device=self.device)

    def hidden_states(self, input_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Final-norm hidden states (B, T, hidden) for token ids (B, T), appending to `cache` if given."""
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise BitlmError(f"input_ids must be an integer tensor of shape (batch, seq), got "
                             f"{tuple(input_ids.shape)} {input_ids.dtype}")
        B, T = input_ids.shape
        start = cache.length if cache is not None else 0
        limit = min(self.config.max_position_embeddings, cache.max_len if cache is not None else 1 << 62)
        if start + T > limit:
            raise BitlmError(f"sequence of {start + T} tokens exceeds the context length {limit}; "
                             "shorten the prompt or lower max_new_tokens")
        if T and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size):
            raise BitlmError(f"token id out of range [0, {self.config.vocab_size})")
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.model.rotary(start, T, x.dtype)
        for i, block in enumerate(self.model.layers):
            x = block(x, cos, sin, cache, i)
        if cache is not None:
            cache.length += T
        return self.model.norm(x)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                logits_to_keep: int = 0) -> torch.Tensor:
        """Logits (B, T, vocab); with logits_to_keep=n > 0 only those of the last n positions."""
        h = self.hidden_states(input_ids, cache)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        return self.lm_head(h)

    # ---- generation (bitlm.engine.generate) --------------------------------------------------------
    @torch.inference_mode()
    def last_logits(self, ids: list[int], cache: KVCache | None = None, n: int = 1):
        """Float32 numpy logits (n, vocab) of the last n of `ids` (one sequence), appending them to
        `cache`: the step the generation engine takes (n=0 only fills the cache)."""
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        if n == 0:
            self.hidden_states(x, cache)
            return np.zeros((0, self.config.vocab_size), dtype=np.float32)
        return self(x, cache=cache, logits_to_keep=n)[0].float().cpu().numpy()

    def generate(self, prompt, **kwargs) -> str:
        """The text continuation of `prompt` (a string or token ids); options as for engine.generate."""
        from .engine.generate import generate_text
        return generate_text(self, prompt, **kwargs)

    def chat(self, system: str | None = None, **kwargs):
        """A multi-turn ChatSession through the chat template; options as for engine.generate."""
        from .engine.generate import ChatSession
        return ChatSession(self, system=system, **kwargs)

    # ---- conversions between the forms ------------------------------------------------------------
    def ternary_layers(self):
        """(name, module) of every ternary projection."""
        for name, module in self.named_modules():
            if isinstance(module, (BitLinear, PackedBitLinear)) or (
                    isinstance(module, nn.Linear) and name.startswith("model.layers.")):
                yield name, module

    @torch.no_grad()
    def to_packed(self) -> "BitNetForCausalLM":
        """Replace latent BitLinear layers with their packed inference twins, in place."""
        for name, module in list(self.ternary_layers()):
            if isinstance(module, BitLinear):
                self.set_submodule(name, module.to_packed())
            elif not isinstance(module, PackedBitLinear):
                raise BitlmError("to_packed: a full-precision ('fp') model has no ternary weights to pack")
        self.linear_kind = "packed"
        return self

    @torch.no_grad()
    def to_latent(self) -> "BitNetForCausalLM":
        """Replace packed layers with training-form BitLinear layers that quantize back to the same."""
        for name, module in list(self.ternary_layers()):
            if isinstance(module, PackedBitLinear):
                self.set_submodule(name, module.to_latent())
        self.linear_kind = "latent"
        return self

    @classmethod
    def empty(cls, config: BitNetConfig, linear: str = "packed") -> "BitNetForCausalLM":
        """Allocated but uninitialised (no random init work): for loaders that fill every tensor."""
        with torch.device("meta"):
            model = cls(config, linear=linear)
        model.to_empty(device="cpu")
        model.model.rotary = Rotary(config.head_dim, config.rope_theta, config.max_position_embeddings)
        if config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        return model

    def to(self, *args, **kwargs):
        """nn.Module.to, but the ternary scales stay float32 whatever the model dtype."""
        super().to(*args, **kwargs)
        for m in self.modules():
            if isinstance(m, PackedBitLinear):
                m.weight_scale.data = m.weight_scale.data.float()
        return self

    def save_pretrained(self, path) -> None:
        from .io.hf import save_pretrained
        save_pretrained(self, path)
