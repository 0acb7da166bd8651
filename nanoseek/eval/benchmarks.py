"""Benchmark files: load GSM8K, MATH/MATH-500, AIME or any JSONL/JSON/parquet, and grade completions.

A benchmark is a list of `Problem`s: the text the model answers (`prompt`, without any instruction
template: the evaluation loop adds that), the gold `answer`, and the `kind` that decides grading:

- "math": MATH, MATH-500, AIME and anything else with a LaTeX/number answer, graded by math_equal.
- "gsm8k": GSM8K (gold = the number after `####`), graded by exact numeric equality.
- "task:<name>": rows written by nanoseek.tasks (`task`, `prompt`, `answer`), graded by the task's verifier.
- "code": HumanEval (`prompt`, `test`, `entry_point`), MBPP (`text` or `prompt`, `test_list`) or rows
  with `prompt` and `tests`; graded by running the completion's last Python block against the tests
  (`nanoseek.rewards.code`). `answer` holds the reference solution when the file has one.

`grade` hands a problem to `nanoseek.rewards.grade` with its kind, as the RL loop grades its rows.

Layouts are recognised from the first row's fields; `prompt_field`/`answer_field` name them for any
other file. A malformed row stops loading with a ValueError naming the file and line, unless
`skip_bad=True`, which skips it and records why in `ProblemSet.skipped`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanoseek.answers import extract_boxed, parse_gsm8k_number
from nanoseek.data.errors import BadInputError
from nanoseek.data.jsonl import read_jsonl
from nanoseek.rewards import Grade, code_tests
from nanoseek.rewards import grade as grade_row
from nanoseek.rewards import grade_many as grade_rows

__all__ = ["Problem", "ProblemSet", "grade", "grade_many", "load_benchmark"]


@dataclass
class Problem:
    """One benchmark problem. `row` is the original record (for solutions, subjects, levels...)."""

    id: str
    prompt: str
    answer: str
    kind: str
    row: dict = field(repr=False)


class ProblemSet(list):
    """The problems of one file (a plain list of Problem), plus where they came from and what was skipped."""

    def __init__(self, problems: Sequence[Problem] = (), path: str = "", layout: str = "", skipped: Sequence[str] = ()):
        super().__init__(problems)
        self.path = path
        self.layout = layout
        self.skipped: list[str] = list(skipped)


class _BadRow(ValueError):
    pass


def _iter_records(path: Path) -> Iterator[tuple[str, Any]]:
    """(location, record) for every record of a JSONL, JSON or parquet file; location is 'line N' etc."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq  # here: only parquet files pay its import (~0.1 s)

        table = pq.read_table(path)
        for i, record in enumerate(table.to_pylist()):
            yield f"row {i + 1}", record
        return
    text = None if suffix == ".jsonl" else path.read_text(encoding="utf-8")
    if text is not None and (suffix == ".json" or (text.lstrip()[:1] in ("[", "{") and _is_single_json(text))):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON (line {e.lineno}): {e.msg}") from None
        if isinstance(data, dict):
            if not isinstance(data.get("data"), list):
                raise ValueError(f"{path}: a JSON object must hold the problems as a list under 'data'")
            data = data["data"]
        if not isinstance(data, list):
            raise ValueError(f"{path}: JSON must be a list of problems or {{'data': [...]}}")
        for i, record in enumerate(data):
            yield f"item {i + 1}", record
        return
    for lineno, record in read_jsonl(path, errors="yield"):
        yield f"line {lineno}", _BadRow(record.reason) if isinstance(record, BadInputError) else record


def _is_single_json(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except json.JSONDecodeError:
        return False


def _detect_layout(record: dict, prompt_field: str | None, answer_field: str | None) -> str:
    if prompt_field or answer_field:
        return "custom"
    if {"task", "prompt", "answer"} <= record.keys():
        return "task"
    if {"prompt", "test", "entry_point"} <= record.keys():
        return "humaneval"
    if "test_list" in record and ("text" in record or "prompt" in record):
        return "mbpp"
    if "tests" in record and ("prompt" in record or "question" in record):
        return "code"
    if "question" in record and isinstance(record.get("answer"), str) and "####" in record["answer"]:
        return "gsm8k"
    if "problem" in record and ("answer" in record or "solution" in record):
        return "math"
    if "question" in record and "answer" in record:
        return "aime"
    raise ValueError(
        f"cannot tell the layout from the fields {sorted(record)}: expected GSM8K (question, answer with "
        "'#### n'), MATH (problem, solution/answer), AIME (problem or question, answer), nanoseek task rows "
        "(task, prompt, answer), HumanEval (prompt, test, entry_point), MBPP (text, test_list), code rows "
        "(prompt, tests), or pass prompt_field= and answer_field="
    )


def _text(record: dict, name: str) -> str:
    if name not in record or record[name] is None:
        raise _BadRow(f"missing field {name!r}")
    value = record[name]
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise _BadRow(f"field {name!r} is a {type(value).__name__}, expected text or a number")
    text = str(value).strip()
    if not text:
        raise _BadRow(f"field {name!r} is empty")
    return text


def _problem_from(record: Any, layout: str, prompt_field: str | None, answer_field: str | None, index: int, stem: str):
    if isinstance(record, _BadRow):
        raise record
    if not isinstance(record, dict):
        raise _BadRow(f"expected an object, got {type(record).__name__}")
    ids = (str(record[k]) for k in ("unique_id", "id", "idx", "task_id") if record.get(k) not in (None, ""))
    ident = next(ids, None) or f"{stem}-{index}"
    if layout == "gsm8k":
        prompt = _text(record, prompt_field or "question")
        solution = _text(record, answer_field or "answer")
        if "####" not in solution:
            raise _BadRow("GSM8K answer has no '#### <number>' line")
        answer = solution.rsplit("####", 1)[1].strip()
        if parse_gsm8k_number(answer) is None:
            raise _BadRow(f"GSM8K answer after '####' is not a number: {answer!r}")
        return Problem(ident, prompt, answer, "gsm8k", record)
    if layout in ("humaneval", "mbpp", "code"):
        return _code_problem(record, layout, ident)
    if layout == "task":
        task = _text(record, "task")
        return Problem(ident, _text(record, "prompt"), _text(record, "answer"), f"task:{task}", record)
    if layout in ("math", "aime"):
        prompt_name = prompt_field or ("problem" if "problem" in record else "question")
        prompt = _text(record, prompt_name)
        if record.get("answer") not in (None, ""):
            answer = _text(record, "answer")
        else:
            boxed = extract_boxed(record.get("solution") or "")
            if boxed is None or not boxed.strip():
                raise _BadRow("no 'answer' field and no \\boxed{} answer in 'solution'")
            answer = boxed.strip()
        return Problem(ident, prompt, answer, "math", record)
    # custom layout: the caller named the fields
    prompt = _text(record, prompt_field or "prompt")
    raw = _text(record, answer_field or "answer")
    if "####" in raw:
        answer = raw.rsplit("####", 1)[1].strip()
        return Problem(ident, prompt, answer, "gsm8k", record)
    return Problem(ident, prompt, raw, "math", record)


def _code_problem(record: dict, layout: str, ident: str) -> Problem:
    """A code problem: the text shown to the model, the reference solution (if any) as `answer`."""
    try:
        code_tests(record)  # malformed tests fail at load time, naming the row
    except ValueError as e:
        raise _BadRow(str(e)) from None
    if layout == "humaneval":
        signature = _text(record, "prompt")
        prompt = f"Complete the following Python function.\n\n```python\n{signature}\n```"
        canonical = record.get("canonical_solution")
        reference = record["prompt"] + canonical if isinstance(canonical, str) and canonical.strip() else ""
    elif layout == "mbpp":
        text = _text(record, "text" if "text" in record else "prompt")
        prompt = text + "\nYour code should pass these tests:\n\n" + "\n".join(record["test_list"])
        reference = str(record.get("code") or "")
    else:
        prompt = _text(record, "prompt" if "prompt" in record else "question")
        reference = str(record.get("solution") or record.get("code") or "")
    return Problem(ident, prompt, reference, "code", record)


def load_benchmark(
    path: str | Path,
    prompt_field: str | None = None,
    answer_field: str | None = None,
    skip_bad: bool = False,
) -> ProblemSet:
    """Read a benchmark file (.jsonl, .json list or {"data": [...]}, .parquet) into Problems.

    The layout comes from the first well-formed record (see module doc); every row must fit it. A
    malformed row raises ValueError("<file>: line N: why"), or with `skip_bad` is skipped and
    listed in the result's `.skipped`. A file with no problems is an error.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: benchmark file not found")
    problems: list[Problem] = []
    skipped: list[str] = []
    layout: str | None = None
    for index, (where, record) in enumerate(_iter_records(path)):
        try:
            if layout is None and isinstance(record, dict):
                try:
                    layout = _detect_layout(record, prompt_field, answer_field)
                except ValueError as e:
                    raise _BadRow(str(e)) from None
            problems.append(_problem_from(record, layout or "custom", prompt_field, answer_field, index, path.stem))
        except _BadRow as e:
            message = f"{path}: {where}: {e}"
            if not skip_bad:
                raise ValueError(message) from None
            skipped.append(message)
    if not problems:
        detail = f" ({len(skipped)} malformed rows skipped; first: {skipped[0]})" if skipped else ""
        raise ValueError(f"{path}: no problems in benchmark file{detail}")
    return ProblemSet(problems, path=str(path), layout=layout or "", skipped=skipped)


def _row(problem: Problem) -> dict[str, Any]:
    """The problem as a row for `nanoseek.rewards.grade`: the file's record with the gold answer as read."""
    return {**problem.row, "answer": problem.answer}


def _kind(problem: Problem) -> str:
    return problem.kind.partition(":")[0]  # "task:<name>" -> "task": the row names its task


def grade(problem: Problem, completion: str, timeout_s: float = 5.0) -> Grade:
    """`nanoseek.rewards.grade` for a problem, by its kind: `.correct`, `.answer` (read after `</think>`
    if present; for code the code block), `.status`."""
    return grade_row(_row(problem), completion, kind=_kind(problem), timeout_s=timeout_s)


def grade_many(
    problems: Sequence[Problem], completions: Sequence[str], workers: int = 4, timeout_s: float = 5.0
) -> list[Grade]:
    """grade() over pairs with a few threads, so that the math-verify worker processes run in parallel."""
    if len(problems) != len(completions):
        raise ValueError(f"{len(problems)} problems but {len(completions)} completions")
    kinds = [_kind(p) for p in problems]
    return grade_rows([_row(p) for p in problems], completions, kind=kinds, timeout_s=timeout_s, threads=workers)
