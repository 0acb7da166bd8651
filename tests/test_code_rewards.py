"""Code rewards: extraction of the code block, the limited subprocess, the three test shapes (asserts,
MBPP, HumanEval, stdin/stdout), the `code` reward, code benchmarks in `nanoseek eval`, and code rows
in `nanoseek rl`'s prompt files. References: hand-written right and wrong solutions, and the process
table (a killed program leaves no process behind)."""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from processes import running_with

from nanoseek.eval import grade, load_benchmark
from nanoseek.rewards import RewardSet, check_code, code, code_reward, code_tests, extract_code, sandbox
from nanoseek.rewards.code import ExecLimits, run_python

ADD_ROW = {"prompt": "Write add(a, b).", "tests": ["assert add(1, 2) == 3", "assert add(-4, 4) == 0"]}
MBPP_ROW = {
    "task_id": 2,
    "text": "Write a function to find the shared elements from the given two lists.",
    "code": "def similar_elements(a, b):\n    return tuple(set(a) & set(b))",
    "test_list": [
        "assert set(similar_elements((3, 4, 5, 6), (5, 7, 4, 10))) == set((4, 5))",
        "assert set(similar_elements((1, 2, 3, 4), (5, 4, 3, 7))) == set((3, 4))",
    ],
    "test_setup_code": "",
}
HUMANEVAL_ROW = {
    "task_id": "HumanEval/0",
    "prompt": 'def double(xs: list) -> list:\n    """Each element times two."""\n',
    "canonical_solution": "    return [2 * x for x in xs]\n",
    "test": "def check(candidate):\n    assert candidate([1, 2]) == [2, 4]\n    assert candidate([]) == []\n",
    "entry_point": "double",
}
IO_ROW = {
    "prompt": "Read n, print the squares 1..n, one per line.",
    "tests": [{"input": "3\n", "output": "1\n4\n9\n"}, {"input": "1\n", "output": "1"}],
}


def fenced(code: str, lang: str = "python") -> str:
    return f"<think>\nsimple\n</think>\n```{lang}\n{code}\n```"


def test_extract_code() -> None:
    assert extract_code("```python\nx = 1\n```\ntext\n```py\ny = 2\n```") == "y = 2\n"  # the last block
    assert extract_code("```\nz = 3\n```") == "z = 3\n"  # untagged blocks count
    assert extract_code("```python\nx = 1\n```\n```text\nnot code\n```") == "x = 1\n"  # other languages do not
    assert extract_code("<think>```python\nx = 1\n```</think>no code after thinking") is None
    assert extract_code("```python\nx = 1\n```\n```python\ny = (") is None  # cut off mid-block: no answer
    assert extract_code("plain text") is None and extract_code("```python\n   \n```") is None


def test_run_python_isolation_and_limits(monkeypatch) -> None:
    ok = run_python("import sys\nprint(sys.stdin.read().upper(), end='')", stdin="abc\n")
    assert (ok.status, ok.returncode, ok.stdout) == ("ok", 0, "ABC\n")

    monkeypatch.setenv("NANOSEEK_TEST_SECRET", "x")
    seen = run_python("import os\nprint(sorted(os.environ))\nprint(os.getcwd())").stdout.splitlines()
    assert "NANOSEEK_TEST_SECRET" not in seen[0]
    assert not Path(seen[1]).exists()  # its working directory was a temporary one, removed after
    assert run_python("raise SystemExit(3)").status == "error"

    t0 = time.monotonic()
    token = f"nanoseek-test-child-{os.getpid()}-{time.time_ns()}"  # names the child in the process table
    child = f"[sys.executable, '-c', 'import time; time.sleep(60)', {token!r}]"
    spawner = f"import subprocess, sys\nsubprocess.Popen({child})\nwhile True: pass"
    spin = run_python(spawner, limits=ExecLimits(timeout_s=1.0))
    assert spin.status == "timeout" and time.monotonic() - t0 < 10
    assert running_with(token, wait_s=5) == []  # the child died with the program (SIGKILL lands soon after)

    assert run_python("x = bytearray(1 << 31)", limits=ExecLimits(memory_mb=256)).status == "memory_limit"
    flood = run_python("while True: print('x' * 1000)", limits=ExecLimits(output_bytes=10_000))
    assert flood.status == "output_limit" and len(flood.stdout) <= 10_000
    assert run_python("while True: pass", limits=ExecLimits(timeout_s=10, cpu_s=1)).status == "killed"  # SIGXCPU


def test_programs_cannot_reach_the_fork_server() -> None:
    fds = run_python("import os\nprint(sorted(int(fd) for fd in os.listdir('/proc/self/fd')))").stdout
    assert json.loads(fds)[:3] == [0, 1, 2] and len(json.loads(fds)) <= 4  # + the listing's own descriptor
    path = run_python("import sys\nprint(sys.path)").stdout
    assert str(Path(code.__file__).parent) not in path  # no importing the server's siblings
    assert "ModuleNotFoundError" in run_python("import _zygote").stderr


def test_fork_server_answers_each_program_and_restarts_after_dying() -> None:
    with ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(lambda i: run_python(f"print({i} * {i})").stdout, range(24)))
    assert outs == [f"{i * i}\n" for i in range(24)]
    server = sandbox._fork_server()
    failures = sandbox.sandbox_stats().failures
    with ThreadPoolExecutor(1) as pool:
        stuck = pool.submit(run_python, "while True: pass", limits=ExecLimits(timeout_s=30))
        time.sleep(0.5)
        server.process.kill()
        result = stuck.result(timeout=10)  # a failure of the sandbox: scored, counted, never raised
    assert (result.status, result.returncode) == ("sandbox_error", None) and "server exited" in result.stderr
    assert sandbox.sandbox_stats().failures == failures + 1
    assert run_python("print('back')").stdout == "back\n" and sandbox._fork_server() is not server


@pytest.mark.parametrize(
    ("row", "right", "wrong"),
    [
        (ADD_ROW, "def add(a, b):\n    return a + b", "def add(a, b):\n    return a - b"),
        (MBPP_ROW, MBPP_ROW["code"], "def similar_elements(a, b):\n    return tuple(a)"),
        (HUMANEVAL_ROW, HUMANEVAL_ROW["canonical_solution"], "    return xs"),  # a body: the prompt goes first
        (HUMANEVAL_ROW, "def double(xs):\n    return [x + x for x in xs]", "def double(xs):\n    return xs * 2"),
        (IO_ROW, "n = int(input())\nfor i in range(1, n + 1):\n    print(i * i)  ", "print(1)"),
    ],
    ids=["asserts", "mbpp", "humaneval-body", "humaneval-function", "stdin-stdout"],
)
def test_right_solutions_pass_and_wrong_ones_fail(row, right, wrong) -> None:
    passed = check_code(fenced(right), row)
    assert passed.passed and passed.status == "passed", passed.detail
    failed = check_code(fenced(wrong), row)
    assert not failed.passed and failed.status == "failed"
    assert check_code("no code here", row).status == "no_code"
    crash = check_code(fenced("raise ValueError('boom')"), row)
    assert not crash.passed and crash.status == "error" and "boom" in crash.detail


@pytest.mark.parametrize(
    "exit_early", ["import sys\nsys.exit(0)", "import os\nos._exit(0)", "raise SystemExit", "quit()"]
)
def test_exiting_0_before_the_tests_does_not_pass(exit_early) -> None:
    """The classic reward hack: leave with status 0 before the asserts run."""
    assert run_python(exit_early).status == "ok"
    for row in (ADD_ROW, HUMANEVAL_ROW, MBPP_ROW):
        result = check_code(fenced(exit_early), row)
        assert (result.passed, result.status) == (False, "failed"), row


def test_setup_code_runs_before_the_solution() -> None:
    row = {"tests": ["assert pi_ish() == 3"], "setup": "import math"}
    assert check_code(fenced("def pi_ish():\n    return int(math.pi)"), row).passed
    assert not check_code(fenced("def pi_ish():\n    return int(math.pi)"), {"tests": row["tests"]}).passed


@pytest.mark.parametrize(
    ("row", "field"),
    [
        ({"prompt": "p"}, "no tests"),
        ({"tests": []}, "'tests'"),
        ({"tests": ["assert True", 3]}, "'tests'"),
        ({"tests": [{"input": "1"}]}, "'tests'[0]"),
        ({"test_list": "assert f() == 1"}, "'test_list'"),
        ({"prompt": "def f():\n", "test": "def check(c): pass", "entry_point": "f()"}, "'entry_point'"),
        ({"tests": ["assert True"], "setup": 5}, "'setup'"),
    ],
)
def test_bad_tests_name_the_field(row, field) -> None:
    with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("(", r"\(")):
        code_tests(row)


def test_code_reward_in_a_reward_set() -> None:
    rewards = RewardSet.parse("code=1.0,format=0.5")
    completions = [fenced("def add(a, b):\n    return a + b"), fenced("def add(a, b):\n    return 0"), "```python\n"]
    result = rewards.score(["p"] * 3, completions, [ADD_ROW] * 3)
    assert result.per_function["code"] == [1.0, 0.0, 0.0]
    assert result.per_function["format"] == [0.0, 0.0, 0.0]  # no \boxed{}: code answers do not use one
    assert code_reward(["p"], [completions[0]], [ADD_ROW]) == [1.0]
    with pytest.raises(ValueError, match="batch sizes differ"):
        code_reward(["p"], completions, [ADD_ROW])


def test_code_benchmark_files(tmp_path) -> None:
    for name, row in (("humaneval", HUMANEVAL_ROW), ("mbpp", MBPP_ROW), ("rows", ADD_ROW)):
        path = tmp_path / f"{name}.jsonl"
        path.write_text(json.dumps(row) + "\n")
        (problem,) = load_benchmark(path)
        assert problem.kind == "code"
        reference = fenced(problem.answer) if problem.answer else fenced("def add(a, b):\n    return b + a")
        assert grade(problem, reference).correct, name
        graded = grade(problem, fenced("pass"))
        assert (graded.correct, graded.answer, graded.status) == (False, "pass\n", "wrong")
    humaneval = load_benchmark(tmp_path / "humaneval.jsonl")[0]
    assert HUMANEVAL_ROW["prompt"] in humaneval.prompt and humaneval.answer.startswith("def double")
    assert humaneval.id == "HumanEval/0"  # the benchmark's own task_id names the problem in the records
    mbpp = load_benchmark(tmp_path / "mbpp.jsonl")[0]
    assert mbpp.prompt.startswith(MBPP_ROW["text"]) and MBPP_ROW["test_list"][1] in mbpp.prompt

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ADD_ROW) + "\n" + json.dumps({"prompt": "p", "tests": "assert 1"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl: line 2: field 'tests'"):
        load_benchmark(bad)


def test_eval_harness_on_a_code_file(tmp_path) -> None:
    from nanoseek.engine import Completion
    from nanoseek.eval.harness import CODE_INSTRUCTION, evaluate_checkpoint
    from nanoseek.tokenizer import Tokenizer

    tok = Tokenizer.train([HUMANEVAL_ROW["prompt"], MBPP_ROW["text"], CODE_INSTRUCTION] * 10, 300)
    answers = [fenced(HUMANEVAL_ROW["canonical_solution"]), fenced("    return []"), "I do not know"]

    class Scripted:  # answers every prompt with the three completions above, in turn
        def __init__(self) -> None:
            self.prompts: list[str] = []

        def generate(self, prompts, params):
            self.prompts += [tok.decode(p) for p in prompts]
            return [
                [Completion(list(p), [0] * 5, [], answers[j % 3], "stop", index=i, sample=j) for j in range(params.n)]
                for i, p in enumerate(prompts)
            ]

    path = tmp_path / "humaneval.jsonl"
    path.write_text(json.dumps(HUMANEVAL_ROW) + "\n")
    engine = Scripted()
    summary = evaluate_checkpoint(None, tok, [str(path)], tmp_path / "out", engine=engine, k=3, quiet=True, plots=False)
    assert CODE_INSTRUCTION in engine.prompts[0]
    bench = summary["benchmarks"]["humaneval"]
    assert bench["metrics"]["pass@1"] == pytest.approx(1 / 3) and bench["metrics"]["pass@3"] == 1.0
    grading = bench["grading"]
    assert (grading["correct"], grading["wrong"], grading["no_answer"]) == (1, 1, 1)


def test_rl_prompt_files_with_code_rows(tmp_path) -> None:
    from nanoseek.train.rollouts import check_rows_for_rewards, file_rows

    path = tmp_path / "code.jsonl"
    path.write_text(json.dumps(ADD_ROW) + "\n" + json.dumps(MBPP_ROW | {"prompt": MBPP_ROW["text"]}) + "\n")
    rows = file_rows(str(path))
    assert len(rows) == 2
    check_rows_for_rewards(RewardSet.parse("code"), rows, str(path))
    with pytest.raises(ValueError, match=r"code.jsonl: row 1 has no 'answer' field, which the reward 'math' needs"):
        check_rows_for_rewards(RewardSet.parse("math"), rows, str(path))
    with pytest.raises(ValueError, match="'task' field"):
        check_rows_for_rewards(RewardSet.parse("task"), rows, str(path))

    path.write_text(json.dumps({"prompt": "p", "tests": [1]}) + "\n")
    with pytest.raises(ValueError, match=r"code.jsonl:1: field 'tests'"):
        file_rows(str(path))
    path.write_text(json.dumps({"prompt": "p"}) + "\n")
    with pytest.raises(ValueError, match=r"code.jsonl:1: expected an 'answer'"):
        file_rows(str(path))


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two cores to run two programs side by side")
def test_programs_run_side_by_side() -> None:
    completions = [fenced("def add(a, b):\n    return a + b" if i % 3 else "while True: pass") for i in range(6)]
    t0 = time.monotonic()
    got = code_reward(["p"] * 6, completions, [ADD_ROW] * 6)
    assert got == [0.0, 1.0, 1.0, 0.0, 1.0, 1.0]
    assert time.monotonic() - t0 < 1.8 * ExecLimits().timeout_s  # the two endless loops time out together
