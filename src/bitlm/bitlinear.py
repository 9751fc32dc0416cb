"""BitLinear in its two forms.

BitLinear        training form: latent float weights; the forward fake-quantizes weights (absmean
                 ternary) and activations (per-token int8) with straight-through gradients.
PackedBitLinear  inference form: 2-bit packed ternary weights (the Hugging Face layout) plus one scale;
                 activations are quantized to int8, the product is an exact integer sum, then one rescale.

The two compute the same numbers up to the float rounding of the final rescale; `BitLinear.to_packed()`
and `PackedBitLinear.to_latent()` switch between them (prepare for training / convert for inference).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import quant
from .formats import hf_packed

# A float32 GEMM of integer-valued operands is exact while every partial sum stays below 2**24:
# |sum| <= 128 * K, so K <= 2**17 keeps the reference path bit-exact.
_EXACT_F32_K = 2**24 // 128


class BitLinear(nn.Linear):
    """nn.Linear whose forward sees ternary weights and int8 activations (training form).

    `quant_strength` in [0, 1] ramps quantization in (the lambda warm-up for fine-tuning a full-precision
    model): 1 is plain BitNet b1.58, 0 is an ordinary linear layer.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None, dtype=None):
        if bias:
            raise ValueError("BitLinear: BitNet b1.58 has no biases")
        super().__init__(in_features, out_features, bias=False, device=device, dtype=dtype)
        self.quant_strength = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lam = self.quant_strength
        return F.linear(quant.ste_activations(x, lam), quant.ste_weights(self.weight, lam))

    @torch.no_grad()
    def to_packed(self) -> "PackedBitLinear":
        codes, scale = quant.quantize_weights(self.weight)
        return PackedBitLinear.from_codes(codes, scale)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, ternary (latent)"


class PackedBitLinear(nn.Module):
    """Packed ternary weights, int8 activations, exact integer accumulation (inference form).

    Buffers carry the Hugging Face names so that a packed checkpoint loads with load_state_dict:
      weight        uint8 [ceil(out/4), in]   (formats/hf_packed.py)
      weight_scale  float32 [1]               multiplied into the output (about mean|W|)
    """

    def __init__(self, in_features: int, out_features: int, device=None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        rows = hf_packed.packed_rows(out_features)
        self.register_buffer("weight", torch.zeros(rows, in_features, dtype=torch.uint8, device=device))
        self.register_buffer("weight_scale", torch.ones(1, dtype=torch.float32, device=device))
        self._codes_cache: torch.Tensor | None = None  # optional float32 [out, in] unpacked codes

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor | float) -> "PackedBitLinear":
        out_features, in_features = codes.shape
        layer = cls(in_features, out_features, device=codes.device)
        layer.weight.copy_(torch.from_numpy(hf_packed.pack(codes.cpu().numpy())))
        layer.weight_scale.fill_(float(scale))
        return layer

    def codes(self, dtype=torch.int8) -> torch.Tensor:
        """The ternary codes [out, in] in {-1, 0, 1}."""
        return hf_packed.unpack_torch(self.weight, self.out_features, dtype=dtype)

    def cache_codes(self, enabled: bool = True) -> None:
        """Keep the unpacked codes as float32 (4 bytes per weight) to skip unpacking on every call."""
        self._codes_cache = self.codes(torch.float32) if enabled else None

    def int_matmul(self, xq: torch.Tensor) -> torch.Tensor:
        """Exact integer sums xq @ Wq^T for int8 xq [M, in]; returned as float32 [M, out] (exact)."""
        w = self._codes_cache if self._codes_cache is not None else self.codes(torch.float32)
        if self.in_features <= _EXACT_F32_K:
            return xq.float() @ w.t()
        return (xq.double() @ w.double().t()).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq, s = quant.quantize_activations(x)  # int8 [..., in], float32 [..., 1]
        lead = x.shape[:-1]
        acc = self.int_matmul(xq.reshape(-1, self.in_features)).reshape(*lead, self.out_features)
        return (acc * (self.weight_scale / s)).to(x.dtype)  # one rescale per output

    @torch.no_grad()
    def to_latent(self) -> BitLinear:
        """A training-form layer that quantizes back to these very codes and this scale.

        Latent weights codes * scale / f, with f = mean|codes|: their absmean is the scale, and
        |code| / f >= 1 rounds back to the same code.
        """
        layer = BitLinear(self.in_features, self.out_features, device=self.weight.device)
        codes = self.codes(torch.float32)
        f = codes.abs().mean().clamp(min=1.0 / codes.numel())
        layer.weight.copy_(codes * (self.weight_scale.float() / f))
        return layer

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, ternary (packed 2-bit)"
