"""Training checkpoints: everything needed to continue a run exactly, in one file written atomically.

Contents: the model's full state dict (latent weights), the optimizer's (AdamW moments, step counts),
the step reached (which is also the data position: data.Sampler is a function of it), the RNG states
of torch, python and numpy for every rank, the model config and the training config it was made with.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..errors import BitlmError

FORMAT = "bitlm-train-checkpoint-1"
# Config fields that may change between an interrupted run and its resumption without changing the run.
RESUMABLE_CHANGES = {"resume", "stop_at_step", "progress", "plot", "eval_every", "eval_batches",
                     "log_every", "checkpoint_every", "out", "threads", "device", "distributed"}


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(path: Path, state: dict) -> None:
    """torch.save to a temporary file in the same directory, fsync, then os.replace: all or nothing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: Path, model_config: dict, train_config: dict) -> dict:
    """The checkpoint at `path`, refused with a one-line BitlmError if it belongs to another run."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise BitlmError(f"{path}: not a readable bitlm training checkpoint ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise BitlmError(f"{path}: not a bitlm training checkpoint (format {FORMAT})")
    diff = _diff(state["model_config"], model_config)
    if diff:
        raise BitlmError(f"{path}: checkpoint is from another model config ({diff}); "
                         "resume with the same model options or use a fresh --out")
    diff = _diff({k: v for k, v in state["train_config"].items() if k not in RESUMABLE_CHANGES},
                 {k: v for k, v in train_config.items() if k not in RESUMABLE_CHANGES})
    if diff:
        raise BitlmError(f"{path}: checkpoint is from another training config ({diff}); "
                         "resume with the same options or use a fresh --out")
    return state


def _diff(old: dict, new: dict) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"{k}: {old.get(k)!r} in the checkpoint, {new.get(k)!r} now" for k in keys[:3])
