"""`nanoseek serve`: an OpenAI-compatible HTTP server over the engine (continuous batching across clients).

nanoseek serve --checkpoint runs/rl                       # http://127.0.0.1:8000/v1/chat/completions
nanoseek serve --checkpoint ~/models/Qwen2.5-0.5B-Instruct --host 0.0.0.0 --port 8080 --max-batch 128
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nanoseek.commands.common import add_engine_arguments, load_engine


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 picks a free one)")
    parser.add_argument("--max-batch", type=int, default=64, help="sequences decoded at once, over all clients")
    parser.add_argument("--max-tokens", type=int, default=256, help="max_tokens of a request that gives none")
    parser.add_argument("--model-name", default=None, help="the model id clients see (default: the directory name)")
    parser.add_argument("--verbose", action="store_true", help="log every HTTP request")


def run(args: argparse.Namespace) -> int:
    from nanoseek.engine.server import Server

    engine, tokenizer = load_engine(args, args.max_batch)
    name = args.model_name or Path(args.checkpoint).resolve().name
    server = Server(
        engine,
        tokenizer,
        (args.host, args.port),
        model_name=name,
        default_max_tokens=args.max_tokens,
        verbose=args.verbose,
    )
    host, port = server.server_address[:2]
    print(
        f"serving {name} on http://{host}:{port}/v1 ({engine.n_slots} KV slots, device {engine.device})",
        file=sys.stderr,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
