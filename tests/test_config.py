"""Run configs: TOML files and --set overrides read as the fields' types, bad values named in one line,
the eval section, and config.toml files written by earlier versions still loading."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from nanoseek.config import DEFAULT_TASKS, EvalConfig, RunConfig, parse_task_weights
from nanoseek.config_toml import load_run_config, run_config_to_toml
from nanoseek.tasks import list_tasks
from nanoseek.values import parse_value

FIXTURES = Path(__file__).parent / "fixtures"


def test_overrides_and_toml(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('preset = "tiny-moe"\n[train]\nlr = 0.01\nsteps = 7\n[model]\nn_layers = 3\n[eval]\nk = 2\n')
    overrides = ["train.batch_size=3", "model.top_k=1", "data.files=a.txt,b.txt", "train.compile=true"]
    overrides += ["eval.benches=tasks, arithmetic", "eval.limit=5", "eval.system=be brief", "rl.difficulty={x={y=1}}"]
    cfg = load_run_config(None, f, overrides)
    assert (cfg.preset, cfg.train.lr, cfg.train.steps, cfg.train.batch_size) == ("tiny-moe", 0.01, 7, 3)
    assert cfg.model == {"n_layers": 3, "top_k": 1} and cfg.data.files == ["a.txt", "b.txt"] and cfg.train.compile
    assert cfg.model_config().n_layers == 3
    assert (cfg.eval.k, cfg.eval.benches, cfg.eval.limit, cfg.eval.system) == (
        2,
        ["tasks", "arithmetic"],
        5,
        "be brief",
    )
    assert cfg.rl.difficulty == {"x": {"y": 1}}
    # What a run writes reads back to the same config.
    again = tmp_path / "again.toml"
    again.write_text(run_config_to_toml(cfg))
    assert load_run_config(None, again) == cfg


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.lr=fast", "--set train.lr: expected a number, got 'fast'"),
        ("train.steps=1.5", "--set train.steps: expected an integer"),
        ("train.compile=maybe", "--set train.compile: expected true or false"),
        ("train.nope=1", "--set train.nope: unknown setting"),
        ("bogus.x=1", "unknown section 'bogus'"),
        ("rl.difficulty.arithmetic.digits=3", "unknown section 'difficulty'"),
        ("model.top_k=99", "top_k"),
        ("model.d_modle=3", "unknown ModelConfig field"),
        ("train.lr", "expected section.field=value"),
        ("train..lr=3", "expected section.field=value"),
        ("eval.benches={a=1}", "--set eval.benches: expected a list"),
        ("rl.difficulty=3", "--set rl.difficulty: expected a table"),
    ],
)
def test_bad_overrides_name_the_field(override, needle):
    with pytest.raises(ValueError, match=needle.replace(".", r"\.").replace("(", r"\(")):
        load_run_config(RunConfig(preset="tiny-moe"), None, [override])


@pytest.mark.parametrize(
    "override, message",
    [
        ("rl.temperature=-1", "rl.temperature = -1.0: must be >= 0"),
        ("rl.eval_temperature=-0.5", "rl.eval_temperature = -0.5: must be >= 0"),
        ("eval.temperature=nan", "eval.temperature = nan: must be >= 0"),
        ("train.steps=0", "train.steps = 0: must be >= 1"),
        ("train.warmup_steps=-1", "train.warmup_steps = -1: must be >= 0"),
        ("rl.group_size=1", "rl.group_size = 1: must be >= 2"),
        ("rl.eval_samples=-2", "rl.eval_samples = -2: must be >= 1"),
        ("eval.k=0", "eval.k = 0: must be >= 1"),
        ("eval.limit=0", "eval.limit = 0: must be >= 1"),
        ("rl.top_p=0", "rl.top_p = 0.0: must be in (0, 1]"),
        ("eval.min_p=1.5", "eval.min_p = 1.5: must be in [0, 1]"),
        ("train.min_lr_ratio=2", "train.min_lr_ratio = 2.0: must be in [0, 1]"),
        ("rl.loss_agg=sum", "rl.loss_agg = 'sum': must be one of token-mean, seq-mean, dr-grpo"),
        ("rl.overlong=cut", "rl.overlong = 'cut': must be one of none, mask, soft"),
        ("rl.tasks=arithmetic:x", "rl.tasks: bad weight in 'arithmetic:x' (expected name or name:weight)"),
        ("rl.tasks=arithmetic:-1", "rl.tasks: the weight in 'arithmetic:-1' must be >= 0"),
        ("data.tasks=,", "data.tasks = ',': names no task"),
    ],
)
def test_bad_values_are_named_in_one_line(override, message):
    with pytest.raises(ValueError) as info:
        load_run_config(None, None, [override])
    assert str(info.value) == message


def test_bad_eval_settings_in_code_are_named():
    with pytest.raises(ValueError, match="plain text"):
        EvalConfig(few_shot=2, think_prefill=True).check()
    with pytest.raises(ValueError, match=r"^k = '2': expected <class 'int'>"):
        EvalConfig(k="2").check()


def test_bad_toml_names_the_file(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("[train]\nlr = = 3\n")
    with pytest.raises(ValueError, match="bad.toml"):
        load_run_config(None, f)
    f.write_text("[train]\nlearning_rate = 3\n")
    with pytest.raises(ValueError, match="bad.toml: train.learning_rate: unknown setting"):
        load_run_config(None, f)
    f.write_text('[train]\nsteps = "many"\n')
    with pytest.raises(ValueError, match="bad.toml: train.steps: expected an integer, got 'many'"):
        load_run_config(None, f)


@pytest.mark.parametrize(
    "value, kind, expected",
    [
        ("3", int, 3),
        ("1_000", int, 1000),
        ("3e-4", float, 3e-4),
        (2, float, 2.0),
        ("true", bool, True),
        ("No", bool, False),
        ("1", bool, True),
        ("3", str, "3"),  # a string field keeps the text as written
        ('"quoted"', str, "quoted"),
        ("a.txt, b.txt", list[str], ["a.txt", "b.txt"]),
        ('["x", "y"]', list[str], ["x", "y"]),
        ("+,*", tuple[str, ...], ("+", "*")),
        ("1,2", tuple[int, ...], (1, 2)),
        ("none", str | None, "none"),
        (None, int | None, None),
        ("7", int | None, 7),
        ("{a = {b = 1}}", dict[str, dict], {"a": {"b": 1}}),
    ],
)
def test_parse_value_reads_each_type(value, kind, expected):
    parsed = parse_value(value, kind, "x")
    assert parsed == expected and type(parsed) is type(expected)


def test_task_weights_and_the_default_task_list():
    assert parse_task_weights("countdown, arithmetic:2.5", "rl.tasks") == {"countdown": 1.0, "arithmetic": 2.5}
    assert DEFAULT_TASKS.split(",") == list_tasks()  # every built-in task
    assert RunConfig().data.tasks == RunConfig().rl.tasks == DEFAULT_TASKS


@pytest.mark.parametrize("name", ["config_13c2576_rl.toml", "config_13c2576_pretrain.toml"])
def test_config_toml_written_by_earlier_versions_still_loads(name):
    """Written by `run_config_to_toml` at commit 13c2576 (before the [eval] section): every value in the
    file is the loaded config's, and the sections the file lacks keep their defaults."""
    path = FIXTURES / name
    cfg = load_run_config(None, path)
    table = tomllib.loads(path.read_text())
    assert cfg.preset == table["preset"] and cfg.model == table["model"]
    for section in ("train", "data", "rl"):
        loaded = dataclasses.asdict(getattr(cfg, section))
        assert {k: v for k, v in loaded.items() if k in table[section]} == table[section], section
        newer = dataclasses.asdict(type(getattr(cfg, section))())  # fields added since: their defaults
        assert all(loaded[k] == newer[k] for k in loaded.keys() - table[section].keys()), section
    assert "eval" not in table and cfg.eval == EvalConfig()
