"""The `nanoseek` command: one subcommand per stage.

    nanoseek --help
    nanoseek pretrain            # tiny model on the built-in task corpus, CPU
    nanoseek speedrun            # the whole pipeline on the embedded default

Each subcommand lives in `nanoseek/commands/<name>.py` and exposes
`add_arguments(parser)` and `run(args) -> int`; they are imported only when used,
so `nanoseek --help` stays fast.

An expected failure (`nanoseek.errors.UserError`: bad input, a missing file, a bad setting, a corrupt
checkpoint) prints one line, `error: <what>: <why>`, and exits 2; `--debug` (or NANOSEEK_DEBUG=1)
shows its traceback too. Any other exception is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import traceback


def others_busy_cores(seconds: float = 0.1) -> float | None:
    """How many cores other processes kept busy over `seconds` (this process sleeps meanwhile), from /proc/stat;
    None where that cannot be read (not Linux)."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        return sum(ticks), ticks[3] + ticks[4]

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return (os.cpu_count() or 1) * (1 - (idle1 - idle0) / (total1 - total0))


def wait_policy(busy_cores: float | None) -> str | None:
    """OMP_WAIT_POLICY for a run that starts beside `busy_cores` of other work: PASSIVE from half a core, else
    None (OpenMP's default: threads spin a while before they sleep).

    Spinning threads stall every parallel region when another process holds one of the cores: the demo's RL
    step beside one busy process took 4.0 s with the default and 2.4 s passive (two-thread pretraining beside
    three, 2.2-5x); on a quiet machine passive waiting made the same step 1.5x slower (2.1-2.5 s against
    1.4-1.5: a sleeping thread is woken for each of the step's thousands of small operations). docs/LOG.md,
    2026-12-02."""
    return "PASSIVE" if busy_cores is not None and busy_cores >= 0.5 else None


# Read once when the OpenMP runtime loads, i.e. before torch is imported, so decided once, from the load at the
# start; a user's value stands.
if "OMP_WAIT_POLICY" not in os.environ and (policy := wait_policy(others_busy_cores())):
    os.environ["OMP_WAIT_POLICY"] = policy

# name -> (module, one-line help). Order is the order of the pipeline.
COMMANDS: dict[str, tuple[str, str]] = {
    "tokenizer": ("nanoseek.commands.tokenizer", "train or inspect a byte-level BPE tokenizer"),
    "data": ("nanoseek.commands.data", "generate verifiable-task datasets (JSONL)"),
    "env": ("nanoseek.commands.env", "environments: list them, run their scripted baselines, play one yourself"),
    "pretrain": (
        "nanoseek.commands.pretrain",
        "pretrain a model on text (default: the built-in task corpus)",
    ),
    "sft": ("nanoseek.commands.sft", "supervised fine-tuning on conversations"),
    "rl": ("nanoseek.commands.rl", "GRPO / DAPO / Dr. GRPO with verifiable rewards"),
    "generate": ("nanoseek.commands.generate", "batched generation from a checkpoint"),
    "chat": ("nanoseek.commands.chat", "interactive chat with a checkpoint"),
    "serve": ("nanoseek.commands.serve", "OpenAI-compatible HTTP server (continuous batching across clients)"),
    "eval": ("nanoseek.commands.eval", "accuracy (pass@k, cons@k) and speed on a benchmark"),
    "convert": ("nanoseek.commands.convert", "convert to and from Hugging Face checkpoints"),
    "speedrun": ("nanoseek.commands.speedrun", "the whole pipeline: tokenizer, pretrain, SFT, RL, eval"),
    "model": ("nanoseek.commands.model", "show a preset's size, FLOPs per token and KV bytes"),
    "checkpoint": ("nanoseek.commands.checkpoint", "consolidate a sharded (FSDP) checkpoint into the ordinary one"),
    "study": ("nanoseek.commands.study", "the recipe's claims measured: moe-vs-dense, rl-ablation, r1-zero"),
}
DEBUG_HELP = "show the traceback of an error (also: NANOSEEK_DEBUG=1)"


def _available() -> dict[str, tuple[str, str]]:
    """Subcommands whose module exists in this checkout."""
    return {name: spec for name, spec in COMMANDS.items() if importlib.util.find_spec(spec[0]) is not None}


class _HelpWithDefaults(argparse.HelpFormatter):
    """Every option's help ends with its default, unless the help already says it or there is none to say."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        nothing = action.default is None or action.default is False or action.default == []  # (0 is a default)
        if "default" in text or not action.option_strings or nothing or action.default == argparse.SUPPRESS:
            return text
        return f"{text} (default: %(default)s)".strip()


class _Parser(argparse.ArgumentParser):
    """The parser of `nanoseek` and (inherited by add_subparsers) of every subcommand."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _HelpWithDefaults)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="nanoseek", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"nanoseek {_version()}")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in _available().items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
        importlib.import_module(module).add_arguments(p)
    return parser


def _version() -> str:
    from nanoseek import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from nanoseek.errors import UserError
    from nanoseek.host import keep_freed_memory

    keep_freed_memory()  # a step's freed tensors stay in the process for the next step (nanoseek/host.py)
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except UserError as e:
        if args.debug or os.environ.get("NANOSEEK_DEBUG", "") not in ("", "0"):
            traceback.print_exc()
        print("error: " + " ".join(str(e).split()), file=sys.stderr)  # one line, whatever the message
        return 2
    finally:
        _leave_process_group()


def _leave_process_group() -> None:
    """Under torchrun, leave the process group on the way out (torch warns about one left behind)."""
    if "torch" in sys.modules:
        from nanoseek.train import distributed

        distributed.leave()


if __name__ == "__main__":
    sys.exit(main())
