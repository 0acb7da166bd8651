"""Grading: is this completion a right answer to this row? The one place that decides it.

The reward functions (`functions`), RL's held-out evaluation and `nanoseek eval` all call `grade`. How a
row is graded follows from what it carries (`row_kind`), unless the caller names the kind:

- "task": a row of a built-in task (a `task` field): that task's verifier (`nanoseek.tasks`).
- "code": code tests (`tests`, MBPP's `test_list`, HumanEval's `test` and `entry_point`): the last Python
  block after the reasoning is run against them (`code`).
- "math": any other row: the answer extracted after the reasoning (`nanoseek.answers.extract_answer`) is
  compared with the row's `answer` by math-verify's equivalence (`mathcheck`).
- "gsm8k" (only when asked, as for a GSM8K file): exact numeric equality with `answer` instead.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from nanoseek.answers import answer_region, extract_answer, gsm8k_equal
from nanoseek.rewards.code import check_code, has_code_tests
from nanoseek.rewards.mathcheck import math_outcome
from nanoseek.tasks import Example, get_task

__all__ = ["KINDS", "Grade", "grade", "grade_many", "row_kind"]

KINDS = ("task", "code", "math", "gsm8k")

# math_outcome's verdicts as grading statuses
_MATH_STATUS = {
    "equal": "correct",
    "unequal": "wrong",
    "unparseable_pred": "unparseable",
    "unparseable_gold": "bad_gold",
    "timeout": "grader_error",
    "worker_error": "grader_error",
}


@dataclass(frozen=True)
class Grade:
    """One graded completion."""

    score: float
    """The reward in [0, 1]; 1.0 is right (task verifiers may give partial credit)."""
    answer: str | None
    """What was read as the answer (for code: the code block); None when there was nothing to read."""
    status: str
    """Why: "correct", "wrong", "no_answer", "unparseable" (math-verify cannot read the answer),
    "grader_error" (math-verify timed out or failed) or "bad_gold" (it cannot read the gold answer)."""

    @property
    def correct(self) -> bool:
        return self.score >= 1.0


def _verdict(score: float, answer: str | None) -> Grade:
    status = "correct" if score >= 1.0 else "no_answer" if answer is None else "wrong"
    return Grade(score, answer, status)


def row_kind(row: dict[str, Any]) -> str:
    """How a row is graded when the caller does not say: "task", "code" or "math"."""
    if "task" in row:
        return "task"
    if has_code_tests(row):
        return "code"
    return "math"


def grade(
    row: dict[str, Any],
    completion: str,
    *,
    kind: str | None = None,
    prompt: str | None = None,
    timeout_s: float = 5.0,
) -> Grade:
    """Grade one completion of `row` (see the module docstring; `kind` overrides `row_kind(row)`).

    `prompt` stands in for a task row without its own `prompt`. A row without what its kind needs
    (`answer`, `task`, tests) raises: that is a bug in the data, not a wrong answer.
    """
    kind = kind or row_kind(row)
    if kind == "task":
        example = Example(
            task=row["task"],
            prompt=row.get("prompt", prompt if prompt is not None else ""),
            answer=row["answer"],
            solution=row.get("solution", ""),
            meta=row.get("meta") or {},
        )
        score = float(get_task(row["task"]).verify(completion, example))
        return _verdict(score, extract_answer(answer_region(completion)))
    if kind == "code":
        result = check_code(completion, row)
        return _verdict(float(result.passed), result.code)
    if kind not in KINDS:
        raise ValueError(f"unknown grading kind {kind!r}; known: {', '.join(KINDS)}")
    gold = str(row["answer"])
    answer = extract_answer(answer_region(completion))
    if answer is None:
        return Grade(0.0, None, "no_answer")
    if kind == "gsm8k":
        return _verdict(float(gsm8k_equal(answer, gold)), answer)
    outcome = math_outcome(answer, gold, timeout_s)
    return Grade(float(outcome == "equal"), answer, _MATH_STATUS[outcome])


def grade_many(
    rows: Sequence[dict[str, Any]],
    completions: Sequence[str],
    *,
    kind: str | Sequence[str] | None = None,
    prompts: Sequence[str] | None = None,
    timeout_s: float = 5.0,
    threads: int | None = None,
) -> list[Grade]:
    """`grade` over pairs, several at a time: math-verify and the test programs run in other processes, so
    the threads only wait. Task verifiers are plain Python and run in the calling thread by default.
    `kind` is one kind for every row, or one per row."""
    kinds = [kind] * len(rows) if kind is None or isinstance(kind, str) else list(kind)
    if not (len(rows) == len(completions) == len(kinds)) or (prompts is not None and len(prompts) != len(rows)):
        raise ValueError(
            f"{len(rows)} rows, {len(completions)} completions, {len(kinds)} kinds"
            + (f", {len(prompts)} prompts" if prompts is not None else "")
        )
    kinds = [k or row_kind(row) for k, row in zip(kinds, rows)]
    jobs = list(zip(rows, completions, kinds, prompts or [None] * len(rows)))

    def one(job: tuple) -> Grade:
        row, completion, row_kind_, prompt = job
        return grade(row, completion, kind=row_kind_, prompt=prompt, timeout_s=timeout_s)

    if threads is None:
        threads = 1 if all(k == "task" for k in kinds) else min(len(jobs), os.cpu_count() or 1, 32)
    if threads <= 1 or len(jobs) <= 1:
        return [one(job) for job in jobs]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(one, jobs))
