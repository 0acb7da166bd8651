"""pass@k, cons@k and summaries, checked against brute-force enumeration, exact arithmetic and numpy."""

from __future__ import annotations

import itertools
import math
import random
from fractions import Fraction

import numpy as np
import pytest

from nanoseek.eval.metrics import ProblemResult, answer_key, majority_vote, pass_at_k, summarize


def brute_pass_at_k(n: int, c: int, k: int) -> float:
    """Fraction of all k-subsets of n samples (c of them correct) that contain a correct one."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_equals_enumeration_over_all_subsets() -> None:
    checked = 0
    for n in range(1, 11):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12), (n, c, k)
                checked += 1
    assert checked == sum(n * (n + 1) for n in range(1, 11))


def test_pass_at_k_is_stable_for_large_n() -> None:
    """For n in the thousands the binomials overflow floats; compare with exact rational arithmetic."""
    for n, c, k in [(1000, 3, 100), (5000, 1, 1), (2000, 1000, 64), (10000, 2, 9999), (4096, 0, 1000)]:
        exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
        assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-9, abs=1e-12)


def test_pass_at_1_is_the_fraction_correct() -> None:
    for n in range(1, 30):
        for c in range(n + 1):
            assert pass_at_k(n, c, 1) == pytest.approx(c / n)


@pytest.mark.parametrize(("n", "c", "k"), [(0, 0, 1), (5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)])
def test_pass_at_k_rejects_impossible_arguments(n: int, c: int, k: int) -> None:
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_majority_vote_picks_the_most_frequent_answer() -> None:
    assert majority_vote(["1", "2", "2"], [True, False, False]) is False
    assert majority_vote(["2", "1", "1"], [False, True, True]) is True
    assert majority_vote([" 7", "7 ", "8"], [True, True, False]) is True  # default key strips


def test_majority_vote_counts_equal_numbers_as_one_answer() -> None:
    # 0.5 four ways against 0.4 twice: 0.5 wins only if its forms vote together.
    forms = ["0.4", "1/2", "0.4", "\\frac{1}{2}", "$0.50", "0.5"]
    assert majority_vote(forms, [x != "0.4" for x in forms]) is True
    assert majority_vote(["1,000", "999", "1000", "999"], [True, False, True, False]) is True
    assert majority_vote(["x + 1", "2", "x+1"], [True, False, True]) is True  # whitespace never matters
    # Not numbers, so kept apart from the numbers they start with.
    assert majority_vote(["2\\pi", "2", "2\\pi", "2", "2"], [True, False, True, False, False]) is False
    assert answer_key("-\\dfrac{3}{4}") == Fraction(-3, 4) and answer_key("4x") == "4x"


def test_majority_vote_ties_go_to_the_first_seen() -> None:
    assert majority_vote(["a", "b", "b", "a"], [True, False, False, True]) is True
    assert majority_vote(["b", "a", "a", "b"], [False, True, True, False]) is False
    assert majority_vote(["x", "y", "z"], [False, True, True]) is False


def test_majority_vote_none_never_wins_unless_all_none() -> None:
    assert majority_vote([None, None, None, "5"], [False, False, False, True]) is True
    assert majority_vote([None, None], [False, False]) is False
    with pytest.raises(ValueError):
        majority_vote(["1"], [True, False])


def test_majority_vote_with_another_key() -> None:
    answers = ["1/2", "0.5", "3", "3"]
    assert majority_vote(answers, [True, True, False, False], key=str) is False  # by string: "3" wins
    assert majority_vote(answers, [True, True, False, False]) is True  # by value 1/2 == 0.5: tie, first wins


def brute_majority(answers: list[str | None], correct: list[bool]) -> bool:
    """Reference: count every non-None answer, earliest index among the most frequent."""
    real = [(a.strip(), i) for i, a in enumerate(answers) if a is not None]
    if not real:
        return correct[0]
    counts = {a: sum(1 for b, _ in real if b == a) for a, _ in real}
    best = max(counts.values())
    first = min(i for a, i in real if counts[a] == best)
    return correct[first]


def test_majority_vote_matches_a_reference_on_random_votes() -> None:
    rng = random.Random(0)
    for _ in range(500):
        k = rng.randint(1, 8)
        answers = [rng.choice(["1", "2", "3", None]) for _ in range(k)]
        correct = [a == "2" for a in answers]
        assert majority_vote(answers, correct) == brute_majority(answers, correct)


def test_summarize_against_numpy_and_enumeration() -> None:
    rng = random.Random(3)
    n, P = 6, 40
    problems = []
    for p in range(P):
        answers = [rng.choice(["a", "b", "c", None]) for _ in range(n)]
        correct = [a == "a" for a in answers]
        problems.append(ProblemResult(f"p{p}", correct, answers))
    out = summarize(problems, ks=[1, 2, 4, 6, 8])
    assert out["problems"] == P and out["samples"] == n
    assert "pass@8" not in out and "cons@8" not in out  # k > n is left out

    def mean_se(values: list[float]) -> tuple[float, float]:
        arr = np.asarray(values, dtype=np.float64)
        return float(arr.mean()), float(arr.std(ddof=1) / np.sqrt(len(arr)))

    c = [sum(p.correct) for p in problems]
    expected = {"pass@1": mean_se([ci / n for ci in c])}
    for k in (2, 4, 6):
        expected[f"pass@{k}"] = mean_se([brute_pass_at_k(n, ci, k) for ci in c])
    for k in (1, 2, 4, 6):
        expected[f"cons@{k}"] = mean_se([float(brute_majority(p.answers[:k], p.correct[:k])) for p in problems])
    for name, (mean, se) in expected.items():
        assert out[name] == pytest.approx(mean, abs=1e-12), name
        assert out[f"{name}_se"] == pytest.approx(se, abs=1e-12), name
    assert 0 < out["pass@1"] < out["pass@2"] < out["pass@4"] < out["pass@6"] <= 1


def test_summarize_edge_cases() -> None:
    one = summarize([ProblemResult("p", [True, False])], ks=[1, 2])
    assert one["pass@1"] == 0.5 and one["pass@2"] == 1.0
    assert math.isnan(one["pass@1_se"])  # one problem: no spread to measure
    assert "cons@2" not in one  # no extracted answers given
    mixed = summarize([ProblemResult("a", [True] * 4), ProblemResult("b", [False] * 2)], ks=[2, 4])
    assert mixed["samples"] == 2 and "pass@4" not in mixed and mixed["pass@2"] == 0.5
    with pytest.raises(ValueError):
        summarize([], ks=[1])
    with pytest.raises(ValueError):
        ProblemResult("bad", [True, False], ["1"])
