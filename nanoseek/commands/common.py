"""Arguments shared by the training commands (pretrain, sft, rl)."""

from __future__ import annotations

import argparse
from typing import Any


def add_run_arguments(p: argparse.ArgumentParser, default_out: str) -> None:
    p.add_argument(
        "--data", nargs="+", default=None, metavar="FILE", help="training files (default: the built-in task corpus)"
    )
    p.add_argument("--preset", default=None, help="model preset (tiny, tiny-moe, small, small-moe, moe-1b)")
    p.add_argument("--config", default=None, metavar="FILE.toml", help="a TOML run config")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override one setting, e.g. --set train.lr=3e-4 (repeatable)",
    )
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
    from nanoseek.config import load_run_config

    cfg = load_run_config(base, args.config, args.overrides)
    if args.preset:
        cfg.preset = args.preset
        cfg.model_config()
    if args.data:
        cfg.data.files = list(args.data)
    if args.device:
        cfg.train.device = args.device
    return cfg
