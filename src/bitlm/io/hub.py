"""Finding a Hugging Face checkpoint: a local directory or a hub repo id (downloaded with
huggingface_hub), its config.json and its safetensors files. No torch here: the native runtime
(io/native.py) finds and opens checkpoints without it; io/hf.py reads them into torch models.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ..config import BitNetConfig
from ..errors import BitlmError
from .files import read_json_object

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve(path_or_repo_id: str | os.PathLike, revision: str | None = None) -> Path:
    """A local model directory, downloading a hub repo id with huggingface_hub when needed."""
    p = Path(path_or_repo_id).expanduser()
    if p.is_dir():
        return p
    s = str(path_or_repo_id)
    if p.exists():
        raise BitlmError(f"{s}: is a file; pass the model directory that holds config.json")
    if not _REPO_ID.match(s):
        raise BitlmError(f"{s}: no such model directory (and not a Hugging Face repo id like "
                         "microsoft/bitnet-b1.58-2B-4T)")
    import huggingface_hub
    patterns = ["*.json", "*.safetensors", "*.jinja"]
    try:  # the local cache first: works offline
        return Path(huggingface_hub.snapshot_download(s, revision=revision, allow_patterns=patterns,
                                                      local_files_only=True))
    except Exception:
        pass
    try:
        return Path(huggingface_hub.snapshot_download(s, revision=revision, allow_patterns=patterns))
    except Exception as e:
        if huggingface_hub.is_offline_mode():
            reason = "HF_HUB_OFFLINE is set and it is not in the local cache"
        else:  # the first sentence of the hub's message
            first = (str(e).strip().splitlines() or [""])[0].split(". ")[0]
            reason = f"{type(e).__name__}: {first[:160]}" if first else type(e).__name__
        raise BitlmError(
            f"could not download {s!r} from the Hugging Face hub ({reason}); download it on a connected "
            f"machine (hf download {s} --local-dir DIR) and pass the local directory instead "
            "(-m DIR, or bitlm.load(DIR))") from None


def read_config(path: Path) -> BitNetConfig:
    f = path / "config.json"
    if not f.is_file():
        raise BitlmError(f"{f}: missing; a model directory needs config.json")
    return BitNetConfig.from_hf(read_json_object(f), source=str(f))


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint: model.safetensors, or the shards its index lists."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise BitlmError(f"{index}: malformed shard index ({e})") from None
        files = [path / name for name in sorted(set(weight_map.values()))]
    elif (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    else:
        raise BitlmError(f"{path}: no model.safetensors (or model.safetensors.index.json) found")
    for f in files:
        if not f.is_file():
            raise BitlmError(f"{f}: missing (listed in the shard index)")
    return files


def check_tensor(f: Path, key: str, dtype, shape, kind: str = "float", expected=None, *, is_float: bool,
                 is_uint8: bool) -> None:
    """A checkpoint tensor's dtype kind ("float", or "uint8" for packed ternary weights) and its shape
    against `expected` (from config.json; None: any), as one-line errors naming the file."""
    if kind == "float" and not is_float:
        raise BitlmError(f"{f}: tensor {key!r} has dtype {dtype}, expected a float dtype")
    if kind == "uint8" and not is_uint8:
        raise BitlmError(f"{f}: tensor {key!r} has dtype {dtype}, expected uint8 (packed ternary "
                         "weights, quantization_mode offline)")
    if expected is not None and tuple(shape) != tuple(expected):
        raise BitlmError(f"{f}: tensor {key!r} has shape {list(shape)}, expected {list(expected)} "
                         "from config.json")


def check_ternary_codes(packed, key: str) -> None:
    """Packed 2-bit codes (numpy or torch uint8) hold no code 3, which is not ternary."""
    if bool((packed & (packed >> 1) & 0x55).any()):  # both bits of some 2-bit code set: code 3
        raise BitlmError(f"checkpoint: tensor {key!r} holds the 2-bit code 3, which is not ternary; the "
                         "file is corrupt or not a BitNet packed checkpoint")
