"""The built-in reward functions, and reward functions by name or import path.

Every reward function has one signature: `fn(prompts, completions, rows) -> list[float]`, where each
row is the dataset row of that sample (`answer` or tests, maybe `task`, `prompt`, `solution`, `meta`).
The built-ins that check answers (`math`, `task`, `code`) are `grade` with the kind fixed; `format`
checks the R1 response layout.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from nanoseek.answers import extract_boxed
from nanoseek.rewards.grading import grade_many
from nanoseek.rewards.loading import RewardLoadError, load_callable

__all__ = [
    "BUILTIN_REWARDS",
    "RewardFn",
    "check_batch",
    "code_reward",
    "format_reward",
    "load_reward_fn",
    "math_reward",
    "task_reward",
]

RewardFn = Callable[[list[str], list[str], list[dict]], list[float]]


def check_batch(prompts: Sequence[str], completions: Sequence[str], rows: Sequence[dict]) -> None:
    if not (len(prompts) == len(completions) == len(rows)):
        raise ValueError(
            f"batch sizes differ: {len(prompts)} prompts, {len(completions)} completions, {len(rows)} rows"
        )


def math_reward(prompts: list[str], completions: list[str], rows: list[dict]) -> list[float]:
    """1.0 when the extracted answer is math_equal to row["answer"], else 0.0."""
    check_batch(prompts, completions, rows)
    return [g.score for g in grade_many(rows, completions, kind="math")]


def task_reward(prompts: list[str], completions: list[str], rows: list[dict]) -> list[float]:
    """The reward of each row's own task verifier (`nanoseek.tasks.get_task(row["task"]).verify`)."""
    check_batch(prompts, completions, rows)
    return [g.score for g in grade_many(rows, completions, kind="task", prompts=prompts)]


def code_reward(prompts: list[str], completions: list[str], rows: list[dict]) -> list[float]:
    """1.0 when the completion's last Python code block passes every test of its row (run in a
    subprocess with limits: `nanoseek.rewards.code`), else 0.0."""
    check_batch(prompts, completions, rows)
    return [g.score for g in grade_many(rows, completions, kind="code")]


_THINK_FORMAT = re.compile(r"\A\s*<think>(?P<think>.*?)</think>(?P<answer>.*)\Z", re.DOTALL)


def _well_formed(prompt: str, completion: str) -> bool:
    text = completion
    # Chat templates in the R1 style end the prompt with "<think>": the completion starts inside it.
    if not text.lstrip().startswith("<think>") and prompt.rstrip().endswith("<think>"):
        text = "<think>" + text
    m = _THINK_FORMAT.match(text)
    if m is None:
        return False
    think, answer = m.group("think"), m.group("answer")
    if "<think>" in think or "<think>" in answer or "</think>" in answer or not think.strip():
        return False
    boxed = extract_boxed(answer)
    return boxed is not None and bool(boxed.strip())


def format_reward(prompts: list[str], completions: list[str], rows: list[dict]) -> list[float]:
    """1.0 for `<think>reasoning</think>` followed by an answer with a non-empty `\\boxed{}`, else 0.0.

    Exactly one think block, non-empty, first; the box must be after it. If the prompt ends with
    `<think>` (the template opened the block), the completion may start inside it.
    """
    check_batch(prompts, completions, rows)
    return [float(_well_formed(p, c)) for p, c in zip(prompts, completions)]


BUILTIN_REWARDS: dict[str, RewardFn] = {
    "math": math_reward,
    "format": format_reward,
    "task": task_reward,
    "code": code_reward,
}


def load_reward_fn(spec: str) -> RewardFn:
    """A built-in's name, or "pkg.module:function" / "path/to/file.py:function" resolved by `load_callable`.

    Errors are RewardLoadError with the spec and the reason.
    """
    if isinstance(spec, str) and spec.strip() in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec.strip()]
    try:
        return load_callable(spec, "reward function")
    except RewardLoadError as e:
        if isinstance(spec, str) and ":" not in spec and spec.strip():
            raise RewardLoadError(f"{e} (or one of the built-ins {sorted(BUILTIN_REWARDS)})") from None
        raise
