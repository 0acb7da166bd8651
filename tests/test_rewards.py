"""Answer extraction, math/GSM8K equivalence, reward functions, and containment of bad reward code."""

from __future__ import annotations

import logging
import math
import random
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path

import pytest

from nanoseek import rewards
from nanoseek.rewards import (
    RewardLoadError,
    RewardSet,
    answer_region,
    extract_answer,
    extract_boxed,
    format_reward,
    gsm8k_equal,
    load_reward_fn,
    math_equal,
    math_equal_many,
    math_reward,
    math_verify_stats,
    parse_gsm8k_number,
    task_reward,
)

FIXTURES = Path(__file__).with_name("reward_fixtures.py")


def fixture(name: str) -> str:
    return f"{FIXTURES}:{name}"


# ---------------------------------------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so \\boxed{42}.", "42"),
        ("\\boxed{1} then \\boxed{2}", "2"),  # the last one
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # nested braces
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces are not structure
        ("\\fbox{7}", "7"),
        ("\\boxed{3} and finally \\fbox{x^{2}}", "x^{2}"),
        ("\\boxed {5}", "5"),
        ("\\boxed{}", ""),
        ("no box here", None),
        ("\\boxed{3} ... \\boxed{4", None),  # the final answer was cut off: not an earlier one
        ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}.", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("", None),
    ],
)
def test_extract_boxed(text: str, expected: str | None) -> None:
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is \\boxed{12}. Answer: 13", "12"),  # a box beats everything
        ("The answer is $\\frac{1}{2}$.", "\\frac{1}{2}"),
        ("Answer: 42", "42"),
        ("**Answer:** 7", "7"),
        ("The final answer is 3.5. That is all.", "3.5"),
        ("the answer is: -4\nmore text", "-4"),
        ("Answer: 1\nno wait. Answer: 2", "2"),  # the last one
        ("She makes 9 * 2 = 18 dollars.\n#### 18", "18"),
        ("#### 1,234", "1,234"),
        ("The answer is \\(x = 3\\).", "x = 3"),
        ("\\boxed{} The answer is 5", "5"),  # an empty box is no answer
        ("I have no idea", None),
        (None, None),
    ],
)
def test_extract_answer(text: str | None, expected: str | None) -> None:
    assert extract_answer(text) == expected


def test_answer_region_is_after_the_last_think_block() -> None:
    assert answer_region("<think>\\boxed{1}</think> \\boxed{2}") == " \\boxed{2}"
    assert answer_region("no think \\boxed{3}") == "no think \\boxed{3}"
    assert extract_answer(answer_region("<think>maybe \\boxed{1}</think>The answer is 2")) == "2"


# ---------------------------------------------------------------------------------------------- GSM8K


@pytest.mark.parametrize(
    ("pred", "gold", "equal"),
    [
        ("18", "18", True),
        ("$18.00", "18", True),
        ("18 dollars", "18", True),
        ("1,234", "1234", True),
        ("70,000.", "70000", True),
        ("\\$32,\\!348", "32348", True),
        ("-3", "-3", True),
        ("0.5", "1/2", True),
        ("\\frac{3}{4}", "0.75", True),
        ("25%", "25", True),
        ("\\boxed{12}", "12", True),
        ("18", "19", False),
        ("18 or 19", "18", False),  # two numbers: not one answer
        ("eighteen", "18", False),
        ("", "18", False),
        (None, "18", False),
        ("1,2", "12", False),  # not a thousands separator
    ],
)
def test_gsm8k_equal(pred: str | None, gold: str, equal: bool) -> None:
    assert gsm8k_equal(pred, gold) is equal


def test_parse_gsm8k_number_against_fractions() -> None:
    rng = random.Random(0)
    for _ in range(200):
        value = Fraction(rng.randint(-(10**7), 10**7), 100)
        text = f"{float(value):,.2f}"  # "12,345.67" with thousands separators
        assert parse_gsm8k_number(text) == value, text
        assert parse_gsm8k_number(f"${text} dollars.") == value


# ---------------------------------------------------------------------------------------------- math_equal


@pytest.mark.parametrize(
    ("pred", "gold"),
    [
        ("0.5", "\\frac{1}{2}"),
        ("(3, \\pi/2)", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("\\frac{\\sqrt2}{2}", "\\sqrt{2}/2"),
        ("\\dfrac{3}{4}", "0.75"),
        ("2\\sqrt{2}", "\\sqrt{8}"),
        ("1+x^2", "x^2+1"),
        ("[1,2)", "[1, 2)"),
        ("(-\\infty,2]", "(-\\infty, 2]"),
        ("2,1", "\\{1,2\\}"),  # a set: order does not matter
        ("10", "10\\%"),  # decided: math-verify accepts the bare number for a percentage...
        ("0.1", "10\\%"),  # ...and the fraction
        ("10,080", "10,\\!080"),
        ("\\$18", "18"),
        ("90", "90^\\circ"),
        ("$\\frac{1}{3}$", "\\frac13"),
        ("\\text{(C)}", "C"),
        ("x = 5", "5"),
        ("  7 ", "7"),
    ],
)
def test_math_equal_accepts_equivalent_forms(pred: str, gold: str) -> None:
    assert math_equal(pred, gold)


@pytest.mark.parametrize(
    ("pred", "gold"),
    [
        ("3", "4"),
        ("0.333", "\\frac{1}{3}"),  # too coarse to be 1/3
        ("3.14", "\\pi"),
        ("(1,2]", "[1,2)"),  # open/closed ends differ
        ("(2, 1)", "(1, 2)"),  # tuples are ordered
        ("x^2 - 1", "x^2 + 1"),
        ("\\frac{\\pi}{2}", "90^\\circ"),
        ("-7", "7"),
        ("1, 234", "1234"),  # a list of two numbers is not the number 1234...
        ("1, 234", "1,234"),  # ...which "1,234" is
        ("", "7"),
        (None, "7"),
    ],
)
def test_math_equal_rejects_different_answers(pred: str | None, gold: str) -> None:
    assert not math_equal(pred, gold)


def test_math_equal_matches_exact_fraction_arithmetic() -> None:
    """Random fractions in LaTeX vs plain a/b: math-verify must agree with Fraction equality."""
    rng = random.Random(1)
    preds, golds, expected = [], [], []
    for i in range(40):
        a, b = rng.randint(-30, 30), rng.randint(1, 30)
        if i % 2:  # an equal value written differently
            m = rng.randint(2, 5)
            c, d = a * m, b * m
        else:
            c, d = rng.randint(-30, 30), rng.randint(1, 30)
        preds.append(f"\\frac{{{a}}}{{{b}}}")
        golds.append(f"{c}/{d}")
        expected.append(Fraction(a, b) == Fraction(c, d))
    assert any(expected) and not all(expected)
    assert math_equal_many(preds, golds) == expected


def test_math_equal_unparseable_counts_as_wrong_and_is_counted() -> None:
    before = math_verify_stats()
    assert not math_equal("\\frac{", "1")
    assert not math_equal("}}{{\\sqrt", "\\frac{1}{2}")
    after = math_verify_stats()
    assert after.unparseable_pred - before.unparseable_pred == 2


def test_math_equal_cuts_a_hanging_expression_in_a_non_main_thread() -> None:
    """9^{9^{9}} makes sympy compute a number with ~370 million digits: it must be cut at the limit."""
    assert math_equal("\\frac{2}{4}", "0.5")  # a worker is up (startup does not count toward the limit)
    before = math_verify_stats()
    result: dict[str, object] = {}

    def run() -> None:
        t0 = time.monotonic()
        result["equal"] = math_equal("9^{9^{9}}", "1", timeout_s=1.0)
        result["seconds"] = time.monotonic() - t0

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(30)
    assert not thread.is_alive()
    assert result["equal"] is False
    assert 1.0 <= result["seconds"] < 6.0, result  # the limit, plus killing and replacing the worker
    assert math_verify_stats().timeouts - before.timeouts == 1
    # the worker was replaced: grading goes on
    assert math_equal("\\frac{6}{8}", "0.75")
    assert not math_equal("\\frac{6}{8}", "0.7")


def test_math_equal_from_many_threads_at_once() -> None:
    pairs = [(f"\\frac{{{i}}}{{{i + 1}}}", f"{i}/{i + 1}" if i % 3 else f"{i + 1}/{i}") for i in range(1, 25)]
    with ThreadPoolExecutor(max_workers=8) as ex:
        got = list(ex.map(lambda pg: math_equal(*pg), pairs))
    assert got == [bool(i % 3) for i in range(1, 25)]


# ---------------------------------------------------------------------------------------------- built-in rewards


def test_math_reward() -> None:
    completions = [
        "<think>\\boxed{3} hmm</think>So \\boxed{\\frac{1}{2}}",
        "The answer is 0.5",
        "\\boxed{0.4}",
        "nothing",
        "<think>long</think>\\boxed{10\\%}",
    ]
    rows = [{"answer": "0.5"}, {"answer": "\\frac12"}, {"answer": "0.5"}, {"answer": "1"}, {"answer": "0.1"}]
    assert math_reward([""] * 5, completions, rows) == [1.0, 1.0, 0.0, 0.0, 1.0]


@pytest.mark.parametrize(
    ("prompt", "completion", "expected"),
    [
        ("Q", "<think>reason</think>\nThe answer is \\boxed{4}.", 1.0),
        ("Q", "  <think>\nreason\n</think>\\boxed{x^{2}}", 1.0),
        ("Q<think>", "reason</think>\\boxed{4}", 1.0),  # the template opened the block
        ("Q", "reason</think>\\boxed{4}", 0.0),
        ("Q", "<think>reason</think>The answer is 4.", 0.0),  # no box
        ("Q", "<think>reason \\boxed{4}</think>", 0.0),  # box only inside the thinking
        ("Q", "<think>reason</think>\\boxed{}", 0.0),  # empty box
        ("Q", "<think> </think>\\boxed{4}", 0.0),  # no reasoning
        ("Q", "<think>a</think><think>b</think>\\boxed{4}", 0.0),  # two think blocks
        ("Q", "<think>reason</think>\\boxed{4", 0.0),  # unclosed box
        ("Q", "\\boxed{4}", 0.0),
    ],
)
def test_format_reward(prompt: str, completion: str, expected: float) -> None:
    assert format_reward([prompt], [completion], [{"answer": "4"}]) == [expected]


def test_task_reward_calls_the_tasks_verifier(monkeypatch: pytest.MonkeyPatch) -> None:
    tasks = pytest.importorskip("nanoseek.tasks")
    from nanoseek.tasks.base import Task

    seen = []

    class Echo(Task):
        name = "test_echo"

        def verify(self, completion, example):
            seen.append(example)
            return 1.0 if completion.strip().endswith(example.answer) else 0.0

    monkeypatch.setitem(tasks.TASKS, "test_echo", Echo())
    rows = [
        {"task": "test_echo", "prompt": "p1", "answer": "abc", "meta": {"k": 1}},
        {"task": "test_echo", "answer": "xyz", "solution": "s"},
    ]
    assert task_reward(["p1", "p2"], ["... abc", "... abd"], rows) == [1.0, 0.0]
    assert (seen[0].prompt, seen[0].meta, seen[0].solution) == ("p1", {"k": 1}, "")
    assert (seen[1].prompt, seen[1].solution) == ("p2", "s")  # the prompt falls back to the prompts list


def test_task_reward_with_a_real_task() -> None:
    tasks = pytest.importorskip("nanoseek.tasks")
    if "arithmetic" not in tasks.list_tasks():
        pytest.skip("no arithmetic task registered")
    examples = tasks.get_task("arithmetic").generate(4, split="test", seed=0)
    rows = [e.to_dict() for e in examples]
    prompts = [e.prompt for e in examples]
    assert task_reward(prompts, [e.solution for e in examples], rows) == [1.0] * 4
    wrong = [f"<think>x</think>\\boxed{{{e.answer}1}}" for e in examples]
    assert task_reward(prompts, wrong, rows) == [0.0] * 4


# ---------------------------------------------------------------------------------------------- loading


def test_load_reward_fn_resolves_modules_files_and_builtins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_reward_fn("nanoseek.rewards:math_reward") is math_reward
    assert load_reward_fn("format") is format_reward
    fn = load_reward_fn(fixture("length_reward"))
    assert fn([""], ["abc"], [{}]) == [3.0]
    (tmp_path / "my_rewards_mod.py").write_text("def r(p, c, rows):\n    return [7.0] * len(c)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_reward_fn("my_rewards_mod:r")([""], ["x"], [{}]) == [7.0]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_colon_here", "expected 'package.module:function'"),
        ("nanoseek_no_such_module_xyz:fn", "module 'nanoseek_no_such_module_xyz' not found"),
        ("nanoseek.rewards:no_such_function", "has no attribute 'no_such_function'"),
        ("nanoseek.rewards:__doc__", "not callable"),
        ("/no/such/file.py:fn", "not found"),
        ("", "non-empty"),
    ],
)
def test_load_reward_fn_errors(spec: str, message: str) -> None:
    with pytest.raises(RewardLoadError, match=message):
        load_reward_fn(spec)


def test_load_reward_fn_reports_a_broken_module(tmp_path: Path) -> None:
    broken = tmp_path / "broken.py"
    broken.write_text("import nanoseek_missing_dependency_xyz\n\ndef r(p, c, rows):\n    return []\n")
    with pytest.raises(RewardLoadError, match=r"importing .* failed.*nanoseek_missing_dependency_xyz"):
        load_reward_fn(f"{broken}:r")
    with pytest.raises(RewardLoadError, match="not callable"):
        load_reward_fn(fixture("NOT_CALLABLE"))


# ---------------------------------------------------------------------------------------------- RewardSet


def test_reward_set_weighted_total() -> None:
    rs = RewardSet().add("math", math_reward, 1.0).add("format", "format", 0.25)
    prompts = ["q"] * 3
    completions = ["<think>r</think>\\boxed{2}", "<think>r</think>\\boxed{3}", "2"]
    rows = [{"answer": "2"}] * 3
    result = rs.score(prompts, completions, rows)
    assert result.per_function == {"math": [1.0, 0.0, 0.0], "format": [1.0, 1.0, 0.0]}
    assert result.total == [1.25, 0.25, 0.0]
    assert result.failed == [False] * 3 and result.warnings == {}
    assert not any(t.isolated for t in rs.terms)  # built-ins stay in process


def test_reward_set_isolated_function_runs_and_may_print(capfd: pytest.CaptureFixture[str]) -> None:
    rs = RewardSet().add("len", fixture("length_reward"), 0.5)
    try:
        assert rs.terms[0].isolated
        for _ in range(2):  # the worker persists between calls
            result = rs.score(["", ""], ["abcd", "xy"], [{}, {}])
            assert result.per_function["len"] == [4.0, 2.0]
            assert result.total == [2.0, 1.0]
        assert "length_reward called with 2" in capfd.readouterr().err
    finally:
        rs.close()


def test_reward_set_contains_raising_functions(caplog: pytest.LogCaptureFixture) -> None:
    rs = RewardSet().add("ok", "format", 1.0).add("always", fixture("raise_always"), 1.0)
    rs.add("some", fixture("raise_on_bad"), 2.0).add("inproc", load_reward_fn(fixture("raise_on_bad")), 1.0)
    completions = ["<think>r</think>\\boxed{1}", "BAD", "fine"]
    try:
        with caplog.at_level(logging.WARNING, logger="nanoseek.rewards"):
            for _ in range(2):
                result = rs.score(["q"] * 3, completions, [{"answer": "1"}] * 3)
                assert result.per_function["always"] == [0.0, 0.0, 0.0]
                # only the sample it raises on loses its reward, isolated or in process
                assert result.per_function["some"] == [1.0, 0.0, 1.0]
                assert result.per_function["inproc"] == [1.0, 0.0, 1.0]
                assert result.total == [1.0 + 2.0 + 1.0, 0.0, 3.0]
                assert result.failed == [True, True, True]
                assert result.warnings == {
                    "always:raised:RuntimeError": 3,
                    "some:raised:KeyError": 1,
                    "inproc:raised:KeyError": 1,
                }
        assert rs.warnings["always:raised:RuntimeError"] == 6
        logged = [r for r in caplog.records if "always" in r.getMessage()]
        assert len(logged) == 1  # once per kind, not per sample or per call
    finally:
        rs.close()


@pytest.mark.parametrize("name", ["hang_on_hang", "sleep_forever"])
def test_reward_set_contains_a_hanging_function(name: str) -> None:
    rs = RewardSet().add("hang", fixture(name), 1.0, timeout_s=1.0).add("fmt", "format", 1.0)
    completions = ["<think>r</think>\\boxed{1}", "HANG"]
    try:
        t0 = time.monotonic()
        with ThreadPoolExecutor(max_workers=1) as ex:  # from a non-main thread, as in an RL loop
            result = ex.submit(rs.score, ["", ""], completions, [{}, {}]).result(timeout=30)
        elapsed = time.monotonic() - t0
        assert elapsed < 10.0
        assert result.per_function["hang"] == [0.0, 0.0]
        assert result.total == [1.0, 0.0]  # the other term still counts
        assert result.warnings == {"hang:timeout": 2}
        if name == "hang_on_hang":  # the killed worker was replaced and works
            assert rs.score([""], ["fine"], [{}]).per_function["hang"] == [0.5]
    finally:
        rs.close()


def test_reward_set_contains_bad_returns_and_dying_workers() -> None:
    rs = RewardSet()
    rs.add("len", wrong := fixture("wrong_length"), 1.0).add("str", fixture("not_numbers"), 1.0)
    rs.add("nan", fixture("nan_first"), 1.0).add("exit", fixture("exits"), 1.0)
    assert wrong.endswith(":wrong_length")
    try:
        result = rs.score(["", ""], ["a", "b"], [{}, {}])
        assert result.per_function == {"len": [0, 0], "str": [0, 0], "nan": [0.0, 2.0], "exit": [0, 0]}
        assert result.total == [0.0, 2.0]
        assert result.failed == [True, True]
        assert result.warnings == {
            "len:bad_return": 2,
            "str:bad_return": 2,
            "nan:non_finite": 1,
            "exit:worker_failed": 2,
        }
        assert all(math.isfinite(v) for v in result.total)
    finally:
        rs.close()


def test_reward_set_contains_unpicklable_rows() -> None:
    rs = RewardSet().add("len", fixture("length_reward"), 1.0)
    try:
        result = rs.score(["", ""], ["ab", "c"], [{"callback": lambda: 0}, {}])
        assert result.per_function["len"] == [0.0, 0.0]
        assert result.warnings == {"len:unpicklable_input": 2}
        assert rs.score([""], ["abc"], [{}]).per_function["len"] == [3.0]  # the worker is fine
    finally:
        rs.close()


def test_reward_set_parse_and_validation() -> None:
    rs = RewardSet.parse(f"math=1.0, format=0.1, {fixture('length_reward')}=0.5")
    try:
        assert rs.names == ["math", "format", "length_reward"]
        assert [t.weight for t in rs.terms] == [1.0, 0.1, 0.5]
        assert [t.isolated for t in rs.terms] == [False, False, True]
    finally:
        rs.close()
    with pytest.raises(RewardLoadError, match="not a number"):
        RewardSet.parse("math=heavy")
    with pytest.raises(ValueError, match="only a function given by import path"):
        RewardSet().add("x", math_reward, isolated=True)
    with pytest.raises(ValueError, match="used twice"):
        RewardSet().add("a", "math").add("a", "format")
    with pytest.raises(ValueError, match="batch sizes differ"):
        RewardSet().add("m", "math").score(["q"], ["a", "b"], [{}])


def test_configure_math_verify_resizes_the_pool() -> None:
    old = rewards.mathcheck._MATH_WORKERS
    rewards.configure_math_verify(workers=1)
    try:
        assert math_equal("\\frac{4}{8}", "0.5", fast_path=False)
    finally:
        rewards.configure_math_verify(workers=old)
    assert math_equal("\\frac{5}{10}", "0.5", fast_path=False)
    with pytest.raises(ValueError):
        rewards.configure_math_verify(workers=0)


def test_math_equal_works_again_after_shutdown_workers() -> None:
    assert math_equal("\\frac{3}{9}", "1/3", fast_path=False)
    rewards.shutdown_workers()
    assert math_equal("\\frac{3}{9}", "1/3", fast_path=False)  # a fresh pool replaces the closed one


# ---------------------------------------------------------------------------------------------- package layout


def test_tasks_grade_with_the_rewards_extract_boxed() -> None:
    from nanoseek import answers, tasks
    from nanoseek.tasks import base

    assert base.extract_boxed is answers.extract_boxed is extract_boxed is tasks.extract_boxed
    assert base.final_answer("<think>\\boxed{1}</think> \\boxed{2} then \\boxed{3") is None  # cut off: no answer
    assert base.final_answer("<think>x</think>\\boxed{\\{1, 2\\}}") == "\\{1, 2\\}"


def test_answer_extraction_imports_no_heavy_modules() -> None:
    code = (
        "import sys, nanoseek.answers, nanoseek.tasks\n"
        "heavy = sorted({'torch', 'numpy', 'sympy', 'math_verify'} & set(sys.modules))\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
