"""The two-stage schedules of BitNet b1.58 pre-training (REFERENCE.md, "Training recipe").

Learning rate, for steps s = 0 .. total-1 with stage one ending at s1 = round(stage1_fraction * total):
    warm-up      s < warmup:        lr * (s + 1) / warmup                      (linear, from near 0)
    stage one    warmup <= s < s1:  cosine from lr down to lr_stage1_end       (the high rate)
    stage two    s1 <= s:           linear from lr_stage2 down to lr_final     (the cooldown)
The 2B4T figures quoted in REFERENCE.md are lr 1.5e-3 -> 8e-4, then 5e-4 -> 0: the defaults here.

Weight decay: a cosine over stage one that peaks at `weight_decay` (0.1) when stage one starts and falls
to 0 at its end, then 0 for all of stage two (the cooldown trains without decay).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..errors import BitlmError


@dataclass
class Schedule:
    total_steps: int
    lr: float
    lr_stage1_end: float
    lr_stage2: float
    lr_final: float
    warmup_steps: int
    stage1_fraction: float
    weight_decay: float  # the peak; the defaults of all these live in train.config.TrainConfig

    @classmethod
    def from_config(cls, cfg, total_steps: int) -> "Schedule":
        names = [f.name for f in dataclasses.fields(cls) if f.name != "total_steps"]
        return cls(total_steps, **{n: getattr(cfg, n) for n in names})

    def __post_init__(self):
        if self.total_steps <= 0:
            raise BitlmError(f"schedule: the run has {self.total_steps} steps; it needs at least one")
        if not 0.0 <= self.stage1_fraction <= 1.0:
            raise BitlmError(f"--stage1-fraction must lie in [0, 1], got {self.stage1_fraction}")
        if self.warmup_steps < 0 or min(self.lr, self.lr_stage1_end, self.lr_stage2, self.lr_final) < 0:
            raise BitlmError("schedule: learning rates and warm-up steps must not be negative")

    @property
    def stage1_end(self) -> int:
        return round(self.stage1_fraction * self.total_steps)

    def lr_at(self, step: int) -> float:
        s1 = self.stage1_end
        if step < self.warmup_steps and step < s1:
            return self.lr * (step + 1) / self.warmup_steps
        if step < s1:
            span = max(s1 - self.warmup_steps, 1)
            t = (step - self.warmup_steps) / span
            return self.lr_stage1_end + (self.lr - self.lr_stage1_end) * 0.5 * (1 + math.cos(math.pi * t))
        span = max(self.total_steps - s1, 1)
        t = (step - s1) / span
        return self.lr_stage2 + (self.lr_final - self.lr_stage2) * t

    def wd_at(self, step: int) -> float:
        s1 = self.stage1_end
        if step >= s1:
            return 0.0
        return self.weight_decay * 0.5 * (1 + math.cos(math.pi * step / s1))
