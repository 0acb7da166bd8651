"""The one grader: `grade(row, completion)` by what the row carries, and every caller using it.

References: a task's own `verify`, a test program's exit status, math-verify's equivalence (checked by
`math_equal` itself in test_rewards.py), and exact arithmetic for the answers written here.
"""

from __future__ import annotations

from typing import Any

import pytest

from nanoseek import tasks
from nanoseek.config import RLConfig
from nanoseek.rewards import (
    RewardSet,
    code_reward,
    grade,
    grade_many,
    math_reward,
    row_kind,
    task_reward,
)
from nanoseek.rewards import grading as grading_module
from nanoseek.tasks.base import Task
from nanoseek.train import rollouts

ADD_ROW = {"prompt": "Write add(a, b).", "tests": ["assert add(1, 2) == 3", "assert add(-4, 4) == 0"]}
ADD_RIGHT = "<think>easy</think>\n```python\ndef add(a, b):\n    return a + b\n```"
ADD_WRONG = "<think>easy</think>\n```python\ndef add(a, b):\n    return a - b\n```"


class Counting(Task):
    """Right when the completion ends with the answer; counts its calls."""

    name = "test_counting"
    calls = 0

    def verify(self, completion: str, example: Any) -> float:
        Counting.calls += 1
        return 1.0 if completion.rstrip().endswith(example.answer) else 0.0


@pytest.fixture
def counting(monkeypatch: pytest.MonkeyPatch) -> type[Counting]:
    monkeypatch.setitem(tasks.TASKS, Counting.name, Counting())
    monkeypatch.setattr(Counting, "calls", 0)
    return Counting


def test_row_kind_follows_what_the_row_carries() -> None:
    assert row_kind({"task": "arithmetic", "answer": "3", "tests": ["assert True"]}) == "task"
    assert row_kind({"test_list": ["assert f() == 1"], "answer": "1"}) == "code"
    assert row_kind({"test": "def check(c): pass", "entry_point": "f"}) == "code"
    assert row_kind({"answer": "1/2"}) == "math"


def test_a_task_row_is_graded_by_its_verifier(counting: type[Counting]) -> None:
    row = {"task": counting.name, "prompt": "p", "answer": "abc"}
    assert grade(row, "so: abc").correct and counting.calls == 1
    wrong = grade(row, "so: abd")
    assert (wrong.score, wrong.status) == (0.0, "no_answer")  # nothing an answer extractor reads
    # the real task: its gold solution is right, a different number is wrong
    example = tasks.get_task("arithmetic").generate(1, split="test", seed=3)[0]
    row = example.to_dict()
    right = grade(row, example.solution)
    assert (right.correct, right.answer, right.status) == (True, example.answer, "correct")
    other = str(int(example.answer) + 1)
    assert (grade(row, f"<think>x</think>\\boxed{{{other}}}").status, row_kind(row)) == ("wrong", "task")


def test_a_code_row_runs_its_tests() -> None:
    assert grade(ADD_ROW, ADD_RIGHT).correct
    wrong = grade(ADD_ROW, ADD_WRONG)
    assert (wrong.correct, wrong.status, wrong.answer) == (False, "wrong", "def add(a, b):\n    return a - b\n")
    assert grade(ADD_ROW, "no code here").status == "no_answer"


def test_a_math_row_by_equivalence_and_its_statuses(monkeypatch: pytest.MonkeyPatch) -> None:
    row = {"answer": "\\frac{1}{2}"}
    assert grade(row, "<think>0.25?</think>The answer is $0.5$.").status == "correct"
    assert grade(row, "\\boxed{0.4}").status == "wrong"
    assert grade(row, "<think>\\boxed{0.5}</think> I give up").status == "no_answer"  # after the reasoning only
    assert grade(row, "Answer: }}{{\\sqrt").status == "unparseable"
    assert grade({"answer": "\\frac{"}, "\\boxed{7}").status == "bad_gold"
    assert grade({"answer": 42}, "Answer: 42").correct  # a number as gold
    for outcome in ("timeout", "worker_error"):
        monkeypatch.setattr(grading_module, "math_outcome", lambda *a, outcome=outcome, **k: outcome)
        assert grade(row, "\\boxed{0.5}").status == "grader_error"


def test_the_kind_can_be_named() -> None:
    # a task row graded as math: the boxed answer against its `answer`, no verifier
    row = {"task": "no_such_task", "answer": "4"}
    assert grade(row, "\\boxed{4}", kind="math").correct
    # GSM8K: exact numbers, units and separators allowed
    assert grade({"answer": "1250"}, "The answer is $1,250 dollars.", kind="gsm8k").correct
    assert not grade({"answer": "1250"}, "#### 125", kind="gsm8k").correct
    with pytest.raises(ValueError, match="unknown grading kind"):
        grade({"answer": "1"}, "1", kind="essay")
    with pytest.raises(KeyError):
        grade({}, "\\boxed{1}")  # a row without a gold answer is a data bug, not a wrong answer


def test_grade_many_is_grade_over_pairs(counting: type[Counting]) -> None:
    rows = [
        ADD_ROW,
        {"answer": "0.5"},
        {"task": counting.name, "prompt": "p", "answer": "xyz"},
        ADD_ROW,
        {"answer": "3"},
    ]
    completions = [ADD_RIGHT, "\\boxed{\\frac{2}{4}}", "xyz", ADD_WRONG, "The answer is 4."]
    one_by_one = [grade(r, c) for r, c in zip(rows, completions)]
    assert [g.correct for g in one_by_one] == [True, True, True, False, False]
    assert grade_many(rows, completions, threads=3) == one_by_one
    assert grade_many(rows, completions, kind=["code", "math", "task", "code", "math"]) == one_by_one
    with pytest.raises(ValueError, match="2 rows, 1 completions"):
        grade_many(rows[:2], completions[:1])


def test_the_reward_functions_are_grade(counting: type[Counting]) -> None:
    rows = [{"task": counting.name, "answer": "ab"}, {"task": counting.name, "prompt": "q", "answer": "cd"}]
    assert task_reward(["p1", "p2"], ["x ab", "x ce"], rows) == [g.score for g in grade_many(rows, ["x ab", "x ce"])]
    math_rows = [{"answer": "2"}, {"answer": "\\frac{1}{3}"}]
    texts = ["\\boxed{2}", "Final Answer: The final answer is $1/3$. I hope it is correct."]
    assert math_reward(["", ""], texts, math_rows) == [1.0, 1.0]
    assert code_reward(["", ""], [ADD_RIGHT, ADD_WRONG], [ADD_ROW, ADD_ROW]) == [1.0, 0.0]


def test_rollout_accuracy_reuses_the_task_reward(counting: type[Counting]) -> None:
    """Accuracy on task rows is the verifier's verdict, taken from the reward set: each sample is verified once."""
    rows = [{"task": counting.name, "prompt": "p", "answer": "ok"}] * 3
    flat = {"rows": rows, "texts": ["ok", "no", "fine: ok"], "completion_ids": [[1], [2], [3]]}
    scored = rollouts.score(flat, RewardSet().add("task", "task").add("format", "format", 0.1), RLConfig())
    assert scored["correct"] == [True, False, True] and counting.calls == 3
    # without a task reward the verifier still decides accuracy on task rows
    scored = rollouts.score(flat, RewardSet().add("format", "format"), RLConfig())
    assert scored["correct"] == [True, False, True] and scored["per_function"]["format"] == [0.0] * 3
    # other rows: the first reward function
    math_rows = [{"prompt": "p", "answer": "1"}] * 2
    scored = rollouts.score(
        {"rows": math_rows, "texts": ["\\boxed{1}", "\\boxed{2}"], "completion_ids": [[1], [2]]},
        RewardSet().add("math", "math"),
        RLConfig(),
    )
    assert scored["correct"] == [True, False]
