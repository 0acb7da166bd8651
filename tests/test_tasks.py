"""Tasks: gold solutions verify, corrupted ones do not, answers match independent references, splits are disjoint."""

from __future__ import annotations

import ast
import json
import operator
import re
from collections import Counter
from fractions import Fraction
from typing import Any, ClassVar

import pytest

from nanoseek.tasks import TASKS, Example, Task, get_task, list_tasks, register
from nanoseek.tasks.base import coerce_knobs, extract_boxed, format_solution, parse_number
from nanoseek.tasks.corpus import pretrain_texts, sft_conversations, task_mixture

BUILTIN = ["arithmetic", "countdown", "linear_equation", "word_problems"]

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def reference_eval(expression: str) -> tuple[Fraction, list[int]]:
    """An independent evaluator (Python's own parser, exact fractions) for expressions of + - * /."""

    def walk(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return Fraction(node.value), [node.value]
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            (a, na), (b, nb) = walk(node.left), walk(node.right)
            return _OPS[type(node.op)](a, b), na + nb
        raise ValueError(ast.dump(node))

    return walk(ast.parse(expression, mode="eval").body)


def check_step_lines(solution: str) -> None:
    """Every `expr=value` in the worked steps is true arithmetic."""
    body = solution.split("<think>\n")[1].split("\n</think>")[0]
    for line in body.splitlines():
        for match in re.finditer(r"([\d+\-*/ ]*\d)=(-?\d+)", line):
            lhs, rhs = match.group(1).strip(), int(match.group(2))
            if re.fullmatch(r"-?\d+", lhs):
                continue
            assert reference_eval(lhs)[0] == rhs, line


def corrupt(example: Example) -> str:
    """The gold solution with a wrong final answer."""
    if example.task == "countdown":
        wrong = f"({example.answer}) + 1"
    else:
        wrong = str(parse_number(example.answer) + 1)
    return example.solution.replace(f"\\boxed{{{example.answer}}}", f"\\boxed{{{wrong}}}")


@pytest.mark.parametrize("name", BUILTIN)
def test_gold_solutions_verify_and_corrupted_ones_do_not(name):
    task = get_task(name)
    examples = task.generate(300, "train", seed=0) + task.generate(100, "test", seed=0)
    for ex in examples:
        assert ex.task == name
        assert ex.solution.startswith("<think>\n") and ex.solution.endswith(f"</think>\n\\boxed{{{ex.answer}}}")
        assert extract_boxed(ex.solution) == ex.answer
        assert task.verify(ex.solution, ex) == 1.0
        assert task.verify(corrupt(ex), ex) == 0.0
        assert task.verify(ex.solution.split("\\boxed")[0], ex) == 0.0  # no boxed answer
        assert task.verify(f"I think \\boxed{{{ex.answer}}} or rather \\boxed{{nothing}}", ex) == 0.0
        assert task.verify(f"<think>\\boxed{{{ex.answer}}}</think> no answer", ex) == 0.0  # boxed only in thought
        assert task.verify(f"<think>\\boxed{{wrong}}</think>\\boxed{{{ex.answer}}}", ex) == 1.0
        if name != "countdown":
            check_step_lines(ex.solution)


def test_arithmetic_answers_match_python():
    ops = {"+": operator.add, "-": operator.sub, "*": operator.mul}
    for digits in (1, 2, 3, 5):
        for ex in get_task("arithmetic").generate(200, seed=digits, digits=digits):
            a, b = ex.meta["a"], ex.meta["b"]
            assert int(ex.answer) == ops[ex.meta["op"]](a, b)
            assert ex.prompt == f"What is {a} {ex.meta['op']} {b}?"
            assert a < 10**digits and b < 10**digits


def test_arithmetic_traces_are_short():
    # a tiny model must learn these: one line per column for 2-digit addition, about 30 characters
    for ex in get_task("arithmetic").generate(100, seed=0, ops=("+",), min_digits=2):
        assert ex.solution.count("\n") == 4  # <think>, two column lines, </think>, the answer
        assert len(ex.solution) <= 70


def test_arithmetic_knobs():
    task = get_task("arithmetic")
    examples = task.generate(100, seed=0, digits=3, min_digits=3, ops=("*",))
    assert {ex.meta["op"] for ex in examples} == {"*"}
    assert all(100 <= ex.meta["a"] < 1000 and 100 <= ex.meta["b"] < 1000 for ex in examples)


def test_countdown_instances_are_solvable_by_their_gold_expression():
    for use_all in (False, True):
        for ex in get_task("countdown").generate(300, seed=2, use_all=use_all):
            numbers, target = ex.meta["numbers"], ex.meta["target"]
            value, used = reference_eval(ex.answer)
            assert value == target
            assert not Counter(used) - Counter(numbers)
            if use_all:
                assert Counter(used) == Counter(numbers)
            assert 3 <= len(numbers) <= 4 and all(1 <= n <= 99 for n in numbers)
            assert f"{numbers}" in ex.prompt and f"equals {target}" in ex.prompt
            check_step_lines(ex.solution)


def test_countdown_verifier_edge_cases():
    task = get_task("countdown")
    ex = Example("countdown", "", "", "", {"numbers": [3, 5, 7, 5], "target": 16, "use_all": False})
    box = lambda s: f"<think>\n</think>\n\\boxed{{{s}}}"
    accepted = ["(7 - 5) * (3 + 5)", "7*3-5", "7 × 3 - 5", " ( ( 7*3 ) - 5 ) "]
    for s in accepted:
        assert task.verify(box(s), ex) == 1.0, s
    rejected = [
        "7 * 3 - 5 - 0",  # 0 is not given
        "3 * 7 - 5 + 5 - 5",  # 5 used three times, given twice
        "7 * 3 - 5 + (3 - 3)",  # 3 used twice
        "5 * 3 + 5 / 5",  # 16, but 5 used three times
        "16",
        "-5 + 21",  # unary minus
        "(7 - 5) * (3 + 5",  # unbalanced
        "(7 - 5) / (5 - 5)",  # division by zero
        "__import__('os').system('true')",
        "7 ** 2",
        "",
        "(" * 150 + "16" + ")" * 150,
    ]
    for s in rejected:
        assert task.verify(box(s), ex) == 0.0, s
    assert task.verify("(7-5)*(3+5)", ex) == 0.0  # no \boxed
    strict = Example("countdown", "", "", "", {"numbers": [3, 5, 7, 5], "target": 16, "use_all": True})
    assert task.verify(box("7*3-5"), strict) == 0.0  # not every number used
    assert task.verify(box("(7-5)*(3+5)"), strict) == 1.0
    # exact rationals: 8 / 3 * 6 = 16 although 8 / 3 is not an integer
    frac = Example("countdown", "", "", "", {"numbers": [8, 3, 6], "target": 16})
    assert task.verify(box("8 / 3 * 6"), frac) == 1.0


def test_linear_equation_solution_solves_the_printed_equation():
    sympy = pytest.importorskip("sympy")
    from sympy.parsing.sympy_parser import implicit_multiplication, parse_expr, standard_transformations

    transforms = (*standard_transformations, implicit_multiplication)
    x = sympy.Symbol("x")
    task = get_task("linear_equation")
    for both_sides in (False, True):
        for ex in task.generate(60, seed=4, both_sides=both_sides):
            lhs, rhs = ex.prompt.removeprefix("Solve for x: ").split(" = ")
            equation = sympy.Eq(
                parse_expr(lhs, transformations=transforms), parse_expr(rhs, transformations=transforms)
            )
            assert sympy.solve(equation, x) == [int(ex.answer)], ex.prompt
            assert task.verify(f"\\boxed{{x = {ex.answer}}}", ex) == 1.0


def test_word_problem_templates_all_appear_with_integer_answers():
    examples = get_task("word_problems").generate(400, seed=5)
    assert {ex.meta["template"] for ex in examples} == set(get_task("word_problems").defaults["templates"])
    assert all(int(ex.answer) >= 0 for ex in examples)
    assert len({ex.prompt.split()[0] for ex in examples}) > 10  # names vary
    only = get_task("word_problems").generate(20, seed=5, templates=("ages",))
    assert all("years older" in ex.prompt for ex in only)


@pytest.mark.parametrize("name", BUILTIN)
def test_train_and_test_splits_are_disjoint(name):
    task = get_task(name)
    train = task.generate(3000, "train", seed=0) + task.generate(1000, "train", seed=1)
    test = task.generate(300, "test", seed=0)
    assert not {ex.prompt for ex in train} & {ex.prompt for ex in test}
    assert not {ex.meta["key"] for ex in train} & {ex.meta["key"] for ex in test}
    assert all(task.split_of(ex.meta["key"]) == "test" for ex in test)
    # the rule is a hash of the canonical problem: about test_fraction of random problems are test
    import random

    rng = random.Random(7)
    keys = [task.sample(rng, **task.defaults).meta["key"] for _ in range(3000)]
    share = sum(task.split_of(k) == "test" for k in keys) / len(keys)
    assert 0.06 < share < 0.14


@pytest.mark.parametrize("name", BUILTIN)
def test_generation_is_seeded_and_prefix_stable(name):
    task = get_task(name)
    a = task.generate(50, seed=3)
    assert a == task.generate(50, seed=3)
    assert a[:20] == task.generate(20, seed=3)
    assert a != task.generate(50, seed=4)
    unique = task.generate(200, "test", seed=3, unique=True)
    assert len({ex.meta["key"] for ex in unique}) == 200


def test_unique_generation_fails_clearly_when_the_space_is_too_small():
    with pytest.raises(ValueError, match="found only"):
        get_task("arithmetic").generate(100, "test", unique=True, digits=1, ops=("+",))


def test_extract_boxed():
    assert extract_boxed("no answer") is None
    assert extract_boxed("\\boxed{1} then \\boxed{2}") == "2"
    assert extract_boxed("\\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert extract_boxed("\\boxed{3} and a cut-off \\boxed{4") is None  # a cut-off answer is no answer
    assert extract_boxed("\\boxed{}") == ""
    assert extract_boxed("\\boxed{{a}{b}}") == "{a}{b}"


def test_parse_number():
    assert parse_number("42") == 42 and parse_number(" -7 ") == -7 and parse_number("+3") == 3
    assert parse_number("1,234") == 1234 and parse_number("$12") == 12 and parse_number("2.50") == Fraction(5, 2)
    assert parse_number("3/4") == Fraction(3, 4) and parse_number("\\frac{3}{4}") == Fraction(3, 4)
    assert parse_number("-\\dfrac{1}{2}") == Fraction(-1, 2) and parse_number("1,234.5") == Fraction(2469, 2)
    for bad in (None, "", "abc", "1,2", "4x", "1/0", "--1", "2\\pi", "\\frac{x}{2}"):
        assert parse_number(bad) is None, bad


def test_registry_and_a_user_task():
    assert set(BUILTIN) <= set(list_tasks())
    with pytest.raises(ValueError, match="known tasks: arithmetic"):
        get_task("nope")

    class Parity(Task):
        name = "parity_test"
        defaults: ClassVar[dict[str, Any]] = {"bits": 6}

        def sample(self, rng, bits):
            s = "".join(rng.choice("01") for _ in range(bits))
            answer = str(s.count("1") % 2)
            return Example(self.name, f"Parity of {s}?", answer, format_solution(s, answer), {"key": s})

    try:
        register(Parity())
        task = get_task("parity_test")
        examples = task.generate(20, "train", bits=10)
        assert all(task.verify(ex.solution, ex) == 1.0 for ex in examples)
        with pytest.raises(ValueError, match="no difficulty knob"):
            task.generate(1, digits=3)
        mixed = task_mixture(40, weights={"parity_test": 1, "arithmetic": 1})
        assert Counter(ex.task for ex in mixed) == {"parity_test": 20, "arithmetic": 20}
    finally:
        TASKS.pop("parity_test", None)


def test_coerce_knobs():
    assert coerce_knobs(get_task("arithmetic"), {"digits": "3", "ops": "+,*"}) == {"digits": 3, "ops": ("+", "*")}
    assert coerce_knobs(get_task("countdown"), {"use_all": "true"}) == {"use_all": True}
    with pytest.raises(ValueError, match="arithmetic.digits: expected an integer"):
        coerce_knobs(get_task("arithmetic"), {"digits": "three"})
    with pytest.raises(ValueError, match="no difficulty knob"):
        coerce_knobs(get_task("arithmetic"), {"digit": "3"})


def test_mixture_and_corpus_formats():
    mixture = task_mixture(103, split="train", seed=0, weights={"arithmetic": 2, "countdown": 1})
    assert Counter(ex.task for ex in mixture) == {"arithmetic": 69, "countdown": 34}
    assert mixture == task_mixture(103, split="train", seed=0, weights={"arithmetic": 2, "countdown": 1})
    hard = task_mixture(30, weights={"arithmetic": 1}, difficulty={"arithmetic": {"digits": 4, "min_digits": 4}})
    assert all(ex.meta["a"] >= 1000 for ex in hard)
    assert Counter(ex.task for ex in task_mixture(40)) == dict.fromkeys(BUILTIN, 10)
    train = {ex.prompt for ex in task_mixture(2000, split="train")}
    assert not train & {ex.prompt for ex in task_mixture(200, split="test")}
    texts = pretrain_texts(20, seed=1)
    assert len(texts) == 20 and all("\\boxed{" in t and "<think>" in t for t in texts)
    conversations = sft_conversations(20, seed=1)
    assert [[m["role"] for m in c["messages"]] for c in conversations] == [["user", "assistant"]] * 20
    assert texts[0] == conversations[0]["messages"][0]["content"] + "\n" + conversations[0]["messages"][1]["content"]


def test_data_make_command(tmp_path):
    from nanoseek.cli import main

    out = tmp_path / "x.jsonl"
    assert main(["data", "make", "--task", "countdown", "--n", "5", "--split", "test", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 5
    for row in rows:
        assert set(row) == {"task", "prompt", "answer", "solution", "messages", "meta"}
        ex = Example.from_dict(row)
        assert get_task("countdown").verify(ex.solution, ex) == 1.0
        assert row["messages"] == ex.messages()
    assert rows == [
        {**e.to_dict(), "messages": e.messages()} for e in get_task("countdown").generate(5, "test", seed=0)
    ]
    args = ["data", "make", "--task", "arithmetic", "--n", "3", "--set", "digits=4", "--set", "min_digits=4"]
    assert main([*args, "--out", str(out)]) == 0
    assert all(len(str(json.loads(line)["meta"]["a"])) == 4 for line in out.read_text().splitlines())
    with pytest.raises(SystemExit, match="no difficulty knob"):
        main(["data", "make", "--task", "arithmetic", "--n", "3", "--set", "digit=4", "--out", str(out)])
