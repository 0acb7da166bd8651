"""Integer +, -, * with column-by-column worked solutions.

The traces are short on purpose (a 4-layer, d=128 model must learn them) and local: each line
does one column's work, and ends with the result so far, so the final answer is copied from
the last line instead of being assembled from digits scattered over the trace. For 47 + 38:

    7+8=15, carry 1: 5
    4+3+1=8: 85

Subtraction borrows the same way (and for a < b computes b - a, then negates); multiplication
writes one partial product per digit of the second number, then their sum.
"""

from __future__ import annotations

import random
from typing import Any, ClassVar

from nanoseek.tasks.base import Example, Task, format_solution


def _digits(x: int, width: int) -> list[int]:
    """Digits of x, least significant first, padded with zeros to `width`."""
    return [int(c) for c in reversed(str(x).zfill(width))]


def addition_steps(a: int, b: int) -> list[str]:
    width = max(len(str(a)), len(str(b)))
    da, db = _digits(a, width), _digits(b, width)
    steps, carry, so_far = [], 0, ""
    for i in range(width):
        s = da[i] + db[i] + carry
        lhs = f"{da[i]}+{db[i]}" + ("+1" if carry else "")
        last = i == width - 1
        so_far = (str(s) if last else str(s % 10)) + so_far
        carry = s // 10
        note = ", carry 1" if carry and not last else ""
        steps.append(f"{lhs}={s}{note}: {so_far}")
    return steps


def subtraction_steps(a: int, b: int) -> list[str]:
    """Column subtraction of a - b for a >= b; leading zeros of the result stay in the trace."""
    width = len(str(a))
    da, db = _digits(a, width), _digits(b, width)
    steps, borrow, so_far = [], 0, ""
    for i in range(width):
        top = da[i] - borrow
        lhs = f"{da[i]}-1" if borrow else f"{da[i]}"
        if top < db[i]:
            r = top + 10 - db[i]
            steps_line = f"{lhs}+10-{db[i]}={r}, borrow 1"
            borrow = 1
        else:
            r = top - db[i]
            steps_line = f"{lhs}-{db[i]}={r}"
            borrow = 0
        so_far = str(r) + so_far
        steps.append(f"{steps_line}: {so_far}")
    return steps


def multiplication_steps(a: int, b: int) -> list[str]:
    digits = _digits(b, len(str(b)))
    partials = []
    steps = []
    for i, d in enumerate(digits):
        factor = d * 10**i
        partials.append(a * factor)
        steps.append(f"{a}*{factor}={a * factor}")
    if len(partials) > 1:
        steps.append("+".join(str(p) for p in partials) + f"={a * b}")
    return steps


class Arithmetic(Task):
    name = "arithmetic"
    description = "a + b, a - b, a * b with column-wise worked steps"
    # digits: the most digits an operand has; min_digits: the fewest; ops: which operations.
    defaults: ClassVar[dict[str, Any]] = {"digits": 2, "min_digits": 1, "ops": ("+", "-", "*")}

    def sample(self, rng: random.Random, digits: int, min_digits: int, ops: tuple[str, ...]) -> Example:
        if not 1 <= min_digits <= digits:
            raise ValueError(f"need 1 <= min_digits <= digits, got min_digits={min_digits}, digits={digits}")
        if not ops or set(ops) - {"+", "-", "*"}:
            raise ValueError(f"ops must be a non-empty subset of + - *, got {ops}")
        low = 0 if min_digits == 1 else 10 ** (min_digits - 1)
        a, b = rng.randint(low, 10**digits - 1), rng.randint(low, 10**digits - 1)
        op = rng.choice(list(ops))
        if op == "+":
            answer, steps = a + b, addition_steps(a, b)
        elif op == "-":
            answer = a - b
            if a >= b:
                steps = subtraction_steps(a, b)
            else:
                steps = [f"{a}<{b}, so compute {b}-{a} and negate", *subtraction_steps(b, a), f"-{b - a}"]
        else:
            answer, steps = a * b, multiplication_steps(a, b)
        key = f"{a}{op}{b}"
        return Example(
            task=self.name,
            prompt=f"What is {a} {op} {b}?",
            answer=str(answer),
            solution=format_solution(steps, str(answer)),
            meta={"key": key, "a": a, "b": b, "op": op},
        )
