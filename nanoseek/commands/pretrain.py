"""`nanoseek pretrain`: train a model from scratch on text.

nanoseek pretrain                                  # tiny model, built-in task corpus, CPU
nanoseek pretrain --preset small-moe --data corpus/*.parquet --out runs/pt --set train.steps=20000
"""

from __future__ import annotations

import argparse

from nanoseek.commands.common import add_run_arguments, run_config_from_args


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_arguments(p, "runs/pretrain")


def run(args: argparse.Namespace) -> int:
    import json

    from nanoseek.train.distributed import topology
    from nanoseek.train.stages import pretrain

    cfg = run_config_from_args(args)
    summary = pretrain(cfg, args.out, resume=args.resume, quiet=args.quiet, stop_at=args.stop_at)
    if topology().is_main:  # under torchrun, one summary
        print(json.dumps(summary))
    return 0
