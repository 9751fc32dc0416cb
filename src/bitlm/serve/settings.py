"""What `bitlm serve` is told: one frozen dataclass, checked where it is made."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import BitlmError

ENGINES = ("batch", "sequential")
SPECULATIVE = ("none", "lookup", "draft")


@dataclass(frozen=True)
class ServeSettings:
    model_name: str  # the id clients send as "model" and /v1/models lists
    host: str = "127.0.0.1"  # loopback unless asked: the API has no auth unless api_key is set
    port: int = 8000  # 0: any free port (the address is logged)
    max_seqs: int = 16  # sequences generated at once
    max_queue: int = 64  # requests waiting for a sequence; beyond: 429
    kv_blocks: int | None = None  # KV cache budget in blocks (None: max_seqs full contexts)
    block_size: int = 16  # positions per KV block (--block-size)
    prefill_chunk: int = 256  # prompt tokens per engine step, over all requests reading their prompt
    api_key: str | None = None  # when set, /v1/* needs "Authorization: Bearer <api_key>"
    max_body_bytes: int = 1 << 20  # request bodies above: 413
    drain_timeout: float = 30.0  # seconds SIGINT/SIGTERM waits for running requests before cancelling them
    engine: str = "batch"  # "batch": engine/batch.py, one forward for all; "sequential": one at a time
    max_len: int | None = None  # the torch engine's context per sequence (None: the model's); the native
    #                             runtime's is set when the model is loaded (--ctx-size there too)
    speculative: str = "none"  # "lookup": drafts by prompt lookup; "draft": by the draft model (scheduler.py)
    draft: str | None = None  # the draft model (speculative "draft"), as given to --draft
    draft_max: int = 8  # most tokens drafted per request and step
    lookup_ngram: int = 3  # the longest n-gram of a request's context matched

    def spec(self, draft_model=None):
        """The Speculative each request drafts with, or None. draft_model: the loaded draft (method draft)."""
        if self.speculative == "none":
            return None
        from ..engine.speculative import Speculative
        if self.speculative == "draft":
            return Speculative("draft", draft_max=self.draft_max, draft_model=draft_model)
        return Speculative("lookup", draft_max=self.draft_max, ngram_max=self.lookup_ngram)

    def __post_init__(self):
        for name in ("max_seqs", "max_queue", "block_size", "prefill_chunk", "max_body_bytes"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                flag = "--" + name.replace("_", "-") if name != "max_body_bytes" else name
                raise BitlmError(f"bitlm serve: {flag} must be an integer >= 1, got {v!r}")
        if self.max_len is not None and (not isinstance(self.max_len, int) or self.max_len < 1):
            raise BitlmError(f"bitlm serve: --ctx-size must be an integer >= 1, got {self.max_len!r}")
        if self.kv_blocks is not None and self.kv_blocks < 1:
            raise BitlmError(f"bitlm serve: --kv-blocks must be at least 1, got {self.kv_blocks}")
        if not 0 <= self.port <= 65535:
            raise BitlmError(f"bitlm serve: --port must be in 0..65535, got {self.port}")
        if self.api_key is not None and not self.api_key:
            raise BitlmError("bitlm serve: --api-key is empty; give a key or leave the option out")
        if self.engine not in ENGINES:
            raise BitlmError(f"bitlm serve: --engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.speculative not in SPECULATIVE:
            raise BitlmError(f"bitlm serve: --speculative must be one of {', '.join(SPECULATIVE)}, got "
                             f"{self.speculative!r}")
        if (self.speculative == "draft") != (self.draft is not None):
            raise BitlmError("bitlm serve: --draft MODEL goes with --speculative draft" if self.draft is not None
                             else "bitlm serve: --speculative draft needs a draft model: --draft MODEL (one "
                                  "sharing the model's tokenizer)")
        for name in ("draft_max", "lookup_ngram"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise BitlmError(f"bitlm serve: --{name.replace('_', '-')} must be an integer >= 1, got {v!r}")
        if self.drain_timeout < 0:
            raise BitlmError(f"bitlm serve: --drain-timeout must be >= 0 seconds, got {self.drain_timeout}")
