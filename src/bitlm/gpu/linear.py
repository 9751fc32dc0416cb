"""TritonBitLinear: the packed inference layer with its product done by the Triton kernels.

It is a PackedBitLinear (same buffers, same state-dict names, same to_latent and saving), so everything
that walks a model's ternary layers treats it as one; only forward differs:
    PackedBitLinear   unpacks the 2-bit codes to float32 and multiplies in float (exact integer values)
    TritonBitLinear   keeps the bytes packed and multiplies int8 activations in the kernels (gpu/kernels.py)
Both compute (xq @ Wq^T) * (weight_scale / s) with the same float32 operations.
"""

from __future__ import annotations

import torch

from ..bitlinear import PackedBitLinear


class TritonBitLinear(PackedBitLinear):
    """Packed ternary weights [ceil(out/4), in] multiplied by the Triton kernels: inference only (no
    gradient flows through the kernels, as none flows through PackedBitLinear's quantization)."""

    @classmethod
    def from_packed(cls, layer: PackedBitLinear) -> "TritonBitLinear":
        """A TritonBitLinear sharing `layer`'s buffers (no copy)."""
        new = cls.__new__(cls)
        torch.nn.Module.__init__(new)
        new.in_features, new.out_features = layer.in_features, layer.out_features
        new.register_buffer("weight", layer.weight)
        new.register_buffer("weight_scale", layer.weight_scale)
        new._codes_cache = None
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from .kernels import bitlinear
        lead = x.shape[:-1]  # x (..., in) -> y (..., out) in x's dtype
        y = bitlinear(x.reshape(-1, self.in_features), self.weight, self.weight_scale, self.out_features)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", Triton kernels"


def use_triton(model):
    """Swap every PackedBitLinear of `model` for a TritonBitLinear on the same buffers, in place."""
    for name, module in list(model.named_modules()):
        if isinstance(module, PackedBitLinear) and not isinstance(module, TritonBitLinear):
            model.set_submodule(name, TritonBitLinear.from_packed(module))
    model.kernel = "triton"
    return model
