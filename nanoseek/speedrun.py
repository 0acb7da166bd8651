"""The whole R1-Zero-style pipeline in one command: tokenizer, pretraining, SFT, RL, evaluation.

    nanoseek speedrun                        # preset cpu: the tiny model on the built-in tasks, 2 CPU cores
    nanoseek speedrun --preset gpu --out runs/gpu
    nanoseek speedrun --set rl.rl.group_size=4 --set sft.train.steps=100

Each stage writes its own run directory under OUT and resumes from its latest
checkpoint; a stage whose summary shows all its steps done is skipped, so running
the command again after an interruption continues where it stopped. The run ends
with OUT/report.md: accuracy and speed after each stage, wall times, and the plots.

A preset (configs/cpu.toml, configs/gpu.toml) holds one table per stage, each a RunConfig
like a --config file, and an [eval] table shared by the stages' eval sections (each stage's
model is evaluated with its own: the pretrained model few-shot). `--set STAGE.SECTION.FIELD=V`
overrides one stage's setting, `--set eval.FIELD=V` every stage's evaluation.

Under torchrun (`torchrun --standalone --nproc_per_node=8 -m nanoseek speedrun --preset gpu`)
every training stage runs data-parallel; rank 0 alone trains the tokenizer, evaluates and writes
the report, and the other ranks finish once RL is done.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

from nanoseek.config import EvalConfig, RunConfig, parse_task_weights
from nanoseek.config_toml import load_run_config, split_override
from nanoseek.errors import InputError, reading, unknown
from nanoseek.eval.harness import evaluate_checkpoint
from nanoseek.eval.report import format_pct
from nanoseek.loading import pick_device
from nanoseek.tasks.corpus import pretrain_texts
from nanoseek.tokenizer import Tokenizer
from nanoseek.train import distributed
from nanoseek.train.rl import rl, rl_defaults
from nanoseek.train.stages import pretrain, sft, sft_defaults

STAGES = ("pretrain", "sft", "rl")


def load_preset(name_or_path: str) -> dict[str, Any]:
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        with reading(path):
            text, where = path.read_text(encoding="utf-8"), str(path)
    else:
        try:
            text = resources.files("nanoseek.configs").joinpath(f"{name_or_path}.toml").read_text()
        except FileNotFoundError:
            raise unknown("speedrun preset", name_or_path, ["cpu", "gpu", "cpu-envs", "FILE.toml"]) from None
        where = f"preset {name_or_path}"
    try:
        spec = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"{where}: {e}") from None
    extra = set(spec) - {*STAGES, "eval", "envs"}
    if extra:
        raise InputError(f"{where}: unknown table(s) {sorted(extra)}; expected {[*STAGES, 'eval', 'envs']}")
    return spec


def split_overrides(overrides: list[str]) -> dict[str, list[str]]:
    """Each stage's --set items: 'sft.train.steps=5' -> {'sft': ['train.steps=5']}; 'eval.k=8' goes to every stage;
    'envs.FIELD=V' to the simulators' pipeline (nanoseek/speedrun_envs.py)."""
    syntax = f"STAGE.SECTION.FIELD=VALUE with STAGE in {[*STAGES, 'eval', 'envs']}"
    out: dict[str, list[str]] = {s: [] for s in STAGES}
    for item in overrides:
        (stage, *path), value = split_override(item, syntax)
        if stage == "eval" and path:
            for s in STAGES:
                if (key := _shared_eval_key(path[0], s)) is not None:
                    out[s].append(".".join(["eval", key, *path[1:]]) + f"={value}")
        elif stage == "envs" and path:
            out.setdefault("envs", []).append(".".join(path) + f"={value}")
        elif stage in out and path:
            out[stage].append(".".join(path) + f"={value}")
        else:
            raise InputError(f"--set {item!r}: expected {syntax}")
    return out


def _shared_eval_key(key: str, stage: str) -> str | None:
    """Where a key of the shared [eval] table goes in a stage's eval section: the same key, except
    few_shot_base, the pretrained model's few_shot (a base model has never seen the chat template)."""
    if key == "few_shot_base":
        return "few_shot" if stage == "pretrain" else None
    return key


def stage_config(stage: str, spec: dict[str, Any], overrides: list[str]) -> RunConfig:
    """The stage's defaults < the preset's [eval] table < its [STAGE] table < --set."""
    base = {"pretrain": RunConfig, "sft": sft_defaults, "rl": rl_defaults}[stage]()
    # Short answers on 200 problems; the pretrained model has never seen the chat template: it is
    # prompted few-shot, as the R1 paper evaluates base models.
    base.eval = EvalConfig(n_problems=200, max_new_tokens=128, few_shot=3 if stage == "pretrain" else 0)
    shared = {k: v for key, v in spec.get("eval", {}).items() if (k := _shared_eval_key(key, stage)) is not None}
    table = dict(spec.get(stage, {}))
    own = table.get("eval", {})
    table["eval"] = {**shared, **own} if isinstance(own, dict) else own  # (not a table: named by load_run_config)
    try:
        return load_run_config(base, values=table, overrides=overrides)
    except ValueError as e:
        raise InputError(f"[{stage}] {e}") from None


def stage_done(run_dir: Path, steps: int) -> bool:
    """Whether the stage's run in `run_dir` finished: all `steps`, or an RL run that ended at rl.max_samples."""
    summary = run_dir / "summary.json"
    if not summary.exists():
        return False
    done = json.loads(summary.read_text())
    return done.get("finished", False) or done.get("steps", -1) >= steps


def evaluate_stage(checkpoint: Path, out_dir: Path, cfg: EvalConfig, quiet: bool) -> dict[str, Any]:
    """The stage's model on the held-out benchmarks; cached in out_dir/summary.json."""
    summary_path = out_dir / "summary.json"
    if summary_path.exists():
        return json.loads(summary_path.read_text())
    options = dataclasses.asdict(cfg) | {"quiet": quiet}
    return evaluate_checkpoint(checkpoint, None, options.pop("benches"), out_dir, **options)


def speedrun(
    preset: str = "cpu", out: str | Path = "runs/speedrun", overrides: list[str] | None = None, quiet: bool = False
) -> Path:
    spec = load_preset(preset)
    per_stage = split_overrides(overrides or [])
    if "envs" in spec or "envs" in per_stage:  # the simulators' pipeline: nanoseek.speedrun_envs
        raise InputError(f"preset {preset}: [envs] / --set envs.* belong to the simulators' speedrun (speedrun_envs)")
    configs = {s: stage_config(s, spec, per_stage[s]) for s in STAGES}  # validate everything before starting
    topo, _ = distributed.setup(pick_device(configs["pretrain"].train.device))
    main = topo.is_main
    quiet = quiet or not main
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings_path = out / "timings.json"
    timings: dict[str, float] = json.loads(timings_path.read_text()) if timings_path.exists() else {}

    def timed(name: str, fn, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0
        if main:
            timings_path.write_text(json.dumps(timings, indent=2))
        return result

    def say(msg: str) -> None:
        if not quiet:
            print(f"[speedrun] {msg}", file=sys.stderr, flush=True)

    # 1. tokenizer: trained once on the pretraining corpus, shared by every stage.
    pt = configs["pretrain"]
    tok_dir = out / "tokenizer"
    if main and not (tok_dir / "tokenizer.json").exists():

        def train_tokenizer() -> None:
            texts = pretrain_texts(
                min(pt.data.builtin_examples, 20000),
                seed=pt.train.seed,
                weights=parse_task_weights(pt.data.tasks, "data.tasks"),
            )
            Tokenizer.train(texts, pt.data.vocab_size).save(tok_dir)

        say(f"tokenizer: vocab {pt.data.vocab_size}")
        timed("tokenizer", train_tokenizer)
    if main and not (out / "pretrain" / "tokenizer" / "tokenizer.json").exists():
        shutil.copytree(tok_dir, out / "pretrain" / "tokenizer", dirs_exist_ok=True)
    distributed.barrier()  # the other ranks read the tokenizer rank 0 wrote

    # 2-4. the training stages, each resumable and skipped when complete.
    runs = {
        "pretrain": lambda: pretrain(pt, out / "pretrain", resume=True, quiet=quiet),
        "sft": lambda: sft(configs["sft"], out / "sft", out / "pretrain", resume=True, quiet=quiet),
        "rl": lambda: rl(configs["rl"], out / "rl", out / "sft", resume=True, quiet=quiet),
    }
    for stage in STAGES:
        if stage_done(out / stage, configs[stage].train.steps):
            say(f"{stage}: complete, skipped")
            continue
        say(f"{stage}: {configs[stage].train.steps} steps")
        timed(stage, runs[stage])

    # 5. evaluation of every stage's model on the same held-out problems, on rank 0.
    report = out / "report.md"
    if not main:
        return report
    results = {}
    for stage in STAGES:
        say(f"eval: {stage} model")
        results[stage] = timed(
            f"eval_{stage}",
            evaluate_stage,
            out / stage,
            out / "eval" / stage,
            configs[stage].eval,
            quiet=quiet,
        )
    report = write_report(out, results, timings, {s: configs[s].eval for s in STAGES}, preset)
    say(f"report: {report}")
    return report


def _fmt_pct(summary: dict[str, Any], key: str) -> str:
    return format_pct(summary.get(key), summary.get(f"{key}_se"))


def write_report(
    out: Path, results: dict[str, dict[str, Any]], timings: dict[str, float], evals: dict[str, EvalConfig], preset: str
) -> Path:
    final = evals[STAGES[-1]]  # the settings every stage shares unless its own were set
    k = final.k
    few_shot = [{"pretrain": "pretrained"}.get(s, s) for s in STAGES if evals[s].few_shot]
    prompting = f"the {' and '.join(few_shot)} model{'s' if len(few_shot) > 1 else ''} few-shot, the others"
    lines = [
        f"# nanoseek speedrun (preset `{preset}`)",
        "",
        f"Held-out problems: {final.n_problems} per benchmark; {k} samples each at temperature "
        f"{final.temperature} ({prompting if few_shot else 'every model'} through the chat template). "
        "Accuracy in %, ± one standard error.",
        "",
    ]
    benches = sorted({b for res in results.values() for b in res.get("benchmarks", {})})
    for bench in benches:
        lines += [
            f"## {bench}",
            "",
            f"| stage | pass@1 | pass@{k} | cons@{k} | output tokens/s | mean length (tokens) | stage time (s) |",
            "|---|---|---|---|---|---|---|",
        ]
        for stage, res in results.items():
            entry = res.get("benchmarks", {}).get(bench, {})
            m, speed = entry.get("metrics", {}), entry.get("speed", {})
            lines.append(
                f"| {stage} | {_fmt_pct(m, 'pass@1')} | {_fmt_pct(m, f'pass@{k}')} | "
                f"{_fmt_pct(m, f'cons@{k}')} | {speed.get('tokens_per_s') or 0:,.0f} | "
                f"{speed.get('mean_response_tokens') or 0:.0f} | {timings.get(stage, 0):.0f} |"
            )
        groups = sorted(
            {g for res in results.values() for g in res.get("benchmarks", {}).get(bench, {}).get("groups", {})}
        )
        if groups:
            lines += [
                "",
                "pass@1 per task:",
                "",
                "| stage | " + " | ".join(groups) + " |",
                "|---|" + "---|" * len(groups),
            ]
            for stage, res in results.items():
                per = res.get("benchmarks", {}).get(bench, {}).get("groups", {})
                lines.append(f"| {stage} | " + " | ".join(_fmt_pct(per.get(g, {}), "pass@1") for g in groups) + " |")
        lines.append("")
    total = sum(timings.values())
    lines += [
        f"Wall time: {total / 60:.1f} min in all ("
        + ", ".join(f"{name} {sec:.0f} s" for name, sec in timings.items())
        + ").",
        "",
    ]
    lines += rl_held_out_section(out)
    lines += plots_section(out)
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def rl_held_out_section(out: Path) -> list[str]:
    """RL's own before/after figure: held-out pass@1 on its tasks' test split (or rl.eval_file), measured
    by the RL stage before its first step and after its last (RLConfig.eval_*), and its accuracy plot."""
    summary_path = out / "rl" / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    before, after = summary.get("before"), summary.get("after")
    if not before or not after:
        return []
    samples = summary.get("eval_samples", "?")
    lines = [
        "## RL held-out pass@1, before and after RL",
        "",
        f"On RL's own held-out problems ({summary.get('eval_problems', '?')} problems of its tasks' test split, "
        f"{samples} sample{'' if samples == 1 else 's'} each), in %:",
        "",
        "| task | before RL | after RL | change (points) |",
        "|---|---|---|---|",
    ]
    for task in sorted(before, key=lambda t: (t != "all", t)):
        if task in after:
            b, a = 100 * before[task], 100 * after[task]
            lines.append(f"| {task} | {b:.1f} | {a:.1f} | {a - b:+.1f} |")
    if (out / "rl" / "plots" / "accuracy.png").exists():
        lines += ["", "![rl held-out pass@1 before and after](rl/plots/accuracy.png)"]
    return [*lines, ""]


def plots_section(out: Path) -> list[str]:
    """Every plot the run wrote, linked: each stage's training plots, then its model's evaluation plots."""
    lines: list[str] = []
    for stage in STAGES:
        for folder, label in ((Path(stage) / "plots", stage), (Path("eval") / stage / "plots", f"{stage} eval")):
            lines += [
                f"![{label} {png.stem}]({folder.as_posix()}/{png.name})" for png in sorted((out / folder).glob("*.png"))
            ]
    return ["## Plots", "", *lines, ""] if lines else []
