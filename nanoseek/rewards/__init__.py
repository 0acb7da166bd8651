"""Verifiable rewards: grading, reward functions and their containment.

RL on verifiable rewards lives or dies by the grader. The modules, one job each:

- `grading`: is a completion right for its row? By what the row carries: a task's verifier, the row's
  code tests, or math equivalence of the extracted answer (`nanoseek.answers`) with its `answer`.
- `mathcheck`: `math_equal`, math-verify (sympy) in worker processes with a time limit that works from
  any thread; trivially equal strings and plain integers are decided in-process.
- `code`: code answers run against the row's tests (MBPP, HumanEval or stdin/stdout cases).
- `sandbox`: `run_python`, each program its own process (forked from a small, clean server `_zygote.py`)
  with memory, CPU, output and time limits, in Linux namespaces where the machine allows them.
- `functions`: the built-in reward functions (`math`, `task`, `code`, `format`) and `load_reward_fn`.
- `reward_set`: `RewardSet`, weighted reward functions whose failures (raising, garbage, hanging) cost
  the affected samples 0, never the run.
- `loading`: a function named by import path; `workers`: persistent worker processes running one.

Every reward function has one signature: `fn(prompts, completions, rows) -> list[float]`.
"""

from nanoseek.answers import answer_region, extract_answer, extract_boxed, gsm8k_equal, parse_gsm8k_number
from nanoseek.rewards.code import check_code, code_tests, extract_code, has_code_tests
from nanoseek.rewards.functions import (
    BUILTIN_REWARDS,
    RewardFn,
    code_reward,
    format_reward,
    load_reward_fn,
    math_reward,
    task_reward,
)
from nanoseek.rewards.grading import Grade, grade, grade_many, row_kind
from nanoseek.rewards.loading import RewardLoadError
from nanoseek.rewards.mathcheck import (
    MathVerifyStats,
    configure_math_verify,
    math_equal,
    math_equal_many,
    math_outcome,
    math_verify_stats,
    reset_math_verify_stats,
)
from nanoseek.rewards.reward_set import RewardResult, RewardSet, RewardTerm
from nanoseek.rewards.workers import shutdown_workers

__all__ = [
    "BUILTIN_REWARDS",
    "Grade",
    "MathVerifyStats",
    "RewardFn",
    "RewardLoadError",
    "RewardResult",
    "RewardSet",
    "RewardTerm",
    "answer_region",
    "check_code",
    "code_reward",
    "code_tests",
    "configure_math_verify",
    "extract_answer",
    "extract_boxed",
    "extract_code",
    "format_reward",
    "grade",
    "grade_many",
    "gsm8k_equal",
    "has_code_tests",
    "load_reward_fn",
    "math_equal",
    "math_equal_many",
    "math_outcome",
    "math_reward",
    "math_verify_stats",
    "parse_gsm8k_number",
    "reset_math_verify_stats",
    "row_kind",
    "shutdown_workers",
    "task_reward",
]
