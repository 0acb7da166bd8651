"""`nanoseek serve`'s key, caps, queue bound, time limit, CORS and graceful shutdown, over real HTTP."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from serving import chat, post, serve_tiny, sse_events

from nanoseek.serve import Limits

pytestmark = pytest.mark.usefixtures("one_thread")
KEY = "sk-test-0123456789"


@pytest.fixture(scope="module")
def served():
    limits = Limits(max_tokens=64, max_n=2, max_prompt_tokens=40, max_queue=1, request_timeout_s=3.0)
    s = serve_tiny(max_batch=1, limits=limits, api_key=KEY, cors_origins=("http://allowed.example",))
    yield s
    s.close()


def auth(key: str = KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize("headers", [{}, auth("sk-wrong"), {"Authorization": KEY}, auth(KEY + "x")])
def test_v1_routes_need_the_key(served, headers):
    for path, body in [("/v1/chat/completions", chat("hi")), ("/v1/completions", {"prompt": "hi"})]:
        status, raw = post(served.url, path, body, headers)
        assert status == 401 and json.loads(raw)["error"]["type"] == "authentication_error"
    request = urllib.request.Request(served.url + "/v1/models", headers=headers)
    with pytest.raises(urllib.error.HTTPError, match="401"):
        urllib.request.urlopen(request, timeout=10)
    assert post(served.url, "/v1/chat/completions", chat("hi"), auth())[0] == 200
    with urllib.request.urlopen(served.url + "/health", timeout=10) as r:  # health, metrics and the page are open
        assert json.loads(r.read())["auth"] is True


@pytest.mark.parametrize(
    "body,message",
    [
        (chat("hi", max_tokens=65), "max_tokens = 65: over the server's cap of 64"),
        (chat("hi", max_completion_tokens=65), "max_completion_tokens = 65: over the server's cap of 64"),
        (chat("hi", n=3), "n = 3: over the server's cap of 2"),
        (chat("hi " * 60), "over the server's cap of 40"),
    ],
)
def test_caps_are_400_naming_the_cap(served, body, message):
    status, raw = post(served.url, "/v1/chat/completions", body, auth())
    assert status == 400 and message in json.loads(raw)["error"]["message"]


def test_a_full_queue_is_503_with_retry_after_and_the_time_limit_is_504(served):
    worker = served.server.worker
    long = chat("hi", max_tokens=64, ignore_eos=True)
    results = {}
    # One stream holds the only slot (and runs into the 3 s time limit), one request waits in the queue.
    first = threading.Thread(target=lambda: results.update(a=post(served.url, "/v1/chat/completions", long, auth())))
    first.start()
    deadline = time.time() + 10
    while worker.running < 1 and time.time() < deadline:
        time.sleep(0.01)
    second = threading.Thread(target=lambda: results.update(b=post(served.url, "/v1/chat/completions", long, auth())))
    second.start()
    while worker.backlog < 1 and time.time() < deadline:
        time.sleep(0.01)
    request = urllib.request.Request(
        served.url + "/v1/chat/completions", data=json.dumps(chat("hi")).encode(), headers=auth()
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 503 and refused.value.headers["Retry-After"] == "1"
    assert json.loads(refused.value.read())["error"]["type"] == "server_overloaded"
    first.join(30)
    second.join(30)
    # ignore_eos, 64 tokens on a busy 1-slot server: whoever passes 3 s gets 504 and its slot back
    statuses = sorted(status for status, _ in results.values())
    assert set(statuses) <= {200, 504}
    deadline = time.time() + 10
    while served.engine.has_work and time.time() < deadline:
        time.sleep(0.01)
    assert not served.engine.has_work and worker.running == 0
    assert post(served.url, "/v1/chat/completions", chat("hi"), auth())[0] == 200


def test_a_request_past_the_time_limit_is_cut_and_frees_its_slot():
    s = serve_tiny(max_batch=1, limits=Limits(request_timeout_s=0.3))
    try:
        s.engine.step = slow(s.engine.step)
        status, raw = post(s.url, "/v1/chat/completions", chat("hi", max_tokens=100, ignore_eos=True))
        assert status == 504 and "time limit of 0.3 s" in json.loads(raw)["error"]["message"]
        status, raw = post(s.url, "/v1/chat/completions", chat("hi", max_tokens=100, ignore_eos=True, stream=True))
        events = sse_events(raw)
        assert status == 200 and "time limit" in json.loads(events[-2])["error"]["message"] and events[-1] == "[DONE]"
        deadline = time.time() + 10
        while s.engine.has_work and time.time() < deadline:
            time.sleep(0.01)
        assert not s.engine.has_work and s.server.worker.cancelled == 2
    finally:
        s.close()


def slow(step):
    def wrapped():
        time.sleep(0.02)
        step()

    return wrapped


def test_cors_only_for_the_given_origin(served):
    def preflight(origin: str) -> dict:
        request = urllib.request.Request(
            served.url + "/v1/chat/completions",
            method="OPTIONS",
            headers={"Origin": origin, "Access-Control-Request-Method": "POST"},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as r:
                return dict(r.headers)
        except urllib.error.HTTPError as e:
            return dict(e.headers)

    assert preflight("http://allowed.example").get("access-control-allow-origin") == "http://allowed.example"
    assert "access-control-allow-origin" not in {k.lower() for k in preflight("http://evil.example")}


def test_without_cors_origin_there_are_no_cors_headers():
    s = serve_tiny()
    try:
        request = urllib.request.Request(s.url + "/v1/models", headers={"Origin": "http://evil.example"})
        with urllib.request.urlopen(request, timeout=10) as r:
            assert not any(k.lower().startswith("access-control") for k in r.headers)
    finally:
        s.close()


def test_sigterm_lets_the_stream_in_flight_finish_then_exits_cleanly(tmp_path: Path):
    script = tmp_path / "serve.py"
    script.write_text(
        "import sys, time\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "import serving\n"
        "from nanoseek.serve import Server\n"
        "s = serving.serve_tiny()\n"  # builds the model; then serve again on the main thread, signals caught
        "s.close()\n"
        "server = Server(s.engine, s.tokenizer, ('127.0.0.1', 0), model_name='tiny-test')\n"
        "s.engine.step = (lambda step: (lambda: (time.sleep(0.01), step())))(s.engine.step)\n"
        "print(server.server_address[1], flush=True)\n"
        "server.serve_forever()\n"
        "server.server_close()\n"
        "print('running', server.worker.running, 'has_work', s.engine.has_work, flush=True)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, env=env, text=True)
    try:
        port = int(proc.stdout.readline())
        body = json.dumps(chat("hi", max_tokens=100, ignore_eos=True, stream=True)).encode()
        with socket.create_connection(("127.0.0.1", port), timeout=60) as c:
            c.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            reply = c.recv(65536)
            assert reply.startswith(b"HTTP/1.1 200")
            proc.send_signal(signal.SIGTERM)
            while chunk := c.recv(65536):
                reply += chunk
        assert reply.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")  # the answer in flight was finished, not cut
        assert reply.count(b'"content"') >= 50 and b'"finish_reason":"length"' in reply
        assert proc.wait(timeout=30) == 0
        assert proc.stdout.read().strip() == "running 0 has_work False"
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
    finally:
        proc.kill()


def test_the_command_serves_a_checkpoint_with_a_key_from_the_environment(tmp_path: Path):
    import torch

    from nanoseek.model import Transformer, get_preset
    from nanoseek.model.io import save_model
    from nanoseek.tasks.corpus import pretrain_texts
    from nanoseek.tokenizer import Tokenizer

    checkpoint = tmp_path / "tiny"
    torch.manual_seed(0)
    save_model(Transformer(get_preset("tiny", vocab_size=320)), checkpoint)
    Tokenizer.train(pretrain_texts(100, seed=0), 300).save(checkpoint)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1", "NANOSEEK_API_KEY": KEY}
    command = [sys.executable, "-m", "nanoseek", "serve", "--checkpoint", str(checkpoint), "--port", "0"]
    bad = subprocess.run([*command, "--max-n", "0"], env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].endswith("--max-n = 0: must be > 0")
    bad = subprocess.run([*command, "--stream-interval", "0"], env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].endswith("--stream-interval = 0: must be > 0")
    serve = [*command, "--max-batch", "2", "--stream-interval", "2"]
    proc = subprocess.Popen(serve, env=env, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        assert "with an API key" in line, line
        url = line.split(" on ")[1].split("/ (chat)")[0]
        assert url.startswith("http://127.0.0.1:")
        assert post(url, "/v1/chat/completions", chat("hi"))[0] == 401
        status, raw = post(url, "/v1/chat/completions", chat("hi", max_tokens=4), auth())
        assert status == 200 and json.loads(raw)["model"] == "tiny"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
