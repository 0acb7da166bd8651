"""`nanoseek study NAME`: one of the recipe's claims measured as a resumable study (docs/STUDIES.md).

nanoseek study moe-vs-dense                        # MoE vs dense at equal compute (tiny scale, CPU)
nanoseek study rl-ablation --base runs/speedrun    # GRPO, Dr. GRPO, DAPO, REINFORCE from the speedrun's SFT model
nanoseek study r1-zero                             # RL from the pretrained model vs from SFT
nanoseek study moe-vs-dense --quick --out /tmp/s   # every step of the study at toy sizes, in seconds
"""

from __future__ import annotations

import argparse

from nanoseek.studies import STUDIES


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", choices=list(STUDIES), help="the study")
    p.add_argument(
        "--out", default=None, metavar="DIR", help="study directory (default: runs/studies/NAME[-STEPSsteps])"
    )
    p.add_argument("--quick", action="store_true", help="toy sizes: every step of the study in seconds (the tests')")
    p.add_argument(
        "--base",
        default=None,
        metavar="DIR",
        help="rl-ablation, r1-zero: a directory with pretrain/ and sft/ runs, e.g. a speedrun's "
        "(default: train them in OUT/base as the cpu speedrun does)",
    )
    p.add_argument("--steps", type=int, default=None, help="moe-vs-dense: steps per run (default: the scale's, 150)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    import importlib
    from pathlib import Path

    from nanoseek.errors import InputError, missing

    study = importlib.import_module(STUDIES[args.name])
    options = {}
    if args.base is not None:
        if args.name == "moe-vs-dense":
            raise InputError("--base: moe-vs-dense trains its models from scratch (only the RL studies take a base)")
        for stage in ("sft",) if args.name == "rl-ablation" else ("pretrain", "sft"):
            if not (Path(args.base) / stage).is_dir():
                raise missing(Path(args.base) / stage, "no such run directory (--base)")
        options["base"] = args.base
    if args.steps is not None:
        if args.name != "moe-vs-dense":
            raise InputError("--steps: only moe-vs-dense takes it (the RL studies' budget is their scale's)")
        if args.steps < 1:
            raise InputError(f"--steps {args.steps}: must be >= 1")
        options["steps"] = args.steps
    out = args.out or f"runs/studies/{args.name}" + (f"-{args.steps}steps" if args.steps else "")
    table = study.run_study(out, quick=args.quick, quiet=args.quiet, **options)
    print(table.read_text())
    return 0
