"""Exact speculative decoding: cheap drafts checked by one batched forward of the target model.

Each round, with the target's KV cache holding the history but its last token:

    draft       a drafter proposes up to k tokens d_1 .. d_k to follow the history
    verify      the target runs [last, d_1, .., d_k] in ONE forward at the next positions: k + 1 rows of
                logits for one read of the weights (decode reads them once per token, and at the 2B4T
                shape is bound by that read)
    accept      accept_drafts() keeps d_1 .. d_a and adds one token of the target's own (a correction at
                the first rejection, or a bonus after k acceptances): 1 .. k + 1 tokens a round
    roll back   the cache is truncated to the history plus the accepted drafts: the rejected positions'
                keys and values are overwritten by the next round before anything reads them

Exactness. Greedy (temperature 0): a draft is accepted iff it is the target's argmax, so the output is the
plain greedy output token for token, PROVIDED the target's logits for a row do not depend on how many
rows the forward runs (batch invariance). The native runtime's are bit-identical for a row run alone or
among k + 1 (tests/engine/test_speculative.py checks every kernel path here, every head and KV type):
its integer products are exact and every float step is done per row in the same order. The torch model
makes no such promise (its matmuls may reduce in another order for another row count), so there a
near-tie could go either way.
Sampling: the rule of Leviathan et al. 2023 / Chen et al. 2023. Draft x drawn from q is accepted with
probability min(1, p(x) / q(x)); on a rejection the token is drawn from norm(max(0, p - q)); after k
acceptances the bonus token is drawn from p. p and q are the distributions plain sampling draws from
(sampling.distribution: temperature, top-k, top-p), so each emitted token follows the target's
distribution exactly, whatever the drafter. Prompt lookup drafts deterministically: q is one-hot, a draft
is accepted with probability p(x), and a rejection draws from p without x.

Drafters:
    PromptLookup    n-grams of the history (no second model): the longest suffix of n = ngram_max ..
                    ngram_min tokens that occurred before, proposing the tokens that followed it (the
                    method of transformers' prompt_lookup_num_tokens and vLLM's ngram speculator; here
                    the latest occurrence, nearest to what is being written, where transformers takes
                    the first)
    DraftModel      a smaller model sharing the tokenizer, with its own KV cache kept in step with the
                    accepted tokens; drafts are drawn from its processed distribution q (greedy: argmax)

A server that drives the target's forward itself uses a Speculator per sequence (propose, run the rows,
accept, truncate), as generate() does.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ..errors import BitlmError
from .sampling import SamplingParams, distribution, draw, sample

METHODS = ("lookup", "draft")
PAUSE_MAX = 16  # rounds: the longest pause of drafting after rejected drafts (Speculative.adaptive)


@dataclass(frozen=True)
class Speculative:
    """How to draft. method "lookup": n-grams of the history (ngram_max down to ngram_min tokens
    matched); "draft": `draft_model`, a model sharing the target's tokenizer. draft_max: tokens drafted
    per round (k; each round emits 1 .. k + 1 tokens). adaptive: k starts at draft_max, grows by 2
    (up to draft_max) after a round whose drafts were all accepted and shrinks by 1 (down to 1) after
    one with a rejection (transformers' "heuristic" schedule); a round at k = 1 whose draft is rejected
    pauses drafting for 1 round, then 2, 4, ... up to PAUSE_MAX after each further such round, until a
    draft is accepted. Rows a verify runs in vain cost time (a 2-row forward is 1.1-1.2 single-row ones
    at the 2B4T shape: text that never quotes its context would decode that much slower at k = 1), and a
    schedule that looks only at past rounds leaves the output as it is."""

    method: str = "lookup"
    draft_max: int = 8
    ngram_max: int = 3
    ngram_min: int = 1
    draft_model: object | None = field(default=None, compare=False)
    adaptive: bool = True

    def __post_init__(self):
        if self.method not in METHODS:
            raise BitlmError(f"speculative method {self.method!r} is not one of {', '.join(METHODS)}")
        for name in ("draft_max", "ngram_max", "ngram_min"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise BitlmError(f"speculative {name} must be an integer >= 1, got {v!r}")
        if self.ngram_min > self.ngram_max:
            raise BitlmError(f"speculative ngram_min ({self.ngram_min}) is above ngram_max ({self.ngram_max})")
        if not isinstance(self.adaptive, bool):
            raise BitlmError(f"speculative adaptive must be True or False, got {self.adaptive!r}")
        if self.method == "draft" and self.draft_model is None:
            raise BitlmError("speculative method 'draft' needs a draft model (--draft MODEL)")
        if self.method == "lookup" and self.draft_model is not None:
            raise BitlmError("speculative method 'lookup' takes no draft model; use method 'draft'")


@dataclass
class SpecStats:
    """Counts over one generation: rounds (target forwards after the prompt), drafted and accepted tokens."""

    rounds: int = 0
    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None


def shared_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two lists (slice compares in C, bisected: O(n log n) in C
    rather than a Python loop over a long history)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


# ---- drafters ------------------------------------------------------------------------------------
class PromptLookup:
    """Drafts from the history itself. An index per n maps each n-gram to where the tokens after its
    latest occurrence start; it grows as the history grows (O(ngram_max) per token), and is rebuilt when
    the history is not an extension of the last one (a new prompt)."""

    def __init__(self, ngram_max: int = 3, ngram_min: int = 1):
        self.ngram_max, self.ngram_min = ngram_max, ngram_min
        self.ids: list[int] = []
        self._index: dict[int, dict[tuple, int]] = {n: {} for n in range(ngram_min, ngram_max + 1)}

    def _sync(self, ids: Sequence[int]) -> None:
        if len(ids) < len(self.ids) or ids[:len(self.ids)] != self.ids:
            self.ids, self._index = [], {n: {} for n in self._index}
        for i in range(len(self.ids), len(ids)):
            self.ids.append(int(ids[i]))
            # the n-grams ending just before token i now have a follower, starting at i; entries are
            # only made for an n-gram once something follows it, so the history's own suffix is never
            # its own match
            for n in self._index:
                if i >= n:
                    self._index[n][tuple(self.ids[i - n:i])] = i

    def propose(self, ids: Sequence[int], k: int) -> tuple[list[int], None]:
        """Up to k tokens to follow `ids` (none when no suffix of ngram_min tokens occurred before), and
        q = None: the drafts are deterministic (one-hot)."""
        self._sync(ids)
        if k <= 0:
            return [], None
        for n in range(self.ngram_max, self.ngram_min - 1, -1):
            if len(self.ids) > n:
                start = self._index[n].get(tuple(self.ids[-n:]))
                if start is not None:
                    return self.ids[start:start + k], None
        return [], None


def check_draft_model(target, draft) -> None:
    """A one-line error unless `draft` can draft for `target`: the same vocabulary (size, and the same
    token strings where both have a tokenizer), and a KV cache of its own."""
    vt, vd = target.config.vocab_size, draft.config.vocab_size
    if vt != vd:
        raise BitlmError(f"draft model: its vocabulary has {vd} tokens and the target's {vt}; the draft must "
                         "share the target's tokenizer")
    tt, td = getattr(target, "tokenizer", None), getattr(draft, "tokenizer", None)
    if tt is not None and td is not None and tt.tok.get_vocab(with_added_tokens=True) != \
            td.tok.get_vocab(with_added_tokens=True):
        raise BitlmError("draft model: its tokenizer maps tokens to other ids than the target's; the draft "
                         "must share the target's tokenizer")
    if getattr(draft, "nm", None) is not None and getattr(draft, "nm", None) is getattr(target, "nm", None):
        raise BitlmError("draft model: it is the target model itself (one native model holds one KV cache); "
                         "load the draft separately")


class _DraftCache:
    """A draft model's KV cache and the ids it holds. Kept with the model between generations (a chat's
    next turn shares the conversation so far), so each propose() runs only what is new."""

    def __init__(self, model):
        self.cache = model.new_cache()  # the draft's whole context (a native model's is mapped lazily)
        self.ids: list[int] = []


_DRAFT_CACHES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class DraftModel:
    """Drafts with a second model (anything generate() runs). Its cache holds `state.ids`; each
    propose() keeps the prefix of it that the history shares (the accepted drafts; a chat's earlier
    turns), runs the rest, then draws k tokens one forward at a time, from q = the same processed
    distribution plain sampling uses. One cache per draft model: generations that take turns with it
    re-run what they do not share, and a draft is only ever slower for it, never wrong (the target
    checks every draft)."""

    def __init__(self, model, params: SamplingParams, generator: np.random.Generator | None):
        self.model, self.params, self.generator = model, params, generator
        self.state = _DRAFT_CACHES.get(model)
        if self.state is None:
            self.state = _DRAFT_CACHES[model] = _DraftCache(model)

    def propose(self, ids: Sequence[int], k: int) -> tuple[list[int], np.ndarray | None]:
        """Up to k tokens to follow `ids`, and q float64 [n, vocab], the distribution each was drawn
        from (None when greedy: the argmax, one-hot)."""
        cache = self.state.cache
        k = min(k, cache.max_len + 1 - len(ids))  # the draft writes positions up to len(ids) + k - 2
        if k <= 0:
            return [], None
        ids = list(ids)
        keep = min(shared_prefix_len(ids, self.state.ids), cache.length, len(ids) - 1)
        cache.truncate(keep)
        self.state.ids = ids[:keep]  # (if a forward below fails, the cache holds no more than this)
        logits = self.model.last_logits(ids[keep:], cache)
        tokens, qs = [], []
        for j in range(k):
            if self.params.greedy:
                tokens.append(int(sample(logits, self.params)[0]))
            else:
                q = distribution(logits, self.params)[0]
                qs.append(q)
                tokens.append(draw(q, self.generator))
            if j + 1 < k:
                logits = self.model.last_logits(tokens[-1:], cache)
        self.state.ids = ids + tokens[:-1]
        return tokens, (np.stack(qs) if qs else None)


class BatchDrafter:
    """Drafts with a draft model for many sequences at once (a server's scheduler). The draft model's own
    many-sequence engine (engine/batch.py BatchEngine, sized for every sequence's full context) holds a
    draft sequence per target sequence (`key`); a round drafts for all of them in at most k batched
    steps of the draft model: the first runs what each draft sequence lacks of its history (at least the
    last token) and draws d1, each next one runs every sequence's previous draft and draws the next.
    Each draft is drawn as DraftModel draws it (the argmax, or from q = the processed distribution with
    the sequence's own generator, in the same order), so a sequence's drafts and draws are those of
    generate()'s DraftModel whatever else is drafted beside it (the engine is batch-invariant)."""

    def __init__(self, engine):
        self.engine = engine
        self._seqs: dict = {}  # key -> (draft sequence id, the ids its cache holds)

    def release(self, key) -> None:
        """The target sequence ended or gave its blocks back: free its draft sequence."""
        held = self._seqs.pop(key, None)
        if held is not None:
            self.engine.free_sequence(held[0])

    def room(self, history_len: int) -> int:
        """Most tokens the draft model can draft after a history of this length (it runs positions up to
        history_len + k - 2)."""
        return self.engine.max_len + 1 - history_len

    def draft(self, work: list) -> None:
        """work: (key, history, k, sp) per sequence drafting this round (k >= 1, within room()); each
        one's drafts go to sp.drafted() (a Speculator made with external=True)."""
        rows, out = [], {}  # the next step's entries; key -> (tokens, qs)
        for key, history, k, sp in work:
            if key not in self._seqs:
                self._seqs[key] = (self.engine.add_sequence(), [])
            sid, held = self._seqs[key]
            keep = min(shared_prefix_len(history, held), self.engine.seq_len(sid), len(history) - 1)
            self.engine.truncate(sid, keep)
            self._seqs[key] = (sid, list(history))
            rows.append((key, sid, list(history[keep:]), k, sp))
            out[key] = ([], [])
        while rows:
            logits = self.engine.step([(sid, toks) for _, sid, toks, _, _ in rows])
            nxt = []
            for (key, sid, toks, k, sp), row in zip(rows, logits):
                tokens, qs = out[key]
                if sp.params.greedy:
                    tokens.append(int(sample(row[None], sp.params)[0]))
                else:
                    qs.append(distribution(row[None], sp.params)[0])
                    tokens.append(draw(qs[-1], sp.generator))
                if len(tokens) < k:
                    self._seqs[key][1].append(tokens[-1])
                    nxt.append((key, sid, tokens[-1:], k, sp))
            rows = nxt
        for key, _, _, sp in work:
            tokens, qs = out[key]
            sp.drafted(tokens, np.stack(qs) if qs else None)


def drafter_for(spec: Speculative, model, params: SamplingParams, generator):
    if spec.method == "lookup":
        return PromptLookup(spec.ngram_max, spec.ngram_min)
    check_draft_model(model, spec.draft_model)
    return DraftModel(spec.draft_model, params, generator)


# ---- verification --------------------------------------------------------------------------------
def _accept(p_x: float, q_x: float, generator: np.random.Generator) -> bool:
    """Accept a draft x with probability min(1, p(x) / q(x)) (q(x) > 0: x was drawn from q)."""
    return generator.random() * q_x < p_x


def accept_drafts(rows: np.ndarray, draft: Sequence[int], q: np.ndarray | None, params: SamplingParams,
                  generator: np.random.Generator | None = None) -> tuple[list[int], int]:
    """The tokens one round emits, and how many of them are accepted drafts.

    rows: the target's float32 logits [len(draft) + 1, vocab]: row i is for the token after draft[:i].
    q: float64 [len(draft), vocab], the distribution each draft was drawn from, or None for drafts that
    are deterministic (prompt lookup, or any greedy drafter: one-hot q).
    Returns (tokens, a): tokens = draft[:a] + [one token of the target's], 1 .. len(draft) + 1 tokens.
    """
    rows = np.asarray(rows, dtype=np.float32)
    if rows.ndim != 2 or rows.shape[0] != len(draft) + 1:
        raise BitlmError(f"accept_drafts: expected logits [{len(draft) + 1}, vocab], got {list(rows.shape)}")
    out: list[int] = []
    for i, d in enumerate(draft):
        if params.greedy:
            t = int(sample(rows[i:i + 1], params)[0])  # the argmax, as plain decoding picks it
            if t != d:
                return out + [t], i
            out.append(t)
            continue
        p = distribution(rows[i:i + 1], params)[0]
        q_d = 1.0 if q is None else float(q[i, d])
        if _accept(float(p[d]), q_d, generator):
            out.append(int(d))
            continue
        if q is None:
            residual = p.copy()
            residual[d] = 0.0
        else:
            residual = np.maximum(p - q[i], 0.0)
        if not residual.sum() > 0:  # p equals q to rounding, so no rejection could be meant: draw from p
            residual = p
        return out + [draw(residual, generator)], i
    return out + [int(sample(rows[-1:], params, generator)[0])], len(draft)


# ---- one sequence's speculation -----------------------------------------------------------------
class Speculator:
    """The drafting and acceptance of one sequence, for a caller that runs the target itself (generate()
    below; a server's scheduler, whose engine runs many sequences' rows in one step). Per round:

        draft = sp.propose(history, room)       # history: the ids so far; the target's cache holds all but
                                                # the last; room: tokens that may still be drafted
        rows = <the target's logits of [history[-1]] + draft, run at the next positions: len(draft) + 1 rows>
        tokens, accepted = sp.accept(rows)      # 1 .. len(draft) + 1 tokens to emit, in order
        <truncate the target's cache to len(history) + accepted>

    It keeps the adaptive k and the counts (`stats`). external=True: the caller drafts itself (a server
    drafting for many sequences in one batched forward of the draft model, drawing each draft from this
    Speculator's generator): per round it asks want(room) for k, then hands the drafts to drafted()
    instead of calling propose()."""

    def __init__(self, spec: Speculative, model, params: SamplingParams, generator=None, external: bool = False):
        self.spec, self.params = spec, params
        self.generator = generator if generator is not None or params.greedy else params.generator()
        self.drafter = None if external else drafter_for(spec, model, params, self.generator)
        self.k = spec.draft_max
        self.pause = 0  # rounds left without drafting (adaptive)
        self._backoff = 0  # the length of the next pause
        self.stats = SpecStats()
        self._pending: tuple[list[int], np.ndarray | None] | None = None

    def want(self, room: int) -> int:
        """Tokens to draft this round: the adaptive k, within room (tokens that may still be drafted); 0
        while drafting is paused."""
        return 0 if self.pause else max(0, min(self.k, room))

    def propose(self, history: Sequence[int], room: int) -> list[int]:
        if self.drafter is None:
            raise BitlmError("Speculator.propose: this Speculator's caller drafts (external); use drafted()")
        k = self.want(room)
        self._pending = self.drafter.propose(history, k) if k else ([], None)
        return list(self._pending[0])

    @property
    def pending(self) -> list[int]:
        """This round's drafts (proposed or handed over), until accept()."""
        return [] if self._pending is None else list(self._pending[0])

    def drafted(self, draft: Sequence[int], q: np.ndarray | None) -> None:
        """This round's drafts, made by the caller: q float64 [len(draft), vocab], the distribution each
        was drawn from, or None for deterministic drafts (greedy: the argmax)."""
        self._pending = (list(draft), q)

    def accept(self, rows: np.ndarray) -> tuple[list[int], int]:
        if self._pending is None:
            raise BitlmError("Speculator.accept: call propose() first, once per round")
        (draft, q), self._pending = self._pending, None
        tokens, accepted = accept_drafts(rows, draft, q, self.params, self.generator)
        self.stats.rounds += 1
        self.stats.drafted += len(draft)
        self.stats.accepted += accepted
        if self.spec.adaptive:
            self._adapt(len(draft), accepted)
        return tokens, accepted

    def _adapt(self, drafted: int, accepted: int) -> None:
        if not drafted:
            self.pause = max(0, self.pause - 1)
        elif accepted == drafted:
            self.k, self._backoff = min(self.spec.draft_max, self.k + 2), 0
        elif self.k == 1:  # nothing kept at the floor: pause, twice as long as the last time
            self._backoff = min(PAUSE_MAX, 2 * self._backoff or 1)
            self.pause = self._backoff
        else:
            self.k = max(1, self.k - 1)


# ---- the generation loop -------------------------------------------------------------------------
def speculative_tokens(model, ids: list[int], params: SamplingParams, stops: set, detok, budget: int,
                       max_new_tokens: int, cache, sp: Speculator):
    """generate()'s loop with drafts (its arguments once checked; see generate._tokens). The same
    tokens are yielded and the same finish reason returned as plain decoding would (greedy: exactly,
    given batch invariance; sampled: in distribution). Afterwards the cache holds at most the prompt and
    the yielded tokens, as with plain decoding."""
    if budget == 0:
        return "length" if max_new_tokens == 0 else "context"
    history = list(ids)
    n = 0
    try:
        cache.truncate(len(ids) - 1)  # the last prompt token is run with the first round's drafts
        start = cache.length
        if start < len(ids) - 1:
            model.last_logits(ids[start:-1], cache, 0)
        while True:
            # a round emits up to k + 1 tokens (no more than are left) and writes positions
            # len(history) - 1 .. len(history) - 1 + k of the cache
            draft = sp.propose(history, min(budget - n - 1, cache.max_len - len(history)))
            rows = model.last_logits([history[-1]] + draft, cache, len(draft) + 1)
            tokens, accepted = sp.accept(rows)
            cache.truncate(len(history) + accepted)  # roll back the rejected drafts' positions
            for t in tokens:
                if t in stops:
                    return "stop"
                yield t
                n += 1
                history.append(t)
                if detok is not None:
                    detok.push(t)
                    if detok.stopped:
                        return "stop"
                if n == budget:
                    return "length" if n == max_new_tokens else "context"
    finally:
        cache.truncate(len(ids) + n)  # nothing past what was yielded, however the generation ended


class SpeculativeTokens:
    """The iterator generate() returns with speculation on: its tokens, StopIteration's finish reason and
    close() as the generator's, plus `speculative`, the SpecStats counted so far."""

    def __init__(self, gen, stats: SpecStats):
        self._gen, self.speculative = gen, stats

    def __iter__(self):
        return self

    def __next__(self) -> int:
        return next(self._gen)

    def close(self) -> None:
        self._gen.close()
