"""Grade-school word problems from templates (shopping, change, sharing, ages, rates, ...).

Each template draws small integers (bounded by `max_value`) and builds the question backwards
so that the answer is an integer; names and items vary the wording. The canonical problem
(which decides train/test) is the template and its numbers, not the names: the same arithmetic
with other names never lands in the other split.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any, ClassVar

from nanoseek.tasks.base import Example, Task, format_solution

NAMES = [
    "Ava", "Ben", "Chloe", "Dan", "Ema", "Finn", "Grace", "Hugo", "Ines", "Jack", "Kira", "Leo",
    "Mia", "Noah", "Olga", "Pablo", "Rosa", "Sam", "Tara", "Umar", "Vera", "Wen", "Yuki", "Zoe",
]  # fmt: skip
ITEMS = ["apple", "pencil", "sticker", "marble", "cookie", "book", "card", "shell", "orange", "toy car"]
VEHICLES = ["car", "train", "bike", "boat", "bus"]

# A template returns (numbers that define the problem, prompt, steps, answer).
Template = Callable[[random.Random, int], tuple[tuple[int, ...], str, list[str], int]]


def _names(rng: random.Random, k: int) -> list[str]:
    return rng.sample(NAMES, k)


def shopping(rng: random.Random, m: int):
    name = _names(rng, 1)[0]
    item1, item2 = rng.sample(ITEMS, 2)
    n1, p1, n2, p2 = (rng.randint(2, m) for _ in range(4))
    prompt = (
        f"{name} buys {n1} {item1}s at {p1} dollars each and {n2} {item2}s at {p2} dollars each. "
        "How many dollars does " + name + " spend in total?"
    )
    steps = [f"{n1}*{p1}={n1 * p1}", f"{n2}*{p2}={n2 * p2}", f"{n1 * p1}+{n2 * p2}={n1 * p1 + n2 * p2}"]
    return (n1, p1, n2, p2), prompt, steps, n1 * p1 + n2 * p2


def change(rng: random.Random, m: int):
    name = _names(rng, 1)[0]
    item = rng.choice(ITEMS)
    n, p = rng.randint(2, m), rng.randint(2, m)
    bill = next(b for b in (10, 20, 50, 100, 200, 500, 1000, 10**9) if b > n * p)
    prompt = f"{name} buys {n} {item}s at {p} dollars each and pays with a {bill}-dollar bill. How much change?"
    steps = [f"{n}*{p}={n * p}", f"{bill}-{n * p}={bill - n * p}"]
    return (n, p, bill), prompt, steps, bill - n * p


def sharing(rng: random.Random, m: int):
    name = _names(rng, 1)[0]
    item = rng.choice(ITEMS)
    friends, each, kept = rng.randint(2, min(m, 12)), rng.randint(1, m), rng.randint(0, m)
    total = friends * each + kept
    prompt = (
        f"{name} has {total} {item}s, keeps {kept} and shares the rest equally among {friends} friends. "
        "How many does each friend get?"
    )
    steps = [f"{total}-{kept}={total - kept}", f"{total - kept}/{friends}={each}"]
    return (total, kept, friends), prompt, steps, each


def ages(rng: random.Random, m: int):
    older, younger = _names(rng, 2)
    age, gap, years = rng.randint(1, m), rng.randint(1, m), rng.randint(1, m)
    prompt = (
        f"{older} is {gap} years older than {younger}. {younger} is {age} years old. "
        f"How old will {older} be in {years} years?"
    )
    steps = [f"{age}+{gap}={age + gap}", f"{age + gap}+{years}={age + gap + years}"]
    return (age, gap, years), prompt, steps, age + gap + years


def rates(rng: random.Random, m: int):
    vehicle = rng.choice(VEHICLES)
    speed, hours = rng.randint(2, 5 * m), rng.randint(2, max(2, m // 2))
    prompt = f"A {vehicle} travels at {speed} km per hour for {hours} hours. How many km does it travel?"
    return (speed, hours), prompt, [f"{speed}*{hours}={speed * hours}"], speed * hours


def reading(rng: random.Random, m: int):
    name = _names(rng, 1)[0]
    per_day, days = rng.randint(2, 5 * m), rng.randint(2, m)
    pages = per_day * days
    prompt = f"{name} reads {per_day} pages a day. How many days does it take to read a {pages}-page book?"
    return (per_day, pages), prompt, [f"{pages}/{per_day}={days}"], days


def remaining(rng: random.Random, m: int):
    name, other = _names(rng, 2)
    item = rng.choice(ITEMS)
    had, gave, bought = rng.randint(2, 3 * m), rng.randint(1, m), rng.randint(1, m)
    had = max(had, gave)
    prompt = (
        f"{name} had {had} {item}s, gave {gave} to {other}, then bought {bought} more. "
        f"How many {item}s does {name} have now?"
    )
    steps = [f"{had}-{gave}={had - gave}", f"{had - gave}+{bought}={had - gave + bought}"]
    return (had, gave, bought), prompt, steps, had - gave + bought


TEMPLATES: dict[str, Template] = {
    "shopping": shopping,
    "change": change,
    "sharing": sharing,
    "ages": ages,
    "rates": rates,
    "reading": reading,
    "remaining": remaining,
}


class WordProblems(Task):
    name = "word_problems"
    description = "grade-school word problems (shopping, change, sharing, ages, rates, ...)"
    # max_value bounds the basic quantities; templates picks which templates to draw from.
    defaults: ClassVar[dict[str, Any]] = {"max_value": 12, "templates": tuple(TEMPLATES)}

    def sample(self, rng: random.Random, max_value: int, templates: tuple[str, ...]) -> Example:
        unknown = sorted(set(templates) - set(TEMPLATES))
        if unknown or not templates:
            raise ValueError(f"unknown word-problem templates {unknown}; known: {sorted(TEMPLATES)}")
        if max_value < 2:
            raise ValueError("max_value must be at least 2")
        template = rng.choice(list(templates))
        numbers, prompt, steps, answer = TEMPLATES[template](rng, max_value)
        return Example(
            task=self.name,
            prompt=prompt,
            answer=str(answer),
            solution=format_solution(steps, str(answer)),
            meta={"key": f"{template}:{numbers}", "template": template},
        )
