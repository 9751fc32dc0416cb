"""One validation step for a Hugging Face BitNet checkpoint, shared by every reader of one.

open_checkpoint(dir or hub id) finds the directory, reads config.json, finds the safetensors files, reads
each header (io/st.read_header: a truncated or damaged file is refused there) and checks that every
tensor the config implies is present with the right kind of dtype and the right shape, before a byte
of tensor data is read. The torch loader (io/hf.load), the native converter and loader (io/native) and
`bitlm info` (io/summary) all start here, so a broken checkpoint gets the same one-line error whichever
command reads it.

What only the data can show is checked by each reader as it reads the tensors, with the functions
here: check_ternary_codes (no 2-bit code 3) and check_scale (a finite, positive weight scale);
check_values runs both over a whole checkpoint from its memory-mapped files (`bitlm info`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import BitNetConfig
from ..errors import BitlmError
from ..formats import hf_packed
from . import names, st
from .hub import read_config, resolve, weight_files

FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")  # safetensors dtype names the float tensors may have


def expected_tensors(cfg: BitNetConfig) -> dict[str, tuple[str, tuple[int, ...] | None]]:
    """name -> (kind, shape) of every tensor the config implies. Kinds: "float"; "uint8" (packed 2-bit
    codes [ceil(out/4), in], quantization_mode offline); "scale" (a float holding one value, any shape)."""
    V, H = cfg.vocab_size, cfg.hidden_size
    out: dict[str, tuple[str, tuple[int, ...] | None]] = {names.EMBED: ("float", (V, H)),
                                                          names.FINAL_NORM: ("float", (H,))}
    if not cfg.tie_word_embeddings:
        out[names.LM_HEAD] = ("float", (V, H))
    shapes = cfg.projection_shapes()
    for i in range(cfg.num_hidden_layers):
        for name, size in names.block_norms(cfg).items():
            out[names.layer(i, name) + ".weight"] = ("float", (size,))
        for name, (out_f, in_f) in shapes.items():
            key = names.layer(i, name)
            if cfg.quantization_mode == "offline":
                out[key + ".weight"] = ("uint8", (hf_packed.packed_rows(out_f), in_f))
                out[key + ".weight_scale"] = ("scale", None)
            else:
                out[key + ".weight"] = ("float", (out_f, in_f))
    return out


def check_tensor(f: Path, key: str, dtype, shape, kind: str = "float", expected=None, *, is_float: bool,
                 is_uint8: bool) -> None:
    """A tensor's dtype kind and its shape against `expected` (from config.json; None: any), as one-line
    errors naming the file. Called with the header's dtype name or a loaded tensor's dtype."""
    if kind in ("float", "scale") and not is_float:
        raise BitlmError(f"{f}: tensor {key!r} has dtype {dtype}, expected a float dtype")
    if kind == "uint8" and not is_uint8:
        raise BitlmError(f"{f}: tensor {key!r} has dtype {dtype}, expected uint8 (packed ternary "
                         "weights, quantization_mode offline)")
    if kind == "scale" and int(np.prod(shape, dtype=np.int64)) != 1:
        raise BitlmError(f"{f}: tensor {key!r} has shape {list(shape)}, expected one value (one scale "
                         "per matrix)")
    if expected is not None and tuple(shape) != tuple(expected):
        raise BitlmError(f"{f}: tensor {key!r} has shape {list(shape)}, expected {list(expected)} "
                         "from config.json")


def check_ternary_codes(packed, key: str, f: Path | str = "checkpoint") -> None:
    """Packed 2-bit codes (numpy or torch uint8) hold no code 3, which is not ternary."""
    if bool((packed & (packed >> 1) & 0x55).any()):  # both bits of some 2-bit code set: code 3
        raise BitlmError(f"{f}: tensor {key!r} holds the 2-bit code 3, which is not ternary; the "
                         "file is corrupt or not a BitNet packed checkpoint")


def check_scale(value: float, key: str, f: Path | str = "checkpoint") -> None:
    """A weight scale (the absmean of the latent weights) is finite and positive: a NaN or infinite one
    would turn every output of the matrix into NaN, a zero one would silently zero them."""
    if not (np.isfinite(value) and value > 0):
        raise BitlmError(f"{f}: tensor {key!r} is {float(value)}, expected a finite positive weight scale; "
                         "the file is corrupt")


@dataclass
class Checkpoint:
    """A checkpoint directory whose headers match its config.json (see open_checkpoint)."""

    path: Path
    config: BitNetConfig
    headers: dict[Path, tuple[dict, int]]  # file -> (safetensors header, offset of its data section)
    where: dict[str, Path]                 # tensor name -> the file holding it

    def dtype(self, key: str) -> str:
        return self.headers[self.where[key]][0][key]["dtype"]


def open_checkpoint(path_or_repo_id: str | os.PathLike, revision: str | None = None) -> Checkpoint:
    """The directory (a hub id is downloaded, or found in the local cache), its config and its headers,
    every tensor the config implies checked for presence, dtype kind and shape. Reads no tensor data."""
    path = resolve(path_or_repo_id, revision)
    cfg = read_config(path)
    headers, where = {}, {}
    for f in weight_files(path):
        header, start = st.read_header(f)
        headers[f] = (header, start)
        where.update((k, f) for k in header if k != "__metadata__")
    for key, (kind, shape) in expected_tensors(cfg).items():
        if key not in where:
            raise BitlmError(f"{path}: tensor {key!r} is missing from the weight files; they do not match "
                             "config.json")
        f = where[key]
        entry = headers[f][0][key]
        check_tensor(f, key, entry["dtype"], entry["shape"], kind, shape,
                     is_float=entry["dtype"] in FLOAT_DTYPES, is_uint8=entry["dtype"] == "U8")
    return Checkpoint(path, cfg, headers, where)


def check_values(ck: Checkpoint) -> None:
    """The data checks of a packed checkpoint (codes, scales) over its memory-mapped files, one tensor
    in memory at a time (`bitlm info`; the loaders run the same checks as they read)."""
    if ck.config.quantization_mode != "offline":
        return
    arrays = {f: st.map_arrays(f, header, start) for f, (header, start) in ck.headers.items()}
    for key, (kind, _) in expected_tensors(ck.config).items():
        f = ck.where[key]
        a = arrays[f][key]
        if kind == "uint8":
            check_ternary_codes(a, key, f)
        elif kind == "scale":
            check_scale(scale_value(a, ck.dtype(key)), key, f)


def scale_value(a: np.ndarray, dtype: str) -> np.float32:
    """The one value of a weight_scale array as float32 (BF16 arrives as its uint16 bits)."""
    from ..engine.native import bf16_to_f32
    a = np.asarray(a).reshape(-1)
    return bf16_to_f32(a)[0] if dtype == "BF16" else np.float32(a[0])
