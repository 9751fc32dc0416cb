"""The full-precision twin on disk: the BitNet layout and names with float projection weights.

config.json is the BitNet config WITHOUT a quantization_config and with "bitlm_linear": "fp", and
model.safetensors holds every tensor as float (no weight_scale). Load it exactly with
`bitlm.load(dir, linear="fp")`. (A plain `bitlm.load(dir)` reads it as an "online" BitNet checkpoint and
quantizes the projections to ternary at load: post-training quantization of the twin, not the twin.)
It is not a Llama checkpoint: the sub-norms have no place there.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import BitlmError
from ..model import BitNetForCausalLM
from . import names
from .files import atomic_dir_write
from .hf import _FLOAT_DTYPES


def save_fp(model: BitNetForCausalLM, path) -> None:
    """Write a full-precision ('fp') or latent model with float projections, atomically."""
    from safetensors.torch import save_file
    if model.linear_kind == "packed":
        raise BitlmError("save_fp: a packed model has no float projection weights; use save_pretrained")
    cfg = model.config
    store = _FLOAT_DTYPES.get(cfg.torch_dtype, torch.float32)
    hf = cfg.to_hf()
    hf.pop("quantization_config")
    hf["bitlm_linear"] = "fp"
    tensors = {n: p.detach().to(store).contiguous() for n, p in model.named_parameters()
               if not (n == names.LM_HEAD and cfg.tie_word_embeddings)}

    def write(tmp: Path):
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt", "bitlm_format": "fp"})
        if model.tokenizer is not None:
            model.tokenizer.save(tmp)
    atomic_dir_write(Path(path), write)
