"""Random ternary models of any shape (e.g. 2B4T) for benchmarks: no download, built in seconds.

The weights are random but shaped and scaled like a trained BitNet b1.58 model: codes uniform over
{-1, 0, 1}, per-matrix scales near 1, embedding rows of unit RMS, norm weights of one. Speed and memory do
not depend on the values, so these measure what the real checkpoint would.
"""

from __future__ import annotations

import torch

from ..config import BitNetConfig
from ..model import BitNetForCausalLM


def _random_packed_bytes(shape, g: torch.Generator) -> torch.Tensor:
    """uint8 bytes whose four 2-bit fields are each uniform over the codes {0, 1, 2}."""
    digits = torch.tensor([(v // 27) | (v // 9 % 3) << 2 | (v // 3 % 3) << 4 | (v % 3) << 6 for v in range(81)],
                          dtype=torch.uint8)
    return digits[torch.randint(0, 81, shape, generator=g)]


@torch.no_grad()
def random_model(config: BitNetConfig, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> BitNetForCausalLM:
    g = torch.Generator().manual_seed(seed)
    model = BitNetForCausalLM.empty(config, linear="packed")
    for name, t in list(model.named_parameters()) + list(model.state_dict().items()):
        if name.endswith("norm.weight"):
            t.fill_(1.0)
        elif t.dtype == torch.uint8:
            t.copy_(_random_packed_bytes(t.shape, g))
        elif name.endswith("weight_scale"):
            t.copy_(torch.rand(t.shape, generator=g) + 0.5)
        elif t.is_floating_point() and t.dim() == 2:
            t.normal_(0.0, 1.0, generator=g)
    model.to(dtype)
    model.source = {"path": f"random:{seed}", "format": "synthetic"}
    return model
