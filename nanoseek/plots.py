"""PNG plots of a run's metrics.jsonl (matplotlib, headless): training losses, RL rewards; and `figure`,
the one way a plot here (and in the eval report) is set up and written."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from nanoseek.data.jsonl import read_jsonl


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [record for _, record in read_jsonl(path)]


def series(records: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    pts = [(r["step"], r[key]) for r in records if key in r and r[key] is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


@contextmanager
def figure(path: str | Path, legend_fontsize: float | None = None) -> Iterator[Any]:
    """`with figure(path) as ax:` draw on the axes; then a grid and (when something is labelled) a legend
    are added and the PNG written to `path` (its folder made). The figure is closed even when drawing fails."""
    # matplotlib logs warnings to the terminal on its own business: "building the font cache" on a first run,
    # "created a temporary cache directory" where HOME is not writable. Not the user's: only its errors show.
    logger = logging.getLogger("matplotlib")
    if logger.level == logging.NOTSET:  # (unless the user configured it)
        logger.setLevel(logging.ERROR)
    import matplotlib  # here: it takes ~0.3 s to import, which only runs that plot pay

    matplotlib.use("Agg")  # headless: no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    try:
        yield ax
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # legend() with nothing labelled warns on the terminal
            ax.legend(fontsize=legend_fontsize)
        fig.tight_layout()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    finally:
        plt.close(fig)


def run_name(run_dir: str | Path) -> str:
    """The run as a title names it: its directory and the one above (`speedrun/rl`, `runs/pretrain`)."""
    return "/".join(Path(run_dir).resolve().parts[-2:])


def smooth(ys: list[float], span: int) -> list[float]:
    """Exponential moving average over about `span` points, debiased at the start (as TensorBoard's);
    a non-finite value (a NaN loss) is skipped, the average carried over it."""
    beta, avg, weight, out = 1 - 2 / (span + 1), 0.0, 0.0, []
    for y in ys:
        if math.isfinite(y):
            avg, weight = beta * avg + (1 - beta) * y, beta * weight + (1 - beta)
        out.append(avg / weight if weight else math.nan)
    return out


Series = tuple[list[float], list[float]]


def plot_lines(
    path: str | Path,
    title: str,
    ylabel: str,
    lines: dict[str, Series],
    logy: bool = False,
    smoothed: bool = False,
    points: dict[str, Series] | None = None,
) -> Path | None:
    """One PNG with a line per entry of `lines` and a marker per value of `points` (measurements at a few
    steps, not joined: nothing was measured between them; each labelled with its value). `smoothed`: each
    line's raw values drawn faint under their moving average. `logy`: a log y axis when every value is
    positive. Nothing is written when every series is empty."""
    points = points or {}
    if not any(xs for xs, _ in [*lines.values(), *points.values()]):
        return None
    with figure(path) as ax:
        for label, (xs, ys) in lines.items():
            if not xs:
                continue
            if smoothed and len(xs) >= 10:
                (raw,) = ax.plot(xs, ys, alpha=0.25, linewidth=0.8)
                ax.plot(xs, smooth(ys, max(2, len(xs) // 10)), color=raw.get_color(), label=f"{label} (smoothed)")
            else:
                ax.plot(xs, ys, label=label, marker="o" if len(xs) < 12 else None, markersize=3)
        for label, (xs, ys) in points.items():
            if xs:
                ax.plot(xs, ys, "o", markersize=6, label=label)
                for x, y in zip(xs, ys, strict=True):
                    ax.annotate(f"{y:.3g}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        values = [y for _, ys in [*lines.values(), *points.values()] for y in ys if math.isfinite(y)]
        if logy and values and min(values) > 0:
            from matplotlib.ticker import FuncFormatter

            ax.set_yscale("log")  # labels as plain numbers (0.5, 2), not 5x10^-1; minor ticks at 2 and 5 only
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:e}"[0] in "25" else ""))
    return Path(path)


def plot_training(run_dir: str | Path, stage: str) -> list[Path]:
    """loss.png (train, smoothed, and validation, on a log axis: the first steps' loss would flatten the
    rest) and, for MoE models, router_balance.png."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    name = run_name(run_dir)
    out = [
        plot_lines(
            run_dir / "plots" / "loss.png",
            f"{stage} loss: {name}",
            "cross-entropy (nats/token, log scale)",
            {"train": series(records, "loss"), "validation": series(records, "val_loss")},
            logy=True,
            smoothed=True,
        )
    ]
    balance = [(r["step"], max(r["max_violation"])) for r in records if r.get("max_violation")]
    if balance:
        out.append(
            plot_lines(
                run_dir / "plots" / "router_balance.png",
                f"router balance (worst layer): {name}",
                "max load / mean load - 1",
                {"max violation": ([b[0] for b in balance], [b[1] for b in balance])},
            )
        )
    return [p for p in out if p is not None]


def reward_functions(records: list[dict[str, Any]]) -> list[str]:
    """The names of the reward functions an RL run logged (`reward/NAME`; `reward/NAME_std` is its spread)."""
    keys = {k for r in records for k in r if k.startswith("reward/")}
    return sorted(k.removeprefix("reward/") for k in keys if not (k.endswith("_std") and k[:-4] in keys))


def plot_rl(run_dir: str | Path) -> list[Path]:
    """reward.png (the weighted total and, when there are several, each reward function), accuracy.png
    (rollouts' accuracy and the held-out pass@1 as points where it was measured) and length.png."""
    records = read_metrics(run_dir)
    plots, name = Path(run_dir) / "plots", run_name(run_dir)
    rewards = {"total (weighted)": series(records, "reward")}
    functions = reward_functions(records)
    if len(functions) > 1:
        rewards |= {f: series(records, f"reward/{f}") for f in functions}
    out = [
        plot_lines(plots / "reward.png", f"RL reward: {name}", "mean reward", rewards, smoothed=True),
        plot_lines(
            plots / "accuracy.png",
            f"RL accuracy: {name}",
            "fraction correct",
            {"rollouts": series(records, "accuracy")},
            smoothed=True,
            points={"held-out pass@1": series(records, "eval_accuracy")},
        ),
        plot_lines(
            plots / "length.png",
            f"response length: {name}",
            "tokens",
            {"mean": series(records, "length_mean"), "max": series(records, "length_max")},
            smoothed=True,
        ),
    ]
    return [p for p in out if p is not None]


def plot_run(run_dir: str | Path, stage: str) -> list[Path]:
    """The plots of a training stage's run: RL logs rewards, pretraining and SFT log losses."""
    return plot_rl(run_dir) if stage == "rl" else plot_training(run_dir, stage)
