"""`reasoning_gym:DATASET`: a dataset of the `reasoning-gym` package as a one-turn environment.

reasoning-gym (PyPI, `pip install 'nanoseek[envs]'`) generates its problems procedurally, offline, from a
seed, and scores an answer with the dataset's own `score_answer`. `reset(seed)` draws that seed's problem;
the model answers in our format (`\\boxed{...}` after the reasoning; reasoning-gym's `<answer>` tags are read
too) and the score is what `score_answer` gives. The dataset's configuration fields (its difficulty) are the
knobs. The package is optional: without it, or for a dataset it does not have, one line says so.
"""

from __future__ import annotations

import dataclasses
import random
import re
from typing import Any, ClassVar

from nanoseek.answers import answer_region, extract_answer
from nanoseek.envs.base import Env, Message, StepResult, step_info
from nanoseek.errors import InputError, unknown

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_SIMPLE = (bool, int, float, str)


def _package() -> Any:
    try:
        import reasoning_gym
    except ImportError:
        raise InputError(
            "env reasoning_gym needs the reasoning-gym package: pip install 'nanoseek[envs]' (or reasoning-gym)"
        ) from None
    return reasoning_gym


def _config_defaults(config_cls: Any) -> dict[str, Any]:
    """The dataset's configuration fields with a plain default (numbers, strings, tuples of them): its knobs."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config_cls):
        default = f.default
        plain = isinstance(default, _SIMPLE) or (
            isinstance(default, tuple) and default and all(isinstance(v, _SIMPLE) for v in default)
        )
        if f.name not in ("seed", "size") and plain:
            out[f.name] = default
    return out


class ReasoningGymEnv(Env):
    name: ClassVar[str] = "reasoning_gym"
    description: ClassVar[str] = "a reasoning-gym dataset (reasoning_gym:DATASET; optional package), its own scoring"
    takes_arg: ClassVar[bool] = True
    policies: ClassVar[tuple[str, ...]] = ("random", "expert")
    defaults: ClassVar[dict[str, Any]] = {"max_turns": 1}  # + the dataset's configuration fields

    @staticmethod
    def arguments() -> list[str]:
        return sorted(_package().factory.DATASETS)

    def __init__(self, arg: str | None = None, **knobs: Any) -> None:
        rg = _package()
        names = self.arguments()
        if not arg:
            raise InputError(f"env reasoning_gym needs a dataset: reasoning_gym:DATASET, e.g. {', '.join(names[:5])}")
        if arg not in names:
            raise unknown("reasoning-gym dataset", arg, names)
        self.dataset = arg
        self._create = rg.create_dataset
        self.defaults = {**ReasoningGymEnv.defaults, **_config_defaults(rg.factory.DATASETS[arg][1])}
        super().__init__(**knobs)
        self.config = {k: v for k, v in self.knobs.items() if k != "max_turns"}
        try:
            self._data = self._create(arg, size=1, seed=0, **self.config)
        except (ValueError, AssertionError, TypeError) as e:  # its own config validation
            raise InputError(f"env reasoning_gym:{arg}: bad knobs {self.config}: {e}") from None
        self.entry: dict[str, Any] = {}
        self.reward = 0.0

    def _reset(self, seed: int) -> list[Message]:
        self._data = self._create(self.dataset, size=1, seed=seed, **self.config)
        self.entry = self._data[0]
        self.reward = 0.0
        prompt = self.entry["question"].rstrip() + "\n\nGive the final answer as \\boxed{ANSWER}."
        return [{"role": "user", "content": prompt}]

    def respond(self, text: str) -> StepResult:
        answer = read_answer(text)
        try:
            self.reward = float(self._data.score_answer(answer, self.entry)) if answer is not None else 0.0
        except Exception:  # a scorer that trips over an odd answer: that answer is wrong, not the run broken
            self.reward = 0.0
        self.reward = min(1.0, max(0.0, self.reward))
        return StepResult([], self.reward, True, step_info(invalid=answer is None))

    def score(self) -> float:
        return self.reward

    def act(self, policy: str, messages: list[Message], rng: random.Random) -> str:
        self.check_policy(policy)
        if policy == "expert":
            return f"\\boxed{{{self.entry.get('answer')}}}"
        words = re.findall(r"\w+", self.entry["question"]) or ["?"]
        return f"\\boxed{{{rng.choice(words)}}}"


def read_answer(text: str) -> str | None:
    """The answer in a completion: the boxed one (or a stated one) after the reasoning, else <answer> tags."""
    found = extract_answer(answer_region(text))
    if found is None:
        tags = _ANSWER_TAG.findall(text)
        found = tags[-1].strip() if tags else None
    return found
