"""R1-Zero: RL straight from the pretrained model (no SFT), with a format reward beside the task reward, and
the same RL from the SFT model: do accuracy and response length rise together?

    nanoseek study r1-zero                                    # trains OUT/base (speedrun cpu: pretrain + SFT) first
    nanoseek study r1-zero --base runs/speedrun               # from a speedrun's models (BASE/pretrain, BASE/sft)
    nanoseek study r1-zero --quick --out /tmp/r1              # seconds: every step of the study, toy sizes

Every run is `nanoseek rl` with the speedrun's RL settings (configs/cpu.toml [rl]: 2-digit multiplication,
where the pretrained model already has some signal: its corpus holds worked solutions in the
`<think>...</think> \\boxed{}` layout) and the reward `task=1,format=0.2` (R1-Zero's accuracy and format
rewards). Both starts are prompted through the chat template, which the pretrained model has never seen.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from nanoseek.studies.common import (
    RLScale,
    build_base,
    claim_directory,
    finished_base,
    finished_curves,
    level,
    markdown_table,
    mean_sd_text,
    rl_config,
    run_once,
    write_json,
    write_report,
)
from nanoseek.studies.rl_ablation import RL_QUICK
from nanoseek.train.rl import rl

STARTS = ("pretrain", "sft")
REWARDS = "rl.rewards=task=1,format=0.2"

R1_TINY = RLScale(
    name="tiny", steps=60, prompts_per_step=32, group_size=8, eval_every=15, eval_problems=100, eval_samples=4
)
# The ablation's toy scale with one seed, only the reply length set.
R1_QUICK = dataclasses.replace(RL_QUICK, seeds=(0,), rl=("rl.max_new_tokens=8",))


def run_study(out: str | Path, quick: bool = False, quiet: bool = False, base: str | Path | None = None) -> Path:
    """Run (or continue) the study in `out`; returns OUT/table.md. `base`: a directory with `pretrain/`, `sft/`."""
    out, scale = Path(out), R1_QUICK if quick else R1_TINY
    base = finished_base(Path(base), STARTS) if base else None  # checked before anything is written
    claim_directory(out, scale)
    base = base or build_base(out / "base", scale.base, quiet)
    for seed in scale.seeds:
        for start in STARTS:
            run_once(
                rl, rl_config(scale, [REWARDS], seed), out / "runs" / f"{start}-s{seed}", base / start, quiet=quiet
            )
    return report(out, scale)


def report(out: Path, scale: RLScale) -> Path:
    curves = finished_curves(out, STARTS, scale)
    write_json(out / "results.json", dict(scale=scale.name, curves=curves))
    lines = [
        f"# R1-Zero: RL from the pretrained model vs from SFT (scale `{scale.name}`)",
        "",
        f"{scale.steps} steps x {scale.prompts_per_step} prompts x {scale.group_size} samples, reward "
        f"`{REWARDS.split('=', 1)[1]}`, {len(scale.seeds)} seed(s). Held-out pass@1 on {scale.eval_problems} "
        f"test-split problems ({scale.eval_samples} samples each) in %, mean ± sd over the seeds that finished "
        "(n); rollouts' accuracy, format reward and response length: the mean of the first / last 10 steps.",
        "",
    ]
    header = ["start", "n", "pass@1 before", "pass@1 after", "rollout accuracy", "format reward", "length (tokens)"]
    rows = []
    for start, runs in curves.items():
        if not runs:
            continue

        rows.append(
            [
                start,
                len(runs),
                mean_sd_text([100 * c["pass@1"][0][1] for c in runs]),
                mean_sd_text([100 * c["pass@1"][-1][1] for c in runs]),
                first_last(runs, "accuracy", "{:.1%}"),
                first_last(runs, "format", "{:.2f}"),
                first_last(runs, "length", "{:.1f}"),
            ]
        )
    lines += markdown_table(header, rows)
    return write_report(
        out,
        lines,
        curves,
        [
            ("pass@1", "held-out pass@1", "pass@1"),
            ("accuracy", "rollouts' accuracy", "fraction correct"),
            ("length", "mean response length", "tokens"),
        ],
    )


def first_last(runs: list[dict[str, list[tuple[float, float]]]], key: str, fmt: str) -> str:
    """A per-step curve's mean over its first 10 steps -> over its last 10, each averaged over the seeds."""
    return f"{level(runs, key, fmt, first=True)} -> {level(runs, key, fmt)}"
