"""Training data: corpora -> token ids -> fixed-length sequences, chat and preference examples, and the
deterministic sampler every rank draws its rows from.

Pre-training: each document becomes [bos] + ids + [eos] (when the tokenizer has them), the documents are
concatenated into one stream, the LAST `val_fraction` of the stream is held out for validation, and each
part is cut into sequences of context + 1 tokens (inputs = seq[:-1], targets = seq[1:]).

The sampler is a pure function of (seed, global row index): epoch e visits the rows in the order of
randperm(n, seed + e). The data position of a run is therefore just its step number, which makes resume
exact and lets every rank pick its own rows of the same global batch.
"""

from __future__ import annotations

import glob
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import BitlmError

SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
# The chat format of microsoft/bitnet-b1.58-2B-4T ("Role: content<|eot_id|>" after one BOS); used for
# tokenizers trained here, which have no template of their own.
BITNET_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first %}{{ bos_token }}{% endif %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}Assistant: {% endif %}"
)
TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl", ".json")


# ---- files ---------------------------------------------------------------------------------------
def expand_paths(paths) -> list[Path]:
    """Files named by `paths` (files, directories searched for .txt/.jsonl, or glob patterns), sorted."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    out: list[Path] = []
    for p in paths:
        p = Path(p).expanduser()
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES + JSONL_SUFFIXES)
            if not found:
                raise BitlmError(f"{p}: directory holds no .txt or .jsonl files")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            matches = sorted(Path(m) for m in glob.glob(str(p)) if Path(m).is_file())
            if not matches:
                raise BitlmError(f"{p}: no such file, directory or glob match")
            out += matches
    return out


def read_jsonl(path: Path):
    """(line number, object) of every non-blank line; a malformed line is a BitlmError naming it."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise BitlmError(f"{path}:{n}: malformed JSON line ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise BitlmError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
            yield n, obj


def read_documents(paths, text_field: str = "text") -> list[str]:
    """Plain-text files are one document each; jsonl files give one document per line (`text_field`)."""
    docs: list[str] = []
    for f in expand_paths(paths):
        if f.suffix in JSONL_SUFFIXES:
            for n, obj in read_jsonl(f):
                text = obj.get(text_field)
                if not isinstance(text, str):
                    raise BitlmError(f"{f}:{n}: expected a string field {text_field!r}")
                docs.append(text)
        else:
            try:
                docs.append(f.read_text(encoding="utf-8"))
            except UnicodeDecodeError as e:
                raise BitlmError(f"{f}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise BitlmError(f"empty corpus: no text in {', '.join(str(p) for p in expand_paths(paths))}")
    return docs


# ---- tokenizer -----------------------------------------------------------------------------------
def train_bpe(docs: list[str], vocab_size: int):
    """A byte-level BPE (bitlm Tokenizer) trained on `docs`, with the BitNet special tokens and template."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from ..engine.tokenizer import Tokenizer
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise BitlmError(f"--tokenizer bpe:{vocab_size}: a byte-level BPE needs at least "
                         f"{256 + len(SPECIAL_TOKENS)} tokens")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer=trainer)
    return Tokenizer(tok, tokenizer_config={"bos_token": SPECIAL_TOKENS[0], "eos_token": SPECIAL_TOKENS[1],
                                            "tokenizer_class": "PreTrainedTokenizerFast"},
                     chat_template=BITNET_CHAT_TEMPLATE)


def load_tokenizer(spec: str, docs: list[str] | None = None):
    """`spec` is a tokenizer.json path, a directory holding one, or "bpe:N" (trained on `docs`)."""
    from ..engine.tokenizer import Tokenizer
    if spec.startswith("bpe:"):
        try:
            n = int(spec[4:])
        except ValueError:
            raise BitlmError(f"--tokenizer {spec}: expected bpe:N with an integer vocabulary size") from None
        if docs is None:
            raise BitlmError("--tokenizer bpe:N needs a corpus to train on")
        return train_bpe(docs, n)
    p = Path(spec).expanduser()
    if p.is_dir():
        tok = Tokenizer.from_dir(p)
        if tok is None:
            raise BitlmError(f"{p}: no tokenizer.json in this directory")
        return tok
    if not p.is_file():
        raise BitlmError(f"--tokenizer {spec}: no such file; pass a tokenizer.json, its directory or bpe:N")
    tok = Tokenizer.from_dir(p.parent) if p.name == "tokenizer.json" else None
    return tok or Tokenizer.from_file(p)


def encode_documents(tok, docs: list[str]) -> torch.Tensor:
    """One int32 stream (4 bytes a token): [bos] + ids + [eos] per document, where the tokenizer has them."""
    import numpy as np
    bos = tok.bos_token_id
    eos = tok.token_to_id(tok.eos_token) if tok.eos_token else None
    head = [bos] if bos is not None else []
    tail = [eos] if eos is not None else []
    parts = [np.asarray(head + enc.ids + tail, dtype=np.int32)
             for enc in tok.tok.encode_batch(docs, add_special_tokens=False)]
    return torch.from_numpy(np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32))


# ---- pre-training sequences ----------------------------------------------------------------------
@dataclass
class TokenSplits:
    train: torch.Tensor  # (N, T + 1) int32; batches are made int64
    val: torch.Tensor  # (M, T + 1) int32

    @classmethod
    def from_stream(cls, stream: torch.Tensor, context: int, val_fraction: float) -> "TokenSplits":
        """Hold out the last val_fraction of the stream, then cut both parts into rows of context + 1."""
        if stream.numel() == 0:
            raise BitlmError("empty corpus: the tokenizer produced no tokens")
        n_val = int(stream.numel() * val_fraction)
        if val_fraction > 0 and n_val < context + 1:
            n_val = min(context + 1, stream.numel() // 2)
        train_part, val_part = stream[:stream.numel() - n_val], stream[stream.numel() - n_val:]

        def rows(part):
            n = (part.numel() - 1) // context
            if n <= 0:
                return part.new_zeros((0, context + 1))
            # rows overlap by one token: row i = part[i*T : i*T + T + 1]
            return part[:n * context + 1].unfold(0, context + 1, context).contiguous()
        return cls(rows(train_part), rows(val_part))


def check_enough(n_rows: int, batch_size: int, what: str) -> None:
    if n_rows == 0:
        raise BitlmError(f"empty {what}: not one sequence of the context length; add text or lower --context")
    if n_rows < batch_size:
        raise BitlmError(f"{what} smaller than one batch: {n_rows} sequences for a global batch of {batch_size}; "
                         "add text, lower --batch-size or lower --context")


class Sampler:
    """Row indices of a dataset of n rows for global row positions: epoch e is randperm(n, seed + e)."""

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self._epoch, self._perm = -1, None

    def index(self, position: int) -> int:
        epoch, i = divmod(position, self.n)
        if not self.shuffle:
            return i
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return int(self._perm[i])

    def rows(self, start: int, count: int) -> list[int]:
        return [self.index(p) for p in range(start, start + count)]


# ---- chat (SFT) and preference (DPO) examples ----------------------------------------------------
def encode_chat_masked(tok, messages: list[dict], where: str = "chat") -> tuple[list[int], list[int]]:
    """Token ids of a whole conversation and a 0/1 mask that is 1 on assistant tokens only.

    The conversation is cut at every assistant turn into a context segment (everything the template writes
    before the reply, generation prompt included) and the reply segment (the reply and what the template
    writes after it, such as <|eot_id|>); each segment is encoded on its own, so the context tokens are
    exactly what the model sees as a prompt at inference time.
    """
    if not isinstance(messages, list) or not messages:
        raise BitlmError(f"{where}: 'messages' must be a non-empty list")
    ids: list[int] = []
    mask: list[int] = []
    done = ""  # the rendered text already encoded
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") != "assistant":
            continue
        prompt = tok.apply_chat_template(messages[:i], add_generation_prompt=True) if i else ""
        full = tok.apply_chat_template(messages[:i + 1], add_generation_prompt=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise BitlmError(f"{where}: the chat template does not render conversations prefix by prefix, "
                             "so assistant tokens cannot be told apart")
        for text, flag in ((prompt[len(done):], 0), (full[len(prompt):], 1)):
            seg = tok.encode(text, add_special_tokens=False) if text else []
            ids += seg
            mask += [flag] * len(seg)
        done = full
    if not any(mask):
        raise BitlmError(f"{where}: no assistant message to learn from")
    rest = tok.apply_chat_template(messages, add_generation_prompt=False)
    if rest.startswith(done) and len(rest) > len(done):  # trailing non-assistant turns: context only
        seg = tok.encode(rest[len(done):], add_special_tokens=False)
        ids += seg
        mask += [0] * len(seg)
    return ids, mask


def _messages(obj, key: str, where: str, role: str | None = None) -> list[dict]:
    v = obj.get(key)
    if isinstance(v, str):
        return [{"role": role or "user", "content": v}]
    if isinstance(v, dict):
        return [v]
    if isinstance(v, list) and v:
        return v
    raise BitlmError(f"{where}: field {key!r} must be a string, a message or a list of messages")


def load_chat(paths, tok, context: int) -> list[tuple[list[int], list[int]]]:
    """(ids, assistant mask) per conversation of `messages` jsonl files, cut to context + 1 tokens."""
    out = []
    for f in expand_paths(paths):
        for n, obj in read_jsonl(f):
            where = f"{f}:{n}"
            ids, mask = encode_chat_masked(tok, _messages(obj, "messages", where), where)
            out.append((ids[:context + 1], mask[:context + 1]))
    if not out:
        raise BitlmError(f"empty dataset: no conversations in {paths}")
    return out


def load_preferences(paths, tok, context: int) -> list[tuple[tuple[list[int], list[int]], ...]]:
    """((chosen ids, mask), (rejected ids, mask)) per prompt/chosen/rejected line."""
    out = []
    for f in expand_paths(paths):
        for n, obj in read_jsonl(f):
            where = f"{f}:{n}"
            prompt = _messages(obj, "prompt", where)
            pair = []
            for key in ("chosen", "rejected"):
                reply = _messages(obj, key, where, role="assistant")
                ids, mask = encode_chat_masked(tok, prompt + reply, where)
                pair.append((ids[:context + 1], mask[:context + 1]))
            out.append(tuple(pair))
    if not out:
        raise BitlmError(f"empty dataset: no preference pairs in {paths}")
    return out


def pad_batch(examples: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, L), mask (B, L)) right-padded; padding has mask 0 (and, being last, is never attended to)."""
    L = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), L), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(examples), L), dtype=torch.int64)
    for b, (i, m) in enumerate(examples):
        ids[b, :len(i)] = torch.tensor(i)
        mask[b, :len(m)] = torch.tensor(m)
    return ids, mask
