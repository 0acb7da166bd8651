"""Load Hugging Face transformers checkpoints into a nanoseek `Transformer`, and export back.

    model = load_hf_model("path/to/Qwen3-0.6B", device="cuda", dtype=torch.bfloat16)
    save_hf(model, "out/hf", tokenizer_dir="path/to/checkpoint")

A model directory is config.json + *.safetensors (one file, or shards with or without
`model.safetensors.index.json`) + optionally the tokenizer files. Loading builds the model
on the meta device and streams the stored tensors one at a time onto the target device and
dtype, so the weights are never held twice. The config and name mappings live in
`hf_config.py` and `hf_weights.py`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from nanoseek.interop.hf_config import (
    ARCHITECTURES,
    HFConfigError,
    architecture_of,
    hf_config_to_model_config,
    model_config_to_hf_config,
    pick_architecture,
    read_hf_config,
)
from nanoseek.interop.hf_weights import (
    INDEX_FILE,
    HFWeightsError,
    SafetensorsDir,
    check,
    check_zeros,
    export_tensors,
    fused_expert_layers,
    load_tensor,
    plan,
)
from nanoseek.model.config import ModelConfig
from nanoseek.model.transformer import Transformer
from nanoseek.tokenizer import Tokenizer

# Files that make up a tokenizer (copied as they are by `convert`).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)
_DTYPE_NAMES = {
    torch.float32: "float32",
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
    torch.float64: "float64",
}


def load_hf_config(directory: str | Path) -> ModelConfig:
    """The `ModelConfig` of a Hugging Face model directory (errors name the directory and the field)."""
    hf = read_hf_config(directory)
    try:
        return hf_config_to_model_config(hf)
    except HFConfigError as e:
        raise HFConfigError(f"{directory}: {e}") from None
    except (ValueError, TypeError) as e:  # ModelConfig validation, or a field of the wrong type
        raise HFConfigError(f"{directory}: config.json does not describe a valid model: {e}") from None


def load_hf_model(
    directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = torch.float32
) -> Transformer:
    """A `Transformer` holding the weights of a transformers checkpoint (dtype=None: the stored dtype).

    Raises `HFConfigError` for an architecture or config field nanoseek cannot reproduce and
    `HFWeightsError` listing missing / unexpected tensors and shape mismatches.
    """
    directory = Path(directory)
    hf = read_hf_config(directory)
    cfg = load_hf_config(directory)
    arch = architecture_of(hf)
    device = torch.device(device)
    reader = SafetensorsDir(directory)
    try:
        dtype = dtype or reader.most_common_float_dtype()
        p = plan(cfg, arch, hf, fused_expert_layers(reader.names()))
        with torch.device("meta"):
            model = Transformer(cfg)
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        check(p, shapes, reader)
        check_zeros(p, reader)
        state = {link.ours: load_tensor(link, reader, shapes[link.ours], device, dtype) for link in p.links}
    finally:
        reader.close()
    for name in shapes.keys() - state.keys():
        if not name.endswith("e_score_correction_bias"):  # Qwen-MoE routers have no selection bias
            raise HFWeightsError(f"internal: no checkpoint tensor mapped to {name}")
        state[name] = torch.zeros(shapes[name], dtype=torch.float32, device=device)
    model.load_state_dict(state, assign=True)
    model.materialize_buffers(device)
    return model


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy whichever tokenizer files `src` has into `dst`; returns their names."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file() and (src / name).resolve() != (dst / name).resolve():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied


def _token_ids(tokenizer_dir: Path) -> dict[str, object]:
    if not (tokenizer_dir / "tokenizer.json").is_file():
        return {}
    tok = Tokenizer.load(tokenizer_dir)
    stop = tok.stop_ids
    return {"bos_token_id": tok.bos_id, "eos_token_id": stop[0] if len(stop) == 1 else stop, "pad_token_id": tok.pad_id}


def save_hf(
    model: Transformer,
    out_dir: str | Path,
    tokenizer_dir: str | Path | None = None,
    max_shard_bytes: int = 4 << 30,
) -> Path:
    """Write `model` as a transformers checkpoint that `AutoModelForCausalLM.from_pretrained` loads.

    The architecture is the one that computes exactly what the model computes
    (`pick_architecture`); a model with none raises `HFConfigError` saying why. Weights are
    written in the model's dtype, in shards of at most `max_shard_bytes` (plus an index when
    there are several), one shard in memory at a time.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    arch = pick_architecture(cfg)
    dtype = model.embed.weight.dtype
    hf = model_config_to_hf_config(cfg, dtype=_DTYPE_NAMES.get(dtype, "float32"))
    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, out)
        hf.update({k: v for k, v in _token_ids(Path(tokenizer_dir)).items() if v is not None})

    # Shards go to temporary names first; stale weights of an earlier export are replaced at the end.
    state = model.state_dict()
    shards: list[tuple[Path, list[str]]] = []
    pending: dict[str, torch.Tensor] = {}
    pending_bytes = 0

    def flush() -> None:
        nonlocal pending, pending_bytes
        tmp = out / f".shard-{len(shards):05d}.safetensors.tmp"
        save_file(pending, str(tmp), metadata={"format": "pt"})
        shards.append((tmp, list(pending)))
        pending, pending_bytes = {}, 0

    total = 0
    for name, tensor in export_tensors(plan(cfg, arch, hf), state):
        size = tensor.numel() * tensor.element_size()
        if pending and pending_bytes + size > max_shard_bytes:
            flush()
        pending[name] = tensor
        pending_bytes += size
        total += size
    flush()

    for stale in [*out.glob("model*.safetensors"), out / INDEX_FILE]:
        stale.unlink(missing_ok=True)
    if len(shards) == 1:
        os.replace(shards[0][0], out / "model.safetensors")
    else:
        weight_map = {}
        for k, (tmp, names) in enumerate(shards, 1):
            final = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            os.replace(tmp, out / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    gen = {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in hf}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return out


__all__ = [
    "ARCHITECTURES",
    "HFConfigError",
    "HFWeightsError",
    "copy_tokenizer_files",
    "hf_config_to_model_config",
    "load_hf_config",
    "load_hf_model",
    "model_config_to_hf_config",
    "pick_architecture",
    "save_hf",
]
