"""Reward functions for the RL tests (test_rl.py), loaded by file path ("tests/rl_reward_fixtures.py:name").

By path, RewardSet runs them isolated in a worker process (with a time limit), which re-imports
this file whatever sys.path pytest set up. Each has the reward signature fn(prompts, completions, rows).
"""

from __future__ import annotations

import time


def char_code_reward(prompts: list[str], completions: list[str], rows: list[dict]) -> list[float]:
    """A deterministic reward that varies with the text (sum of character codes mod 7, over 6), so
    that the groups of a random-weight model carry a learning signal."""
    return [(sum(map(ord, c)) % 7) / 6 for c in completions]


def has_a(prompts: list[str], completions: list[str], rows: list[dict]) -> list[float]:
    """1.0 when the completion contains the letter 'a', else 0.0."""
    return [float("a" in c) for c in completions]


def raise_on_bad(prompts: list[str], completions: list[str], rows: list[dict]) -> list[float]:
    """0.5 per sample, but raises for any batch holding a completion that contains BAD."""
    for c in completions:
        if "BAD" in c:
            raise RuntimeError(f"cannot grade {c!r}")
    return [0.5] * len(completions)


def sleep_on_hang(prompts: list[str], completions: list[str], rows: list[dict]) -> list[float]:
    """0.25 per sample, but sleeps (far past any test's time limit) when a completion contains HANG."""
    if any("HANG" in c for c in completions):
        time.sleep(3600)
    return [0.25] * len(completions)


def always_raises(prompts: list[str], completions: list[str], rows: list[dict]) -> list[float]:
    raise ValueError("this reward function always fails")
