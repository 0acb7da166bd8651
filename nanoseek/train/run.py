"""The run scaffold shared by pretraining, SFT and RL: everything a training stage does around its step.

    nanoseek pretrain --out runs/pt                       # Run(cfg, "runs/pt", "pretrain") + train.loop
    nanoseek sft --checkpoint runs/pt --out runs/sft      # Run(cfg, "runs/sft", "sft") + train.loop
    nanoseek rl --checkpoint runs/sft --out runs/rl       # Run(cfg, "runs/rl", "rl") + train.rl
    torchrun --standalone --nproc_per_node=8 -m nanoseek pretrain --preset moe-1b   # the same, on every rank

A `Run` owns RUN_DIR and what no stage does differently: the device and ranks, config.toml, the seed,
the model's layout over the ranks (`nanoseek.train.parallel`: DDP, FSDP, expert parallelism, activation
checkpointing), the optimizers with the MoE balancing hook, resume from the latest checkpoint (weights,
optimizer and RNG states, and the stage's own state; sharded checkpoints under FSDP or EP),
metrics.jsonl, the lr schedule and progress bar of the step loop, periodic, final and interrupted
checkpoints, summary.json, the plots and the final barrier.
A stage brings only its step (`train.loop.train` for pretraining and SFT, `train.rl.rl` for RL):

    run = Run(cfg, run_dir, "sft", resume=resume, quiet=quiet, stop_at=stop_at)
    state = run.begin(model, tokenizer, lambda: {"data": data.state_dict(), "stage": "sft"})
    if state is not None:
        data.load_state_dict(state["data"])     # the stage's own part of the checkpoint
    for step in run.steps():                    # the lr is set; after the body, a checkpoint when due
        ...                                     # forward, backward, optimizer step, run.log.write(record)
    return run.finish(dict(stage="sft", steps=run.done, ...))

Rank 0 alone writes files and prints (every rank writes its shards of a sharded checkpoint); the
other ranks log to a `NullLog`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO, TypedDict

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from nanoseek import precision
from nanoseek.config import RunConfig
from nanoseek.config_toml import run_config_to_toml
from nanoseek.errors import InputError
from nanoseek.interop.peft import fill_adapters
from nanoseek.loading import load_checkpoint, pick_device, resolve_checkpoint
from nanoseek.model import Transformer, install_balancing_hook
from nanoseek.model.io import model_state, read_safetensors
from nanoseek.model.lora import adapter_state, apply_lora, lora_of, merge_lora
from nanoseek.plots import plot_run
from nanoseek.train import distributed, parallel
from nanoseek.train.checkpoint import (
    find_resume_checkpoint,
    is_sharded_checkpoint,
    load_sharded_checkpoint,
    load_trainer_state,
    remove_stale_tmp,
    save_checkpoint,
    save_sharded_checkpoint,
)
from nanoseek.train.optim import build_optimizers, lr_factor, set_lr


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype training autocasts matmuls to on this device (None: float32 throughout; `nanoseek.precision`)."""
    return precision.autocast_dtype(device)


def autocast(device: torch.device):
    """Training's autocast on `device`: bf16 on CUDA and on CPUs with native bf16, else none."""
    return precision.autocast(device, autocast_dtype(device))


ROLLOUT_FLOAT32_MAX_ROWS = 64
"""On a CPU, RL's engine decodes a float32 policy that fits the cache as it is (no twin, no autocast) when it runs at
most this many sequences at once. tiny, 48 new tokens, float32 against the bf16 twin under autocast, 2 threads, AMX:
64 rows 1.09x faster; 128 rows 0.87x, 256 0.85x, 512 0.72x: the twin's bf16 products win once the rows make a step
bound by arithmetic (docs/LOG.md, 2026-12-05, thirty-second session)."""


def rollout_dtype(model: torch.nn.Module, device: torch.device, rows: int) -> torch.dtype | None:
    """The dtype RL's engine of `rows` slots decodes `model` (the float32 policy, or its twin) in: training's autocast
    dtype (a twin of 16-bit matmul weights decoded under autocast: `engine.twin`), except on a CPU for a float32 model
    that fits the cache (`precision.inference_dtype`) at up to ROLLOUT_FLOAT32_MAX_ROWS rows: decoded as it is,
    without autocast. A model that holds 16-bit weights already (a twin, LoRA's frozen base) keeps autocast."""
    dtype = autocast_dtype(device)
    if dtype is None or rows > ROLLOUT_FLOAT32_MAX_ROWS:
        return dtype
    if any(p.dtype != torch.float32 for p in model.parameters() if p.is_floating_point()):
        return dtype
    n_params = sum(p.numel() for p in model.parameters())
    return None if precision.inference_dtype(device, n_params) == torch.float32 else dtype


def rollout_autocast(engine: Any):
    """The autocast an RL engine's rollouts and evaluations decode under (`rollout_dtype` of what it decodes)."""
    return precision.autocast(engine.device, rollout_dtype(engine.model, engine.device, engine.n_slots))


def with_context(model: Transformer, max_seq_len: int) -> None:
    """Give `model` a context of `max_seq_len` tokens, its positional encoding unchanged.

    RoPE has no weights: the context length is configuration. Only a rope_scaling that reads its original
    length from max_seq_len (dynamic, yarn, llama3 without original_max_position_embeddings) would change
    with it, so that length is written into the scaling first."""
    cfg = model.cfg
    scaling = cfg.rope_scaling
    if scaling and not scaling.get("original_max_position_embeddings"):
        scaling = {**scaling, "original_max_position_embeddings": cfg.max_seq_len}
    model.cfg = dataclasses.replace(cfg, max_seq_len=max_seq_len, rope_scaling=scaling)
    model.rope_table(torch.device("cpu"))  # the longer cos/sin table now, in eager code


# ModelConfig fields read afresh at every training step, which a fine-tuning run may change on its checkpoint.
TRAINING_KNOBS = ("bias_update_rate", "aux_loss_coef")


def apply_model_settings(model: Transformer, settings: dict[str, Any], checkpoint: str | Path) -> bool:
    """Apply a run's `model.*` settings to the checkpoint it fine-tunes; True when the config changed.

    The context (`with_context`) and the balancing knobs (TRAINING_KNOBS) may change; any other field set to
    a value other than the checkpoint's is an InputError: the weights fix the architecture."""
    for name, value in settings.items():
        if name != "max_seq_len" and name not in TRAINING_KNOBS and getattr(model.cfg, name) != value:
            raise InputError(
                f"model.{name} = {value!r}: {checkpoint} has {name} = {getattr(model.cfg, name)!r}; a checkpoint "
                f"keeps its architecture (only model.max_seq_len, {', '.join(f'model.{k}' for k in TRAINING_KNOBS)} "
                "may change)"
            )
    old = model.cfg
    if settings.get("max_seq_len", old.max_seq_len) != old.max_seq_len:
        with_context(model, settings["max_seq_len"])
    knobs = {k: settings[k] for k in TRAINING_KNOBS if k in settings}
    new = dataclasses.replace(model.cfg, **knobs)
    for module in model.modules():  # the router and MoE layers read these from their own reference to the config
        if getattr(module, "cfg", None) is old or module is model:
            module.cfg = new
    return new != old


class MetricsLog:
    """metrics.jsonl: one JSON object per line; on resume, lines past the checkpoint are dropped."""

    def __init__(self, path: Path, resume_step: int | None) -> None:
        self.path = path
        if resume_step is not None and path.exists():
            kept = [ln for ln in path.read_text(errors="replace").splitlines() if _step_at_most(ln, resume_step)]
            path.write_text("".join(ln + "\n" for ln in kept))
        elif resume_step is None and path.exists():
            path.unlink()

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def _step_at_most(line: str, step: int) -> bool:
    """Whether a metrics line is a record of a step <= `step`; a torn line (a crash mid-write) is not kept."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return False
    return isinstance(record, dict) and record.get("step", 0) <= step


class NullLog:
    """What ranks other than 0 log to: nothing."""

    def write(self, record: dict[str, Any]) -> None:
        pass


class RunOptions(TypedDict, total=False):
    """How any stage runs: the keyword arguments of `pretrain`, `sft` and `rl`, handed on to `Run`."""

    resume: bool  # continue from RUN_DIR's latest checkpoint
    quiet: bool  # no progress bar or messages
    stop_at: int | None  # end this process after this step with a checkpoint, as an interruption would


class Run:
    """One stage's run in RUN_DIR. Construction joins the ranks, writes config.toml and seeds torch.

    `resume`, `quiet` and `stop_at` are the `RunOptions`; the schedule spans train.steps whatever
    `stop_at` is. `notes` is where the resume note goes (None: stdout, where pretraining and SFT
    print their progress lines).
    """

    def __init__(
        self,
        cfg: RunConfig,
        run_dir: str | Path,
        stage: str,
        *,
        resume: bool = False,
        quiet: bool = False,
        stop_at: int | None = None,
        notes: TextIO | None = None,
    ) -> None:
        parallel.check_launch(cfg.train)
        self.topo, self.device = distributed.setup(pick_device(cfg.train.device))
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.topo.is_main:
            (self.run_dir / "config.toml").write_text(run_config_to_toml(cfg))
            remove_stale_tmp(self.run_dir)  # a save killed mid-write left its temporary directory
        torch.manual_seed(cfg.train.seed)
        self.train_cfg = cfg.train
        self.model_settings = dict(cfg.model)  # applied to a checkpoint by `load_model`
        self.stage = stage
        self.resume = resume
        self.quiet = quiet or not self.topo.is_main
        self.stop_at = stop_at
        self.notes = notes
        # Set by `begin`: what the checkpoints save.
        self.model: Transformer | None = None
        self.tokenizer: Any = None
        self.stage_state: Callable[[], dict[str, Any]] = dict
        self.optimizers: list[torch.optim.Optimizer] = []
        self.parallel = "single"  # the layout over the ranks, set by `begin` (`nanoseek.train.parallel`)
        self.log: MetricsLog | NullLog = NullLog()
        self.start = self.done = 0  # the step this process started from; the steps done so far
        self.ending = False  # set by a stage's step body: this step is the run's last (e.g. rl.max_samples reached)
        self.bar: tqdm | None = None
        self._t_start = time.perf_counter()

    def load_model(self, checkpoint: str | Path) -> tuple[Transformer, Any]:
        """The model a fine-tuning stage (SFT, RL) starts from, on this rank's device, and its tokenizer: float32
        master weights, or under LoRA a base in the autocast dtype.

        With train.lora.enabled, frozen under new adapters (`add_adapters`); a checkpoint that is itself an
        adapter directory is its base with those adapters merged in. The run's `model.*` settings apply as
        `apply_model_settings` allows (the context, the balancing knobs; the checkpoints then keep them)."""
        # Under LoRA the frozen base is kept in the autocast dtype: loaded in it, never held in float32.
        dtype = (self.train_cfg.lora.enabled and autocast_dtype(self.device)) or torch.float32
        model, tokenizer = load_checkpoint(checkpoint, device=self.device, dtype=dtype)
        if tokenizer is None:
            raise FileNotFoundError(f"{checkpoint}: no tokenizer.json beside the weights")
        base = str(resolve_checkpoint(checkpoint)[1].resolve())
        if lora_of(model) is not None:
            merge_lora(model)
            base = ""  # the merged weights are on no disk: `begin` writes them to RUN_DIR/base
        if apply_model_settings(model, self.model_settings, checkpoint):
            base = ""  # the base directory's config.json is the old one: `begin` writes RUN_DIR/base
        self.add_adapters(model, base)
        return model, tokenizer

    def add_adapters(self, model: Transformer, base: str) -> None:
        """train.lora.enabled: freeze `model` under new adapters, once. The frozen matrices are stored in the
        autocast dtype (bf16 on CUDA and bf16-native CPUs): every matmul would cast them to it anyway.

        `base` is the directory holding the frozen weights ('' when none does, e.g. a fresh pretraining model)."""
        lc = self.train_cfg.lora
        if lc.enabled and lora_of(model) is None:
            base_dtype = autocast_dtype(self.device)
            apply_lora(model, lc.rank, lc.alpha, lc.targets, lc.dropout, base=base, base_dtype=base_dtype)

    def _save_base(self, model: Transformer) -> None:
        """Adapters whose base is on no disk: write the frozen weights to RUN_DIR/base, which their checkpoints name."""
        adapters = lora_of(model)
        if adapters is None or adapters.base:
            return
        base_dir = self.run_dir / "base"
        adapters.base = str(base_dir.resolve())
        if self.topo.is_main and not (self.resume and (base_dir / "model.safetensors").is_file()):
            skip = adapter_state(model).keys()
            state = {k: v for k, v in model_state(model).items() if k not in skip}
            base_dir.mkdir(parents=True, exist_ok=True)
            model.cfg.save(base_dir / "config.json")
            save_file(state, str(base_dir / "model.safetensors"))
            if self.tokenizer is not None:
                self.tokenizer.save(base_dir)

    def begin(
        self, model: Transformer, tokenizer: Any, stage_state: Callable[[], dict[str, Any]]
    ) -> dict[str, Any] | None:
        """Build the optimizers (the last carries the MoE balancing hook), resume when asked, open metrics.jsonl.

        Returns the resumed checkpoint's trainer state, whose stage-specific part the stage restores
        itself, or None on a fresh start. Every checkpoint saves `model`, `tokenizer` and `stage_state()`.
        """
        self.model, self.tokenizer, self.stage_state = model, tokenizer, stage_state
        model.train()
        self.add_adapters(model, "")
        self._save_base(model)
        lora = lora_of(model) is not None
        ckpt = find_resume_checkpoint(self.run_dir) if self.resume else None
        sharded = ckpt is not None and is_sharded_checkpoint(ckpt)
        if ckpt is not None and not sharded:
            if lora:
                fill_adapters(model, ckpt)
            else:
                model.load_state_dict(read_safetensors(ckpt / "model.safetensors"))
        self.parallel = parallel.resolve(self.train_cfg, self.topo, self.device, model.num_params())
        if lora and (self.parallel == "fsdp" or self.train_cfg.expert_parallel > 1):
            raise InputError("train.lora: not supported with train.parallel = fsdp or expert_parallel > 1 (yet)")
        if ckpt is not None and not sharded and self.saves_sharded():
            raise InputError(
                f"{ckpt}: not a sharded checkpoint; resume it with train.parallel = ddp, no expert_parallel"
            )
        parallel.prepare(model, self.train_cfg, self.parallel, self.device, sum_gradients=self.stage == "rl")
        model.to(self.device)  # laid out first: a model built on the host reaches the device as this rank's share
        self.optimizers = build_optimizers(model, self.train_cfg, self.device)
        if not lora:  # a frozen base keeps its routers' selection biases too
            install_balancing_hook(self.optimizers[-1], model)
        state = None
        if ckpt is not None:
            if sharded:
                state = load_sharded_checkpoint(ckpt, model, self.optimizers)
            else:
                state = load_trainer_state(ckpt, self.optimizers)
            self.start = self.done = state["step"]
            if not self.quiet:
                print(f"resuming {self.stage} from {ckpt} (step {self.start})", file=self.notes)
        if self.topo.is_main:
            self.log = MetricsLog(self.run_dir / "metrics.jsonl", self.start if ckpt is not None else None)
        return state

    def steps(self) -> Iterator[int]:
        """The steps left (0-based), each with its learning rate set.

        After each step's body: a checkpoint every train.checkpoint_every steps, after the last (train.steps,
        or the step whose body set `ending`) and at `stop_at` (which ends the loop), then the progress bar's
        tick (the body sets its postfix). None left when `ending` is already set (a resumed run that had ended).
        """
        t = self.train_cfg
        self.bar = tqdm(total=t.steps, initial=self.start, desc=self.stage, disable=self.quiet, dynamic_ncols=True)
        self._t_start = time.perf_counter()
        for step in range(self.start, t.steps):
            if self.ending:
                break
            set_lr(self.optimizers, lr_factor(step, t))
            yield step
            self.done = step + 1
            last = self.done == t.steps or self.ending
            interrupted = not last and self.stop_at is not None and self.done >= self.stop_at
            if self.done % t.checkpoint_every == 0 or last or interrupted:
                self.save()
            self.bar.update(1)
            if interrupted or last:
                break
        self.bar.close()

    @property
    def finished(self) -> bool:
        """Whether the run has done all its steps: train.steps, or the last one a step body marked `ending`."""
        return self.done == self.train_cfg.steps or self.ending

    @property
    def steps_ahead(self) -> int:
        """The steps this process will run from here: to `stop_at` when given, else to train.steps."""
        end = self.train_cfg.steps if self.stop_at is None else min(self.stop_at, self.train_cfg.steps)
        return max(end - self.done, 0)

    def save(self) -> None:
        """Checkpoint this step: sharded by every rank under FSDP or EP, else the ordinary one by rank 0."""
        args = (self.run_dir, self.done, self.model, self.optimizers, self.tokenizer, self.stage_state())
        if self.saves_sharded():
            save_sharded_checkpoint(*args, keep=self.train_cfg.keep_checkpoints)
        elif self.topo.is_main:
            save_checkpoint(*args, keep=self.train_cfg.keep_checkpoints)

    def saves_sharded(self) -> bool:
        """Whether no rank holds the whole state (FSDP, expert parallelism): checkpoints are sharded."""
        return self.parallel == "fsdp" or self.train_cfg.expert_parallel > 1

    def lr(self) -> float:
        """The learning rate of this step (the first optimizer's first group)."""
        return self.optimizers[0].param_groups[0]["lr"]

    def elapsed(self) -> float:
        """Seconds since the step loop began."""
        return time.perf_counter() - self._t_start

    def finish(self, summary: dict[str, Any]) -> dict[str, Any]:
        """Write summary.json and the stage's plots (rank 0); every rank returns the summary once they are on disk."""
        if self.topo.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            plot_run(self.run_dir, self.stage)
        distributed.barrier()  # the other ranks return once rank 0's files are on disk
        return summary
