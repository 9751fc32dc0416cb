"""Fixtures shared by the whole suite: tiny models and tokenizers made here, never downloaded."""

from __future__ import annotations

import os
import sys

import pytest
import torch

# transformers wraps its BitNet quantizers in torch.compile; the eager path computes the same numbers
# and keeps the suite fast on two cores.
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))

from helpers import BITNET_CHAT_TEMPLATE, make_tiny_model_dir, train_tiny_tokenizer  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _native_cache(tmp_path_factory):
    """Converted native files go to a temporary cache, shared by the in-process and subprocess runs."""
    os.environ["BITLM_CACHE"] = str(tmp_path_factory.mktemp("bitlm-cache"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    """A byte-level BPE tokenizer (vocab 512) with BitNet-style special tokens and chat template."""
    d = tmp_path_factory.mktemp("tok")
    train_tiny_tokenizer(d)
    return d


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer_dir):
    """A random tiny BitNet model saved by bitlm in the packed HF format, with the tiny tokenizer."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny_model"), tiny_tokenizer_dir)


__all__ = ["BITNET_CHAT_TEMPLATE"]
