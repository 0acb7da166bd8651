"""Episodes played by an environment's own scripted policies, with no model: baselines and SFT transcripts.

`play_policy(env, policy, seed)` is the one loop that does it (`nanoseek env baseline`, `nanoseek data make
--env`, `nanoseek eval --env --policy`); `summarize` reports a batch of them the way `nanoseek eval --env`
reports a model's episodes.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from typing import Any

from nanoseek.envs.base import Env, Message


@dataclass
class Transcript:
    """One finished episode: the whole conversation and how it went."""

    env: str
    seed: int
    policy: str
    messages: list[Message]  # the opening messages, then each assistant turn and the environment's reply
    tools: list[dict[str, Any]]  # the tool schemas the model was shown ([] if none)
    return_: float  # the sum of the turns' rewards
    score: float  # the normalised score in [0, 1]
    success: bool
    turns: int  # assistant turns
    tool_calls: int
    tool_errors: int
    invalid: int  # turns the environment could not read

    def sft_record(self) -> dict[str, Any]:
        """The SFT stage's conversation row (`nanoseek.data.sft`): messages, plus tools when there are some."""
        record: dict[str, Any] = {"messages": self.messages}
        if self.tools:
            record["tools"] = self.tools
        return record

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def play_policy(env: Env, policy: str, seed: int, max_turns: int | None = None) -> Transcript:
    """Play one episode of `env` from `seed` with its scripted `policy` (deterministic in seed and policy)."""
    env.check_policy(policy)
    rng = random.Random(f"{env.name}:{policy}:{seed}")
    messages = list(env.reset(seed))
    limit = min(env.max_turns, max_turns or env.max_turns)
    total, invalid, done = 0.0, 0, False
    while not done and env.turns < limit:
        text = env.act(policy, messages, rng)
        messages.append({"role": "assistant", "content": text})
        result = env.step(text)
        messages.extend(result.messages)
        total += result.reward
        invalid += bool(result.info.get("invalid"))
        done = result.done
    return Transcript(
        env=env.name,
        seed=seed,
        policy=policy,
        messages=messages,
        tools=env.tools,
        return_=total,
        score=env.score(),
        success=env.success(),
        turns=env.turns,
        tool_calls=env.tool_calls,
        tool_errors=env.tool_errors,
        invalid=invalid,
    )


def mean_and_error(values: list[float]) -> tuple[float, float]:
    """The mean and its standard error (0 for fewer than two values)."""
    n = len(values)
    mean = sum(values) / n if n else 0.0
    if n < 2:
        return mean, 0.0
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def summarize(transcripts: list[Transcript]) -> dict[str, float]:
    """Mean score ± s.e., success rate, mean turns, tool calls and errors per episode."""
    n = max(1, len(transcripts))
    score, score_se = mean_and_error([t.score for t in transcripts])
    return {
        "episodes": len(transcripts),
        "score": score,
        "score_se": score_se,
        "success": sum(t.success for t in transcripts) / n,
        "turns": sum(t.turns for t in transcripts) / n,
        "tool_calls": sum(t.tool_calls for t in transcripts) / n,
        "tool_errors": sum(t.tool_errors for t in transcripts) / n,
    }
