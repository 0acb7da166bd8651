"""`nanoseek env list|baseline|play`: the environments, their scripted baselines, and playing one yourself.

nanoseek env list
nanoseek env baseline guess_number --policy expert --n-episodes 200 --set n=1000
nanoseek env play calculator_arithmetic --seed 3
"""

from __future__ import annotations

import argparse

from nanoseek.commands.common import add_set_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    sub.add_parser("list", help="the environments, their knobs (with defaults), tools and policies")

    base = sub.add_parser("baseline", help="run an environment's scripted policy (no model) and report its score")
    base.add_argument("name", metavar="NAME", help="environment: NAME or NAME:ARG (see `nanoseek env list`)")
    add_set_argument(base, "KNOB=VALUE", "an environment knob, e.g. n=1000 (repeatable)")
    base.add_argument("--policy", default="expert", help="the environment's policy (random, expert, ...)")
    base.add_argument("--n-episodes", type=int, default=100, help="episodes, from seeds SEED, SEED+1, ...")
    base.add_argument("--seed", type=int, default=0, help="the first episode's seed")
    base.add_argument("--transcripts", metavar="FILE.jsonl", help="write every episode's transcript here")

    play = sub.add_parser("play", help="play an episode yourself: type the assistant turns, see what the model sees")
    play.add_argument("name", metavar="NAME", help="environment: NAME or NAME:ARG")
    add_set_argument(play, "KNOB=VALUE", "an environment knob (repeatable)")
    play.add_argument("--seed", type=int, default=0, help="the episode's seed")


def parse_knobs(items: list[str]) -> dict[str, str]:
    """--set KNOB=VALUE items as {knob: text}; the environment reads each as its knob's type."""
    from nanoseek.config_toml import split_override
    from nanoseek.errors import InputError

    knobs: dict[str, str] = {}
    for item in items:
        path, value = split_override(item, "KNOB=VALUE")
        if len(path) != 1:
            raise InputError(f"--set {item!r}: expected KNOB=VALUE (an environment knob)")
        knobs[path[0]] = value
    return knobs


def run(args: argparse.Namespace) -> int:
    if args.action == "list":
        return _list()
    if args.action == "baseline":
        return _baseline(args)
    return _play(args)


def _list() -> int:
    from nanoseek.envs import describe

    for env in describe():
        knobs = " ".join(f"{k}={_show(v)}" for k, v in env["knobs"].items())
        print(f"{env['name']:24s} {env['description']}")
        print(f"{'':24s} knobs: {knobs}")
        print(f"{'':24s} policies: {', '.join(env['policies'])}; tools: {', '.join(env['tools']) or 'none'}")
        if env["args"]:
            more = f", ... ({len(env['args'])} in all)" if len(env["args"]) > 12 else ""
            shown = ", ".join(env["args"][:12]) + more
            print(f"{'':24s} ARG: {shown}")
    return 0


def _show(value: object) -> str:
    """A knob's default as --set would take it: true/false, a,b,c."""
    if isinstance(value, bool):
        return str(value).lower()
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _baseline(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from nanoseek.envs import make
    from nanoseek.envs.baselines import play_policy, summarize
    from nanoseek.errors import InputError

    if args.n_episodes < 1:
        raise InputError(f"--n-episodes must be at least 1, got {args.n_episodes}")
    env = make(args.name, **parse_knobs(args.overrides))
    env.check_policy(args.policy)
    transcripts = [play_policy(env, args.policy, args.seed + i) for i in range(args.n_episodes)]
    if args.transcripts:
        out = Path(args.transcripts)
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w", encoding="utf-8") as f:
            for t in transcripts:
                f.write(json.dumps(t.to_dict(), ensure_ascii=False) + "\n")
    s = summarize(transcripts)
    print(
        f"{args.name} policy={args.policy} episodes={s['episodes']}: score {s['score']:.3f} ± {s['score_se']:.3f}, "
        f"success {100 * s['success']:.1f}%, turns {s['turns']:.2f}, "
        f"tool calls {s['tool_calls']:.2f}/episode, tool errors {s['tool_errors']:.2f}/episode"
    )
    print(json.dumps({"env": args.name, "policy": args.policy, "knobs": env.knobs, **s}))
    return 0


def _play(args: argparse.Namespace) -> int:
    from nanoseek.envs import make
    from nanoseek.envs.baselines import play_policy
    from nanoseek.tokenizer import CHATML_TEMPLATE, render_chat

    knobs = parse_knobs(args.overrides)
    env = make(args.name, **knobs)
    messages = env.reset(args.seed)
    print(f"# {args.name}, seed {args.seed}: type each assistant turn on one line (\\n for a new line); Ctrl-D ends.")
    print(render_chat(CHATML_TEMPLATE, messages, env.tools, add_generation_prompt=True), end="")
    done = False
    while not done:
        try:
            text = input().replace("\\n", "\n")
        except EOFError:
            print()
            break
        result = env.step(text)
        done = result.done
        turn = [{"role": "assistant", "content": text}]
        # what the model would read next: its turn closed, the environment's reply, its next turn opened
        print(render_chat(CHATML_TEMPLATE, turn)[len("<|im_start|>assistant\n") + len(text) :], end="")
        if not done:
            print(render_chat(CHATML_TEMPLATE, result.messages, add_generation_prompt=True), end="")
        messages += turn + result.messages
    print(f"\nyour score: {env.score():.3f} (success: {env.success()}, turns: {env.turns})")
    for policy in env.policies:
        theirs = play_policy(make(args.name, **knobs), policy, args.seed)
        print(f"{policy:>10s}: {theirs.score:.3f} (success: {theirs.success}, turns: {theirs.turns})")
    return 0
