"""`guess_number`: find a hidden integer in [1, n] from "higher"/"lower" replies within `max_turns` guesses.

The smallest multi-turn problem where the turns matter: each reply halves what is left only for a player
that uses it, so binary search (the `expert`, ceil(log2(n + 1)) guesses at most) wins where guessing blindly
(`random`) rarely does. The expert's `noise` knob makes it guess anywhere in the range still possible with
that probability, for SFT transcripts that are good but not perfect. Reward 1 when the number is found.

A turn's guess is the last integer after the reasoning (`</think>`); a turn without one is answered with a
reminder and counts as a turn (flagged `invalid`).
"""

from __future__ import annotations

import itertools
import random
import re
from typing import Any, ClassVar

from nanoseek.answers import answer_region
from nanoseek.envs.base import Env, Message, StepResult, step_info
from nanoseek.errors import InputError

_INTEGER = re.compile(r"-?\d+")
HIGHER, LOWER = "higher", "lower"


def read_guess(text: str) -> int | None:
    """The guess in an assistant turn: the last integer after the reasoning, or None."""
    numbers = _INTEGER.findall(answer_region(text))
    return int(numbers[-1]) if numbers and len(numbers[-1].lstrip("-")) <= 12 else None


def feasible_range(n: int, messages: list[Message]) -> tuple[int, int]:
    """The numbers still possible after the conversation's guesses and replies: (low, high)."""
    low, high = 1, n
    for turn, reply in itertools.pairwise(messages):
        if turn["role"] != "assistant" or reply["role"] != "user":
            continue
        guess = read_guess(turn["content"])
        if guess is None:
            continue
        if reply["content"].startswith(HIGHER):
            low = max(low, guess + 1)
        elif reply["content"].startswith(LOWER):
            high = min(high, guess - 1)
    return low, max(low, high)


class GuessNumber(Env):
    name: ClassVar[str] = "guess_number"
    description: ClassVar[str] = "find a hidden integer in [1, n] from higher/lower replies (expert: binary search)"
    defaults: ClassVar[dict[str, Any]] = {"n": 100, "max_turns": 10, "noise": 0.0}
    policies: ClassVar[tuple[str, ...]] = ("random", "expert")

    n: int
    noise: float

    def __init__(self, **knobs: Any) -> None:
        super().__init__(**knobs)
        if self.n < 1:
            raise InputError(f"env guess_number: knob n must be at least 1, got {self.n}")
        if not 0.0 <= self.noise <= 1.0:
            raise InputError(f"env guess_number: knob noise must be in [0, 1], got {self.noise}")
        self.secret = 0
        self.found = False

    def _reset(self, seed: int) -> list[Message]:
        self.secret = random.Random(f"guess_number:{self.n}:{seed}").randint(1, self.n)
        self.found = False
        prompt = (
            f"I am thinking of an integer from 1 to {self.n}. Guess it in at most {self.max_turns} guesses: "
            f"reply with one number, and I will say {HIGHER} or {LOWER}."
        )
        return [{"role": "user", "content": prompt}]

    def respond(self, text: str) -> StepResult:
        guess = read_guess(text)
        if guess is None:
            reply = f"Reply with one integer from 1 to {self.n}."
            return StepResult([{"role": "user", "content": reply}], 0.0, False, step_info(invalid=True))
        if guess == self.secret:
            self.found = True
            return StepResult([], 1.0, True, step_info())
        reply = HIGHER if self.secret > guess else LOWER
        return StepResult([{"role": "user", "content": reply}], 0.0, False, step_info())

    def score(self) -> float:
        return float(self.found)

    def act(self, policy: str, messages: list[Message], rng: random.Random) -> str:
        self.check_policy(policy)
        if policy == "random":
            return str(rng.randint(1, self.n))
        low, high = feasible_range(self.n, messages)
        guess = rng.randint(low, high) if rng.random() < self.noise else (low + high) // 2
        return f"<think>\n{low} to {high}\n</think>\n{guess}"
