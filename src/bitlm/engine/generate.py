"""Generation in small named steps: prefill the prompt into the KV cache, decode one token at a time,
sample, stop. On top of the token iterator: safe text streaming, one-shot text, and multi-turn chat.

    prefill(model, ids, cache)       logits (1, V) of the last prompt position; the prompt is now cached
    decode_one(model, token, cache)  logits (1, V) after one more token
    generate(model, prompt_ids, ...) iterator of new token ids (batch 1)
    stream_text(model, prompt, ...)  TextStream: iterator of text increments, then stats
    generate_text(model, prompt)     the whole continuation as one string
    ChatSession(model, system=...)   history through the chat template, KV cache reused across turns
"""

from __future__ import annotations

import time
from typing import Callable, Iterator, Sequence

import numpy as np

from ..errors import BitlmError
from .sampling import SamplingParams, sample
from .speculative import Speculative, SpeculativeTokens, Speculator, speculative_tokens

FINISH_REASONS = ("stop", "length", "context")  # stop token/string; max_new_tokens; context full


# ---- the steps -----------------------------------------------------------------------------------
# A model here is anything with config, tokenizer, new_cache(max_len=) and last_logits(ids, cache):
# BitNetForCausalLM (torch) or NativeLM (the native runtime, which never imports torch).
def prefill(model, ids, cache) -> np.ndarray:
    """Run ids (a list, or (T,) / (1, T)) through the model, appending them to `cache`; float32 logits
    (1, V) of the last position."""
    return model.last_logits(_id_list(ids), cache)


def decode_one(model, token: int, cache) -> np.ndarray:
    """Feed one token after what `cache` holds; float32 logits (1, V) for the token after it."""
    return model.last_logits([token], cache)


def context_limit(model, cache=None) -> int:
    limit = model.config.max_position_embeddings
    return min(limit, cache.max_len) if cache is not None else limit


def default_stop_token_ids(model) -> list[int]:
    """The tokenizer's stop ids (eos and <|eot_id|>), else config.json's eos_token_id."""
    if model.tokenizer is not None:
        return list(model.tokenizer.stop_token_ids)
    return model.config.eos_token_ids


def _id_list(prompt_ids) -> list[int]:
    if hasattr(prompt_ids, "shape") and hasattr(prompt_ids, "tolist"):  # a numpy array or torch tensor
        shape = tuple(prompt_ids.shape)
        ids = prompt_ids.tolist()
        if len(shape) == 2 and shape[0] == 1:
            ids = ids[0]
        elif len(shape) != 1:
            ids = None
        if ids is None or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise BitlmError(f"prompt_ids: expected integer token ids of shape (T,) or (1, T), got "
                             f"{shape} {prompt_ids.dtype}")
        return ids
    ids = list(prompt_ids)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise BitlmError("prompt_ids: expected a list of integer token ids")
    return ids


def generate(model, prompt_ids, max_new_tokens: int = 256, temperature: float = 0.8, top_k: int = 40,
             top_p: float = 0.95, seed: int | None = None, stop_token_ids: Sequence[int] | None = None,
             stop_strings: Sequence[str] = (), ignore_eos: bool = False, cache=None,
             speculative: Speculative | None = None) -> Iterator[int]:
    """An iterator of the new token ids after `prompt_ids` (a list, or a tensor (T,) or (1, T)), one at a time.

    Stops at max_new_tokens; at a stop token (default: the tokenizer's eos and <|eot_id|>), which is not
    yielded; after the token that completes one of `stop_strings` (decoded text; that token is yielded,
    stream_text trims the string); or when the context is full. ignore_eos ignores the stop tokens.
    temperature 0 is greedy. The generator's return value (StopIteration.value) is the finish reason:
    "stop", "length" or "context".

    `cache`: a KVCache whose first cache.length positions already hold prompt_ids[:cache.length] (a chat
    reusing its shared prefix); only the rest is prefilled. Afterwards it holds the prompt and every
    yielded token but the last.

    `speculative`: a Speculative (engine/speculative.py) drafts tokens by prompt lookup or a draft model
    and verifies them in one forward of the model: the same tokens (greedy) or the same distribution
    (sampled) as without it, faster where drafts are often right. The iterator then also carries the
    draft counts (`.speculative`, a SpecStats).
    """
    params = SamplingParams(temperature, top_k, top_p, seed)
    ids = _id_list(prompt_ids)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise BitlmError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not ids:
        raise BitlmError("the prompt is empty: generation needs at least one token to start from")
    limit = context_limit(model, cache)
    if len(ids) > limit:
        raise BitlmError(f"the prompt is {len(ids)} tokens, longer than the model's context of {limit} "
                         "tokens; shorten the prompt")
    stops = set() if ignore_eos else set(default_stop_token_ids(model) if stop_token_ids is None
                                         else stop_token_ids)
    detok = Detokenizer(_require_tokenizer(model, "stop_strings"), stop_strings) if stop_strings else None
    budget = min(max_new_tokens, limit - len(ids))  # the whole sequence must fit the context
    if cache is None and budget:
        cache = model.new_cache(max_len=len(ids) + budget)
    if speculative is not None:
        if not isinstance(speculative, Speculative):
            raise BitlmError(f"speculative: expected a bitlm.engine.speculative.Speculative, got {speculative!r}")
        # made now, so that an incompatible draft model is an error here, not at the first token
        sp = Speculator(speculative, model, params)
        return SpeculativeTokens(speculative_tokens(model, ids, params, stops, detok, budget, max_new_tokens,
                                                    cache, sp), sp.stats)
    return _tokens(model, ids, params, stops, detok, budget, max_new_tokens, cache)


def _tokens(model, ids, params, stops, detok, budget, max_new_tokens, cache) -> Iterator[int]:
    """The loop of `generate`, once its arguments are checked (a generator runs nothing until iterated)."""
    if budget == 0:
        return "length" if max_new_tokens == 0 else "context"
    generator = None if params.greedy else params.generator()
    cache.truncate(len(ids) - 1)  # at least the last prompt token is run, to get its logits
    start = cache.length
    logits = prefill(model, ids[start:], cache)
    n = 0
    while True:
        token = int(sample(logits, params, generator)[0])
        if token in stops:
            return "stop"
        yield token
        n += 1
        if detok is not None:
            detok.push(token)
            if detok.stopped:
                return "stop"
        if n == budget:
            return "length" if n == max_new_tokens else "context"
        logits = decode_one(model, token, cache)


def _require_tokenizer(model, what: str):
    if model.tokenizer is None:
        raise BitlmError(f"{what} needs a tokenizer, and this model has none (no tokenizer.json in its "
                         "directory)")
    return model.tokenizer


# ---- text ----------------------------------------------------------------------------------------
class Detokenizer:
    """Token ids in, text increments out.

    Never emits an incomplete UTF-8 sequence (text ending in U+FFFD waits for the next token), and never
    emits text that might still turn out to be the start of a stop string. When a stop string appears, the
    text before it is emitted and `stopped` is set; the string itself is never emitted.
    The increments concatenate to decode(all ids) (cut at the first stop string).
    """

    def __init__(self, tokenizer, stop_strings: Sequence[str] = ()):
        if isinstance(stop_strings, str) or not all(isinstance(s, str) for s in stop_strings):
            raise BitlmError(f"stop_strings: expected a list of strings, got {stop_strings!r}")
        self.tokenizer = tokenizer
        self.stop_strings = tuple(s for s in stop_strings if s)
        self.ids: list[int] = []
        self.text = ""  # emitted so far
        self.stopped = False
        self._prefix = 0  # ids[_prefix:_read] decoded is the text up to what has been decoded
        self._read = 0
        self._pending = ""  # decoded but held back: it could begin a stop string

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token)
        return self._emit(self._decode_new(final=False), final=False)

    def flush(self) -> str:
        """Everything still held back, at the end of generation."""
        if self.stopped:
            return ""
        return self._emit(self._decode_new(final=True), final=True)

    def _decode_new(self, final: bool) -> str:
        # Decoding from _prefix (a character boundary) rather than from 0 keeps each step O(new tokens).
        before = self.tokenizer.decode(self.ids[self._prefix:self._read])
        now = self.tokenizer.decode(self.ids[self._prefix:])
        if not final and (len(now) <= len(before) or now.endswith("\ufffd")):
            return ""  # nothing yet, or an incomplete UTF-8 sequence at the end
        self._prefix, self._read = self._read, len(self.ids)
        return now[len(before):]

    def _emit(self, delta: str, final: bool) -> str:
        pending = self._pending + delta
        hits = [i for i in (pending.find(s) for s in self.stop_strings) if i >= 0]
        if hits:
            out, self._pending, self.stopped = pending[:min(hits)], "", True
        else:
            keep = 0 if final else self._stop_prefix_len(pending)
            out, self._pending = pending[:len(pending) - keep], pending[len(pending) - keep:]
        self.text += out
        return out

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest end of `text` that is a proper start of some stop string."""
        best = 0
        for s in self.stop_strings:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best


class TextStream:
    """Iterate for the text increments of one generation; afterwards read the text, ids and stats."""

    def __init__(self, tokens: Iterator[int], detok: Detokenizer, n_prompt: int,
                 on_end: Callable[["TextStream"], None] | None = None):
        self._tokens, self._detok, self._on_end = tokens, detok, on_end
        self.n_prompt = n_prompt
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self.failed = False  # an exception ended it (an early break or Ctrl-C does not count)
        self._t0 = self._t_first = self._t_end = None

    @property
    def text(self) -> str:
        return self._detok.text

    def __iter__(self) -> Iterator[str]:
        self._t0 = time.perf_counter()
        try:
            while True:
                try:
                    token = next(self._tokens)
                except StopIteration as stop:
                    self.finish_reason = stop.value
                    break
                if self._t_first is None:
                    self._t_first = time.perf_counter()
                self.token_ids.append(token)
                piece = self._detok.push(token)
                if piece:
                    yield piece
                if self._detok.stopped:
                    self.finish_reason = "stop"
                    break
            piece = self._detok.flush()
            if piece:
                yield piece
        except Exception:
            self.failed = True
            raise
        finally:
            self._tokens.close()
            self._t_end = time.perf_counter()
            if self._on_end is not None:
                self._on_end(self)

    def stats(self) -> dict:
        """Prompt and generated token counts, prefill seconds (to the first token), decode tokens/s; with
        speculative decoding also the rounds, drafted and accepted tokens and the acceptance rate."""
        if self._t_end is None:
            return {}
        first = self._t_first or self._t_end
        n = len(self.token_ids)
        decode_s = self._t_end - first
        out = {"prompt_tokens": self.n_prompt, "new_tokens": n, "prefill_s": first - self._t0,
               "decode_tokens_per_s": (n - 1) / decode_s if n > 1 and decode_s > 0 else None,
               "finish_reason": self.finish_reason}
        spec = getattr(self._tokens, "speculative", None)
        if spec is not None:
            out.update(draft_rounds=spec.rounds, draft_tokens=spec.drafted, accepted_tokens=spec.accepted,
                       acceptance_rate=spec.acceptance_rate)
        return out


def stream_text(model, prompt: str | Sequence[int], stop_strings: Sequence[str] = (),
                on_end: Callable[[TextStream], None] | None = None, **kwargs) -> TextStream:
    """Text increments of the continuation of `prompt` (a string, encoded with the tokenizer's special
    tokens, i.e. with BOS; or token ids). `on_end(stream)` runs when the iteration ends, however it ends.
    Other keyword arguments are those of `generate`."""
    tok = _require_tokenizer(model, "text generation")
    ids = tok.encode(prompt) if isinstance(prompt, str) else _id_list(prompt)
    detok = Detokenizer(tok, stop_strings)  # stop strings are matched here, on the text, and trimmed
    return TextStream(generate(model, ids, **kwargs), detok, len(ids), on_end)


def generate_text(model, prompt: str | Sequence[int], **kwargs) -> str:
    """The continuation of `prompt` as one string (keyword arguments as for stream_text)."""
    return "".join(stream_text(model, prompt, **kwargs))


# ---- chat ----------------------------------------------------------------------------------------
class ChatSession:
    """A multi-turn chat through the model's chat template.

    Each turn re-renders the whole history; the KV cache keeps the longest prefix that the new ids share
    with what it already holds, so only the new part (the end of the last reply, the new user turn) is
    prefilled. Keyword arguments are `generate`'s (temperature, top_p, max_new_tokens, stop_strings, ...).
    """

    def __init__(self, model, system: str | None = None, **options):
        self.model = model
        self.tokenizer = _require_tokenizer(model, "chat")
        if not self.tokenizer.chat_template:
            raise BitlmError("this model has no chat template (tokenizer_config.json chat_template); "
                             "use plain generation (`bitlm generate`) instead")
        self.system = system
        self.options = options
        self.cache = model.new_cache()
        self.cached_ids: list[int] = []  # the ids whose keys and values are in self.cache
        self.messages: list[dict] = []
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system message stays). The cache keeps what may be shared again,
        such as the system prompt."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def send(self, content: str, **overrides) -> TextStream:
        """Stream the assistant's reply to `content`; once the stream ends, both turns join the history."""
        messages = self.messages + [{"role": "user", "content": content}]
        ids = self.tokenizer.encode_chat(messages)
        limit = context_limit(self.model, self.cache)
        if len(ids) >= limit:
            raise BitlmError(f"the conversation is {len(ids)} tokens and the model's context {limit}; "
                             "reset the chat (/reset) to start over")
        shared = _shared_prefix_len(ids, self.cached_ids)
        self.cache.truncate(shared)
        self.cached_ids = ids[:shared]

        def on_end(stream: TextStream) -> None:
            # The cache holds a prefix of prompt + reply whatever happened; the history only grows
            # when the reply was not cut by an error (a partial reply after Ctrl-C is kept).
            self.cached_ids = (ids + stream.token_ids)[:self.cache.length]
            if not stream.failed:
                self.messages = messages + [{"role": "assistant", "content": stream.text}]

        return stream_text(self.model, ids, cache=self.cache, on_end=on_end, **{**self.options, **overrides})

    def reply(self, content: str, **overrides) -> str:
        return "".join(self.send(content, **overrides))


def _shared_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
