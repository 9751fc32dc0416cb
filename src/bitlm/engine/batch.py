"""Many sequences over one NativeModel's weights: the engine under continuous batching (issue 12).

A decode step reads every weight once, whatever the number of rows it multiplies, so B sequences
decoded in one pass cost about what one costs until the cores are saturated. A BatchEngine keeps any
number of sequences (up to max_seqs live at once), each with its own position and its own keys and
values, and runs a step of several of them as ONE native forward (kernels/forward.c,
bn_forward_paged): the projections once over all rows, attention per sequence over its own keys. A
step may mix decode rows (1 token) with chunks of new prompts (chunked prefill) and speculative
rows ([last, d1 .. dk], whose k + 1 rows of logits are all returned: see step's n_out).

The KV cache is paged, as vLLM does it: one pool of kv_blocks blocks, each holding block_size
positions of every layer's keys and values, [layers][2][kv_heads][block_size] rows of head_dim values
in the NativeModel's kv type (f16, f32, or q8_0: ceil(head_dim / 32) blocks of 34 bytes, the keys in
tiles of 16 positions, formats/q8_0.py, so block_size is then a multiple of 16). A sequence
takes a block from the pool when it reaches a new block_size positions and gives its blocks back when
it is freed or truncated, so memory follows the tokens actually held, not max_seqs full contexts. Its
block table (int32 block ids in position order) is passed to C with each step. At the 2B4T shape (30 layers, 5 KV heads, head_dim 128) a block of 16
positions is 30 * 2 * 5 * 16 * 128 * 2 = 1,228,800 bytes in f16 (76.8 KB a position; twice that in
f32; 30 * 2 * 5 * 16 * 136 = 652,800 in q8_0): the default 2 GiB budget holds 1,747 f16 blocks, 27,952
positions, e.g. 16 sequences of 1,747 (3,289 blocks in q8_0).
The pool is an anonymous mapping: untouched blocks cost no memory, and free blocks are handed out
lowest id first so the touched part stays compact. fork_sequence shares a sequence's blocks with a
new one (a common prompt run once, several completions of it): blocks carry reference counts, and a
shared block is copied when one of its holders writes into it (copy on write).

Batch invariance: a sequence's logits do not depend on what else is in the step, bit for bit, and
equal NativeModel.forward's for the same tokens: every float operation of the forward is per row
(per-row norms, int8 quantization and dequantization of exact integer sums), attention runs per
sequence over chunks of 256 keys counted from position 0, merged in chunk order, and the head is per row.

Threads: the engine's methods hold one lock, so a step runs alone and a sequence freed from another
thread (a client gone) waits for the step in flight to end before its blocks return to the pool. The
engine shares the native forward's scratch memory with its NativeModel: do not run nm.forward while a
step runs.
"""

from __future__ import annotations

import functools
import heapq
import threading
from dataclasses import dataclass

import numpy as np

from ..errors import BitlmError
from .native import KV_TILE, NativeModel, _zeros_pages, kv_row

DEFAULT_KV_BUDGET = 2 << 30  # bytes of KV pool when kv_blocks is None (see the module docstring)
_NS = 4  # bitnet.h BN_NS: n, pos, n_out, block table pointer per sequence


def kv_block_bytes(config, kv: str = "f16", block_size: int = 16) -> int:
    """Bytes of one pool block: block_size positions of every layer's keys and values."""
    c = config
    dtype, row = kv_row(kv, c.head_dim)
    return c.num_hidden_layers * 2 * c.num_key_value_heads * block_size * row * np.dtype(dtype).itemsize


def _locked(method):
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)
    return run


@dataclass
class _Seq:
    length: int
    blocks: np.ndarray  # int32 [ceil(max_len / block_size)], the first n_blocks used
    n_blocks: int = 0


class BatchEngine:
    """Many sequences over one NativeModel's weights, each with its own paged KV cache."""

    def __init__(self, nm: NativeModel, max_seqs: int = 16, kv_blocks: int | None = None,
                 block_size: int = 16, max_len: int | None = None):
        """nm: a NativeModel (its weights are shared; its own single-sequence KV cache is not used).
        max_seqs: sequences live at once. block_size: positions per KV block (a multiple of 16 with a q8_0
        cache: its keys are stored in tiles of 16). kv_blocks: blocks in the
        shared pool; None: enough for max_seqs full contexts, capped at DEFAULT_KV_BUDGET bytes (but at
        least one full context). max_len: the per-sequence context, at most (and by default) nm.max_len."""
        for name, v in (("max_seqs", max_seqs), ("block_size", block_size), ("kv_blocks", kv_blocks),
                        ("max_len", max_len)):
            if v is not None and (not isinstance(v, (int, np.integer)) or v < 1):
                raise BitlmError(f"BatchEngine: {name} must be a positive integer, got {v!r}")
        if nm.kv == "q8_0" and block_size % KV_TILE:
            raise BitlmError(f"BatchEngine: block_size {block_size} with a q8_0 KV cache must be a multiple of "
                             f"{KV_TILE} (its keys are cached in tiles of {KV_TILE}); pass e.g. block_size=16")
        if max_len is not None and max_len > nm.max_len:
            raise BitlmError(f"BatchEngine: max_len {max_len} exceeds the native model's context {nm.max_len}; "
                             "load the model with a larger max_len")
        self.nm = nm
        self.config = nm.config
        self.tokenizer = nm.tokenizer
        self.max_len = int(max_len or nm.max_len)
        self.max_seqs = int(max_seqs)
        self.block_size = int(block_size)
        c = nm.config
        dtype, row = kv_row(nm.kv, c.head_dim)  # a row: head_dim floats, or q8_0 blocks (bytes)
        self.block_shape = (c.num_hidden_layers, 2, c.num_key_value_heads, self.block_size, row)
        self.block_bytes = kv_block_bytes(c, nm.kv, self.block_size)
        per_seq = -(-self.max_len // self.block_size)
        if kv_blocks is None:
            kv_blocks = min(self.max_seqs * per_seq, max(per_seq, DEFAULT_KV_BUDGET // self.block_bytes))
        self._n_blocks = int(kv_blocks)
        self._pool_map, (self.pool,) = _zeros_pages(1, (self._n_blocks, *self.block_shape), dtype, huge=True)
        self._lock = threading.RLock()
        self._free = list(range(self._n_blocks))  # a heap: the lowest free id first
        self._refs = np.zeros(self._n_blocks, np.int32)  # sequences holding each block (fork_sequence shares)
        self._seqs: dict[int, _Seq] = {}
        self._next_id = 0
        self._per_seq = per_seq
        # rows per native call: a step with more rows runs as several calls (same logits; the forward's
        # scratch stays bounded), all decode rows in the first
        self.ubatch = max(64, self.max_seqs)

    # ---- sequences and blocks -------------------------------------------------------------------------
    @_locked
    def add_sequence(self) -> int:
        """A new empty sequence; its id (never reused)."""
        if len(self._seqs) >= self.max_seqs:
            raise BitlmError(f"BatchEngine: {self.max_seqs} sequences are live (max_seqs); free one first")
        sid = self._next_id
        self._next_id += 1
        self._seqs[sid] = _Seq(0, np.zeros(self._per_seq, np.int32))
        return sid

    def _seq(self, sid: int) -> _Seq:
        s = self._seqs.get(sid)
        if s is None:
            raise BitlmError(f"BatchEngine: no live sequence {sid!r}")
        return s

    @_locked
    def fork_sequence(self, sid: int) -> int:
        """A new sequence holding the same tokens as sid (a shared prompt, n > 1 completions): it shares
        sid's blocks instead of copying them, and a shared block is copied only when one of the
        sequences writes into it (copy on write: the partly filled last block, at its next step)."""
        s = self._seq(sid)
        new = self.add_sequence()
        t = self._seqs[new]
        t.length, t.n_blocks = s.length, s.n_blocks
        t.blocks[:s.n_blocks] = s.blocks[:s.n_blocks]
        self._refs[s.blocks[:s.n_blocks]] += 1
        return new

    def _take(self) -> int:
        b = heapq.heappop(self._free)
        self._refs[b] = 1
        return b

    def _release(self, blocks) -> None:
        for b in blocks:
            self._refs[b] -= 1
            if self._refs[b] == 0:
                heapq.heappush(self._free, int(b))

    def _shared_tail(self, s: _Seq) -> bool:
        """Whether s's next position falls in a block it shares: writing there copies the block first."""
        i = s.length // self.block_size
        return i < s.n_blocks and self._refs[s.blocks[i]] > 1

    @_locked
    def free_sequence(self, sid: int) -> None:
        """Ends a sequence and returns its blocks to the pool."""
        self.truncate(sid, 0)
        del self._seqs[sid]

    @_locked
    def seq_len(self, sid: int) -> int:
        return self._seq(sid).length

    @property
    @_locked
    def sequences(self) -> list[int]:
        """The live sequence ids."""
        return list(self._seqs)

    @_locked
    def blocks_needed(self, sid: int, n_tokens: int) -> int:
        """New blocks that appending n_tokens to sequence sid would take from the pool (a shared block
        written into counts: it is copied)."""
        s = self._seq(sid)
        if n_tokens <= 0:
            return 0
        return max(0, -(-(s.length + n_tokens) // self.block_size) - s.n_blocks) + int(self._shared_tail(s))

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self._n_blocks - len(self._free)

    @property
    def total_blocks(self) -> int:
        return self._n_blocks

    @_locked
    def truncate(self, sid: int, length: int) -> None:
        """Rolls sequence sid back to its first `length` positions (drops the keys and values of the
        later ones) and returns the blocks no longer needed to the pool."""
        s = self._seq(sid)
        if not isinstance(length, (int, np.integer)) or length < 0:
            raise BitlmError(f"BatchEngine.truncate: length must be a non-negative integer, got {length!r}")
        s.length = min(s.length, int(length))
        keep = -(-s.length // self.block_size)
        self._release(s.blocks[keep:s.n_blocks])
        s.n_blocks = min(s.n_blocks, keep)

    # ---- the step ---------------------------------------------------------------------------------------
    @_locked
    def step(self, work: list[tuple]) -> list[np.ndarray]:
        """One batched forward. work: entries of different sequences, (sid, token ids) or (sid, token
        ids, n_out), each token list appended at that sequence's next positions: decode rows (1 token),
        prompt chunks (many) and speculative rows ([last, d1 .. dk]) in any mix. Returns, per entry in
        order, the float32 [vocab] logits of the entry's last token for (sid, tokens), and the float32
        [n_out, vocab] logits of its last n_out tokens (0 .. len(tokens)) for (sid, tokens, n_out): the
        head runs only on the rows asked for (n_out = 0 for a prompt chunk that is not the last).
        Raises BitlmError, with nothing consumed and no sequence changed, if a sequence would pass
        max_len, the pool has too few free blocks, a token id is out of range, a sequence is unknown
        or listed twice, an entry has no tokens or n_out is out of range."""
        if not work:
            return []
        V = self.config.vocab_size
        entries = []  # (seq, tokens, n_out)
        rows_only = []  # per entry: True where the caller asked for [vocab] (no n_out)
        seen = set()
        need = 0
        for entry in work:
            if len(entry) not in (2, 3):
                raise BitlmError(f"BatchEngine.step: an entry is (sid, tokens) or (sid, tokens, n_out), got "
                                 f"{len(entry)} items")
            sid, toks = entry[0], entry[1]
            s = self._seq(sid)
            if sid in seen:
                raise BitlmError(f"BatchEngine.step: sequence {sid} appears twice in one step")
            seen.add(sid)
            t = np.ascontiguousarray(np.asarray(toks, dtype=np.int64).reshape(-1))
            if t.shape[0] == 0:
                raise BitlmError(f"BatchEngine.step: no tokens for sequence {sid}")
            if t.min() < 0 or t.max() >= V:
                raise BitlmError(f"BatchEngine.step: token id out of range [0, {V}) for sequence {sid}")
            if s.length + t.shape[0] > self.max_len:
                raise BitlmError(f"BatchEngine.step: sequence {sid} of {s.length + t.shape[0]} tokens exceeds the "
                                 f"context length {self.max_len}")
            n_out = 1 if len(entry) == 2 else entry[2]
            if not isinstance(n_out, (int, np.integer)) or isinstance(n_out, bool) or not 0 <= n_out <= t.shape[0]:
                raise BitlmError(f"BatchEngine.step: n_out must be an integer in 0..{t.shape[0]} (the entry's tokens) "
                                 f"for sequence {sid}, got {n_out!r}")
            need += self.blocks_needed(sid, t.shape[0])
            entries.append((s, t.astype(np.int32), int(n_out)))
            rows_only.append(len(entry) == 2)
        if need > len(self._free):
            raise BitlmError(f"BatchEngine.step: the KV pool has {len(self._free)} free blocks, this step needs "
                             f"{need}; free or truncate a sequence, or step fewer")
        before = [(s, s.length) for s, _, _ in entries]
        for s, t, _ in entries:
            if self._shared_tail(s):  # copy on write
                i = s.length // self.block_size
                old, s.blocks[i] = s.blocks[i], self._take()
                self.pool[s.blocks[i]] = self.pool[old]
                self._release([old])
            n = -(-(s.length + t.shape[0]) // self.block_size)
            for i in range(s.n_blocks, n):
                s.blocks[i] = self._take()
            s.n_blocks = n
        self.nm._fill_rope(max(s.length + t.shape[0] for s, t, _ in entries))
        try:
            out = self._run(entries)
        except (OSError, ValueError, MemoryError) as e:  # the native call failed: undo the whole step
            for s, length in before:  # (a block copied on write stays copied: the same contents)
                s.length = length
                keep = -(-length // self.block_size)
                self._release(s.blocks[keep:s.n_blocks])
                s.n_blocks = keep
            if isinstance(e, OSError):
                raise BitlmError(f"{self.nm._embed_file.name}: an embedding row could not be read (was the file "
                                 "truncated or replaced while in use?); load the model again") from None
            raise BitlmError(f"BatchEngine.step: the native forward failed ({e})") from None
        return [o[-1] if last else o for o, last in zip(out, rows_only)]

    def _run(self, entries: list) -> list[np.ndarray]:
        """The entries as native calls of at most ubatch rows: shortest entries first (decode rows all in
        the first call), a longer entry split over calls where it does not fit. An entry's n_out rows
        are its last, so they are the last rows of the pieces they fall in: each piece asks the C
        forward for its own share of them. Returns float32 [n_out, vocab] per entry (a view of the
        call's logits unless the rows came from several calls)."""
        V = self.config.vocab_size
        parts: list[list[np.ndarray]] = [[] for _ in entries]  # views of each call's logits, in row order
        order = sorted(range(len(entries)), key=lambda i: entries[i][1].shape[0])
        done = {i: 0 for i in order}  # tokens of entry i already run
        pending = list(order)
        while pending:
            pieces, rows = [], 0
            for i in pending:
                if rows == self.ubatch:
                    break
                s, t, _ = entries[i]
                k = min(t.shape[0] - done[i], self.ubatch - rows)
                pieces.append((i, done[i], k))
                rows += k
            seqs = np.zeros((len(pieces), _NS), np.int64)
            for j, (i, start, k) in enumerate(pieces):
                s, t, n_out = entries[i]
                # the wanted rows t.shape[0] - n_out .. end that fall in start .. start + k
                seqs[j] = (k, s.length, max(0, start + k - max(start, t.shape[0] - n_out)), s.blocks.ctypes.data)
            toks = np.concatenate([entries[i][1][start:start + k] for i, start, k in pieces])
            logits = np.empty((int(seqs[:, 2].sum()), V), np.float32)
            self.nm.n.forward_paged(self.nm._handle, toks.ctypes.data, seqs.ctypes.data, len(pieces),
                                    self.pool.ctypes.data, self.block_size, self._n_blocks, logits.ctypes.data)
            r = 0
            for j, (i, start, k) in enumerate(pieces):
                s, t, n_out = entries[i]
                m = int(seqs[j, 2])
                if m:  # this piece's share of the wanted rows (the pieces come in row order)
                    parts[i].append(logits[r:r + m])
                    r += m
                s.length += k
                done[i] += k
            pending = [i for i in pending if done[i] < entries[i][1].shape[0]]
        return [p[0] if len(p) == 1 else np.concatenate(p) if p else np.empty((0, V), np.float32) for p in parts]
