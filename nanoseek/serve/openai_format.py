"""Between the OpenAI API's JSON and the engine: prompts from requests, SamplingParams, and the
response objects (choices, chunks, usage, log-probs) from completions."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from typing import Any

from nanoseek.engine.requests import Completion
from nanoseek.engine.sampling import SamplingParams
from nanoseek.serve.limits import Limits
from nanoseek.serve.schemas import ApiError, ChatRequest, CompletionRequest, Sampling
from nanoseek.serve.worker import Scores, TopRow


def chat_messages(req: ChatRequest) -> list[dict[str, Any]]:
    """The request's messages as the chat template reads them (text parts joined, tool-call arguments parsed)."""
    out = []
    for i, m in enumerate(req.messages):
        message: dict[str, Any] = {"role": m.role, "content": m.text()}
        if m.tool_calls:
            calls = []
            for j, call in enumerate(m.tool_calls):
                try:
                    arguments = json.loads(call.function.arguments or "{}")
                except json.JSONDecodeError as e:
                    field = f"messages[{i}].tool_calls[{j}].function.arguments"
                    raise ApiError(400, f"{field}: not valid JSON: {e.msg}", field) from None
                calls.append({"type": "function", "function": {"name": call.function.name, "arguments": arguments}})
            message["tool_calls"] = calls
        if m.tool_call_id is not None:
            message["tool_call_id"] = m.tool_call_id
        if m.name is not None:
            message["name"] = m.name
        out.append(message)
    return out


def chat_prompt_ids(req: ChatRequest, tokenizer: Any) -> list[int]:
    messages = chat_messages(req)
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools and req.tool_choice != "none" else None
    try:
        if tools:
            text = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True)
        else:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    except TypeError as e:
        if tools and "tools" in str(e):
            raise ApiError(400, "tools: this model's chat template cannot render tools", "tools") from None
        raise ApiError(400, f"messages: the chat template cannot render them: {e}", "messages") from None
    except Exception as e:  # no template, or the template's own raise_exception (e.g. roles out of order)
        raise ApiError(400, f"messages: the chat template cannot render them: {e}", "messages") from None
    return tokenizer.encode(text)


def completion_prompts(req: CompletionRequest, tokenizer: Any, vocab_size: int) -> list[list[int]]:
    """`prompt` as token-id lists: a string, a list of strings, a list of ids, or a list of id lists."""
    prompt = req.prompt
    if isinstance(prompt, str):
        prompts: list = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [prompt]
    else:
        prompts = list(prompt)
    if not prompts:
        raise ApiError(400, "prompt: empty", "prompt")
    out = []
    for i, p in enumerate(prompts):
        ids = tokenizer.encode(p) if isinstance(p, str) else list(p)
        if not ids:
            raise ApiError(400, f"prompt[{i}]: empty (needs at least one token)", "prompt")
        bad = next((t for t in ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise ApiError(400, f"prompt[{i}]: token id {bad} outside [0, {vocab_size})", "prompt")
        out.append(ids)
    return out


def sampling_params(req: Sampling, max_tokens: int | None, limits: Limits) -> SamplingParams:
    field = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) is not None else "max_tokens"
    max_tokens = limits.default_max_tokens if max_tokens is None else max_tokens
    limits.check_max_tokens(max_tokens, field)
    limits.check_n(req.n)
    if max_tokens < 1:
        raise ApiError(400, f"{field} = {max_tokens}: must be >= 1", field)
    return SamplingParams(
        max_new_tokens=max_tokens,
        temperature=req.temperature,
        top_k=req.top_k,
        top_p=req.top_p,
        min_p=req.min_p,
        n=req.n,
        seed=req.seed,
        stop_strings=req.stop_strings(),
        ignore_eos=req.ignore_eos,
    )


def finish_reason(completion: Completion) -> str:
    return "length" if completion.finish_reason == "length" else "stop"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def response_meta(chat: bool, model: str) -> dict[str, Any]:
    return {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
        "created": int(time.time()),
        "model": model,
    }


def shown_tokens(completion: Completion) -> list[int]:
    """The generated tokens a client sees: without the stop token that ended the sample."""
    ids = completion.token_ids
    return ids[:-1] if isinstance(completion.stop, int) and ids else ids


# ----------------------------------------------------------------------------- log-probs
class TokenText:
    """Token id -> its text, cached (the same ids recur in every response)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, token: int) -> str:
        text = self.cache.get(token)
        if text is None:
            text = self.cache[token] = self.tokenizer.decode([token])
        return text


def chat_logprobs(
    tokens: Sequence[int], logprobs: Sequence[float], top: Sequence[TopRow] | None, text: TokenText
) -> list[dict[str, Any]]:
    """`choices[i].logprobs.content` of the chat API: one entry per token."""

    def entry(token: int, logprob: float) -> dict[str, Any]:
        s = text(token)
        return {"token": s, "logprob": logprob, "bytes": list(s.encode("utf-8"))}

    return [
        {**entry(t, lp), "top_logprobs": [entry(a, b) for a, b in top[i]] if top else []}
        for i, (t, lp) in enumerate(zip(tokens, logprobs))
    ]


def completion_logprobs(
    ids: Sequence[int], scores: Scores, first: int, k: int, text: TokenText, offset: int = 0
) -> dict[str, Any]:
    """`choices[i].logprobs` of the completions API for ids[first:], scored by teacher forcing;
    ids[0] (an echoed prompt's first token) has no log-prob: None, as OpenAI gives it."""
    tokens = [text(t) for t in ids[first:]]
    token_logprobs: list[float | None] = [None if i == 0 else scores.logprobs[i - 1] for i in range(first, len(ids))]
    top: list[dict[str, float] | None] = [
        None if i == 0 or not k else {text(a): b for a, b in scores.top[i - 1]} for i in range(first, len(ids))
    ]
    offsets = []
    for s in tokens:
        offsets.append(offset)
        offset += len(s)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


__all__ = [
    "TokenText",
    "chat_logprobs",
    "chat_prompt_ids",
    "completion_logprobs",
    "completion_prompts",
    "finish_reason",
    "response_meta",
    "sampling_params",
    "shown_tokens",
    "usage",
]
