"""`nanoseek convert`: Hugging Face model directory <-> nanoseek checkpoint.

    nanoseek convert --from-hf path/to/Qwen3-0.6B --out ckpt/qwen3      # config.json + model.safetensors + tokenizer
    nanoseek convert --to-hf runs/pretrain --out hf/my-model              # loadable by transformers' from_pretrained

`--to-hf` accepts anything `--checkpoint` accepts: a checkpoint directory, a run directory
(its latest checkpoint) or a Hugging Face directory; a LoRA adapter directory (or a LoRA run)
with `--merge-lora`, which writes its base with the adapters merged in:

    nanoseek convert --to-hf runs/rl-lora --merge-lora --out hf/my-model
"""

from __future__ import annotations

import argparse

_DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-hf", metavar="HF_DIR", help="a Hugging Face model directory to convert to nanoseek")
    src.add_argument("--to-hf", metavar="CHECKPOINT", help="a nanoseek checkpoint or run directory to export")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--dtype", default="auto", choices=_DTYPES, help="weight dtype to write (default: as stored)")
    p.add_argument("--max-shard-gb", type=float, default=4.0, help="--to-hf: largest safetensors shard (GB)")
    p.add_argument(
        "--merge-lora", action="store_true", help="--to-hf of LoRA adapters: write their base with them merged in"
    )


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from nanoseek.errors import InputError
    from nanoseek.interop.hf import copy_tokenizer_files, load_hf_model, save_hf
    from nanoseek.interop.hf_weights import SafetensorsDir
    from nanoseek.loading import adapter_base, load_checkpoint, resolve_checkpoint
    from nanoseek.model import load_model, save_model
    from nanoseek.model.lora import merge_lora

    out = Path(args.out)
    source = Path(args.from_hf or args.to_hf)
    try:
        kind, directory = resolve_checkpoint(source)
    except FileNotFoundError as e:
        print(f"nanoseek convert: {e}")
        return 1
    if args.from_hf and kind != "hf":
        print(f"nanoseek convert: {directory} is a nanoseek checkpoint already (use --to-hf to export it)")
        return 1
    if (kind == "adapter") != bool(args.merge_lora) or (args.merge_lora and args.from_hf):
        what = "is a LoRA adapter directory: add --merge-lora" if kind == "adapter" else "holds no LoRA adapters"
        raise InputError(f"{directory} {what}" if not args.from_hf else "--merge-lora goes with --to-hf")
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    if dtype is None:
        dtype = SafetensorsDir(adapter_base(directory) if kind == "adapter" else directory).most_common_float_dtype()

    try:
        if kind == "adapter":  # the merge in float32, the merged weights written in `dtype`
            model = merge_lora(load_checkpoint(directory, device="cpu", dtype=torch.float32)[0]).to(dtype)
            directory = directory if (directory / "tokenizer.json").is_file() else adapter_base(directory)
        elif kind == "hf":
            model = load_hf_model(directory, dtype=dtype)
        else:
            model = load_model(directory, dtype=dtype)
        if args.from_hf:
            save_model(model, out)
            copied = copy_tokenizer_files(directory, out)
        else:
            save_hf(model, out, tokenizer_dir=directory, max_shard_bytes=int(args.max_shard_gb * 2**30))
            copied = [n for n in ("tokenizer.json", "tokenizer_config.json") if (out / n).is_file()]
    except (ValueError, FileNotFoundError) as e:
        print(f"nanoseek convert: {e}")
        return 1
    what = "nanoseek checkpoint" if args.from_hf else f"Hugging Face {model_arch(model)} model"
    print(
        f"wrote {what} to {out} ({model.num_params() / 1e6:.1f}M parameters, {str(dtype).removeprefix('torch.')}"
        f"{', tokenizer: ' + ', '.join(copied) if copied else ', no tokenizer'})"
    )
    return 0


def model_arch(model) -> str:
    from nanoseek.interop.hf_config import pick_architecture

    return pick_architecture(model.cfg)
