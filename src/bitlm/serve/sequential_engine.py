"""A many-sequence engine that runs its sequences one after another (`bitlm serve --engine sequential`):
the reference beside the batched engine, and the engine the server was first built on.

SequentialEngine has the interface of the batched engine (engine/batch.py, BatchEngine): sequences are
added and freed by id, and one `step` advances several of them, each by its own tokens, returning the
logits of each one's last token (or of its last n_out tokens). Here every sequence is a NativeModel of
its own over the SAME weight arrays (memory-mapped once; only the KV cache and RoPE tables are per
sequence, in lazily backed mappings), and step() runs the sequences' forwards in turn. So it is real and exact, just not batched:
its cost grows with the number of sequences where the batched engine's barely does.

KV memory is accounted in blocks of `block_size` positions as the paged cache hands them out: a
sequence of length L holds ceil(L / block_size) blocks, and a step that would need more blocks than are
free is refused whole, like the batched engine, so the scheduler's admission logic is exercised the same
way on either engine. That accounting, the sequence ids and the checks of a step live in
PerSequenceEngine, which the torch model's engine (serve/torch_engine.py) shares: a subclass only says
how to make, reset, measure, truncate and run one sequence's state.
"""

from __future__ import annotations

import numpy as np

from ..engine.native import NativeModel
from ..errors import BitlmError


class PerSequenceEngine:
    """The BatchEngine interface over one state per sequence (a model's KV cache), run one after
    another. Subclasses give _new_state, _reset, _length, _truncate and _forward."""

    def __init__(self, config, tokenizer, limit: int, max_seqs: int = 16, kv_blocks: int | None = None,
                 block_size: int = 16, max_len: int | None = None):
        """limit: the longest context the model's states can hold (max_len is cut to it). kv_blocks: the
        KV budget in blocks (default: enough for max_seqs full contexts)."""
        if not isinstance(max_seqs, int) or max_seqs < 1:
            raise BitlmError(f"max_seqs must be an integer >= 1, got {max_seqs!r}")
        if not isinstance(block_size, int) or block_size < 1:
            raise BitlmError(f"block_size must be an integer >= 1, got {block_size!r}")
        self.config = config
        self.tokenizer = tokenizer
        self.max_len = min(max_len or limit, limit)
        self.max_seqs = max_seqs
        self.block_size = block_size
        full = -(-self.max_len // block_size)
        self._total = max_seqs * full if kv_blocks is None else kv_blocks
        if not isinstance(self._total, int) or self._total < 1:
            raise BitlmError(f"kv_blocks must be an integer >= 1, got {kv_blocks!r}")
        self._pool: list = []  # idle states, reused (their memory is already allocated and touched)
        self._seqs: dict = {}
        self._next_sid = 0

    # ---- what a subclass gives ----------------------------------------------------------------------
    def _new_state(self):
        raise NotImplementedError

    def _reset(self, state) -> None:
        raise NotImplementedError

    def _length(self, state) -> int:
        raise NotImplementedError

    def _truncate(self, state, length: int) -> None:
        raise NotImplementedError

    def _forward(self, state, tokens: np.ndarray, n_out: int | None) -> np.ndarray:
        """Append int32 tokens [n] to the state; float32 [vocab] logits of the last one (n_out None) or
        [n_out, vocab] of the last n_out."""
        raise NotImplementedError

    # ---- sequences ---------------------------------------------------------------------------------
    def add_sequence(self) -> int:
        if len(self._seqs) >= self.max_seqs:
            raise BitlmError(f"all {self.max_seqs} sequences are in use; free one first")
        state = self._pool.pop() if self._pool else self._new_state()
        self._reset(state)
        sid = self._next_sid
        self._next_sid += 1
        self._seqs[sid] = state
        return sid

    def free_sequence(self, sid: int) -> None:
        self._pool.append(self._state(sid))
        del self._seqs[sid]

    def seq_len(self, sid: int) -> int:
        return self._length(self._state(sid))

    def truncate(self, sid: int, length: int) -> None:
        self._truncate(self._state(sid), length)

    def _state(self, sid: int):
        try:
            return self._seqs[sid]
        except (KeyError, TypeError):
            raise BitlmError(f"sequence {sid!r} is not live") from None

    # ---- KV blocks ---------------------------------------------------------------------------------
    def _blocks(self, length: int) -> int:
        return -(-length // self.block_size)

    def blocks_needed(self, sid: int, n_tokens: int) -> int:
        """Blocks that appending n_tokens to sequence sid would take beyond those it holds."""
        n = self.seq_len(sid)
        return self._blocks(n + n_tokens) - self._blocks(n)

    @property
    def total_blocks(self) -> int:
        return self._total

    @property
    def used_blocks(self) -> int:
        return sum(self._blocks(self._length(s)) for s in self._seqs.values())

    @property
    def free_blocks(self) -> int:
        return self._total - self.used_blocks

    # ---- running -----------------------------------------------------------------------------------
    def step(self, work: list[tuple]) -> list[np.ndarray]:
        """Append each entry's tokens to its sequence. Entries are (sid, tokens): float32 [vocab] logits
        of the last token, or (sid, tokens, n_out): float32 [n_out, vocab] of the last n_out tokens, as
        BatchEngine.step. Every entry is checked before any runs: on a BitlmError nothing has been
        consumed."""
        V = self.config.vocab_size
        seen, arrays, need = set(), [], 0
        for entry in work:
            if len(entry) not in (2, 3):
                raise BitlmError(f"a step entry is (sid, tokens) or (sid, tokens, n_out), got {len(entry)} items")
            sid, tokens = entry[0], entry[1]
            state = self._state(sid)
            if sid in seen:
                raise BitlmError(f"sequence {sid} appears twice in one step")
            seen.add(sid)
            t = np.ascontiguousarray(np.asarray(tokens, dtype=np.int64).reshape(-1))
            if t.size == 0:
                raise BitlmError(f"sequence {sid}: a step needs at least one token")
            n = self._length(state)
            if n + t.size > self.max_len:
                raise BitlmError(f"sequence {sid}: {n + t.size} tokens exceed the context length {self.max_len}")
            if t.min() < 0 or t.max() >= V:
                raise BitlmError(f"sequence {sid}: token id out of range [0, {V})")
            n_out = None if len(entry) == 2 else entry[2]
            if n_out is not None and (not isinstance(n_out, (int, np.integer)) or isinstance(n_out, bool)
                                      or not 0 <= n_out <= t.size):
                raise BitlmError(f"sequence {sid}: n_out must be an integer in 0..{t.size}, got {n_out!r}")
            need += self.blocks_needed(sid, t.size)
            arrays.append((state, t.astype(np.int32), n_out))
        if need > self.free_blocks:
            raise BitlmError(f"the step needs {need} KV blocks and {self.free_blocks} are free")
        return [self._forward(state, t, n_out) for state, t, n_out in arrays]


class SequentialEngine(PerSequenceEngine):
    def __init__(self, nm: NativeModel, max_seqs: int = 16, kv_blocks: int | None = None, block_size: int = 16,
                 max_len: int | None = None):
        """nm: the loaded model (its weights are shared by every sequence; its own cache becomes the first
        sequence's). kv_blocks: the KV budget in blocks (default: enough for max_seqs full contexts)."""
        super().__init__(nm.config, nm.tokenizer, nm.max_len, max_seqs, kv_blocks, block_size, max_len)
        self.nm = nm
        self._pool.append(nm)

    def _new_state(self) -> NativeModel:
        return NativeModel(self.nm.config, self.nm.arrays, max_len=self.max_len, kv=self.nm.kv)

    def _reset(self, m: NativeModel) -> None:
        m.reset()

    def _length(self, m: NativeModel) -> int:
        return m.pos

    def _truncate(self, m: NativeModel, length: int) -> None:
        m.truncate(length)

    def _forward(self, m: NativeModel, tokens: np.ndarray, n_out: int | None) -> np.ndarray:
        return m.forward(tokens, 1)[0] if n_out is None else m.forward(tokens, int(n_out))
