"""The speedrun: every stage runs once, the report has a row per stage, a rerun skips what is done."""

from __future__ import annotations

import json

import pytest

from nanoseek.speedrun import load_preset, speedrun, split_overrides

TINY = [
    "pretrain.preset=tiny-moe",
    "pretrain.model.d_model=32",
    "pretrain.model.n_heads=2",
    "pretrain.model.n_kv_heads=1",
    "pretrain.model.d_ff=64",
    "pretrain.model.moe_d_ff=16",
    "pretrain.model.n_layers=2",
    "pretrain.data.builtin_examples=300",
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
