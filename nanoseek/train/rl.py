"""Reinforcement learning with verifiable rewards: the GRPO step, the held-out evaluation and its table.

    nanoseek rl --checkpoint runs/sft                     # built-in task mixture, CPU
    nanoseek rl --checkpoint runs/sft --set rl.loss_agg=dr-grpo --set rl.scale_rewards=none
    nanoseek rl --checkpoint runs/sft --set rl.envs=guess_number     # multi-turn episodes, returns as rewards

Each step: P prompts x G samples from the engine on the live policy weights (no copy) and
their rewards (`nanoseek.train.rollouts`); group-relative advantages; `num_iterations` clipped
policy-gradient updates (`nanoseek.train.update`). What every stage shares (optimizers, resume,
metrics, checkpoints, summary, plots) is the run scaffold's (`nanoseek.train.run`).
The held-out evaluation (pass@1 over k samples on test-split problems; with rl.envs, the success
rate over k episodes of each held-out seed) runs before the first step and after the last, so
every run reports what RL changed.

Under `torchrun` (`torchrun --standalone --nproc_per_node=8 -m nanoseek rl ...`) each rank
generates and scores its share of every step's prompts with its own engine, and the update sums
the ranks' gradients; normalisers (tokens, sequences) and logged statistics are over the whole
batch, so the loss is the one a single process would take on the same samples (tested).
"""

from __future__ import annotations

import copy
import math
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Unpack

from nanoseek.config import RLConfig, RunConfig, TrainConfig, parse_env_weights
from nanoseek.engine import Engine, SamplingParams
from nanoseek.engine.compiled import compile_for
from nanoseek.eval.runner import prompt_ids, run_problems, summarize_records
from nanoseek.rewards import RewardSet, grade
from nanoseek.rewards.sandbox import configure_sandbox
from nanoseek.train import distributed, grpo, parallel
from nanoseek.train.rollouts import (
    EnvSampler,
    PromptSampler,
    batch_statistics,
    check_rows_for_rewards,
    collect,
    file_rows,
    held_out_env_rows,
    make_envs,
    play,
    task_rows,
    turn_advantages,
)
from nanoseek.train.run import Run, RunOptions, rollout_autocast, rollout_dtype
from nanoseek.train.update import compiled_hidden_states, update


def rl_defaults() -> RunConfig:
    """The embedded default, tuned on the CPU tiny model (docs/LOG.md): AdamW at a constant, small lr,
    64 prompts x 8 samples at temperature 0.7, on 2-digit multiplication, where SFT stays near 30%
    and RL gains the most (mixtures with countdown and linear equations gain half as much)."""
    return RunConfig(
        train=TrainConfig(
            steps=200,
            optimizer="adamw",
            lr=1e-4,
            warmup_steps=5,
            schedule="constant",
            checkpoint_every=20,
            weight_decay=0.0,
        ),
        rl=RLConfig(
            prompts_per_step=64,
            group_size=8,
            temperature=0.7,
            tasks="arithmetic",
            difficulty={"arithmetic": {"ops": ["*"]}},
        ),
    )


# ----------------------------------------------------------------------------- evaluation
def evaluate(engine: Engine, tokenizer: Any, rows: list[dict[str, Any]], cfg: RLConfig, seed: int) -> dict[str, Any]:
    """pass@1 over k samples on held-out rows, overall and per task (or per file row `group`).

    Under torchrun each rank generates its share of the rows; every rank gets the whole summary.

    Each row is graded by `nanoseek.rewards.grade`: a built-in task's row by its task's verifier, a
    row from a file by its code tests when it has them, else by math-verify's equivalence of the
    extracted answer with its `answer`.
    """
    params = SamplingParams.from_config(
        cfg,
        temperature=cfg.eval_temperature,
        top_p=cfg.eval_top_p if cfg.eval_temperature > 0 else 1.0,
        n=cfg.eval_samples,
        seed=seed,
    )
    topo = distributed.topology()
    mine = rows[topo.rank :: topo.world]
    if rows and "env" in rows[0]:
        return evaluate_episodes(engine, tokenizer, mine, cfg, params)
    with rollout_autocast(engine):
        records, wall = run_problems(engine, tokenizer, mine, grade, params) if mine else ([], 0.0)
    records = distributed.gather_lists(records)
    (wall,) = distributed.max_over_ranks(wall)
    summary = summarize_records(records, ks=[1, cfg.eval_samples])
    tokens = sum(s.tokens for r in records for s in r.samples)
    return dict(
        accuracy={g: v["pass@1"] for g, v in summary.items()},
        detail=summary,
        wall_s=wall,
        tokens_per_s=tokens / max(wall, 1e-9),
    )


def evaluate_episodes(
    engine: Engine, tokenizer: Any, rows: list[dict[str, Any]], cfg: RLConfig, params: SamplingParams
) -> dict[str, Any]:
    """rl.envs: k = eval_samples episodes of each held-out (environment, seed) row; accuracy = success rate,
    per environment and overall (every rank's share gathered)."""
    t0 = time.perf_counter()
    k = params.n
    episodes = play(engine, tokenizer, rows, cfg, replace(params, n=1), k) if rows else []
    wall = time.perf_counter() - t0
    records = distributed.gather_lists(
        [
            (row["group"], ep.success, ep.score, ep.policy_tokens)
            for row, ep in zip([r for r in rows for _ in range(k)], episodes)
        ]
    )
    (wall,) = distributed.max_over_ranks(wall)
    groups: dict[str, list[tuple]] = {}
    for record in records:
        groups.setdefault(record[0], []).append(record)
    groups["all"] = records

    def rate(items: list[tuple], column: int) -> float:
        return sum(float(x[column]) for x in items) / max(len(items), 1)

    return dict(
        accuracy={g: rate(items, 1) for g, items in groups.items()},
        detail={
            g: {"success": rate(items, 1), "score": rate(items, 2), "episodes": len(items)}
            for g, items in groups.items()
        },
        wall_s=wall,
        tokens_per_s=sum(x[3] for x in records) / max(wall, 1e-9),
    )


def _print_eval_table(before: dict[str, float], after: dict[str, float], file=sys.stderr) -> None:
    print(f"\n{'held-out pass@1':<18} {'before':>8} {'after':>8} {'change':>8}", file=file)
    for g in [k for k in after if k != "all"] + ["all"]:
        b, a = before.get(g, float("nan")), after[g]
        print(f"{g:<18} {100 * b:>7.1f}% {100 * a:>7.1f}% {100 * (a - b):>+7.1f}", file=file)


# ----------------------------------------------------------------------------- the RL stage
def rl(cfg: RunConfig, run_dir: str | Path, checkpoint: str | Path, **options: Unpack[RunOptions]) -> dict[str, Any]:
    """GRPO from `checkpoint` for train.steps steps, with the held-out evaluation before and after."""
    t, r = cfg.train, cfg.rl
    run = Run(cfg, run_dir, "rl", notes=sys.stderr, **options)
    cfg.check()
    configure_sandbox(cfg.rewards.sandbox)  # for the code rewards and the held-out evaluation alike
    model, tokenizer = run.load_model(checkpoint)
    ref_model = None
    if r.beta > 0:
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    model.train()
    reward_set = RewardSet.parse(r.rewards)

    if r.envs:  # every environment made once here: an unknown name or knob fails before the run
        make_envs([{"env": name} for name in parse_env_weights(r.envs, "rl.envs")], r, 1)
        train_rows, eval_rows = [], held_out_env_rows(r.envs, r.eval_problems)
    elif r.prompts_file:
        train_rows, eval_rows = file_rows(r.prompts_file), []
    else:
        train_rows = task_rows(r, max(4096, r.prompts_per_step * t.steps), "train", t.seed)
        eval_rows = task_rows(r, r.eval_problems, "test", t.seed + 1)
    if r.eval_file:
        eval_rows = file_rows(r.eval_file)[: r.eval_problems]
    if r.envs:
        sampler: PromptSampler | EnvSampler = EnvSampler(r.envs, t.seed)
        max_seq_len = model.cfg.max_seq_len  # episodes grow turn by turn, up to the whole context
    else:
        check_rows_for_rewards(reward_set, train_rows, r.prompts_file or "rl.tasks")
        sampler = PromptSampler(train_rows, t.seed)
        max_prompt = max(len(prompt_ids(tokenizer, row["prompt"])) for row in train_rows + eval_rows)
        max_seq_len = min(model.cfg.max_seq_len, max_prompt + r.max_new_tokens + 8)

    before = None  # the held-out evaluation before the first step, kept in every checkpoint
    generated = 0  # completions generated so far (rl.max_samples), kept in every checkpoint
    state = run.begin(
        model,
        tokenizer,
        lambda: {"sampler": sampler.state_dict(), "before": before, "generated": generated, "stage": "rl"},
    )
    if state is not None:
        sampler.load_state_dict(state["sampler"])
        before = state.get("before")
        generated = state.get("generated", 0)
    run.ending = bool(r.max_samples) and generated >= r.max_samples
    # The engine decodes the policy's twin (16-bit matmul weights; whole weights when the policy is sharded).
    slots = max(math.ceil(r.prompts_per_step / run.topo.world) * r.group_size, 8)
    engine_policy = parallel.generation_policy(model, rollout_dtype(model, run.device, slots))
    engine = Engine(
        engine_policy,
        tokenizer,
        max_batch=slots,
        max_seq_len=max_seq_len,
        compile=compile_for(run.device, run.steps_ahead * r.max_new_tokens),  # a long run: compiled from the first step
    )
    # train.compile: the update's gradient passes through a compiled forward (the engine compiles on its own).
    policy_forward = compiled_hidden_states(model) if t.compile and not parallel.is_sharded(model) else None
    if policy_forward is not None and not run.quiet:
        print("rl: the update's forward compiled (train.compile; the first step compiles it)", file=sys.stderr)
    if before is None and eval_rows:
        before = evaluate(engine, tokenizer, eval_rows, r, seed=t.seed)
        run.log.write(dict(step=0, eval_accuracy=before["accuracy"]["all"], eval=before["accuracy"]))
        if not run.quiet:
            print(f"held-out pass@1 before RL: {100 * before['accuracy']['all']:.1f}%", file=sys.stderr)

    for step in run.steps():
        t0 = time.perf_counter()
        batch = collect(engine, tokenizer, sampler, reward_set, r, seed=t.seed * 100003 + step)
        t_rollout = time.perf_counter() - t0
        stats = batch_statistics(batch)
        advantages = grpo.group_advantages(
            batch.rewards, r.group_size, r.scale_rewards, batch_std=stats["reward_std"] if run.topo.world > 1 else None
        )
        token_adv = turn_advantages(batch, r.group_size, r.scale_rewards) if r.turn_credit and r.envs else None
        t1 = time.perf_counter()
        upd = update(
            model, ref_model, run.optimizers, batch, advantages, r, t.grad_clip, run.device, token_adv, policy_forward
        )
        parallel.refresh_generation_policy(engine_policy, model)
        t_update = time.perf_counter() - t1
        done = step + 1
        generated += batch.groups_generated * r.group_size
        run.ending = bool(r.max_samples) and generated >= r.max_samples

        record: dict[str, Any] = dict(
            step=done,
            reward=batch.sampled_reward,
            accuracy=batch.sampled_accuracy,
            zero_variance_groups=batch.zero_variance_fraction,
            samples=batch.groups_generated * r.group_size,  # generated this step, dropped groups included
            samples_total=generated,
            **stats,
            lr=run.lr(),
            time_rollout=t_rollout,
            time_update=t_update,
            rollout_tokens_per_s=batch.sampled_tokens / t_rollout,
            **upd,
        )
        if batch.reward_warnings:
            record["reward_warnings"] = batch.reward_warnings
        if r.eval_every and done % r.eval_every == 0 and done < t.steps and not run.ending and eval_rows:
            ev = evaluate(engine, tokenizer, eval_rows, r, seed=t.seed)
            record.update(eval_accuracy=ev["accuracy"]["all"], eval=ev["accuracy"])
        run.log.write(record)
        run.bar.set_postfix(
            reward=f"{record['reward']:.2f}",
            acc=f"{100 * record['accuracy']:.0f}%",
            len=f"{record['length_mean']:.0f}",
            refresh=False,
        )
    engine.release()
    reward_set.close()  # its worker processes (import-path rewards) end here

    summary: dict[str, Any] = dict(
        stage="rl", steps=run.done, samples=generated, finished=run.finished, wall_time_s=run.elapsed()
    )
    if eval_rows and run.finished:
        after = evaluate(engine, tokenizer, eval_rows, r, seed=t.seed)
        engine.release()
        run.log.write(dict(step=run.done, eval_accuracy=after["accuracy"]["all"], eval=after["accuracy"]))
        summary.update(
            before=before["accuracy"],
            after=after["accuracy"],
            eval_samples=r.eval_samples,
            eval_problems=len(eval_rows),
        )
        if not run.quiet:
            _print_eval_table(before["accuracy"], after["accuracy"])
    return run.finish(summary)
