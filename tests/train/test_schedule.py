import math

import pytest

from bitlm.errors import BitlmError
from bitlm.train.config import TrainConfig
from bitlm.train.schedule import Schedule


def sched(total_steps, **kw):
    """A schedule with TrainConfig's defaults for whatever is not given."""
    return Schedule.from_config(TrainConfig(data=["unused.txt"], **kw), total_steps)


def test_two_stage_learning_rate_by_hand():
    s = sched(10, lr=1.0, lr_stage1_end=0.5, lr_stage2=0.25, lr_final=0.0, warmup_steps=2,
              stage1_fraction=0.6, weight_decay=0.1)
    assert s.stage1_end == 6
    assert s.lr_at(0) == pytest.approx(0.5)  # warm-up: 1.0 * 1/2
    assert s.lr_at(1) == pytest.approx(1.0)
    assert s.lr_at(2) == pytest.approx(1.0)  # stage one starts at the peak ...
    assert s.lr_at(4) == pytest.approx(0.75)  # ... halfway down its cosine: 0.5 + 0.5 * 0.5
    assert s.lr_at(6) == pytest.approx(0.25)  # stage two: the cooldown starts at lr_stage2 ...
    assert s.lr_at(8) == pytest.approx(0.125)  # ... and falls linearly to lr_final
    assert s.lr_at(9) == pytest.approx(0.0625)


def test_weight_decay_cosine_then_zero():
    s = sched(8, stage1_fraction=0.5, weight_decay=0.1)
    assert s.wd_at(0) == pytest.approx(0.1)  # the peak
    assert s.wd_at(2) == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert all(s.wd_at(i) == 0.0 for i in range(4, 8))  # stage two: none


def test_defaults_are_the_2b4t_figures():
    s = sched(100)
    assert (s.lr_at(0), s.lr_at(49), s.lr_at(50), s.lr_at(99)) == pytest.approx(
        (1.5e-3, 8e-4 + 7e-4 * 0.5 * (1 + math.cos(math.pi * 49 / 50)), 5e-4, 5e-4 * 0.02))


def test_bad_schedule():
    with pytest.raises(BitlmError, match="at least one"):
        sched(0)
    with pytest.raises(BitlmError, match="stage1-fraction"):
        sched(5, stage1_fraction=1.5)
