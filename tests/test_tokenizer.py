"""Tokenizer: round trips, digit splitting, special tokens, and chat rendering checked against transformers."""

from __future__ import annotations

import json
import random

import pytest

from nanoseek.tasks.corpus import pretrain_texts
from nanoseek.tokenizer import CHATML_TEMPLATE, SPECIAL_TOKENS, Tokenizer

# A template with a system-message branch, a loop, loop.last, a bos token, raise_exception,
# tojson and a generation prompt: the features real Hub templates use.
FANCY_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system = messages[0]['content'] %}
    {%- set rest = messages[1:] %}
{%- else %}
    {%- set system = 'You are helpful.' %}
    {%- set rest = messages %}
{%- endif %}
<|im_start|>system
{{ system }}<|im_end|>
{% for m in rest %}
    {%- if m['role'] not in ['user', 'assistant'] %}
        {{- raise_exception('bad role ' + m['role']) }}
    {%- endif %}
<|im_start|>{{ m['role'] }}
  {% if m.meta is defined %}{{ m.meta | tojson }} {% endif %}{{ m['content'] | trim }}<|im_end|>
{% if loop.last and m['role'] == 'assistant' %}{{ eos_token }}{% endif %}
{% endfor %}
{%- if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""

# Marks the assistant text for transformers' return_assistant_tokens_mask: a reference for encode_chat.
GENERATION_TEMPLATE = (
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' }}"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ m['content'] + '<|im_end|>' }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

CONVERSATION = [
    {"role": "system", "content": "Answer with a boxed number."},
    {"role": "user", "content": "What is 47 + 38?"},
    {"role": "assistant", "content": "<think>\n7+8=15, carry 1: 5\n4+3+1=8: 85\n</think>\n\\boxed{85}"},
    {"role": "user", "content": "  And 12 * 3? 🙂  ", "meta": {"lang": "é", "note": "<b>&"}},
    {"role": "assistant", "content": "<think>\n12*3=36\n</think>\n\\boxed{36}"},
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    texts = pretrain_texts(1500, seed=1) + ["naïve café, 你好, Привет, 🙂 — the quick brown fox"] * 20
    return Tokenizer.train(texts, vocab_size=400)


@pytest.fixture(scope="module")
def saved(tok, tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    tok.save(path)
    return path


def hf_tokenizer(tokenizer_file, **kwargs):
    transformers = pytest.importorskip("transformers")
    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), **kwargs)


def random_unicode(rng: random.Random, n: int) -> str:
    pools = ["abc XYZ 0123456789\n\t", "éüßçñ", "你好世界", "Привет", "🙂🚀👍🏽", "\u0301\u200d", "<>{}\\|"]
    out = []
    for _ in range(n):
        pool = rng.choice(pools)
        out.append(rng.choice(pool) if rng.random() < 0.9 else chr(rng.randint(1, 0x10FFFF - 1)))
    return "".join(c for c in out if not 0xD800 <= ord(c) <= 0xDFFF)


def test_any_unicode_round_trips(tok):
    rng = random.Random(0)
    for _ in range(300):
        text = random_unicode(rng, rng.randint(0, 40))
        assert tok.decode(tok.encode(text)) == text


def test_every_digit_is_its_own_token(tok):
    rng = random.Random(1)
    for _ in range(100):
        number = str(rng.randint(0, 10**12))
        text = f"x {number}+{number[::-1]}=? {number}"
        pieces = [tok.decode([i]) for i in tok.encode(text)]
        for piece in pieces:
            assert not any(c.isdigit() for c in piece) or (len(piece) == 1 and piece.isdigit()), piece


def test_special_tokens_are_single_ids(tok):
    ids = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
    assert None not in ids and len(set(ids)) == len(ids)
    for token, token_id in zip(SPECIAL_TOKENS, ids):
        assert tok.encode(token) == [token_id]
        assert tok.encode(f"ab{token}cd").count(token_id) == 1
    assert tok.eos_id == tok.pad_id == tok.token_to_id("<|endoftext|>")
    assert tok.bos_id is None
    assert tok.stop_ids == [tok.eos_id, tok.token_to_id("<|im_end|>")]
    assert tok.vocab_size == 400
    text = "<think>\nx\n</think>\n\\boxed{1}<|im_end|>"
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == "\nx\n\n\\boxed{1}"


def test_vocab_size_must_hold_bytes_and_specials():
    with pytest.raises(ValueError, match="at least"):
        Tokenizer.train(["hello"], vocab_size=100)


def test_save_and_load_give_the_same_tokenizer(tok, saved):
    loaded = Tokenizer.load(saved)
    text = pretrain_texts(3, seed=9)[0] + " 你好 🙂"
    assert loaded.encode(text) == tok.encode(text)
    assert loaded.chat_template == CHATML_TEMPLATE
    assert (loaded.eos_id, loaded.pad_id, loaded.bos_id, loaded.stop_ids) == (
        tok.eos_id,
        tok.pad_id,
        tok.bos_id,
        tok.stop_ids,
    )
    assert Tokenizer.load(saved / "tokenizer.json").encode(text) == tok.encode(text)


def test_builtin_template_matches_transformers_and_spec(tok, saved):
    hf = hf_tokenizer(saved / "tokenizer.json", eos_token="<|endoftext|>", chat_template=CHATML_TEMPLATE)
    messages = [{k: v for k, v in m.items() if k != "meta"} for m in CONVERSATION]
    for add in (False, True):
        ours = tok.apply_chat_template(messages, add_generation_prompt=add)
        assert ours == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add)
        expected = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        assert ours == expected + ("<|im_start|>assistant\n" if add else "")
        ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=add, return_dict=False)
        assert tok.encode(ours) == list(ids)
    # the saved directory is a tokenizer transformers can load as it is
    auto = pytest.importorskip("transformers").AutoTokenizer.from_pretrained(str(saved))
    assert (auto.eos_token, auto.pad_token, auto.bos_token) == ("<|endoftext|>", "<|endoftext|>", None)
    assert auto.apply_chat_template(messages, tokenize=False) == tok.apply_chat_template(messages)


def test_hub_style_config_and_fancy_template_match_transformers(tok, saved, tmp_path):
    # tokens as AddedToken dicts, the template as a named list, as in files on the Hub
    config = {
        "bos_token": {"content": "<|im_start|>", "lstrip": False, "__type": "AddedToken"},
        "eos_token": {"content": "<|im_end|>", "lstrip": False, "__type": "AddedToken"},
        "pad_token": "<|endoftext|>",
        "chat_template": [{"name": "tool_use", "template": "unused"}, {"name": "default", "template": FANCY_TEMPLATE}],
    }
    (tmp_path / "tokenizer.json").write_text((saved / "tokenizer.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ours = Tokenizer.load(tmp_path)
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == tuple(
        tok.token_to_id(t) for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
    )
    assert ours.stop_ids == [tok.token_to_id("<|im_end|>")]
    hf = hf_tokenizer(
        tmp_path / "tokenizer.json",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=FANCY_TEMPLATE,
    )
    cases = [CONVERSATION, CONVERSATION[1:], CONVERSATION[:2], CONVERSATION[1:4]]
    for messages in cases:
        for add in (False, True):
            want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add)
            assert ours.apply_chat_template(messages, add_generation_prompt=add) == want
    bad = [{"role": "tool", "content": "x"}]
    with pytest.raises(Exception, match="bad role tool"):
        hf.apply_chat_template(bad, tokenize=False)
    with pytest.raises(Exception, match="bad role tool"):
        ours.apply_chat_template(bad)


def test_chat_template_jinja_file_is_read(saved, tmp_path):
    (tmp_path / "tokenizer.json").write_text((saved / "tokenizer.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m.content }}]{% endfor %}")
    assert (
        Tokenizer.load(tmp_path).apply_chat_template(CONVERSATION[:2])
        == f"[{CONVERSATION[0]['content']}][{CONVERSATION[1]['content']}]"
    )


def piecewise_reference(tok: Tokenizer, messages) -> tuple[list[int], list[int]]:
    """The built-in format tokenised turn by turn, each piece with its loss flag."""
    ids, mask = [], []
    for m in messages:
        learn = int(m["role"] == "assistant")
        for piece, flag in ((f"<|im_start|>{m['role']}\n", 0), (m["content"], learn), ("<|im_end|>", learn), ("\n", 0)):
            piece_ids = tok.encode(piece)
            ids += piece_ids
            mask += [flag] * len(piece_ids)
    return ids, mask


def test_encode_chat_matches_piecewise_reference(tok):
    messages = [{k: v for k, v in m.items() if k != "meta"} for m in CONVERSATION]
    ids, mask = tok.encode_chat(messages)
    assert (ids, mask) == piecewise_reference(tok, messages)
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "".join(
        m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"
    )
    # every conversation of the built-in corpus shape
    from nanoseek.tasks.corpus import sft_conversations

    for conversation in sft_conversations(50, seed=3):
        assert tok.encode_chat(conversation["messages"]) == piecewise_reference(tok, conversation["messages"])


def test_encode_chat_matches_transformers_assistant_mask(tok, saved):
    hf = hf_tokenizer(saved / "tokenizer.json", eos_token="<|endoftext|>", chat_template=GENERATION_TEMPLATE)
    ours = Tokenizer(tok.backend, chat_template=GENERATION_TEMPLATE)
    messages = [{k: v for k, v in m.items() if k != "meta"} for m in CONVERSATION]
    for conversation in (messages, messages[1:3], messages[1:]):
        out = hf.apply_chat_template(conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        assert ours.encode_chat(conversation) == (list(out["input_ids"]), list(out["assistant_masks"]))


def test_encode_chat_refuses_templates_that_rewrite_history(tok):
    # this template drops the reasoning of all but the last assistant turn (as Qwen3 does)
    template = (
        "{% for m in messages %}{% if m.role == 'assistant' and not loop.last %}"
        "{{ m.content.split('</think>')[-1] }}{% else %}{{ m.content }}{% endif %}{% endfor %}"
    )
    odd = Tokenizer(tok.backend, chat_template=template)
    with pytest.raises(ValueError, match="concatenation"):
        odd.encode_chat(CONVERSATION[1:])


def test_tokenizer_train_command(tmp_path):
    from nanoseek.cli import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(pretrain_texts(300, seed=4)), encoding="utf-8")
    assert (
        main(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "300", "--out", str(tmp_path / "a")]) == 0
    )
    assert (
        main(["tokenizer", "train", "--corpus-docs", "300", "--vocab-size", "300", "--out", str(tmp_path / "b")]) == 0
    )
    for name in ("a", "b"):
        loaded = Tokenizer.load(tmp_path / name)
        assert loaded.vocab_size == 300 and loaded.chat_template == CHATML_TEMPLATE
        assert loaded.decode(loaded.encode("What is 12 + 34? 🙂")) == "What is 12 + 34? 🙂"


# ----------------------------------------------------------------------------- tools (Qwen2.5 style)
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "calculator",
            "description": "Evaluate an arithmetic expression exactly.",
            "parameters": {
                "type": "object",
                "properties": {"expression": {"type": "string", "description": "e.g. (1 + 2) * 3 — «é»"}},
                "required": ["expression"],
            },
        },
    },
    {"type": "function", "function": {"name": "clock", "description": "The time.", "parameters": {"type": "object"}}},
]
CALLS = [
    {"name": "calculator", "arguments": {"expression": "1234 * 5678"}},
    {"name": "clock", "arguments": {}},
]
TOOL_CONVERSATION = [
    {"role": "system", "content": "Use the tools."},
    {"role": "user", "content": "What is 1234 * 5678, and the time?"},
    {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": c} for c in CALLS]},
    {"role": "tool", "content": "7006652"},
    {"role": "tool", "content": "12:00 <&>"},
    {"role": "assistant", "content": "Let me check.", "tool_calls": [CALLS[0]]},
    {"role": "tool", "content": "7006652"},
    {"role": "assistant", "content": "\\boxed{7006652}"},
]


def qwen25_template() -> str | None:
    """Qwen2.5's own chat template, as trl ships it (an independent copy of the format we follow); None
    without trl."""
    import importlib.util
    from importlib.resources import files

    if importlib.util.find_spec("trl") is None:
        return None
    return (files("trl") / "chat_templates" / "qwen2_5.jinja").read_text(encoding="utf-8")


TOOL_CASES = [TOOL_CONVERSATION, TOOL_CONVERSATION[:4], TOOL_CONVERSATION[:5], TOOL_CONVERSATION[:7]]


def test_tool_rendering_matches_transformers(tok, saved):
    hf = hf_tokenizer(saved / "tokenizer.json", eos_token="<|endoftext|>", chat_template=CHATML_TEMPLATE)
    for messages in [*TOOL_CASES, TOOL_CONVERSATION[1:]]:
        for tools in (TOOLS, None):
            for add in (False, True):
                ours = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=add)
                assert ours == hf.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=add)
    # arguments given as a JSON string (the OpenAI wire format) are written as they are
    wire = [{"role": "assistant", "tool_calls": [{"function": {"name": "clock", "arguments": '{"tz": "UTC"}'}}]}]
    assert tok.apply_chat_template(wire) == hf.apply_chat_template(wire, tokenize=False)
    assert '"arguments": {"tz": "UTC"}}' in tok.apply_chat_template(wire)


def test_tool_rendering_is_qwen25s(tok, saved):
    template = qwen25_template()
    if template is None:
        pytest.skip("trl (which ships Qwen2.5's template) is not installed")
    qwen = hf_tokenizer(saved / "tokenizer.json", eos_token="<|endoftext|>", chat_template=template)
    for messages in TOOL_CASES:  # with a system message, Qwen2.5's template renders exactly the same text
        for tools in (TOOLS, None):
            for add in (False, True):
                theirs = qwen.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=add)
                assert tok.apply_chat_template(messages, tools=tools, add_generation_prompt=add) == theirs
    # without a system message we add none (Qwen2.5 adds its own); the rest is the same text
    without = TOOL_CONVERSATION[1:]
    ours = tok.apply_chat_template(without, tools=TOOLS)
    theirs = qwen.apply_chat_template(without, tools=TOOLS, tokenize=False)
    qwen_system = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.\n\n"
    assert ours == theirs.replace(qwen_system, "", 1) and ours != theirs


def test_without_tools_the_template_is_the_plain_chatml_one(tok, saved):
    from nanoseek.tasks.corpus import sft_conversations
    from nanoseek.tokenizer import CHATML_TEMPLATE_V1

    plain = Tokenizer(tok.backend, chat_template=CHATML_TEMPLATE_V1)
    conversations = [[{k: v for k, v in m.items() if k != "meta"} for m in CONVERSATION]]
    conversations += [c["messages"] for c in sft_conversations(30, seed=5)]
    for messages in conversations:
        for add in (False, True):
            assert tok.apply_chat_template(messages, add_generation_prompt=add) == plain.apply_chat_template(
                messages, add_generation_prompt=add
            )
            assert tok.apply_chat_template(messages, tools=[], add_generation_prompt=add) == (
                plain.apply_chat_template(messages, add_generation_prompt=add)
            )
    # a tokenizer saved with the plain template loads with the tool-aware one
    plain.save(saved.parent / "plain")
    assert Tokenizer.load(saved.parent / "plain").chat_template == CHATML_TEMPLATE


def test_tool_calls_round_trip_render_parse(tok):
    from nanoseek.envs.tools import parse_tool_calls, render_tool_call, split_tool_calls

    rng = random.Random(0)
    for _ in range(50):
        calls = [
            {"name": rng.choice(["calculator", "python", "f_1"]), "arguments": {"x": random_unicode(rng, 8), "n": i}}
            for i in range(rng.randint(1, 3))
        ]
        content = rng.choice(["", "Let me compute."])
        messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": content, "tool_calls": calls}]
        text = tok.apply_chat_template(messages)
        assistant = text.split("<|im_start|>assistant\n", 1)[1].removesuffix("<|im_end|>\n")
        assert parse_tool_calls(assistant) == (calls, [])
        assert split_tool_calls(assistant) == (content, calls)
        if not content:  # what the model writes (render_tool_call, one a line) is what the template renders
            written = "\n".join(render_tool_call(c["name"], c["arguments"]) for c in calls)
            raw = [{"role": "user", "content": "q"}, {"role": "assistant", "content": written}]
            assert tok.apply_chat_template(raw) == text


def test_encode_chat_with_tools_learns_only_the_assistant_turns(tok):
    from nanoseek.envs.tools import render_tool_call

    messages = [
        {"role": "user", "content": "What is 1234 * 5678?"},
        {"role": "assistant", "content": render_tool_call("calculator", {"expression": "1234 * 5678"})},
        {"role": "tool", "content": "7006652"},
        {"role": "tool", "content": "second"},
        {"role": "assistant", "content": "\\boxed{7006652}"},
    ]
    ids, mask = tok.encode_chat(messages, tools=TOOLS)
    assert ids == tok.encode(tok.apply_chat_template(messages, tools=TOOLS))
    learned = tok.decode([i for i, m in zip(ids, mask) if m])
    assert learned == "".join(m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant")
