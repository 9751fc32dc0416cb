"""Finding a Hugging Face checkpoint: a local directory or a hub repo id (downloaded with
huggingface_hub), its config.json and its safetensors files. No torch here: the native runtime
(io/native.py) finds and opens checkpoints without it; io/hf.py reads them into torch models.
"""

from __future__ import annotations

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
        weight_map = read_json_object(index).get("weight_map")
        names = set(weight_map.values()) if isinstance(weight_map, dict) else {None}
        if not names or not all(isinstance(n, str) and n and Path(n).name == n for n in names):
            raise BitlmError(f"{index}: malformed shard index (weight_map must map tensor names to the file "
                             "names of shards in the same directory)")
        files = [path / name for name in sorted(names)]
    elif (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    else:
        raise BitlmError(f"{path}: no model.safetensors (or model.safetensors.index.json) found")
    for f in files:
        if not f.is_file():
            raise BitlmError(f"{f}: missing (listed in the shard index)")
    return files
