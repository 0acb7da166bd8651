"""`nanoseek serve`: the OpenAI-compatible server, over real HTTP on a free local port.

References: greedy text from a naive loop that recomputes the whole sequence every step (no
engine, no cache); the server's own non-streamed answer for the streamed one.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from nanoseek.engine import Engine
from nanoseek.model import Transformer, get_preset
from nanoseek.serve import Server
from nanoseek.tasks.corpus import pretrain_texts
from nanoseek.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def served():
    tokenizer = Tokenizer.train(pretrain_texts(300, seed=0), 400)
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny", vocab_size=448, init_std=0.2)).eval()
    engine = Engine(model, tokenizer, max_batch=4, max_seq_len=128)
    server = Server(engine, tokenizer, ("127.0.0.1", 0), model_name="tiny-test")
    server.start()
    url = server.url
    yield url, model, tokenizer, engine, server
    server.shutdown()
    server.server_close()


def post(url: str, path: str, body: dict | bytes) -> tuple[int, bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@torch.no_grad()
def naive_greedy_text(model: Transformer, tokenizer: Tokenizer, messages: list[dict], n: int) -> str:
    ids = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    out: list[int] = []
    for _ in range(n):
        token = int(model(torch.tensor([ids + out]))[0, -1].argmax())
        if token in tokenizer.stop_ids:
            break
        out.append(token)
    return tokenizer.decode(out)


def chat(content: str, **fields) -> dict:
    return {"messages": [{"role": "user", "content": content}], "temperature": 0, "max_tokens": 16, **fields}


def test_chat_completion_is_the_greedy_answer(served):
    url, model, tokenizer, *_ = served
    status, raw = post(url, "/v1/chat/completions", chat("What is 12 + 30?"))
    assert status == 200
    reply = json.loads(raw)
    assert reply["object"] == "chat.completion" and reply["model"] == "tiny-test"
    [choice] = reply["choices"]
    expected = naive_greedy_text(model, tokenizer, [{"role": "user", "content": "What is 12 + 30?"}], 16)
    assert choice["message"] == {"role": "assistant", "content": expected} and expected
    assert choice["finish_reason"] in ("stop", "length")
    assert reply["usage"]["completion_tokens"] <= 16 and reply["usage"]["prompt_tokens"] > 0


def test_streamed_chunks_add_up_to_the_whole_answer(served):
    url, *_ = served
    whole = json.loads(post(url, "/v1/chat/completions", chat("What is 7 * 8?"))[1])
    status, raw = post(url, "/v1/chat/completions", chat("What is 7 * 8?", stream=True))
    assert status == 200
    events = [line[len("data: ") :] for line in raw.decode().split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant" and "role" not in chunks[1]["choices"][0]["delta"]
    text = "".join(c["choices"][0]["delta"]["content"] for c in chunks)
    assert text == whole["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]


def test_concurrent_clients_share_the_batch_and_each_gets_its_own_answer(served):
    url, model, tokenizer, engine, _ = served
    questions = [f"What is {a} + {a + 3}?" for a in range(6)]
    with ThreadPoolExecutor(6) as pool:
        replies = list(pool.map(lambda q: post(url, "/v1/chat/completions", chat(q, max_tokens=24)), questions))
    for q, (status, raw) in zip(questions, replies):
        assert status == 200
        expected = naive_greedy_text(model, tokenizer, [{"role": "user", "content": q}], 24)
        assert json.loads(raw)["choices"][0]["message"]["content"] == expected
    assert engine.stats.max_running > 1  # requests from different clients were decoded together


def test_a_burst_of_clients_is_queued_not_refused(served):
    url, *_ = served
    with ThreadPoolExecutor(48) as pool:
        statuses = list(
            pool.map(lambda i: post(url, "/v1/chat/completions", chat(f"{i}?", max_tokens=2))[0], range(48))
        )
    assert statuses == [200] * 48


def test_completions_endpoint_n_samples_and_models(served):
    url, *_ = served
    status, raw = post(url, "/v1/completions", {"prompt": "What is 3 + 4?\n", "max_tokens": 8, "n": 3, "seed": 5})
    assert status == 200
    reply = json.loads(raw)
    assert reply["object"] == "text_completion" and [c["index"] for c in reply["choices"]] == [0, 1, 2]
    again = json.loads(
        post(url, "/v1/completions", {"prompt": "What is 3 + 4?\n", "max_tokens": 8, "n": 3, "seed": 5})[1]
    )
    assert [c["text"] for c in again["choices"]] == [c["text"] for c in reply["choices"]]  # seeded: reproducible
    with urllib.request.urlopen(url + "/v1/models", timeout=10) as r:
        assert json.loads(r.read())["data"][0]["id"] == "tiny-test"


@pytest.mark.parametrize(
    "body,field",
    [
        (b"{not json", "not valid JSON"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user"}]}, "messages[0]"),
        (chat("hi", top_p=3.0), "top_p"),
        (chat("hi", max_tokens=0), "max_tokens"),
        (chat("hi", stop=5), "stop"),
        (chat("hi", ignore_eos="yes"), "ignore_eos"),
        (chat("x" * 2000), "over the server's cap of 127"),
    ],
)
def test_bad_requests_get_400_naming_the_field_and_the_server_goes_on(served, body, field):
    url, *_ = served
    status, raw = post(url, "/v1/chat/completions", body)
    assert status == 400 and field in json.loads(raw)["error"]["message"]
    assert post(url, "/v1/chat/completions", chat("What is 1 + 1?"))[0] == 200


def test_a_tokenizer_without_a_chat_template_gets_400_on_chat_but_serves_completions():
    tokenizer = Tokenizer.train(pretrain_texts(100, seed=0), 300)
    tokenizer.chat_template = None
    torch.manual_seed(0)
    engine = Engine(Transformer(get_preset("tiny", vocab_size=320)).eval(), tokenizer, max_batch=2, max_seq_len=64)
    server = Server(engine, tokenizer, ("127.0.0.1", 0))
    server.start()
    url = server.url
    try:
        status, raw = post(url, "/v1/chat/completions", chat("hi"))
        assert status == 400 and "chat template" in json.loads(raw)["error"]["message"]
        assert post(url, "/v1/completions", {"prompt": "What is", "max_tokens": 3})[0] == 200
    finally:
        server.shutdown()
        server.server_close()


def test_a_client_that_leaves_mid_stream_frees_its_slots(served):
    import socket
    import time

    url, _, _, engine, server = served
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps(chat("What is 5 + 5?", stream=True, max_tokens=100, ignore_eos=True)).encode()
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        assert s.recv(64).startswith(b"HTTP/1.1 200")  # streaming has begun
    deadline = time.time() + 30
    while engine.has_work and time.time() < deadline:
        time.sleep(0.05)
    assert not engine.has_work and server.worker.cancelled == 1  # aborted, its slot released
    assert post(url, "/v1/chat/completions", chat("What is 2 + 2?"))[0] == 200
