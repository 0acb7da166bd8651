"""kill -9 at random moments of a pretraining run, resumed each time: the run ends with the weights of an
uninterrupted run, bit for bit, every resume takes the newest complete checkpoint, and no temporary
checkpoint directory survives the next start."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

STEPS = 150
SETTINGS = [
    f"train.steps={STEPS}",
    "train.checkpoint_every=1",
    "train.keep_checkpoints=2",
    "train.batch_size=4",
    "train.seq_len=64",
    "train.warmup_steps=2",
    "train.eval_every=0",
    "train.print_every=0",
    "train.log_every=1",
    "data.builtin_examples=200",
    "data.vocab_size=300",
    "model.d_model=32",
    "model.n_layers=1",
    "model.d_ff=64",
    "model.n_heads=2",
    "model.n_kv_heads=1",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


def command(out: Path, resume: bool) -> list[str]:
    sets = [arg for s in SETTINGS for arg in ("--set", s)]
    return [sys.executable, "-m", "nanoseek", "pretrain", "--preset", "tiny", *sets, "--out", str(out)] + (
        ["--resume"] if resume else []
    )


def checkpoint_steps(run: Path) -> list[int]:
    """The steps of the complete checkpoints (renamed into place: a step_N directory is whole)."""
    names = (d.name for d in (run / "checkpoints").glob("step_*")) if (run / "checkpoints").is_dir() else ()
    return sorted(int(m.group(1)) for name in names if (m := re.fullmatch(r"step_(\d+)", name)))


def tmp_dirs(run: Path) -> set[str]:
    return {d.name for d in (run / "checkpoints").glob(".step_*.tmp")} if (run / "checkpoints").is_dir() else set()


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step_{STEPS}" / "model.safetensors"))


def start(out: Path, resume: bool) -> subprocess.Popen:
    return subprocess.Popen(command(out, resume), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def test_kill_9_at_random_moments_then_resume_matches_uninterrupted_run(tmp_path):
    reference = tmp_path / "reference"
    done = subprocess.run(command(reference, False), env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]

    rng = random.Random(20)
    run = tmp_path / "killed"
    kills = 0
    left_behind: set[str] = set()  # temporary directories present after the last kill
    expect_from: int | None = None  # the newest complete checkpoint when the process was killed
    while kills < 5:
        before = checkpoint_steps(run)
        proc = start(run, resume=kills > 0)
        # Kill at a random moment after this process's own first checkpoint: a random number of steps
        # later (bounded, so five kills land before the end on any machine), at a random time in a step.
        target = (before or [0])[-1] + 1 + rng.randrange(10)
        deadline = time.monotonic() + 120
        while proc.poll() is None and (checkpoint_steps(run) or [0])[-1] < target:
            assert time.monotonic() < deadline, "the run made no progress"
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.03))
        if proc.poll() is not None:  # it finished first: the schedule was too short for this machine
            break
        os.kill(proc.pid, signal.SIGKILL)
        stdout, _ = proc.communicate()
        kills += 1
        _check_resume_line(stdout, run, expect_from)
        # the previous kill's leftovers are gone once this process started (it got to a checkpoint)
        assert not (left_behind & tmp_dirs(run)), left_behind & tmp_dirs(run)
        left_behind = tmp_dirs(run)
        expect_from = checkpoint_steps(run)[-1] if checkpoint_steps(run) else None
    assert kills == 5, f"only {kills} kills landed before the run finished"
    # What a kill can leave, planted for certain: a half-written checkpoint directory and a torn metrics line.
    stale = run / "checkpoints" / f".step_{expect_from + 1}.x1y2.tmp"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 10)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 10')

    final = subprocess.run(command(run, True), env=ENV, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr[-2000:]
    _check_resume_line(final.stdout, run, expect_from)
    assert not tmp_dirs(run)
    ours, theirs = weights(run), weights(reference)
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [json.loads(line)["step"] for line in (reference / "metrics.jsonl").read_text().splitlines()]


def _check_resume_line(stdout: str, run: Path, expected: int | None) -> None:
    """The resume line names the newest complete checkpoint there was when the process started."""
    lines = [line for line in stdout.splitlines() if line.startswith("resuming ")]
    if expected is None:
        assert not lines, lines
    else:
        ckpt = run / "checkpoints" / f"step_{expected}"
        assert lines == [f"resuming pretrain from {ckpt} (step {expected})"], (lines, expected)
