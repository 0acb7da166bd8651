"""`nanoseek data make|list`: write verifiable-task examples or environment transcripts as JSONL, or list the tasks
and their knobs."""

from __future__ import annotations

import argparse

from nanoseek.commands.common import add_set_argument, parse_difficulty


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    make = sub.add_parser(
        "make", help="examples of a task (or 'all': an equal mixture), or an environment's transcripts, as JSONL"
    )
    source = make.add_mutually_exclusive_group(required=True)
    source.add_argument("--task", help="task name (see `nanoseek data list`), or 'all'")
    source.add_argument(
        "--env", help="environment (see `nanoseek env list`): SFT transcripts of its --policy, seeds SEED, SEED+1, ..."
    )
    make.add_argument("--n", type=int, required=True, help="number of examples (episodes with --env)")
    make.add_argument("--split", choices=("train", "test"), default="train", help="side of the split by problem")
    make.add_argument("--seed", type=int, default=0, help="generator seed (with --env: the first episode's seed)")
    make.add_argument("--policy", default="expert", help="with --env: the policy that plays the episodes")
    add_set_argument(
        make, "KNOB=VALUE", "difficulty, e.g. digits=3 (repeatable; TASK.KNOB=VALUE for one task); with --env its knobs"
    )
    make.add_argument("--unique", action="store_true", help="no problem twice (single task only)")
    make.add_argument("--out", required=True, help="output .jsonl file")
    sub.add_parser("list", help="list the registered tasks and their difficulty knobs")


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from nanoseek.tasks import get_task, list_tasks

    if args.action == "list":
        for name in list_tasks():
            task = get_task(name)
            knobs = " ".join(f"{k}={v}" for k, v in task.defaults.items())
            print(f"{name:16s} {task.description}\n{'':16s} knobs: {knobs}")
        return 0

    if args.env:
        return _make_env_transcripts(args)
    try:
        if args.task == "all":
            from nanoseek.tasks.corpus import task_mixture

            if args.unique:
                raise ValueError("--unique works with a single --task")
            difficulty = parse_difficulty(args.overrides)
            examples = task_mixture(args.n, split=args.split, seed=args.seed, difficulty=difficulty)
        else:
            task = get_task(args.task)
            knobs = parse_difficulty(args.overrides, [task.name]).get(task.name, {})
            examples = task.generate(args.n, split=args.split, seed=args.seed, unique=args.unique, **knobs)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for ex in examples:
            row = {
                "task": ex.task,
                "prompt": ex.prompt,
                "answer": ex.answer,
                "solution": ex.solution,
                "messages": ex.messages(),
                "meta": ex.meta,
            }
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(examples)} {args.split} examples of {args.task} to {out}")
    return 0


def _make_env_transcripts(args: argparse.Namespace) -> int:
    """`data make --env`: episodes of the environment's scripted policy, as the SFT stage's conversation rows
    (messages with the tool calls and tool results, and the tool schemas), plus where each came from."""
    import json
    from pathlib import Path

    from nanoseek.commands.env import parse_knobs
    from nanoseek.envs import make
    from nanoseek.envs.baselines import play_policy, summarize
    from nanoseek.errors import InputError

    if args.n < 1:
        raise InputError(f"--n must be at least 1, got {args.n}")
    env = make(args.env, **parse_knobs(args.overrides))
    env.check_policy(args.policy)
    transcripts = [play_policy(env, args.policy, args.seed + i) for i in range(args.n)]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for t in transcripts:
            row = {**t.sft_record(), "env": args.env, "seed": t.seed, "policy": t.policy, "score": t.score}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    s = summarize(transcripts)
    print(
        f"wrote {len(transcripts)} {args.policy} transcripts of {args.env} to {out} "
        f"(success {100 * s['success']:.1f}%, turns {s['turns']:.2f})"
    )
    return 0
