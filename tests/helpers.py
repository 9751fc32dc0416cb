"""Builders for the test fixtures (importable from any test)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

# The chat format of microsoft/bitnet-b1.58-2B-4T: "Role: content<|eot_id|>" turns after one BOS.
BITNET_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first %}{{ bos_token }}{% endif %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}Assistant: {% endif %}"
)

CORPUS = """\
Now is the winter of our discontent made glorious summer by this sun of York;
And all the clouds that lour'd upon our house in the deep bosom of the ocean buried.
To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer
the slings and arrows of outrageous fortune, or to take arms against a sea of troubles.
Shall I compare thee to a summer's day? Thou art more lovely and more temperate.
The quick brown fox jumps over the lazy dog. 0123456789 !?.,;:'"()[]{}<>-_=+*/\\|@#$%^&~`
"""


def train_tiny_tokenizer(d: Path, vocab_size: int = 512) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([CORPUS] * 20, trainer=trainer)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B", special_tokens=[("<|begin_of_text|>", bos)])
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
        "chat_template": BITNET_CHAT_TEMPLATE, "tokenizer_class": "PreTrainedTokenizerFast"}))
    return d


def make_tiny_model_dir(d: Path, tokenizer_dir: Path | None = None, seed: int = 0, **overrides) -> Path:
    """Random ternary weights (preset tiny), saved packed by bitlm, with the tokenizer files copied in."""
    import bitlm
    from bitlm.model import BitNetForCausalLM
    torch.manual_seed(seed)
    kw = dict(bos_token_id=0, eos_token_id=1, torch_dtype="float32")
    if tokenizer_dir is not None:
        kw.update(bos_token_id=0, eos_token_id=1)  # <|begin_of_text|>, <|end_of_text|> in the tiny BPE
    cfg = bitlm.preset("tiny", **{**kw, **overrides})
    model = BitNetForCausalLM(cfg, linear="latent")
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.5)
    model.to_packed().save_pretrained(d)
    if tokenizer_dir is not None:
        for f in Path(tokenizer_dir).iterdir():
            shutil.copy2(f, Path(d) / f.name)
    return Path(d)


def finish(gen):
    """The items of a generator (generate()'s token ids) and its return value (the finish reason)."""
    out = []
    while True:
        try:
            out.append(next(gen))
        except StopIteration as stop:
            return out, stop.value


def first_layers(nm, n):
    """A draft made of a NativeModel's first n blocks (then its final norm and head): early exit, a
    NativeLM sharing nm's arrays and tokenizer."""
    import dataclasses

    from bitlm.engine.native import NativeLM, NativeModel
    arrays = {k: v for k, v in nm.arrays.items() if not (k[0].isdigit() and int(k.split(".")[0]) >= n)}
    arrays["scales"] = nm.arrays["scales"][:n]
    draft = NativeLM(NativeModel(dataclasses.replace(nm.config, num_hidden_layers=n), arrays))
    draft.tokenizer = nm.tokenizer
    return draft


def vm_flags(address: int) -> set[str]:
    """The VmFlags of this process's mapping that holds `address` (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "VmFlags:":
                return set(line.split()[1:])
    raise AssertionError(f"no mapping holds {address:#x}")


def resident_pages(address: int, size: int) -> set[int]:
    """The indices of the pages of [address, address + size) that are in memory (mincore; address
    page-aligned, a range of this process's mappings)."""
    import ctypes
    import mmap
    import os
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte))
    vec = (ctypes.c_ubyte * -(-size // mmap.PAGESIZE))()
    assert libc.mincore(ctypes.c_void_p(address), size, vec) == 0, os.strerror(ctypes.get_errno())
    return {i for i, v in enumerate(vec) if v & 1}
