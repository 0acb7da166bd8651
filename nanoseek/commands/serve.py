"""`nanoseek serve`: the OpenAI API and a web chat over the engine (continuous batching across clients).

nanoseek serve --checkpoint runs/rl                       # chat at http://127.0.0.1:8000/, API under /v1
nanoseek serve --checkpoint ~/models/Qwen2.5-0.5B-Instruct --host 0.0.0.0 --port 8080 --max-batch 128 \\
    --api-key "$(openssl rand -hex 16)"                   # or NANOSEEK_API_KEY=...; clients send Bearer <key>
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nanoseek.commands.common import add_engine_arguments, load_engine


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from nanoseek.serve.limits import API_KEY_ENV, Limits

    d = Limits()
    add_engine_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 picks a free one)")
    parser.add_argument("--max-batch", type=int, default=64, help="sequences decoded at once, over all clients")
    parser.add_argument(
        "--max-tokens", type=int, default=d.default_max_tokens, help="max_tokens of a request that gives none"
    )
    parser.add_argument("--model-name", default=None, help="the model id clients see (default: the directory name)")
    parser.add_argument("--api-key", default=None, help=f"require Authorization: Bearer KEY on /v1 (or ${API_KEY_ENV})")
    parser.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="allow browser calls from ORIGIN (repeatable; default: none)",
    )
    parser.add_argument(
        "--stream-interval",
        type=int,
        default=1,
        help="decode steps between a stream's events (default 1: every token at once; more: several tokens an "
        "event, more throughput under many clients)",
    )
    limits = parser.add_argument_group("limits")
    limits.add_argument(
        "--max-body-mb", type=float, default=d.max_body_bytes / 2**20, help="largest request body (413 above)"
    )
    limits.add_argument("--max-tokens-cap", type=int, default=d.max_tokens, help="largest max_tokens a request may ask")
    limits.add_argument("--max-n", type=int, default=d.max_n, help="largest n a request may ask")
    limits.add_argument("--max-prompt-tokens", type=int, default=None, help="longest prompt (default: the context)")
    limits.add_argument("--max-queue", type=int, default=d.max_queue, help="requests waiting for a slot before 503")
    limits.add_argument(
        "--request-timeout", type=float, default=d.request_timeout_s, help="seconds one request may take"
    )
    limits.add_argument("--shutdown-timeout", type=float, default=30.0, help="seconds in-flight answers get on SIGTERM")
    parser.add_argument("--verbose", action="store_true", help="log every HTTP request")


def run(args: argparse.Namespace) -> int:
    from nanoseek.errors import UserError
    from nanoseek.serve import Limits, Server
    from nanoseek.serve.limits import api_key_from

    names = ("max_body_mb", "max_tokens_cap", "max_n", "max_queue", "request_timeout", "shutdown_timeout")
    for name in (*names, "stream_interval"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} = {getattr(args, name)}: must be > 0")
    limits = Limits(
        max_body_bytes=int(args.max_body_mb * 2**20),
        max_tokens=args.max_tokens_cap,
        default_max_tokens=args.max_tokens,
        max_n=args.max_n,
        max_prompt_tokens=args.max_prompt_tokens,
        max_queue=args.max_queue,
        request_timeout_s=args.request_timeout,
    )
    engine, tokenizer = load_engine(args, args.max_batch)
    name = args.model_name or Path(args.checkpoint).resolve().name
    api_key = api_key_from(args.api_key)
    server = Server(
        engine,
        tokenizer,
        (args.host, args.port),
        model_name=name,
        limits=limits,
        api_key=api_key,
        cors_origins=tuple(args.cors_origin),
        shutdown_timeout_s=args.shutdown_timeout,
        stream_interval=args.stream_interval,
        verbose=args.verbose,
    )
    print(
        f"serving {name} on {server.url}/ (chat) and {server.url}/v1 (API){' with an API key' if api_key else ''}"
        f" ({engine.n_slots} KV slots, device {engine.device})",
        file=sys.stderr,
    )
    try:
        server.serve_forever()  # returns on SIGTERM / Ctrl-C after the in-flight answers
    finally:
        server.server_close()
    return 0
