"""Tool calls: the calculator against Python's own Fraction arithmetic, its refusals (fast), and every way a
call can go wrong answered with an error message (never an exception, never a hang)."""

from __future__ import annotations

import json
import random
import threading
import time
from fractions import Fraction

import pytest

from nanoseek.envs.calculator import MAX_BITS, CalculatorError, calculate, format_fraction
from nanoseek.envs.tools import (
    CALCULATOR,
    MAX_CALLS_PER_TURN,
    TOOLS,
    Tool,
    ToolError,
    call_tool,
    parse_tool_calls,
    render_tool_call,
    run_tool,
    split_tool_calls,
    tool_turn,
)


def random_expression(rng: random.Random, depth: int) -> tuple[str, Fraction]:
    """An expression string and its value, built together with Fraction arithmetic (the reference)."""
    if depth == 0 or rng.random() < 0.3:
        if rng.random() < 0.7:
            n = rng.randint(0, 10 ** rng.randint(1, 6))
            return str(n), Fraction(n)
        whole, frac = rng.randint(0, 999), rng.randint(0, 999)
        text = f"{whole}.{frac:03d}"
        return text, Fraction(whole * 1000 + frac, 1000)
    kind = rng.choice(["+", "-", "*", "/", "^", "neg", "paren"])
    if kind == "neg":
        text, value = random_expression(rng, depth - 1)
        return f"-({text})", -value
    if kind == "paren":
        text, value = random_expression(rng, depth - 1)
        return f"({text})", value
    if kind == "^":
        text, value = random_expression(rng, 0)
        exponent = rng.randint(-3, 4)
        if value == 0 and exponent < 0:
            exponent = -exponent
        return f"({text}) ** {exponent}", value**exponent
    (a, x), (b, y) = random_expression(rng, depth - 1), random_expression(rng, depth - 1)
    if kind == "/" and y == 0:
        kind = "+"
    value = {"+": x + y, "-": x - y, "*": x * y, "/": x / y if y else None}[kind]
    return f"({a}) {kind} ({b})", value


def test_calculator_equals_fraction_arithmetic():
    rng = random.Random(0)
    for _ in range(500):
        text, value = random_expression(rng, 4)
        assert calculate(text) == value, text
        assert run_tool("calculator", {"expression": text}, TOOLS) == format_fraction(value)
    assert calculate("0.1 + 0.2") == Fraction(3, 10)  # decimals read exactly, not as floats
    assert calculate("1_000 * 3") == 3000
    assert calculate("2 ** -2") == Fraction(1, 4)
    assert format_fraction(Fraction(-6, 4)) == "-3/2"


@pytest.mark.parametrize(
    "expression, why",
    [
        ("__import__('os').system('true')", "unsupported"),
        ("x + 1", "unsupported"),
        ("(1).real", "unsupported"),
        ("lambda: 1", "unsupported"),
        ("[1, 2]", "unsupported"),
        ("2 ^ 3", "write \\*\\*"),
        ("7 // 2", "unsupported FloorDiv"),
        ("7 % 2", "unsupported Mod"),
        ("1 / 0", "division by zero"),
        ("0 ** -1", "division by zero"),
        ("2 ** 0.5", "integer"),
        ("10 ** 10000", "at most"),
        ("9 ** 9 ** 9", "at most"),
        ("(2 ** 64) ** 64 ** 1", "larger than"),
        ("1e999999999", "larger than"),
        ("1 +", "cannot parse"),
        ("", "empty"),
        ("1+" * 300 + "1", "longer than"),
        ("1j * 2", "unsupported"),
    ],
)
def test_calculator_refuses_quickly(expression, why):
    start = time.perf_counter()
    with pytest.raises(CalculatorError, match=why):
        calculate(expression)
    assert time.perf_counter() - start < 0.5
    result, ok = call_tool("calculator", {"expression": expression}, TOOLS)
    assert not ok and result.startswith("error: ")


def test_results_stay_within_the_size_limit():
    big = "*".join(["2**64"] * 70)  # 4480 bits if it were allowed to grow
    with pytest.raises(CalculatorError, match=f"{MAX_BITS} bits"):
        calculate(big)
    assert calculate("*".join(["2**64"] * 60)) == 2 ** (64 * 60)


def slow(seconds: str) -> str:
    threading.Event().wait(float(seconds))
    return "late"


def broken(x: str) -> str:
    raise RuntimeError("the tool broke")


def refusing(x: str) -> str:
    raise ToolError("x must be positive")


TEST_TOOLS = {
    **TOOLS,
    "slow": Tool("slow", "sleeps", {"type": "object", "properties": {"seconds": {"type": "string"}}}, slow, 0.2),
    "broken": Tool("broken", "raises", {"type": "object", "properties": {"x": {"type": "string"}}}, broken),
    "refusing": Tool("refusing", "refuses", {"type": "object", "properties": {"x": {"type": "string"}}}, refusing),
}

MALFORMED = [
    ("<tool_call>{not json}</tool_call>", "not valid JSON"),
    ("<tool_call>[1, 2]</tool_call>", "must be a JSON object"),
    ('<tool_call>{"arguments": {"expression": "1"}}</tool_call>', 'no "name"'),
    ('<tool_call>{"name": "", "arguments": {}}</tool_call>', 'no "name"'),
    ('<tool_call>{"name": "calculater", "arguments": {"expression": "1"}}</tool_call>', "unknown tool 'calculater'"),
    ('<tool_call>{"name": "calculator", "arguments": {}}</tool_call>', "needs the argument(s) expression"),
    ('<tool_call>{"name": "calculator"}</tool_call>', "needs the argument(s) expression"),
    ('<tool_call>{"name": "calculator", "arguments": {"expression": "1", "x": 2}}</tool_call>', "no argument(s) x"),
    ('<tool_call>{"name": "calculator", "arguments": {"expression": 12}}</tool_call>', "must be a string"),
    ('<tool_call>{"name": "calculator", "arguments": [1]}</tool_call>', "must be a JSON object"),
    ('<tool_call>{"name": "calculator", "arguments": "{bad"}</tool_call>', "not a JSON object"),
    ('<tool_call>{"name": "calculator", "arguments": {"expression": "1/0"}}</tool_call>', "division by zero"),
    ('<tool_call>{"name": "broken", "arguments": {"x": "1"}}</tool_call>', "RuntimeError: the tool broke"),
    ('<tool_call>{"name": "refusing", "arguments": {"x": "1"}}</tool_call>', "error: x must be positive"),
    ('<tool_call>{"name": "slow", "arguments": {"seconds": "30"}}</tool_call>', "did not finish within 0.2 s"),
    ('<tool_call>{"name": "calculator", "arguments": {"expression": "1"}}', "was not closed"),
]


@pytest.mark.parametrize("text, message", MALFORMED)
def test_every_malformed_call_is_an_error_message(text, message):
    start = time.perf_counter()
    turn = tool_turn("I will call a tool.\n" + text, TEST_TOOLS)
    assert time.perf_counter() - start < 5
    assert turn is not None and (turn.calls, turn.errors) == (1, 1)
    assert turn.messages[0]["role"] == "tool"
    assert turn.messages[0]["content"].startswith("error: ") and message in turn.messages[0]["content"]


def test_errors_cost_only_their_own_call():
    good = render_tool_call("calculator", {"expression": "6 * 7"})
    texts = [good] + [text for text, _ in MALFORMED[:-1]] + [good]
    turn = tool_turn("\n".join(texts), TEST_TOOLS)
    results = [m["content"] for m in turn.messages]
    assert results[0] == "42"
    assert turn.calls == len(texts)
    # past MAX_CALLS_PER_TURN nothing runs: the last (good) call is refused as well
    assert all("not run" in r for r in results[MAX_CALLS_PER_TURN:])
    assert turn.errors == len(texts) - 1
    within = tool_turn("\n".join([good, MALFORMED[0][0], good]), TEST_TOOLS)
    assert [m["content"] for m in within.messages][::2] == ["42", "42"] and within.errors == 1


def test_no_text_makes_a_tool_call_raise():
    rng = random.Random(1)
    pieces = ["<tool_call>", "</tool_call>", "{", "}", '"name"', ":", '"calculator"', '"arguments"', "[", ",", "1"]
    pieces += ['"expression"', '"2**99999"', "\n", "null", '"python"']
    for _ in range(500):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 30)))
        turn = tool_turn(text, TEST_TOOLS)
        if "<tool_call>" not in text:
            assert turn is None
            continue
        assert turn.calls == len(turn.messages) >= 1 and 0 <= turn.errors <= turn.calls
        assert all(isinstance(m["content"], str) for m in turn.messages)


def test_parse_and_split_keep_the_calls():
    calls = [{"name": "calculator", "arguments": {"expression": "1+2"}}, {"name": "python", "arguments": {"code": "x"}}]
    text = "Let me see.\n" + "\n".join(render_tool_call(c["name"], c["arguments"]) for c in calls)
    assert parse_tool_calls(text) == (calls, [])
    assert split_tool_calls(text) == ("Let me see.", calls)
    wire = '<tool_call>{"name": "calculator", "arguments": "{\\"expression\\": \\"1+2\\"}"}</tool_call>'
    assert parse_tool_calls(wire) == ([calls[0]], [])
    assert parse_tool_calls("no calls here") == ([], [])
    found, errors = parse_tool_calls(text + "<tool_call>{oops}</tool_call>")
    assert found == calls and len(errors) == 1 and "JSON" in errors[0]
    assert json.loads(render_tool_call("f", {"a": "é\n"}).split("\n", 1)[1].rsplit("\n", 1)[0])["arguments"] == {
        "a": "é\n"
    }


def test_schema_is_the_openai_function_format():
    schema = CALCULATOR.schema()
    assert schema["type"] == "function" and schema["function"]["name"] == "calculator"
    assert schema["function"]["parameters"]["required"] == ["expression"]


def test_python_tool_runs_in_the_sandbox():
    assert run_tool("python", {"code": "print(sum(range(10)))"}, TOOLS).strip() == "45"
    failed, ok = call_tool("python", {"code": "raise ValueError('no')"}, TOOLS)
    assert ok and "[error]" in failed and "ValueError: no" in failed  # the program failed, the call did not
    assert "no output" in run_tool("python", {"code": "x = 1"}, TOOLS)
