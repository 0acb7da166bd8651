"""`nanoseek chat`: talk to a checkpoint; replies stream as they are generated.

    nanoseek chat --checkpoint runs/sft
    printf 'hi\\nwhat is 2+2?\\n' | nanoseek chat --checkpoint runs/sft --temperature 0

One line = one user turn. The whole conversation goes through the tokenizer's chat template
every turn (the oldest turns are dropped when it no longer fits the context). Commands:
/help lists them, /reset forgets the conversation, /exit (or end of input) quits. Ctrl-C stops a reply.
"""

from __future__ import annotations

import argparse
import sys

from nanoseek.commands.common import add_engine_arguments, add_sampling_arguments, load_engine


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser)
    parser.add_argument("--system", default=None, help="system message")
    add_sampling_arguments(parser, max_new_tokens=512, temperature=0.7)
    parser.add_argument("--stats", action="store_true", help="print tokens, speed and finish reason after replies")


HELP = "commands: /help this list, /reset forget the conversation, /exit quit (or Ctrl-D); Ctrl-C stops a reply"


def fit_history(messages: list[dict], render, budget: int) -> list[int] | None:
    """Token ids of the conversation, dropping the oldest turns (never the system message or
    the last user turn) until it fits in `budget` tokens; None if even that does not fit."""
    while True:
        ids = render(messages)
        if len(ids) <= budget:
            return ids
        first = 1 if messages[0]["role"] == "system" else 0
        if len(messages) - first <= 1:
            return None
        del messages[first]


def run(args: argparse.Namespace) -> int:
    from nanoseek.engine import SamplingParams
    from nanoseek.errors import as_user_error

    with as_user_error():  # the checkpoint and the sampling flags, checked before the first prompt
        engine, tokenizer = load_engine(args, max_batch=1)
        params = SamplingParams.from_config(args)
        params.validate(engine.vocab_size)
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    interactive = sys.stdin.isatty()
    budget = engine.max_seq_len - min(args.max_new_tokens, engine.max_seq_len // 2)

    def render(msgs: list[dict]) -> list[int]:
        return tokenizer.encode(tokenizer.apply_chat_template(msgs, add_generation_prompt=True))

    if interactive:
        print(f"chatting with {args.checkpoint}; {HELP}", file=sys.stderr)
    while True:
        if interactive:
            print(">>> ", end="", file=sys.stderr, flush=True)
        try:
            line = sys.stdin.readline()
        except KeyboardInterrupt:
            break
        if not line:
            break
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        if line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            messages = list(system)
            continue
        if line.strip() in ("/help", "/?"):
            print(HELP, file=sys.stderr)
            continue
        messages.append({"role": "user", "content": line})
        ids = fit_history(messages, render, budget)
        if ids is None:
            print(f"error: this message alone is longer than the context ({budget} tokens)", file=sys.stderr)
            messages.pop()
            continue
        completion = None
        try:
            for delta in engine.stream(ids, params):
                sys.stdout.write(delta.text)
                sys.stdout.flush()
                completion = delta.completion or completion
        except KeyboardInterrupt:
            print(" [stopped]", file=sys.stderr)
        sys.stdout.write("\n")
        sys.stdout.flush()
        if completion is None:
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": completion.text or ""})
        if args.stats:
            print(
                f"[{len(ids)} prompt tokens, {len(completion.token_ids)} tokens, {completion.tokens_per_s:.1f} tok/s, "
                f"ttft {completion.ttft_s * 1000:.0f} ms, {completion.finish_reason}]",
                file=sys.stderr,
            )
    return 0
