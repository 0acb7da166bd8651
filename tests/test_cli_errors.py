"""Every mistake a newcomer makes at the command line, run as `nanoseek ...` in a subprocess: it exits 2 with
one line on stderr, `error: ...`, naming the culprit (file, line or field), and no traceback; a training
command that fails leaves no run directory behind. Then the fuzzer's classes: damaged data files and
damaged copies of a real (tiny) checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
ENV.pop("NANOSEEK_DEBUG", None)
TINY = [
    f"--set={s}"
    for s in (
        "train.steps=2",
        "train.batch_size=2",
        "train.seq_len=64",
        "train.eval_every=0",
        "data.builtin_examples=200",
        "data.vocab_size=300",
        "model.d_model=32",
        "model.n_layers=1",
        "model.d_ff=64",
        "model.n_heads=2",
        "model.n_kv_heads=1",
    )
]


def nanoseek(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nanoseek", *args], cwd=cwd, env=env or ENV, capture_output=True, text=True, timeout=300
    )


def assert_one_line_error(done: subprocess.CompletedProcess, culprit: str) -> str:
    """Exit 2, exactly one line on stderr starting 'error:' and naming `culprit`, no traceback."""
    lines = done.stderr.splitlines()
    assert done.returncode == 2, (done.returncode, done.stderr[-3000:])
    assert "Traceback" not in done.stderr
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: ") and culprit in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A folder holding a tiny pretrained run `pt` (2 steps) and the input files the cases use."""
    root = tmp_path_factory.mktemp("cli")
    done = nanoseek("pretrain", "--preset", "tiny", *TINY, "--out", "pt", "--quiet", cwd=root)
    assert done.returncode == 0, done.stderr
    (root / "empty.jsonl").write_text("")
    (root / "binary.jsonl").write_bytes(bytes(range(256)) * 8)
    (root / "latin1.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    (root / "middle.jsonl").write_text('{"text": "a b"}\n' * 5 + '{"text": "a b",\n' + '{"text": "c"}\n' * 5)
    (root / "deep.jsonl").write_text('{"text": "one two three"}\n' * 20000 + "not json\n" + '{"text": "x"}\n' * 10)
    (root / "wrong_type.jsonl").write_text('{"text": ["a", "list"]}\n')
    (root / "prompts_wrong.jsonl").write_text('{"prompt": "hi"}\n{"prompt": 7}\n')
    (root / "a_dir").mkdir()
    (root / "bad.toml").write_text("[train]\nsteps = \n")
    return root


# (id, arguments, the text the error line must hold): the mistakes of issue 20, and the silently wrong cases.
CASES = [
    ("serve-missing-ckpt", ["serve", "--checkpoint", "runs/nope"], "runs/nope"),
    ("sft-missing-ckpt", ["sft", "--checkpoint", "runs/nope", "--out", "o"], "runs/nope"),
    ("rl-missing-ckpt", ["rl", "--checkpoint", "runs/nope", "--out", "o"], "runs/nope"),
    ("generate-missing-ckpt", ["generate", "--checkpoint", "runs/nope", "--prompt", "hi"], "runs/nope"),
    ("ckpt-is-a-file", ["generate", "--checkpoint", "empty.jsonl", "--prompt", "hi"], "empty.jsonl"),
    ("unknown-key", ["pretrain", "--set", "train.lrr=1e-3", "--out", "o"], "did you mean 'lr'"),
    ("unknown-section", ["pretrain", "--set", "trian.lr=1e-3", "--out", "o"], "did you mean 'train'"),
    ("bad-number", ["pretrain", "--set", "train.lr=abc", "--out", "o"], "train.lr"),
    ("bad-set-syntax", ["pretrain", "--set", "train.lr", "--out", "o"], "train.lr"),
    ("pretrain-missing-data", ["pretrain", "--data", "nope.jsonl", "--out", "o"], "nope.jsonl"),
    ("sft-missing-data", ["sft", "--checkpoint", "pt", "--data", "nope.jsonl", "--out", "o"], "nope.jsonl"),
    ("tokenizer-missing-input", ["tokenizer", "train", "--input", "nope.jsonl", "--out", "tk"], "nope.jsonl"),
    ("rl-missing-prompts", ["rl", "--checkpoint", "pt", "--set", "rl.prompts_file=nope.jsonl", "--out", "o"], "nope"),
    ("rl-prompts-dir", ["rl", "--checkpoint", "pt", "--set", "rl.prompts_file=a_dir", "--out", "o"], "a_dir"),
    ("missing-config", ["pretrain", "--config", "nope.toml", "--out", "o"], "nope.toml"),
    ("config-is-dir", ["pretrain", "--config", "a_dir", "--out", "o"], "a_dir"),
    ("bad-toml", ["pretrain", "--config", "bad.toml", "--out", "o"], "bad.toml"),
    ("pretrain-missing-tokenizer", ["pretrain", "--tokenizer", "nope", "--out", "o"], "nope"),
    ("unknown-preset", ["pretrain", "--preset", "tinyy", "--out", "o"], "did you mean 'tiny'"),
    ("model-unknown-preset", ["model", "--preset", "foo"], "'foo'"),
    ("speedrun-unknown-preset", ["speedrun", "--preset", "cpux", "--out", "o"], "did you mean 'cpu'"),
    ("speedrun-set-no-stage", ["speedrun", "--set", "train.steps=5", "--out", "o"], "train.steps=5"),
    ("speedrun-envs-field", ["speedrun", "--preset", "cpu-envs", "--set", "envs.eval_episodes=x", "--out", "o"], "x"),
    ("loss-agg", ["rl", "--checkpoint", "pt", "--set", "rl.loss_agg=foo", "--out", "o"], "rl.loss_agg"),
    ("unknown-task", ["rl", "--checkpoint", "pt", "--set", "rl.tasks=arithmatic", "--out", "o"], "'arithmetic'"),
    ("tokenizer-show-missing", ["tokenizer", "show", "runs/nope"], "runs/nope"),
    ("negative-steps", ["pretrain", "--set", "train.steps=-5", "--out", "o"], "train.steps"),
    ("top-p-zero", ["pretrain", "--set", "rl.top_p=0", "--out", "o"], "rl.top_p"),
    ("model-field", ["pretrain", "--set", "model.d_model=-1", "--out", "o"], "d_model"),
    ("device", ["pretrain", "--device", "cuda:7", "--out", "o"], "cuda:7"),
    ("device-name", ["pretrain", "--set", "train.device=tpu", "--out", "o"], "train.device"),
    ("optimizer", ["pretrain", "--set", "train.optimizer=sgd", "--out", "o"], "train.optimizer"),
    ("schedule", ["pretrain", "--set", "train.schedule=linear", "--out", "o"], "train.schedule"),
    ("unknown-reward", ["rl", "--checkpoint", "pt", *TINY, "--set", "rl.rewards=nope", "--out", "o"], "'nope'"),
    ("empty-prompts-file", ["generate", "--checkpoint", "pt", "--prompts-file", "empty.jsonl"], "empty.jsonl"),
    ("prompts-file-is-dir", ["generate", "--checkpoint", "pt", "--prompts-file", "a_dir"], "a_dir"),
    ("prompts-wrong-type", ["generate", "--checkpoint", "pt", "--prompts-file", "prompts_wrong.jsonl"], ":2:"),
    ("eval-temperature", ["eval", "--checkpoint", "pt", "--bench", "tasks", "--temperature", "-1"], "temperature"),
    # the fuzzer's data files (the pretraining reader names the file and line)
    ("data-empty", ["pretrain", *TINY, "--data", "empty.jsonl", "--out", "o"], "empty.jsonl"),
    ("data-binary", ["pretrain", *TINY, "--data", "binary.jsonl", "--out", "o"], "binary.jsonl:1"),
    ("data-non-utf8", ["pretrain", *TINY, "--data", "latin1.jsonl", "--out", "o"], "latin1.jsonl:1"),
    ("data-bad-middle", ["pretrain", *TINY, "--data", "middle.jsonl", "--out", "o"], "middle.jsonl:6"),
    ("data-bad-deep", ["pretrain", *TINY, "--data", "deep.jsonl", "--out", "o"], "deep.jsonl:20001"),
    ("data-wrong-type", ["pretrain", *TINY, "--data", "wrong_type.jsonl", "--out", "o"], "wrong_type.jsonl:1"),
    ("tokenizer-train-bad-deep", ["tokenizer", "train", "--input", "deep.jsonl", "--out", "tk"], "deep.jsonl:20001"),
]


@pytest.mark.parametrize("args, culprit", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_cli_mistake_is_one_line(work, args, culprit):
    out = work / "o"
    shutil.rmtree(out, ignore_errors=True)
    assert_one_line_error(nanoseek(*args, cwd=work), culprit)
    assert not out.exists(), "a failed start left its run directory"


def test_debug_shows_the_traceback(work):
    debug_env = {**ENV, "NANOSEEK_DEBUG": "1"}
    for args, env in (
        (["--debug", "model", "--preset", "foo"], ENV),
        (["model", "--preset", "foo", "--debug"], ENV),
        (["model", "--preset", "foo"], debug_env),
    ):
        done = nanoseek(*args, cwd=work, env=env)
        assert done.returncode == 2 and "Traceback" in done.stderr, (args, done.stderr)
        assert done.stderr.splitlines()[-1].startswith("error: unknown model preset 'foo'")


def test_pretrain_uses_the_tokenizer_given(work):
    """`tokenizer train --out DIR` then `pretrain --tokenizer DIR`: the run keeps that tokenizer (it would
    otherwise train its own, of another vocabulary size here)."""
    given = work / "pt" / "tokenizer" / "tokenizer.json"
    shutil.rmtree(work / "ptk", ignore_errors=True)
    args = ["pretrain", *TINY, "--set", "data.vocab_size=400", "--tokenizer", "pt/tokenizer", "--out", "ptk"]
    done = nanoseek(*args, "--quiet", cwd=work)
    assert done.returncode == 0, done.stderr
    assert (work / "ptk" / "checkpoints" / "step_2" / "tokenizer.json").read_bytes() == given.read_bytes()


# ----------------------------------------------------------------------------- damaged checkpoints
def _config(d: Path) -> dict:
    return json.loads((d / "config.json").read_text())


def _edit_config(change):
    def corrupt(d: Path) -> None:
        cfg = _config(d)
        change(cfg)
        (d / "config.json").write_text(json.dumps(cfg))

    return corrupt


def _truncate(name: str, keep: float):
    def corrupt(d: Path) -> None:
        data = (d / name).read_bytes()
        (d / name).write_bytes(data[: int(len(data) * keep)])

    return corrupt


def _write(name: str, content: bytes):
    return lambda d: (d / name).write_bytes(content)


CHECKPOINT_CASES = [
    ("safetensors-truncated", _truncate("model.safetensors", 0.5), "model.safetensors"),
    ("safetensors-header-cut", _truncate("model.safetensors", 0.001), "model.safetensors"),
    ("safetensors-empty", _write("model.safetensors", b""), "model.safetensors: empty"),
    ("safetensors-garbage", _write("model.safetensors", bytes(range(256)) * 64), "model.safetensors"),
    ("config-missing-field", _edit_config(lambda c: c.pop("d_model")), "d_model"),
    ("config-extra-field", _edit_config(lambda c: c.update(d_modle=3)), "d_modle"),
    ("config-wrong-type", _edit_config(lambda c: c.update(d_model="big")), "d_model"),
    ("config-float-for-int", _edit_config(lambda c: c.update(n_layers=1.5)), "n_layers"),
    ("config-other-shape", _edit_config(lambda c: c.update(d_model=64)), "model.safetensors"),
    ("config-non-utf8", _write("config.json", b'{"d_model": "\xff"}'), "config.json"),
    ("config-list", _write("config.json", b"[1, 2]"), "config.json"),
    ("config-not-json", _write("config.json", b'{"d_model": '), "config.json"),
    ("config-empty", _write("config.json", b""), "config.json"),
    ("tokenizer-garbage", _write("tokenizer.json", b"\x00garbage{"), "tokenizer.json"),
    ("tokenizer-wrong-structure", _write("tokenizer.json", b'{"model": 3}'), "tokenizer.json"),
    ("tokenizer-list", _write("tokenizer.json", b"[]"), "tokenizer.json"),
    ("tokenizer-config-list", _write("tokenizer_config.json", b"[]"), "tokenizer_config.json"),
    ("tokenizer-config-bad-eos", _write("tokenizer_config.json", b'{"eos_token": "<nope>"}'), "tokenizer_config"),
]


@pytest.mark.parametrize("corrupt, culprit", [c[1:] for c in CHECKPOINT_CASES], ids=[c[0] for c in CHECKPOINT_CASES])
def test_damaged_checkpoint_is_one_line(work, corrupt, culprit):
    ckpt = work / "damaged"
    shutil.rmtree(ckpt, ignore_errors=True)
    shutil.copytree(work / "pt" / "checkpoints" / "step_2", ckpt)
    corrupt(ckpt)
    assert_one_line_error(nanoseek("generate", "--checkpoint", "damaged", "--prompt", "hi", cwd=work), culprit)


def test_damaged_checkpoint_as_starting_point_leaves_no_run_dir(work):
    ckpt = work / "damaged_sft"
    shutil.rmtree(ckpt, ignore_errors=True)
    shutil.copytree(work / "pt" / "checkpoints" / "step_2", ckpt)
    _edit_config(lambda c: c.pop("n_layers"))(ckpt)
    assert_one_line_error(nanoseek("sft", "--checkpoint", "damaged_sft", *TINY, "--out", "o", cwd=work), "n_layers")
    assert not (work / "o").exists()


def test_hf_shard_index_outside_the_model_dir_is_refused(work):
    hf = work / "hf"
    shutil.rmtree(hf, ignore_errors=True)
    done = nanoseek("convert", "--to-hf", "pt", "--out", "hf", cwd=work)
    assert done.returncode == 0, done.stderr
    secret = work / "secret.safetensors"
    shutil.copy(next(hf.glob("*.safetensors")), secret)  # a readable file: only the path check can refuse it
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "../secret.safetensors"}}
    (hf / "model.safetensors.index.json").write_text(json.dumps(index))
    line = assert_one_line_error(nanoseek("generate", "--checkpoint", "hf", "--prompt", "hi", cwd=work), "secret")
    assert "outside" in line or "refused" in line
