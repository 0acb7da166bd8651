"""Checkpoints: everything needed to continue a run bit for bit, written atomically.

    RUN_DIR/checkpoints/step_N/
        config.json, model.safetensors      the model (loadable on its own: `--checkpoint`); under LoRA instead
        adapter_config.json, adapter_model.safetensors   the adapters (PEFT format), naming their base
        tokenizer.json, tokenizer_config.json
        optimizer.pt                        optimizer states (tensors only; loaded with weights_only=True)
        rng.safetensors                     torch (and CUDA) generator states
        trainer_state.json                  step, data position, python/numpy RNG, stage-specific state

A run under FSDP (`train.parallel = fsdp`) or expert parallelism saves a sharded checkpoint instead,
written by every rank with `torch.distributed.checkpoint` (each rank its own shards, none the whole state):

    RUN_DIR/checkpoints/step_N/
        config.json, tokenizer files, rng.safetensors, trainer_state.json     as above (rank 0)
        sharded/                    model and optimizer states: one .distcp file per rank + .metadata

It resumes on any number of ranks, under FSDP or not, one process included (the shards are
resharded as they load), and `nanoseek checkpoint consolidate` turns it into the single-file one.

The directory is assembled under a temporary name (`.step_N.XXXX.tmp`) and renamed into place, so a
crash mid-write never leaves a half checkpoint that `--resume` would pick up; the next start of the run
removes such leftovers (`remove_stale_tmp`).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from nanoseek.errors import InputError
from nanoseek.interop.peft import save_adapters
from nanoseek.loading import latest_checkpoint
from nanoseek.model.config import ModelConfig
from nanoseek.model.io import save_model
from nanoseek.model.lora import lora_of
from nanoseek.model.transformer import Transformer
from nanoseek.train import distributed, expert_parallel


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{i}"] = s
    np_state = np.random.get_state()
    py_state = random.getstate()
    plain = {
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, plain


def set_rng_state(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda_"))]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    v, state, gauss = plain["python"]
    random.setstate((v, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: Transformer,
    optimizers: list[torch.optim.Optimizer] | None = None,
    tokenizer: Any = None,
    state: dict[str, Any] | None = None,
    keep: int = 2,
) -> Path:
    """Write RUN_DIR/checkpoints/step_N atomically and keep only the newest `keep` checkpoints."""
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step_{step}"
    tmp = Path(tempfile.mkdtemp(dir=ckpt_root, prefix=f".step_{step}.", suffix=".tmp"))
    try:
        if lora_of(model) is not None:  # the adapters (PEFT format), which name their base directory
            save_adapters(model, tmp)
        else:
            save_model(model, tmp)
        if tokenizer is not None:
            tokenizer.save(tmp)
        if optimizers is not None:
            torch.save([opt.state_dict() for opt in optimizers], tmp / "optimizer.pt")
        tensors, plain = rng_state()
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "rng.safetensors"))
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "rng": plain, **(state or {})}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _prune(ckpt_root, keep)
    return final


def save_sharded_checkpoint(
    run_dir: str | Path,
    step: int,
    model: Transformer,
    optimizers: list[torch.optim.Optimizer],
    tokenizer: Any = None,
    state: dict[str, Any] | None = None,
    keep: int = 2,
) -> Path:
    """Write RUN_DIR/checkpoints/step_N with every rank's shards, atomically; every rank must call this."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    ckpt_root = Path(run_dir) / "checkpoints"
    final = ckpt_root / f"step_{step}"
    tmp = ckpt_root / f".step_{step}.sharded.tmp"  # one name for all ranks (a leftover is removed at start)
    main = distributed.topology().is_main
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    distributed.barrier()
    try:
        model_state, optim_state = get_state_dict(model, optimizers)
        model_state, optim_state = expert_parallel.as_dtensors(model, model_state, optim_state)  # each expert once
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp / "sharded")  # collective
        if main:
            model.cfg.save(tmp / "config.json")
            if tokenizer is not None:
                tokenizer.save(tmp)
            tensors, plain = rng_state()
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "rng.safetensors"))
            (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "rng": plain, **(state or {})}))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _prune(ckpt_root, keep)
    except BaseException:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    distributed.barrier()  # no rank goes on before the checkpoint is in place
    return final


def is_sharded_checkpoint(ckpt: Path) -> bool:
    return (ckpt / "sharded").is_dir()


def check_same_model(ckpt: Path, cfg: ModelConfig) -> None:
    """A sharded checkpoint holds no shapes a reader can check cheaply: its config.json must be the model's."""
    saved = ModelConfig.load(ckpt / "config.json")
    if saved != cfg:
        differ = [k for k in vars(cfg) if getattr(saved, k, None) != getattr(cfg, k)]
        raise InputError(
            f"{ckpt}: a sharded checkpoint of another model (config.json differs in {', '.join(differ[:4])})"
        )


def load_sharded_checkpoint(
    ckpt: Path, model: Transformer, optimizers: list[torch.optim.Optimizer], restore_rng: bool = True
) -> dict[str, Any]:
    """Load a sharded checkpoint into `model` and `optimizers` as this run lays them out (any number of
    ranks, sharded or not); returns trainer_state.json. Every rank must call this."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    check_same_model(ckpt, model.cfg)
    model_state, optim_state = get_state_dict(model, optimizers)
    model_state, optim_state = expert_parallel.as_dtensors(model, model_state, optim_state)  # loaded in place
    alone = distributed.topology().world == 1  # one process reads every shard itself
    dcp.load({"model": model_state, "optim": optim_state}, checkpoint_id=ckpt / "sharded", no_dist=alone)
    model_state, optim_state = expert_parallel.as_local(model_state), expert_parallel.as_local(optim_state)
    set_state_dict(model, optimizers, model_state_dict=model_state, optim_state_dict=optim_state)
    return load_trainer_state(ckpt, None, restore_rng)


def consolidate(ckpt: Path, out: Path) -> Path:
    """The single-file checkpoint (config, model.safetensors, tokenizer) of a sharded one, in one process."""
    import torch.distributed.checkpoint as dcp

    if not is_sharded_checkpoint(ckpt):
        raise InputError(f"{ckpt}: not a sharded checkpoint (no sharded/ directory)")
    with torch.device("meta"):
        model = Transformer(ModelConfig.load(ckpt / "config.json"))
    model.to_empty(device="cpu")
    state = model.state_dict()
    dcp.load({"model": state}, checkpoint_id=ckpt / "sharded", no_dist=True)
    save_model(model, out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (ckpt / name).is_file():
            shutil.copy(ckpt / name, out / name)
    return out


def _prune(ckpt_root: Path, keep: int) -> None:
    steps = sorted((int(d.name.split("_")[1]), d) for d in ckpt_root.glob("step_*") if d.name.split("_")[1].isdigit())
    for _, d in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(d, ignore_errors=True)


def load_trainer_state(
    ckpt: Path, optimizers: list[torch.optim.Optimizer] | None = None, restore_rng: bool = True
) -> dict[str, Any]:
    """Restore optimizer and RNG states from a checkpoint directory; return trainer_state.json."""
    state = json.loads((ckpt / "trainer_state.json").read_text())
    if optimizers is not None:
        saved = torch.load(ckpt / "optimizer.pt", weights_only=True, map_location="cpu")
        if len(saved) != len(optimizers):
            raise ValueError(f"{ckpt}/optimizer.pt: holds {len(saved)} optimizer states, the run has {len(optimizers)}")
        for opt, s in zip(optimizers, saved):
            opt.load_state_dict(s)
    if restore_rng:
        set_rng_state(load_file(str(ckpt / "rng.safetensors")), state["rng"])
    return state


def find_resume_checkpoint(run_dir: str | Path) -> Path | None:
    return latest_checkpoint(Path(run_dir))


def remove_stale_tmp(run_dir: str | Path) -> list[Path]:
    """Remove the temporary directories of checkpoint saves that were killed mid-write; return them.

    Only one process writes a run's checkpoints, so at the start of a run any `.step_N.*.tmp` is a leftover."""
    stale = sorted((Path(run_dir) / "checkpoints").glob(".step_*.tmp"))
    for d in stale:
        shutil.rmtree(d, ignore_errors=True)
    return stale
