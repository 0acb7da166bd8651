"""Reinforcement learning with verifiable rewards: the GRPO run loop.

    nanoseek rl --checkpoint runs/sft                     # built-in task mixture, CPU
    nanoseek rl --checkpoint runs/sft --set rl.loss_agg=dr-grpo --set rl.scale_rewards=none

Each step: P prompts x G samples from the engine on the live policy weights (no copy) and
their rewards (`nanoseek.train.rollouts`); group-relative advantages; `num_iterations` clipped
policy-gradient updates (`update`, here).
The held-out evaluation (pass@1 over k samples on test-split problems) runs before the
first step and after the last, so every run reports what RL changed.

Under `torchrun` (`torchrun --standalone --nproc_per_node=8 -m nanoseek rl ...`) each rank
generates and scores its share of every step's prompts with its own engine, and the update sums
the ranks' gradients; normalisers (tokens, sequences) and logged statistics are over the whole
batch, so the loss is the one a single process would take on the same samples (tested).
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from tqdm import tqdm

from nanoseek.config import RLConfig, RunConfig, run_config_to_toml
from nanoseek.engine import Engine, SamplingParams
from nanoseek.engine.twin import rollout_policy, sync_rollout_policy
from nanoseek.eval.runner import prompt_ids, run_problems, summarize_records
from nanoseek.loading import load_checkpoint, pick_device
from nanoseek.model import Transformer, install_balancing_hook
from nanoseek.plots import plot_lines, read_metrics, series
from nanoseek.rewards import RewardSet, grade
from nanoseek.train import distributed, grpo
from nanoseek.train.checkpoint import find_resume_checkpoint, load_trainer_state, save_checkpoint
from nanoseek.train.loop import MetricsLog, NullLog, autocast, autocast_dtype
from nanoseek.train.optim import build_optimizers, lr_factor, set_lr
from nanoseek.train.rollouts import (
    PromptSampler,
    Rollouts,
    batch_statistics,
    check_rows_for_rewards,
    collect,
    file_rows,
    task_rows,
)


def rl_defaults() -> RunConfig:
    """The embedded default, tuned on the CPU tiny model (docs/LOG.md): AdamW at a constant, small lr,
    64 prompts x 8 samples at temperature 0.7, on 2-digit multiplication, where SFT stays near 30%
    and RL gains the most (mixtures with countdown and linear equations gain half as much)."""
    from nanoseek.config import RLConfig, TrainConfig

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


# ----------------------------------------------------------------------------- update
def pack_sequences(
    prompt: list[list[int]], completion: list[list[int]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded [n, L] prompt+completion ids, next-token targets, and the completion mask."""
    n = len(prompt)
    length = max(len(p) + len(c) for p, c in zip(prompt, completion))
    ids = torch.zeros(n, length, dtype=torch.long)
    targets = torch.zeros(n, length, dtype=torch.long)
    mask = torch.zeros(n, length)
    for i, (p, c) in enumerate(zip(prompt, completion)):
        seq = p + c
        ids[i, : len(seq)] = torch.tensor(seq)
        targets[i, : len(seq) - 1] = torch.tensor(seq[1:])
        mask[i, len(p) - 1 : len(seq) - 1] = 1.0  # position t predicts token t + 1: the completion tokens
    return ids.to(device), targets.to(device), mask.to(device)


def sequence_logprobs(
    model: Transformer, ids: torch.Tensor, targets: torch.Tensor, temperature: float, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    logits = model(ids)
    logp = grpo.token_logprobs(logits, targets, temperature)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = grpo.token_entropy(logits.detach(), temperature)
    return logp, entropy


def update(
    model: Transformer,
    ref_model: Transformer | None,
    optimizers: list[torch.optim.Optimizer],
    batch: Rollouts,
    advantages: torch.Tensor,
    cfg: RLConfig,
    grad_clip: float,
    device: torch.device,
) -> dict[str, float]:
    """num_iterations passes of clipped policy-gradient updates over the batch; returns statistics.

    A sample whose advantage is zero adds nothing to the loss or its gradient (and, without a KL
    term, nothing at all), so it is left out of the forward and backward passes; the normalisers
    still count the whole batch, so the loss is the one over every sample. With GRPO's all-equal
    groups (most groups of a weak policy) this skips most of the update's work.

    Under torchrun `batch` is this rank's share: the normalisers count every rank's samples and the
    gradients are summed over ranks before the step (one collective per optimizer step; DDP would
    need the same number of micro-batches on every rank, which skipping does not give).
    """
    topo = distributed.topology()
    n = len(batch.rows)
    mb = cfg.micro_batch_size
    if cfg.beta > 0:
        active = list(range(n))
    else:
        active = torch.nonzero(advantages.cpu() != 0).flatten().tolist()
    chunks = [active[i : i + mb] for i in range(0, len(active), mb)]
    packed = []
    for idx in chunks:
        ids, targets, mask = pack_sequences(
            [batch.prompt_ids[i] for i in idx], [batch.completion_ids[i] for i in idx], device
        )
        if cfg.overlong == "mask":
            keep = torch.tensor([0.0 if batch.truncated[i] else 1.0 for i in idx], device=device)
            mask = mask * keep[:, None]
        engine_lp = torch.zeros(mask.shape, dtype=mask.dtype)  # filled on the host, one copy to the device
        for row, i in enumerate(idx):
            start = len(batch.prompt_ids[i]) - 1
            engine_lp[row, start : start + len(batch.engine_logprobs[i])] = torch.tensor(batch.engine_logprobs[i])
        packed.append((idx, ids, targets, mask, engine_lp.to(device, non_blocking=True)))

    def loss_tokens(indices: list[int]) -> float:
        """Completion tokens that enter the loss (truncated samples are masked out under overlong=mask)."""
        return float(
            sum(len(batch.completion_ids[i]) for i in indices if not (cfg.overlong == "mask" and batch.truncated[i]))
        )

    total_tokens, n_total, trained_tokens, n_trained = distributed.sum_over_ranks(
        loss_tokens(list(range(n))), n, loss_tokens(active), len(active)
    )
    norm = grpo.AggregationNorm(max(total_tokens, 1.0), max(int(n_total), 1), cfg.max_new_tokens)

    # The policy that produced the batch, as the trainer computes it (and the reference, if any).
    # With one update per batch the current policy *is* that policy, so its detached log-probs
    # serve and this extra forward pass is skipped. Eval mode: these passes must not count
    # towards the routers' load statistics.
    old: list[torch.Tensor | None] = [None] * len(packed)
    ref: list[torch.Tensor] = []
    model.eval()
    with torch.no_grad(), autocast(device):
        for k, (_, ids, targets, _, _) in enumerate(packed):
            if cfg.num_iterations > 1:
                old[k] = sequence_logprobs(model, ids, targets, cfg.temperature)[0]
            if ref_model is not None:
                ref.append(sequence_logprobs(ref_model, ids, targets, cfg.temperature)[0])
    model.train()

    # Statistics stay on the device until the end: a float() per micro-batch would make the host wait
    # for each backward before it could queue the next forward.
    names = ("loss", "clip_low", "clip_high", "kl", "entropy", "grad_norm", "is_weight")
    acc = {name: torch.zeros((), device=device) for name in names}
    for it in range(cfg.num_iterations):
        for k, (idx, ids, targets, mask, engine_lp) in enumerate(packed):
            with autocast(device):
                logp, entropy = sequence_logprobs(model, ids, targets, cfg.temperature, with_entropy=it == 0)
                old_k = old[k] if old[k] is not None else logp.detach()
                is_w = grpo.truncated_is_weights(old_k, engine_lp, cfg.tis_cap) if cfg.tis_cap > 0 else None
                parts = grpo.policy_loss(
                    logp,
                    old_k,
                    advantages[idx].to(device),
                    mask,
                    norm,
                    epsilon_low=cfg.epsilon_low,
                    epsilon_high=cfg.epsilon_high,
                    loss_agg=cfg.loss_agg,
                    ref_logp=ref[k] if ref else None,
                    beta=cfg.beta,
                    is_weights=is_w,
                )
                loss = parts.loss + model.aux_loss() / (len(packed) * topo.world)
            loss.backward()
            acc["loss"] += parts.loss.detach()
            acc["clip_low"] += parts.clipped_low
            acc["clip_high"] += parts.clipped_high
            acc["kl"] += parts.kl
            if entropy is not None:
                acc["entropy"] += (entropy * mask).sum()
            if is_w is not None:
                acc["is_weight"] += (is_w * mask).sum()
        if topo.world > 1:
            _sum_gradients_over_ranks(model)
        if grad_clip > 0:
            acc["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip).detach().float()
        for opt in optimizers:
            opt.step()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
    # Clip fractions and KL are per token of the whole batch (a skipped sample is never clipped and
    # has no KL term); entropy and the IS weight are means over the tokens that were trained on.
    summed = [name for name in names if name != "grad_norm"]  # the norm is of the summed gradient already
    stats = dict(zip(summed, distributed.all_reduce_sum(torch.stack([acc[k].float() for k in summed])).tolist()))
    stats["grad_norm"] = float(acc["grad_norm"])
    per_tok, trained = max(total_tokens, 1.0), max(trained_tokens, 1.0)
    iters = cfg.num_iterations
    return dict(
        loss=stats["loss"] / iters,
        clip_low=stats["clip_low"] / (per_tok * iters),
        clip_high=stats["clip_high"] / (per_tok * iters),
        kl=stats["kl"] / (per_tok * iters),
        entropy=stats["entropy"] / trained,
        grad_norm=stats["grad_norm"],
        is_weight=stats["is_weight"] / (trained * iters) if cfg.tis_cap > 0 else 1.0,
        trained_fraction=n_trained / max(n_total, 1),
    )


def _sum_gradients_over_ranks(model: torch.nn.Module) -> None:
    """All-reduce (sum) every gradient in one flat collective; a parameter without one counts as zeros."""
    params = [p for p in model.parameters() if p.requires_grad]
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    distributed.all_reduce_sum(flat)
    offset = 0
    for p in params:
        p.grad = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()


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
    with autocast(engine.device):
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


def _print_eval_table(before: dict[str, float], after: dict[str, float], file=sys.stderr) -> None:
    print(f"\n{'held-out pass@1':<18} {'before':>8} {'after':>8} {'change':>8}", file=file)
    for g in [k for k in after if k != "all"] + ["all"]:
        b, a = before.get(g, float("nan")), after[g]
        print(f"{g:<18} {100 * b:>7.1f}% {100 * a:>7.1f}% {100 * (a - b):>+7.1f}", file=file)


# ----------------------------------------------------------------------------- the run
def rl(
    cfg: RunConfig,
    run_dir: str | Path,
    checkpoint: str | Path,
    resume: bool = False,
    quiet: bool = False,
    stop_at: int | None = None,
) -> dict[str, Any]:
    t, r = cfg.train, cfg.rl
    topo, device = distributed.setup(pick_device(t.device))
    quiet = quiet or not topo.is_main
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if topo.is_main:
        (run_dir / "config.toml").write_text(run_config_to_toml(cfg))
    cfg.check()
    torch.manual_seed(t.seed)
    model, tokenizer = load_checkpoint(checkpoint, device=device, dtype=torch.float32)
    if tokenizer is None:
        raise FileNotFoundError(f"{checkpoint}: no tokenizer.json beside the weights")
    ref_model = None
    if r.beta > 0:
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    model.train()
    optimizers = build_optimizers(model, t, device)
    install_balancing_hook(optimizers[-1], model)
    reward_set = RewardSet.parse(r.rewards)

    if r.prompts_file:
        train_rows, eval_rows = file_rows(r.prompts_file), []
    else:
        train_rows = task_rows(r, max(4096, r.prompts_per_step * t.steps), "train", t.seed)
        eval_rows = task_rows(r, r.eval_problems, "test", t.seed + 1)
    if r.eval_file:
        eval_rows = file_rows(r.eval_file)[: r.eval_problems]
    check_rows_for_rewards(reward_set, train_rows, r.prompts_file or "rl.tasks")
    sampler = PromptSampler(train_rows, t.seed)
    max_prompt = max(len(prompt_ids(tokenizer, row["prompt"])) for row in train_rows + eval_rows)
    engine_policy = rollout_policy(model, autocast_dtype(device))
    engine = Engine(
        engine_policy,
        tokenizer,
        max_batch=max(math.ceil(r.prompts_per_step / topo.world) * r.group_size, 8),
        max_seq_len=min(model.cfg.max_seq_len, max_prompt + r.max_new_tokens + 8),
    )

    start, before = 0, None
    ckpt = find_resume_checkpoint(run_dir) if resume else None
    if ckpt is not None:
        model.load_state_dict(load_file(str(ckpt / "model.safetensors"), device=str(device)))
        state = load_trainer_state(ckpt, optimizers)
        sampler.load_state_dict(state["sampler"])
        start, before = state["step"], state.get("before")
        sync_rollout_policy(engine_policy, model)
        if not quiet:
            print(f"resuming rl from {ckpt} (step {start})", file=sys.stderr)
    log = MetricsLog(run_dir / "metrics.jsonl", start if ckpt is not None else None) if topo.is_main else NullLog()

    if before is None and eval_rows:
        before = evaluate(engine, tokenizer, eval_rows, r, seed=t.seed)
        log.write(dict(step=0, eval_accuracy=before["accuracy"]["all"], eval=before["accuracy"]))
        if not quiet:
            print(f"held-out pass@1 before RL: {100 * before['accuracy']['all']:.1f}%", file=sys.stderr)

    bar = tqdm(total=t.steps, initial=start, desc="rl", disable=quiet, dynamic_ncols=True)
    t_run = time.perf_counter()
    done = start
    for step in range(start, t.steps):
        set_lr(optimizers, lr_factor(step, t))
        t0 = time.perf_counter()
        batch = collect(engine, tokenizer, sampler, reward_set, r, seed=t.seed * 100003 + step)
        t_rollout = time.perf_counter() - t0
        stats = batch_statistics(batch)
        advantages = grpo.group_advantages(
            batch.rewards, r.group_size, r.scale_rewards, batch_std=stats["reward_std"] if topo.world > 1 else None
        )
        t1 = time.perf_counter()
        upd = update(model, ref_model, optimizers, batch, advantages, r, t.grad_clip, device)
        sync_rollout_policy(engine_policy, model)
        t_update = time.perf_counter() - t1
        done = step + 1

        record: dict[str, Any] = dict(
            step=done,
            reward=batch.sampled_reward,
            accuracy=batch.sampled_accuracy,
            zero_variance_groups=batch.zero_variance_fraction,
            **stats,
            lr=optimizers[0].param_groups[0]["lr"],
            time_rollout=t_rollout,
            time_update=t_update,
            rollout_tokens_per_s=batch.sampled_tokens / t_rollout,
            **upd,
        )
        if batch.reward_warnings:
            record["reward_warnings"] = batch.reward_warnings
        if r.eval_every and done % r.eval_every == 0 and done < t.steps and eval_rows:
            ev = evaluate(engine, tokenizer, eval_rows, r, seed=t.seed)
            record.update(eval_accuracy=ev["accuracy"]["all"], eval=ev["accuracy"])
        log.write(record)
        interrupted = stop_at is not None and done >= stop_at and done < t.steps
        if topo.is_main and (done % t.checkpoint_every == 0 or done == t.steps or interrupted):
            save_checkpoint(
                run_dir,
                done,
                model,
                optimizers,
                tokenizer,
                {"sampler": sampler.state_dict(), "before": before, "stage": "rl"},
                keep=t.keep_checkpoints,
            )
        bar.set_postfix(
            reward=f"{record['reward']:.2f}",
            acc=f"{100 * record['accuracy']:.0f}%",
            len=f"{record['length_mean']:.0f}",
            refresh=False,
        )
        bar.update(1)
        if interrupted:
            break
    bar.close()
    engine.release()
    reward_set.close()  # its worker processes (import-path rewards) end here

    summary: dict[str, Any] = dict(stage="rl", steps=done, wall_time_s=time.perf_counter() - t_run)
    if eval_rows and done == t.steps:
        after = evaluate(engine, tokenizer, eval_rows, r, seed=t.seed)
        engine.release()
        log.write(dict(step=done, eval_accuracy=after["accuracy"]["all"], eval=after["accuracy"]))
        summary.update(
            before=before["accuracy"],
            after=after["accuracy"],
            eval_samples=r.eval_samples,
            eval_problems=len(eval_rows),
        )
        if not quiet:
            _print_eval_table(before["accuracy"], after["accuracy"])
    if topo.is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        plot_rl(run_dir)
    distributed.barrier()
    return summary


def plot_rl(run_dir: Path) -> None:
    records = read_metrics(run_dir)
    plots = run_dir / "plots"
    plot_lines(plots / "reward.png", "RL reward", "mean reward", {"reward": series(records, "reward")})
    plot_lines(
        plots / "accuracy.png",
        "RL accuracy",
        "fraction correct",
        {"rollouts": series(records, "accuracy"), "held-out pass@1": series(records, "eval_accuracy")},
    )
    plot_lines(
        plots / "length.png",
        "response length",
        "tokens",
        {"mean": series(records, "length_mean"), "max": series(records, "length_max")},
    )
