"""`bitlm convert IN OUT --to FORMAT`: any model format bitlm reads to any it writes.

    format       what OUT is                                              read back by
    hf           packed HF directory (uint8 codes + weight_scale), as     bitlm, transformers
                 microsoft/bitnet-b1.58-2B-4T
    hf-bf16      latent HF directory (bf16 weights, quantized at load),   bitlm (also for training),
                 as microsoft/bitnet-b1.58-2B-4T-bf16                     transformers
    gguf-tq2_0   GGUF "bitnet", TQ2_0 projections + scale tensors          bitlm, llama.cpp (SiLU graph)
    gguf-tq1_0   GGUF "bitnet", TQ1_0                                      bitlm, llama.cpp (SiLU graph)
    gguf-i2_s    GGUF "bitnet-b1.58", I2_S (bitnet.cpp's own type)         bitlm, bitnet.cpp (relu^2 graph)
    native       bitlm's runtime file (io/native.py), projections in       bitlm's native runtime
                 --weights i2v (2 bits a weight) or t5 (1.6)

IN is an HF directory or hub repo id (packed or latent), a .gguf file of any of the three ternary
types, or a native file. Every route goes through one form, the native array dict (engine/native.py)
with the head kept as rows: ternary codes and per-tensor scales cross over exactly, and so do float
tensors except where the output type is lossy (a GGUF --embed-type of f16/bf16 for values they cannot
represent, q8_0, q6_k; hf-bf16 rounds its latent weights to bf16, which moves each layer's scale by up
to one bf16 step). The tokenizer and chat template go along (in GGUF as tokenizer.ggml.* metadata).
Packed checkpoints, GGUF and native files are read without torch (projections made one at a time as
they are written); latent checkpoints and the hf/hf-bf16 outputs go through the torch model.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import BitNetConfig
from ..errors import BitlmError

FORMATS = ("hf", "hf-bf16", "gguf-tq2_0", "gguf-tq1_0", "gguf-i2_s", "native")


@dataclass
class Source:
    config: BitNetConfig
    arrays: dict  # native names; "embed" rows, "head" rows when untied (float32 or bf16 bits)
    tokenizer: object  # engine.tokenizer.Tokenizer or None
    kind: str  # "hf" | "gguf" | "native"
    name: str
    origin: str = ""  # where it was read from


def _warn(msg: str) -> None:
    print(f"bitlm: warning: {msg}", file=sys.stderr)


def detect(src) -> str:
    """"gguf", "native" (a file: by its first bytes and metadata, never by its name) or "hf"."""
    p = Path(src)
    if p.is_file():
        from . import gguf_read, st
        if gguf_read.is_gguf(p):
            return "gguf"
        try:
            header, _ = st.read_header(p)
        except BitlmError:
            raise BitlmError(f"{src}: a file that is neither GGUF nor a bitlm native file; for a Hugging "
                             "Face checkpoint give its directory") from None
        fmt = (header.get("__metadata__") or {}).get("bitlm_format", "")
        if not fmt.startswith("native-"):
            raise BitlmError(f"{src}: a safetensors file without bitlm native metadata; for a Hugging Face "
                             "checkpoint give its directory")
        return "native"
    return "hf"


def read(src, progress: bool = True) -> Source:
    """The model at src in the common form (see the module docstring)."""
    kind = detect(src)
    if kind == "gguf":
        from . import gguf_read
        cfg, arrays, tok = gguf_read.read(src, progress=progress)
        return Source(cfg, arrays, tok, kind, Path(src).stem, str(Path(src).resolve()))
    if kind == "native":
        return _read_native(Path(src))
    from ..engine.native import arrays_from_model, bf16_to_f32, f32_to_bf16
    from .checkpoint import open_checkpoint
    ck = open_checkpoint(src)
    if ck.config.quantization_mode == "offline":  # packed: from the files, without torch, values as stored
        from ..engine.tokenizer import Tokenizer
        from .native import packed_arrays
        arrays, cfg = packed_arrays(ck.path, exact=True)
        return Source(cfg, arrays, Tokenizer.from_dir(ck.path, cfg), kind, Path(ck.path).name, str(ck.path))
    import torch

    from .hf import load
    # float32, whatever the checkpoint's dtype: a bf16 model would round a latent checkpoint's weight
    # scales (mean |W|, computed in float32) to bf16; the values of bf16 tensors are exact in float32
    model = load(ck.path, dtype=torch.float32)
    arrays = arrays_from_model(model, "f32")  # the head as rows
    if model.config.tie_word_embeddings:
        arrays.pop("head")
    if ck.config.torch_dtype == "bfloat16":  # rows stored as bf16 stay bf16 (half the bytes downstream)
        for k in ("embed", "head"):
            if k in arrays and np.array_equal(bf16_to_f32(f32_to_bf16(arrays[k])), arrays[k]):
                arrays[k] = f32_to_bf16(arrays[k])
    return Source(model.config, arrays, model.tokenizer, kind, Path(ck.path).name, str(ck.path))


def _read_native(path: Path) -> Source:
    from . import st
    from ..engine.tokenizer import Tokenizer
    arrays, meta = st.open_arrays(path)
    try:
        cfg = BitNetConfig.from_hf(json.loads(meta["config"]), source=f"{path} (metadata)")
    except (KeyError, json.JSONDecodeError) as e:
        raise BitlmError(f"{path}: metadata has no readable config ({e})") from None
    weights = meta.get("weights", "i2v")
    if weights not in ("i2v", "t5"):
        raise BitlmError(f"{path}: its metadata records weights {weights!r}, not i2v or t5; convert the "
                         "checkpoint again")
    if not cfg.tie_word_embeddings and "head" not in arrays:
        raise BitlmError(f"{path}: its untied head is stored as {meta.get('head')} rows, which cannot be turned "
                         "back into float rows; convert from the original checkpoint instead")
    arrays = {k: v for k, v in arrays.items() if not k.startswith("head.") and (k != "head" or not cfg.tie_word_embeddings)}
    from .native import retarget
    arrays = retarget(arrays, cfg, "i2v", lazy=False, source=weights)  # the common form holds I2V
    tok = None
    if "tokenizer" in meta:  # written by `bitlm convert --to native`
        from tokenizers import Tokenizer as HFTokenizer
        extra = json.loads(meta.get("tokenizer_config", "{}"))
        tok = Tokenizer(HFTokenizer.from_str(meta["tokenizer"]), tokenizer_config=extra.get("tokenizer_config"),
                        generation_config=extra.get("generation_config"), chat_template=extra.get("chat_template"),
                        special_tokens_map=extra.get("special_tokens_map"), eos_token_ids=cfg.eos_token_ids)
    return Source(cfg, arrays, tok, "native", path.stem, str(path.resolve()))


def _tokenizer_metadata(tok) -> dict[str, str]:
    if tok is None:
        return {}
    return {"tokenizer": tok.tok.to_str(),
            "tokenizer_config": json.dumps({"tokenizer_config": tok.tokenizer_config,
                                            "generation_config": tok.generation_config,
                                            "chat_template": tok.chat_template,
                                            "special_tokens_map": tok.special_tokens_map})}


def _torch_model(s: Source):
    import torch

    from .native import to_torch
    # float32: a bf16 torch model would round the weight scales to bf16 (BitNetForCausalLM.to); the
    # writers store each tensor in config.torch_dtype themselves
    model = to_torch(s.arrays, s.config, torch.float32)
    model.tokenizer = s.tokenizer
    return model


def write(s: Source, dest, to: str, embed_type: str = "f16", head: str = "q8", progress: bool = True,
          weights: str = "i2v") -> Path:
    """Write the model in format `to` at dest, atomically (a failure leaves nothing at dest); `weights`,
    the native file's ternary weight format (engine/native.py WEIGHTS; checked by convert)."""
    from .progress import Progress
    dest = Path(dest)
    if to.startswith("gguf-"):
        from .gguf import check_exportable, write_gguf
        check_exportable(s.config, to.removeprefix("gguf-"), embed_type)
        with Progress(s.config.num_hidden_layers * 7, f"writing {dest.name}", enabled=progress) as bar:
            return write_gguf(dest, s.config, s.arrays, s.tokenizer, to.removeprefix("gguf-"), embed_type,
                              name=s.name, progress=bar, warn=_warn)
    if to == "native":
        from ..engine.native import head_arrays
        from . import st
        from .native import retarget, save, weights_entry
        arrays = {k: v for k, v in s.arrays.items() if k != "head"}
        rows = s.arrays["embed"] if s.config.tie_word_embeddings else s.arrays["head"]
        arrays.update(head_arrays(rows, head))
        source = {"converted_from": s.origin, "head": head, **weights_entry(weights)}
        save(retarget(arrays, s.config, weights), s.config, dest, head, source,
             extra=_tokenizer_metadata(s.tokenizer), weights=weights)
        st.release_page_cache(dest)  # its first load maps it in 2 MB folios (st.advise_huge_pages)
        return dest
    if to == "hf":
        _torch_model(s).save_pretrained(dest)
        return dest
    if to == "hf-bf16":
        from .hf import save_latent
        save_latent(_torch_model(s).to_latent(), dest)
        return dest
    raise BitlmError(f"--to {to!r} is not one of {', '.join(FORMATS)}")


def convert(src, dest, to: str, embed_type: str = "f16", head: str = "q8", progress: bool = True,
            weights: str = "i2v") -> Path:
    from ..engine.native import resolve_weights
    if to not in FORMATS:
        raise BitlmError(f"--to {to!r} is not one of {', '.join(FORMATS)}")
    if weights == "auto" and to != "native":
        weights = "i2v"  # the CLI's default: only a native file has a weight format
    weights = resolve_weights(weights)
    if weights != "i2v" and to != "native":
        raise BitlmError(f"--weights {weights} is the native file's weight format; it has no meaning for --to {to}")
    if Path(src).exists() and Path(dest).resolve() == Path(src).resolve():
        raise BitlmError(f"{dest}: the output would replace the input; choose another path")
    return write(read(src, progress), dest, to, embed_type, head, progress, weights)
