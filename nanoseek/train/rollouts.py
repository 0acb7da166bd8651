"""What an RL step learns from: prompts or environments, their sampled episodes and the rewards.

Prompts come from the built-in tasks (a weighted mixture; `task_rows`) or a JSONL file
(`file_rows`), and a resumable `PromptSampler` deals them out; with rl.envs an `EnvSampler` deals
out (environment, seed) rows instead. `collect` turns one step's rows into `Rollouts`: G episodes
each, played by `nanoseek.envs.episodes.run_episodes` on the live policy (one rollout path: a
prompt row is a one-turn episode, `RowEnv`), with DAPO's dynamic sampling when asked (zero-variance
groups dropped and refilled). A prompt row's completions are scored by the reward functions exactly
as single-turn rows always were; an environment episode's reward is its return (the sum of its
turns' rewards), and its environment-written tokens are masked out of the loss (`policy_masks`).
Under torchrun every rank draws the same rows and keeps its share. The engine runs
`engine.twin.rollout_policy(model)`: on CUDA a twin with 16-bit copies of the matmul weights; on a CPU the
float32 policy itself where it fits the cache and the engine runs at most 64 sequences (`train.run.rollout_dtype`).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nanoseek.config import RLConfig, parse_env_weights, parse_task_weights
from nanoseek.data.errors import BadInputError
from nanoseek.data.jsonl import read_jsonl
from nanoseek.engine import Engine, SamplingParams
from nanoseek.envs import HELD_OUT_SEED_START, make
from nanoseek.envs.base import Env, Message, StepResult, step_info
from nanoseek.envs.episodes import Episode, run_episodes
from nanoseek.rewards import RewardSet, code_reward, code_tests, grade_many, has_code_tests, math_reward, task_reward
from nanoseek.tasks.corpus import task_mixture
from nanoseek.train import distributed, grpo
from nanoseek.train.run import rollout_autocast


# ----------------------------------------------------------------------------- prompts
def task_rows(cfg: RLConfig, n: int, split: str, seed: int) -> list[dict[str, Any]]:
    examples = task_mixture(
        n, split=split, seed=seed, weights=parse_task_weights(cfg.tasks, "rl.tasks"), difficulty=cfg.difficulty or None
    )
    return [dict(e.to_dict(), id=f"{e.task}-{i}", group=e.task) for i, e in enumerate(examples)]


def file_rows(path: str) -> list[dict[str, Any]]:
    rows = []
    for line_no, row in read_jsonl(path):
        if not isinstance(row, dict) or not ("prompt" in row or "messages" in row):
            raise BadInputError(path, line_no, "expected an object with 'prompt' or 'messages'")
        if has_code_tests(row):
            try:
                code_tests(row)
            except ValueError as e:
                raise BadInputError(path, line_no, str(e)) from None
        elif "answer" not in row:
            raise BadInputError(path, line_no, "expected an 'answer' (or code tests: 'tests', 'test_list')")
        row.setdefault("prompt", row.get("messages"))
        row.setdefault("id", f"{Path(path).stem}-{line_no}")
        row.setdefault("group", row.get("task", "file"))
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no prompts")
    return rows


def check_rows_for_rewards(reward_set: RewardSet, rows: list[dict[str, Any]], source: str) -> None:
    """A built-in reward needs a field in every row: fail before the run, not with zero rewards in it."""
    needs = {
        task_reward: ("'task' field", lambda row: "task" in row),
        math_reward: ("'answer' field", lambda row: "answer" in row),
        code_reward: ("code tests", has_code_tests),
    }
    for term in reward_set.terms:
        if term.fn in needs:
            what, has = needs[term.fn]
            missing = next((i for i, row in enumerate(rows) if not has(row)), None)
            if missing is not None:
                raise ValueError(
                    f"{source}: row {missing + 1} has no {what}, which the reward "
                    f"{term.name!r} needs: choose rl.rewards to fit the rows (task, math or code)"
                )


class PromptSampler:
    """Cycles through the training prompts in a seeded order, reshuffled each epoch; resumable."""

    def __init__(self, rows: list[dict[str, Any]], seed: int) -> None:
        self.rows, self.seed, self.epoch, self.pos = rows, seed, 0, 0
        self._order = self._shuffle(0)

    def _shuffle(self, epoch: int) -> list[int]:
        order = list(range(len(self.rows)))
        random.Random(f"prompts:{self.seed}:{epoch}").shuffle(order)
        return order

    def take(self, n: int) -> list[dict[str, Any]]:
        out = []
        while len(out) < n:
            if self.pos == len(self._order):
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._shuffle(self.epoch)
            out.append(self.rows[self._order[self.pos]])
            self.pos += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._order = self._shuffle(self.epoch)


class EnvSampler:
    """rl.envs: row k of the stream is an environment drawn by weight (seeded) with episode seed k (below
    HELD_OUT_SEED_START, where the held-out seeds begin: training never sees those); resumable."""

    def __init__(self, spec: str, seed: int) -> None:
        weights = parse_env_weights(spec, "rl.envs")
        self.names, self.weights, self.seed, self.pos = list(weights), list(weights.values()), seed, 0

    def take(self, n: int) -> list[dict[str, Any]]:
        out = []
        for k in range(self.pos, self.pos + n):
            [name] = random.Random(f"envs:{self.seed}:{k}").choices(self.names, self.weights)
            out.append(dict(env=name, seed=k % HELD_OUT_SEED_START, id=f"{name}-{k}", group=name))
        self.pos += n
        return out

    def state_dict(self) -> dict[str, int]:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.pos = state["pos"]


def held_out_env_rows(spec: str, n: int) -> list[dict[str, Any]]:
    """n held-out episodes of each environment of rl.envs (seeds from HELD_OUT_SEED_START)."""
    return [
        dict(env=name, seed=HELD_OUT_SEED_START + i, id=f"{name}-heldout-{i}", group=name)
        for name in parse_env_weights(spec, "rl.envs")
        for i in range(n)
    ]


class RowEnv(Env):
    """A prompt row as a one-turn episode; its reward comes from the reward functions, afterwards."""

    name = "row"
    inline = True  # nothing to do in a step: run_episodes calls it without a thread

    def __init__(self, row: dict[str, Any]) -> None:
        super().__init__()
        self.row = row

    def _reset(self, seed: int) -> list[Message]:
        prompt = self.row["prompt"]
        return list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": prompt}]

    def respond(self, text: str) -> StepResult:
        return StepResult([], 0.0, True, step_info())

    def score(self) -> float:
        return 0.0


def make_envs(rows: list[dict[str, Any]], cfg: RLConfig, group_size: int) -> list[Env]:
    """group_size environments per row: `RowEnv`s for prompt rows, rl.envs' environments (knobs from
    rl.difficulty under the environment's spec, e.g. "task:arithmetic", else its name) for episode rows."""
    out: list[Env] = []
    for row in rows:
        for _ in range(group_size):
            if "env" in row:
                spec = row["env"]
                knobs = cfg.difficulty.get(spec, cfg.difficulty.get(spec.partition(":")[0], {}))
                out.append(make(spec, **knobs))
            else:
                out.append(RowEnv(row))
    return out


# ----------------------------------------------------------------------------- rollouts
@dataclass
class Rollouts:
    rows: list[dict[str, Any]]
    """One per sample (N = P x G, groups contiguous)."""
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    engine_logprobs: list[list[float]]
    texts: list[str]
    truncated: list[bool]
    policy_masks: list[list[int]]
    """Per completion token: 1 if the policy wrote it (trained on), 0 if the environment did."""
    turn_advantage_spans: list[list[tuple[int, int, float]]]
    """rl.turn_credit: each policy turn's (start, end, reward-to-go) in the completion; [] otherwise."""
    rewards: torch.Tensor
    """[N] the weighted total, overlong penalty included."""
    per_function: dict[str, list[float]]
    correct: list[bool]
    groups_generated: int
    """Groups sampled this step (more than P when dynamic sampling refilled)."""
    zero_variance_fraction: float
    """Of the groups sampled, the fraction whose rewards were all equal."""
    sampled_reward: float
    """Mean reward over every sample generated this step (dropped groups included: an unbiased view)."""
    sampled_accuracy: float
    """Fraction correct over every sample generated this step."""
    sampled_tokens: int
    """Completion tokens generated this step, dropped groups included."""
    reward_warnings: dict[str, int]
    """Reward functions that raised or timed out this step, by kind."""


def play(
    engine: Engine, tokenizer: Any, rows: list[dict[str, Any]], cfg: RLConfig, params: SamplingParams, G: int
) -> list[Episode]:
    """G episodes of each row (prompt rows: one turn each), as `run_episodes` plays them."""
    # The policy keeps float32 master weights; on CUDA, rollouts decode its bf16 twin under bf16 autocast like the
    # trainer's forward (MoE experts then reach the grouped GEMM, and decode runs as CUDA graphs); on a CPU a
    # model that fits the cache decodes in float32 at up to 64 rows (`rollout_dtype`).
    with rollout_autocast(engine):
        episodes = run_episodes(
            engine, tokenizer, make_envs(rows, cfg, G), [row.get("seed", 0) for row in rows], params, group_size=G
        )
    for row, ep in zip((row for row in rows for _ in range(G)), episodes):
        if ep.error is not None and "env" not in row:
            raise ValueError(f"prompt {row.get('id')}: {ep.error}")
    return episodes


def rollout(engine: Engine, tokenizer: Any, rows: list[dict[str, Any]], cfg: RLConfig, seed: int) -> dict[str, Any]:
    """G episodes of each row; flat per-sample lists."""
    G = cfg.group_size
    episodes = play(engine, tokenizer, rows, cfg, SamplingParams.from_config(cfg, n=1, seed=seed), G)
    flat: dict[str, list] = {
        k: []
        for k in (
            "rows",
            "prompt_ids",
            "completion_ids",
            "engine_logprobs",
            "texts",
            "truncated",
            "policy_masks",
            "turn_advantage_spans",
            "episodes",
        )
    }
    for row, ep in zip((row for row in rows for _ in range(G)), episodes):
        flat["rows"].append(row)
        flat["prompt_ids"].append(ep.prompt_ids)
        flat["completion_ids"].append(ep.token_ids)
        flat["engine_logprobs"].append(ep.logprobs)
        flat["texts"].append("\n".join(ep.texts))
        one_turn_cut = "env" not in row and ep.finish_reasons == ["length"]
        flat["truncated"].append(ep.truncated or one_turn_cut)
        flat["policy_masks"].append(ep.policy_mask)
        to_go = [sum(ep.turn_rewards[k:]) for k in range(len(ep.turn_spans))]
        spans = [(s, e, r) for (s, e), r in zip(ep.turn_spans, to_go)] if cfg.turn_credit and "env" in row else []
        flat["turn_advantage_spans"].append(spans)
        flat["episodes"].append(ep)
    return flat


def score(flat: dict[str, Any], reward_set: RewardSet, cfg: RLConfig) -> dict[str, Any]:
    """Rewards: the reward functions' over prompt rows; episodes' returns (success: correct) for env rows."""
    episodes = flat.pop("episodes", [])  # not a Rollouts field: the environments' own results
    if flat["rows"] and "env" in flat["rows"][0]:
        returns = [ep.return_ for ep in episodes]
        errors: dict[str, int] = {}  # environments that raised or hung, by where ("env_reset", "env_step")
        for ep in episodes:
            if ep.error:
                kind = "env_" + ep.error.split(":")[0]
                errors[kind] = errors.get(kind, 0) + 1
        return dict(
            rewards=torch.tensor(returns, dtype=torch.float32),
            per_function={"return": returns},
            correct=[ep.success for ep in episodes],
            warnings=errors,
        )
    prompts = [r["prompt"] if isinstance(r["prompt"], str) else json.dumps(r["prompt"]) for r in flat["rows"]]
    result = reward_set.score(prompts, flat["texts"], flat["rows"])
    rewards = torch.tensor(result.total, dtype=torch.float32)
    if cfg.overlong == "soft":
        lengths = torch.tensor([sum(m) for m in flat["policy_masks"]])
        rewards = rewards + grpo.soft_overlong_penalty(lengths, cfg.max_new_tokens, cfg.overlong_buffer)
    correct = [v >= 1.0 for v in _accuracy_scores(reward_set, result.per_function, prompts, flat)]
    return dict(rewards=rewards, per_function=result.per_function, correct=correct, warnings=dict(result.warnings))


def _accuracy_scores(
    reward_set: RewardSet, per_function: dict[str, list[float]], prompts: list[str], flat: dict[str, Any]
) -> list[float]:
    """What accuracy counts: the verifier's verdict when the rows are tasks (the `task` reward's values,
    graded once, unless the set lacks it), else the first reward function's values."""
    if all("task" in r for r in flat["rows"]):
        term = next((t for t in reward_set.terms if t.fn is task_reward), None)
        if term is not None:
            return per_function[term.name]
        return [g.score for g in grade_many(flat["rows"], flat["texts"], kind="task", prompts=prompts)]
    return next(iter(per_function.values()))


def collect(
    engine: Engine, tokenizer: Any, sampler: PromptSampler, reward_set: RewardSet, cfg: RLConfig, seed: int
) -> Rollouts:
    """One step's rollouts; with dynamic sampling, zero-variance groups are dropped and refilled.

    Under torchrun every rank draws the same prompts and keeps its share (prompt i goes to rank
    i % world); how many groups a refill round needs is counted over all ranks, so the sampler
    moves identically everywhere. The sampled statistics are totals over ranks.
    """
    G, P = cfg.group_size, cfg.prompts_per_step
    topo = distributed.topology()
    kept: dict[str, list] = {}
    generated, zero_var = 0, 0
    reward_sum, n_correct, n_samples, n_tokens = 0.0, 0, 0, 0
    warnings: dict[str, int] = {}
    rounds = cfg.max_sampling_rounds if cfg.dynamic_sampling else 1
    for r in range(rounds):
        (kept_groups,) = distributed.sum_over_ranks(len(kept.get("rows", [])) // G)
        need = P - int(kept_groups)
        if need <= 0:
            break
        rows = sampler.take(need)[topo.rank :: topo.world]
        if not rows:  # fewer prompts than ranks this round
            continue
        flat = rollout(engine, tokenizer, rows, cfg, seed=(seed * 1000 + r) * topo.world + topo.rank)
        flat.update(score(flat, reward_set, cfg))
        for kind, count in flat.pop("warnings").items():
            warnings[kind] = warnings.get(kind, 0) + count
        flat["rewards"] = flat["rewards"].tolist()
        reward_sum += sum(flat["rewards"])
        n_correct += sum(flat["correct"])
        n_samples += len(flat["rewards"])
        n_tokens += sum(sum(m) for m in flat["policy_masks"])
        zero = grpo.zero_variance_groups(torch.tensor(flat["rewards"]), G).tolist()
        generated += len(zero)
        zero_var += sum(zero)
        keep_groups = [g for g, z in enumerate(zero) if not (cfg.dynamic_sampling and z)]
        # When no round of the step found an informative group, keep the last round rather than
        # return an empty batch (its advantages are all zero: the step only moves the optimizer state).
        if cfg.dynamic_sampling and r == rounds - 1 and not kept.get("rows") and not keep_groups:
            keep_groups = list(range(len(zero)))
        for key, values in flat.items():
            if key == "per_function":
                for name, v in values.items():
                    kept.setdefault("per_function", {}).setdefault(name, []).extend(
                        x for g in keep_groups for x in v[g * G : (g + 1) * G]
                    )
            else:
                kept.setdefault(key, []).extend(x for g in keep_groups for x in values[g * G : (g + 1) * G])
    generated, zero_var, reward_sum, n_correct, n_samples, n_tokens = distributed.sum_over_ranks(
        generated, zero_var, reward_sum, n_correct, n_samples, n_tokens
    )
    merged: dict[str, int] = {}  # every rank's warnings, added up
    for kind, count in distributed.gather_lists(list(warnings.items())):
        merged[kind] = merged.get(kind, 0) + count
    return Rollouts(
        rows=kept.get("rows", []),
        prompt_ids=kept.get("prompt_ids", []),
        completion_ids=kept.get("completion_ids", []),
        engine_logprobs=kept.get("engine_logprobs", []),
        texts=kept.get("texts", []),
        truncated=kept.get("truncated", []),
        policy_masks=kept.get("policy_masks", []),
        turn_advantage_spans=kept.get("turn_advantage_spans", []),
        rewards=torch.tensor(kept.get("rewards", []), dtype=torch.float32),
        per_function=kept.get("per_function", {name: [] for name in reward_set.names}),  # "return" for envs
        correct=kept.get("correct", []),
        groups_generated=int(generated),
        zero_variance_fraction=zero_var / max(generated, 1),
        sampled_reward=reward_sum / max(n_samples, 1),
        sampled_accuracy=n_correct / max(n_samples, 1),
        sampled_tokens=int(n_tokens),
        reward_warnings=merged,
    )


def batch_statistics(batch: Rollouts) -> dict[str, float]:
    """Reward std, response lengths, truncation and each reward function's mean/std over the batch
    (every rank's share under torchrun); stds are sample stds, as torch.std gives."""
    lengths = [sum(m) for m in batch.policy_masks]  # the policy's tokens: environment tokens are not its length
    columns = [batch.rewards.tolist(), *batch.per_function.values()]
    sums = distributed.sum_over_ranks(
        len(lengths), sum(lengths), sum(batch.truncated), *[f(v) for v in columns for f in (sum, _sum_sq)]
    )
    n, length_sum, truncated = sums[:3]
    (length_max,) = distributed.max_over_ranks(max(lengths, default=0))

    def std(total: float, total_sq: float) -> float:
        return math.sqrt(max(total_sq - total * total / n, 0.0) / (n - 1)) if n > 1 else 0.0

    out = dict(
        reward_std=std(sums[3], sums[4]),
        length_mean=length_sum / max(n, 1),
        length_max=int(length_max),
        truncation_rate=truncated / max(n, 1),
    )
    for i, name in enumerate(batch.per_function):
        total, total_sq = sums[5 + 2 * i], sums[6 + 2 * i]
        out[f"reward/{name}"] = total / max(n, 1)
        out[f"reward/{name}_std"] = std(total, total_sq)
    return out


def _sum_sq(values: list[float]) -> float:
    return sum(v * v for v in values)


def turn_advantages(batch: Rollouts, group_size: int, scale: str) -> list[list[float]]:
    """rl.turn_credit: per completion token, the advantage of the rewards-to-go at its turn: turn k of each
    episode is compared with turn k of its group's others (one without a turn k counts 0 there);
    environment tokens get 0 (they are masked out anyway)."""
    out = [[0.0] * len(c) for c in batch.completion_ids]
    spans = batch.turn_advantage_spans
    for k in range(max((len(s) for s in spans), default=0)):
        to_go = torch.tensor([s[k][2] if k < len(s) else 0.0 for s in spans], dtype=torch.float32)
        adv = grpo.group_advantages(to_go, group_size, scale).tolist()
        for i, s in enumerate(spans):
            if k < len(s):
                start, end, _ = s[k]
                out[i][start:end] = [adv[i]] * (end - start)
    return out
