"""Training: pre-training from scratch, fine-tuning (a Llama or BitNet checkpoint down to 1.58 bits),
SFT and DPO, in one process or data-parallel under torchrun. `run(make_config(...))` is the library
entry point; `python -m bitlm.train {train,sft,dpo}` (later `bitlm train|sft|dpo`) the command line."""

from .config import TrainConfig, make_config
from .trainer import run

__all__ = ["TrainConfig", "make_config", "run"]
