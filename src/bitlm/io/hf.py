"""Hugging Face checkpoints in and out: config.json + model.safetensors (+ tokenizer files).

Two on-disk formats of the ternary projections (quantization_config.quantization_mode):
    offline  packed uint8 [ceil(out/4), in] + weight_scale (1,)   (microsoft/bitnet-b1.58-2B-4T)
    online   latent float [out, in], quantized here at load        (microsoft/bitnet-b1.58-2B-4T-bf16)
linear_class "autobitlinear" multiplies weight_scale into the output; the older "bitlinear" stores its
reciprocal. The format a file holds is read from its config, never guessed from tensor shapes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..bitlinear import BitLinear, PackedBitLinear
from ..config import BitNetConfig
from ..errors import BitlmError
from ..formats import hf_packed
from ..model import BitNetForCausalLM
from . import names
from .files import atomic_dir_write
from .checkpoint import check_scale, check_tensor, check_ternary_codes, open_checkpoint
from .hub import weight_files

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja")
_FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---- reading tensors -------------------------------------------------------------------------------
class _Tensors:
    """Tensors of one checkpoint (model.safetensors or shards listed in model.safetensors.index.json)."""

    def __init__(self, path: Path):
        from safetensors import safe_open
        self.where: dict[str, Path] = {}
        self.handles = {}
        for f in weight_files(path):
            try:
                h = safe_open(str(f), framework="pt")
                keys = list(h.keys())
            except Exception as e:
                raise BitlmError(f"{f}: not a readable safetensors file ({str(e)[:120]}); "
                                 "it may be truncated: download or save it again") from None
            self.handles[f] = h
            for k in keys:
                self.where[k] = f

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def get(self, key: str, shape: tuple[int, ...] | None = None, kind: str = "float") -> torch.Tensor:
        if key not in self.where:
            raise BitlmError(f"checkpoint: tensor {key!r} is missing; the files do not match config.json")
        f = self.where[key]
        try:
            t = self.handles[f].get_tensor(key)
        except Exception as e:
            raise BitlmError(f"{f}: tensor {key!r} could not be read ({str(e)[:120]}); "
                             "the file may be truncated") from None
        check_tensor(f, key, t.dtype, t.shape, kind, shape, is_float=t.is_floating_point(),
                     is_uint8=t.dtype == torch.uint8)
        return t


def _fill_projection(module, t: _Tensors, prefix: str, out_f: int, in_f: int, cfg: BitNetConfig):
    if cfg.quantization_mode == "offline":
        packed = t.get(prefix + ".weight", (hf_packed.packed_rows(out_f), in_f), kind="uint8")
        scale = t.get(prefix + ".weight_scale", kind="scale").float().reshape(-1)
        check_scale(float(scale[0]), prefix + ".weight_scale", t.where[prefix + ".weight_scale"])
        if cfg.linear_class == "bitlinear":
            scale = 1.0 / scale  # the older class stores the reciprocal and divides
        check_ternary_codes(packed, prefix + ".weight", t.where[prefix + ".weight"])
        src = PackedBitLinear(in_f, out_f)
        src.weight.copy_(packed)
        src.weight_scale.copy_(scale)
        if isinstance(module, PackedBitLinear):
            module.weight.copy_(src.weight)
            module.weight_scale.copy_(src.weight_scale)
        else:  # latent (training) or fp twin: start from codes * scale
            module.weight.copy_(src.to_latent().weight)
    else:
        w = t.get(prefix + ".weight", (out_f, in_f), kind="float")
        if isinstance(module, PackedBitLinear):
            q = BitLinear(in_f, out_f)
            q.weight.data = w.float()
            p = q.to_packed()
            module.weight.copy_(p.weight)
            module.weight_scale.copy_(p.weight_scale)
        else:
            module.weight.copy_(w)


def load(path_or_repo_id, dtype: torch.dtype = torch.float32, linear: str = "packed",
         revision: str | None = None, tokenizer: bool = True, device="cpu",
         kernel: str = "auto") -> BitNetForCausalLM:
    """Load a BitNet b1.58 checkpoint (packed or latent) from a directory or a hub repo id.

    linear="packed" gives the inference form; "latent" the training form (latent weights that quantize
    to the checkpoint's codes); "fp" the full-precision twin initialised from the same weights.
    device: "cpu" (default) or "cuda[:N]"; on a GPU the packed weights stay packed in GPU memory.
    kernel: the packed products' implementation (bitlm.gpu): "auto" (Triton on a GPU, torch on the
    CPU), "torch" (unpack to float), or "triton" (on the CPU only under TRITON_INTERPRET=1: tests).
    A GGUF file (recognised by its first bytes) is read by io/gguf_read.py.
    """
    from .. import gpu
    from . import gguf_read
    dev = gpu.check_device(device, "device")  # before reading anything: a missing GPU fails at once
    kernel = gpu.resolve_kernel(dev, kernel, linear, "device")
    if gguf_read.is_gguf(path_or_repo_id):
        model = gguf_read.load_torch(path_or_repo_id, dtype, tokenizer=tokenizer)
        model = model if linear == "packed" else _relinear(model, linear)
        if dev.type != "cpu":
            model.to(dev)
        if kernel == "triton":
            from ..gpu.linear import use_triton
            use_triton(model)
        return model
    ck = open_checkpoint(path_or_repo_id, revision)
    path, cfg = ck.path, ck.config
    t = _Tensors(path)
    model = BitNetForCausalLM.empty(cfg, linear=linear)
    with torch.no_grad():
        V, H = cfg.vocab_size, cfg.hidden_size
        emb = model.model.embed_tokens
        emb.weight.copy_(t.get(names.EMBED, (V, H)))
        if not cfg.tie_word_embeddings:
            model.lm_head.weight.copy_(t.get(names.LM_HEAD, (V, H)))
        model.model.norm.weight.copy_(t.get(names.FINAL_NORM, (H,)))
        for i, block in enumerate(model.model.layers):
            for name, size in names.block_norms(cfg).items():
                block.get_submodule(name).weight.copy_(t.get(names.layer(i, name) + ".weight", (size,)))
            for name, (out_f, in_f) in cfg.projection_shapes().items():
                _fill_projection(block.get_submodule(name), t, names.layer(i, name), out_f, in_f, cfg)
    model.to(dtype)
    if dev.type != "cpu":
        model.to(dev)
    if kernel == "triton":
        from ..gpu.linear import use_triton
        use_triton(model)
    model.source = {"path": str(path), "format": cfg.quantization_mode}
    if tokenizer:
        from ..engine.tokenizer import Tokenizer
        model.tokenizer = Tokenizer.from_dir(path, cfg)
    return model


def _relinear(model: BitNetForCausalLM, linear: str) -> BitNetForCausalLM:
    if linear == "latent":
        return model.to_latent()
    raise BitlmError(f"load: linear={linear!r} is not available for a GGUF file (use 'packed' or 'latent')")


# ---- writing --------------------------------------------------------------------------------------
def save_pretrained(model: BitNetForCausalLM, path) -> None:
    """Write the Hugging Face packed format (quantization_mode offline), atomically.

    Non-ternary tensors are stored in config.torch_dtype; ternary projections as packed uint8 plus a
    weight_scale of shape (1,). The directory appears complete or not at all.
    """
    from safetensors.torch import save_file
    if model.linear_kind == "fp":
        raise BitlmError("save_pretrained: a full-precision ('fp') model has no ternary weights; "
                         "the BitNet packed format cannot hold it")
    cfg = model.config.replace(quantization_mode="offline", linear_class="autobitlinear")
    store = _FLOAT_DTYPES.get(cfg.torch_dtype)
    if store is None:
        raise BitlmError(f"save_pretrained: config torch_dtype {cfg.torch_dtype!r} is not one of "
                         f"{', '.join(_FLOAT_DTYPES)}")
    tensors: dict[str, torch.Tensor] = {}
    ternary = dict(model.ternary_layers())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == names.LM_HEAD and cfg.tie_word_embeddings:
                continue
            if name.removesuffix(".weight") not in ternary:
                tensors[name] = p.detach().to(store).contiguous()
        for prefix, module in ternary.items():
            packed = module if isinstance(module, PackedBitLinear) else module.to_packed()
            tensors[prefix + ".weight"] = packed.weight.contiguous()
            tensors[prefix + ".weight_scale"] = packed.weight_scale.detach().float().reshape(1).clone()
    dest = Path(path)
    atomic_dir_write(dest, lambda tmp: _write_files(tmp, cfg, tensors, model, save_file))


def save_latent(model: BitNetForCausalLM, path, dtype: str = "bfloat16") -> None:
    """Write the Hugging Face latent format (quantization_mode online, as
    microsoft/bitnet-b1.58-2B-4T-bf16), atomically: every weight in `dtype`, the projections as latent
    floats that load() quantizes on the fly; loadable for training (linear="latent").

    From a packed model, PackedBitLinear.to_latent's weights (codes * scale / mean|codes|) come back
    as the same codes; their scale moves by the rounding of the weights to bf16 (at most one bf16
    step, about 0.4%).
    """
    from safetensors.torch import save_file
    if model.linear_kind != "latent":
        raise BitlmError("save_latent: convert the model to its latent form first (model.to_latent())")
    store = _FLOAT_DTYPES.get(dtype)
    if store is None:
        raise BitlmError(f"save_latent: dtype {dtype!r} is not one of {', '.join(_FLOAT_DTYPES)}")
    cfg = model.config.replace(quantization_mode="online", linear_class="autobitlinear", torch_dtype=dtype)
    with torch.no_grad():
        tensors = {name: p.detach().to(store).contiguous() for name, p in model.named_parameters()
                   if not (name == names.LM_HEAD and cfg.tie_word_embeddings)}
    atomic_dir_write(Path(path), lambda tmp: _write_files(tmp, cfg, tensors, model, save_file, "hf-latent"))


def _write_files(tmp: Path, cfg: BitNetConfig, tensors, model, save_file, fmt: str = "hf-packed") -> None:
    (tmp / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2) + "\n")
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt", "bitlm_format": fmt})
    if model.tokenizer is not None:
        model.tokenizer.save(tmp)
