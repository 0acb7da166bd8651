"""Linear equations in one unknown with an integer solution, e.g. `3x + 5 = 20`.

Built backwards from the solution so it is always an integer. With `both_sides=True` the
unknown appears on both sides (`7x - 4 = 3x + 8`), which adds one "collect the x terms" step.
"""

from __future__ import annotations

import random
from typing import Any, ClassVar

from nanoseek.tasks.base import Example, Task, final_answer, format_solution, parse_number


def _term(coef: int) -> str:
    """3 -> "3x", 1 -> "x", -1 -> "-x"."""
    return {1: "x", -1: "-x"}.get(coef, f"{coef}x")


def _side(coef: int, const: int) -> str:
    """ax + b written the usual way: "3x + 5", "3x - 5", "-x", "7"."""
    if coef == 0:
        return str(const)
    if const == 0:
        return _term(coef)
    return f"{_term(coef)} {'+' if const > 0 else '-'} {abs(const)}"


class LinearEquation(Task):
    name = "linear_equation"
    description = "solve a*x + b = c (or a*x + b = c*x + d) for an integer x"
    # max_coef bounds |a| (and |c|), max_const bounds |b| (and |d|), max_solution bounds |x|.
    defaults: ClassVar[dict[str, Any]] = {"max_coef": 9, "max_const": 20, "max_solution": 12, "both_sides": False}

    def sample(self, rng: random.Random, max_coef: int, max_const: int, max_solution: int, both_sides: bool) -> Example:
        if max_coef < 2 and both_sides:
            raise ValueError("both_sides needs max_coef >= 2")
        x = rng.randint(-max_solution, max_solution)
        a = rng.choice([v for v in range(-max_coef, max_coef + 1) if v != 0])
        b = rng.randint(-max_const, max_const)
        c, d = 0, 0
        if both_sides:
            c = rng.choice([v for v in range(-max_coef, max_coef + 1) if v not in (0, a)])
            d = a * x + b - c * x
        else:
            d = a * x + b
        lhs, rhs = _side(a, b), _side(c, d)
        steps = [f"{lhs} = {rhs}"]
        coef = a - c
        if both_sides:
            steps.append(f"{_term(a)} - {_term(c)} = {d} - {b}".replace("- -", "+ "))
            steps.append(f"{_term(coef)} = {d - b}")
        elif b != 0:
            op = "-" if b > 0 else "+"
            steps.append(f"{_term(coef)} = {d} {op} {abs(b)} = {d - b}")
        if coef != 1:
            steps.append(f"x = {d - b} / {coef} = {x}" if coef != -1 else f"x = -({d - b}) = {x}")
        return Example(
            task=self.name,
            prompt=f"Solve for x: {lhs} = {rhs}",
            answer=str(x),
            solution=format_solution(steps, str(x)),
            meta={"key": f"{a},{b},{c},{d}", "a": a, "b": b, "c": c, "d": d, "x": x},
        )

    def verify(self, completion: str, example: Example) -> float:
        """Like the base verifier, but also accepts `\\boxed{x = 5}`."""
        boxed = final_answer(completion)
        if boxed is not None and boxed.replace(" ", "").startswith("x="):
            boxed = boxed.split("=", 1)[1]
        got = parse_number(boxed)
        return float(got is not None and got == parse_number(example.answer))
