"""The three training tasks over one loop: each turns sampled rows into a batch and a batch into an
objective (a SUM over its units), the units that objective is averaged over, and summed statistics.

    pretrain  packed token rows; units = target tokens; loss = mean next-token NLL
    sft       chat rows with an assistant-only mask; units = assistant target tokens (mean) or 1 (sum)
    dpo       (chosen, rejected) pairs; units = pairs; a frozen reference model
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..errors import BitlmError
from . import data, losses


def _log_ppl(nll: float) -> float:
    return math.exp(min(nll, 50.0))


class PretrainTask:
    name = "pretrain"
    mean = True  # the objective is divided by the global number of units

    def __init__(self, cfg, tok, context: int, main: bool):
        docs = data.read_documents(cfg.data, cfg.text_field)
        stream = data.encode_documents(tok, docs)
        self.splits = data.TokenSplits.from_stream(stream, context, cfg.val_fraction)
        data.check_enough(self.splits.train.shape[0], cfg.batch_size, "training corpus")
        self.n_train = self.splits.train.shape[0]
        self.n_val = self.splits.val.shape[0]
        self.stream_tokens = stream.numel()

    def train_batch(self, rows):
        return self.splits.train[rows].long()

    def val_batch(self, rows):
        return self.splits.val[rows].long()

    def units(self, batch) -> float:
        return float(batch[:, 1:].numel())

    def input_tokens(self, batch) -> int:
        return batch[:, :-1].numel()

    def compute(self, model, batch):
        nll, n = losses.token_nll(model, batch)
        return nll, {"nll": nll.detach(), "tokens": n}

    @staticmethod
    def summarize(s: dict) -> dict:
        loss = float(s["nll"] / max(float(s["tokens"]), 1.0))
        return {"loss": loss, "ppl": _log_ppl(loss)}


class _ExampleTask:
    """Tasks over jsonl examples (encoded by `load`), padded per batch with the EOS id."""
    load = None
    what = "dataset"

    def __init__(self, cfg, tok, context: int, main: bool):
        self.train = self.load(cfg.data, tok, context)
        self.val = self.load(cfg.val_data, tok, context) if cfg.val_data else []
        data.check_enough(len(self.train), cfg.batch_size, self.what)
        self.n_train, self.n_val = len(self.train), len(self.val)
        self.pad = tok.token_to_id(tok.eos_token) if tok.eos_token else 0


class SFTTask(_ExampleTask):
    name = "sft"
    load = staticmethod(data.load_chat)
    what = "SFT dataset"

    def __init__(self, cfg, tok, context: int, main: bool):
        super().__init__(cfg, tok, context, main)
        self.mean = cfg.loss_aggregation == "mean"  # "sum": the objective is the plain token sum

    def train_batch(self, rows):
        return data.pad_batch([self.train[i] for i in rows], self.pad)

    def val_batch(self, rows):
        return data.pad_batch([self.val[i] for i in rows], self.pad)

    def units(self, batch) -> float:
        return float(batch[1][:, 1:].sum())

    def input_tokens(self, batch) -> int:
        return int(batch[1].numel())

    def compute(self, model, batch):
        ids, mask = batch
        nll, n = losses.token_nll(model, ids, mask)
        return nll, {"nll": nll.detach(), "tokens": n}

    summarize = staticmethod(PretrainTask.summarize)


class DPOTask(_ExampleTask):
    name = "dpo"
    mean = True
    load = staticmethod(data.load_preferences)
    what = "DPO dataset"

    def __init__(self, cfg, tok, context: int, main: bool):
        super().__init__(cfg, tok, context, main)
        self.beta = cfg.beta
        self.reference = None  # the frozen starting model, set by the trainer

    def _batch(self, pairs):
        # chosen rows first, then rejected: one forward pass for both
        return data.pad_batch([p[0] for p in pairs] + [p[1] for p in pairs], self.pad)

    def train_batch(self, rows):
        return self._batch([self.train[i] for i in rows])

    def val_batch(self, rows):
        return self._batch([self.val[i] for i in rows])

    def units(self, batch) -> float:
        return batch[0].shape[0] / 2

    def input_tokens(self, batch) -> int:
        return int(batch[1].numel())

    def compute(self, model, batch):
        ids, mask = batch
        B = ids.shape[0] // 2
        logp = losses.sequence_logp(model, ids, mask)
        with torch.no_grad():
            ref = losses.sequence_logp(self.reference, ids, mask)
        pc, pr, rc, rr = logp[:B], logp[B:], ref[:B], ref[B:]
        loss = losses.dpo_loss(pc, pr, rc, rr, self.beta)
        reward_margin = self.beta * ((pc - rc) - (pr - rr))
        return loss.sum(), {
            "dpo": loss.sum().detach(), "pairs": torch.tensor(float(B)),
            "margin": (pc - pr).sum().detach(),  # policy log p(chosen) - log p(rejected)
            "reward_acc": (reward_margin > 0).float().sum(),
            "chosen_logp": pc.sum().detach(), "rejected_logp": pr.sum().detach()}

    @staticmethod
    def summarize(s: dict) -> dict:
        n = max(float(s["pairs"]), 1.0)
        return {"loss": float(s["dpo"]) / n, "margin": float(s["margin"]) / n,
                "reward_acc": float(s["reward_acc"]) / n, "chosen_logp": float(s["chosen_logp"]) / n,
                "rejected_logp": float(s["rejected_logp"]) / n}


TASKS = {"pretrain": PretrainTask, "sft": SFTTask, "dpo": DPOTask}


def make_tokenizer(cfg, out: Path, main: bool, init_tokenizer, barrier):
    """The run's tokenizer. It is saved to out/tokenizer once (a trained BPE by rank 0 only) and read
    back from there by every rank and by any resumed run, so all of them use the very same one."""
    from ..engine.tokenizer import Tokenizer
    saved = out / "tokenizer"
    if not (cfg.resume and (saved / "tokenizer.json").is_file()):
        if main:
            spec = cfg.tokenizer
            if spec is None and init_tokenizer is not None:
                tok = init_tokenizer
            elif spec is None and cfg.task != "pretrain":
                raise BitlmError(f"{cfg.task}: the --init model has no tokenizer; pass --tokenizer")
            else:
                spec = spec or "bpe:8192"
                docs = data.read_documents(cfg.data, cfg.text_field) if spec.startswith("bpe:") else None
                tok = data.load_tokenizer(spec, docs)
            saved.mkdir(parents=True, exist_ok=True)
            tok.save(saved)
        barrier()
    tok = Tokenizer.from_dir(saved)
    if tok is None:
        raise BitlmError(f"{saved}: the run's tokenizer is missing; start without --resume")
    return tok
