"""`nanoseek pretrain`: train a model from scratch on text.

nanoseek pretrain                                  # tiny model, built-in task corpus, CPU
nanoseek pretrain --preset small-moe --data corpus/*.parquet --out runs/pt --set train.steps=20000
"""

from __future__ import annotations

import argparse

from nanoseek.commands.common import add_run_arguments, run_training


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_arguments(p, "runs/pretrain")


def run(args: argparse.Namespace) -> int:
    from nanoseek.train.stages import pretrain

    return run_training(args, pretrain)
