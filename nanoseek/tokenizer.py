"""Byte-level BPE tokenizer with a chat template, on top of Hugging Face `tokenizers`.

Why a wrapper at all: the model code needs a handful of things (ids, eos/pad, the ids that
stop generation, a chat template and a loss mask for SFT), and it needs them the same way
whether the tokenizer was trained here in seconds or is Qwen2.5's 151k-token one.

Choices for the tokenizers we train:
- every digit is its own token (`Digits(individual_digits=True)` before `ByteLevel`), so the
  model sees numbers digit by digit and can learn column arithmetic;
- all 256 byte symbols are in the initial alphabet, so any Unicode text round-trips;
- `<|endoftext|>` (eos and pad), `<|im_start|>`, `<|im_end|>`, `<think>`, `</think>` are
  special tokens, i.e. always single ids that never merge with text;
- a ChatML template: `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message.

Chat templates are rendered with jinja2 the way `transformers` renders them (sandboxed
environment, `trim_blocks`, `lstrip_blocks`, `raise_exception`, a `tojson` filter), so a
template from the Hub gives the same text here as there.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from nanoseek.errors import InputError, UserError, missing, read_json, reading

EOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
THINK_START = "<think>"
THINK_END = "</think>"
SPECIAL_TOKENS = [EOS_TOKEN, IM_START, IM_END, THINK_START, THINK_END]

# ChatML, with tools the way Qwen2.5 renders them: a system block listing the functions inside <tools></tools>
# (after the system message's own text), an assistant's `tool_calls` as <tool_call> blocks, and each run of
# `tool` messages as one user turn of <tool_response> blocks. Without tools, tool calls or tool messages the
# output is exactly the plain ChatML of CHATML_TEMPLATE_V1 (the template tokenizers were saved with before).
CHATML_TEMPLATE = (
    "{% if tools %}"
    "{{ '<|im_start|>system\\n' }}"
    "{% if messages and messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\\n\\n' }}{% endif %}"
    "{{ '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{% for tool in tools %}{{ '\\n' + (tool | tojson) }}{% endfor %}"
    "{{ '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    'within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{"name": <function-name>, '
    '"arguments": <args-json-object>}\\n</tool_call><|im_end|>\\n\' }}'
    "{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and loop.first and tools %}"
    "{% elif message['role'] == 'assistant' and message['tool_calls'] %}"
    "{{ '<|im_start|>assistant' }}{% if message['content'] %}{{ '\\n' + message['content'] }}{% endif %}"
    "{% for call in message['tool_calls'] %}"
    "{% if call['function'] is defined %}{% set call = call['function'] %}{% endif %}"
    "{{ '\\n<tool_call>\\n{\"name\": \"' + call['name'] + '\", \"arguments\": ' }}"
    "{% if call['arguments'] is string %}{{ call['arguments'] }}{% else %}{{ call['arguments'] | tojson }}{% endif %}"
    "{{ '}\\n</tool_call>' }}"
    "{% endfor %}"
    "{{ '<|im_end|>\\n' }}"
    "{% elif message['role'] == 'tool' %}"
    "{% if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}{{ '<|im_start|>user' }}{% endif %}"
    "{{ '\\n<tool_response>\\n' + message['content'] + '\\n</tool_response>' }}"
    "{% if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{ '<|im_end|>\\n' }}{% endif %}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# The plain ChatML template tokenizers trained here were saved with before tools; `load` reads it as the above.
CHATML_TEMPLATE_V1 = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# The named special tokens transformers passes to a chat template (its `special_tokens_map`).
_NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _json_object(path: Path) -> dict[str, Any]:
    """A JSON object file beside tokenizer.json ({} when absent), or one line saying what is wrong with it."""
    if not path.is_file():
        return {}
    return read_json(path)


# Used as eos when a tokenizer.json comes without a tokenizer_config.json naming one.
_EOS_GUESSES = (EOS_TOKEN, "</s>", "<eos>", "<|end_of_text|>")


def _token_content(value: Any) -> str | None:
    """HF config files store a token as a string or as a dict with a "content" key (AddedToken)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"cannot read a token from {value!r}: expected a string or a dict with 'content'")


def _pick_template(value: Any) -> str | None:
    """A chat_template is a string, or a list of {name, template} of which we take "default" (or the first)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        by_name = {v.get("name"): v.get("template") for v in value}
        return by_name.get("default", value[0].get("template"))
    raise ValueError(f"cannot read chat_template of type {type(value).__name__}")


@functools.lru_cache(maxsize=16)
def _compile_template(template: str):
    """Compile a chat template in a jinja environment set up like transformers' one."""

    class GenerationTag(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text for HF masks; here it just renders."""

        tags: ClassVar[set[str]] = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters, which would change the prompt text.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def render_chat(
    template: str,
    messages: Sequence[dict[str, Any]],
    tools: Sequence[dict[str, Any]] | None = None,
    add_generation_prompt: bool = False,
    **variables: Any,
) -> str:
    """A conversation rendered by a chat template (`variables`: bos_token, eos_token, ...), as transformers does."""
    # transformers drops None values (an API's content=None) before rendering; so do we.
    messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
    return _compile_template(template).render(
        messages=messages,
        tools=list(tools) if tools else None,
        documents=None,
        add_generation_prompt=add_generation_prompt,
        **variables,
    )


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special tokens and chat template from tokenizer_config.json."""

    def __init__(
        self,
        backend: Any,
        chat_template: str | None = None,
        eos_token: str | None = None,
        bos_token: str | None = None,
        pad_token: str | None = None,
        special_tokens: dict[str, str] | None = None,
    ):
        self.backend = backend  # a tokenizers.Tokenizer
        self.chat_template = chat_template
        if eos_token is None:
            eos_token = next((t for t in _EOS_GUESSES if backend.token_to_id(t) is not None), None)
            if eos_token is None:
                raise ValueError("no eos_token given and none of the usual eos tokens is in the vocabulary")
        self.eos_token = eos_token
        self.bos_token = bos_token
        self.pad_token = pad_token or eos_token
        for name, token in (("eos", self.eos_token), ("bos", bos_token), ("pad", self.pad_token)):
            if token is not None and backend.token_to_id(token) is None:
                raise ValueError(f"{name}_token {token!r} is not in the vocabulary")
        # What a chat template sees as bos_token, eos_token, ... (transformers' special_tokens_map).
        self.special_tokens = dict(special_tokens or {})
        self.special_tokens.update(
            {k: v for k, v in (("eos_token", eos_token), ("bos_token", bos_token)) if v is not None}
        )
        if pad_token is not None:
            self.special_tokens["pad_token"] = pad_token

    # ------------------------------------------------------------------ building
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> Tokenizer:
        """Train a byte-level BPE with one token per digit, the chat specials and the ChatML template."""
        minimum = 256 + len(SPECIAL_TOKENS)
        if vocab_size < minimum:
            raise ValueError(f"vocab_size must be at least {minimum} (256 bytes + {len(SPECIAL_TOKENS)} specials)")
        backend = HFTokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        backend.train_from_iterator(texts, trainer=trainer)
        return cls(backend, chat_template=CHATML_TEMPLATE, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Load a directory holding tokenizer.json (+ tokenizer_config.json), or a tokenizer.json file."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise missing(file, "no tokenizer file (expected a directory with tokenizer.json, or the file)")
        with reading(file):
            text = file.read_text(encoding="utf-8")
        try:
            backend = HFTokenizer.from_str(text)
        except Exception as e:  # the tokenizers library raises its own errors for any damage
            reason = " ".join(str(e).split())[:200]
            raise InputError(f"{file}: not a valid tokenizer.json ({reason})") from None
        folder = file.parent
        config = _json_object(folder / "tokenizer_config.json")
        if (folder / "chat_template.jinja").is_file():
            with reading(folder / "chat_template.jinja"):
                jinja_template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        try:
            template = _pick_template(config.get("chat_template"))
            if template is None and (folder / "chat_template.jinja").is_file():
                template = jinja_template
            if template is None and (folder / "chat_template.json").is_file():
                template = _pick_template(_json_object(folder / "chat_template.json").get("chat_template"))
            if template == CHATML_TEMPLATE_V1:  # ours before tools: the same text for every tool-free chat
                template = CHATML_TEMPLATE
            named = {k: _token_content(config.get(k)) for k in _NAMED_TOKENS}
            return cls(
                backend,
                chat_template=template,
                eos_token=named["eos_token"],
                bos_token=named["bos_token"],
                pad_token=named["pad_token"],
                special_tokens={k: v for k, v in named.items() if v is not None},
            )
        except UserError:
            raise
        except ValueError as e:  # a special token the vocabulary lacks, a token or template of the wrong type
            raise InputError(f"{folder / 'tokenizer_config.json'}: {e}") from None

    def save(self, directory: str | os.PathLike) -> None:
        """Write tokenizer.json and tokenizer_config.json, readable by `load` and by transformers.

        Each file is written whole and renamed into place, tokenizer.json last: a run killed mid-save
        never leaves a tokenizer.json that `load` would take without its config."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", **self.special_tokens}
        config.update(eos_token=self.eos_token, bos_token=self.bos_token, pad_token=self.pad_token)
        config["chat_template"] = self.chat_template
        text = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
        for name, content in (("tokenizer_config.json", text), ("tokenizer.json", self.backend.to_str(pretty=True))):
            tmp = directory / f".{name}.tmp"
            tmp.write_text(content, encoding="utf-8")
            os.replace(tmp, directory / name)

    # ------------------------------------------------------------------ ids
    @property
    def vocab_size(self) -> int:
        """Number of ids, added/special tokens included (the embedding table needs at least this many rows)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def eos_id(self) -> int:
        return self.backend.token_to_id(self.eos_token)

    @property
    def pad_id(self) -> int:
        return self.backend.token_to_id(self.pad_token)

    @property
    def bos_id(self) -> int | None:
        return None if self.bos_token is None else self.backend.token_to_id(self.bos_token)

    @property
    def stop_ids(self) -> list[int]:
        """Generation stops on any of these: eos, and `<|im_end|>` (the end of a chat turn) if present."""
        ids = [self.eos_id]
        im_end = self.backend.token_to_id(IM_END)
        if im_end is not None and im_end not in ids:
            ids.append(im_end)
        return ids

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special tokens written in the text become their ids; no bos/eos is added."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ chat
    def apply_chat_template(
        self,
        messages: Sequence[dict[str, Any]],
        tools: Sequence[dict[str, Any]] | None = None,
        add_generation_prompt: bool = False,
        **kwargs: Any,
    ) -> str:
        """Render a conversation to text, as transformers' `apply_chat_template(..., tokenize=False)`.

        `tools`: OpenAI function schemas the template lists for the model (None or []: no tools block)."""
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat_template (tokenizer_config.json has none)")
        variables = {**self.special_tokens, **kwargs}
        return render_chat(self.chat_template, messages, tools, add_generation_prompt, **variables)

    def encode_chat(
        self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None = None
    ) -> tuple[list[int], list[int]]:
        """Token ids of a rendered conversation and a loss mask (1 on what the assistant must produce).

        The mask covers each assistant message's content and the end-of-turn token that closes it
        (`<|im_end|>`), not the role header nor the whitespace after the turn. We find those character
        spans by rendering prefixes of the conversation (`messages[:i]` with the generation prompt is
        where the assistant starts, `messages[:i+1]` is where it ends), which works for any template that
        renders a conversation as the concatenation of its turns; we check that it does.
        """
        text = self.apply_chat_template(messages, tools=tools)
        spans: list[tuple[int, int]] = []
        for i, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            start_text = self.apply_chat_template(messages[:i], tools=tools, add_generation_prompt=True)
            end_text = self.apply_chat_template(messages[: i + 1], tools=tools)
            if not (text.startswith(end_text) and end_text.startswith(start_text)):
                raise ValueError(
                    "the chat template does not render a conversation as the concatenation of its turns "
                    f"(message {i}), so the assistant tokens cannot be located"
                )
            spans.append((len(start_text), len(end_text.rstrip())))
        encoding = self.backend.encode(text, add_special_tokens=False)
        mask = []
        span = 0
        for start, _end in encoding.offsets:
            while span < len(spans) and start >= spans[span][1]:
                span += 1
            mask.append(int(span < len(spans) and spans[span][0] <= start))
        return encoding.ids, mask

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eos={self.eos_token!r}, stop_ids={self.stop_ids})"
