"""Fixtures of the training tests: a small text corpus, chat and preference sets, made here."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import CORPUS

CHATS = [
    [{"role": "user", "content": "Who wrote Hamlet?"}, {"role": "assistant", "content": "Shakespeare wrote it."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "To be?"},
     {"role": "assistant", "content": "Or not to be."}],
    [{"role": "user", "content": "Name a season."}, {"role": "assistant", "content": "Summer."},
     {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "Winter."}],
    [{"role": "user", "content": "Compare thee?"}, {"role": "assistant", "content": "To a summer's day."}],
]
PREFS = [
    {"prompt": "Who wrote Hamlet?", "chosen": "Shakespeare.", "rejected": "The quick brown fox."},
    {"prompt": "Name a season.", "chosen": "Summer.", "rejected": "0123456789"},
    {"prompt": "To be?", "chosen": "Or not to be.", "rejected": "lazy dog"},
    {"prompt": "Compare thee?", "chosen": "To a summer's day.", "rejected": "!?.,;:"},
]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models train fastest on one thread; two threads on a loaded 2-core machine spin and wait."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    f.write_text(CORPUS * 12)
    return f


@pytest.fixture(scope="session")
def chat_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    f.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CHATS))
    return f


@pytest.fixture(scope="session")
def pref_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("prefs") / "prefs.jsonl"
    f.write_text("".join(json.dumps(p) + "\n" for p in PREFS))
    return f


def small_run(corpus, out, **kw):
    """The TrainConfig of a fast pre-training run on the tiny preset."""
    from bitlm.train import make_config
    base = dict(task="pretrain", data=[str(corpus)], out=str(out), tokenizer="bpe:320", context=32,
                batch_size=4, steps=8, eval_every=4, eval_batches=2, lr=3e-3, lr_stage1_end=2e-3,
                lr_stage2=1e-3, progress=False, plot=False, val_fraction=0.1)
    return make_config(**{**base, **kw})
