"""Verifiable tasks: seeded problem generators with worked solutions and exact verifiers.

    from nanoseek.tasks import get_task
    task = get_task("countdown")
    examples = task.generate(100, split="train", seed=0, max_numbers=3)
    reward = task.verify(completion_text, examples[0])        # 1.0 or 0.0

Adding a task takes one file. Subclass `Task`, set `name` and `defaults` (the difficulty knobs,
which `nanoseek data make --set knob=value` can change), implement `sample(rng, **knobs)` (return an
`Example` whose `meta["key"]` is the canonical problem: it decides the train/test split), override
`verify` if the answer is not a number, and register an instance:

    # nanoseek/tasks/parity.py
    from nanoseek.tasks.base import Example, Task, format_solution
    from nanoseek.tasks import register

    class Parity(Task):
        name = "parity"
        defaults = {"bits": 8}

        def sample(self, rng, bits):
            s = "".join(rng.choice("01") for _ in range(bits))
            answer = str(s.count("1") % 2)
            return Example(self.name, f"Parity of {s}?", answer,
                           format_solution(f"{s.count('1')} ones", answer), {"key": s})

    register(Parity())

Registration happens when the module is imported: import it above and add it to `_register_builtin`
below to make it built in (then `get_task("parity")`, the corpus mixture and the CLI see it), or import it yourself.
"""

from __future__ import annotations

from nanoseek.tasks.arithmetic import Arithmetic
from nanoseek.tasks.base import Example, Task, extract_boxed, final_answer, format_solution, parse_number
from nanoseek.tasks.countdown import Countdown
from nanoseek.tasks.linear_equation import LinearEquation
from nanoseek.tasks.word_problems import WordProblems

TASKS: dict[str, Task] = {}


def register(task: Task) -> Task:
    """Add a task instance to the registry under `task.name` (an error if the name is taken)."""
    if not task.name:
        raise ValueError(f"{type(task).__name__} has no name")
    if task.name in TASKS and type(TASKS[task.name]) is not type(task):
        raise ValueError(f"a different task is already registered as {task.name!r}")
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    """The registered task called `name`; a ValueError listing the known names otherwise."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(list_tasks())}")
    return TASKS[name]


def list_tasks() -> list[str]:
    return sorted(TASKS)


def _register_builtin() -> None:
    for task in (Arithmetic(), Countdown(), LinearEquation(), WordProblems()):
        register(task)


_register_builtin()

__all__ = [
    "TASKS",
    "Example",
    "Task",
    "extract_boxed",
    "final_answer",
    "format_solution",
    "get_task",
    "list_tasks",
    "parse_number",
    "register",
]
