"""`Server`: the app on uvicorn (HTTP/1.1 keep-alive, SSE) over one engine worker thread.

    server = Server(engine, tokenizer, ("127.0.0.1", 0), api_key="k")   # binds now: server.server_address
    server.serve_forever()                                                 # SIGTERM/SIGINT stop it (main thread)

Shutdown (SIGTERM, Ctrl-C or `shutdown()` from another thread): uvicorn stops accepting, closes idle
connections, lets in-flight answers finish for up to `shutdown_timeout_s`, then cuts the rest (their
engine requests are cancelled); `server_close()` then stops the worker, which aborts anything left.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import threading
from collections.abc import Iterator
from typing import Any

import uvicorn

from nanoseek.engine.engine import Engine
from nanoseek.serve.app import build_app
from nanoseek.serve.limits import Limits, timed_protocol
from nanoseek.serve.worker import EngineWorker

LISTEN_BACKLOG = 2048  # a burst of clients connecting at once is queued by the kernel, not reset


class _Uvicorn(uvicorn.Server):
    """uvicorn's server, but a SIGTERM/SIGINT ends `run` normally instead of being re-raised after the
    graceful shutdown (uvicorn's default), so the caller's cleanup runs and the exit status is 0."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


class Server:
    def __init__(
        self,
        engine: Engine,
        tokenizer: Any,
        address: tuple[str, int] = ("127.0.0.1", 8000),
        *,
        model_name: str = "nanoseek",
        limits: Limits | None = None,
        default_max_tokens: int | None = None,
        api_key: str | None = None,
        cors_origins: tuple[str, ...] = (),
        shutdown_timeout_s: float = 30.0,
        http: str = "auto",
        verbose: bool = False,
        stream_interval: int = 1,
    ) -> None:
        self.limits = limits or Limits()
        if default_max_tokens is not None:
            self.limits.default_max_tokens = default_max_tokens
        self.worker = EngineWorker(engine, stream_interval)  # decode steps between a stream's events
        self.app = build_app(
            self.worker,
            tokenizer,
            model_name=model_name,
            limits=self.limits,
            api_key=api_key,
            cors_origins=cors_origins,
        )
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(address)
        self.socket.listen(LISTEN_BACKLOG)
        self.server_address = self.socket.getsockname()[:2]
        config = uvicorn.Config(
            self.app,
            http=timed_protocol(self.limits.header_timeout_s, http),  # auto: httptools if installed, else h11
            ws="none",
            loop="auto",  # uvloop where installed (uvicorn[standard]): a faster event loop and transports
            lifespan="off",
            log_level="info" if verbose else "warning",
            access_log=verbose,
            timeout_keep_alive=self.limits.keep_alive_s,  # type: ignore[arg-type]  (seconds; a float works)
            timeout_graceful_shutdown=shutdown_timeout_s,  # type: ignore[arg-type]
            backlog=LISTEN_BACKLOG,
        )
        self._uvicorn = _Uvicorn(config)
        self._stopped = threading.Event()
        self._stopped.set()  # not serving
        if not verbose:
            logging.getLogger("uvicorn.error").setLevel(logging.ERROR)  # not a line per refused malformed request

    @property
    def url(self) -> str:
        host, port = self.server_address
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"

    def serve_forever(self) -> None:
        """Serve until shut down (signals are caught only when this runs on the main thread)."""
        self._stopped.clear()
        try:
            self._uvicorn.run(sockets=[self.socket])
        finally:
            self._stopped.set()

    def start(self) -> threading.Thread:
        """Serve on a daemon thread (tests, benchmarks); returns once the server accepts requests."""
        thread = threading.Thread(target=self.serve_forever, name="nanoseek-http", daemon=True)
        thread.start()
        while not self._uvicorn.started and thread.is_alive():
            self._stopped.wait(0.01)
        return thread

    def shutdown(self, timeout: float = 60.0) -> None:
        """Ask a running serve_forever to stop gracefully, and wait for it."""
        self._uvicorn.should_exit = True
        self._stopped.wait(timeout)

    def server_close(self) -> None:
        self.socket.close()
        self.worker.close()
        self.app.state.serve.cpu.shutdown(wait=False)


__all__ = ["Server"]
