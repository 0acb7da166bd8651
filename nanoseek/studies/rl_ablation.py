"""The GRPO family side by side: GRPO, Dr. GRPO, DAPO and REINFORCE from the same SFT model, same tasks, same
budget in samples, 3 seeds each.

    nanoseek study rl-ablation                                # trains OUT/base (speedrun cpu: pretrain + SFT) first
    nanoseek study rl-ablation --base runs/speedrun           # from a speedrun's SFT model (BASE/sft)
    nanoseek study rl-ablation --quick --out /tmp/rl          # seconds: every step of the study, toy sizes

Every run is `nanoseek rl` (`train.rl.rl`) with the speedrun's RL settings (configs/cpu.toml [rl]: 2-digit
multiplication, AdamW at a constant 1e-4, temperature 0.7), a smaller budget (RL_TINY) and two policy updates
per batch of rollouts (rl.num_iterations = 2): with one, the policy that sampled is the one updated, the ratio
is 1 and no clipping can act, so GRPO and REINFORCE could differ only in their advantages and normalisers.
The methods are settings of `train.grpo`'s functions (METHODS). Every run stops at the same budget in samples,
steps x prompts x group size completions (rl.max_samples): the others reach it at their last step, DAPO, whose
dynamic sampling generates more per step, in fewer steps. Each run's held-out pass@1 (RL's own test-split
problems, k samples each) is measured before RL, every rl.eval_every steps and after the last step.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nanoseek.studies.common import (
    RLScale,
    build_base,
    claim_directory,
    finished_base,
    finished_curves,
    level,
    markdown_table,
    mean_sd,
    mean_sd_text,
    paired,
    rl_config,
    run_once,
    significant,
    write_json,
    write_report,
)
from nanoseek.train.rl import rl

METHODS: dict[str, tuple[str, ...]] = {
    # DeepSeekMath: per-sequence mean, advantages scaled by the group's std, symmetric clip.
    "grpo": ("rl.loss_agg=seq-mean", "rl.scale_rewards=group", "rl.epsilon_high=0.2"),
    # Dr. GRPO: no std scaling, a constant normaliser (no length bias).
    "dr_grpo": ("rl.loss_agg=dr-grpo", "rl.scale_rewards=none", "rl.epsilon_high=0.2"),
    # DAPO: token-level mean, clip-higher, dynamic sampling, soft overlong penalty.
    "dapo": (
        "rl.loss_agg=token-mean",
        "rl.scale_rewards=group",
        "rl.epsilon_high=0.28",
        "rl.dynamic_sampling=true",
        "rl.overlong=soft",
    ),
    # REINFORCE with the group mean as baseline: Dr. GRPO's advantages and normaliser, no clipping (the clip
    # range [1 - 1, 1 + 1e9] holds every ratio, so the gradient is the plain importance-weighted one).
    "reinforce": ("rl.loss_agg=dr-grpo", "rl.scale_rewards=none", "rl.epsilon_low=1", "rl.epsilon_high=1e9"),
}
SHARED = ("rl.num_iterations=2",)

RL_TINY = RLScale(
    name="tiny", steps=60, prompts_per_step=32, group_size=8, eval_every=15, eval_problems=100, eval_samples=4
)
QUICK_BASE = (
    "pretrain.preset=tiny",
    "pretrain.model.d_model=32",
    "pretrain.model.n_heads=2",
    "pretrain.model.n_kv_heads=1",
    "pretrain.model.d_ff=64",
    "pretrain.model.n_layers=2",
    "pretrain.data.builtin_examples=300",
    "pretrain.data.vocab_size=300",
    "pretrain.train.steps=3",
    "pretrain.train.batch_size=4",
    "pretrain.train.seq_len=64",
    "sft.train.steps=2",
    "sft.train.batch_size=4",
    "sft.train.seq_len=128",
    "sft.data.builtin_examples=50",
)
RL_QUICK = RLScale(
    name="quick",
    steps=2,
    prompts_per_step=2,
    group_size=2,
    eval_every=1,
    eval_problems=4,
    eval_samples=1,
    seeds=(0, 1),
    base=QUICK_BASE,
    rl=("rl.max_new_tokens=8", "rl.overlong_buffer=4"),
)


def run_study(out: str | Path, quick: bool = False, quiet: bool = False, base: str | Path | None = None) -> Path:
    """Run (or continue) the study in `out`; returns OUT/table.md. `base`: a directory holding `sft/`."""
    out, scale = Path(out), RL_QUICK if quick else RL_TINY
    base = finished_base(Path(base), ("sft",)) if base else None  # checked before anything is written
    claim_directory(out, scale)
    base = base or build_base(out / "base", scale.base, quiet)
    for seed in scale.seeds:  # seed by seed: an unfinished study has every method on its first seeds
        for method, settings in METHODS.items():
            cfg = rl_config(scale, [*SHARED, f"rl.max_samples={scale.samples}", *settings], seed)
            run_once(rl, cfg, out / "runs" / f"{method}-s{seed}", base / "sft", quiet=quiet)
    return report(out, scale)


def report(out: Path, scale: RLScale) -> Path:
    curves = finished_curves(out, list(METHODS), scale)
    for runs in curves.values():
        for c in runs:
            c["pass@1 by samples"] = on_sample_grid(c, scale.samples)
    final = {m: [100 * c["pass@1"][-1][1] for c in runs] for m, runs in curves.items()}
    by_seed = {m: {c["seed"]: 100 * c["pass@1"][-1][1] for c in runs} for m, runs in curves.items()}
    write_json(out / "results.json", dict(scale=scale.name, samples_budget=scale.samples, curves=curves))
    lines = [
        f"# RL ablation: the GRPO family side by side (scale `{scale.name}`)",
        "",
        f"From one SFT model; {scale.steps} steps x {scale.prompts_per_step} prompts x {scale.group_size} samples "
        f"= {scale.samples:,} completions per run: every run stops once it has generated that many "
        "(rl.max_samples), DAPO, whose dynamic sampling generates more per step, after fewer steps (its last "
        f"step may overshoot by part of a step). {len(scale.seeds)} seeds. Held-out pass@1 on "
        f"{scale.eval_problems} test-split problems, {scale.eval_samples} samples each, in %: mean ± sd over the "
        "seeds that finished (n). Difference from GRPO ± its standard error, significant only beyond two: "
        "between the means, and paired by seed (the runs of one seed share the start, the prompts and the "
        "held-out problems; the mean of the seeds' differences ± their sd / sqrt(n)). "
        "Entropy and length: the mean of the last 10 steps.",
        "",
    ]
    header = [
        "method",
        "n",
        "before RL",
        "final pass@1",
        "vs grpo",
        "vs grpo, paired by seed",
        "steps",
        "completions generated",
        "entropy",
        "length (tokens)",
    ]
    rows = []
    for m, runs in curves.items():
        if not runs:
            continue
        rows.append(
            [
                m,
                len(runs),
                mean_sd_text([100 * c["pass@1"][0][1] for c in runs]),
                mean_sd_text(final[m]),
                versus(final[m], final["grpo"], m == "grpo"),
                versus_paired(by_seed[m], by_seed["grpo"], m == "grpo"),
                f"{mean_sd([c['samples'][-1][0] for c in runs])[0]:.1f}",
                f"{mean_sd([c['samples'][-1][1] for c in runs])[0]:,.0f}",
                level(runs, "entropy", "{:.3f}"),
                level(runs, "length", "{:.1f}"),
            ]
        )
    lines += markdown_table(header, rows)
    lines += ["", "Settings (beyond " + ", ".join([*SHARED, f"rl.max_samples={scale.samples}"]) + "):", ""]
    lines += [f"- `{m}`: " + ", ".join(f"`{s}`" for s in settings) for m, settings in METHODS.items()]
    return write_report(
        out,
        lines,
        curves,
        [
            (
                "pass@1 by samples",
                "held-out pass@1 by completions generated (interpolated between evaluations)",
                "pass@1",
                "completions generated (thousands)",
            ),
            ("entropy", "policy entropy", "nats/token"),
            ("length", "mean response length", "tokens"),
        ],
    )


def versus(values: list[float], grpo: list[float], is_grpo: bool) -> str:
    """The difference from GRPO ± its standard error, marked when beyond two ("-" for GRPO itself or none)."""
    if is_grpo or not grpo:
        return "-"
    diff, se, sig = significant(values, grpo)
    if min(len(values), len(grpo)) < 2:
        return f"{diff:+.1f} (one seed: no error)"
    return f"{diff:+.1f} ± {se:.1f}" + (" (significant)" if sig else "")


def versus_paired(values: dict[int, float], grpo: dict[int, float], is_grpo: bool) -> str:
    """The mean of the per-seed differences from GRPO ± its standard error, marked when beyond two."""
    if is_grpo:
        return "-"
    diff, se, sig, n = paired(values, grpo)
    if n < 2:
        return "-" if n == 0 else f"{diff:+.1f} (one seed: no error)"
    return f"{diff:+.1f} ± {se:.1f}" + (" (significant)" if sig else "")


def on_sample_grid(curve: dict[str, list[tuple[float, float]]], budget: int, points: int = 4) -> list[tuple]:
    """Held-out pass@1 at 0, 1/points, ..., all of the budget in completions (x in thousands), linear between
    the evaluations, the last evaluation (after the step that reached the budget) placed at the budget: one grid
    for every method, whose evaluations fall at different sample counts (DAPO's dynamic sampling)."""
    samples = dict(curve["samples"])
    evals = [(0.0 if step == 0 else float(samples[step]), acc) for step, acc in curve["pass@1"]]
    evals[-1] = (float(budget), evals[-1][1])
    xs = [budget * k / points for k in range(points + 1)]
    at_x, pass1 = zip(*evals, strict=True)
    return [(x / 1000, float(y)) for x, y in zip(xs, np.interp(xs, at_x, pass1), strict=True)]
