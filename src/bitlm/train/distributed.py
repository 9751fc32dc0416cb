"""Data-parallel set-up: one process per device under torchrun, DDP or FSDP2 (fully_shard), gloo on CPU
and NCCL on GPU. Without torchrun (no WORLD_SIZE, or 1) everything here is a no-op and the same loop runs
in one process.

Every rank draws its own rows of the same global batch (data.Sampler), and the loss of each micro-batch is
scaled so that the gradients DDP averages across ranks are exactly those of the whole global batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import BitlmError

MODES = ("ddp", "fsdp")


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # the process group was created here (and is destroyed here)

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(device: str | None = None) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device not in (None, "auto"):
        from ..gpu import check_device
        check_device(device, "--device")  # a one-line error when it names no device, or CUDA is missing
    use_cuda = torch.cuda.is_available() if device in (None, "auto") else device.startswith("cuda")
    if world <= 1:
        return Dist(device=torch.device("cuda" if use_cuda else "cpu"))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Dist(rank, world, local, torch.device(f"cuda:{local}" if use_cuda else "cpu"), owns)


def wrap(model: torch.nn.Module, d: Dist, mode: str = "ddp") -> torch.nn.Module:
    """The model as trained: itself in one process, else DDP or FSDP2-sharded (per block, then root)."""
    if mode not in MODES:
        raise BitlmError(f"--distributed must be one of {', '.join(MODES)}, got {mode!r}")
    if not d.enabled:
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        return DDP(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard
    for block in model.model.layers:
        fully_shard(block)
    fully_shard(model)
    return model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") and not hasattr(model, "model") else model


def sync_grads(model: torch.nn.Module, enabled: bool):
    """A context in which backward passes do (or, for accumulation, do not) all-reduce gradients."""
    import contextlib
    if enabled or not dist.is_initialized():
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):  # DDP
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        @contextlib.contextmanager
        def fsdp_no_sync():
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)
        return fsdp_no_sync()
    return contextlib.nullcontext()


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (a copy; the identity in one process)."""
    t = t.detach().clone()
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_gather_object(obj) -> list:
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def teardown(d: Dist) -> None:
    if d.owns_group and dist.is_initialized():
        dist.destroy_process_group()
