"""Resolve what a user passes as `--checkpoint` and load it for inference.

Accepted: a nanoseek checkpoint directory (`config.json` + `model.safetensors`), a run
directory (its latest `checkpoints/step_N/`), or a Hugging Face model directory
(`config.json` with `architectures`, `*.safetensors`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from nanoseek.errors import InputError, missing
from nanoseek.interop.hf import load_hf_model
from nanoseek.model import Transformer, load_model
from nanoseek.tokenizer import Tokenizer


def latest_checkpoint(run_dir: Path) -> Path | None:
    steps = []
    for d in (run_dir / "checkpoints").glob("step_*"):
        m = re.fullmatch(r"step_(\d+)", d.name)
        # (a sharded checkpoint of an FSDP run: `nanoseek.train.checkpoint`)
        if m and ((d / "model.safetensors").is_file() or (d / "sharded" / ".metadata").is_file()):
            steps.append((int(m.group(1)), d))
    return max(steps)[1] if steps else None


def is_hf_dir(path: Path) -> bool:
    """Whether `path`'s config.json is a Hugging Face one (a damaged one is left to the loader to name)."""
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    try:
        d = json.loads(cfg.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return False
    return isinstance(d, dict) and ("architectures" in d or "model_type" in d)


def resolve_checkpoint(path: str | Path) -> tuple[str, Path]:
    """('nanoseek' | 'hf', directory) for a checkpoint, run or Hugging Face directory."""
    path = Path(path)
    if not path.exists():
        raise missing(path, "no such checkpoint, run or model directory")
    if not path.is_dir():
        raise InputError(f"{path}: is a file; expected a checkpoint, run or model directory")
    if (path / "model.safetensors").is_file() and (path / "config.json").is_file() and not is_hf_dir(path):
        return "nanoseek", path
    if is_hf_dir(path):
        return "hf", path
    latest = latest_checkpoint(path)
    if latest is not None and not (latest / "model.safetensors").is_file():
        raise InputError(f"{latest}: a sharded checkpoint; make it whole first: nanoseek checkpoint consolidate {path}")
    if latest is not None:
        return "nanoseek", latest
    raise InputError(
        f"{path}: not a checkpoint (config.json + model.safetensors), a run directory "
        "(checkpoints/step_N/) or a Hugging Face model directory"
    )


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {device}: CUDA is not available on this machine")
    try:
        return torch.device(device)
    except RuntimeError:
        raise InputError(f"--device {device}: not a device (auto, cpu, cuda, cuda:N or mps)") from None


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_checkpoint(
    path: str | Path, device: str | torch.device = "auto", dtype: torch.dtype | None = None
) -> tuple[Transformer, Tokenizer | None]:
    """(model in eval mode, tokenizer or None when the directory has no tokenizer.json)."""
    device = pick_device(device) if isinstance(device, str) else device
    dtype = dtype or default_dtype(device)
    kind, directory = resolve_checkpoint(path)
    if kind == "hf":
        model = load_hf_model(directory, device=device, dtype=dtype)
    else:
        model = load_model(directory, device=device, dtype=dtype)
    tokenizer = None
    if (directory / "tokenizer.json").is_file():
        tokenizer = Tokenizer.load(directory)
    return model.eval(), tokenizer
