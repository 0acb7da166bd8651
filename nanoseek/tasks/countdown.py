"""Countdown (the TinyZero task): reach a target from a few numbers with + - * /.

The prompt gives 3-4 numbers in 1..99 and a target; the answer is an arithmetic expression
using each given number at most once (TinyZero requires every number exactly once: set
`use_all=True`). Instances are built backwards so they are always solvable: pick numbers,
combine them in a random order with random operations (keeping every intermediate result a
non-negative integer), and call the result the target.

The verifier never calls `eval`: a small recursive-descent parser reads the expression,
collects the numbers it uses, and evaluates with exact fractions.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from fractions import Fraction
from typing import Any, ClassVar

from nanoseek.tasks.base import Example, Task, final_answer, format_solution

MAX_EXPRESSION_CHARS = 200


class ExpressionError(ValueError):
    """The text is not an expression of integers, + - * / and parentheses."""


_TOKEN = re.compile(r"\s*(?:(\d+)|(.))")


def _tokenize(text: str) -> list[str]:
    text = text.replace("×", "*").replace("÷", "/").replace("\\times", "*").replace("\\div", "/")
    tokens = []
    for number, other in _TOKEN.findall(text.strip()):
        if number:
            tokens.append(number)
        elif other in "+-*/()":
            tokens.append(other)
        else:
            raise ExpressionError(f"unexpected character {other!r}")
    return tokens


def parse_expression(text: str) -> tuple[Fraction, list[int]]:
    """Value (exact) and the integer literals of an expression; raises ExpressionError if malformed.

    Grammar: expr := term (('+' | '-') term)* ; term := factor (('*' | '/') factor)* ;
    factor := INTEGER | '(' expr ')'. No unary minus: the numbers must be the given ones.
    """
    if len(text) > MAX_EXPRESSION_CHARS:
        raise ExpressionError("expression too long")
    tokens = _tokenize(text)
    numbers: list[int] = []
    pos = 0

    def peek() -> str | None:
        return tokens[pos] if pos < len(tokens) else None

    def take() -> str:
        nonlocal pos
        if pos >= len(tokens):
            raise ExpressionError("unexpected end of expression")
        pos += 1
        return tokens[pos - 1]

    def expr() -> Fraction:
        value = term()
        while peek() in ("+", "-"):
            value = value + term() if take() == "+" else value - term()
        return value

    def term() -> Fraction:
        value = factor()
        while peek() in ("*", "/"):
            if take() == "*":
                value *= factor()
            else:
                divisor = factor()
                if divisor == 0:
                    raise ExpressionError("division by zero")
                value /= divisor
        return value

    def factor() -> Fraction:
        token = take()
        if token == "(":
            value = expr()
            if take() != ")":
                raise ExpressionError("expected ')'")
            return value
        if token.isdigit():
            numbers.append(int(token))
            return Fraction(int(token))
        raise ExpressionError(f"unexpected {token!r}")

    value = expr()
    if pos != len(tokens):
        raise ExpressionError(f"unexpected {tokens[pos]!r} after the expression")
    return value, numbers


def check_expression(text: str, numbers: list[int], target: int, use_all: bool = False) -> bool:
    """True iff `text` evaluates exactly to `target` using each given number at most (or exactly) once."""
    try:
        value, used = parse_expression(text)
    except ExpressionError:
        return False
    used_count, available = Counter(used), Counter(numbers)
    if used_count - available:  # a number not given, or given fewer times than used
        return False
    if use_all and used_count != available:
        return False
    return value == target


class Countdown(Task):
    name = "countdown"
    description = "combine 3-4 numbers with + - * / to reach a target (TinyZero)"
    # min_numbers..max_numbers numbers in 1..max_number; targets in 1..max_target.
    defaults: ClassVar[dict[str, Any]] = {
        "min_numbers": 3,
        "max_numbers": 4,
        "max_number": 99,
        "max_target": 999,
        "use_all": False,
    }

    def sample(
        self,
        rng: random.Random,
        min_numbers: int,
        max_numbers: int,
        max_number: int,
        max_target: int,
        use_all: bool,
    ) -> Example:
        if not 2 <= min_numbers <= max_numbers:
            raise ValueError(f"need 2 <= min_numbers <= max_numbers, got {min_numbers}, {max_numbers}")
        while True:
            count = rng.randint(min_numbers, max_numbers)
            numbers = [rng.randint(1, max_number) for _ in range(count)]
            used = count if use_all else rng.randint(2, count)
            built = self._build(rng, numbers[:used])
            if built is None:
                continue
            target, expression, steps = built
            if 1 <= target <= max_target and target not in numbers:
                break
        rng.shuffle(numbers)
        prompt = (
            f"Using the numbers {numbers}, create an equation that equals {target}. "
            "You can use +, -, * and /, and each number at most once."
            if not use_all
            else f"Using the numbers {numbers}, create an equation that equals {target}. "
            "You can use +, -, * and /, and each number exactly once."
        )
        return Example(
            task=self.name,
            prompt=prompt,
            answer=expression,
            solution=format_solution(steps, expression),
            meta={
                "key": f"{sorted(numbers)}->{target}:{int(use_all)}",
                "numbers": numbers,
                "target": target,
                "use_all": use_all,
            },
        )

    @staticmethod
    def _build(rng: random.Random, numbers: list[int]) -> tuple[int, str, list[str]] | None:
        """Combine the numbers pairwise in random order; None if the draw hit a useless step."""
        pool = [(n, str(n), True) for n in numbers]  # (value, text, is_leaf)
        steps = []
        while len(pool) > 1:
            i, j = rng.sample(range(len(pool)), 2)
            (x, tx, lx), (y, ty, ly) = pool[i], pool[j]
            pool = [p for k, p in enumerate(pool) if k not in (i, j)]
            op = rng.choice("+-*/")
            if op == "-" and x < y:
                (x, tx, lx), (y, ty, ly) = (y, ty, ly), (x, tx, lx)
            if op == "/" and (y in (0, 1) or x % y):
                op = rng.choice("+*")  # keep intermediate results integral and division meaningful
            value = {"+": x + y, "-": x - y, "*": x * y, "/": x // y if y else 0}[op]
            if value == 0 or (op == "*" and 1 in (x, y)):
                return None
            steps.append(f"{x}{op}{y}={value}")
            left = tx if lx else f"({tx})"
            right = ty if ly else f"({ty})"
            pool.append((value, f"{left} {op} {right}", False))
        value, text, _ = pool[0]
        return value, text, steps

    def verify(self, completion: str, example: Example) -> float:
        """1.0 iff the final boxed expression reaches the target with the given numbers, else 0.0."""
        boxed = final_answer(completion)
        if boxed is None:
            return 0.0
        meta = example.meta
        return float(check_expression(boxed, meta["numbers"], meta["target"], bool(meta.get("use_all"))))
