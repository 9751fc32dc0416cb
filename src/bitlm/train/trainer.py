"""The training loop shared by pre-training, SFT and DPO: AdamW under the two-stage schedules, gradient
accumulation and clipping, the lambda warm-up of quantization, validation, metrics, checkpoints and exact
resume, in one process or data-parallel under torchrun.

A step s uses the global rows [s * batch_size, (s + 1) * batch_size) of data.Sampler; micro-batch m of
rank r takes its `micro` rows at offset (m * world + r) * micro. Each micro-batch's objective (a sum) is
scaled by world / (the global number of units in the step), so the averaged DDP gradient is the gradient
of the global mean whatever the split: one process and N processes compute the same step.
"""

from __future__ import annotations

import json
import math
import random
import signal
import threading
import time
from pathlib import Path

import numpy as np
import torch

from ..bitlinear import BitLinear
from ..config import preset
from ..errors import BitlmError
from ..model import BitNetForCausalLM
from . import checkpoint, distributed
from .config import TrainConfig
from .data import Sampler
from .metrics import MetricsLog, Progress, plot_losses
from .schedule import Schedule
from .tasks import TASKS, make_tokenizer

INIT_STD = 0.02


# ---- the model ------------------------------------------------------------------------------------
def init_weights(model: BitNetForCausalLM, std: float = INIT_STD) -> None:
    """N(0, std) for every matrix (embedding, projections, head); RMSNorm weights stay 1."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, std)


def load_init(path: str, linear: str) -> BitNetForCausalLM:
    """A BitNet (packed or latent) or Llama checkpoint directory, in training form."""
    from ..io.hf import load
    from ..io.hub import resolve
    from ..io.llama import is_llama_dir, load_llama
    p = resolve(path)
    if is_llama_dir(p):
        return load_llama(p, linear=linear)
    return load(p, linear=linear)


def build_model(cfg: TrainConfig, tok, init: BitNetForCausalLM | None) -> BitNetForCausalLM:
    linear = "latent" if cfg.precision == "ternary" else "fp"
    if init is not None:
        if tok.vocab_size > init.config.vocab_size:
            raise BitlmError(f"--tokenizer has {tok.vocab_size} tokens but the --init model only "
                             f"{init.config.vocab_size} embeddings")
        init.config = init.config.replace(torch_dtype=cfg.save_dtype)
        return init
    shape = {k: getattr(cfg, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                          "num_attention_heads", "num_key_value_heads", "hidden_act")
             if getattr(cfg, k) is not None}
    if cfg.context is not None:
        shape["max_position_embeddings"] = cfg.context
    eos = tok.token_to_id(tok.eos_token) if tok.eos_token else None
    config = preset(cfg.preset, **shape, vocab_size=tok.vocab_size, bos_token_id=tok.bos_token_id,
                    eos_token_id=eos, torch_dtype=cfg.save_dtype)
    torch.manual_seed(cfg.seed)
    model = BitNetForCausalLM(config, linear=linear)
    init_weights(model)
    return model


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay on matrices (projections, embedding/head), none on the RMSNorm gains."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    other = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay, "decays": True},
            {"params": other, "weight_decay": 0.0, "decays": False}]


def set_quant_strength(model: torch.nn.Module, strength: float) -> None:
    for m in model.modules():
        if isinstance(m, BitLinear):
            m.quant_strength = strength


# ---- state dicts that work in one process, under DDP and under FSDP2 -------------------------------
def _full_state(model, optimizer):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_state_dict(model, optimizer, options=opts)


def _set_full_state(model, optimizer, msd, osd):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    set_state_dict(model, optimizer, model_state_dict=msd, optim_state_dict=osd,
                   options=StateDictOptions(full_state_dict=True))


# ---- the run --------------------------------------------------------------------------------------
class _Stop:
    """SIGTERM/SIGINT ask the loop to checkpoint at the end of the current step and stop."""

    def __init__(self):
        self.requested = False
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.requested:  # a second signal: stop at once
            raise KeyboardInterrupt
        self.requested = True

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def run(cfg: TrainConfig) -> dict:
    """Train as `cfg` says; returns a summary (steps done, last losses, where things were written)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    d = distributed.setup(cfg.device)
    try:
        return _run(cfg, d)
    finally:
        distributed.teardown(d)


def _run(cfg: TrainConfig, d: distributed.Dist) -> dict:
    out = Path(cfg.out)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
    distributed.barrier()
    ckpt_path = out / "checkpoint.pt"
    if cfg.resume and not ckpt_path.is_file():
        raise BitlmError(f"--resume: no checkpoint at {ckpt_path}")

    linear = "latent" if cfg.precision == "ternary" else "fp"
    init = load_init(cfg.init, linear) if cfg.init else None
    if cfg.task != "pretrain" and init is None:
        raise BitlmError(f"{cfg.task}: pass --init MODEL_DIR, the model to fine-tune")
    tok = make_tokenizer(cfg, out, d.main, init.tokenizer if init is not None else None, distributed.barrier)
    model = build_model(cfg, tok, init)
    model.tokenizer = tok
    context = cfg.context or model.config.max_position_embeddings
    if context > model.config.max_position_embeddings:
        raise BitlmError(f"--context {context} exceeds the model's max_position_embeddings "
                         f"{model.config.max_position_embeddings}")
    task = TASKS[cfg.task](cfg, tok, context, d.main)

    per_rank = cfg.batch_size // (cfg.grad_accum * d.world)
    if per_rank * cfg.grad_accum * d.world != cfg.batch_size:
        raise BitlmError(f"--batch-size {cfg.batch_size} is not a multiple of --grad-accum {cfg.grad_accum} "
                         f"x {d.world} processes")
    steps = cfg.steps or math.ceil((cfg.epochs or 1.0) * task.n_train / cfg.batch_size)
    sched = Schedule.from_config(cfg, steps)

    model.to(d.device)
    amp = resolve_amp(cfg.amp, d.device)
    if cfg.task == "dpo":  # the frozen reference: the starting model
        import copy
        task.reference = copy.deepcopy(model).eval().requires_grad_(False)
        task.reference.tokenizer = None
    trained = distributed.wrap(model, d, cfg.distributed)
    optimizer = torch.optim.AdamW(param_groups(trained, cfg.weight_decay), lr=cfg.lr, betas=cfg.adam_betas)

    model_config = model.config.to_hf() | {"bitlm_linear": linear}
    train_config = cfg.to_dict()
    start = 0
    if cfg.resume:
        state = checkpoint.load(ckpt_path, model_config, train_config)
        _set_full_state(trained, optimizer, state["model"], state["optimizer"])
        rngs = state["rng"]
        checkpoint.set_rng_state(rngs[d.rank] if len(rngs) == d.world else rngs[0])
        start = state["step"]
    else:
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed + d.rank)
    if d.main:
        (out / "train_config.json").write_text(json.dumps(train_config, indent=2) + "\n")

    def save_checkpoint(step: int):
        msd, osd = _full_state(trained, optimizer)
        rngs = distributed.all_gather_object(checkpoint.rng_state())
        if d.main:
            checkpoint.save(ckpt_path, {"step": step, "model": msd, "optimizer": osd, "rng": rngs,
                                        "model_config": model_config, "train_config": train_config,
                                        "data": {"seed": cfg.seed, "rows": task.n_train,
                                                 "position": step * cfg.batch_size}})
        distributed.barrier()

    sampler = Sampler(task.n_train, cfg.seed)
    log = MetricsLog(out / "metrics.jsonl", enabled=d.main, keep_until=start if cfg.resume else None)
    progress = Progress(steps, start, enabled=cfg.progress and d.main)
    stop = _Stop()
    last: dict = {}
    val: dict = {}
    step = start
    try:
        while step < steps:
            t0 = time.perf_counter()
            lam = min(step / cfg.quant_warmup, 1.0) if cfg.quant_warmup > 0 else 1.0
            set_quant_strength(trained, lam)
            lr, wd = sched.lr_at(step), sched.wd_at(step)
            for g in optimizer.param_groups:
                g["lr"] = lr
                g["weight_decay"] = wd if g["decays"] else 0.0
            trained.train()
            micro_batches = []
            for m in range(cfg.grad_accum):
                offset = step * cfg.batch_size + (m * d.world + d.rank) * per_rank
                micro_batches.append(task.train_batch(sampler.rows(offset, per_rank)))
            sums, tokens, gnorm = train_step(trained, optimizer, task, micro_batches, d, cfg.grad_clip, amp)
            step += 1
            stats = task.summarize({k: distributed.all_sum(v) for k, v in sums.items()})
            tokens = int(distributed.all_sum(torch.tensor(tokens)))
            dt = time.perf_counter() - t0
            last = {"step": step, **stats, "lr": lr, "wd": wd, "quant_strength": lam,
                    "grad_norm": float(gnorm), "tokens": tokens, "tok_per_s": tokens / dt}
            if step % cfg.log_every == 0 or step == steps:
                log.write({"split": "train", **last})
            progress.update(last)
            if task.n_val and (step % cfg.eval_every == 0 or step == steps):
                val = evaluate(trained, task, cfg.batch_size, per_rank, cfg.eval_batches, d, amp)
                if val:
                    log.write({"split": "val", "step": step, **val})
                    progress.note(f"step {step}: val loss {val['loss']:.4f}" +
                                  (f", ppl {val['ppl']:.2f}" if "ppl" in val else ""))
            # every rank must agree before the collective save
            signalled = bool(distributed.all_sum(torch.tensor(int(stop.requested))) > 0)
            interrupted = signalled or (cfg.stop_at_step is not None and step >= cfg.stop_at_step)
            if step % cfg.checkpoint_every == 0 or step == steps or interrupted:
                save_checkpoint(step)
            if interrupted and step < steps:
                progress.note(f"stopped after step {step}; continue with --resume")
                return {"steps": step, "finished": False, "train": last, "val": val, "out": str(out)}
    finally:
        progress.close()
        stop.restore()

    model_dir = out / "model"
    _save_final(trained, optimizer, model.config, linear, tok, model_dir, d)
    if d.main and cfg.plot:
        plot_losses(out / "metrics.jsonl", out / "loss.png")
    return {"steps": step, "finished": True, "train": last, "val": val, "out": str(out),
            "model": str(model_dir)}


def resolve_amp(amp: str, device: torch.device) -> str:
    """--amp auto: bf16 on a GPU that has it (the latent BitLinear's matmuls in bfloat16), none on the CPU."""
    if amp != "auto":
        return amp
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "none"


def autocast(device: torch.device, amp: str):
    """Mixed precision for the forward pass: "bf16" runs matmuls in bfloat16 (the float32 latent weights
    and the optimizer state stay float32; the quantization statistics are float32 anyway)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16")


def train_step(trained, optimizer, task, micro_batches: list, d: distributed.Dist, grad_clip: float,
               amp: str = "none"):
    """One optimizer step over this rank's micro-batches: (summed statistics, input tokens, grad norm).

    The objective of each micro-batch is a sum; scaled by world / (units of the whole global batch) its
    DDP-averaged gradient adds up to the gradient of the global mean (or, for sum aggregation, of the sum).
    Gradients are all-reduced only on the last micro-batch.
    """
    units = distributed.all_sum(torch.tensor(sum(task.units(b) for b in micro_batches), dtype=torch.float64))
    scale = d.world / max(float(units), 1.0) if task.mean else float(d.world)
    sums: dict = {}
    tokens = 0
    for m, batch in enumerate(micro_batches):
        batch = _to(batch, d.device)
        with distributed.sync_grads(trained, m == len(micro_batches) - 1):
            with autocast(d.device, amp):
                objective, stats = task.compute(trained, batch)
            (objective * scale).backward()
        for k, v in stats.items():
            sums[k] = sums.get(k, 0.0) + v.detach().double().cpu()
        tokens += task.input_tokens(batch)
    gnorm = torch.nn.utils.clip_grad_norm_(trained.parameters(), grad_clip if grad_clip > 0 else math.inf)
    if hasattr(gnorm, "full_tensor"):  # FSDP2: a DTensor
        gnorm = gnorm.full_tensor()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return sums, tokens, gnorm


def _to(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    return tuple(b.to(device) for b in batch)


@torch.no_grad()
def evaluate(model, task, batch_size: int, per_rank: int, max_batches: int, d: distributed.Dist,
             amp: str = "none") -> dict:
    """Validation statistics over the first max_batches global batches of held-out rows (all of them when
    fewer): the same rows whatever the number of processes. Rank r takes rows r, r + world, ...; every rank
    runs the same number of forward passes (FSDP2 needs that), a rank out of rows re-reads row 0 and
    discards the result."""
    n = min(task.n_val, max_batches * batch_size)
    if n == 0:
        return {}
    rows = list(range(d.rank, n, d.world))
    passes = math.ceil(math.ceil(n / d.world) / per_rank)
    model.eval()
    sums: dict = {}
    for i in range(passes):
        chunk = rows[i * per_rank:(i + 1) * per_rank]
        with autocast(d.device, amp):
            _, stats = task.compute(model, _to(task.val_batch(chunk or [0]), d.device))
        for k, v in stats.items():
            sums[k] = sums.get(k, 0.0) + (v.double().cpu() if chunk else 0.0)
    model.train()
    return task.summarize({k: distributed.all_sum(torch.as_tensor(v, dtype=torch.float64)) for k, v in sums.items()})


def _save_final(trained, optimizer, config, linear: str, tok, model_dir: Path, d) -> None:
    """The trained model: packed HF BitNet format (ternary) or the fp format (io/fp.py), with the
    tokenizer. A fresh CPU model receives the full state dict, whatever the sharding."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    msd = get_model_state_dict(trained, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if d.main:
        final = BitNetForCausalLM(config, linear=linear)
        final.load_state_dict(msd)
        final.tokenizer = tok
        if linear == "latent":
            final.to_packed().save_pretrained(model_dir)
        else:
            from ..io.fp import save_fp
            save_fp(final, model_dir)
    distributed.barrier()
