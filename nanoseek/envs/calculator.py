"""Exact rational arithmetic on an expression string, for the `calculator` tool: no `eval`, bounded work.

The expression is parsed by `ast` and walked: numbers (integers and decimals, read exactly: "0.1" is
1/10), + - * / on `fractions.Fraction`, unary + and -, parentheses, and ** with a small integer exponent.
Anything else (names, calls, attributes, ^, //, %) is refused with a message saying what. Sizes are
bounded before the work is done: the expression's length, the exponent, and every intermediate result's
size in bits, so no input can make it run long or use much memory.
"""

from __future__ import annotations

import ast
import re
from fractions import Fraction

MAX_CHARS = 500  # longest expression
MAX_EXPONENT = 64  # largest |exponent| of **
MAX_BITS = 4096  # largest numerator or denominator of any intermediate result, in bits


class CalculatorError(ValueError):
    """The expression cannot be computed: the message says why (the tool returns it to the model)."""


def calculate(expression: str) -> Fraction:
    """The exact value of `expression` (see the module docstring), or a CalculatorError."""
    if not isinstance(expression, str) or not expression.strip():
        raise CalculatorError("empty expression")
    if len(expression) > MAX_CHARS:
        raise CalculatorError(f"expression longer than {MAX_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise CalculatorError(f"cannot parse {expression.strip()!r}") from None
    return _value(tree.body, expression.strip())


def format_fraction(value: Fraction) -> str:
    """An integer as itself, any other value as 'p/q' (exact; the caller can ask for a decimal)."""
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


def _bounded(value: Fraction) -> Fraction:
    if max(abs(value.numerator).bit_length(), value.denominator.bit_length()) > MAX_BITS:
        raise CalculatorError(f"a result larger than {MAX_BITS} bits")
    return value


_NAMES = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.Pow: "**"}


def _value(node: ast.AST, source: str) -> Fraction:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        text = (ast.get_source_segment(source, node) or repr(node.value)).replace("_", "")
        power = re.search(r"[eE]([+-]?\d+)$", text)
        if power and abs(int(power.group(1))) > MAX_BITS:
            raise CalculatorError(f"a number larger than {MAX_BITS} bits")
        try:
            return _bounded(Fraction(text))  # the literal as written: "0.1" is exactly 1/10
        except ValueError:  # 0x1F, 0o17, 0b101: a Python integer, not a decimal
            return _bounded(Fraction(node.value))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        operand = _value(node.operand, source)
        return -operand if isinstance(node.op, ast.USub) else operand
    if isinstance(node, ast.BinOp) and type(node.op) in _NAMES:
        left, right = _value(node.left, source), _value(node.right, source)
        if isinstance(node.op, ast.Add):
            return _bounded(left + right)
        if isinstance(node.op, ast.Sub):
            return _bounded(left - right)
        if isinstance(node.op, ast.Mult):
            return _bounded(left * right)
        if isinstance(node.op, ast.Div):
            if right == 0:
                raise CalculatorError("division by zero")
            return _bounded(left / right)
        return _power(left, right)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitXor):
        raise CalculatorError("'^' is not a power here: write ** (e.g. 2**10)")
    what = type(node.op).__name__ if isinstance(node, ast.BinOp | ast.UnaryOp) else type(node).__name__
    raise CalculatorError(f"unsupported {what} in the expression (allowed: numbers, + - * / **, parentheses)")


def _power(base: Fraction, exponent: Fraction) -> Fraction:
    if exponent.denominator != 1:
        raise CalculatorError("the exponent of ** must be an integer")
    if abs(exponent) > MAX_EXPONENT:
        raise CalculatorError(f"the exponent of ** must be at most {MAX_EXPONENT} in size")
    if base == 0 and exponent < 0:
        raise CalculatorError("division by zero")
    size = max(abs(base.numerator).bit_length(), base.denominator.bit_length())
    if size * abs(exponent) > MAX_BITS:
        raise CalculatorError(f"a result larger than {MAX_BITS} bits")
    return base ** int(exponent)
