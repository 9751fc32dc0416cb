"""The scheduler: one asyncio task that owns the engine and runs it step after step (continuous batching).

Each iteration of the loop, between two engine steps:
  - requests whose client went away (or that finished) give their sequence back to the engine;
  - the running requests get their work: one token each for those decoding, and at most
    `prefill_chunk` tokens in all for those still reading their prompt (chunked prefill: a long prompt
    takes several steps, and the others' decodes go on meanwhile);
  - waiting requests join, first come first served, while a sequence is free and the KV blocks of
    their whole prompt are free beside what this step's running work takes;
  - KV blocks are taken on demand as sequences grow (the paged cache). When a step needs more blocks
    than are free, the request admitted last is preempted, as vLLM does: its sequence is freed and it
    goes back to the head of the queue, keeping the tokens it generated; when it runs again its prompt
    and those tokens are recomputed (prefilled) and generation goes on where it stopped, with the same
    tokens, since logits do not depend on how the positions were chunked;
  - one engine step runs, then each request whose context is all in the cache samples its next token
    (bitlm.engine.sampling, the request's own seeded generator), and its Detokenizer
    (bitlm.engine.generate) turns tokens into text, holding back what may be the start of a stop string.
Speculative decoding (`bitlm serve --speculative lookup`, or `--draft MODEL`; engine/speculative.py): a
request whose entry reaches the end of its context (decoding: its last token; or its prompt's last
chunk) gets up to k drafts, proposed from its history by its own Speculator (prompt lookup) or by the
BatchDrafter (the draft model, every drafting request in the same few batched steps of its own engine,
before the target's step): its entry becomes [.., last, d1 .. dk], run in the same step as everyone's
rows, with the logits of its k + 1 last rows. accept_drafts keeps d1 .. da and adds one token of the
target's (greedy: the same tokens as plain decoding; sampled: the exact accept/reject rule, from the
request's seeded generator), the engine truncates the rejected positions, and the 1 .. k + 1 tokens go
through the stop rules one by one, in order: nothing past a stop or max_tokens is emitted. Drafts only
take KV blocks that are free once the plain work is planned (they never cause a preemption), and never
reach past max_tokens or the context. The calls to the Speculator are those generate() makes, so a
sampled request's tokens are generate(..., speculative=...)'s with the same seed, whatever the batching
and preemptions, unless a lack of free KV blocks cut its drafts short (then they follow the same
distribution, by other draws).
The step, sampling and detokenizing run in one dedicated worker thread (the engine is only ever touched
from it), so the event loop keeps answering HTTP while the CPU computes. The stop rules are those of
engine.generate: a stop token ends the request and is not part of the output; the token that completes a
stop string is counted and the string is cut from the text; max_tokens ends it with "length".
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import itertools
import logging
import time

from ..engine.generate import Detokenizer
from ..engine.sampling import SamplingParams, sample
from ..engine.speculative import Speculative, Speculator
from ..errors import BitlmError
from .schemas import APIError

log = logging.getLogger("bitlm.serve")

TOKENS_PER_S_WINDOW = 10.0  # seconds over which the tokens/s gauge is averaged


class GenRequest:
    """One generation: its prompt ids, how to sample and when to stop, and where its output goes."""

    _ids = itertools.count()

    def __init__(self, ids: list[int], params: SamplingParams, max_tokens: int, stop_token_ids,
                 detok: Detokenizer, speculative: Speculative | None = None):
        self.rid = next(self._ids)
        self.ids, self.params, self.max_tokens = list(ids), params, max_tokens
        self.stops = frozenset(stop_token_ids)
        self.detok = detok
        self.generator = None if params.greedy else params.generator()
        # its drafting: its own n-gram index (lookup) or draft sequence (draft, drafted by the scheduler's
        # BatchDrafter beside the others'), adaptive k and counts
        self.spec = None if speculative is None else Speculator(speculative, None, params, self.generator,
                                                                external=speculative.method == "draft")
        self.sid: int | None = None
        self.fed = 0  # tokens of context() in the engine's KV cache
        self.preemptions = 0
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None  # "stop", "length"; "cancelled" when the client left
        self.error: APIError | None = None
        self.cancelled = False
        self.events: asyncio.Queue = asyncio.Queue()  # text pieces, then None at the end
        self.done = asyncio.Event()
        self.t_submit = time.monotonic()
        self.t_first: float | None = None

    def context(self) -> list[int]:
        """The prompt and the tokens generated: what the sequence holds once the last one is fed."""
        return self.ids + self.token_ids

    @property
    def text(self) -> str:
        return self.detok.text

    def _finish(self, reason: str) -> str:
        """End the generation; the text still held back by the Detokenizer."""
        self.finish_reason = reason
        return "" if self.detok.stopped else self.detok.flush()


class Scheduler:
    def __init__(self, engine, max_seqs: int, max_queue: int = 64, prefill_chunk: int = 256, drafter=None):
        """engine: a BatchEngine (engine/batch.py) or anything with its interface (serve/sequential_engine.py)
        made for max_seqs sequences. Requests made with a Speculative draft each step (see above); those
        of method "draft" through `drafter`, an engine.speculative.BatchDrafter over the draft model."""
        if prefill_chunk < 1:
            raise BitlmError(f"prefill_chunk must be at least 1, got {prefill_chunk}")
        self.engine = engine
        self.drafter = drafter
        self.max_seqs = max_seqs
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self.waiting: collections.deque[GenRequest] = collections.deque()
        self.running: list[GenRequest] = []
        self.draining = False
        self._to_free: list[int] = []
        self._closing = False
        self._wake = asyncio.Event()
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="bitlm-engine")
        self._task: asyncio.Task | None = None
        # metrics
        self.generated_tokens = 0
        self.prompt_tokens = 0
        self.steps = 0
        self.preempted = 0
        self.finished = collections.Counter()  # by finish reason / "error"
        self.spec_rounds = self.spec_drafted = self.spec_accepted = 0  # speculative rounds, drafts, accepted
        self._recent: collections.deque[tuple[float, int]] = collections.deque()  # (time, tokens) per step
        self.kv_used, self.kv_total = 0, engine.total_blocks

    # ---- the API the routes use -----------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="bitlm-scheduler")

    def submit(self, req: GenRequest) -> None:
        """Queue a request (checked already: it fits the context), or refuse it: 503 while shutting down,
        400 when it could not fit the whole KV cache, 429 when the waiting queue is full."""
        if self.draining or self._closing:
            raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
        need = -(-(len(req.ids) + req.max_tokens - 1) // self.engine.block_size)
        if need > self.engine.total_blocks:
            raise APIError(400, f"the prompt and max_tokens need {need} KV blocks of {self.engine.block_size} "
                                f"positions, and the server has {self.engine.total_blocks} in all; lower max_tokens",
                           param="max_tokens", code="context_length_exceeded")
        if len(self.waiting) >= self.max_queue:
            raise APIError(429, f"the server is busy: {len(self.running)} requests running and {len(self.waiting)} "
                                "waiting, the most it queues; retry later", type="rate_limit_error", code="queue_full")
        self.waiting.append(req)
        self._wake.set()

    def cancel(self, req: GenRequest) -> None:
        """The client went away: stop generating; its sequence is freed at the next step."""
        if req.finish_reason is None and req.error is None:
            req.cancelled = True
            self._wake.set()

    def tokens_per_s(self) -> float:
        self._trim_recent(time.monotonic())
        return sum(n for _, n in self._recent) / TOKENS_PER_S_WINDOW

    def begin_drain(self) -> None:
        """No new requests; those queued and running go on to their end."""
        self.draining = True

    async def close(self) -> None:
        """Cancel what is still queued or running, free the sequences and stop the loop and its thread."""
        self._closing = True
        for req in list(self.waiting) + self.running:
            req.cancelled = True
        self._wake.set()
        if self._task is not None:
            await self._task
        self._thread.shutdown(wait=True)

    # ---- the loop ------------------------------------------------------------------------------------
    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._drop_cancelled()
            if not self.running and not self.waiting:
                if self._to_free:  # give the sequences back even when nothing else runs
                    to_free, self._to_free = self._to_free, []
                    await loop.run_in_executor(self._thread, self._free, to_free)
                    self.kv_used = self.engine.used_blocks
                    continue  # a request may have come meanwhile: look again before sleeping
                if self._closing:
                    return
                self._wake.clear()  # no await between the look at the queues and here: no wake-up is lost
                await self._wake.wait()
                continue
            to_free, self._to_free = self._to_free, []
            candidates = list(itertools.islice(self.waiting, self.max_seqs - len(self.running)))
            try:
                admitted, preempted, out = await loop.run_in_executor(
                    self._thread, self._iteration, to_free, candidates, list(self.running))
            except Exception as e:  # a bug: fail what was in flight, keep serving
                log.exception("engine step failed")
                self._fail_all(candidates, e)
                continue
            self._apply(admitted, preempted, out)

    def _drop_cancelled(self) -> None:
        for req in [r for r in self.waiting if r.cancelled]:
            self.waiting.remove(req)
            self._end(req, "cancelled")
        for req in [r for r in self.running if r.cancelled]:
            self.running.remove(req)
            self._to_free.append(req.sid)
            self._end(req, "cancelled")

    def _end(self, req: GenRequest, reason: str, error: APIError | None = None) -> None:
        if error is not None:
            req.error = error
            self.finished["error"] += 1
        else:
            req.finish_reason = req.finish_reason or reason
            self.finished[req.finish_reason] += 1
        req.events.put_nowait(None)
        req.done.set()

    def _fail_all(self, candidates: list[GenRequest], e: Exception) -> None:
        err = APIError(500, f"the engine failed: {e}", type="server_error", code="engine_error")
        for req in self.running + [r for r in candidates if r.sid is not None]:
            if req.sid is not None:
                self._to_free.append(req.sid)
            if req in self.waiting:
                self.waiting.remove(req)
            self._end(req, "error", err)
        self.running = []

    def _apply(self, admitted, preempted, out) -> None:
        """Back on the event loop after a step: move requests between the lists, deliver text, count."""
        for req in admitted:
            self.waiting.remove(req)
            self.running.append(req)
            if req.preemptions == 0:
                self.prompt_tokens += len(req.ids)
        for req in reversed(preempted):  # back to the head of the queue, in their order
            self.running.remove(req)
            self.waiting.appendleft(req)
        self.preempted += len(preempted)
        t = time.monotonic()
        n_new = 0
        for req, pieces, new_tokens, finished in out:
            n_new += new_tokens
            if new_tokens and req.t_first is None:
                req.t_first = t
                req.events.put_nowait("")  # the first token: a stream's headers go out now
            for piece in pieces:  # one per token (a speculative round brings several), in order
                if piece:
                    req.events.put_nowait(piece)
            if finished:
                self.running.remove(req)
                self._to_free.append(req.sid)
                self._end(req, req.finish_reason)
        self.generated_tokens += n_new
        self.steps += 1
        self._recent.append((t, n_new))
        self._trim_recent(t)

    def _trim_recent(self, t: float) -> None:
        while self._recent and self._recent[0][0] < t - TOKENS_PER_S_WINDOW:
            self._recent.popleft()

    # ---- in the engine's thread ---------------------------------------------------------------------
    def _free(self, sids: list[int]) -> None:
        for sid in sids:
            self.engine.free_sequence(sid)
            if self.drafter is not None:
                self.drafter.release(sid)  # its draft sequence, if it has one

    def _iteration(self, to_free: list[int], candidates: list[GenRequest], running: list[GenRequest]):
        """Free, plan, admit, preempt, draft, one engine step, sample (or accept drafts). Returns
        (admitted, preempted, [(req, text pieces, tokens generated, finished)])."""
        eng = self.engine
        self._free(to_free)
        budget = self.prefill_chunk

        def chunk(req: GenRequest) -> list[int]:
            nonlocal budget
            ctx = req.context()
            if len(ctx) - req.fed == 1:  # decoding: the token sampled last
                return ctx[-1:]
            take = ctx[req.fed:req.fed + budget]  # reading the prompt (or recomputing after preemption)
            budget -= len(take)
            return take

        plan = [(req, chunk(req)) for req in running]
        free = eng.free_blocks - sum(eng.blocks_needed(req.sid, len(t)) for req, t in plan if t)
        admitted = []
        for req in candidates:
            if len(running) + len(admitted) >= self.max_seqs:
                break
            need = -(-len(req.context()) // eng.block_size)  # its whole prompt, so it is not preempted at once
            if need > free:
                break
            req.sid, req.fed = eng.add_sequence(), 0
            free -= need
            admitted.append(req)
            plan.append((req, chunk(req)))
        order = [req for req, _ in plan]  # admission order: the last gives way first
        plan = [(req, t) for req, t in plan if t]
        preempted = []
        while sum(eng.blocks_needed(req.sid, len(t)) for req, t in plan) > eng.free_blocks and len(order) > 1:
            victim = order.pop()
            self._free([victim.sid])
            victim.sid, victim.fed = None, 0
            plan = [(req, t) for req, t in plan if req is not victim]
            if victim in admitted:
                admitted.remove(victim)  # admitted and preempted in one go: it simply stays queued
            else:
                victim.preemptions += 1
                preempted.append(victim)

        # drafts, for the entries that reach the end of their context, within the blocks left free
        spec = [(req, t) for req, t in plan if req.spec is not None]
        free = eng.free_blocks - sum(eng.blocks_needed(req.sid, len(t)) for req, t in plan) if spec else 0
        drafting = []  # (req, k): requests the draft model drafts for, all in one go below
        for req, t in spec:
            ctx_len = len(req.ids) + len(req.token_ids)
            if req.fed + len(t) < ctx_len:
                continue
            # up to the tokens left but one (the round adds a token of its own) and the context's end
            room = min(req.max_tokens - len(req.token_ids) - 1, eng.max_len - ctx_len)
            if req.spec.drafter is None:
                room = min(room, self.drafter.room(ctx_len))
            base = eng.blocks_needed(req.sid, len(t))
            while room > 0 and eng.blocks_needed(req.sid, len(t) + room) - base > free:
                room -= 1
            if req.spec.drafter is not None:
                k = len(req.spec.propose(req.context(), room))
            else:
                k = req.spec.want(room)
                if k:
                    drafting.append((req, k))
                else:
                    req.spec.drafted([], None)
            free -= eng.blocks_needed(req.sid, len(t) + k) - base
        if drafting:
            self.drafter.draft([(req.sid, req.context(), k, req.spec) for req, k in drafting])
        work = []  # (req, tokens run, n_out, drafts)
        for req, t in plan:
            if req.fed + len(t) < len(req.ids) + len(req.token_ids):
                work.append((req, t, 0, []))  # a prompt chunk that is not the last: no logits wanted
                continue
            drafts = [] if req.spec is None else req.spec.pending
            work.append((req, t + drafts, len(drafts) + 1, drafts))
        logits = eng.step([(req.sid, t, n_out) for req, t, n_out, _ in work]) if work else []

        out = []
        for (req, tokens, n_out, drafts), rows in zip(work, logits):
            if n_out == 0:
                req.fed += len(tokens)
                continue  # more of the context next step
            ctx_len = req.fed + len(tokens) - len(drafts)  # the context, all in the cache now
            if req.spec is not None:
                new, accepted = req.spec.accept(rows)  # 1 .. len(drafts) + 1 tokens
                if accepted < len(drafts):
                    eng.truncate(req.sid, ctx_len + accepted)  # roll back the rejected drafts' positions
                self.spec_rounds += 1
                self.spec_drafted += len(drafts)
                self.spec_accepted += accepted
            else:
                new = [int(sample(rows, req.params, req.generator)[0])]
                accepted = 0
            req.fed = ctx_len + accepted
            out.append(self._emit(req, new))
        self.kv_used = eng.used_blocks
        return admitted, preempted, out

    @staticmethod
    def _emit(req: GenRequest, new: list[int]):
        """The stop rules over a step's new tokens, one at a time: (req, text pieces, tokens counted,
        finished). A stop token ends the request uncounted, the token completing a stop string or
        reaching max_tokens ends it counted; what follows is dropped."""
        pieces = []
        for token in new:
            if token in req.stops:
                return req, pieces + [req._finish("stop")], len(pieces), True
            req.token_ids.append(token)
            pieces.append(req.detok.push(token))
            if req.detok.stopped:
                return req, pieces + [req._finish("stop")], len(pieces), True
            if len(req.token_ids) >= req.max_tokens:
                return req, pieces + [req._finish("length")], len(pieces), True
        return req, pieces, len(pieces), False
