"""Request bodies of the OpenAI API as pydantic models, and errors in OpenAI's shape.

Types are strict (`"stream": "no"`, `"stop": 0` or `"n": 1.5` are refused, not coerced); fields that
clients send and nanoseek does not use (`user`, `frequency_penalty`, ...) are ignored, as OpenAI-compatible
servers do. A refusal names the field: `messages[1].role: Input should be 'system', 'user', ...`.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.responses import JSONResponse

MAX_TOP_LOGPROBS = 20  # OpenAI's own cap

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_overloaded",
    504: "timeout_error",
}


class ApiError(Exception):
    """A request refused with `status`; becomes {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers or {}

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.param, self.headers)


def error_payload(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    kind = ERROR_TYPES.get(status, "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def error_response(status: int, message: str, param: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_payload(status, message, param), status_code=status, headers=headers)


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: str
    arguments: str
    """JSON text, as OpenAI sends it."""


class ToolCall(_Strict):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Strict):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _has_content(self) -> Message:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is required (null only for an assistant message with tool_calls)")
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class FunctionSpec(_Strict):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionSpec


class StreamOptions(_Strict):
    include_usage: bool = False


class Sampling(_Strict):
    """The fields both endpoints share."""

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float = Field(default=1.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0)
    min_p: float = Field(default=0.0, ge=0, le=1)
    n: int = Field(default=1, ge=1)
    seed: int | None = Field(default=None, ge=0)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False

    def stop_strings(self) -> list[str]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if not all(stop):
            raise ApiError(400, "stop: the stop strings must be non-empty", "stop")
        return stop

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False


_UNION_TAG = re.compile(r"^(str|int|float|bool|dict|list|none|.*\[.*\])$")


def _first_problem(e: ValidationError) -> tuple[str, str]:
    """(message, field) for the first invalid field; a value that fits none of a union's types names them."""
    errors = e.errors(include_url=False)

    def split(loc: tuple) -> tuple[str, list[str]]:
        names = [p for p in loc if not (isinstance(p, str) and _UNION_TAG.match(p))]
        tags = [p for p in loc if isinstance(p, str) and _UNION_TAG.match(p)]
        return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in names).lstrip(".") or "body", tags

    where, tags = split(errors[0]["loc"])
    if not tags:
        return f"{where}: {errors[0]['msg']}", where
    kinds = sorted(
        {split(err["loc"])[1][0] for err in errors if split(err["loc"])[0] == where and split(err["loc"])[1]}
    )
    return f"{where}: expected {' or '.join(kinds)}", where


def parse(model: type[_Strict], raw: bytes) -> Any:
    """A request model from a body (ApiError 400 naming the first bad field, or the JSON error)."""
    try:
        body = json.loads(raw)
    except UnicodeDecodeError as e:
        raise ApiError(400, f"the body is not UTF-8: {e.reason} at byte {e.start}") from None
    except json.JSONDecodeError as e:
        raise ApiError(400, f"the body is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None
    except RecursionError:
        raise ApiError(400, "the body is not valid JSON: nested too deeply") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the body must be a JSON object, not {type(body).__name__}")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise ApiError(400, *_first_problem(e)) from None
    except RecursionError:
        raise ApiError(400, "the body is nested too deeply") from None


__all__ = [
    "ApiError",
    "ChatRequest",
    "CompletionRequest",
    "Message",
    "Tool",
    "error_payload",
    "error_response",
    "parse",
]
