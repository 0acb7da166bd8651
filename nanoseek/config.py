"""Run configuration: dataclasses, TOML files, and dotted command-line overrides.

A run's config is built in three layers, each overriding the last:

    defaults of the stage  <  --config FILE.toml  <  --set section.field=value ...

and written back to `RUN_DIR/config.toml`, so a run can always be repeated.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanoseek.model.config import ModelConfig, get_preset


@dataclass
class TrainConfig:
    steps: int = 400
    """Optimizer steps."""
    batch_size: int = 16
    """Rows per micro-batch."""
    seq_len: int = 256
    """Tokens per row (packed pretraining rows; the SFT pad length limit)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    optimizer: str = "muon"
    """'muon' (Muon for hidden weight matrices, AdamW for embeddings, head, norms, router) or 'adamw'."""
    lr: float = 3e-3
    """Peak AdamW learning rate."""
    muon_lr: float = 0.02
    """Peak Muon learning rate (when optimizer = 'muon')."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak."""
    warmup_steps: int = 20
    """Linear warmup steps."""
    schedule: str = "cosine"
    """'cosine', 'wsd' (warmup-stable-decay) or 'constant'."""
    decay_fraction: float = 0.2
    """WSD: the fraction of steps spent decaying at the end."""
    weight_decay: float = 0.1
    """AdamW weight decay on matrices (not on norms, biases, embeddings)."""
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables."""
    compile: bool = False
    """torch.compile the model (worth it on GPU for long runs)."""
    eval_every: int = 100
    """Validation loss every N steps (0 = only at the end)."""
    eval_batches: int = 4
    """Validation batches per evaluation."""
    checkpoint_every: int = 200
    """Save a checkpoint every N steps (and always at the end)."""
    keep_checkpoints: int = 2
    """Checkpoints kept in RUN_DIR/checkpoints (older ones deleted)."""
    log_every: int = 10
    """Write a metrics line every N steps."""
    print_every: int = 50
    """Print a loss line every N steps (beside the progress bar); 0 = never."""
    seed: int = 0
    device: str = "auto"
    """'auto', 'cpu' or 'cuda'."""


@dataclass
class DataConfig:
    files: list[str] = field(default_factory=list)
    """Training files (.txt, .jsonl, .parquet; SFT: conversation .jsonl). Empty = the built-in task corpus."""
    text_field: str = "text"
    """JSONL/parquet field holding the text."""
    val_fraction: float = 0.02
    """Fraction of documents held out for validation."""
    skip_bad: bool = False
    """Count and skip malformed records instead of stopping."""
    builtin_examples: int = 20000
    """Examples generated for the built-in task corpus."""
    tasks: str = "arithmetic,countdown,linear_equation,word_problems"
    """Built-in tasks to draw from (comma separated)."""
    vocab_size: int = 512
    """Vocabulary of the tokenizer trained when the run has none."""


@dataclass
class RLConfig:
    prompts_per_step: int = 16
    """P: prompts per RL step."""
    group_size: int = 8
    """G: samples per prompt (the group that advantages are relative to)."""
    max_new_tokens: int = 96
    """Longest completion; longer ones are truncated (see overlong)."""
    temperature: float = 1.0
    """Rollout sampling temperature (log-probs are taken at this temperature too)."""
    top_p: float = 1.0
    num_iterations: int = 1
    """Policy updates per batch of rollouts (mu in GRPO)."""
    micro_batch_size: int = 64
    """Sequences per forward/backward in the update."""
    epsilon_low: float = 0.2
    epsilon_high: float = 0.28
    """Clip range [1 - epsilon_low, 1 + epsilon_high] (DAPO's clip-higher)."""
    scale_rewards: str = "group"
    """Advantage scaling: 'group' (GRPO), 'batch', or 'none' (Dr. GRPO)."""
    loss_agg: str = "token-mean"
    """'token-mean' (DAPO), 'seq-mean' (GRPO) or 'dr-grpo' (constant normaliser)."""
    beta: float = 0.0
    """KL penalty to the frozen starting policy (k3); 0 keeps no reference model."""
    dynamic_sampling: bool = False
    """DAPO: drop groups whose rewards are all equal and sample more prompts to refill."""
    max_sampling_rounds: int = 3
    """Dynamic sampling: at most this many generation rounds per step."""
    overlong: str = "none"
    """Truncated samples: 'none', 'mask' (no loss on them) or 'soft' (DAPO's length penalty)."""
    overlong_buffer: int = 16
    """'soft': the penalty ramps from 0 to -1 over the last this-many tokens."""
    tis_cap: float = 2.0
    """Truncated importance sampling cap on pi_trainer / pi_engine per token; 0 disables."""
    rewards: str = "task=1.0"
    """Weighted reward functions: built-ins (task, math, code, format) or import paths, e.g. 'task=1,format=0.1'."""
    tasks: str = "arithmetic,countdown,linear_equation,word_problems"
    """Built-in prompt mixture: 'name' or 'name:weight', comma separated."""
    difficulty: dict[str, Any] = field(default_factory=dict)
    """Per-task difficulty knobs, e.g. {arithmetic = {digits = 3}}."""
    prompts_file: str = ""
    """A JSONL of {prompt or messages, answer[, task]} (or code rows: tests instead of answer, with
    rl.rewards=code) instead of the built-in tasks."""
    eval_file: str = ""
    """Held-out prompts in the same format for the before/after and periodic evaluations (the
    first eval_problems rows); default: the built-in tasks' test split, or none with prompts_file."""
    eval_every: int = 0
    """Held-out evaluation every N steps (0 = only before and after)."""
    eval_problems: int = 200
    """Held-out problems per evaluation."""
    eval_samples: int = 4
    """k samples per held-out problem (pass@1 is averaged over them)."""
    eval_temperature: float = 0.6
    eval_top_p: float = 0.95


@dataclass
class RunConfig:
    preset: str = "tiny"
    """Model preset; individual fields can still be overridden under [model]."""
    model: dict[str, Any] = field(default_factory=dict)
    """Overrides of the preset's ModelConfig fields."""
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rl: RLConfig = field(default_factory=RLConfig)

    def model_config(self, vocab_size: int | None = None) -> ModelConfig:
        overrides = dict(self.model)
        if vocab_size is not None and "vocab_size" not in overrides:
            overrides["vocab_size"] = vocab_size
        return get_preset(self.preset, **overrides)


def _coerce(value: str, kind: Any, where: str) -> Any:
    """Parse a --set value as the field's type (TOML syntax for lists/bools/numbers; bare strings allowed)."""
    origin = typing.get_origin(kind)
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value
    if kind is bool and not isinstance(parsed, bool):
        raise ValueError(f"{where}: expected true or false, got {value!r}")
    if kind is int and not (isinstance(parsed, int) and not isinstance(parsed, bool)):
        raise ValueError(f"{where}: expected an integer, got {value!r}")
    if kind is float:
        if isinstance(parsed, bool) or not isinstance(parsed, int | float):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        return float(parsed)
    if kind is str:
        return value if not isinstance(parsed, str) else parsed
    if origin is list:
        if isinstance(parsed, str):
            return [p for p in parsed.split(",") if p]
        if not isinstance(parsed, list):
            raise ValueError(f"{where}: expected a list, got {value!r}")
    return parsed


def _apply(obj: Any, values: dict[str, Any], where: str) -> None:
    """Set dataclass fields from a (TOML) dict, recursing into nested dataclasses; unknown keys fail."""
    hints = typing.get_type_hints(type(obj))
    for key, value in values.items():
        if key not in hints:
            known = ", ".join(f.name for f in dataclasses.fields(obj))
            raise ValueError(f"{where}{key}: unknown setting (known: {known})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ValueError(f"{where}{key}: expected a table")
            _apply(current, value, f"{where}{key}.")
        elif key == "model" and isinstance(obj, RunConfig):
            known_model = {f.name for f in dataclasses.fields(ModelConfig)}
            for mk in value:
                if mk not in known_model:
                    raise ValueError(f"model.{mk}: unknown ModelConfig field")
            current.update(value)
        else:
            setattr(obj, key, value)


def load_run_config(
    base: RunConfig | None = None,
    config_file: str | Path | None = None,
    overrides: list[str] | None = None,
    values: dict[str, Any] | None = None,
    where: str = "",
) -> RunConfig:
    """Defaults (`base`) < `values` (an already-parsed TOML table, named `where` in errors) < file < overrides."""
    cfg = base or RunConfig()
    if values:
        try:
            _apply(cfg, values, "")
        except ValueError as e:
            raise ValueError(f"{where}{e}") from None
    if config_file:
        path = Path(config_file)
        try:
            values = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"--config {path}: no such file") from None
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: {e}") from None
        try:
            _apply(cfg, values, "")
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected section.field=value")
        dotted, value = item.split("=", 1)
        *parents, name = dotted.strip().split(".")
        obj: Any = cfg
        for p in parents:
            if p == "model" and obj is cfg:
                obj = None
                break
            if not hasattr(obj, p) or not dataclasses.is_dataclass(getattr(obj, p)):
                raise ValueError(f"--set {dotted}: unknown section {p!r}")
            obj = getattr(obj, p)
        if obj is None:  # model.<field>: typed by ModelConfig
            hints = typing.get_type_hints(ModelConfig)
            if name not in hints:
                raise ValueError(f"--set {dotted}: unknown ModelConfig field")
            cfg.model[name] = _coerce(value, hints[name], f"--set {dotted}")
            continue
        hints = typing.get_type_hints(type(obj))
        if name not in hints:
            raise ValueError(f"--set {dotted}: unknown setting")
        setattr(obj, name, _coerce(value, hints[name], f"--set {dotted}"))
    cfg.model_config()  # validate the model fields now, not after data loading
    return cfg


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items() if x is not None) + " }"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def dump_toml(sections: dict[str, Any]) -> str:
    """A minimal TOML writer for flat tables of scalars/lists/inline dicts (None values are left out)."""
    top = [f"{k} = {_toml_value(v)}" for k, v in sections.items() if not isinstance(v, dict) and v is not None]
    lines = [*top, ""] if top else []
    for name, table in sections.items():
        if isinstance(table, dict):
            lines.append(f"[{name}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in table.items() if v is not None]
            lines.append("")
    return "\n".join(lines)


def run_config_to_toml(cfg: RunConfig) -> str:
    return dump_toml(
        {
            "preset": cfg.preset,
            "model": dict(cfg.model),
            "train": dataclasses.asdict(cfg.train),
            "data": dataclasses.asdict(cfg.data),
            "rl": dataclasses.asdict(cfg.rl),
        }
    )
