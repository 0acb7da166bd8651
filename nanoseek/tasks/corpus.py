"""The built-in corpus: a mixture of all registered tasks, as examples, plain text or conversations.

This is what the CPU default pipeline trains on when no data is given: the tokenizer and the
tiny pretraining run see `pretrain_texts`, SFT sees `sft_conversations`, RL and eval draw
`task_mixture(split="test")` problems that no training text contains.
"""

from __future__ import annotations

import random
from typing import Any

from nanoseek.tasks import get_task, list_tasks
from nanoseek.tasks.base import Example


def _allocate(n: int, weights: dict[str, float]) -> dict[str, int]:
    """Split n into integer counts proportional to weights (largest remainder, ties by name)."""
    total = sum(weights.values())
    if total <= 0 or any(w < 0 for w in weights.values()):
        raise ValueError(f"weights must be non-negative with a positive sum, got {weights}")
    exact = {name: n * w / total for name, w in weights.items()}
    counts = {name: int(v) for name, v in exact.items()}
    by_remainder = sorted(exact, key=lambda name: (-(exact[name] - counts[name]), name))
    for name in by_remainder[: n - sum(counts.values())]:
        counts[name] += 1
    return counts


def task_mixture(
    n: int,
    split: str = "train",
    seed: int = 0,
    weights: dict[str, float] | None = None,
    difficulty: dict[str, dict[str, Any]] | None = None,
) -> list[Example]:
    """n examples drawn from several tasks, shuffled.

    weights: task name -> relative weight (default: every registered task equally);
    difficulty: task name -> difficulty knobs for that task (default: the task's defaults).
    """
    weights = dict(weights) if weights is not None else dict.fromkeys(list_tasks(), 1.0)
    difficulty = difficulty or {}
    for name in [*weights, *difficulty]:
        get_task(name)  # a clear error for a misspelt task
    examples: list[Example] = []
    for name, count in _allocate(n, weights).items():
        if count:
            examples += get_task(name).generate(count, split=split, seed=seed, **difficulty.get(name, {}))
    random.Random(f"mixture:{split}:{seed}").shuffle(examples)
    return examples


def example_text(example: Example) -> str:
    """A pretraining document: the question, a newline, the worked solution."""
    return f"{example.prompt}\n{example.solution}"


def pretrain_texts(n: int, seed: int = 0, split: str = "train", **mixture: Any) -> list[str]:
    """n plain-text documents (prompt + solution) for pretraining and for training the tokenizer."""
    return [example_text(e) for e in task_mixture(n, split=split, seed=seed, **mixture)]


def sft_conversations(n: int, seed: int = 0, split: str = "train", **mixture: Any) -> list[dict]:
    """n conversations `{"messages": [user prompt, assistant solution]}` for supervised fine-tuning."""
    return [{"messages": e.messages()} for e in task_mixture(n, split=split, seed=seed, **mixture)]
