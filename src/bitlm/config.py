"""The model configuration: one dataclass, named presets, and the Hugging Face config.json mapping."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .errors import BitlmError

ACTIVATIONS = ("relu2", "silu")
QUANT_MODES = ("online", "offline")
LINEAR_CLASSES = ("autobitlinear", "bitlinear")


@dataclass
class BitNetConfig:
    vocab_size: int = 128256
    hidden_size: int = 2560
    intermediate_size: int = 6912
    num_hidden_layers: int = 30
    num_attention_heads: int = 20
    num_key_value_heads: int | None = 5
    head_dim: int | None = None  # derived: hidden_size // num_attention_heads
    hidden_act: str = "relu2"  # "relu2": relu(gate)^2 * up; "silu": SwiGLU
    max_position_embeddings: int = 4096
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 128000
    eos_token_id: int | list[int] | None = 128001
    pad_token_id: int | None = None
    # How the ternary projections are stored on disk (Hugging Face quantization_config).
    quantization_mode: str = "offline"  # "offline": packed uint8 + weight_scale; "online": latent floats
    linear_class: str = "autobitlinear"  # "bitlinear" stores an inverted weight_scale
    torch_dtype: str = "bfloat16"  # dtype of the non-ternary tensors on disk
    extra: dict = field(default_factory=dict, repr=False)  # unknown config.json keys, written back as-is

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise BitlmError(f"config field {name}: expected a positive integer, got {value!r}")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise BitlmError(
                    f"config: hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                    f"{self.num_attention_heads}; set head_dim explicitly")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.head_dim % 2:
            raise BitlmError(f"config field head_dim: RoPE needs an even head_dim, got {self.head_dim}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise BitlmError(
                f"config: num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads} (grouped-query attention)")
        if self.hidden_act not in ACTIVATIONS:
            raise BitlmError(f"config field hidden_act: {self.hidden_act!r} is not supported; "
                             f"use one of {', '.join(ACTIVATIONS)}")
        if self.quantization_mode not in QUANT_MODES:
            raise BitlmError(f"config quantization_config.quantization_mode: {self.quantization_mode!r} "
                             f"is not supported; use one of {', '.join(QUANT_MODES)}")
        if self.linear_class not in LINEAR_CLASSES:
            raise BitlmError(f"config quantization_config.linear_class: {self.linear_class!r} "
                             f"is not supported; use one of {', '.join(LINEAR_CLASSES)}")
        if self.rope_theta <= 0 or self.rms_norm_eps <= 0:
            raise BitlmError("config: rope_theta and rms_norm_eps must be positive")

    # ---- derived sizes -------------------------------------------------------------------------------
    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]

    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        """(out_features, in_features) of every ternary projection of one block, by HF name."""
        h, i = self.hidden_size, self.intermediate_size
        return {
            "self_attn.q_proj": (self.q_size, h),
            "self_attn.k_proj": (self.kv_size, h),
            "self_attn.v_proj": (self.kv_size, h),
            "self_attn.o_proj": (h, self.q_size),
            "mlp.gate_proj": (i, h),
            "mlp.up_proj": (i, h),
            "mlp.down_proj": (h, i),
        }

    def num_parameters(self) -> dict[str, int]:
        """Parameter counts by component (the tied head shares the embedding's)."""
        ternary = self.num_hidden_layers * sum(o * i for o, i in self.projection_shapes().values())
        norms = self.num_hidden_layers * (2 * self.hidden_size + self.q_size + self.intermediate_size)
        norms += self.hidden_size
        embed = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else embed
        return {"ternary": ternary, "embedding": embed, "head": head, "norms": norms,
                "total": ternary + embed + head + norms}

    # ---- Hugging Face config.json ---------------------------------------------------------------------
    @classmethod
    def from_hf(cls, d: dict, source: str = "config.json") -> "BitNetConfig":
        if d.get("model_type") not in ("bitnet", None):
            raise BitlmError(f"{source}: model_type is {d.get('model_type')!r}, expected 'bitnet'")
        d = dict(d)
        q = d.pop("quantization_config", None)
        kwargs: dict = {}
        if q is None:
            kwargs["quantization_mode"] = "online"  # plain latent weights, quantized at load
        else:
            if not isinstance(q, dict) or q.get("quant_method") != "bitnet":
                raise BitlmError(f"{source}: quantization_config.quant_method must be 'bitnet', got "
                                 f"{q.get('quant_method') if isinstance(q, dict) else q!r}")
            kwargs["quantization_mode"] = q.get("quantization_mode", "offline")
            kwargs["linear_class"] = q.get("linear_class", "bitlinear")
            if q.get("use_rms_norm"):
                raise BitlmError(f"{source}: quantization_config.use_rms_norm=true is not supported "
                                 "(BitNet b1.58 models use explicit sub-norms)")
        rope = d.pop("rope_parameters", None) or d.pop("rope_scaling", None)
        if rope:
            rope_type = rope.get("rope_type", rope.get("type", "default"))
            if rope_type != "default":
                raise BitlmError(f"{source}: rope_type {rope_type!r} is not supported; only 'default'")
            if "rope_theta" in rope:
                kwargs["rope_theta"] = float(rope["rope_theta"])
        if d.get("attention_bias") or d.get("mlp_bias"):
            raise BitlmError(f"{source}: attention_bias/mlp_bias are set, but BitNet b1.58 has no biases")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra", "quantization_mode", "linear_class"}
        extra = {}
        for k, v in d.items():
            if k in names:
                kwargs[k] = v
            elif k not in ("model_type", "attention_bias", "mlp_bias"):
                extra[k] = v
        if "rope_theta" in kwargs:
            kwargs["rope_theta"] = float(kwargs["rope_theta"])
        if "dtype" in extra and "torch_dtype" not in kwargs:
            kwargs["torch_dtype"] = extra.pop("dtype")
        try:
            return cls(**kwargs, extra=extra)
        except BitlmError as e:
            raise BitlmError(f"{source}: {e}") from None
        except TypeError as e:
            raise BitlmError(f"{source}: {e}") from None

    def to_hf(self) -> dict:
        d = dict(self.extra)
        d.update({
            "architectures": ["BitNetForCausalLM"],
            "model_type": "bitnet",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": self.hidden_act,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "attention_bias": False,
            "torch_dtype": self.torch_dtype,
            "quantization_config": {
                "quant_method": "bitnet",
                "linear_class": self.linear_class,
                "quantization_mode": self.quantization_mode,
            },
        })
        return d

    def replace(self, **changes) -> "BitNetConfig":
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, dict] = {
    # microsoft/bitnet-b1.58-2B-4T (REFERENCE.md): 2,412,820,480 parameters.
    "2b4t": dict(),
    # Small shapes for tests, examples and the bundled model.
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                 rope_theta=10000.0, bos_token_id=None, eos_token_id=None),
    "small": dict(vocab_size=8192, hidden_size=256, intermediate_size=688, num_hidden_layers=6,
                  num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
                  rope_theta=10000.0, bos_token_id=None, eos_token_id=None),
}


def preset(name: str, **overrides) -> BitNetConfig:
    if name not in PRESETS:
        raise BitlmError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return BitNetConfig(**{**PRESETS[name], **overrides})
