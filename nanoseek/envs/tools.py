"""Tool calls: the format the model writes them in, parsing them, running them, the built-in tools.

The model calls a tool the way Qwen2.5's chat template (and ours, `nanoseek.tokenizer`) tells it to, one
JSON object per block:

    <tool_call>
    {"name": "calculator", "arguments": {"expression": "1234 * 5678"}}
    </tool_call>

`parse_tool_calls(text)` reads every block of an assistant turn into calls and per-call errors;
`run_tool(name, arguments, tools)` runs one call and always returns text: a tool's result, or an error
message for the model to read. Every way a call can go wrong becomes such a message, never an exception:
bad JSON, no name, an unknown tool, arguments missing, unexpected or of the wrong type, a tool that raises,
a tool that runs past its time limit (its thread is abandoned; the episode goes on), a block never closed.
`tool_turn` does a whole turn: the results as `tool` messages, in the order of the blocks, with counts.

Built-in tools: `calculator` (exact rational arithmetic, `nanoseek.envs.calculator`, no eval) and `python`
(the program runs in the code-reward sandbox, `nanoseek.rewards.sandbox`, with time and memory limits).
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nanoseek.envs.calculator import CalculatorError, calculate, format_fraction

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(TOOL_CALL_OPEN) + r"(.*?)" + re.escape(TOOL_CALL_CLOSE), re.DOTALL)
MAX_CALLS_PER_TURN = 8  # calls past this in one turn are answered with an error, not run
MAX_RESULT_CHARS = 2000  # a tool's result is cut to this many characters
_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "array": (list,),
    "object": (dict,),
}


class ToolError(Exception):
    """A tool's own refusal (bad input it can explain): the model reads 'error: <message>'."""


@dataclass(frozen=True)
class Tool:
    """A function the model may call: its OpenAI schema (name, description, parameters) and the code."""

    name: str
    description: str
    parameters: dict[str, Any]  # JSON schema of the arguments: {"type": "object", "properties": ..., "required": ...}
    function: Callable[..., str]  # called with the arguments as keywords; returns the result text
    timeout_s: float = 10.0  # past this the call is answered with an error

    def schema(self) -> dict[str, Any]:
        """The OpenAI function schema, as `tools=[...]` in a chat request and in the chat template."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }


@dataclass
class ToolTurn:
    """The environment's side of a tool-calling turn."""

    messages: list[dict[str, Any]]  # one {"role": "tool", "content": ...} per call block, in order
    calls: int  # call blocks in the turn (malformed ones included)
    errors: int  # of which failed: malformed, unknown tool, bad arguments, raised, timed out
    results: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- the format
def render_tool_call(name: str, arguments: dict[str, Any]) -> str:
    """One call as the chat template renders an assistant's `tool_calls` (and as the model should write it)."""
    body = f'{{"name": "{name}", "arguments": {json.dumps(arguments, ensure_ascii=False)}}}'
    return f"{TOOL_CALL_OPEN}\n{body}\n{TOOL_CALL_CLOSE}"


def has_tool_call(text: str) -> bool:
    """Whether an assistant turn calls a tool (a turn without any block is the answer or action)."""
    return TOOL_CALL_OPEN in text


def _read_block(body: str) -> dict[str, Any] | str:
    """One block's call {"name", "arguments"}, or why it is not one."""
    try:
        call = json.loads(body)
    except json.JSONDecodeError as e:
        return f"error: the tool call is not valid JSON ({e.msg} at character {e.pos})"
    if not isinstance(call, dict):
        return f'error: the tool call must be a JSON object {{"name": ..., "arguments": {{...}}}}, got {call!r:.80}'
    name = call.get("name")
    if not isinstance(name, str) or not name:
        return 'error: the tool call has no "name"'
    arguments = call.get("arguments", {})
    if isinstance(arguments, str):  # the OpenAI wire format sends arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return f'error: the "arguments" of {name} are not a JSON object'
    if not isinstance(arguments, dict):
        return f'error: the "arguments" of {name} must be a JSON object, got {arguments!r:.80}'
    return {"name": name, "arguments": arguments}


def _blocks(text: str) -> list[dict[str, Any] | str]:
    """Every tool call block of `text` in order: a call, or an error string; a block never closed is one too."""
    out: list[dict[str, Any] | str] = [_read_block(m.group(1)) for m in _BLOCK.finditer(text)]
    if TOOL_CALL_OPEN in _BLOCK.sub("", text):
        out.append(f"error: a {TOOL_CALL_OPEN} block was not closed with {TOOL_CALL_CLOSE}")
    return out


def parse_tool_calls(text: str) -> tuple[list[dict[str, Any]], list[str]]:
    """The well-formed calls of an assistant turn ({"name", "arguments"}) and the errors of the others."""
    blocks = _blocks(text)
    return [b for b in blocks if isinstance(b, dict)], [b for b in blocks if isinstance(b, str)]


def split_tool_calls(text: str) -> tuple[str, list[dict[str, Any]]]:
    """An assistant turn as (its text outside the blocks, its well-formed calls): the OpenAI message shape."""
    return _BLOCK.sub("", text).strip(), parse_tool_calls(text)[0]


# ----------------------------------------------------------------------------- running
def argument_problem(tool: Tool, arguments: dict[str, Any]) -> str | None:
    """Why `arguments` do not fit the tool's schema (missing, unexpected, wrong type), or None."""
    properties = tool.parameters.get("properties", {})
    missing = [p for p in tool.parameters.get("required", []) if p not in arguments]
    if missing:
        return f"{tool.name} needs the argument(s) {', '.join(missing)}"
    unexpected = [a for a in arguments if a not in properties]
    if unexpected:
        return f"{tool.name} takes no argument(s) {', '.join(unexpected)}; its arguments: {', '.join(properties)}"
    for name, value in arguments.items():
        kind = properties[name].get("type")
        types = _JSON_TYPES.get(kind, (object,))
        if not isinstance(value, types) or (isinstance(value, bool) and kind in ("integer", "number")):
            return f"{tool.name}: argument {name} must be a {kind}, got {type(value).__name__}"
    return None


def call_tool(name: str, arguments: dict[str, Any], tools: dict[str, Tool]) -> tuple[str, bool]:
    """Run one call: (the result text, True) or (an error message for the model, False). Never raises."""
    tool = tools.get(name)
    if tool is None:
        return f"error: unknown tool {name!r}; the tools are: {', '.join(tools) or 'none'}", False
    problem = argument_problem(tool, arguments)
    if problem:
        return f"error: {problem}", False
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            outcome["result"] = str(tool.function(**arguments))
        except ToolError as e:
            outcome["error"] = f"error: {e}"
        except Exception as e:  # the tool's failure is the model's information, not the trainer's crash
            outcome["error"] = f"error: {name} failed: {type(e).__name__}: {e}"

    thread = threading.Thread(target=work, name=f"tool-{name}", daemon=True)
    thread.start()
    thread.join(tool.timeout_s)
    if thread.is_alive():  # abandoned: a daemon thread cannot be stopped, but the episode need not wait
        return f"error: {name} did not finish within {tool.timeout_s:g} s", False
    if "error" in outcome:
        return outcome["error"][:MAX_RESULT_CHARS], False
    return outcome["result"][:MAX_RESULT_CHARS], True


def run_tool(name: str, arguments: dict[str, Any], tools: dict[str, Tool]) -> str:
    """The text the model gets back for one call: the tool's result, or an error message."""
    return call_tool(name, arguments, tools)[0]


def tool_turn(text: str, tools: dict[str, Tool]) -> ToolTurn | None:
    """Run every tool call of an assistant turn (None when it calls none): one `tool` message per block."""
    if not has_tool_call(text):
        return None
    results, errors = [], 0
    for i, block in enumerate(_blocks(text)):
        if i >= MAX_CALLS_PER_TURN:
            result, ok = f"error: at most {MAX_CALLS_PER_TURN} tool calls per turn; this one was not run", False
        elif isinstance(block, str):
            result, ok = block, False
        else:
            result, ok = call_tool(block["name"], block["arguments"], tools)
        results.append(result)
        errors += not ok
    messages = [{"role": "tool", "content": result} for result in results]
    return ToolTurn(messages, len(results), errors, results)


# ----------------------------------------------------------------------------- the built-in tools
def _calculator(expression: str) -> str:
    try:
        return format_fraction(calculate(expression))
    except CalculatorError as e:
        raise ToolError(str(e)) from None


def _python(code: str) -> str:
    from nanoseek.rewards.sandbox import ExecLimits, run_python

    run = run_python(code, limits=ExecLimits(timeout_s=5.0, memory_mb=512, cpu_s=5, output_bytes=1 << 16))
    if run.status == "ok":
        return run.stdout if run.stdout.strip() else "(no output; print what you want to see)"
    return f"{run.stdout}\n[{run.status}]\n{run.stderr}".strip()


CALCULATOR = Tool(
    name="calculator",
    # terse: the schema is rendered into every tool episode's prompt (a tiny model's context is 512 tokens)
    description="Exact arithmetic: + - * / ** ( )",
    parameters={
        "type": "object",
        "properties": {"expression": {"type": "string"}},
        "required": ["expression"],
    },
    function=_calculator,
    timeout_s=5.0,
)

PYTHON = Tool(
    name="python",
    description="Run a Python program in a sandbox and return what it prints (5 s, 512 MB, no network).",
    parameters={
        "type": "object",
        "properties": {"code": {"type": "string", "description": "the program; print the results"}},
        "required": ["code"],
    },
    function=_python,
    timeout_s=15.0,  # the sandbox's own 5 s limit, plus starting its server the first time
)

TOOLS: dict[str, Tool] = {tool.name: tool for tool in (CALCULATOR, PYTHON)}
