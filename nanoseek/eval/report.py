"""An evaluation's report.md and plots, and the side-by-side comparison of two runs.

All of it reads the summary dict that `nanoseek.eval.harness.evaluate` writes to summary.json, so
`nanoseek eval compare` works on any two run directories without the models.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from nanoseek.plots import figure, run_name

__all__ = ["compare_table", "load_summary", "overview_table", "write_plots", "write_report"]

# (key in summary["benchmarks"][name]["speed"], label, format)
SPEED_ROWS = (
    ("wall_s", "generation wall time", "{:.2f} s"),
    ("tokens_per_s", "output tokens/s", "{:.1f}"),
    ("latency_mean_s", "latency per problem, mean", "{:.3f} s"),
    ("latency_p50_s", "latency per problem, p50", "{:.3f} s"),
    ("latency_p90_s", "latency per problem, p90", "{:.3f} s"),
    ("ttft_mean_s", "time to first token, mean", "{:.3f} s"),
    ("ttft_p50_s", "time to first token, p50", "{:.3f} s"),
    ("tokens_per_correct", "tokens per correct answer", "{:.1f}"),
    ("mean_response_tokens", "response length, mean", "{:.1f} tokens"),
    ("truncated_frac", "cut off at max_new_tokens", "{:.1%}"),
)


def format_pct(value: float | None, se: float | None = None) -> str:
    """A fraction as a percentage with one decimal, "± se" when known, "–" when missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    text = f"{100 * value:.1f}"
    if se is not None and not (isinstance(se, float) and math.isnan(se)):
        text += f" ± {100 * se:.1f}"
    return text


def _fmt(value: Any, fmt: str) -> str:
    return "–" if value is None else fmt.format(value)


def _accuracy_table(metrics: dict[str, Any], ks: list[int]) -> list[str]:
    lines = ["| k | pass@k (%) | cons@k (%) |", "|--:|--:|--:|"]
    for k in ks:
        p, c = metrics.get(f"pass@{k}"), metrics.get(f"cons@{k}")
        if p is None and c is None:
            continue
        lines.append(
            f"| {k} | {format_pct(p, metrics.get(f'pass@{k}_se'))} | {format_pct(c, metrics.get(f'cons@{k}_se'))} |"
        )
    return lines


def _columns(top: int) -> list[str]:
    """pass@1, and pass@K / cons@K when there are K > 1 samples (with one sample both equal pass@1)."""
    return ["pass@1"] + ([f"pass@{top}", f"cons@{top}"] if top > 1 else [])


def _cells(m: dict[str, Any], keys: list[str]) -> str:
    return " | ".join(format_pct(m.get(key), m.get(f"{key}_se")) for key in keys)


def overview_table(summary: dict[str, Any]) -> str:
    """One line per benchmark: problems, pass@1, pass@K and cons@K (K = the samples per problem), tokens/s."""
    top = max((e["samples_per_problem"] for e in summary["benchmarks"].values()), default=1)
    keys = _columns(top)
    head = " | ".join(f"{key} (%)" for key in keys)
    lines = [f"| benchmark | problems | {head} | tokens/s |", "|---|--:|" + "--:|" * len(keys) + "--:|"]
    for name, entry in summary["benchmarks"].items():
        m, tps = entry["metrics"], entry["speed"].get("tokens_per_s")
        lines.append(f"| {name} | {entry['problems']} | {_cells(m, keys)} | {_fmt(tps, '{:.1f}')} |")
    return "\n".join(lines)


def _bench_section(name: str, entry: dict[str, Any]) -> list[str]:
    n, ks = entry["samples_per_problem"], entry["ks"]
    out = [f"## {name}", "", f"`{entry['source']}`: {entry['problems']} problems, {n} sample(s) each.", ""]
    out += _accuracy_table(entry["metrics"], ks)
    if entry.get("groups"):
        keys = _columns(max(ks))
        head = " | ".join(f"{key} (%)" for key in keys)
        out += ["", f"| group | problems | {head} |", "|---|--:|" + "--:|" * len(keys)]
        for group, m in entry["groups"].items():
            out.append(f"| {group} | {m['problems']} | {_cells(m, keys)} |")
    g = entry["grading"]
    out += [
        "",
        f"Grading of {g['samples']} samples: {g['correct']} correct, {g['wrong']} wrong, {g['no_answer']} with no "
        f"answer, {g['unparseable']} unparseable by math-verify, {g['grader_error']} grader timeouts/errors, "
        f"{g['error']} engine errors; {g['skipped_rows']} malformed rows skipped.",
        "",
        "| speed | value |",
        "|---|--:|",
    ]
    speed = entry["speed"]
    out += [f"| {label} | {_fmt(speed.get(key), fmt)} |" for key, label, fmt in SPEED_ROWS]
    return [*out, ""]


def _precision(p: dict[str, str] | None) -> str:
    return f" Weights {p['weights']}, KV cache {p['kv_cache']}, on {p['device']}." if p else ""


def write_report(out_dir: str | Path, summary: dict[str, Any]) -> Path:
    """report.md: the settings, then per benchmark the accuracy table (± standard error), grading and speed."""
    out_dir = Path(out_dir)
    s = summary["settings"]
    sampling = (
        "greedy (temperature 0), 1 sample"
        if s["temperature"] == 0
        else f"temperature {s['temperature']}, top-p {s['top_p']}, {s['samples']} samples per problem"
    )
    prompting = f"{s['few_shot']}-shot plain text" if s["few_shot"] else "chat template"
    prompting += f", instruction {s['instruction']!r}"
    if s.get("think_prefill"):
        prompting += ", <think> prefill"
    if s.get("system"):
        prompting += ", system message"
    lines = [
        f"# Evaluation of {summary.get('model') or 'a model'}",
        "",
        f"{summary['created']}; {sampling}; max {s['max_new_tokens']} new tokens; {prompting}; seed {s['seed']}; "
        f"{summary['wall_s']:.1f} s in all." + _precision(summary.get("precision")),
        "",
        "Accuracies in %, ± one standard error over problems. pass@k: unbiased estimate from all samples; "
        "cons@k: majority vote of the first k samples.",
        "",
        overview_table(summary),
        "",
    ]
    for name, entry in summary["benchmarks"].items():
        lines += _bench_section(name, entry)
    for plot in summary.get("plots", []):
        lines += [f"![{Path(plot).stem}]({plot})", ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def write_plots(out_dir: str | Path, summary: dict[str, Any], lengths: dict[str, list[int]]) -> list[Path]:
    """plots/pass_at_k.png (accuracy against k, one line per benchmark) and plots/response_length.png."""
    plots = Path(out_dir) / "plots"
    name = run_name(summary.get("model") or out_dir)  # the checkpoint evaluated, as the titles name it
    with figure(plots / "pass_at_k.png", legend_fontsize=7) as ax:
        for name, entry in summary["benchmarks"].items():
            m = entry["metrics"]
            ks = [k for k in entry["ks"] if f"pass@{k}" in m]
            ys = [100 * m[f"pass@{k}"] for k in ks]
            errs = [100 * (m.get(f"pass@{k}_se") or 0.0) for k in ks]
            line = ax.errorbar(ks, ys, yerr=errs, marker="o", markersize=3, capsize=2, label=f"{name} pass@k")
            cons = [k for k in ks if m.get(f"cons@{k}") is not None]
            if len(cons) > 1:
                cons_ys = [100 * m[f"cons@{k}"] for k in cons]
                ax.plot(cons, cons_ys, ls="--", color=line[0].get_color(), label=f"{name} cons@k")
        ax.set_xscale("log", base=2)
        all_ks = sorted({k for e in summary["benchmarks"].values() for k in e["ks"]})
        ax.set_xticks(all_ks, [str(k) for k in all_ks])
        ax.minorticks_off()
        ax.set_ylim(-2, 102)
        ax.set_xlabel("k (samples)")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"accuracy against k: {name}", fontsize=10)

    with figure(plots / "response_length.png", legend_fontsize=7) as ax:
        longest = max((max(v) for v in lengths.values() if v), default=1)
        bins = min(40, max(longest, 1))
        for name, values in lengths.items():
            if values:
                ax.hist(values, bins=bins, range=(0, max(longest, 1)), histtype="step", label=name)
        ax.set_xlabel("response length (tokens)")
        ax.set_ylabel("samples")
        ax.set_title(f"response lengths: {name}", fontsize=10)
    return [plots / "pass_at_k.png", plots / "response_length.png"]


# ----------------------------------------------------------------------------- compare
def load_summary(run: str | Path) -> dict[str, Any]:
    """A run directory's summary.json (or the file itself)."""
    path = Path(run)
    if path.is_dir():
        path = path / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run}: no summary.json (is it a `nanoseek eval` run directory?)")
    return json.loads(path.read_text(encoding="utf-8"))


def _metric_names(metrics: dict[str, Any]) -> list[str]:
    names = [m for m in metrics if "@" in m and not m.endswith("_se")]
    return sorted(names, key=lambda m: (m.split("@")[0] != "pass", int(m.split("@")[1])))


def compare_table(a: dict[str, Any], b: dict[str, Any], name_a: str = "A", name_b: str = "B") -> str:
    """A markdown table of the benchmarks and metrics both summaries have, with B - A."""
    lines = [f"| benchmark | metric | {name_a} | {name_b} | {name_b} − {name_a} |", "|---|---|--:|--:|--:|"]
    shared = [n for n in a["benchmarks"] if n in b["benchmarks"]]
    for bench in shared:
        ea, eb = a["benchmarks"][bench], b["benchmarks"][bench]
        ma, mb = ea["metrics"], eb["metrics"]
        lines.append(
            f"| {bench} | problems | {ea['problems']} | {eb['problems']} | {eb['problems'] - ea['problems']:+d} |"
        )
        for metric in _metric_names(ma):
            if metric not in mb or ma[metric] is None or mb[metric] is None:
                continue
            diff = 100 * (mb[metric] - ma[metric])
            lines.append(
                f"| {bench} | {metric} (%) | {format_pct(ma[metric], ma.get(metric + '_se'))} "
                f"| {format_pct(mb[metric], mb.get(metric + '_se'))} | {diff:+.1f} |"
            )
        for key, label in (("tokens_per_s", "output tokens/s"), ("mean_response_tokens", "response length")):
            va, vb = ea["speed"].get(key), eb["speed"].get(key)
            if va is not None and vb is not None:
                lines.append(f"| {bench} | {label} | {va:.1f} | {vb:.1f} | {vb - va:+.1f} |")
    only = sorted(set(a["benchmarks"]) ^ set(b["benchmarks"]))
    if not shared:
        lines.append("| (no shared benchmarks) | | | | |")
    if only:
        lines += ["", "Not in both runs: " + ", ".join(only)]
    return "\n".join(lines)
