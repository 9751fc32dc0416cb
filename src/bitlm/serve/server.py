"""`bitlm serve`: load the model once, make the engine, run the app under uvicorn.

SIGINT / SIGTERM drain: uvicorn stops accepting connections, new requests on open connections get 503,
queued and running requests go on to their end for up to `drain_timeout` seconds, then whatever is left
is cancelled and every sequence freed; then uvicorn re-raises the signal, so the process ends as that
signal asks (SIGINT: `bitlm` exits 130; SIGTERM: killed by the signal, as a supervisor expects). A second
signal exits at once.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from ..errors import BitlmError
from .settings import ServeSettings

log = logging.getLogger("bitlm.serve")


def make_engine(model, settings: ServeSettings):
    """The many-sequence engine the scheduler drives. For the native runtime (a NativeModel, or the
    NativeLM cli.load_model gives): BatchEngine (engine/batch.py) runs every sequence of a step in one
    forward; SequentialEngine runs them one after another (exact, not batched: the reference). For the
    torch model (--runtime torch, --device cuda): TorchEngine (serve/torch_engine.py), one sequence after
    another."""
    from ..engine.native import NativeLM, NativeModel
    if isinstance(model, NativeLM):
        model = model.nm
    if not isinstance(model, NativeModel):
        if settings.engine != "sequential":
            raise BitlmError(f"bitlm serve: --engine {settings.engine} runs the native runtime; the torch model "
                             "is served one sequence after another (--engine sequential, its default there)")
        from .torch_engine import TorchEngine
        return TorchEngine(model, max_seqs=settings.max_seqs, kv_blocks=settings.kv_blocks,
                           block_size=settings.block_size, max_len=settings.max_len)
    nm = model
    if settings.engine == "batch":
        from ..engine.batch import BatchEngine
        cls = BatchEngine
    else:
        from .sequential_engine import SequentialEngine
        cls = SequentialEngine
    return cls(nm, max_seqs=settings.max_seqs, kv_blocks=settings.kv_blocks, block_size=settings.block_size)


def make_drafter(draft_nm, engine, settings: ServeSettings):
    """The BatchDrafter of `--speculative draft`: a BatchEngine over the draft model with a KV pool for
    every sequence's full context (mapped lazily: only what is used is touched), so drafting never waits
    for blocks."""
    from ..engine.batch import BatchEngine
    from ..engine.speculative import BatchDrafter
    max_len = min(engine.max_len, draft_nm.max_len)
    per_seq = -(-max_len // settings.block_size)
    return BatchDrafter(BatchEngine(draft_nm, max_seqs=settings.max_seqs, kv_blocks=settings.max_seqs * per_seq,
                                    block_size=settings.block_size, max_len=max_len))


def served_name(source: str) -> str:
    """The model id clients use: a directory's name, else the argument as given (a hub repo id)."""
    p = Path(source)
    return p.resolve().name if p.is_dir() else source


def run(model, settings: ServeSettings, draft_nm=None) -> int:
    """Serve `model` (a NativeModel or NativeLM, or bitlm's torch model; with a tokenizer) until a signal
    ends it; draft_nm: the draft model of --speculative draft (native runtime)."""
    import uvicorn

    from .app import create_app
    _setup_logging()
    engine = make_engine(model, settings)
    app = create_app(engine, settings, None if draft_nm is None else make_drafter(draft_nm, engine, settings))

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:
                host, port = self.servers[0].sockets[0].getsockname()[:2]
                nm = getattr(engine, "nm", None)  # the native model: its ternary weight format
                log.info("serving %s at http://%s:%s (%s%s, %d sequences, context %d, KV blocks %d of %d "
                         "positions%s)", settings.model_name, _url_host(host), port, type(engine).__name__,
                         "" if nm is None else f", {nm.weights} weights", settings.max_seqs,
                         engine.max_len, engine.total_blocks, settings.block_size,
                         "" if settings.speculative == "none" else
                         f", speculative {settings.speculative} up to {settings.draft_max} drafts")

        def handle_exit(self, sig, frame):
            if not self.should_exit:
                log.info("signal %d: draining (up to %.0f s), a second signal exits at once", sig,
                         settings.drain_timeout)
                scheduler = getattr(app.state, "scheduler", None)
                if scheduler is not None:
                    scheduler.begin_drain()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=settings.drain_timeout, server_header=False)
    server = Server(config)
    server.run(sockets=[_listen(settings.host, settings.port)])
    return 0


def _listen(host: str, port: int):
    """A bound listening socket, or a one-line error (a taken port, an address not of this machine)."""
    import socket
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: restart without TIME_WAIT
        sock.bind(addr)
        sock.listen(2048)
    except OSError as e:
        raise BitlmError(f"bitlm serve: cannot listen on {host}:{port} ({e.strerror or e}); "
                         "pick another --port or --host") from None
    return sock


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _setup_logging() -> None:
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("bitlm serve: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
