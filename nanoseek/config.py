"""Run configuration: the settings dataclasses and their checks (TOML and --set: `nanoseek.config_toml`).

A run's config is built in three layers, each overriding the last:

    defaults of the stage  <  --config FILE.toml  <  --set section.field=value ...

and written back to `RUN_DIR/config.toml`, so a run can always be repeated. Every value, from a
TOML file or a --set string, is read by `nanoseek.values.parse_value` as its field's type, and `RunConfig.check`
names the first bad one in one line (`rl.temperature = -1: must be >= 0`).
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from typing import Any

from nanoseek.errors import InputError, UserError, check_file, unknown
from nanoseek.model.config import ModelConfig, get_preset
from nanoseek.rewards.sandbox import SANDBOX_LEVELS
from nanoseek.values import parse_value as _parse_value

DEFAULT_TASKS = "arithmetic,countdown,linear_equation,word_problems"
"""Every built-in task (nanoseek.tasks), equally weighted: the default mixture of every stage."""


# The modes of the training settings that name one (nanoseek.train.optim implements them).
OPTIMIZERS = ("muon", "adamw")
SCHEDULES = ("cosine", "wsd", "constant")
PARALLEL_LAYOUTS = ("auto", "ddp", "fsdp")  # nanoseek.train.parallel implements them
ACTIVATION_CHECKPOINTING = ("none", "block", "selective")


@dataclass
class LoRAConfig:
    """Low-rank adapters (nanoseek.model.lora): the base weights frozen, only the adapters trained."""

    enabled: bool = False
    rank: int = 16
    alpha: float = 32.0
    """The adapters' output is scaled by alpha / rank."""
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["wq", "wk", "wv", "wo", "w1", "w2", "w3"])
    """Projections by attribute name: attention (wq wk wv wo; MLA: wq_a wq_b wkv_a wo) and MLP (w1 gate,
    w3 up, w2 down: dense, shared and, per expert, routed experts)."""


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
    optimizer: str = "muon"  # one of OPTIMIZERS
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
    """torch.compile the model: pretraining and SFT compile the loss, RL the update's forward (the engine
    decides on its own). Worth it on GPU for long runs; on CPU at the tiny preset's RL benchmark shape
    (8 x 8 x 64) the update took ~0.15 s against ~0.21 eager, at the demo's (64 x 8 x 96) 0.32 against 0.35,
    for ~20-30 s of compilation (docs/LOG.md, 2026-12-02, seventh session)."""
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
    parallel: str = "auto"
    """Under torchrun: 'ddp' (whole model on every rank), 'fsdp' (FSDP2, sharded per block) or 'auto' (fsdp
    where a CUDA device could not hold the replicated training state, else ddp)."""
    activation_checkpointing: str = "none"
    """'none', 'block' (recompute each block in the backward) or 'selective' (keep matmul outputs only)."""
    expert_parallel: int = 1
    """Ranks the routed experts of each MoE layer are split over (all-to-all dispatch); 1 = none."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """train.lora.enabled = true: train adapters instead of the weights (pretraining, SFT and RL)."""


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
    tasks: str = DEFAULT_TASKS
    """Built-in tasks to draw from: 'name' or 'name:weight', comma separated."""
    vocab_size: int = 512
    """Vocabulary of the tokenizer trained when the run has none."""


# The modes of the RL settings that name one (nanoseek.train.grpo, rollouts and update implement them).
REWARD_SCALINGS = ("group", "batch", "none")
LOSS_AGGREGATIONS = ("token-mean", "seq-mean", "dr-grpo")
OVERLONG_MODES = ("none", "mask", "soft")


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
    max_samples: int = 0
    """End the run after the step at which the completions generated so far (groups dropped by dynamic sampling
    included) reach this many, as if it were the last step; 0: no limit. Holds DAPO's dynamic sampling, which
    generates more per step, to another method's budget in samples (`nanoseek study rl-ablation`)."""
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
    tasks: str = DEFAULT_TASKS
    """Built-in prompt mixture: 'name' or 'name:weight', comma separated."""
    difficulty: dict[str, Any] = field(default_factory=dict)
    """Per-task difficulty knobs, e.g. {arithmetic = {digits = 3}}."""
    prompts_file: str = ""
    """A JSONL of {prompt or messages, answer[, task]} (or code rows: tests instead of answer, with
    rl.rewards=code) instead of the built-in tasks."""
    envs: str = ""
    """Environments instead of the tasks: 'NAME' or 'NAME:weight', comma separated (NAME may be NAME:ARG,
    e.g. task:arithmetic); an episode's return (the sum of its turns' rewards) is its reward. Knobs:
    rl.difficulty keyed by the environment's name. Held-out seeds from envs.HELD_OUT_SEED_START up."""
    turn_credit: bool = False
    """Environments: each turn's tokens get the advantage of the rewards from that turn on (rewards-to-go,
    normalised by the group's returns) instead of the whole episode's."""
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
class RewardsConfig:
    sandbox: str = "auto"
    """Isolation of the programs that code rewards run: 'namespaces' (Linux user, PID, mount and network
    namespaces), 'process' (limits and a process group only) or 'auto' (the strongest this machine
    allows); see nanoseek.rewards.sandbox and the README's code sandbox table."""


@dataclass
class EvalConfig:
    """An evaluation: the flags of `nanoseek eval`, the keywords of evaluate_checkpoint, a speedrun's [eval].

    The sampling fields are read by SamplingParams.from_config (which defines them); the defaults are R1's."""

    benches: list[str] = field(default_factory=lambda: ["tasks"])
    """Benchmark files or built-in tasks ('tasks' = all of them); see nanoseek.eval.harness."""
    # sampling
    k: int = 4
    """Samples per problem (1 when temperature is 0)."""
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 0
    min_p: float = 0.0
    max_new_tokens: int = 2048
    seed: int = 0
    """Seeds the sampler, the generated task problems and the choice of few-shot examples."""
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    # problems
    n_problems: int = 100
    """Problems generated per built-in task benchmark."""
    limit: int | None = None
    difficulty: dict[str, dict[str, Any]] = field(default_factory=dict)
    skip_bad: bool = False
    prompt_field: str | None = None
    answer_field: str | None = None
    # prompts
    few_shot: int = 0
    instruction: str = "auto"
    system: str | None = None
    think_prefill: bool = False
    # engine and output
    max_batch: int = 64
    plots: bool = True
    quiet: bool = False

    @property
    def samples(self) -> int:
        return 1 if self.temperature == 0 else self.k

    def check(self, where: str = "") -> None:
        check_numbers(self, where)
        if self.few_shot and (self.system or self.think_prefill):
            raise InputError(
                f"{where}few_shot = {self.few_shot}: few-shot prompts are plain text; "
                "system and think_prefill need the chat template"
            )


@dataclass
class RunConfig:
    preset: str = "tiny"
    """Model preset; individual fields can still be overridden under [model]."""
    model: dict[str, Any] = field(default_factory=dict)
    """Overrides of the preset's ModelConfig fields."""
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    """How the run's model is evaluated (by `nanoseek speedrun` after the stage)."""

    def model_config(self, vocab_size: int | None = None) -> ModelConfig:
        overrides = dict(self.model)
        if vocab_size is not None and "vocab_size" not in overrides:
            overrides["vocab_size"] = vocab_size
        return get_preset(self.preset, **overrides)

    def check(self) -> None:
        """Raise an InputError (a ValueError) naming the first bad setting."""
        for name in ("train", "data", "rl", "rewards"):
            check_numbers(getattr(self, name), f"{name}.")
        check_numbers(self.train.lora, "train.lora.")
        self.eval.check("eval.")
        parse_task_weights(self.data.tasks, "data.tasks")
        parse_task_weights(self.rl.tasks, "rl.tasks")
        if self.rl.envs:
            parse_env_weights(self.rl.envs, "rl.envs")
            if self.rl.prompts_file:
                raise InputError("rl.envs and rl.prompts_file: set one of them (episodes or prompts)")
        for section, name, allowed in (
            ("train", "optimizer", OPTIMIZERS),
            ("train", "schedule", SCHEDULES),
            ("train", "parallel", PARALLEL_LAYOUTS),
            ("train", "activation_checkpointing", ACTIVATION_CHECKPOINTING),
            ("rl", "scale_rewards", REWARD_SCALINGS),
            ("rl", "loss_agg", LOSS_AGGREGATIONS),
            ("rl", "overlong", OVERLONG_MODES),
            ("rewards", "sandbox", SANDBOX_LEVELS),
        ):
            value = getattr(getattr(self, section), name)
            if value not in allowed:
                raise InputError(f"{section}.{name} = {value!r}: must be one of {', '.join(allowed)}")
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.train.device):
            raise InputError(f"train.device = {self.train.device!r}: must be auto, cpu, cuda, cuda:N or mps")
        from nanoseek.tasks import list_tasks  # tasks import no settings: no cycle

        for where, spec in (("data.tasks", self.data.tasks), ("rl.tasks", self.rl.tasks)):
            for task in parse_task_weights(spec, where):
                if task not in list_tasks():
                    raise InputError(f"{where}: " + str(unknown("task", task, list_tasks())))
        for name in ("prompts_file", "eval_file"):
            if getattr(self.rl, name):
                check_file(getattr(self.rl, name), f"rl.{name}")
        try:
            self.model_config()
        except UserError:
            raise
        except ValueError as e:  # ModelConfig's own check of the preset and [model] fields
            raise InputError(str(e)) from None


def parse_value(value: Any, kind: Any, where: str) -> Any:
    """`nanoseek.values.parse_value`, its ValueError an InputError (a bad setting is the user's to fix)."""
    try:
        return _parse_value(value, kind, where)
    except ValueError as e:
        raise InputError(str(e)) from None


# ----------------------------------------------------------------------------- task weights, checking values
def parse_task_weights(spec: str, where: str) -> dict[str, float]:
    """'a,b:2' -> {'a': 1.0, 'b': 2.0}: a task mixture (data.tasks, rl.tasks)."""
    out = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, weight = part.partition(":")
        try:
            out[name.strip()] = float(weight) if weight else 1.0
        except ValueError:
            raise InputError(f"{where}: bad weight in {part!r} (expected name or name:weight)") from None
        if not (math.isfinite(out[name.strip()]) and out[name.strip()] >= 0):
            raise InputError(f"{where}: the weight in {part!r} must be >= 0")
    if not out:
        raise InputError(f"{where} = {spec!r}: names no task")
    return out


def parse_env_weights(spec: str, where: str) -> dict[str, float]:
    """'guess_number,task:arithmetic:2' -> {'guess_number': 1.0, 'task:arithmetic': 2.0}: an environment
    mixture (rl.envs). A part's last ':' field is its weight when it reads as a number."""
    out = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, tail = part.rpartition(":")
        try:
            weight = float(tail) if name else None
        except ValueError:
            weight = None
        if weight is None:
            name, weight = part, 1.0
        if not (math.isfinite(weight) and weight >= 0) or not name.strip():
            raise InputError(f"{where}: bad part {part!r} (expected NAME or NAME:weight, the weight >= 0)")
        out[name.strip()] = weight
    if not out:
        raise InputError(f"{where} = {spec!r}: names no environment")
    return out


# The range of the number settings, by field name (a name means the same in every section that has
# it); every other number must be >= 0. The counts that loops run over or steps are divided by: >= 1.
_AT_LEAST = dict.fromkeys(
    "steps batch_size seq_len grad_accum eval_batches checkpoint_every keep_checkpoints log_every builtin_examples "
    "prompts_per_step max_new_tokens num_iterations micro_batch_size max_sampling_rounds eval_problems eval_samples "
    "k n_problems limit max_batch expert_parallel rank".split(),
    1,
) | {"group_size": 2}  # advantages are relative to the group
_FRACTIONS = {
    "dropout",
    "min_lr_ratio",
    "decay_fraction",
    "beta1",
    "beta2",
    "val_fraction",
    "top_p",
    "eval_top_p",
    "min_p",
}
_ABOVE_ZERO = {"top_p", "eval_top_p"}


def check_numbers(section: Any, where: str) -> None:
    """Every field of a section of its type, and every number in its range; else a ValueError naming it."""
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        value, name = getattr(section, f.name), f"{where}{f.name}"
        if parse_value(value, hints[f.name], name) != value and isinstance(value, str):  # "2" set in code
            raise InputError(f"{name} = {value!r}: expected {hints[f.name]}")
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        low, high = _AT_LEAST.get(f.name, 0), 1 if f.name in _FRACTIONS else math.inf
        if f.name in _ABOVE_ZERO:
            if not 0 < value <= high:
                raise InputError(f"{name} = {value!r}: must be in (0, 1]")
        elif not (math.isfinite(value) and low <= value <= high):
            raise InputError(f"{name} = {value!r}: must be " + (f">= {low}" if high == math.inf else "in [0, 1]"))
