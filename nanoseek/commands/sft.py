"""`nanoseek sft`: supervised fine-tuning on conversations (loss on assistant tokens only).

nanoseek sft --checkpoint runs/pretrain            # built-in task conversations
nanoseek sft --checkpoint Qwen2.5-0.5B/ --data chats.jsonl --out runs/sft
"""

from __future__ import annotations

import argparse

from nanoseek.commands.common import add_run_arguments, run_training


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_arguments(p, "runs/sft", start="runs/pretrain", start_help="starting model")


def run(args: argparse.Namespace) -> int:
    from nanoseek.train.stages import sft, sft_defaults

    return run_training(args, sft, sft_defaults())
