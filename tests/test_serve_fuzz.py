"""`nanoseek serve` under malformed requests and misbehaving clients, over real sockets.

After every case the server must still give the correct greedy answer (the naive loop's), and at the
end its slots, threads and memory must be back at the idle level. Timeouts are short here (headers
1.5 s, body 1.5 s, keep-alive 1 s) so that slow and idle clients are closed within the test's time.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from serving import Served, chat, naive_greedy_text, post, raw_exchange, serve_tiny

from nanoseek.serve import Limits
from nanoseek.serve.app import TOKENIZER_THREADS

pytestmark = pytest.mark.usefixtures("one_thread")

QUESTION = "What is 12 + 30?"
CAP = 256 * 1024


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def _protocols() -> list[str]:
    try:
        import httptools  # noqa: F401
    except ImportError:
        return ["h11"]
    return ["httptools", "h11"]


@pytest.fixture(scope="module", params=_protocols())
def served(request):
    """Over each HTTP parser uvicorn can use here (httptools where installed, and h11, the fallback)."""
    limits = Limits(max_body_bytes=CAP, header_timeout_s=1.5, body_timeout_s=1.5, keep_alive_s=1.0)
    s = serve_tiny(max_batch=8, limits=limits, http=request.param)
    s.expected = naive_greedy_text(s.model, s.tokenizer, [{"role": "user", "content": QUESTION}], 16)
    s.idle_threads = threading.active_count()
    still_serves(s)
    s.idle_rss = rss_bytes()
    yield s
    s.close()


def still_serves(s: Served) -> None:
    status, raw = post(s.url, "/v1/chat/completions", chat(QUESTION))
    assert status == 200 and json.loads(raw)["choices"][0]["message"]["content"] == s.expected


def wait_idle(s: Served, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while (s.engine.has_work or s.server.worker.running) and time.time() < deadline:
        time.sleep(0.02)
    assert not s.engine.has_work and s.server.worker.running == 0


def http(path: str, body: bytes, *headers: str) -> bytes:
    head = [f"POST {path} HTTP/1.1", "Host: x", "Content-Type: application/json", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


@pytest.mark.parametrize(
    "request_bytes,status",
    [
        (http("/v1/chat/completions", b'{"a": "\xff\xfe"}', "Content-Length: 11"), b"400"),  # invalid UTF-8
        (http("/v1/chat/completions", b"{}", "Content-Length: abc"), b"400"),
        (http("/v1/chat/completions", b"{}", "Content-Length: -5"), b"400"),
        (http("/v1/chat/completions", b"[" * 100_000, "Content-Length: 100000"), b"400"),  # nested 100k deep
        (http("/v1/chat/completions", b'{"messages": ' + b"[" * 100_000, "Content-Length: 100013"), b"400"),
        (http("/v1/chat/completions", b"{}", "Content-Length: 1000"), b"408"),  # longer than the body: timed out
        (http("/v1/chat/completions", b"", f"Content-Length: {50 * 2**20}"), b"413"),  # refused before the body
        (b"GARBAGE\r\n\r\n", b"400"),
        (b"GET / HTTP/1.1\r\n" + b"X: " + b"y" * 100_000 + b"\r\n\r\n", b"4"),  # headers too large (431 or 400)
    ],
)
def test_malformed_requests_get_an_error_response_and_the_server_goes_on(served, request_bytes, status):
    reply = raw_exchange(served.address, request_bytes)
    assert reply.startswith(b"HTTP/1.1 " + status), reply[:200]
    still_serves(served)


def test_an_oversized_body_is_refused_at_the_cap_without_reading_it_whole(served):
    before = rss_bytes()
    with socket.create_connection(served.address, timeout=30) as s:  # chunked: no length to refuse up front
        s.sendall(http("/v1/chat/completions", b"", "Transfer-Encoding: chunked"))
        chunk = b"%x\r\n%s\r\n" % (64 * 1024, b"x" * 64 * 1024)
        sent = 0
        try:
            for _ in range(50 * 16):  # 50 MiB offered
                s.sendall(chunk)
                sent += 64 * 1024
        except (BrokenPipeError, ConnectionResetError):
            pass
        reply = s.recv(65536)
    assert reply.startswith(b"HTTP/1.1 413") and b"cap" in reply
    assert sent < 50 * 2**20  # the server stopped reading
    assert rss_bytes() - before < 32 * 2**20
    still_serves(served)


def test_clients_that_leave_after_the_first_chunk_free_their_slots(served):
    body = json.dumps(chat(QUESTION, stream=True, max_tokens=100, ignore_eos=True)).encode()
    cancelled = served.server.worker.cancelled

    def leave_after_first_chunk(_: int) -> bytes:
        with socket.create_connection(served.address, timeout=30) as s:
            s.sendall(http("/v1/chat/completions", body, f"Content-Length: {len(body)}"))
            return s.recv(64)

    with ThreadPoolExecutor(50) as pool:
        replies = list(pool.map(leave_after_first_chunk, range(50)))
    assert all(r.startswith(b"HTTP/1.1 200") for r in replies)
    wait_idle(served)
    assert served.server.worker.cancelled - cancelled == 50
    still_serves(served)


def test_clients_that_abandon_non_streaming_requests_free_their_slots_within_a_step_or_two(served):
    body = json.dumps(chat(QUESTION, max_tokens=100, ignore_eos=True)).encode()
    engine = served.engine
    sockets = [socket.create_connection(served.address, timeout=30) for _ in range(50)]
    for s in sockets:
        s.sendall(http("/v1/chat/completions", body, f"Content-Length: {len(body)}"))
    deadline = time.time() + 30
    while served.server.worker.running < 8 and time.time() < deadline:  # every slot busy
        time.sleep(0.01)
    steps_at_close = engine.stats.decode_steps
    for s in sockets:
        s.close()
    wait_idle(served)
    # Without cancellation 50 requests x 100 tokens over 8 slots would take ~600 more steps.
    assert engine.stats.decode_steps - steps_at_close <= 3
    still_serves(served)


def test_slow_clients_are_cut_while_others_are_served(served):
    cut = []

    def slow_headers(_: int) -> None:
        with socket.create_connection(served.address, timeout=10) as s:
            try:
                for byte in b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"y" * 40:
                    s.sendall(bytes([byte]))
                    time.sleep(0.1)
            except (BrokenPipeError, ConnectionResetError):
                cut.append(True)
                return
            cut.append(s.recv(10) == b"")

    threads = [threading.Thread(target=slow_headers, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    t0 = time.time()
    still_serves(served)  # while they dribble
    assert time.time() - t0 < 5
    for t in threads:
        t.join(timeout=30)
    assert cut == [True] * 10  # closed by the header timeout (1.5 s), long before their 8 s of headers


def test_idle_connections_are_closed_by_a_timeout(served):
    sockets = [socket.create_connection(served.address, timeout=10) for _ in range(300)]
    still_serves(served)  # served while 300 sockets are held open
    time.sleep(2.0)
    closed = 0
    for s in sockets:
        try:
            closed += s.recv(1) == b""
        except (ConnectionResetError, TimeoutError):
            closed += 1
        s.close()
    assert closed == 300


def test_everything_returns_to_the_idle_level(served):
    """Last in the module: after every case above, no slot held, no thread or connection left over."""
    wait_idle(served)
    deadline = time.time() + 10
    while threading.active_count() > served.idle_threads + TOKENIZER_THREADS and time.time() < deadline:
        time.sleep(0.1)
    assert threading.active_count() <= served.idle_threads + TOKENIZER_THREADS  # the pool that tokenizes prompts
    assert rss_bytes() - served.idle_rss < 64 * 2**20
    assert served.engine.stats.max_running <= 8 and served.server.worker.queued == 0
    still_serves(served)
