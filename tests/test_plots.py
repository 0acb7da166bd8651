"""Run plots (nanoseek.plots) and the speedrun report's RL and plot sections: what is drawn is read back
from the matplotlib axes (scale, lines, markers, titles), not from pixels."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest

from nanoseek import plots
from nanoseek.config import EvalConfig
from nanoseek.speedrun import STAGES, write_report


def write_metrics(run_dir: Path, records: list[dict]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture
def drawn(monkeypatch):
    """Every axes drawn through plots.figure, by file name, kept open for inspection; no warning may be raised."""
    axes = {}
    real = plots.figure

    @contextmanager
    def keeping(path, legend_fontsize=None):
        with real(path, legend_fontsize) as ax:
            yield ax
        axes[Path(path).name] = ax

    monkeypatch.setattr(plots, "figure", keeping)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a library warning would reach the user's terminal
        yield axes


def test_smooth_is_the_debiased_moving_average():
    ys = [5.0, 3.0, math.nan, 4.0, 1.0, 2.0]
    span = 3
    beta = 1 - 2 / (span + 1)
    finite = [(i, y) for i, y in enumerate(ys) if math.isfinite(y)]
    for t, got in enumerate(plots.smooth(ys, span)):
        seen = [y for i, y in finite if i <= t]  # the closed form over the finite values so far
        n = len(seen)
        want = sum((1 - beta) * beta ** (n - 1 - j) * y for j, y in enumerate(seen)) / (1 - beta**n)
        assert got == pytest.approx(want)


def test_loss_plot_is_on_a_log_axis_with_a_smoothed_line_over_the_raw_one(tmp_path, drawn):
    run = tmp_path / "runs" / "pt"
    records = [{"step": s, "loss": 6.0 * 0.98**s + 0.1 * (s % 3)} for s in range(1, 101)]
    write_metrics(run, [*records, {"step": 50, "val_loss": 2.5}, {"step": 100, "val_loss": 1.0}])
    assert plots.plot_run(run, "pretrain") == [run / "plots" / "loss.png"]
    assert (run / "plots" / "loss.png").stat().st_size > 0
    ax = drawn["loss.png"]
    assert ax.get_yscale() == "log"
    assert ax.get_title() == "pretrain loss: runs/pt"  # names the run
    raw, smoothed, validation = ax.get_lines()
    assert list(raw.get_ydata()) == [r["loss"] for r in records]
    assert list(smoothed.get_ydata()) == pytest.approx(plots.smooth([r["loss"] for r in records], 10))
    assert smoothed.get_label() == "train (smoothed)" and raw.get_label().startswith("_")  # raw: not in the legend
    assert list(validation.get_xdata()) == [50, 100]


def test_a_loss_that_is_not_positive_stays_on_a_linear_axis(tmp_path, drawn):
    plots.plot_lines(tmp_path / "x.png", "t", "y", {"a": ([1, 2], [0.0, 1.0])}, logy=True)
    assert drawn["x.png"].get_yscale() == "linear"


def test_rl_plots_held_out_as_points_and_each_reward_function(tmp_path, drawn):
    run = tmp_path / "runs" / "rl"
    steps = [
        {"step": s, "reward": 0.5, "accuracy": 0.4, "length_mean": 20, "length_max": 40}
        | {"reward/task": 0.4, "reward/task_std": 0.1, "reward/format": 0.9, "reward/format_std": 0.0}
        for s in range(1, 21)
    ]
    write_metrics(run, [{"step": 0, "eval_accuracy": 0.25}, *steps, {"step": 20, "eval_accuracy": 0.5}])
    assert plots.reward_functions(steps) == ["format", "task"]
    written = plots.plot_run(run, "rl")
    assert sorted(p.name for p in written) == ["accuracy.png", "length.png", "reward.png"]
    assert all(p.is_file() for p in written)

    held_out = [line for line in drawn["accuracy.png"].get_lines() if line.get_label() == "held-out pass@1"]
    assert len(held_out) == 1
    assert held_out[0].get_linestyle() == "None" and held_out[0].get_marker() == "o"  # points, not a line
    assert list(held_out[0].get_xdata()) == [0, 20] and list(held_out[0].get_ydata()) == [0.25, 0.5]
    assert drawn["accuracy.png"].get_title() == "RL accuracy: runs/rl"

    labels = [line.get_label() for line in drawn["reward.png"].get_lines() if not line.get_label().startswith("_")]
    assert labels == ["total (weighted) (smoothed)", "format (smoothed)", "task (smoothed)"]


def test_one_reward_function_gets_no_second_line(tmp_path, drawn):
    run = tmp_path / "rl"
    write_metrics(run, [{"step": s, "reward": 0.5, "reward/task": 0.5, "reward/task_std": 0.0} for s in (1, 2)])
    plots.plot_rl(run)
    assert [line.get_label() for line in drawn["reward.png"].get_lines()] == ["total (weighted)"]


def test_speedrun_report_has_rl_before_after_and_links_every_plot(tmp_path):
    out = tmp_path / "speedrun"
    pngs = [f"{s}/plots/{n}.png" for s in STAGES for n in ("loss", "reward")] + [
        f"eval/{s}/plots/pass_at_k.png" for s in STAGES
    ]
    for name in pngs:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(b"png")
    (out / "rl" / "plots" / "accuracy.png").write_bytes(b"png")
    rl_summary = {"before": {"all": 0.25, "arithmetic": 0.25}, "after": {"all": 0.5, "arithmetic": 0.5}}
    (out / "rl" / "summary.json").write_text(json.dumps(rl_summary | {"eval_problems": 40, "eval_samples": 4}))
    results = {s: {"benchmarks": {}} for s in STAGES}
    text = write_report(out, results, {"rl": 10.0}, {s: EvalConfig() for s in STAGES}, "cpu").read_text()

    assert "## RL held-out pass@1, before and after RL" in text
    assert "40 problems of its tasks' test split, 4 samples each" in text
    assert "| all | 25.0 | 50.0 | +25.0 |" in text
    assert "| arithmetic | 25.0 | 50.0 | +25.0 |" in text
    assert "![rl held-out pass@1 before and after](rl/plots/accuracy.png)" in text
    for name in [*pngs, "rl/plots/accuracy.png"]:
        assert f"({name})" in text, name
    assert "![sft eval pass_at_k](eval/sft/plots/pass_at_k.png)" in text


def test_matplotlib_says_nothing_on_the_terminal(tmp_path):
    """Where HOME is not writable matplotlib logs a warning ("created a temporary cache directory"), as it
    does on a first run ("building the font cache"): a plot prints nothing."""
    png = str(tmp_path / "a.png")
    code = f"from nanoseek.plots import plot_lines; plot_lines({png!r}, 't', 'y', {{'a': ([1], [2.0])}})"
    env = {"PATH": "/usr/bin:/bin", "HOME": "/proc/no-such-home", "PYTHONPATH": str(Path(plots.__file__).parents[1])}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert (tmp_path / "a.png").is_file()
