"""The speedrun: every stage runs once, the report has a row per stage, a rerun skips what is done."""

from __future__ import annotations

import dataclasses
import json

import pytest
from toy_speedrun import TOY_PRETRAIN_MODEL

from nanoseek.config import EvalConfig
from nanoseek.config_toml import run_config_to_toml
from nanoseek.speedrun import STAGES, load_preset, speedrun, split_overrides, stage_config

TINY = [
    *TOY_PRETRAIN_MODEL,
    "pretrain.data.vocab_size=300",
    "pretrain.train.steps=3",
    "pretrain.train.batch_size=4",
    "pretrain.train.seq_len=64",
    "sft.train.steps=2",
    "sft.train.batch_size=4",
    "sft.train.seq_len=128",
    "sft.data.builtin_examples=50",
    "rl.train.steps=2",
    "rl.rl.prompts_per_step=2",
    "rl.rl.group_size=2",
    "rl.rl.max_new_tokens=8",
    "rl.rl.eval_problems=4",
    "rl.rl.eval_samples=1",
    "eval.n_problems=4",
    "eval.k=2",
    "eval.max_new_tokens=8",
    "eval.few_shot_base=1",
]


def test_speedrun_end_to_end_and_rerun_skips(tmp_path):
    out = tmp_path / "run"
    report = speedrun("cpu", out, TINY, quiet=True)
    text = report.read_text()
    for stage in ("pretrain", "sft", "rl"):
        assert f"| {stage} |" in text
        assert (out / stage / "summary.json").exists()
        assert (out / "eval" / stage / "summary.json").exists()
    assert "![pretrain loss](pretrain/plots/loss.png)" in text
    # RL's own before/after figure, and every plot of the run linked (the evaluations' too).
    assert "## RL held-out pass@1, before and after RL" in text and "| all | " in text
    for png in out.rglob("*.png"):
        assert f"({png.relative_to(out).as_posix()})" in text, png
    # Each stage's model is evaluated with its config's eval section: the shared [eval] and --set eval.*
    # settings, and few-shot prompts for the pretrained model only (eval.few_shot_base).
    settings = {s: json.loads((out / "eval" / s / "summary.json").read_text())["settings"] for s in STAGES}
    assert [settings[s]["few_shot"] for s in STAGES] == [1, 0, 0]
    assert all(
        (settings[s]["k"], settings[s]["n_problems"], settings[s]["max_new_tokens"]) == (2, 4, 8) for s in STAGES
    )
    assert '[eval]\nbenches = ["tasks"]\nk = 2\n' in (out / "sft" / "config.toml").read_text()
    assert "4 per benchmark; 2 samples each at temperature 0.6 (the pretrained model few-shot, the others" in text
    timings = json.loads((out / "timings.json").read_text())
    assert {"tokenizer", "pretrain", "sft", "rl"} <= set(timings)

    # A second run finds every stage complete: nothing is trained or evaluated again.
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("model.safetensors")}
    speedrun("cpu", out, TINY, quiet=True)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("model.safetensors")} == mtimes
    assert json.loads((out / "timings.json").read_text())["pretrain"] == timings["pretrain"]


def test_presets_load_and_bad_settings_are_named():
    for name in ("cpu", "gpu"):
        spec = load_preset(name)
        assert {"pretrain", "sft", "rl", "eval"} <= set(spec)
    with pytest.raises(ValueError, match="unknown speedrun preset"):
        load_preset("tpu")
    with pytest.raises(ValueError, match="STAGE"):
        split_overrides(["train.steps=3"])
    with pytest.raises(ValueError, match=r"\[sft\] --set train.learning_rate"):
        speedrun("cpu", "/nonexistent/never-written", ["sft.train.learning_rate=1"], quiet=True)


def test_the_shared_eval_table_goes_to_every_stage():
    assert split_overrides(["eval.k=8", "sft.train.steps=5", "eval.few_shot_base=2", "rl.eval.k=1"]) == {
        "pretrain": ["eval.k=8", "eval.few_shot=2"],
        "sft": ["eval.k=8", "train.steps=5"],
        "rl": ["eval.k=8", "eval.k=1"],
    }
    spec = {"eval": {"k": 8, "temperature": 0.0, "few_shot_base": 5}, "sft": {"eval": {"k": 2}}}
    configs = {s: stage_config(s, spec, []) for s in STAGES}
    expected = EvalConfig(k=8, temperature=0.0, n_problems=200, max_new_tokens=128)
    assert configs["pretrain"].eval == dataclasses.replace(expected, few_shot=5)
    assert configs["sft"].eval == dataclasses.replace(expected, k=2)  # [sft.eval] wins
    assert configs["rl"].eval == expected
    # The cpu preset, as before the eval section: 200 problems, 4 samples at 0.6, 128 new tokens, 3-shot base.
    cpu = {s: stage_config(s, load_preset("cpu"), []).eval for s in STAGES}
    assert [(e.n_problems, e.k, e.temperature, e.max_new_tokens, e.few_shot) for e in cpu.values()] == [
        (200, 4, 0.6, 128, 3),
        (200, 4, 0.6, 128, 0),
        (200, 4, 0.6, 128, 0),
    ]
    with pytest.raises(ValueError, match=r"\[rl\] eval.k = 0: must be >= 1"):
        stage_config("rl", {"eval": {"k": 0}}, [])
    assert "[eval]" in run_config_to_toml(configs["rl"])
