"""Evaluation: benchmark loading and grading (benchmarks) and sampling metrics (metrics).

from nanoseek.eval import load_benchmark, grade, ProblemResult, summarize
problems = load_benchmark("math500_test.jsonl")
ok, answer = grade(problems[0], completion)
"""

from nanoseek.eval.benchmarks import Problem, ProblemSet, grade, grade_many, load_benchmark
from nanoseek.eval.metrics import ProblemResult, majority_vote, pass_at_k, summarize

__all__ = [
    "Problem",
    "ProblemResult",
    "ProblemSet",
    "grade",
    "grade_many",
    "load_benchmark",
    "majority_vote",
    "pass_at_k",
    "summarize",
]
