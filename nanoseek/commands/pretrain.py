"""`nanoseek pretrain`: train a model from scratch on text.

nanoseek pretrain                                  # tiny model, built-in task corpus, CPU
nanoseek pretrain --preset small-moe --data corpus/*.parquet --out runs/pt --set train.steps=20000
nanoseek tokenizer train --input corpus/ --out runs/tok && nanoseek pretrain --tokenizer runs/tok --data corpus/
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from nanoseek.commands.common import add_run_arguments, run_training


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_arguments(p, "runs/pretrain")
    p.add_argument(
        "--tokenizer",
        default=None,
        metavar="DIR",
        help="use this tokenizer (e.g. from `nanoseek tokenizer train`; default: train one on the data)",
    )


def run(args: argparse.Namespace) -> int:
    from nanoseek.train.stages import pretrain

    if not args.tokenizer:
        return run_training(args, pretrain)

    from nanoseek.errors import InputError
    from nanoseek.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(args.tokenizer)  # checked before anything is written

    def with_tokenizer(cfg: Any, out: str, **options: Any) -> dict:
        # pretraining reuses RUN_DIR/tokenizer when it is there (as on --resume)
        own = Path(out) / "tokenizer" / "tokenizer.json"
        if own.is_file():
            if own.read_text(encoding="utf-8") != tokenizer.backend.to_str(pretty=True):
                raise InputError(f"--tokenizer {args.tokenizer}: {own.parent} holds a different tokenizer")
        else:
            tokenizer.save(own.parent)
        return pretrain(cfg, out, **options)

    return run_training(args, with_tokenizer)
