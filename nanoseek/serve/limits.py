"""What one client may ask of the server: body size, tokens, samples, queue, time; the API key; idle sockets.

Every limit refuses with OpenAI's error shape and a status a client can act on: 413 for a body over
the cap (read no further than the cap: a Content-Length over it is refused before any body byte is
read), 400 naming the cap for max_tokens / n / prompt length, 503 with Retry-After when the queue is
full, 408 when a body does not arrive in time, 504 when generation runs past the time limit.
"""

from __future__ import annotations

import asyncio
import hmac
import os
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from uvicorn.protocols.http.h11_impl import H11Protocol

from nanoseek.serve.schemas import ApiError

API_KEY_ENV = "NANOSEEK_API_KEY"
CLOSE = {"Connection": "close"}  # a refused body is not read further: the connection cannot be reused


@dataclass
class Limits:
    max_body_bytes: int = 2 * 2**20
    max_tokens: int = 4096
    """Largest max_tokens a request may ask (the context bounds it further)."""
    default_max_tokens: int = 256
    max_n: int = 16
    max_prompt_tokens: int | None = None
    """None: what the context allows."""
    max_queue: int = 256
    """Requests waiting for a KV slot beyond which new ones get 503."""
    request_timeout_s: float = 600.0
    body_timeout_s: float = 30.0
    """Time for a request's body to arrive once its headers have."""
    header_timeout_s: float = 30.0
    """Time for a connection's request headers to arrive (idle and slow clients are closed after it)."""
    keep_alive_s: float = 5.0
    retry_after_s: int = 1

    def check_max_tokens(self, value: int, field: str) -> None:
        if value > self.max_tokens:
            raise ApiError(400, f"{field} = {value}: over the server's cap of {self.max_tokens}", field)

    def check_n(self, n: int) -> None:
        if n > self.max_n:
            raise ApiError(400, f"n = {n}: over the server's cap of {self.max_n}", "n")

    def check_prompt(self, n_tokens: int, context: int) -> None:
        cap = min(self.max_prompt_tokens or context - 1, context - 1)
        if n_tokens > cap:
            raise ApiError(
                400, f"the prompt has {n_tokens} tokens, over the server's cap of {cap} (context {context})", "prompt"
            )

    def check_queue(self, backlog: int) -> None:
        if backlog >= self.max_queue:
            raise ApiError(
                503,
                f"the server is busy ({backlog} requests queued); retry later",
                headers={"Retry-After": str(self.retry_after_s)},
            )


def api_key_from(value: str | None) -> str | None:
    """The key the server requires: --api-key, else $NANOSEEK_API_KEY, else none."""
    return value or os.environ.get(API_KEY_ENV) or None


def check_api_key(request: Request, key: str | None) -> None:
    """401 unless `Authorization: Bearer <key>` (compared in constant time)."""
    if key is None:
        return
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise ApiError(401, "missing or wrong API key (send Authorization: Bearer <key>)")


async def read_body(request: Request, limits: Limits) -> bytes:
    """The body, refused (413) as soon as it would pass the cap, and (408) when it does not arrive in time."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise ApiError(
            413, f"the body is {int(declared)} bytes, over the server's cap of {limits.max_body_bytes}", headers=CLOSE
        )

    async def gather() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limits.max_body_bytes:
                raise ApiError(
                    413, f"the body is over the server's cap of {limits.max_body_bytes} bytes", headers=CLOSE
                )
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        async with asyncio.timeout(limits.body_timeout_s):
            return await gather()
    except TimeoutError:
        raise ApiError(408, f"the body did not arrive within {limits.body_timeout_s:g} s", headers=CLOSE) from None


MAX_HEADER_BYTES = 64 * 1024
HEADERS_TOO_LARGE = b"HTTP/1.1 431 Request Header Fields Too Large\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"


class _HeaderDeadline:
    """A deadline and a size cap for each request's headers, on top of uvicorn's HTTP/1.1 protocols.

    uvicorn closes a connection idle *between* requests (keep-alive timeout), but not one that never
    sends a request or sends its headers a byte at a time: those are closed after `header_timeout_s`;
    headers over MAX_HEADER_BYTES get 431 and the connection is closed.
    """

    header_timeout_s = 30.0
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    cycle: Any

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # type: ignore[misc]
        self._header_timer: asyncio.TimerHandle | None = None
        self._arm()

    def _arm(self) -> None:
        self._header_bytes = 0
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def data_received(self, data: bytes) -> None:
        super().data_received(data)  # type: ignore[misc]
        if self._header_timer is not None:  # these bytes did not complete a request's headers
            self._header_bytes += len(data)
            if self._header_bytes > MAX_HEADER_BYTES and not self.transport.is_closing():
                self._disarm()
                self._refuse_headers()

    def _refuse_headers(self) -> None:
        self.transport.write(HEADERS_TOO_LARGE)
        self.transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        if self._header_timer is None and not self.transport.is_closing():
            self._arm()

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.cycle is None or self.cycle.response_complete:  # still waiting for a request's headers
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)  # type: ignore[misc]


class TimedH11Protocol(_HeaderDeadline, H11Protocol):
    def handle_events(self) -> None:
        before = self.cycle
        super().handle_events()
        if self.cycle is not before:  # a request's headers arrived
            self._disarm()


def timed_protocol(header_timeout_s: float, http: str = "auto") -> type:
    """The HTTP protocol class for uvicorn: over httptools (C parser, lighter per chunk) where it is
    installed ("auto") or asked for, else over h11; either way with the header deadline and cap."""
    try:
        if http == "h11":
            raise ImportError
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        if http == "httptools":
            raise
        base: type = TimedH11Protocol
    else:

        class TimedHttpToolsProtocol(_HeaderDeadline, HttpToolsProtocol):
            def on_headers_complete(self) -> None:
                self._disarm()
                if len(self.url) + sum(len(k) + len(v) for k, v in self.headers) > MAX_HEADER_BYTES:
                    self._refuse_headers()  # they came in one read: the per-read count above did not see them
                    return
                super().on_headers_complete()

        base = TimedHttpToolsProtocol
    return type(base.__name__, (base,), {"header_timeout_s": header_timeout_s})


__all__ = ["API_KEY_ENV", "Limits", "TimedH11Protocol", "api_key_from", "check_api_key", "read_body", "timed_protocol"]
