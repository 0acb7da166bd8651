"""`task:NAME`: a built-in single-turn task as a one-turn environment, graded by the tasks' own verifier.

One rollout path for everything: an RL step over tasks is an RL step over one-turn episodes. `reset(seed)`
draws the task's first problem of that seed (train split unless the `split` knob says test) and keeps it
as `env.row`, the same row `nanoseek data make` writes and RL's reward functions score; `step` grades the
answer with `rewards.grading.grade(row, text)` and ends the episode.
"""

from __future__ import annotations

import random
from typing import Any, ClassVar

from nanoseek.envs.base import Env, Message, StepResult, step_info
from nanoseek.errors import InputError, unknown
from nanoseek.rewards.grading import grade
from nanoseek.tasks import get_task, list_tasks
from nanoseek.tasks.base import format_solution


class TaskEnv(Env):
    name: ClassVar[str] = "task"
    description: ClassVar[str] = "a built-in single-turn task (task:NAME), graded by its verifier"
    takes_arg: ClassVar[bool] = True
    policies: ClassVar[tuple[str, ...]] = ("random", "expert")
    defaults: ClassVar[dict[str, Any]] = {"split": "train", "max_turns": 1}  # + the task's difficulty knobs
    inline: ClassVar[bool] = True  # the tasks' verifiers are plain Python with bounded work

    @staticmethod
    def arguments() -> list[str]:
        return list_tasks()

    def __init__(self, arg: str | None = None, **knobs: Any) -> None:
        if not arg:
            raise InputError(f"env task needs a task name: task:NAME with NAME one of {', '.join(list_tasks())}")
        if arg not in list_tasks():
            raise unknown("task", arg, list_tasks())
        self.task = get_task(arg)
        # instance defaults: the task's difficulty knobs, the split, one turn
        self.defaults = {**TaskEnv.defaults, **self.task.defaults}
        super().__init__(**knobs)
        if self.split not in ("train", "test"):
            raise InputError(f"env task:{arg}: knob split must be train or test, got {self.split!r}")
        self.difficulty = {k: v for k, v in self.knobs.items() if k in self.task.defaults}
        self.row: dict[str, Any] = {}
        self.reward = 0.0

    def _reset(self, seed: int) -> list[Message]:
        example = self.task.generate(1, split=self.split, seed=seed, **self.difficulty)[0]
        self.row = {
            "task": example.task,
            "prompt": example.prompt,
            "answer": example.answer,
            "solution": example.solution,
            "meta": example.meta,
        }
        self.reward = 0.0
        return [{"role": "user", "content": example.prompt}]

    def respond(self, text: str) -> StepResult:
        self.reward = grade(self.row, text).score
        return StepResult([], self.reward, True, step_info())

    def score(self) -> float:
        return self.reward

    def act(self, policy: str, messages: list[Message], rng: random.Random) -> str:
        self.check_policy(policy)
        if policy == "expert":
            return self.row["solution"]
        guess = str(rng.randint(-99, 999))  # the right form, a number drawn blindly
        return format_solution("a guess", guess)


__all__ = ["TaskEnv"]
