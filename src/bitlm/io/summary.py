"""What a checkpoint holds, read from config.json and the safetensors headers (no tensor is loaded into
memory): the configuration, parameter counts, bytes per component on disk and the on-disk format.
`bitlm info`.

The checkpoint is validated first (io/checkpoint.py: headers against config.json, codes and scales),
as every loader does, so `info` refuses what they refuse.
"""

from __future__ import annotations

import json
import math

from ..config import BitNetConfig
from . import names
from .checkpoint import check_values, open_checkpoint

COMPONENTS = ("ternary weights", "ternary scales", "embedding", "head", "norms", "other")


def component(name: str) -> str:
    if name == names.EMBED:
        return "embedding"
    if name == names.LM_HEAD:
        return "head"
    if name.endswith(".weight_scale"):
        return "ternary scales"
    if name.startswith("model.layers.") and name.removesuffix(".weight").split(".", 3)[-1] in names.PROJECTIONS:
        return "ternary weights"
    if name.endswith("norm.weight"):
        return "norms"
    return "other"


def format_description(cfg: BitNetConfig) -> str:
    if cfg.quantization_mode == "offline":
        scale = "multiplied" if cfg.linear_class == "autobitlinear" else "stored inverted, divided"
        return (f"packed (quantization_mode offline, linear_class {cfg.linear_class}): ternary weights as "
                f"2-bit codes in uint8 [out/4, in], one weight_scale per matrix ({scale})")
    return (f"latent (quantization_mode online, linear_class {cfg.linear_class}): full-precision weights, "
            "quantized to ternary at load")


def describe(path_or_repo_id) -> dict:
    """A JSON-ready summary of a checkpoint directory (or a hub repo id already in the local cache or
    downloadable), or of a GGUF file (io/gguf_read.describe)."""
    from . import gguf_read
    if gguf_read.is_gguf(path_or_repo_id):
        return gguf_read.describe(path_or_repo_id)
    ck = open_checkpoint(path_or_repo_id)
    check_values(ck)  # a checkpoint that the loaders refuse is refused here too
    path, cfg = ck.path, ck.config
    nbytes = dict.fromkeys(COMPONENTS, 0)
    dtypes: dict[str, set[str]] = {c: set() for c in COMPONENTS}
    files, header_bytes, metadata = {}, 0, {}
    for f, (header, _) in ck.headers.items():
        tensors = {k: v for k, v in header.items() if k != "__metadata__"}
        metadata.update(header.get("__metadata__") or {})
        files[f.name] = f.stat().st_size
        data = 0
        for name, t in tensors.items():
            begin, end = t["data_offsets"]
            c = component(name)
            nbytes[c] += end - begin
            dtypes[c].add(str(t.get("dtype")))
            data += end - begin
        header_bytes += files[f.name] - data  # the 8-byte length, the JSON header and any padding
    params = cfg.num_parameters()
    total = sum(files.values())
    return {
        "path": str(path),
        "format": {
            "quantization_mode": cfg.quantization_mode,
            "linear_class": cfg.linear_class,
            "description": format_description(cfg),
            "dtypes": {c: sorted(d) for c, d in dtypes.items() if d},
            "metadata": metadata,
        },
        "config": cfg.to_hf(),
        "parameters": params,
        "bytes": {**nbytes, "headers": header_bytes, "total": total},
        "bits_per_ternary_weight": 8 * nbytes["ternary weights"] / params["ternary"] if params["ternary"] else None,
        "files": files,
    }


def format_summary(info: dict) -> str:
    """The text `bitlm info` prints."""
    cfg, params, nbytes, fmt = info["config"], info["parameters"], info["bytes"], info["format"]
    tied = cfg["tie_word_embeddings"]
    lines = [f"model   {info['path']}", f"format  {fmt['description']}", "", "config"]
    skip = {"architectures", "quantization_config"}
    width = max(len(k) for k in cfg)
    lines += [f"  {k:<{width}}  {json.dumps(v)}" for k, v in cfg.items() if k not in skip]
    lines += ["", "parameters"]
    for k in ("ternary", "embedding", "head", "norms", "total"):
        note = "  (tied: shares the embedding)" if k == "head" and tied else ""
        lines.append(f"  {k:<16} {params[k]:>16,}{note}")
    lines += ["", f"bytes on disk ({', '.join(info['files'])})"]
    for k in (*COMPONENTS, "headers", "total"):
        if k == "other" and not nbytes[k]:
            continue
        note = ", ".join(fmt["dtypes"].get(k, []))
        if k == "ternary weights" and info["bits_per_ternary_weight"] is not None:
            note += f", {info['bits_per_ternary_weight']:.2f} bits per weight"
        if k == "head" and tied:
            note = "tied: not stored"
        lines.append(f"  {k:<16} {nbytes[k]:>16,}  {_human(nbytes[k]):>9}  {note}".rstrip())
    return "\n".join(lines)


def _human(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    e = min(int(math.log(n, 1024)), 4)
    return f"{n / 1024 ** e:.1f} {'BKMGT'[e]}{'i' if e else ''}B"
