"""Training: pre-training from scratch, fine-tuning (a Llama or BitNet checkpoint down to 1.58 bits),
SFT and DPO, in one process or data-parallel under torchrun. `run(make_config(...))` is the library
entry point; `bitlm train|sft|dpo` (or `python -m bitlm.train ...`) the command line."""

from .config import TrainConfig, make_config


def run(cfg):
    """Run a training task (trainer.run; imported on first use so the CLI starts without torch)."""
    from .trainer import run as _run
    return _run(cfg)


__all__ = ["TrainConfig", "make_config", "run"]
