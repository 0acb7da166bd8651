"""`calculator_arithmetic`: multi-digit arithmetic a tiny model cannot do in its head, with a calculator.

Each episode is one problem: a product of two 4-6 digit numbers, or (with probability `mixed`) a mixed
expression such as `(a + b) * c - d`. With the `tools` knob on (the default) the model may call the
`calculator` tool (exact, `nanoseek.envs.calculator`) and then answers `\\boxed{N}`; with it off the same
problems are posed with no tool, so one model size can be measured both ways. Reward 1 for the exact value.

Policies: `expert` calls the calculator with the expression, then boxes its result (without the tool: it
writes the column-by-column steps of `tasks.arithmetic`, then the answer); `random` boxes a number of the
right size drawn blindly.
"""

from __future__ import annotations

import ast
import random
from typing import Any, ClassVar

from nanoseek.answers import parse_number
from nanoseek.envs.base import Env, Message, StepResult, step_info
from nanoseek.envs.tools import CALCULATOR, Tool, render_tool_call
from nanoseek.errors import InputError
from nanoseek.tasks.arithmetic import addition_steps, multiplication_steps, subtraction_steps
from nanoseek.tasks.base import final_answer, format_solution

# mixed expressions; every intermediate value stays positive (a > b is ensured for a - b)
_MIXED = ("(a + b) * c", "a * b + c", "a * b - c", "a * b + c * d", "(a - b) * c", "(a + b) * (c + d)")


class CalculatorArithmetic(Env):
    name: ClassVar[str] = "calculator_arithmetic"
    description: ClassVar[str] = "4-6 digit products and mixed expressions, with a calculator tool (knob tools)"
    defaults: ClassVar[dict[str, Any]] = {"min_digits": 4, "max_digits": 6, "mixed": 0.5, "tools": True, "max_turns": 3}
    policies: ClassVar[tuple[str, ...]] = ("random", "expert")
    tool_set: tuple[Tool, ...] = (CALCULATOR,)  # () on an instance made with tools=false

    min_digits: int
    max_digits: int
    mixed: float

    def __init__(self, **knobs: Any) -> None:
        super().__init__(**knobs)
        if not 1 <= self.min_digits <= self.max_digits <= 12:
            raise InputError(f"env {self.name}: need 1 <= min_digits <= max_digits <= 12, got {self.knobs}")
        if not 0.0 <= self.mixed <= 1.0:
            raise InputError(f"env {self.name}: knob mixed must be in [0, 1], got {self.mixed}")
        self.tool_set = (CALCULATOR,) if self.knobs["tools"] else ()
        self.expression, self.answer, self.reward = "", 0, 0.0

    def _number(self, rng: random.Random) -> int:
        digits = rng.randint(self.min_digits, self.max_digits)
        return rng.randint(10 ** (digits - 1), 10**digits - 1)

    def _reset(self, seed: int) -> list[Message]:
        rng = random.Random(f"{self.name}:{seed}")
        form = rng.choice(_MIXED) if rng.random() < self.mixed else "a * b"
        a, b, c, d = (self._number(rng) for _ in range(4))
        if "a - b" in form and a <= b:
            a, b = b + 1, a  # keep it positive (a > b)
        self.expression = form.replace("a", str(a)).replace("b", str(b)).replace("c", str(c)).replace("d", str(d))
        self.answer = _evaluate(ast.parse(self.expression, mode="eval").body, [])
        self.reward = 0.0
        tool_hint = " You may use the calculator." if self.tool_set else ""
        return [{"role": "user", "content": f"What is {self.expression}?{tool_hint} Answer as \\boxed{{N}}."}]

    def respond(self, text: str) -> StepResult:
        got = parse_number(final_answer(text))
        self.reward = float(got is not None and got == self.answer)
        return StepResult([], self.reward, True, step_info(invalid=got is None))

    def score(self) -> float:
        return self.reward

    def act(self, policy: str, messages: list[Message], rng: random.Random) -> str:
        self.check_policy(policy)
        if policy == "random":
            return f"\\boxed{{{rng.randint(1, 10 ** len(str(self.answer)) - 1)}}}"
        if not self.tool_set:
            steps: list[str] = []
            value = _evaluate(ast.parse(self.expression, mode="eval").body, steps)
            return format_solution(steps, str(value))
        last = messages[-1] if messages else {}
        if last.get("role") == "tool" and not last["content"].startswith("error"):
            return f"\\boxed{{{last['content']}}}"
        return render_tool_call(CALCULATOR.name, {"expression": self.expression})


def _evaluate(node: ast.AST, steps: list[str]) -> int:
    """The integer value of one of our expressions, appending the column steps of each operation to `steps`."""
    if isinstance(node, ast.Constant):
        return int(node.value)
    assert isinstance(node, ast.BinOp), node
    a, b = _evaluate(node.left, steps), _evaluate(node.right, steps)
    if isinstance(node.op, ast.Add):
        steps += [f"{a}+{b}:", *addition_steps(a, b)]
        return a + b
    if isinstance(node.op, ast.Sub):
        steps += [f"{a}-{b}:", *subtraction_steps(a, b)]
        return a - b
    steps += multiplication_steps(a, b)
    return a * b
