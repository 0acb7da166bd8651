"""`nanoseek sft`: supervised fine-tuning on conversations (loss on assistant tokens only).

nanoseek sft --checkpoint runs/pretrain            # built-in task conversations
nanoseek sft --checkpoint Qwen2.5-0.5B/ --data chats.jsonl --out runs/sft
"""

from __future__ import annotations

import argparse

from nanoseek.commands.common import add_run_arguments, run_config_from_args


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint",
        default="runs/pretrain",
        help="starting model: checkpoint, run or Hugging Face directory (default: runs/pretrain)",
    )
    add_run_arguments(p, "runs/sft")


def run(args: argparse.Namespace) -> int:
    import json

    from nanoseek.train.distributed import topology
    from nanoseek.train.stages import sft, sft_defaults

    cfg = run_config_from_args(args, sft_defaults())
    summary = sft(cfg, args.out, args.checkpoint, resume=args.resume, quiet=args.quiet, stop_at=args.stop_at)
    if topology().is_main:  # under torchrun, one summary
        print(json.dumps(summary))
    return 0
