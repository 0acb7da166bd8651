"""`nanoseek checkpoint`: work on a run's checkpoints.

    nanoseek checkpoint consolidate runs/pt --out runs/pt-whole              # the latest checkpoint of a run
    nanoseek checkpoint consolidate runs/pt/checkpoints/step_400 --out DIR   # or one checkpoint

A run under FSDP (`train.parallel = fsdp`) saves sharded checkpoints (`torch.distributed.checkpoint`);
`consolidate` turns one into the single-file checkpoint (config.json, model.safetensors, tokenizer)
that every other command reads with `--checkpoint`. It runs in one process on the host.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    c = sub.add_parser("consolidate", help="a sharded checkpoint as the ordinary single-file one")
    c.add_argument("run", metavar="RUN", help="a run directory (its latest checkpoint) or a checkpoint directory")
    c.add_argument("--out", required=True, metavar="DIR", help="where to write the single-file checkpoint")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from nanoseek.errors import missing
    from nanoseek.loading import latest_checkpoint
    from nanoseek.train.checkpoint import consolidate, is_sharded_checkpoint

    ckpt = Path(args.run)
    if not ckpt.is_dir():
        raise missing(ckpt, "no such run or checkpoint directory")
    if not is_sharded_checkpoint(ckpt):
        ckpt = latest_checkpoint(ckpt) or ckpt  # a run directory: its latest checkpoint
    out = consolidate(ckpt, Path(args.out))
    print(f"{ckpt} -> {out}")
    return 0
