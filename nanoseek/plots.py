"""PNG plots of a run's metrics.jsonl (matplotlib, headless): training losses, RL rewards; and `figure`,
the one way a plot here (and in the eval report) is set up and written."""

from __future__ import annotations

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
    """`with figure(path) as ax:` draw on the axes; then a grid and a legend are added and the PNG
    written to `path` (its folder made). The figure is closed even when drawing fails."""
    import matplotlib  # here: it takes ~0.3 s to import, which only runs that plot pay

    matplotlib.use("Agg")  # headless: no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    try:
        yield ax
        ax.grid(alpha=0.3)
        ax.legend(fontsize=legend_fontsize)
        fig.tight_layout()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    finally:
        plt.close(fig)


def plot_lines(
    path: str | Path, title: str, ylabel: str, lines: dict[str, tuple[list[float], list[float]]], logy: bool = False
) -> Path | None:
    """One PNG with a line per entry; nothing is written when every line is empty."""
    if not any(xs for xs, _ in lines.values()):
        return None
    with figure(path) as ax:
        for label, (xs, ys) in lines.items():
            if xs:
                ax.plot(xs, ys, label=label, marker="o" if len(xs) < 12 else None, markersize=3)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        if logy:
            ax.set_yscale("log")
    return Path(path)


def plot_training(run_dir: str | Path, stage: str) -> list[Path]:
    """loss.png (train and validation) and, for MoE models, router_balance.png."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    out = [
        plot_lines(
            run_dir / "plots" / "loss.png",
            f"{stage} loss",
            "cross-entropy (nats/token)",
            {"train": series(records, "loss"), "validation": series(records, "val_loss")},
        )
    ]
    balance = [(r["step"], max(r["max_violation"])) for r in records if r.get("max_violation")]
    if balance:
        out.append(
            plot_lines(
                run_dir / "plots" / "router_balance.png",
                "router balance (worst layer)",
                "max load / mean load - 1",
                {"max violation": ([b[0] for b in balance], [b[1] for b in balance])},
            )
        )
    return [p for p in out if p is not None]


def plot_rl(run_dir: str | Path) -> None:
    """reward.png, accuracy.png (rollouts and held-out pass@1) and length.png of an RL run."""
    records = read_metrics(run_dir)
    plots = Path(run_dir) / "plots"
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


def plot_run(run_dir: str | Path, stage: str) -> None:
    """The plots of a training stage's run: RL logs rewards, pretraining and SFT log losses."""
    if stage == "rl":
        plot_rl(run_dir)
    else:
        plot_training(run_dir, stage)
