"""Resolve what a user passes as `--checkpoint` and load it for inference.

Accepted: a nanoseek checkpoint directory (`config.json` + `model.safetensors`), a run
directory (its latest `checkpoints/step_N/`), a Hugging Face model directory
(`config.json` with `architectures`, `*.safetensors`), or a LoRA adapter directory
(`adapter_config.json` + `adapter_model.safetensors`, PEFT's format, as a LoRA run's checkpoints
are): its base (`base_model_name_or_path`, any of the above) with the adapters on top.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from nanoseek import precision
from nanoseek.engine.cache import bf16_for_the_kernel
from nanoseek.errors import InputError, missing
from nanoseek.interop.hf import load_hf_model
from nanoseek.interop.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_adapters, read_adapter_config
from nanoseek.model import Transformer, load_model
from nanoseek.model.linear import describe_packing
from nanoseek.tokenizer import Tokenizer


def latest_checkpoint(run_dir: Path) -> Path | None:
    steps = []
    for d in (run_dir / "checkpoints").glob("step_*"):
        m = re.fullmatch(r"step_(\d+)", d.name)
        # (a sharded checkpoint of an FSDP run: `nanoseek.train.checkpoint`)
        if m and (
            (d / "model.safetensors").is_file()
            or (d / "sharded" / ".metadata").is_file()
            or (d / ADAPTER_WEIGHTS).is_file()
        ):
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
    """('nanoseek' | 'hf' | 'adapter', directory) for a checkpoint, run, Hugging Face or adapter directory."""
    path = Path(path)
    if not path.exists():
        raise missing(path, "no such checkpoint, run or model directory")
    if not path.is_dir():
        raise InputError(f"{path}: is a file; expected a checkpoint, run or model directory")
    if (path / ADAPTER_CONFIG).is_file():
        return "adapter", path
    if (path / "model.safetensors").is_file() and (path / "config.json").is_file() and not is_hf_dir(path):
        return "nanoseek", path
    if is_hf_dir(path):
        return "hf", path
    latest = latest_checkpoint(path)
    if latest is not None and (latest / "sharded").is_dir():
        raise InputError(f"{latest}: a sharded checkpoint; make it whole first: nanoseek checkpoint consolidate {path}")
    if latest is not None:
        return ("adapter" if (latest / ADAPTER_CONFIG).is_file() else "nanoseek"), latest
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
    if kind == "adapter":
        base = adapter_base(directory)
        model, tokenizer = load_checkpoint(base, device, dtype)
        load_adapters(model, directory, dtype=dtype)
        model.requires_grad_(False)
        if (directory / "tokenizer.json").is_file():
            tokenizer = Tokenizer.load(directory)
        return model.eval(), tokenizer
    if kind == "hf":
        model = load_hf_model(directory, device=device, dtype=dtype)
    else:
        model = load_model(directory, device=device, dtype=dtype)
    tokenizer = None
    if (directory / "tokenizer.json").is_file():
        tokenizer = Tokenizer.load(directory)
    return model.eval(), tokenizer


def load_for_inference(
    path: str | Path, device: str | torch.device = "auto", dtype: torch.dtype | None = None
) -> tuple[Transformer, Tokenizer | None, str]:
    """`load_checkpoint` for decoding (generate, chat, serve, eval): with `dtype` None on a CPU the model loads in
    float32 and is cast to `precision.inference_dtype`'s choice for its size (bf16 on a CPU with native bf16 once
    the float32 weights outgrow its cache; the benchmarks' choice too). Returns (model, tokenizer, line): the line
    says so when that cast happened, or when float32 weights decode over bf16 KV caches (nanoseek's CPU attention
    reads them: `engine.cache.bf16_for_the_kernel`), to print at the start; '' otherwise."""
    device = pick_device(device) if isinstance(device, str) else device
    model, tokenizer = load_checkpoint(path, device, dtype)
    if dtype is not None or device.type != "cpu":
        return model, tokenizer, ""
    chosen = precision.inference_dtype(device, model.num_params())  # needs the parameter count: after the load
    if chosen != torch.float32:
        model.to(chosen)
    elif not bf16_for_the_kernel(device):  # float32 throughout: nothing to say
        return model, tokenizer, ""
    return model, tokenizer, describe_precision(model, device, "auto")


def describe_precision(model: Transformer, device: torch.device, how: str) -> str:
    """The line a command or benchmark prints at its start: the model's dtype, why (`how`: auto or the flag that
    set it), and whether its bf16 weights multiply through prepacked copies."""
    packing = describe_packing(model)
    line = precision.describe_inference(device, model.output_weight.dtype, bf16_for_the_kernel(device)) + f" ({how})"
    return f"{line}; {packing}" if packing else line


def adapter_base(directory: Path) -> Path:
    """The base model directory an adapter directory names (a relative path is relative to the adapters)."""
    named = read_adapter_config(directory).get("base_model_name_or_path")
    if not isinstance(named, str) or not named:
        raise InputError(f"{directory / ADAPTER_CONFIG}: base_model_name_or_path names no base model directory")
    base = directory / named  # an absolute path stays itself
    if not base.is_dir():
        raise missing(base, f"no such base model directory (base_model_name_or_path of {directory / ADAPTER_CONFIG})")
    if (base / ADAPTER_CONFIG).is_file():
        raise InputError(f"{directory / ADAPTER_CONFIG}: its base {base} is an adapter directory itself")
    return base
