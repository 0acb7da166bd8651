"""Data parallelism under torchrun, on CPU with gloo: two processes must train exactly like one.

The reference is the single-process run itself: with grad_accum 2 it takes the same micro-batches
per step that two ranks with grad_accum 1 split between them, so weights, losses, gradient norms
and the MoE balancing bias must agree (the bias only if the ranks sum their routers' loads).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

TRAIN = [
    "--device", "cpu", "--quiet",
    "--set", "train.steps=4", "--set", "train.batch_size=2", "--set", "train.seq_len=64",
    "--set", "train.eval_every=2", "--set", "train.log_every=1", "--set", "train.checkpoint_every=100",
    "--set", "data.builtin_examples=300",
]  # fmt: skip
MODEL = [
    "--preset", "tiny-moe", "--set", "data.vocab_size=300",
    "--set", "model.d_model=32", "--set", "model.n_layers=2", "--set", "model.n_heads=2",
    "--set", "model.n_kv_heads=1", "--set", "model.d_ff=64", "--set", "model.moe_d_ff=16",
]  # fmt: skip


def launch(program: list[str], cwd: Path, nproc: int) -> str:
    """Run `python PROGRAM...` in one process, or under torchrun with nproc ranks; its stdout."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [*(launcher if nproc > 1 else [sys.executable]), *program]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def nanoseek(args: list[str], cwd: Path, nproc: int = 1) -> str:
    return launch(["-m", "nanoseek", *args], cwd, nproc)


def metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("time", "tokens_per_s", "mfu")} for r in rows]


def assert_same_run(one: Path, two: Path) -> None:
    a = load_file(str(one / "checkpoints" / "step_4" / "model.safetensors"))
    b = load_file(str(two / "checkpoints" / "step_4" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    biases = [k for k in a if k.endswith("e_score_correction_bias")]
    assert biases and any(a[k].abs().sum() > 0 for k in biases)  # the balancing update did move
    ma, mb = metrics(one), metrics(two)
    assert [r["step"] for r in ma] == [r["step"] for r in mb] and len(ma) >= 5
    for ra, rb in zip(ma, mb):
        assert ra.keys() == rb.keys()
        for key in ra:
            assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-7), (ra["step"], key)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")
def test_two_ranks_train_exactly_like_one_process_with_twice_the_accumulation(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    out = nanoseek(["pretrain", *MODEL, *TRAIN, "--set", "train.grad_accum=2", "--out", str(one)], tmp_path)
    shutil.copytree(one / "tokenizer", two / "tokenizer")  # the same vocabulary (rank 0 would train this one)
    out2 = nanoseek(["pretrain", *MODEL, *TRAIN, "--set", "train.grad_accum=1", "--out", str(two)], tmp_path, nproc=2)
    assert len(out2.strip().splitlines()) == 1  # one summary, from rank 0
    assert json.loads(out)["tokens"] == json.loads(out2)["tokens"]
    assert_same_run(one, two)

    # Interrupted at step 2 and resumed, still on 2 ranks: the same run.
    three = tmp_path / "three"
    shutil.copytree(one / "tokenizer", three / "tokenizer")
    nanoseek(["pretrain", *MODEL, *TRAIN, "--out", str(three), "--stop-at", "2"], tmp_path, nproc=2)
    assert (three / "checkpoints" / "step_2").is_dir() and not (three / "checkpoints" / "step_4").exists()
    nanoseek(["pretrain", *MODEL, *TRAIN, "--out", str(three), "--resume"], tmp_path, nproc=2)
    assert_same_run(two, three)

    # SFT goes through the same loop from its own entry point.
    ckpt = str(one / "checkpoints" / "step_4")
    nanoseek(["sft", "--checkpoint", ckpt, *TRAIN, "--set", "train.grad_accum=2", "--out", str(one / "sft")], tmp_path)
    nanoseek(["sft", "--checkpoint", ckpt, *TRAIN, "--out", str(two / "sft")], tmp_path, nproc=2)
    assert_same_run(one / "sft", two / "sft")

    # RL end to end on two ranks: each generates half the prompts; one summary with the held-out
    # evaluation before and after, every step logged with the whole batch's sample count.
    rl = ["--device", "cpu", "--quiet", "--set", "train.steps=2", "--set", "rl.prompts_per_step=4"]
    rl += ["--set", "rl.group_size=2", "--set", "rl.max_new_tokens=8", "--set", "rl.eval_problems=6"]
    # Dynamic sampling: a random model's groups are all wrong, so every round refills (the ranks
    # count the kept groups together) until the last round is kept.
    rl += ["--set", "rl.dynamic_sampling=true", "--set", "rl.max_sampling_rounds=3"]
    out = nanoseek(["rl", "--checkpoint", str(two / "sft"), *rl, "--out", str(two / "rl")], tmp_path, nproc=2)
    summary = json.loads(out.strip())
    assert summary["steps"] == 2 and summary["eval_problems"] == 6 and "all" in summary["after"]
    steps = [r for r in metrics(two / "rl") if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2] and all(r["length_mean"] > 0 for r in steps)
    assert all(r["zero_variance_groups"] == 1.0 for r in steps)  # 3 rounds x 4 prompts, over both ranks


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")
def test_rl_update_split_over_two_ranks_equals_the_whole_batch_in_one_process(tmp_path):
    script = Path(__file__).resolve().parent / "rl_ranks.py"
    launch([str(script), str(tmp_path / "one")], tmp_path, nproc=1)
    launch([str(script), str(tmp_path / "two")], tmp_path, nproc=2)
    a = load_file(str(tmp_path / "one" / "weights.safetensors"))
    b = load_file(str(tmp_path / "two" / "weights.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    sa = json.loads((tmp_path / "one" / "stats.json").read_text())
    sb = json.loads((tmp_path / "two" / "stats.json").read_text())
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k] == pytest.approx(sb[k], rel=1e-6, abs=1e-9), k
    assert sa["token-mean/trained_fraction"] == pytest.approx(5 / 6)  # the all-equal group was skipped
    assert all(sa[f"{agg}/grad_norm"] > 0 for agg in ("token-mean", "seq-mean", "dr-grpo"))


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")
def test_speedrun_under_torchrun(tmp_path):
    from test_speedrun import TINY  # the speedrun test's tiny settings

    overrides = [arg for item in TINY for arg in ("--set", item)]
    out = nanoseek(["speedrun", "--quiet", "--out", str(tmp_path / "run"), *overrides], tmp_path, nproc=2)
    assert out.count("# nanoseek speedrun") == 1  # one report, printed by rank 0
    for stage in ("pretrain", "sft", "rl"):
        assert json.loads((tmp_path / "run" / stage / "summary.json").read_text())["steps"] > 0
        assert (tmp_path / "run" / "eval" / stage / "summary.json").exists()
