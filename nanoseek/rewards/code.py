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
when every test passes: assert-style tests run as one program that must exit 0; stdin/stdout cases
run one program each, and the output must match after trimming trailing whitespace per line.

Each program is a process of its own, forked from a small server (`_zygote.py`, a `python -I` that
imports nothing of ours; forking it takes a few ms where starting an interpreter takes ~30), in its
own temporary directory and process group, with no file descriptors but stdin/stdout/stderr, an
empty environment but PATH/HOME/LANG, resource limits (address space, CPU seconds, file size, no
core files), and a wall-clock limit after which its whole process group is killed. Output goes to
files whose size the file-size limit bounds, so a program printing forever cannot fill this
process's memory.
This contains mistakes (endless loops, memory bombs, stray files), not attackers: the program
can still use the network and whatever the user may read. Run untrusted code in a container.
"""

from __future__ import annotations

import atexit
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanoseek.answers import answer_region

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


# ----------------------------------------------------------------------------- running a program
@dataclass(frozen=True)
class ExecLimits:
    """Per-program limits. 0 turns a limit off (the wall-clock limit cannot be turned off)."""

    timeout_s: float = 5.0  # wall clock, whole process group killed after it
    memory_mb: int = 1024  # address space (RLIMIT_AS)
    cpu_s: int = 10  # CPU seconds (RLIMIT_CPU)
    output_bytes: int = 1 << 20  # largest file the program may write, stdout included (RLIMIT_FSIZE)


@dataclass
class ExecResult:
    status: str  # "ok" (exit 0), "error" (non-zero exit), "timeout", "memory_limit", "output_limit", "killed"
    returncode: int | None
    stdout: str
    stderr: str  # its last 2000 characters


class _ForkServer:
    """The parent's side of `_zygote.py`: one server process, many programs in flight (one per thread)."""

    def __init__(self) -> None:
        request_r, request_w = os.pipe()
        answer_r, answer_w = os.pipe()
        self.pid_of_parent = os.getpid()
        self.process = subprocess.Popen(
            [sys.executable, "-I", str(Path(__file__).with_name("_zygote.py")), str(request_r), str(answer_w)],
            pass_fds=(request_r, answer_w),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            env={"PATH": os.defpath, "LANG": "C.UTF-8"},
            start_new_session=True,  # a Ctrl-C in the terminal is the trainer's, not the server's
        )
        os.close(request_r)
        os.close(answer_w)
        self._requests = os.fdopen(request_w, "w", buffering=1)
        self._waiting: dict[int, Future] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self.alive = True
        threading.Thread(target=self._read, args=(os.fdopen(answer_r),), daemon=True).start()

    def _read(self, answers: Any) -> None:
        for line in answers:
            message = json.loads(line)
            with self._lock:
                future = self._waiting.pop(message["id"])
            future.set_result(message)
        with self._lock:  # the server exited: fail what waits on it
            self.alive = False
            waiting, self._waiting = list(self._waiting.values()), {}
        for future in waiting:
            future.set_exception(RuntimeError("the code-execution server exited"))

    def run(self, directory: str, limits: ExecLimits) -> dict[str, Any]:
        future: Future = Future()
        request = {
            "dir": directory,
            "timeout": limits.timeout_s,
            "limits": [limits.memory_mb << 20, limits.cpu_s, limits.output_bytes],
        }
        with self._lock:
            if not self.alive:
                raise RuntimeError("the code-execution server exited")
            request["id"] = next(self._ids)
            self._waiting[request["id"]] = future
            self._requests.write(json.dumps(request) + "\n")
        return future.result(timeout=limits.timeout_s + 30)  # the server enforces timeout_s itself

    def close(self) -> None:
        self._requests.close()  # end of requests: the server kills what still runs and exits
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()


_server: _ForkServer | None = None
_server_lock = threading.Lock()


def _fork_server() -> _ForkServer:
    """The process's fork server, started on first use and again if it died (or after a fork of this process)."""
    global _server
    with _server_lock:
        if _server is None or not _server.alive or _server.pid_of_parent != os.getpid():
            _server = _ForkServer()
        return _server


@atexit.register
def _close_fork_server() -> None:
    if _server is not None and _server.pid_of_parent == os.getpid():
        _server.close()


def run_python(source: str, stdin: str = "", limits: ExecLimits | None = None) -> ExecResult:
    """Run `source` as a fresh Python program (`__main__`, forked from a clean server) with `stdin` as its
    input, under `limits`, in its own temporary directory."""
    limits = limits or ExecLimits()
    with tempfile.TemporaryDirectory(prefix="nanoseek-code-") as tmp:
        work = Path(tmp)
        (work / "main.py").write_text(source, encoding="utf-8")
        (work / "stdin.txt").write_text(stdin, encoding="utf-8")
        answer = _fork_server().run(tmp, limits)
        returncode = answer["returncode"]
        stdout = (work / "stdout.txt").read_bytes()[: limits.output_bytes].decode("utf-8", errors="replace")
        stderr = (work / "stderr.txt").read_bytes()[-4000:].decode("utf-8", errors="replace")[-2000:]
    if answer["timeout"]:
        status = "timeout"
    elif returncode == 0:
        status = "ok"
    elif returncode < 0:
        status = "killed"  # a signal: RLIMIT_CPU's SIGXCPU, or the program killed itself
    elif stderr.rstrip().endswith("MemoryError"):
        status = "memory_limit"
    elif "File too large" in stderr:  # Python ignores SIGXFSZ: writes past RLIMIT_FSIZE raise EFBIG
        status = "output_limit"
    else:
        status = "error"
    return ExecResult(status, returncode, stdout, stderr)


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
        run = run_python(program + "\n\n" + "\n".join(tests.asserts) + "\n", limits=limits)
        if run.status == "ok":
            return CodeResult(True, "passed", code)
        status = "failed" if "AssertionError" in run.stderr else run.status
        return CodeResult(False, status, code, run.stderr)
    for i, (stdin, expected) in enumerate(tests.io):
        run = run_python(program + "\n", stdin=stdin, limits=limits)
        if run.status != "ok":
            return CodeResult(False, run.status, code, f"case {i}: {run.stderr}")
        if not _same_output(run.stdout, expected):
            return CodeResult(False, "failed", code, f"case {i}: expected {expected[:200]!r}, got {run.stdout[:200]!r}")
    return CodeResult(True, "passed", code)
