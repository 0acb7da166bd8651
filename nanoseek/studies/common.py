"""What the studies share: a run done once (a rerun skips it, an interrupted one resumes), the SFT base
the RL studies start from, means and spreads over seeds, and markdown tables."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nanoseek.config import RunConfig
from nanoseek.errors import InputError
from nanoseek.plots import figure, read_metrics
from nanoseek.speedrun import load_preset, stage_config, stage_done
from nanoseek.train.stages import pretrain, sft


def run_once(stage: Callable[..., dict[str, Any]], cfg: RunConfig, run_dir: Path, *start: Path, quiet: bool) -> None:
    """Run a stage (pretrain, sft, rl) in `run_dir` unless its summary shows every step done; an
    interrupted run continues from its latest checkpoint."""
    if stage_done(run_dir, cfg.train.steps):
        return
    if not quiet:
        print(f"[study] {run_dir}", file=sys.stderr, flush=True)
    stage(cfg, run_dir, *start, resume=True, quiet=quiet)


def claim_directory(out: Path, scale: Any) -> None:
    """A study directory holds the runs of one scale: OUT/scale.json records it; another scale is refused
    (its runs would be skipped as finished, or resumed on another schedule)."""
    path, mine = out / "scale.json", json.loads(json.dumps(dataclasses.asdict(scale)))
    if path.exists():
        theirs = json.loads(path.read_text())
        if theirs != mine:
            changed = sorted(k for k in mine if theirs.get(k) != mine[k])
            raise InputError(f"{out}: holds a study of another scale ({', '.join(changed)} differ); use another --out")
    write_json(path, mine)


def build_base(out: Path, overrides: Sequence[str], quiet: bool) -> Path:
    """OUT/pretrain and OUT/sft trained as `nanoseek speedrun --preset cpu` trains them (its [pretrain]
    and [sft] tables; `overrides` as the speedrun's --set STAGE.SECTION.FIELD=VALUE). Returns OUT."""
    from nanoseek.speedrun import split_overrides

    spec, per_stage = load_preset("cpu"), split_overrides(list(overrides))
    run_once(pretrain, stage_config("pretrain", spec, per_stage["pretrain"]), out / "pretrain", quiet=quiet)
    run_once(sft, stage_config("sft", spec, per_stage["sft"]), out / "sft", out / "pretrain", quiet=quiet)
    return out


def finished_base(base: Path, stages: Sequence[str]) -> Path:
    """`base` when each of its stage runs finished (has its summary.json). An unfinished run directory would
    load as its latest checkpoint: every RL run would start, silently, from a half-trained model."""
    for stage in stages:
        if not (base / stage / "summary.json").is_file():
            raise InputError(
                f"{base / stage}: an unfinished run (no summary.json); finish it first (a rerun of the command "
                "that trained it resumes it)"
            )
    return base


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, sd


def mean_sd_text(values: Sequence[float]) -> str:
    """'mean ± sd' to one decimal; the value alone for a single seed (its spread is unknown, not 0)."""
    mean, sd = mean_sd(values)
    return f"{mean:.1f}" if len(values) == 1 else f"{mean:.1f} ± {sd:.1f}"


def significant(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, bool]:
    """(mean(a) - mean(b), its standard error, whether the difference exceeds two standard errors).
    With one value on either side there is no spread to judge by: never significant."""
    (ma, sa), (mb, sb) = mean_sd(a), mean_sd(b)
    se = math.sqrt(sa**2 / len(a) + sb**2 / len(b))
    return ma - mb, se, len(a) > 1 and len(b) > 1 and abs(ma - mb) > 2 * se


def paired(a: dict[int, float], b: dict[int, float]) -> tuple[float, float, bool, int]:
    """Over the seeds both runs have (a seed fixes the start, the prompts and the held-out problems, so its
    runs are matched): (the mean of a - b, its standard error sd(a - b) / sqrt(n), whether beyond two, n)."""
    diffs = [a[s] - b[s] for s in sorted(a.keys() & b.keys())]
    if len(diffs) < 2:
        return (diffs[0] if diffs else math.nan), math.nan, False, len(diffs)
    mean, sd = mean_sd(diffs)
    se = sd / math.sqrt(len(diffs))
    return mean, se, abs(mean) > 2 * se, len(diffs)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(str(c) for c in row) + " |" for row in rows),
    ]


def write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2) + "\n")


# ----------------------------------------------------------------------------- the RL studies
@dataclass(frozen=True)
class RLScale:
    """The budget of every RL run of a study; the rest of its settings are the speedrun's [rl] table (cpu)."""

    name: str
    steps: int
    prompts_per_step: int
    group_size: int
    eval_every: int
    eval_problems: int
    eval_samples: int
    seeds: tuple[int, ...] = (0, 1, 2)
    base: tuple[str, ...] = ()
    """`nanoseek speedrun --set` items for the base models (pretrain, SFT) the study trains when given none."""
    rl: tuple[str, ...] = ()
    """SECTION.FIELD=VALUE items for every RL run beyond the budget (the quick scale: short completions)."""

    @property
    def samples(self) -> int:
        """Completions generated per run without dynamic sampling: the budget in samples."""
        return self.steps * self.prompts_per_step * self.group_size


def rl_config(scale: RLScale, settings: Sequence[str], seed: int) -> RunConfig:
    """The speedrun's RL stage config (cpu preset) with the study's budget, `settings` and `seed`."""
    budget = [
        f"train.steps={scale.steps}",
        f"train.seed={seed}",
        f"train.checkpoint_every={max(1, scale.steps // 4)}",
        "train.keep_checkpoints=1",
        f"rl.prompts_per_step={scale.prompts_per_step}",
        f"rl.group_size={scale.group_size}",
        f"rl.eval_every={scale.eval_every}",
        f"rl.eval_problems={scale.eval_problems}",
        f"rl.eval_samples={scale.eval_samples}",
    ]
    return stage_config("rl", load_preset("cpu"), [*budget, *scale.rl, *settings])


def rl_curves(run_dir: Path) -> dict[str, list[tuple[float, float]]]:
    """A finished RL run's curves by step: held-out pass@1 (step 0 = before RL), rollouts' accuracy, policy
    entropy, mean response length, the format reward, and the completions generated so far."""
    records = read_metrics(run_dir)
    steps = [r for r in records if "reward" in r]
    out: dict[str, list[tuple[float, float]]] = {
        "pass@1": [(r["step"], r["eval_accuracy"]) for r in records if "eval_accuracy" in r],
    }
    for key, name in (("accuracy", "accuracy"), ("length_mean", "length")):
        out[name] = [(r["step"], r[key]) for r in steps if key in r]
    # The update measures entropy on the samples it trains on: none in a step whose advantages are all zero.
    out["entropy"] = [(r["step"], r["entropy"]) for r in steps if r.get("trained_fraction", 1) > 0 and "entropy" in r]
    out["format"] = [(r["step"], r["reward/format"]) for r in steps if "reward/format" in r]
    total = 0
    out["samples"] = []
    for r in steps:
        total += r.get("samples", 0)
        out["samples"].append((r["step"], total))
    return out


def finished_curves(out: Path, labels: Sequence[str], scale: RLScale) -> dict[str, list[dict[str, Any]]]:
    """label -> `rl_curves` of its runs OUT/runs/LABEL-sSEED that finished (an unfinished run's last held-out
    evaluation is not its final one), in seed order, each with its "seed"."""

    def finished(label: str) -> list[dict[str, Any]]:
        dirs = {seed: out / "runs" / f"{label}-s{seed}" for seed in scale.seeds}
        return [dict(rl_curves(d), seed=seed) for seed, d in dirs.items() if stage_done(d, scale.steps)]

    return {label: finished(label) for label in labels}


def level(runs: Sequence[dict[str, Any]], key: str, fmt: str, first: bool = False, n: int = 10) -> str:
    """A noisy per-step curve's final level (or with `first`, its first), formatted: the mean of each seed's last
    (first) n points, averaged over the seeds whose curve has any ("-" when none has: entropy has no point in a
    run that never trained on a sample, and a 0 there would read as a measured collapse)."""
    ends = [[y for _, y in (c[key][:n] if first else c[key][-n:])] for c in runs]
    means = [sum(ys) / len(ys) for ys in ends if ys]
    return fmt.format(mean_sd(means)[0]) if means else "-"


def pointwise_mean_sd(runs: Sequence[Sequence[tuple[float, float]]]) -> tuple[list[float], list[tuple[float, float]]]:
    """Every x of the curves, ascending, and the (mean, sd) of the values the curves have there. Matched by x, not
    by position: a per-step curve may skip steps (entropy is measured only on steps that trained on something),
    and not the same steps in every seed."""
    by_x: dict[float, list[float]] = {}
    for run in runs:
        for x, y in run:
            by_x.setdefault(x, []).append(y)
    xs = sorted(by_x)
    return xs, [mean_sd(by_x[x]) for x in xs]


def plot_bands(
    path: Path, title: str, ylabel: str, curves: dict[str, list[list[tuple[float, float]]]], xlabel: str = "step"
) -> Path:
    """One line per label: the `pointwise_mean_sd` of its seeds' curves, shaded ± one sd."""
    with figure(path) as ax:
        for label, runs in curves.items():
            runs = [r for r in runs if r]
            if not runs:
                continue
            xs, stats = pointwise_mean_sd(runs)
            (line,) = ax.plot(xs, [m for m, _ in stats], label=f"{label} ({len(runs)} seeds)")
            ax.fill_between(xs, [m - s for m, s in stats], [m + s for m, s in stats], color=line.get_color(), alpha=0.2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
    return path


def write_report(
    out: Path,
    lines: list[str],
    curves: dict[str, list[dict[str, Any]]],
    panels: Sequence[tuple[str, str, str] | tuple[str, str, str, str]],
) -> Path:
    """out/table.md: `lines`, then one `plot_bands` PNG per panel (curve key, title, y label[, x label: default
    step]) over `curves` (label -> its seeds' runs -> key -> curve), linked under "## Plots"."""
    pngs = [
        plot_bands(
            out / "plots" / f"{panel[0].replace('@', '').replace(' ', '_')}.png",
            panel[1],
            panel[2],
            {s: [c[panel[0]] for c in r] for s, r in curves.items()},
            *panel[3:],
        )
        for panel in panels
    ]
    lines = [*lines, "", "## Plots", "", *(f"![{p.stem}](plots/{p.name})" for p in pngs), ""]
    (out / "table.md").write_text("\n".join(lines))
    return out / "table.md"
