"""Save and load a model directory: `config.json` + `model.safetensors` (never pickle)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from nanoseek.errors import InputError, missing, reading
from nanoseek.model.config import ModelConfig
from nanoseek.model.transformer import Transformer


def atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same directory, then rename: no torn files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def model_state(model: Transformer) -> dict[str, torch.Tensor]:
    """State dict as contiguous CPU tensors (safetensors wants no shared or strided storage)."""
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}


def save_model(model: Transformer, directory: str | Path) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / "config.json", lambda p: model.cfg.save(p))
    atomic_write(directory / "model.safetensors", lambda p: save_file(model_state(model), p))


def read_safetensors(path: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file, or one line saying it is empty, truncated or not safetensors."""
    with reading(path):
        size = path.stat().st_size
    if size == 0:
        raise InputError(f"{path}: empty file (expected safetensors weights)")
    try:
        return load_file(str(path), device=str(device))
    except Exception as e:  # safetensors raises its own errors for every kind of damage
        reason = " ".join(str(e).split()) or type(e).__name__
        raise InputError(f"{path}: not a readable safetensors file, truncated or corrupt ({reason})") from None


def load_model(
    directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> Transformer:
    """Build on the meta device (no random init, no second copy) and assign the stored tensors."""
    directory = Path(directory)
    for name in ("config.json", "model.safetensors"):
        if not (directory / name).is_file():
            raise missing(directory, f"no {name} (not a nanoseek model directory)")
    cfg = ModelConfig.load(directory / "config.json")
    with torch.device("meta"):
        model = Transformer(cfg)
    state = read_safetensors(directory / "model.safetensors", device)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing_names, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing_names or unexpected:
        raise InputError(
            f"{directory / 'model.safetensors'}: does not match config.json: "
            f"missing tensors {missing_names[:5]}, unexpected {unexpected[:5]}"
        )
    for k, v in state.items():
        if tuple(v.shape) != expected[k]:
            raise InputError(
                f"{directory / 'model.safetensors'}: does not match config.json: {k} has shape {tuple(v.shape)}, "
                f"config.json makes it {expected[k]}"
            )
    # The routers' selection bias stays float32: bf16 would round away its small balancing steps.
    state = {
        k: v.to(dtype) if v.is_floating_point() and not k.endswith("e_score_correction_bias") else v
        for k, v in state.items()
    }
    model.load_state_dict(state, assign=True)
    model.materialize_buffers(device)
    return model.to(device)
