"""The HTTP layer: the FastAPI app, its routes, the guard (API key, body size), errors as OpenAI bodies.

    GET  /health                 {"status": "ok", ...} (503 while shutting down)
    GET  /metrics                Prometheus text
    GET  /v1/models              the one model served
    POST /v1/completions         prompt (text or token ids) -> text; stream via server-sent events
    POST /v1/chat/completions    messages through the chat template -> the assistant's reply

Every error, including a bad body, an unknown route and a bug, answers with an OpenAI error body
`{"error": {"message", "type", "param", "code"}}`; a bug is logged and answered 500, and the server
goes on. The engine is only touched by the scheduler's thread; a route tokenizes, checks that the
request fits the context (400 before any work), queues it and relays its text.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import json
import logging
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine.generate import Detokenizer
from ..engine.sampling import SamplingParams
from ..errors import BitlmError
from . import schemas
from .scheduler import GenRequest, Scheduler
from .schemas import APIError, bad_request
from .settings import ServeSettings

log = logging.getLogger("bitlm.serve")

GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")
CLIENT_GONE = 499  # nginx's "client closed request": the status counted when a client leaves before its answer


def create_app(engine, settings: ServeSettings, drafter=None) -> FastAPI:
    """The app serving `engine` (a BatchEngine or anything with its interface, made for settings.max_seqs
    sequences). The scheduler starts and stops with the app (its lifespan). drafter: the BatchDrafter
    (engine/speculative.py) of settings.speculative "draft"."""
    if (settings.speculative == "draft") != (drafter is not None):
        raise BitlmError("bitlm serve: --speculative draft and a draft model go together")
    tok = engine.tokenizer
    if tok is None:
        raise BitlmError("bitlm serve: the model has no tokenizer.json next to its weights; the server needs one")
    status_counts: collections.Counter = collections.Counter()  # (path, HTTP status) of generation requests
    created = int(time.time())
    speculative = settings.spec(None if drafter is None else drafter.engine.nm)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.scheduler = Scheduler(engine, settings.max_seqs, settings.max_queue, settings.prefill_chunk,
                                        drafter)
        app.state.scheduler.start()
        try:
            yield
        finally:
            s = app.state.scheduler
            await s.close()
            log.info("stopped: %d requests ended (%s), %d tokens generated%s", sum(s.finished.values()),
                     ", ".join(f"{r} {n}" for r, n in sorted(s.finished.items())) or "none", s.generated_tokens,
                     f"; drafts accepted {s.spec_accepted}/{s.spec_drafted}"
                     f" ({s.spec_accepted / max(s.spec_drafted, 1):.1%}) in {s.spec_rounds} rounds"
                     if speculative is not None else "")

    app = FastAPI(title="bitlm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.state.settings = settings

    # ---- errors ---------------------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):  # unknown route, wrong method
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return JSONResponse(APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}",
                                     code=code).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def bug(request: Request, e: Exception):
        log.exception("unexpected error in %s %s", request.method, request.url.path)
        return JSONResponse(APIError(500, f"internal server error ({type(e).__name__})", type="server_error",
                                     code="internal_error").body(), status_code=500)

    # ---- routes ---------------------------------------------------------------------------------------
    @app.get("/health")
    async def health(request: Request):
        s: Scheduler = request.app.state.scheduler
        body = {"status": "draining" if s.draining else "ok", "running": len(s.running), "waiting": len(s.waiting)}
        return JSONResponse(body, status_code=503 if s.draining else 200)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        check_model(name)
        return model_card()

    def model_card() -> dict:
        return {"id": settings.model_name, "object": "model", "created": created, "owned_by": "bitlm",
                "max_model_len": engine.max_len}

    def check_model(name: str) -> None:
        if name != settings.model_name:
            raise APIError(404, f"The model `{name}` does not exist; this server serves `{settings.model_name}`",
                           param="model", code="model_not_found")

    @app.get("/metrics")
    async def metrics(request: Request):
        return PlainTextResponse(render_metrics(request.app.state.scheduler, status_counts),
                                 media_type="text/plain; version=0.0.4")

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await parse(request, schemas.CompletionRequest)
        check_model(body.model)
        prompt = body.single_prompt()
        if isinstance(prompt, str):
            ids = await asyncio.to_thread(tok.encode, prompt)  # with BOS, as engine.generate's stream_text
        else:
            ids = list(prompt)
            V = engine.config.vocab_size
            if min(ids) < 0 or max(ids) >= V:
                raise bad_request(f"prompt: token ids must be in [0, {V})", param="prompt")
        return await generate(request, body, ids, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await parse(request, schemas.ChatCompletionRequest)
        check_model(body.model)
        try:
            ids = await asyncio.to_thread(tok.encode_chat, body.chat_messages())
        except BitlmError as e:  # no chat template, or the template refused the messages
            raise bad_request(str(e), param="messages") from None
        return await generate(request, body, ids, chat=True)

    # ---- generation -----------------------------------------------------------------------------------
    async def generate(request: Request, body, ids: list[int], chat: bool):
        scheduler: Scheduler = request.app.state.scheduler
        req = make_request(body, ids, chat)
        scheduler.submit(req)
        rid = schemas.new_id("chatcmpl" if chat else "cmpl")
        t = schemas.now()
        if not body.stream:
            if not await until(request, scheduler, req, req.done):
                return Response(status_code=CLIENT_GONE)
            if req.error is not None:
                raise req.error
            use = schemas.usage(len(ids), len(req.token_ids))
            if chat:
                return schemas.chat_body(rid, settings.model_name, req.text, req.finish_reason, t, use)
            return schemas.completion_body(rid, settings.model_name, req.text, req.finish_reason, t, use)
        # headers wait for the first token, so an error found on admission still gets its status
        first = asyncio.ensure_future(req.events.get())
        if not await until(request, scheduler, req, first):
            return Response(status_code=CLIENT_GONE)
        if req.error is not None and first.result() is None:
            raise req.error
        return StreamingResponse(sse(scheduler, req, first.result(), rid, t, chat, body.include_usage),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def make_request(body, ids: list[int], chat: bool) -> GenRequest:
        n, limit = len(ids), engine.max_len
        if n == 0:
            raise bad_request("the prompt is empty", param="prompt")
        what = "messages" if chat else "prompt"
        if n >= limit:
            raise bad_request(f"This model's maximum context length is {limit} tokens, and your {what} "
                              f"is {n} tokens; shorten it", param=what, code="context_length_exceeded")
        asked = body.max_new if chat else body.max_tokens
        explicit = ("max_completion_tokens" in body.model_fields_set or "max_tokens" in body.model_fields_set)
        if asked is None or not explicit:  # chat: up to the context (OpenAI); completions: 16, within it
            # ... and within the whole KV cache, when it holds less than one context (--kv-blocks)
            room = min(limit, engine.total_blocks * engine.block_size + 1) - n
            asked = room if asked is None else min(asked, room)
            if asked < 1:
                raise bad_request(f"the {what} of {n} tokens leaves no room in the KV cache "
                                  f"({engine.total_blocks} blocks of {engine.block_size}); shorten it",
                                  param=what, code="context_length_exceeded")
        elif n + asked > limit:
            raise bad_request(f"This model's maximum context length is {limit} tokens; your {what} is {n} "
                              f"tokens and max_tokens {asked}: lower max_tokens to at most {limit - n}",
                              param="max_completion_tokens" if chat and body.max_completion_tokens else "max_tokens",
                              code="context_length_exceeded")
        try:
            params = SamplingParams(body.temperature, max(body.top_k, 0), body.top_p, body.seed)
            detok = Detokenizer(tok, body.stop_strings)
        except BitlmError as e:
            raise bad_request(str(e)) from None
        stops = () if body.ignore_eos else tok.stop_token_ids
        return GenRequest(ids, params, asked, stops, detok, speculative)

    async def sse(scheduler: Scheduler, req: GenRequest, first: str | None, rid: str, t: int, chat: bool,
                  include_usage: bool):
        name = settings.model_name

        def event(obj) -> str:
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        def chunk(text: str | None, finish: str | None = None) -> str:
            if chat:
                delta = {} if text is None else {"content": text}
                return event(schemas.chat_chunk(rid, name, t, delta, finish))
            return event(schemas.completion_body(rid, name, text or "", finish, t, chunk=True))

        try:
            if chat:
                yield event(schemas.chat_chunk(rid, name, t, {"role": "assistant", "content": ""}))
            piece = first
            while piece is not None:
                if piece:  # "" marks the first token, whose text the Detokenizer may still hold back
                    yield chunk(piece)
                piece = await req.events.get()
            if req.error is not None:
                yield event(req.error.body())
            elif req.finish_reason == "cancelled":  # the server is shutting down
                yield event(APIError(503, "the server shut down before the generation ended",
                                     type="server_error", code="shutting_down").body())
            else:
                yield chunk(None, req.finish_reason)
                if include_usage:
                    use = schemas.usage(len(req.ids), len(req.token_ids))
                    yield event(schemas.chat_chunk(rid, name, t, None, use=use) if chat else
                                {**schemas.completion_body(rid, name, "", None, t, chunk=True), "choices": [],
                                 "usage": use})
            yield "data: [DONE]\n\n"
        finally:  # the client went away (the task is cancelled here), or the stream ended
            scheduler.cancel(req)

    app.add_middleware(Guard, settings=settings, status_counts=status_counts)
    return app


async def parse(request: Request, cls):
    """The body as `cls`, or a 400 naming what is wrong (JSON syntax, a field's type or value)."""
    raw = await request.body()

    def no_constants(name):  # NaN and Infinity are not JSON
        raise ValueError(f"{name} is not valid JSON")

    try:
        obj = json.loads(raw, parse_constant=no_constants)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise bad_request(f"the request body is not valid JSON: {str(e)[:200]}", code="invalid_json") from None
    if not isinstance(obj, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(obj).__name__}", code="invalid_json")
    try:
        return cls.model_validate(obj)
    except ValidationError as e:
        raise schemas.validation_error(e) from None


async def until(request: Request, scheduler: Scheduler, req: GenRequest, awaitable) -> bool:
    """Wait for `awaitable` while watching the connection: a client that leaves cancels its request
    (False)."""
    async def disconnected():
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    task = asyncio.ensure_future(awaitable) if not isinstance(awaitable, asyncio.Event) else \
        asyncio.ensure_future(awaitable.wait())
    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if not task.done():
        task.cancel()
        scheduler.cancel(req)
        return False
    return True


def render_metrics(s: Scheduler, status_counts: collections.Counter) -> str:
    """Prometheus text exposition format 0.0.4."""
    lines = []

    def metric(name, kind, help_, samples):
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lab = ",".join(f'{k}="{v}"' for k, v in labels.items())
            lines.append(f"{name}{{{lab}}} {value}" if lab else f"{name} {value}")

    metric("bitlm_requests_running", "gauge", "Requests holding a sequence in the engine.", [({}, len(s.running))])
    metric("bitlm_requests_waiting", "gauge", "Requests queued for a sequence.", [({}, len(s.waiting))])
    metric("bitlm_kv_blocks_used", "gauge", "KV cache blocks in use.", [({}, s.kv_used)])
    metric("bitlm_kv_blocks_total", "gauge", "KV cache blocks in all.", [({}, s.kv_total)])
    metric("bitlm_generated_tokens_total", "counter", "Tokens generated.", [({}, s.generated_tokens)])
    metric("bitlm_prompt_tokens_total", "counter", "Prompt tokens of admitted requests.", [({}, s.prompt_tokens)])
    metric("bitlm_generation_tokens_per_second", "gauge",
           "Tokens generated per second over the last 10 seconds.", [({}, f"{s.tokens_per_s():.3f}")])
    metric("bitlm_engine_steps_total", "counter", "Engine steps run.", [({}, s.steps)])
    metric("bitlm_preemptions_total", "counter", "Requests that gave their sequence back for lack of KV blocks "
           "(recomputed when they run again).", [({}, s.preempted)])
    metric("bitlm_speculative_rounds_total", "counter", "Speculative rounds: decode entries that checked drafts "
           "(0 drafts included; --speculative).", [({}, s.spec_rounds)])
    metric("bitlm_speculative_draft_tokens_total", "counter", "Tokens drafted (--speculative).", [({}, s.spec_drafted)])
    metric("bitlm_speculative_accepted_tokens_total", "counter", "Drafted tokens the model accepted; over drafted: "
           "the acceptance rate.", [({}, s.spec_accepted)])
    metric("bitlm_requests_finished_total", "counter", "Generations ended, by finish reason.",
           [({"reason": r}, n) for r, n in sorted(s.finished.items())])
    metric("bitlm_requests_total", "counter", "Generation requests answered, by endpoint and HTTP status.",
           [({"endpoint": p, "status": c}, n) for (p, c), n in sorted(status_counts.items())])
    return "\n".join(lines) + "\n"


class Guard:
    """ASGI middleware in front of the app: the API key on /v1/*, the body size cap on every request, and
    the count of generation requests by HTTP status. The body is read here whole (at most max_body_bytes)
    and replayed to the app; after it, the app's receive() sees the client's disconnect."""

    def __init__(self, app, settings: ServeSettings, status_counts: collections.Counter):
        self.app, self.settings, self.status_counts = app, settings, status_counts
        self._key = settings.api_key.encode() if settings.api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        counted = path in GENERATION_PATHS

        async def send_counting(message):
            if counted and message["type"] == "http.response.start":
                self.status_counts[(path, message["status"])] += 1
            await send(message)

        if self._key is not None and path.startswith("/v1"):
            auth = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self._key):
                return await _error(send_counting, APIError(
                    401, "Incorrect or missing API key: send the header `Authorization: Bearer <key>`",
                    code="invalid_api_key"))
        limit = self.settings.max_body_bytes
        too_large = APIError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return await _error(send_counting, too_large if length.isdigit() else
                                APIError(400, "bad Content-Length header", code="invalid_request"))
        chunks, size = [], 0
        if scope["method"] not in ("GET", "HEAD"):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                body = message.get("body", b"")
                size += len(body)
                if size > limit:
                    return await _error(send_counting, too_large)
                chunks.append(body)
                if not message.get("more_body", False):
                    break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send_counting)


async def _error(send, e: APIError) -> None:
    body = json.dumps(e.body()).encode()
    await send({"type": "http.response.start", "status": e.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
