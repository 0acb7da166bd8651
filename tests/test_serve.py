"""`nanoseek serve`: the OpenAI-compatible server, over real HTTP on a free local port.

References: greedy text from a naive loop that recomputes the whole sequence every step (no
engine, no cache); the server's own non-streamed answer for the streamed one.
"""

from __future__ import annotations

import json
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from serving import chat, naive_greedy_text, post, serve_tiny, sse_events

from nanoseek.engine import Engine
from nanoseek.model import Transformer, get_preset
from nanoseek.serve import Server
from nanoseek.tasks.corpus import pretrain_texts
from nanoseek.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def served():
    s = serve_tiny()
    yield s.url, s.model, s.tokenizer, s.engine, s.server
    s.close()


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
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant" and "role" not in chunks[1]["choices"][0]["delta"]
    text = "".join(c["choices"][0]["delta"]["content"] for c in chunks)
    assert text == whole["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]


def test_a_stream_interval_sends_several_tokens_an_event_and_the_same_answer():
    # --stream-interval 4: the first token at once, then an event every 4 decode steps, each carrying its tokens.
    s = serve_tiny(stream_interval=4)
    try:
        body = {"prompt": "What is 7 * 8?\n", "max_tokens": 17, "ignore_eos": True, "temperature": 0}
        whole = json.loads(post(s.url, "/v1/completions", body)[1])["choices"][0]
        events = sse_events(post(s.url, "/v1/completions", {**body, "stream": True})[1])
        chunks = [json.loads(e)["choices"][0] for e in events[:-1]]
        assert "".join(c["text"] for c in chunks) == whole["text"] and whole["text"]
        assert chunks[-1]["finish_reason"] == whole["finish_reason"] == "length"
        assert 3 <= len(chunks) <= 2 + (17 - 1 + 3) // 4  # 1 token, then 4 a step (the last may come alone)
    finally:
        s.close()
    with pytest.raises(ValueError, match="stream_interval 0"):
        Server(s.engine, s.tokenizer, ("127.0.0.1", 0), stream_interval=0)


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


# ----------------------------------------------------------------------------- the API as clients use it
def test_content_as_text_parts_is_the_same_as_a_string(served):
    url, *_ = served
    parts = {"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "2 + 9?"}]}
    status, raw = post(url, "/v1/chat/completions", {**chat(""), "messages": [parts]})
    plain = json.loads(post(url, "/v1/chat/completions", chat("What is 2 + 9?"))[1])
    assert status == 200 and json.loads(raw)["choices"] == plain["choices"]


@torch.no_grad()
def teacher_forced(model: Transformer, ids: list[int]) -> torch.Tensor:
    """log_softmax of the next-token logits at every position, float64 from the model's float32."""
    return torch.log_softmax(model(torch.tensor([ids]))[0].double(), dim=-1)


def test_chat_logprobs_are_the_models_and_top_logprobs_are_its_most_probable(served):
    url, model, tokenizer, *_ = served
    reply = json.loads(post(url, "/v1/chat/completions", chat("What is 4 + 4?", logprobs=True, top_logprobs=3))[1])
    content = reply["choices"][0]["logprobs"]["content"]
    prompt = tokenizer.encode(
        tokenizer.apply_chat_template([{"role": "user", "content": "What is 4 + 4?"}], add_generation_prompt=True)
    )
    answer: list[int] = []  # greedy, token by token
    ids = list(prompt)
    for entry in content:
        logp = teacher_forced(model, ids)[-1]
        token = int(logp.argmax())
        answer.append(token)
        assert entry["token"] == tokenizer.decode([token]) and entry["bytes"] == list(entry["token"].encode())
        assert entry["logprob"] == pytest.approx(float(logp[token]), abs=1e-4)
        top = logp.topk(3)
        assert [t["token"] for t in entry["top_logprobs"]] == [tokenizer.decode([i]) for i in top.indices.tolist()]
        assert [t["logprob"] for t in entry["top_logprobs"]] == pytest.approx(top.values.tolist(), abs=1e-4)
        ids.append(token)
    assert tokenizer.decode(answer) == reply["choices"][0]["message"]["content"]


def test_completions_echo_gives_the_prompts_token_logprobs(served):
    url, model, tokenizer, *_ = served
    prompt = "What is 3 + 4?\n"
    ids = tokenizer.encode(prompt)
    reply = json.loads(
        post(url, "/v1/completions", {"prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 2})[1]
    )
    [choice] = reply["choices"]
    lp = choice["logprobs"]
    assert choice["text"] == prompt and "".join(lp["tokens"]) == prompt and reply["usage"]["completion_tokens"] == 0
    expected = teacher_forced(model, ids)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1:] == pytest.approx([float(expected[i, t]) for i, t in enumerate(ids[1:])], abs=1e-4)
    assert [max(d, key=d.get) for d in lp["top_logprobs"][1:]] == [
        tokenizer.decode([int(expected[i].argmax())]) for i in range(len(ids) - 1)
    ]
    assert lp["text_offset"] == [len("".join(lp["tokens"][:i])) for i in range(len(ids))]
    # lm-eval's loglikelihood request: one generated token after the echoed prompt, as token ids
    body = {"prompt": ids, "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0}
    [choice] = json.loads(post(url, "/v1/completions", body)[1])["choices"]
    assert len(choice["logprobs"]["tokens"]) == len(ids) + 1
    assert choice["logprobs"]["token_logprobs"][1:-1] == pytest.approx(lp["token_logprobs"][1:], abs=1e-6)
    assert choice["logprobs"]["tokens"][-1] == tokenizer.decode([int(expected[-1].argmax())])


def test_stream_options_include_usage_ends_with_the_usage_chunk(served):
    url, *_ = served
    whole = json.loads(post(url, "/v1/chat/completions", chat("What is 6 + 1?"))[1])
    body = chat("What is 6 + 1?", stream=True, stream_options={"include_usage": True})
    chunks = [json.loads(e) for e in sse_events(post(url, "/v1/chat/completions", body)[1])[:-1]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
    assert all(c["usage"] is None for c in chunks[:-1])


@pytest.mark.parametrize(
    "method,path,status",
    [("GET", "/nope", 404), ("POST", "/v1/nope", 404), ("GET", "/v1/chat/completions", 405)]
    + [(m, "/v1/chat/completions", 405) for m in ("PUT", "DELETE", "PATCH", "OPTIONS")],
)
def test_unknown_paths_and_methods_get_openai_errors(served, method, path, status):
    url, *_ = served
    got, raw = post(url, path, b"{}", method=method)
    error = json.loads(raw)["error"]
    assert got == status and path in error["message"] and error["code"] == status and error["type"]


@pytest.mark.parametrize(
    "field,value",
    [
        ("model", 5),
        ("max_tokens", "5"),
        ("max_tokens", 5.5),
        ("temperature", "0"),
        ("top_p", []),
        ("top_k", 1.5),
        ("min_p", "x"),
        ("n", True),
        ("seed", -1),
        ("stop", 0),
        ("stop", {}),
        ("stop", [1]),
        ("stream", "no"),
        ("stream_options", {"include_usage": "yes"}),
        ("logprobs", 1),
        ("top_logprobs", 21),
        ("ignore_eos", "yes"),
        ("messages", "hi"),
        ("messages", [{"role": "alien", "content": "hi"}]),
        ("messages", [{"role": "user", "content": 5}]),
        ("messages", [{"role": "user", "content": [{"type": "image", "text": "x"}]}]),
        ("tools", [{"type": "function"}]),
        ("tool_choice", 3),
        ("max_completion_tokens", 0),
    ],
)
def test_wrong_types_for_every_field_get_400_naming_it(served, field, value):
    url, *_ = served
    status, raw = post(url, "/v1/chat/completions", {**chat("hi"), field: value})
    assert status == 400 and json.loads(raw)["error"]["message"].startswith(field), raw


def test_metrics_count_what_was_served(served):
    url, *_ = served

    def scrape() -> dict[str, float]:
        with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
            assert r.headers["Content-Type"].startswith("text/plain")
            text = r.read().decode()
        return {k: float(v) for k, v in (line.rsplit(" ", 1) for line in text.splitlines() if line[0] != "#")}

    before = scrape()
    replies = [json.loads(post(url, "/v1/chat/completions", chat(f"{i} + 1?"))[1]) for i in range(3)]
    assert post(url, "/v1/chat/completions", chat("hi", n=0))[0] == 400
    after = scrape()

    def grew(key: str) -> float:
        return after.get(key, 0) - before.get(key, 0)

    assert grew('nanoseek_requests_total{route="chat",status="200"}') == 3
    assert grew('nanoseek_requests_total{route="chat",status="400"}') == 1
    assert grew("nanoseek_generation_tokens_total") == sum(r["usage"]["completion_tokens"] for r in replies)
    assert grew("nanoseek_prompt_tokens_total") == sum(r["usage"]["prompt_tokens"] for r in replies)
    assert grew("nanoseek_time_to_first_token_seconds_count") == 3
    assert grew('nanoseek_time_to_first_token_seconds_bucket{le="+Inf"}') == 3
    assert after["nanoseek_running_sequences"] == 0 and after["nanoseek_queue_depth"] == 0
    assert after["nanoseek_kv_cache_usage_ratio"] == 0


def test_tool_call_blocks_become_openai_tool_calls_streamed_or_not_and_render_back_the_same():
    from nanoseek.envs.tools import render_tool_call
    from nanoseek.serve.tool_calls import ToolCallStream, split_tool_calls

    block = render_tool_call("calculator", {"expression": "12 * 34"})
    text = f"Let me compute. {block}"
    content, calls = split_tool_calls(text)
    assert content == "Let me compute." and len(calls) == 1
    assert calls[0]["type"] == "function" and calls[0]["id"].startswith("call_")
    assert calls[0]["function"] == {"name": "calculator", "arguments": '{"expression": "12 * 34"}'}
    # streamed a few characters at a time: no part of the block is sent as content
    stream, sent, streamed_calls = ToolCallStream(), "", None
    pieces = [text[i : i + 3] for i in range(0, len(text), 3)]
    for i, piece in enumerate(pieces):
        out, got = stream.feed(piece, i == len(pieces) - 1)
        sent += out
        streamed_calls = got or streamed_calls
    assert "<" not in sent and sent.strip() == content
    assert [c["function"] for c in streamed_calls] == [c["function"] for c in calls]
    # a text that only looks like the start of a block is sent whole in the end
    stream = ToolCallStream()
    assert stream.feed("a <tool", False) == ("a ", None) and stream.feed("box>", True) == ("<toolbox>", None)
    # the OpenAI call sent back in an assistant message renders as the block the model wrote
    tokenizer = Tokenizer.train(pretrain_texts(50, seed=0), 300)
    from nanoseek.serve.openai_format import chat_messages
    from nanoseek.serve.schemas import ChatRequest

    request = ChatRequest.model_validate(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": calls}]}
    )
    assert block in tokenizer.apply_chat_template(chat_messages(request))


def test_64_streams_and_a_burst_of_200_get_0_errors_and_the_single_client_answers():
    s = serve_tiny(max_batch=64)
    try:
        questions = [f"What is {i} + {i % 7}?" for i in range(16)]
        single = {q: json.loads(post(s.url, "/v1/chat/completions", chat(q, max_tokens=8))[1]) for q in questions}

        def streamed(i: int) -> str:
            status, raw = post(s.url, "/v1/chat/completions", chat(questions[i % 16], max_tokens=8, stream=True))
            assert status == 200
            chunks = [json.loads(e) for e in sse_events(raw)[:-1]]
            return "".join(c["choices"][0]["delta"]["content"] for c in chunks)

        def whole(i: int) -> str:
            status, raw = post(s.url, "/v1/chat/completions", chat(questions[i % 16], max_tokens=8))
            assert status == 200
            return json.loads(raw)["choices"][0]["message"]["content"]

        with ThreadPoolExecutor(264) as pool:
            streams = [pool.submit(streamed, i) for i in range(64)]
            burst = [pool.submit(whole, i) for i in range(200)]
            answers = [f.result() for f in streams + burst]
        expected = [single[questions[i % 16]]["choices"][0]["message"]["content"] for i in [*range(64), *range(200)]]
        assert answers == expected
        assert s.engine.stats.max_running > 32
    finally:
        s.close()
