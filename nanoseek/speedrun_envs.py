"""`nanoseek speedrun --preset cpu-envs`: the simulators' pipeline (issue 14), end to end.

    nanoseek speedrun --preset cpu-envs --out runs/envs
    nanoseek speedrun --preset cpu-envs --set envs.pretrained=runs/pretrain/checkpoints/step_400

A preset with an [envs] table runs this instead of the task pipeline:
1. pretraining (the [pretrain] table), or reuse of a checkpoint (envs.pretrained);
2. the heuristic's SFT transcripts of each environment (`nanoseek data make --env E --policy heuristic`),
   envs.transcripts of each, shuffled into one file;
3. one SFT on that file (the [sft] table): one model that has seen every environment's opening; then, for each
   environment in envs.env_sft, that model fine-tuned again on the environment's own heuristic transcripts
   (`transcripts` of them, the heuristic's `noise` knob, `steps` steps of the [sft] table's settings);
4. RL on each environment alone (the [rl] table with rl.envs = E, then envs.rl_overrides[E]), from E's own
   SFT model where it has one, else the shared one;
5. `nanoseek eval --env E` on envs.eval_episodes held-out seeds: the environment's own random, heuristic and
   oracle policies, E's SFT model (the one its RL started from) and E's RL model, greedy by default
   (envs.eval_temperature).
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
    # env -> {"transcripts": N, "noise": X, "steps": S}: a second SFT on that env alone (module docstring)
    env_sft: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)


ENV_SFT_FIELDS = {"transcripts": int, "noise": float, "steps": int}


def load_plan(table: dict[str, Any], overrides: list[str]) -> EnvsPlan:
    """The [envs] table, then --set envs.FIELD=V (names=a,b; transcripts.ENV=N; env_sft.ENV.FIELD=V), checked
    before any work."""
    values = {
        **table,
        "transcripts": dict(table.get("transcripts", {})),
        "env_sft": {env: dict(spec) for env, spec in table.get("env_sft", {}).items()},
    }
    for item in overrides:
        dotted, _, value = item.partition("=")
        field, *env = dotted.split(".")
        where = f"--set envs.{item}"
        if field == "transcripts" and len(env) == 1:
            values["transcripts"][env[0]] = _number(int, value, where)
        elif field == "env_sft" and len(env) == 2 and env[1] in ENV_SFT_FIELDS:
            values["env_sft"].setdefault(env[0], {})[env[1]] = _number(ENV_SFT_FIELDS[env[1]], value, where)
        elif env or field not in ("names", "eval_episodes", "eval_temperature", "eval_max_new_tokens", "pretrained"):
            raise InputError(
                f"{where}: expected envs.FIELD=VALUE (names, eval_episodes, eval_temperature, "
                "eval_max_new_tokens, pretrained), envs.transcripts.ENV=N or envs.env_sft.ENV.FIELD=V"
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
    for field in ("transcripts", "rl_overrides", "env_sft"):
        if extra := set(getattr(plan, field)) - set(plan.names):
            raise InputError(f"[envs] {field}: {sorted(extra)} not in names {plan.names}")
    if plan.eval_episodes < 1 or any(n < 1 for n in plan.transcripts.values()):
        raise InputError("[envs] eval_episodes and transcripts: at least 1")
    for name, spec in plan.env_sft.items():
        if not {"transcripts", "steps"} <= set(spec) <= set(ENV_SFT_FIELDS):
            raise InputError(f"[envs] env_sft.{name}: expected transcripts, steps (and noise), got {sorted(spec)}")
        if spec["transcripts"] < 1 or spec["steps"] < 1:
            raise InputError(f"[envs] env_sft.{name}: transcripts and steps at least 1")
        make(name, noise=spec.get("noise", 0.0))  # a noise outside [0, 1] is named here
    return plan


def _number(kind: type, value: str, where: str) -> Any:
    try:
        return kind(value)
    except ValueError:
        raise InputError(f"{where}: expected {'an integer' if kind is int else 'a number'}, got {value!r}") from None


def heuristic_rows(name: str, n: int, noise: float = 0.0, seed: int = 0) -> list[dict[str, Any]]:
    """The heuristic's episodes of env `name` on seeds seed, seed+1, ...: the rows of `nanoseek data make --env
    NAME --policy heuristic --set noise=NOISE`."""
    env = make(name, noise=noise)
    rows = []
    for i in range(n):
        t = play_policy(env, "heuristic", seed + i)
        rows.append({**t.sft_record(), "env": name, "seed": t.seed, "policy": t.policy, "score": t.score})
    return rows


def write_transcripts(plan: EnvsPlan, path: Path, seed: int = 0) -> None:
    """Each environment's heuristic episodes, shuffled into one SFT file: its first rows, SFT's validation, hold
    every env."""
    rows = [row for name in plan.names for row in heuristic_rows(name, plan.transcripts.get(name, 1000), seed=seed)]
    random.Random(seed).shuffle(rows)
    write_rows(rows, path)


def write_env_transcripts(name: str, spec: dict[str, Any], path: Path) -> None:
    """The transcripts of env_sft's entry `spec` for env `name` (its own SFT's data)."""
    write_rows(heuristic_rows(name, spec["transcripts"], spec.get("noise", 0.0)), path)


def write_rows(rows: list[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)  # complete or absent: a rerun after an interruption writes it again


def evaluate(plan: EnvsPlan, name: str, out_dir: Path, checkpoint: Path | None, policy: str | None) -> dict[str, Any]:
    """`nanoseek eval --env name` by a scripted policy or a checkpoint; cached in out_dir/summary.json."""
    from nanoseek.engine import Engine, SamplingParams
    from nanoseek.eval.episodes import evaluate_env
    from nanoseek.loading import load_for_inference

    if (out_dir / "summary.json").exists():
        return json.loads((out_dir / "summary.json").read_text())
    engine = tokenizer = params = None
    if checkpoint is not None:
        model, tokenizer, _ = load_for_inference(checkpoint)
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
    env_sft_cfgs = {
        n: stage_config("sft", spec, [*per_stage["sft"], f"train.steps={s['steps']}"]) for n, s in plan.env_sft.items()
    }
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
    # 3b. each env_sft environment's own SFT, from the shared one, on its own (noisy) heuristic transcripts.
    sft_of = {name: out / "sft" for name in plan.names}
    for name, cfg in env_sft_cfgs.items():
        spec_n = plan.env_sft[name]
        env_data = out / "data" / f"{name}.jsonl"
        if not env_data.exists():
            say(f"data {name}: {spec_n['transcripts']} heuristic transcripts, noise {spec_n.get('noise', 0.0)}")
            timed(f"data_{name}", write_env_transcripts, name, spec_n, env_data)
        cfg.data.files = [str(env_data)]
        sft_of[name] = out / "sft_env" / name
        if not stage_done(sft_of[name], cfg.train.steps):
            say(f"sft {name}: {cfg.train.steps} steps")
            timed(f"sft_{name}", sft, cfg, sft_of[name], out / "sft", resume=True, quiet=quiet)
    # 4. RL on each environment alone, from its SFT model.
    for name, cfg in rl_cfgs.items():
        if not stage_done(out / "rl" / name, cfg.train.steps):
            say(f"rl {name}: {cfg.train.steps} steps")
            timed(f"rl_{name}", rl, cfg, out / "rl" / name, sft_of[name], resume=True, quiet=quiet)
    # 5. every policy on the same held-out seeds.
    for name in plan.names:
        say(f"eval {name}")
        runs: dict[str, tuple[Path | None, str | None]] = {p: (None, p) for p in POLICIES}
        runs |= {"sft": (sft_of[name], None), "rl": (out / "rl" / name, None)}
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
        "SFT is the model RL started from: the one SFT on every environment's heuristic transcripts"
        + "".join(
            f"; for {name}, that model fine-tuned {e['steps']} more steps on {e['transcripts']} of {name}'s own"
            f" heuristic transcripts (noise {e.get('noise', 0.0):g})"
            for name, e in plan.env_sft.items()
        )
        + ".",
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
