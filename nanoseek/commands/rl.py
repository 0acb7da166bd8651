"""`nanoseek rl`: GRPO / DAPO / Dr. GRPO with verifiable rewards.

nanoseek rl --checkpoint runs/sft                          # built-in task mixture, CPU
nanoseek rl --checkpoint runs/sft --set rl.loss_agg=seq-mean --set rl.epsilon_high=0.2   # original GRPO
nanoseek rl --checkpoint runs/sft --set rl.scale_rewards=none --set rl.loss_agg=dr-grpo  # Dr. GRPO
nanoseek rl --checkpoint Qwen2.5-0.5B-Instruct/ --set rl.prompts_file=math.jsonl --set rl.rewards=math=1,format=0.1
"""

from __future__ import annotations

import argparse

from nanoseek.commands.common import add_run_arguments, run_config_from_args


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint",
        default="runs/sft",
        help="starting policy: checkpoint, run or Hugging Face directory (default: runs/sft)",
    )
    add_run_arguments(p, "runs/rl")


def run(args: argparse.Namespace) -> int:
    import json

    from nanoseek.train.distributed import topology
    from nanoseek.train.rl import rl, rl_defaults

    cfg = run_config_from_args(args, rl_defaults())
    summary = rl(cfg, args.out, args.checkpoint, resume=args.resume, quiet=args.quiet, stop_at=args.stop_at)
    if topology().is_main:  # under torchrun, one summary
        print(json.dumps(summary))
    return 0
