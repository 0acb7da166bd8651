"""`nanoseek serve` driven by the official `openai` Python client, as a user would call it."""

from __future__ import annotations

import json

import pytest
from serving import naive_greedy_text, serve_tiny

openai = pytest.importorskip("openai", reason="the openai client is a dev extra: pip install -e '.[dev]'")
pytestmark = pytest.mark.usefixtures("one_thread")
KEY = "sk-local"
QUESTION = [{"role": "user", "content": "What is 12 + 30?"}]


@pytest.fixture(scope="module")
def served():
    s = serve_tiny(api_key=KEY, max_seq_len=1024)  # room for the tools block
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def test_chat_streamed_and_not_is_the_greedy_answer_with_usage(served, client):
    expected = naive_greedy_text(served.model, served.tokenizer, QUESTION, 16)
    reply = client.chat.completions.create(model="tiny-test", messages=QUESTION, temperature=0, max_tokens=16)
    assert reply.choices[0].message.content == expected and reply.choices[0].message.role == "assistant"
    assert reply.usage.completion_tokens <= 16 and reply.usage.total_tokens > reply.usage.completion_tokens
    chunks = list(
        client.chat.completions.create(
            model="tiny-test",
            messages=QUESTION,
            temperature=0,
            max_tokens=16,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    usage = chunks[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (reply.usage.prompt_tokens, reply.usage.completion_tokens)
    assert [m.id for m in client.models.list()] == ["tiny-test"]


def test_logprobs_and_completions_with_echo(client):
    reply = client.chat.completions.create(
        model="tiny-test", messages=QUESTION, temperature=0, max_tokens=4, logprobs=True, top_logprobs=2
    )
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens - (reply.choices[0].finish_reason == "stop")
    for entry in content:  # greedy: each token is the most probable one
        assert entry.token == entry.top_logprobs[0].token
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-4)
    done = client.completions.create(
        model="tiny-test", prompt="What is 3 + 4?\n", max_tokens=0, echo=True, logprobs=1, temperature=0
    )
    assert "".join(done.choices[0].logprobs.tokens) == "What is 3 + 4?\n"
    assert done.choices[0].logprobs.token_logprobs[0] is None


def test_errors_are_the_clients_exceptions(served, client):
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="tiny-test", messages=QUESTION, temperature=-1)
    with pytest.raises(openai.BadRequestError, match=r"messages\[0\]\.role"):
        client.chat.completions.create(model="tiny-test", messages=[{"role": "alien", "content": "x"}])
    wrong = openai.OpenAI(base_url=served.url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model="tiny-test", messages=QUESTION)


def test_tools_and_tool_messages_are_rendered_by_the_chat_template(served, client):
    tools = [
        {
            "type": "function",
            "function": {
                "name": "calculator",
                "description": "Exact arithmetic",
                "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}},
            },
        }
    ]
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "calculator", "arguments": '{"expression": "2*3"}'},
    }
    messages = [
        *QUESTION,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "6"},
    ]
    reply = client.chat.completions.create(
        model="tiny-test", messages=messages, tools=tools, temperature=0, max_tokens=4
    )
    args = json.loads(call["function"]["arguments"])  # the template renders the arguments object
    rendered = served.tokenizer.apply_chat_template(
        [
            *QUESTION,
            {
                "role": "assistant",
                "tool_calls": [{"type": "function", "function": {"name": "calculator", "arguments": args}}],
            },
            {"role": "tool", "content": "6", "tool_call_id": "call_1"},
        ],
        tools=tools,
        add_generation_prompt=True,
    )
    assert "<tools>" in rendered and "<tool_response>" in rendered
    assert reply.usage.prompt_tokens == len(served.tokenizer.encode(rendered))


def test_a_tool_call_the_model_writes_comes_back_as_tool_calls(served, client):
    """The model's text is made a `<tool_call>` block (detokenize patched): the client reads tool_calls."""
    from nanoseek.envs.tools import render_tool_call

    engine = served.engine
    detokenize = engine.detokenize
    block = render_tool_call("calculator", {"expression": "12 * 34"})
    engine.detokenize = lambda ids: "Let me compute. " + block if ids else ""
    tools = [{"type": "function", "function": {"name": "calculator", "parameters": {"type": "object"}}}]
    try:
        reply = client.chat.completions.create(model="tiny-test", messages=QUESTION, tools=tools, max_tokens=4)
        streamed = list(
            client.chat.completions.create(model="tiny-test", messages=QUESTION, tools=tools, max_tokens=4, stream=True)
        )
    finally:
        engine.detokenize = detokenize
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me compute."
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "calculator"
    assert json.loads(call.function.arguments) == {"expression": "12 * 34"}
    content = "".join(c.choices[0].delta.content or "" for c in streamed)
    [streamed_call] = [t for c in streamed for t in c.choices[0].delta.tool_calls or []]
    assert "<tool_call>" not in content and streamed[-1].choices[0].finish_reason == "tool_calls"
    assert streamed_call.function.name == "calculator" and streamed_call.index == 0
    assert json.loads(streamed_call.function.arguments) == {"expression": "12 * 34"}
