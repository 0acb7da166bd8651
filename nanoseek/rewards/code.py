"""Code rewards: run the model's Python against a problem's tests, in a subprocess with limits.

The R1 recipe rewards code the way it rewards math: by checking it, here by running it. A row
says what to run in one of three shapes (the public benchmarks' own fields):

- `tests`: a list of Python statements (`"assert add(1, 2) == 3"`), or a list of
  `{"input": ..., "output": ...}` cases for a program that reads stdin and writes stdout;
  optional `setup` code runs first. (Our own format; LiveCodeBench/APPS-style cases fit the second.)
- MBPP: `test_list` (assert statements), optional `test_setup_code` / `test_imports`.
- HumanEval: `test` (defines `check(candidate)`) and `entry_point`; `prompt` (the signature and
  docstring) is put before the model's code when that code does not define the function itself.

The model's code is the last fenced block (```python, ```py or ```) after the reasoning. It passes
when every test passes: assert-style tests run as one program that must exit 0 after printing a
random line put after the last test (a program that exits 0 before its tests, `sys.exit(0)` at the
top, does not pass); stdin/stdout cases run one program each, and the output must match after
trimming trailing whitespace per line.

Each program runs in the sandbox of `nanoseek.rewards.sandbox` (`run_python`): a process forked from a
small clean server, with limits on memory, CPU time, output and wall time, isolated from the trainer at
the level `configure_sandbox` chose (namespaces where the machine allows them, else process).
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field
from typing import Any

from nanoseek.answers import answer_region
from nanoseek.rewards.sandbox import ExecLimits, ExecResult, run_python

__all__ = [
    "CodeResult",
    "CodeTests",
    "ExecLimits",
    "ExecResult",
    "check_code",
    "code_tests",
    "extract_code",
    "has_code_tests",
    "run_python",
]

_FENCE = re.compile(r"```[ \t]*(?P<lang>[A-Za-z0-9_+-]*)[^\n]*\n(?P<body>.*?)```", re.DOTALL)
_CODE_LANGS = {"", "python", "python3", "py"}


def extract_code(completion: str) -> str | None:
    """The last fenced Python (or untagged) code block after the reasoning, or None.

    As with `\\boxed{}`, a last block that never closes means no answer rather than an earlier block."""
    region = answer_region(completion)
    fences = list(_FENCE.finditer(region))
    if not fences or "```" in region[fences[-1].end() :]:
        return None  # no block, or the last one never closes (cut off mid-answer): not an answer
    blocks = [m.group("body") for m in fences if m.group("lang").lower() in _CODE_LANGS]
    return blocks[-1] if blocks and blocks[-1].strip() else None


# ----------------------------------------------------------------------------- tests of a row
@dataclass
class CodeTests:
    """What to run for one problem: assert statements (one program) or stdin/stdout cases."""

    asserts: list[str] = field(default_factory=list)
    io: list[tuple[str, str]] = field(default_factory=list)
    setup: str = ""  # runs before the model's code (imports the tests need)
    prefix: str = ""  # HumanEval: the prompt, used when the model's code lacks `def entry_point`
    entry_point: str | None = None


def has_code_tests(row: dict[str, Any]) -> bool:
    """True when the row carries tests in one of the shapes `code_tests` reads."""
    return "tests" in row or "test_list" in row or ("test" in row and "entry_point" in row)


def _strings(row: dict[str, Any], name: str) -> list[str]:
    value = row[name]
    if not isinstance(value, list) or not value or not all(isinstance(s, str) and s.strip() for s in value):
        raise ValueError(f"field {name!r} must be a non-empty list of non-empty strings")
    return value


def _text_field(row: dict[str, Any], name: str) -> str:
    value = row.get(name) or ""
    if isinstance(value, list):  # MBPP's sanitized split lists its imports
        value = "\n".join(str(v) for v in value)
    if not isinstance(value, str):
        raise ValueError(f"field {name!r} must be text, got {type(value).__name__}")
    return value


def code_tests(row: dict[str, Any]) -> CodeTests:
    """The row's tests (see the module docstring for the shapes); ValueError naming the bad field."""
    if "tests" in row:
        tests = row["tests"]
        if isinstance(tests, list) and tests and all(isinstance(t, dict) for t in tests):
            cases = []
            for i, case in enumerate(tests):
                if not isinstance(case.get("input"), str) or not isinstance(case.get("output"), str):
                    raise ValueError(f"field 'tests'[{i}] must have string 'input' and 'output'")
                cases.append((case["input"], case["output"]))
            return CodeTests(io=cases, setup=_text_field(row, "setup"))
        return CodeTests(asserts=_strings(row, "tests"), setup=_text_field(row, "setup"))
    if "test_list" in row:
        setup = "\n".join(s for s in (_text_field(row, "test_imports"), _text_field(row, "test_setup_code")) if s)
        return CodeTests(asserts=_strings(row, "test_list"), setup=setup)
    if "test" in row and "entry_point" in row:
        test, entry = _text_field(row, "test"), row["entry_point"]
        if not test.strip():
            raise ValueError("field 'test' is empty")
        if not isinstance(entry, str) or not entry.isidentifier():
            raise ValueError(f"field 'entry_point' must be a Python name, got {entry!r}")
        return CodeTests(asserts=[test, f"check({entry})"], prefix=_text_field(row, "prompt"), entry_point=entry)
    raise ValueError("no tests: expected 'tests', 'test_list' (MBPP) or 'test' with 'entry_point' (HumanEval)")


# ----------------------------------------------------------------------------- checking a completion
@dataclass
class CodeResult:
    passed: bool
    status: str  # "passed", "no_code", "failed" (an assert or a wrong output), "timeout", "error", ...
    code: str | None  # the completion's code block, as the model wrote it
    detail: str = ""


def _same_output(got: str, expected: str) -> bool:
    def norm(s: str) -> list[str]:
        return [line.rstrip() for line in s.rstrip().splitlines()]

    return norm(got) == norm(expected)


def check_code(completion: str, row: dict[str, Any], limits: ExecLimits | None = None) -> CodeResult:
    """Does the completion's code pass every test of `row`? ValueError if the row has no usable tests."""
    tests = code_tests(row)
    code = extract_code(completion)
    if code is None:
        return CodeResult(False, "no_code", None)
    solution = code
    if tests.prefix and not re.search(rf"^\s*def\s+{re.escape(tests.entry_point or '')}\s*\(", code, re.MULTILINE):
        solution = tests.prefix + code  # a body completing the given signature
    program = "\n\n".join(part for part in (tests.setup, solution) if part)
    if tests.asserts:
        done = f"tests passed {secrets.token_hex(8)}"  # printed after the last test: exiting 0 early is no pass
        run = run_python(program + "\n\n" + "\n".join(tests.asserts) + f"\nprint({done!r})\n", limits=limits)
        if run.status == "ok" and run.stdout.rstrip().endswith(done):
            return CodeResult(True, "passed", code)
        if run.status == "ok":
            return CodeResult(False, "failed", code, "the program exited before its tests ran to the end")
        status = "failed" if "AssertionError" in run.stderr else run.status
        return CodeResult(False, status, code, run.stderr)
    for i, (stdin, expected) in enumerate(tests.io):
        run = run_python(program + "\n", stdin=stdin, limits=limits)
        if run.status != "ok":
            return CodeResult(False, run.status, code, f"case {i}: {run.stderr}")
        if not _same_output(run.stdout, expected):
            return CodeResult(False, "failed", code, f"case {i}: expected {expected[:200]!r}, got {run.stdout[:200]!r}")
    return CodeResult(True, "passed", code)
