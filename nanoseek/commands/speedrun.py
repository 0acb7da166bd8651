"""`nanoseek speedrun`: tokenizer, pretraining, SFT, RL and evaluation in one resumable command.

nanoseek speedrun                          # preset cpu: ~14 minutes on 2 CPU cores
nanoseek speedrun --preset gpu --out runs/gpu
nanoseek speedrun --set rl.train.steps=100 --set eval.k=8
nanoseek speedrun --preset cpu-envs        # the simulators farm, budget, inventory: SFT on heuristics, RL per env
"""

from __future__ import annotations

import argparse

from nanoseek.commands.common import add_set_argument


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="cpu", help="cpu (default), gpu, cpu-envs, or a speedrun .toml file")
    p.add_argument("--out", default="runs/speedrun", metavar="RUN_DIR", help="run directory (default: runs/speedrun)")
    add_set_argument(
        p,
        "STAGE.SECTION.FIELD=VALUE",
        "override a stage setting, e.g. --set sft.train.steps=100; eval.FIELD=VALUE: every stage's (repeatable)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from nanoseek.speedrun import load_preset, speedrun
    from nanoseek.speedrun_envs import envs_speedrun
    from nanoseek.train.distributed import topology

    simulators = "envs" in load_preset(args.preset)  # a preset with an [envs] table: the simulators' pipeline
    report = (envs_speedrun if simulators else speedrun)(args.preset, args.out, args.overrides, quiet=args.quiet)
    if topology().is_main:  # under torchrun, rank 0 wrote the report
        print(report.read_text())
    return 0
