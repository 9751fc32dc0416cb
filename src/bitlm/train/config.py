"""The configuration of a training run: one dataclass, filled from defaults, then a YAML or TOML file,
then command-line flags (each later source wins). Keys in a file are the field names below (dashes or
underscores)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BitlmError

TASKS = ("pretrain", "sft", "dpo")


@dataclass
class TrainConfig:
    task: str = "pretrain"
    data: list[str] = field(default_factory=list)  # files, directories or globs (.txt, .jsonl)
    val_data: list[str] | None = None  # sft/dpo: a held-out set; pretrain holds out val_fraction instead
    text_field: str = "text"
    out: str = "runs/bitlm"
    tokenizer: str | None = None  # tokenizer.json, its directory, or bpe:N; default bpe:8192 / the init model's
    init: str | None = None  # a BitNet or Llama model directory to start from (None: from scratch)
    # model shape (from scratch): a preset and overrides
    preset: str = "tiny"
    hidden_size: int | None = None
    intermediate_size: int | None = None
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    hidden_act: str | None = None
    context: int | None = None  # training sequence length (max_position_embeddings from scratch)
    precision: str = "ternary"  # "ternary" (BitLinear, 1.58-bit) or "fp" (the full-precision twin)
    # optimisation
    steps: int | None = None
    epochs: float | None = None  # sft/dpo: steps = ceil(epochs * examples / batch_size) when steps is unset
    batch_size: int = 16  # global: sequences per optimizer step, over all ranks and accumulation
    grad_accum: int = 1
    lr: float = 1.5e-3
    lr_stage1_end: float = 8e-4
    lr_stage2: float = 5e-4
    lr_final: float = 0.0
    warmup_steps: int = 0
    stage1_fraction: float = 0.5
    weight_decay: float = 0.1
    adam_betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    quant_warmup: int = 0  # lambda = min(step / quant_warmup, 1) ramps quantization in (fine-tuning)
    loss_aggregation: str = "sum"  # sft: "sum" (REFERENCE.md: helps BitNet SFT) or "mean" over assistant tokens
    beta: float = 0.1  # dpo
    # evaluation, logging, checkpoints
    val_fraction: float = 0.05
    eval_every: int = 100
    eval_batches: int = 20
    log_every: int = 1
    checkpoint_every: int = 500
    resume: bool = False
    stop_at_step: int | None = None  # stop (with a checkpoint) after this many steps, as if interrupted
    save_dtype: str = "float32"  # dtype of the non-ternary tensors in the final model
    progress: bool = True
    plot: bool = True
    seed: int = 0
    distributed: str = "ddp"  # under torchrun: "ddp" or "fsdp" (FSDP2 fully_shard)
    device: str = "auto"
    amp: str = "auto"  # "bf16": autocast the forward pass to bfloat16; "auto": bf16 on a GPU, none on the CPU
    threads: int | None = None  # torch CPU threads (None: torch's default)

    def __post_init__(self):
        if isinstance(self.data, str):
            self.data = [self.data]
        if isinstance(self.val_data, str):
            self.val_data = [self.val_data]
        self.adam_betas = tuple(float(b) for b in self.adam_betas)
        if self.task not in TASKS:
            raise BitlmError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.precision not in ("ternary", "fp"):
            raise BitlmError(f"--precision must be 'ternary' or 'fp', got {self.precision!r}")
        if self.loss_aggregation not in ("sum", "mean"):
            raise BitlmError(f"--loss-aggregation must be 'sum' or 'mean', got {self.loss_aggregation!r}")
        if self.amp not in ("auto", "none", "bf16"):
            raise BitlmError(f"--amp must be 'auto', 'none' or 'bf16', got {self.amp!r}")
        if self.save_dtype not in ("float32", "bfloat16", "float16"):
            raise BitlmError(f"--save-dtype must be float32, bfloat16 or float16, got {self.save_dtype!r}")
        for name in ("batch_size", "grad_accum", "eval_every", "eval_batches", "log_every", "checkpoint_every"):
            if getattr(self, name) <= 0:
                raise BitlmError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if not 0 <= self.val_fraction < 1:
            raise BitlmError(f"--val-fraction must lie in [0, 1), got {self.val_fraction}")
        if not self.data:
            raise BitlmError("no training data: pass --data FILE (or data: in the config file)")

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))


def read_config_file(path) -> dict:
    """A flat mapping of TrainConfig fields from a .yaml/.yml or .toml file."""
    p = Path(path)
    if not p.is_file():
        raise BitlmError(f"{p}: no such config file")
    try:
        if p.suffix == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                try:
                    import tomli as tomllib
                except ImportError:
                    raise BitlmError(f"{p}: reading TOML needs Python 3.11+ or `pip install tomli`; "
                                     "or use a .yaml config") from None
            d = tomllib.loads(p.read_text())
        elif p.suffix in (".yaml", ".yml"):
            import yaml
            d = yaml.safe_load(p.read_text()) or {}
        else:
            raise BitlmError(f"{p}: config files must be .yaml, .yml or .toml")
    except BitlmError:
        raise
    except Exception as e:  # yaml.YAMLError, tomllib.TOMLDecodeError
        raise BitlmError(f"{p}: not a valid {p.suffix[1:]} file ({str(e).splitlines()[0][:160]})") from None
    if not isinstance(d, dict):
        raise BitlmError(f"{p}: expected a mapping of option names to values")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    out = {}
    for k, v in d.items():
        key = str(k).replace("-", "_")
        if key not in known:
            raise BitlmError(f"{p}: unknown option {k!r}")
        out[key] = v
    return out


def make_config(file: str | None = None, **flags) -> TrainConfig:
    """Defaults < config file < flags (flags that are None are unset)."""
    values = read_config_file(file) if file else {}
    values.update({k: v for k, v in flags.items() if v is not None})
    try:
        return TrainConfig(**values)
    except TypeError as e:
        raise BitlmError(f"training config: {e}") from None
