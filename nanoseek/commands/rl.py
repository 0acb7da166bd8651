"""`nanoseek rl`: GRPO / DAPO / Dr. GRPO with verifiable rewards.

nanoseek rl --checkpoint runs/sft                          # built-in task mixture, CPU
nanoseek rl --checkpoint runs/sft --set rl.loss_agg=seq-mean --set rl.epsilon_high=0.2   # original GRPO
nanoseek rl --checkpoint runs/sft --set rl.scale_rewards=none --set rl.loss_agg=dr-grpo  # Dr. GRPO
nanoseek rl --checkpoint Qwen2.5-0.5B-Instruct/ --set rl.prompts_file=math.jsonl --set rl.rewards=math=1,format=0.1
"""

from __future__ import annotations

import argparse

from nanoseek.commands.common import add_run_arguments, run_training


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_arguments(p, "runs/rl", start="runs/sft", start_help="starting policy")


def run(args: argparse.Namespace) -> int:
    from nanoseek.train.rl import rl, rl_defaults

    return run_training(args, rl, rl_defaults())
