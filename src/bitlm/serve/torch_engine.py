"""The torch model under the server (`bitlm serve --device cuda`, or `--runtime torch` on the CPU).

TorchEngine has the interface of the batched engine (engine/batch.py, BatchEngine) that the scheduler
drives, with the block accounting and the step's checks of SequentialEngine (PerSequenceEngine in
serve/sequential_engine.py). Each sequence holds a KV cache of its own, model.new_cache: per layer
keys and values (1, kv_heads, max_len, head_dim) in the model's dtype on its device, so a step runs
each entry's tokens through the model in turn (prefill chunk or one decode token, as
engine.generate's prefill and decode_one do) and keeps the last position's logits. On a GPU the
model's products are the Triton kernels (gpu/linear.py, TritonBitLinear), on the CPU PackedBitLinear.

Not batched: a step of B sequences costs B forwards (rows of different lengths and positions would need
a padded or paged attention the torch model does not have). Memory: a sequence's cache is allocated
for the whole context when the sequence is first made and reused after it is freed, so max_seqs caches
at most; at the 2B4T shape (30 layers, 5 KV heads, head_dim 128) in bf16 that is 30 * 2 * 5 * 128 * 2 =
76.8 KB a position, 315 MB a sequence of 4096. `--ctx-size` (max_len) makes each smaller.
"""

from __future__ import annotations

import numpy as np

from ..errors import BitlmError
from ..model import BitNetForCausalLM, KVCache
from .sequential_engine import PerSequenceEngine


class TorchEngine(PerSequenceEngine):
    def __init__(self, model: BitNetForCausalLM, max_seqs: int = 16, kv_blocks: int | None = None,
                 block_size: int = 16, max_len: int | None = None):
        """model: bitlm's torch model (bitlm.load, any device, packed weights). max_len: the context of
        each sequence, at most (and by default) the model's."""
        if max_len is not None and (not isinstance(max_len, int) or max_len < 1):
            raise BitlmError(f"max_len must be an integer >= 1, got {max_len!r}")
        super().__init__(model.config, model.tokenizer, model.config.max_position_embeddings, max_seqs,
                         kv_blocks, block_size, max_len)
        self.model = model.eval()

    def _new_state(self) -> KVCache:
        return self.model.new_cache(max_len=self.max_len)

    def _reset(self, cache: KVCache) -> None:
        cache.reset()

    def _length(self, cache: KVCache) -> int:
        return cache.length

    def _truncate(self, cache: KVCache, length: int) -> None:
        if not isinstance(length, (int, np.integer)) or length < 0:
            raise BitlmError(f"truncate: length must be a non-negative integer, got {length!r}")
        cache.truncate(int(length))

    def _forward(self, cache: KVCache, tokens: np.ndarray, n_out: int | None) -> np.ndarray:
        if n_out is None:
            return self.model.last_logits(tokens.tolist(), cache)[0]  # float32 [vocab], on the CPU
        return self.model.last_logits(tokens.tolist(), cache, int(n_out))  # [n_out, vocab]
