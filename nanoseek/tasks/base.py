"""What a verifiable task is: a seeded problem generator with a worked solution, and a verifier.

RL with verifiable rewards needs problems whose answers a program can check exactly; SFT and
pretraining need the same problems with a worked solution. A `Task` provides both:

- `generate(n, split, seed, **difficulty)` draws problems from a seeded RNG. Train and test are
  disjoint by construction: a stable hash (sha256) of the task name and the *canonical problem*
  (e.g. "47+38", or the sorted numbers and target of a countdown) puts each problem in exactly one
  split (`test_fraction` of them in test), and the generator rejects problems of the other split.
  The same problem worded differently (other names, other order) therefore never crosses splits.
- `verify(completion, example)` returns a reward in [0, 1]; ours are exact (1.0 or 0.0).

An `Example.solution` is the full assistant response used for SFT:
`<think>\\n...worked steps...\\n</think>\\n\\boxed{ANSWER}`.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from nanoseek.answers import answer_region, extract_boxed, parse_number
from nanoseek.values import parse_value


@dataclass
class Example:
    """One problem: the prompt the model sees, the gold answer, and the full gold response."""

    task: str
    prompt: str
    answer: str
    solution: str
    meta: dict[str, Any] = field(default_factory=dict)

    def messages(self) -> list[dict[str, str]]:
        """The SFT conversation: the prompt as the user turn, the solution as the assistant turn."""
        return [{"role": "user", "content": self.prompt}, {"role": "assistant", "content": self.solution}]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> Example:
        return cls(row["task"], row["prompt"], row["answer"], row["solution"], dict(row.get("meta") or {}))


def format_solution(steps: list[str] | str, answer: str) -> str:
    """The one response format every task uses: reasoning inside <think>, then the boxed answer."""
    body = steps if isinstance(steps, str) else "\n".join(steps)
    return f"<think>\n{body}\n</think>\n\\boxed{{{answer}}}"


def final_answer(completion: str) -> str | None:
    """The boxed answer after the reasoning: the last `\\boxed{}` after the last `</think>` (if any).

    `extract_boxed` is the graders' own (`nanoseek.answers`): if the last box is cut off
    (never closes) there is no answer, rather than an earlier box.
    """
    return extract_boxed(answer_region(completion))


def stable_unit(key: str) -> float:
    """A number in [0, 1) from sha256 of `key`: the same on every machine and Python run."""
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:16], 16) / 16**16


class Task:
    """Base class. A subclass sets `name` and `defaults` (difficulty knobs), implements `sample`.

    `sample(rng, **difficulty)` returns one Example whose `meta["key"]` is the canonical problem
    (what decides the split). `verify` by default compares the boxed answer numerically.
    """

    name: str = ""
    description: str = ""
    defaults: ClassVar[dict[str, Any]] = {}
    test_fraction: float = 0.1

    def sample(self, rng: random.Random, **difficulty: Any) -> Example:
        raise NotImplementedError

    def split_of(self, key: str) -> str:
        """The split of a canonical problem: "test" for about `test_fraction` of them, else "train"."""
        return "test" if stable_unit(f"{self.name}|{key}") < self.test_fraction else "train"

    def difficulty(self, **overrides: Any) -> dict[str, Any]:
        """The defaults with `overrides` applied; unknown knobs are an error that lists the known ones."""
        unknown = sorted(set(overrides) - set(self.defaults))
        if unknown:
            raise ValueError(f"task {self.name!r} has no difficulty knob {unknown}; known: {sorted(self.defaults)}")
        return {**self.defaults, **overrides}

    def generate(
        self, n: int, split: str = "train", seed: int = 0, *, unique: bool = False, **difficulty: Any
    ) -> list[Example]:
        """`n` examples of one split, from a RNG seeded by (task, split, seed).

        The first k examples do not depend on n. With `unique=True` no canonical problem repeats
        (useful for test sets; an error if the difficulty setting does not have n problems).
        """
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', not {split!r}")
        knobs = self.difficulty(**difficulty)
        rng = random.Random(f"{self.name}:{split}:{seed}")
        out: list[Example] = []
        seen: set[str] = set()
        attempts = 0
        budget = 1000 + 200 * n
        while len(out) < n:
            attempts += 1
            if attempts > budget:
                raise ValueError(
                    f"task {self.name!r}: found only {len(out)} of {n} {'unique ' if unique else ''}{split} "
                    f"problems in {budget} tries with {knobs}; make the problems harder or n smaller"
                )
            example = self.sample(rng, **knobs)
            key = example.meta["key"]
            if self.split_of(key) != split or (unique and key in seen):
                continue
            seen.add(key)
            example.meta["split"] = split
            out.append(example)
        return out

    def verify(self, completion: str, example: Example) -> float:
        """1.0 if the final boxed answer equals the gold answer as a number, else 0.0."""
        got = parse_number(final_answer(completion))
        want = parse_number(example.answer)
        return float(got is not None and got == want)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, defaults={self.defaults})"


def coerce_knobs(task: Task, settings: dict[str, Any]) -> dict[str, Any]:
    """Command-line strings ("digits=3", "ops=+,-") as the types of the task's defaults."""
    out: dict[str, Any] = {}
    for name, raw in settings.items():
        if name not in task.defaults:
            raise ValueError(f"task {task.name!r} has no difficulty knob {name!r}; known: {sorted(task.defaults)}")
        default = task.defaults[name]
        kind = tuple[type(default[0]) if default else str, ...] if isinstance(default, tuple) else type(default)
        out[name] = parse_value(raw, kind, f"{task.name}.{name}")
    return out
