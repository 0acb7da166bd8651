"""`nanoseek speedrun --preset cpu-envs`: the simulators' pipeline (issue 14), end to end.

    nanoseek speedrun --preset cpu-envs --out runs/envs
    nanoseek speedrun --preset cpu-envs --set envs.pretrained=runs/pretrain/checkpoints/step_400

A preset with an [envs] table runs this instead of the task pipeline:
1. pretraining (the [pretrain] table), or reuse of a checkpoint (envs.pretrained);
2. the heuristic's SFT transcripts of each environment (`nanoseek data make --env E --policy heuristic`),
   envs.transcripts of each, shuffled into one file;
3. one SFT on that file (the [sft] table): one model that has seen every environment's opening;
4. RL from it on each environment alone (the [rl] table with rl.envs = E, then envs.rl_overrides[E]);
5. `nanoseek eval --env E` on envs.eval_episodes held-out seeds: the environment's own random, heuristic and
   oracle policies, the SFT model and E's RL model, greedy by default (envs.eval_temperature).
OUT/report.md gets the table: normalised score (0 = random, 1 = oracle) mean ± s.e. per policy, the paired
differences RL - heuristic and RL - SFT on the same seeds, and each stage's wall and CPU seconds.
Every stage resumes or is skipped when done, as in the task speedrun (nanoseek/speedrun.py).
"""

from __future__ import annotations

import dataclasses
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

from nanoseek.envs import make
from nanoseek.envs.baselines import mean_and_error, play_policy
from nanoseek.errors import InputError
from nanoseek.speedrun import load_preset, split_overrides, stage_config, stage_done
from nanoseek.train.rl import rl
from nanoseek.train.stages import pretrain, sft

POLICIES = ("random", "heuristic", "oracle")  # each environment's own, played with no model
ROWS = ("random", "heuristic", "sft", "rl", "oracle")  # the table's rows, in the order


@dataclasses.dataclass
class EnvsPlan:
    """The [envs] table of a preset."""

    names: list[str] = dataclasses.field(default_factory=lambda: ["farm", "budget", "inventory"])
    transcripts: dict[str, int] = dataclasses.field(default_factory=dict)  # heuristic episodes per env (1000)
    eval_episodes: int = 200
    eval_temperature: float = 0.0
    eval_max_new_tokens: int = 12
    pretrained: str = ""  # a checkpoint to start SFT from; "" = pretrain here with the [pretrain] table
    rl_overrides: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # SECTION.FIELD=V per env


def load_plan(table: dict[str, Any], overrides: list[str]) -> EnvsPlan:
    """The [envs] table, then --set envs.FIELD=V (names=a,b; transcripts.ENV=N), checked before any work."""
    values = {**table, "transcripts": dict(table.get("transcripts", {}))}
    for item in overrides:
        dotted, _, value = item.partition("=")
        field, *env = dotted.split(".")
        where = f"--set envs.{item}"
        if field == "transcripts" and len(env) == 1:
            values["transcripts"][env[0]] = _number(int, value, where)
        elif env or field not in ("names", "eval_episodes", "eval_temperature", "eval_max_new_tokens", "pretrained"):
            raise InputError(
                f"{where}: expected envs.FIELD=VALUE (names, eval_episodes, eval_temperature, "
                "eval_max_new_tokens, pretrained) or envs.transcripts.ENV=N"
            )
        elif field == "names":
            values["names"] = [n.strip() for n in value.split(",") if n.strip()]
        else:
            number = {"eval_episodes": int, "eval_max_new_tokens": int, "eval_temperature": float}.get(field)
            values[field] = _number(number, value, where) if number else value
    known = {f.name for f in dataclasses.fields(EnvsPlan)}
    if unknown := set(values) - known:
        raise InputError(f"[envs]: unknown field(s) {sorted(unknown)}; known: {sorted(known)}")
    plan = EnvsPlan(**values)
    if not plan.names:
        raise InputError("[envs] names: at least one environment")
    for name in plan.names:
        make(name)  # an unknown environment is named before any work
    for field in ("transcripts", "rl_overrides"):
        if extra := set(getattr(plan, field)) - set(plan.names):
            raise InputError(f"[envs] {field}: {sorted(extra)} not in names {plan.names}")
    if plan.eval_episodes < 1 or any(n < 1 for n in plan.transcripts.values()):
        raise InputError("[envs] eval_episodes and transcripts: at least 1")
    return plan


def _number(kind: type, value: str, where: str) -> Any:
    try:
        return kind(value)
    except ValueError:
        raise InputError(f"{where}: expected {'an integer' if kind is int else 'a number'}, got {value!r}") from None


def write_transcripts(plan: EnvsPlan, path: Path, seed: int = 0) -> None:
    """Each environment's heuristic episodes on seeds seed, seed+1, ... (the rows of `nanoseek data make --env
    E --policy heuristic`), shuffled into one SFT file: its first rows, SFT's validation, hold every env."""
    rows = []
    for name in plan.names:
        env = make(name)
        for i in range(plan.transcripts.get(name, 1000)):
            t = play_policy(env, "heuristic", seed + i)
            rows.append({**t.sft_record(), "env": name, "seed": t.seed, "policy": t.policy, "score": t.score})
    random.Random(seed).shuffle(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)  # complete or absent: a rerun after an interruption writes it again


def evaluate(plan: EnvsPlan, name: str, out_dir: Path, checkpoint: Path | None, policy: str | None) -> dict[str, Any]:
    """`nanoseek eval --env name` by a scripted policy or a checkpoint; cached in out_dir/summary.json."""
    from nanoseek.engine import Engine, SamplingParams
    from nanoseek.eval.episodes import evaluate_env
    from nanoseek.loading import load_checkpoint

    if (out_dir / "summary.json").exists():
        return json.loads((out_dir / "summary.json").read_text())
    engine = tokenizer = params = None
    if checkpoint is not None:
        model, tokenizer = load_checkpoint(checkpoint)
        engine = Engine(model, tokenizer, max_batch=plan.eval_episodes)
        params = SamplingParams(max_new_tokens=plan.eval_max_new_tokens, temperature=plan.eval_temperature, seed=0)
    return evaluate_env(
        name, {}, plan.eval_episodes, out_dir, engine=engine, tokenizer=tokenizer, params=params, policy=policy
    )


def envs_speedrun(
    preset: str = "cpu-envs",
    out: str | Path = "runs/speedrun-envs",
    overrides: list[str] | None = None,
    quiet: bool = False,
) -> Path:
    """Run the pipeline of the module docstring into `out`; returns OUT/report.md."""
    spec = load_preset(preset)
    if "envs" not in spec:
        raise InputError(f"preset {preset}: no [envs] table (the task pipeline is `nanoseek.speedrun.speedrun`)")
    per_stage = split_overrides(overrides or [])
    plan = load_plan(spec["envs"], per_stage.get("envs", []))
    pt = stage_config("pretrain", spec, per_stage["pretrain"])  # every config checked before any work
    sft_cfg = stage_config("sft", spec, per_stage["sft"])
    rl_cfgs = {
        n: stage_config("rl", spec, [*per_stage["rl"], f"rl.envs={n}", *plan.rl_overrides.get(n, [])])
        for n in plan.names
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings_path = out / "timings.json"
    timings: dict[str, dict[str, float]] = json.loads(timings_path.read_text()) if timings_path.exists() else {}

    def timed(name: str, fn, *args: Any, **kwargs: Any) -> Any:
        """Run fn, adding its wall and CPU seconds (this process, all threads) to timings[name]."""
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn(*args, **kwargs)
        entry = timings.setdefault(name, {"wall_s": 0.0, "cpu_s": 0.0})
        entry["wall_s"] += time.perf_counter() - wall
        entry["cpu_s"] += time.process_time() - cpu
        timings_path.write_text(json.dumps(timings, indent=2))
        return result

    def say(msg: str) -> None:
        if not quiet:
            print(f"[speedrun] {msg}", file=sys.stderr, flush=True)

    # 1. the pretrained model.
    start = Path(plan.pretrained) if plan.pretrained else out / "pretrain"
    if not plan.pretrained and not stage_done(start, pt.train.steps):
        say(f"pretrain: {pt.train.steps} steps")
        timed("pretrain", pretrain, pt, start, resume=True, quiet=quiet)
    # 2-3. the heuristics' transcripts, one SFT on all of them.
    data = out / "data" / "heuristic.jsonl"
    if not data.exists():
        say(f"data: heuristic transcripts of {', '.join(plan.names)}")
        timed("data", write_transcripts, plan, data)
    sft_cfg.data.files = [str(data)]
    if not stage_done(out / "sft", sft_cfg.train.steps):
        say(f"sft: {sft_cfg.train.steps} steps")
        timed("sft", sft, sft_cfg, out / "sft", start, resume=True, quiet=quiet)
    # 4. RL on each environment alone, from the SFT model.
    for name, cfg in rl_cfgs.items():
        if not stage_done(out / "rl" / name, cfg.train.steps):
            say(f"rl {name}: {cfg.train.steps} steps")
            timed(f"rl_{name}", rl, cfg, out / "rl" / name, out / "sft", resume=True, quiet=quiet)
    # 5. every policy on the same held-out seeds.
    for name in plan.names:
        say(f"eval {name}")
        runs: dict[str, tuple[Path | None, str | None]] = {p: (None, p) for p in POLICIES}
        runs |= {"sft": (out / "sft", None), "rl": (out / "rl" / name, None)}
        for row in ROWS:
            timed(f"eval_{name}", evaluate, plan, name, out / "eval" / name / row, *runs[row])
    report = out / "report.md"
    report.write_text(report_text(plan, out, timings, preset))
    say(f"report: {report}")
    return report


def episode_scores(eval_dir: Path) -> dict[int, float]:
    """{seed: normalised score} of an eval run's transcripts."""
    with open(eval_dir / "transcripts.jsonl", encoding="utf-8") as f:
        return {(r := json.loads(line))["seed"]: r["score"] for line in f}


def paired(a: dict[int, float], b: dict[int, float]) -> tuple[float, float]:
    """Mean ± s.e. of a - b over the seeds both played."""
    return mean_and_error([a[s] - b[s] for s in sorted(set(a) & set(b))])


def report_text(plan: EnvsPlan, out: Path, timings: dict[str, dict[str, float]], preset: str) -> str:
    sampling = "greedy" if plan.eval_temperature == 0 else f"at temperature {plan.eval_temperature}"
    lines = [
        f"# nanoseek speedrun (preset `{preset}`): simulators",
        "",
        f"Normalised score on {plan.eval_episodes} held-out seeds per environment (0 = the mean of random "
        f"episodes on the seed, 1 = the oracle's score), mean ± standard error; the models {sampling}, at most "
        f"{plan.eval_max_new_tokens} tokens a turn. The differences are paired over the same seeds.",
        "",
        "| env | " + " | ".join({"sft": "SFT", "rl": "RL"}.get(r, r) for r in ROWS) + " | RL - heuristic | RL - SFT |",
        "|---|" + "---|" * (len(ROWS) + 2),
    ]
    for name in plan.names:
        summaries = {r: json.loads((out / "eval" / name / r / "summary.json").read_text()) for r in ROWS}
        scores = {r: episode_scores(out / "eval" / name / r) for r in ("heuristic", "sft", "rl")}
        cells = [f"{summaries[r]['score']:.3f} ± {summaries[r]['score_se']:.3f}" for r in ROWS]
        for other in ("heuristic", "sft"):
            mean, se = paired(scores["rl"], scores[other])
            cells.append(f"{mean:+.3f} ± {se:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "| stage | wall (s) | CPU (s) |", "|---|---|---|"]
    lines += [f"| {k} | {v['wall_s']:.0f} | {v['cpu_s']:.0f} |" for k, v in timings.items()]
    total = {k: sum(v[k] for v in timings.values()) for k in ("wall_s", "cpu_s")}
    lines += [f"| all | {total['wall_s']:.0f} | {total['cpu_s']:.0f} |", ""]
    pngs = [out / "eval" / n / r / f"{n}.png" for n in plan.names for r in ("sft", "rl")]
    if links := [
        f"![{p.parent.parent.name} {p.parent.name}]({p.relative_to(out).as_posix()})" for p in pngs if p.exists()
    ]:
        lines += ["## Plots: the first held-out episode beside the oracle's", "", *links, ""]
    return "\n".join(lines)
