"""The simulators' speedrun (`--preset cpu-envs`): every stage runs once on a tiny model, the report's table
holds what the environments' own policies and the models scored, and a rerun skips what is done."""

from __future__ import annotations

import json
import tomllib

import pytest
from toy_speedrun import TOY_PRETRAIN_MODEL

from nanoseek.envs import HELD_OUT_SEED_START, make
from nanoseek.envs.baselines import mean_and_error, play_policy
from nanoseek.errors import InputError
from nanoseek.speedrun import speedrun
from nanoseek.speedrun_envs import envs_speedrun, load_plan
from nanoseek.train.rl import rl

NAMES = ["farm", "budget", "inventory"]
TINY = [
    *TOY_PRETRAIN_MODEL,
    "pretrain.train.steps=2",
    "pretrain.train.batch_size=4",
    "pretrain.train.seq_len=64",
    "sft.train.steps=2",
    "sft.train.batch_size=4",
    "sft.train.seq_len=128",
    "rl.train.steps=1",
    "rl.rl.prompts_per_step=2",
    "rl.rl.group_size=2",
    "rl.rl.max_new_tokens=4",
    "rl.rl.eval_problems=2",
    "envs.eval_episodes=3",
    "envs.eval_max_new_tokens=4",
    *(f"envs.transcripts.{n}=3" for n in NAMES),
    "envs.env_sft.farm.transcripts=3",
    "envs.env_sft.farm.steps=1",
    "envs.env_sft.farm.noise=0.5",
    "envs.env_sft.inventory.transcripts=2",
    "envs.env_sft.inventory.steps=1",
]


def test_envs_speedrun_end_to_end_and_rerun_skips(tmp_path, monkeypatch):
    import nanoseek.speedrun_envs as pipeline

    starts = {}  # env -> the checkpoint its RL started from

    def recording_rl(cfg, run_dir, checkpoint, **options):
        starts[cfg.rl.envs] = checkpoint
        return rl(cfg, run_dir, checkpoint, **options)

    monkeypatch.setattr(pipeline, "rl", recording_rl)
    out = tmp_path / "run"
    text = envs_speedrun("cpu-envs", out, TINY, quiet=True).read_text()
    table = [line.strip("| ").split(" | ") for line in text.splitlines() if line.startswith("| ")]
    rows = {cells[0]: cells[1:] for cells in table}
    seeds = [HELD_OUT_SEED_START + i for i in range(3)]
    for name in NAMES:
        assert (out / "rl" / name / "summary.json").exists()
        assert tomllib.loads((out / "rl" / name / "config.toml").read_text())["rl"]["envs"] == name
        # The scripted policies' cells: the environment's own episodes on the same held-out seeds, played here.
        cells = rows[name]
        for column, policy in ((0, "random"), (1, "heuristic"), (4, "oracle")):
            scores = [play_policy(make(name), policy, s).score for s in seeds]
            mean, se = mean_and_error(scores)
            assert cells[column] == f"{mean:.3f} ± {se:.3f}", (name, policy)
        assert cells[4] == "1.000 ± 0.000"
        # RL - heuristic, paired over the seeds: from the two runs' transcripts, by hand.
        episodes = {
            r: {t["seed"]: t["score"] for t in map(json.loads, (out / "eval" / name / r / "transcripts.jsonl").open())}
            for r in ("rl", "heuristic")
        }
        diffs = [episodes["rl"][s] - episodes["heuristic"][s] for s in seeds]
        mean, se = mean_and_error(diffs)
        assert cells[5] == f"{mean:+.3f} ± {se:.3f}"
        assert f"(eval/{name}/rl/{name}.png)" in text
    # The SFT data: each environment's heuristic transcripts, every one of them, shuffled together.
    data = [json.loads(line) for line in (out / "data" / "heuristic.jsonl").open()]
    assert sorted((r["env"], r["seed"]) for r in data) == sorted((n, s) for n in NAMES for s in range(3))
    assert [r["env"] for r in data] != sorted((r["env"] for r in data), key=NAMES.index)
    # farm's and inventory's own SFT: from the shared model, on their own (farm: noisy) transcripts; their RL
    # starts from it, budget's from the shared one.
    for name, n, noise in (("farm", 3, 0.5), ("inventory", 2, 0.0)):
        rows = [json.loads(line) for line in (out / "data" / f"{name}.jsonl").open()]
        assert [r["messages"] for r in rows] == [
            play_policy(make(name, noise=noise), "heuristic", s).messages for s in range(n)
        ]
        assert json.loads((out / "sft_env" / name / "summary.json").read_text())["steps"] == 1
    assert starts == {
        "farm": out / "sft_env" / "farm",
        "budget": out / "sft",
        "inventory": out / "sft_env" / "inventory",
    }
    assert "for farm, that model fine-tuned 1 more steps on 3 of farm's own heuristic transcripts (noise 0.5)" in text
    timings = json.loads((out / "timings.json").read_text())
    assert {"pretrain", "data", "sft", "data_farm", "sft_farm", *(f"rl_{n}" for n in NAMES)} <= set(timings)
    assert all(t["cpu_s"] > 0 for t in timings.values())

    # A second run finds everything done: nothing trained, generated or evaluated again.
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.suffix in (".safetensors", ".jsonl")}
    envs_speedrun("cpu-envs", out, TINY, quiet=True)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.suffix in (".safetensors", ".jsonl")} == mtimes


def test_envs_settings_are_checked_before_any_work(tmp_path):
    table = {"names": ["farm"], "transcripts": {"farm": 5}, "env_sft": {"farm": {"transcripts": 4, "steps": 2}}}
    plan = load_plan(table, ["names=budget,farm", "transcripts.budget=7", "env_sft.farm.noise=0.25"])
    assert plan.transcripts == {"farm": 5, "budget": 7}
    assert plan.env_sft == {"farm": {"transcripts": 4, "steps": 2, "noise": 0.25}}
    # the preset's table is not changed
    assert table == {"names": ["farm"], "transcripts": {"farm": 5}, "env_sft": {"farm": {"transcripts": 4, "steps": 2}}}
    bad = {
        "eval_episodes=many": "expected an integer",
        "names=farm,chess": "chess",
        "colour=red": "expected envs.FIELD=VALUE",
        "transcripts.inventory=3": "not in names",
        "env_sft.farm.noise=2": "noise must be in",
        "env_sft.farm.colour=2": "expected envs.FIELD=VALUE",
    }
    for item, message in bad.items():
        with pytest.raises(InputError, match=message):
            load_plan(table, [item])
    with pytest.raises(InputError, match="unknown field"):
        load_plan({"episodes": 3}, [])
    with pytest.raises(InputError, match="expected transcripts, steps"):
        load_plan({"names": ["farm"], "env_sft": {"farm": {"steps": 3}}}, [])
    never = tmp_path / "never-written"
    with pytest.raises(InputError, match=r"\[envs\]"):  # the task pipeline refuses the simulators' preset
        speedrun("cpu-envs", never, quiet=True)
    with pytest.raises(InputError, match="no \\[envs\\] table"):
        envs_speedrun("cpu", never, quiet=True)
    with pytest.raises(InputError, match=r"\[rl\] --set train.stepz"):
        envs_speedrun("cpu-envs", never, ["rl.train.stepz=1"], quiet=True)
    assert not never.exists()
