"""Small reward functions that misbehave on purpose, for the containment tests in test_rewards.py.

They are loaded by file path ("tests/reward_fixtures.py:name") so that the worker process can
re-import them whatever sys.path pytest set up.
"""

from __future__ import annotations

import math
import sys
import time


def length_reward(prompts: list[str], completions: list[str], rows: list[dict]) -> list[float]:
    """A well-behaved reward: the completion's length. Prints, to show stdout cannot break the worker."""
    print("length_reward called with", len(completions), "completions")
    sys.stdout.flush()
    return [float(len(c)) for c in completions]


def raise_always(prompts: list[str], completions: list[str], rows: list[dict]) -> list[float]:
    raise RuntimeError("this reward function always fails")


def raise_on_bad(prompts: list[str], completions: list[str], rows: list[dict]) -> list[float]:
    """1.0 per sample, but raises for any batch holding a completion that contains BAD."""
    for c in completions:
        if "BAD" in c:
            raise KeyError(c)
    return [1.0] * len(completions)


def hang_on_hang(prompts: list[str], completions: list[str], rows: list[dict]) -> list[float]:
    """Busy-loops forever (holding the CPU, not sleeping) when a completion contains HANG."""
    if any("HANG" in c for c in completions):
        x = 0
        while True:
            x += 1
    return [0.5] * len(completions)


def sleep_forever(prompts: list[str], completions: list[str], rows: list[dict]) -> list[float]:
    time.sleep(3600)
    return [0.0] * len(completions)


def wrong_length(prompts: list[str], completions: list[str], rows: list[dict]) -> list[float]:
    return [1.0] * (len(completions) + 1)


def not_numbers(prompts: list[str], completions: list[str], rows: list[dict]) -> list[str]:
    return ["yes"] * len(completions)


def nan_first(prompts: list[str], completions: list[str], rows: list[dict]) -> list[float]:
    return [math.nan] + [2.0] * (len(completions) - 1)


def exits(prompts: list[str], completions: list[str], rows: list[dict]) -> list[float]:
    """Kills its own process, like a segfault in an extension would."""
    import os

    os._exit(3)


NOT_CALLABLE = 42
