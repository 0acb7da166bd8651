"""Sampling metrics for evaluation: pass@k, cons@k (majority vote) and their standard errors.

With n samples per problem of which c are correct, pass@k is estimated without bias by
1 - C(n-c, k) / C(n, k) (the chance that a random k-subset of the n samples holds a correct one;
Chen et al. 2021). The binomials overflow floats for large n, so we use the product form
1 - prod_{i=n-c+1}^{n} (1 - k/i), which only multiplies numbers in [0, 1].

Standard errors are over problems: the per-problem estimates are the data, the sample std (ddof=1)
divided by sqrt(P) says how much the mean would move with another draw of P problems. The noise of
the n samples within a problem is not included (with n >= 4 it is much smaller).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from nanoseek.answers import parse_number

__all__ = ["ProblemResult", "answer_key", "majority_vote", "pass_at_k", "summarize"]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of the chance that at least one of k samples is correct, from c of n correct."""
    if not (isinstance(n, int) and isinstance(c, int) and isinstance(k, int)):
        raise TypeError(f"pass_at_k needs integers, got n={n!r}, c={c!r}, k={k!r}")
    if n < 1 or not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs n >= 1, 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def answer_key(answer: str) -> object:
    """What two answers must share to vote together: the exact value when the answer is a number
    ("0.5", "1/2", "\\frac{1}{2}" and "$0.50" are one vote), else the text without whitespace."""
    value = parse_number(answer)
    return value if value is not None else "".join(answer.split())


def majority_vote(
    answers: Sequence[str | None],
    correct: Sequence[bool],
    key: Callable[[str], object] = answer_key,
) -> bool:
    """cons@k for one problem: is the most frequent extracted answer a correct one?

    Answers are grouped by `key(answer)` (default `answer_key`: numbers by value, other answers by
    their text without whitespace; pass a stronger key for symbolic answers). None (no answer) never
    wins unless every answer is None. Ties go to the group seen first. A group's correctness is
    that of its first member.
    """
    if len(answers) != len(correct):
        raise ValueError(f"{len(answers)} answers but {len(correct)} correctness flags")
    if not answers:
        raise ValueError("majority_vote needs at least one answer")
    counts: dict[object, int] = {}
    first_index: dict[object, int] = {}
    for i, answer in enumerate(answers):
        if answer is None:
            continue
        group = key(answer)
        counts[group] = counts.get(group, 0) + 1
        first_index.setdefault(group, i)
    if not counts:  # all None: the "no answer" group wins by default
        return bool(correct[0])
    # dicts keep insertion order = first-occurrence order, and max() returns the first maximum
    winner = max(counts, key=lambda g: counts[g])
    return bool(correct[first_index[winner]])


@dataclass
class ProblemResult:
    """The n graded samples of one problem: correctness and the extracted answers, in sample order."""

    id: str
    correct: list[bool]
    answers: list[str | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.answers and len(self.answers) != len(self.correct):
            raise ValueError(f"problem {self.id}: {len(self.correct)} correctness flags, {len(self.answers)} answers")

    @property
    def n(self) -> int:
        return len(self.correct)

    @property
    def c(self) -> int:
        return sum(bool(x) for x in self.correct)


def _mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean and std/sqrt(P) with the sample std (ddof=1); the error is nan for a single problem."""
    p = len(values)
    mean = math.fsum(values) / p
    if p < 2:
        return mean, math.nan
    var = math.fsum((v - mean) ** 2 for v in values) / (p - 1)
    return mean, math.sqrt(var / p)


def summarize(
    per_problem: Sequence[ProblemResult],
    ks: Sequence[int] = (1,),
    key: Callable[[str], object] = answer_key,
) -> dict[str, float | int]:
    """pass@1, pass@k and cons@k averaged over problems, each with its standard error ("<metric>_se").

    pass@1 is the mean fraction of correct samples (all n of them). pass@k uses the unbiased
    estimator over all n samples. cons@k is the majority vote of the FIRST k samples (it needs
    extracted answers). A k larger than the smallest n is left out (every problem must contribute).
    Returns a flat dict, e.g. {"problems": 500, "samples": 8, "pass@1": .., "pass@1_se": ..,
    "pass@8": .., "pass@8_se": .., "cons@8": .., "cons@8_se": ..}.
    """
    if not per_problem:
        raise ValueError("summarize needs at least one problem")
    n_min = min(p.n for p in per_problem)
    if n_min < 1:
        bad = next(p.id for p in per_problem if p.n < 1)
        raise ValueError(f"problem {bad} has no samples")
    out: dict[str, float | int] = {"problems": len(per_problem), "samples": n_min}

    mean, se = _mean_and_stderr([p.c / p.n for p in per_problem])
    out["pass@1"], out["pass@1_se"] = mean, se
    for k in sorted(set(ks)):
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if k > n_min:
            continue
        if k > 1:
            mean, se = _mean_and_stderr([pass_at_k(p.n, p.c, k) for p in per_problem])
            out[f"pass@{k}"], out[f"pass@{k}_se"] = mean, se
        if all(p.answers for p in per_problem):
            votes = [float(majority_vote(p.answers[:k], p.correct[:k], key)) for p in per_problem]
            mean, se = _mean_and_stderr(votes)
            out[f"cons@{k}"], out[f"cons@{k}_se"] = mean, se
    return out
