"""`nanoseek eval --env`: a checkpoint (or an environment's own scripted policy) over held-out episodes.

    nanoseek eval --checkpoint runs/rl --env guess_number --n-episodes 200 --out runs/eval-guess
    nanoseek eval --env guess_number --policy expert --n-episodes 200      # the baseline, no model

Episodes use the held-out seeds (HELD_OUT_SEED_START + SEED + i: never an RL training seed) and are played
all at once by `run_episodes` (each sequence's cache kept across turns). Reported: the mean normalised
score ± its standard error, the success rate, turns, tool calls and tool errors per episode, tokens per
episode (the policy's, and all: prompt and environment included), episodes whose environment failed or
whose context filled up, and the speed. Writes OUT/summary.json and OUT/transcripts.jsonl.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from nanoseek.engine import Engine, SamplingParams
from nanoseek.envs import HELD_OUT_SEED_START, make
from nanoseek.envs.baselines import play_policy, summarize
from nanoseek.envs.episodes import run_episodes
from nanoseek.envs.sim import Simulator


def evaluate_env(
    spec: str,
    knobs: dict[str, Any],
    n_episodes: int,
    out_dir: str | Path,
    *,
    engine: Engine | None = None,
    tokenizer: Any = None,
    params: SamplingParams | None = None,
    policy: str | None = None,
    seed: int = 0,
    max_turns: int | None = None,
) -> dict[str, Any]:
    """n_episodes of `spec` from held-out seeds, by the model (engine + tokenizer + params, each turn's
    limit params.max_new_tokens) or by the environment's scripted `policy`; writes and returns the summary."""
    envs = [make(spec, **knobs) for _ in range(n_episodes)]
    seeds = [HELD_OUT_SEED_START + seed + i for i in range(n_episodes)]
    t0 = time.perf_counter()
    if policy is not None:
        envs[0].check_policy(policy)
        episodes: list[Any] = [play_policy(env, policy, s, max_turns) for env, s in zip(envs, seeds)]
        records = [t.to_dict() for t in episodes]
        tokens: dict[str, float] = {}
    else:
        assert engine is not None and params is not None
        episodes = run_episodes(engine, tokenizer, envs, seeds, params, max_turns=max_turns)
        records = [ep.to_dict() for ep in episodes]
        n = max(len(episodes), 1)
        tokens = {
            "policy_tokens": sum(ep.policy_tokens for ep in episodes) / n,
            "tokens": sum(len(ep.prompt_ids) + len(ep.token_ids) for ep in episodes) / n,
            "env_errors": sum(ep.error is not None for ep in episodes),
            "truncated": sum(ep.truncated for ep in episodes),
        }
    wall = time.perf_counter() - t0
    summary = {
        "env": spec,
        "knobs": envs[0].knobs,
        "policy": policy or "model",
        **summarize(episodes),
        **tokens,
        "wall_s": wall,
        "episodes_per_s": len(episodes) / max(wall, 1e-9),
    }
    if policy is None:
        summary["tokens_per_s"] = sum(ep.policy_tokens for ep in episodes) / max(wall, 1e-9)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "transcripts.jsonl", "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    if isinstance(envs[0], Simulator):  # a simulator: its first episode's states and decisions beside the oracle's
        summary["plot"] = str(out / f"{envs[0].name}.png")
        envs[0].plot_vs_oracle(summary["plot"], summary["policy"])
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def summary_line(s: dict[str, Any]) -> str:
    """The one-paragraph report `nanoseek eval --env` prints."""
    line = (
        f"{s['env']} ({s['policy']}, {s['episodes']} episodes): score {s['score']:.3f} ± {s['score_se']:.3f}, "
        f"success {100 * s['success']:.1f}%, turns {s['turns']:.2f}, tool calls {s['tool_calls']:.2f}, "
        f"tool errors {s['tool_errors']:.2f} per episode"
    )
    if "tokens_per_s" in s:
        line += (
            f"; {s['policy_tokens']:.0f} policy tokens ({s['tokens']:.0f} in all) per episode, "
            f"{s['env_errors']} env errors, {s['truncated']} truncated; "
            f"{s['episodes_per_s']:.2f} episodes/s, {s['tokens_per_s']:.0f} tokens/s"
        )
    return line


__all__ = ["evaluate_env", "summary_line"]
