"""Helpers shared by the commands: --set, the training commands' arguments and run, loading a model
into the engine and the sampling flags (generate, chat, serve, eval), prompt files, task difficulty."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from typing import Any

DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_set_argument(p: argparse.ArgumentParser, metavar: str, help: str) -> None:
    """--set PATH=VALUE (repeatable) into args.overrides: the one override syntax (`config_toml.split_override`)."""
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar=metavar, help=help)


# ----------------------------------------------------------------------------- pretrain, sft, rl
def add_run_arguments(
    p: argparse.ArgumentParser, default_out: str, start: str | None = None, start_help: str = ""
) -> None:
    """The training commands' arguments; `start`: the default --checkpoint to start from (sft, rl)."""
    if start is not None:
        p.add_argument(
            "--checkpoint",
            default=start,
            help=f"{start_help}: checkpoint, run or Hugging Face directory (default: {start})",
        )
    p.add_argument(
        "--data", nargs="+", default=None, metavar="FILE", help="training files (default: the built-in task corpus)"
    )
    p.add_argument("--preset", default=None, help="model preset (tiny, tiny-moe, small, small-moe, moe-1b)")
    p.add_argument("--config", default=None, metavar="FILE.toml", help="a TOML run config")
    add_set_argument(p, "SECTION.FIELD=VALUE", "override one setting, e.g. --set train.lr=3e-4 (repeatable)")
    p.add_argument("--out", default=default_out, metavar="RUN_DIR", help=f"run directory (default: {default_out})")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's latest checkpoint")
    p.add_argument(
        "--stop-at",
        type=int,
        default=None,
        metavar="STEP",
        help="stop with a checkpoint at this step (the schedule still spans train.steps); --resume continues",
    )
    p.add_argument("--device", default=None, help="auto | cpu | cuda (default: train.device)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run_config_from_args(args: argparse.Namespace, base: Any = None):
    """The run's settings from the command line, checked (RunConfig.check): a bad one is a UserError naming it."""
    from nanoseek.config_toml import load_run_config

    cfg = load_run_config(base, args.config, args.overrides)
    if args.preset:
        cfg.preset = args.preset
    if args.data:
        cfg.data.files = list(args.data)
    if args.device:
        cfg.train.device = args.device
    cfg.check()
    return cfg


def check_run_inputs(args: argparse.Namespace, cfg: Any) -> None:
    """Everything the run reads from disk is there, before its run directory is made."""
    from pathlib import Path

    from nanoseek.errors import missing
    from nanoseek.loading import pick_device, resolve_checkpoint

    for file in cfg.data.files:
        if not Path(file).exists():
            raise missing(file, "no such file or directory (--data)")
    if "checkpoint" in args:
        resolve_checkpoint(args.checkpoint)
    pick_device(cfg.train.device)


def run_training(args: argparse.Namespace, stage: Callable[..., dict], base: Any = None) -> int:
    """Run a training stage (pretrain, sft, rl) from its command line; print its summary (once under torchrun).

    Settings and inputs are checked first; a run that fails before its first checkpoint removes the run
    directory it made (it holds nothing worth keeping: a failed start leaves nothing)."""
    import shutil
    from pathlib import Path

    from nanoseek.train.distributed import topology

    cfg = run_config_from_args(args, base)
    check_run_inputs(args, cfg)
    start = [args.checkpoint] if "checkpoint" in args else []
    out = Path(args.out)
    made = not out.exists()
    try:
        summary = stage(cfg, args.out, *start, resume=args.resume, quiet=args.quiet, stop_at=args.stop_at)
    except Exception:
        if made and out.is_dir() and not (out / "checkpoints").exists() and topology().is_main:
            shutil.rmtree(out, ignore_errors=True)
        raise
    if topology().is_main:
        print(json.dumps(summary))
    return 0


# ----------------------------------------------------------------------------- generate, chat, serve, eval
def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """Loading and engine options."""
    parser.add_argument("--checkpoint", required=True, help="checkpoint, run or Hugging Face model directory")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: the checkpoint's tokenizer.json)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPES,
        help="auto: bfloat16 on CUDA; on a CPU, bfloat16 where it has native bf16 and the float32 weights outgrow "
        "its cache, else float32 (nanoseek.precision.inference_dtype)",
    )
    parser.add_argument("--max-seq-len", type=int, default=None, help="context per sequence (default: the model's)")
    parser.add_argument("--kv-cache-gb", type=float, default=None, help="KV cache budget (default: automatic)")
    parser.add_argument("--no-cuda-graphs", action="store_true", help="decode eagerly on CUDA")


def add_sampling_arguments(parser: argparse.ArgumentParser, max_new_tokens: int, temperature: float) -> None:
    """The flags SamplingParams.from_config(args) reads (named like its fields)."""
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help="longest completion in tokens")
    parser.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    parser.add_argument("--min-p", type=float, default=0.0, help="0 = off")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (default: a new draw each run)")
    parser.add_argument("--stop", action="append", default=[], metavar="STRING", help="stop string (repeatable)")
    parser.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-sequence tokens")


def load_model(args: argparse.Namespace):
    """(model, tokenizer) from the engine options. `--dtype auto` on a CPU decodes in the dtype
    `precision.inference_dtype` picks for the model's size (`loading.load_for_inference`); one line on stderr says
    so when that is bf16 rather than the float32 a CPU otherwise loads."""
    import sys

    import torch

    from nanoseek.loading import load_for_inference

    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    model, tokenizer, line = load_for_inference(args.checkpoint, args.device, dtype)
    if line:
        print(line, file=sys.stderr, flush=True)
    if args.tokenizer:
        from nanoseek.tokenizer import Tokenizer

        tokenizer = Tokenizer.load(args.tokenizer)
    if tokenizer is None:
        from nanoseek.errors import InputError

        raise InputError(f"{args.checkpoint}: no tokenizer.json; pass --tokenizer DIR")
    return model, tokenizer


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """The Engine's keyword arguments from the engine options."""
    return dict(max_seq_len=args.max_seq_len, kv_cache_gb=args.kv_cache_gb, use_cuda_graphs=not args.no_cuda_graphs)


def load_engine(args: argparse.Namespace, max_batch: int):
    """(engine, tokenizer) from the engine options."""
    from nanoseek.engine import Engine

    model, tokenizer = load_model(args)
    return Engine(model, tokenizer, max_batch=max_batch, **engine_options(args)), tokenizer


def read_prompts(path: str) -> list[dict[str, Any]]:
    """Records {"prompt": str} or {"messages": list}, plus the line's other fields."""
    from nanoseek.data.errors import BadInputError
    from nanoseek.data.jsonl import read_jsonl
    from nanoseek.errors import InputError

    records = []
    for lineno, value in read_jsonl(path):
        if isinstance(value, str):
            value = {"prompt": value}
        if not isinstance(value, dict):
            raise BadInputError(path, lineno, "expected a string or an object with 'prompt' or 'messages'")
        if not (isinstance(value.get("prompt"), str) or isinstance(value.get("messages"), list)):
            raise BadInputError(path, lineno, "expected a 'prompt' string or a 'messages' list")
        records.append(value)
    if not records:
        raise InputError(f"{path}: no prompts (empty file; expected one JSON prompt per line)")
    return records


# ----------------------------------------------------------------------------- data, eval
def parse_difficulty(items: Sequence[str], tasks: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """{task: {knob: value}} from --set TASK.KNOB=VALUE or KNOB=VALUE (every one of `tasks`, default all,
    that has the knob), each value read as the type of the knob's default."""
    from nanoseek.config_toml import split_override
    from nanoseek.tasks import get_task, list_tasks
    from nanoseek.tasks.base import coerce_knobs

    names = list(tasks or list_tasks())
    raw: dict[str, dict[str, str]] = {}
    for item in items:
        path, value = split_override(item, "TASK.KNOB=VALUE or KNOB=VALUE")
        if len(path) > 2:
            raise ValueError(f"--set {item!r}: expected TASK.KNOB=VALUE or KNOB=VALUE")
        *task, knob = path
        if task:
            targets = [get_task(task[0]).name]
            if targets[0] not in names:
                raise ValueError(f"--set {item!r}: {targets[0]} is not among the tasks ({', '.join(names)})")
        else:
            targets = [t for t in names if knob in get_task(t).defaults]
            if not targets:
                raise ValueError(f"--set {item!r}: no difficulty knob {knob!r} in {', '.join(names)}")
        for t in targets:
            raw.setdefault(t, {})[knob] = value
    return {t: coerce_knobs(get_task(t), knobs) for t, knobs in raw.items()}
