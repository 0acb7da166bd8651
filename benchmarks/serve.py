"""Serving under load: `nanoseek serve` over HTTP with C concurrent streaming clients vs the engine alone,
and (with --before REF) against the server as it was at a git revision, interleaved in one run.

    python benchmarks/serve.py                                   # preset small, 1/8/32/128 clients
    python benchmarks/serve.py --device cpu --preset tiny --before main --rounds 3   # the ASGI move's cost
    python benchmarks/serve.py --quick --device cpu              # a smoke run with tiny shapes

Each client sends its requests one after another (`/v1/completions`, stream, greedy, ignore_eos so every
answer is full length) with a prompt of --prompt-tokens random letters (one token each). Measured per
concurrency and server: output tokens/s over the whole run, time to first token p50/p99, inter-token
latency p50 (from the streamed chunks as the client sees them), failures (goal 0), and the process's
CPU time per token (clients, HTTP and engine together; steadier than wall time on a shared machine).
The peer, in the same run: the engine without HTTP, `Engine.generate` on the same prompts in one batch
of C, which bounds what a server can reach.

With --before REF, the server as it was at REF (the file `nanoseek/engine/server.py` there: the
standard library's HTTP server, before the move to uvicorn) runs too, on its own engine, every
concurrency as before/after/after/before (ABBA, --rounds times, so drift from other jobs falls on both
alike); reported: after / before of tokens/s (each pair's too) and before / after of the CPU time per
token (above 1: the move costs less). A JSON line follows every configuration; the last has "complete".
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise
from pathlib import Path
from typing import Any, ClassVar

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanoseek.engine import Engine, SamplingParams
from nanoseek.model import Transformer, get_preset
from nanoseek.serve import Limits, Server

ROOT = Path(__file__).resolve().parents[1]


class ByteTokenizer:
    """Text <-> ids for random-weight models: one id per byte (ids below 256), enough for load tests."""

    stop_ids: ClassVar[list[int]] = []

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i % 256 for i in ids).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages, add_generation_prompt=True, tools=None) -> str:
        return "".join(m["content"] for m in messages)


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def client(url: str, prompt: str, max_tokens: int) -> tuple[float, list[float], int] | None:
    """(time to first token, gaps between later chunks, tokens) of one streamed request; None if it failed."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    request = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode())
    t0 = time.perf_counter()
    stamps = []
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            for line in response:
                if line.startswith(b"data: {"):
                    stamps.append(time.perf_counter())
    except OSError:
        return None
    if len(stamps) < 1:
        return None
    return stamps[0] - t0, [b - a for a, b in pairwise(stamps)], max_tokens


class Served:
    """A server on its own engine and thread: the current one, or the module of an older revision."""

    def __init__(self, module: Any | None, engine: Engine) -> None:
        if module is None:
            self.server = Server(engine, ByteTokenizer(), ("127.0.0.1", 0), limits=Limits(max_queue=4096))
            self.server.start()
        else:
            self.server = module.Server(engine, ByteTokenizer(), ("127.0.0.1", 0))
            threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def old_server_module(ref: str) -> Any:
    source = subprocess.run(
        ["git", "show", f"{ref}:nanoseek/engine/server.py"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    path = Path(tempfile.mkdtemp()) / "server_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("server_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load(url: str, prompts: list[str], clients: int, requests: int, new_tokens: int) -> dict[str, float]:
    def one_client(k: int) -> list:
        return [client(url, prompts[k * requests + r], new_tokens) for r in range(requests)]

    t0, cpu0 = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(clients) as pool:
        results = [x for xs in pool.map(one_client, range(clients)) for x in xs]
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    done = [x for x in results if x is not None]
    ttft = [x[0] for x in done]
    gaps = [gap for x in done for gap in x[1]]
    tokens = sum(x[2] for x in done)
    return dict(
        tokens_per_s=tokens / wall,
        cpu_ms_per_token=1e3 * cpu / max(tokens, 1),
        ttft_p50_ms=1e3 * percentile(ttft, 0.5),
        ttft_p99_ms=1e3 * percentile(ttft, 0.99),
        itl_p50_ms=1e3 * percentile(gaps, 0.5),
        failures=len(results) - len(done),
    )


def mean_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: sum(r[k] for r in runs) / len(runs) for k in runs[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--clients", default="1,8,32,128")
    p.add_argument("--requests", type=int, default=2, help="requests per client, one after another")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--before", default=None, metavar="REF", help="also the server at git REF, interleaved (ABBA)")
    p.add_argument("--rounds", type=int, default=1, help="ABBA blocks per concurrency (more: steadier ratios)")
    p.add_argument("--quick", action="store_true", help="tiny preset and shapes (a smoke run)")
    args = p.parse_args()
    if args.quick:
        args.preset, args.clients, args.new_tokens, args.prompt_tokens = "tiny", "1,4", 16, 16
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    model = Transformer(get_preset(args.preset, vocab_size=max(256, get_preset(args.preset).vocab_size)))
    model = model.to(device, dtype).eval()
    clients = [int(c) for c in args.clients.split(",")]
    shape = dict(max_batch=max(clients), max_seq_len=args.prompt_tokens + args.new_tokens + 8)
    servers = {"after": Served(None, Engine(model, ByteTokenizer(), **shape))}
    if args.before:
        servers["before"] = Served(old_server_module(args.before), Engine(model, ByteTokenizer(), **shape))
    order = (["before", "after", "after", "before"] if args.before else ["after"]) * args.rounds
    peer = Engine(model, ByteTokenizer(), **shape)  # its own KV cache: each server's worker owns its engine
    g = torch.Generator().manual_seed(1)
    letters = "abcdefghijklmnopqrstuvwxyz "

    def prompt() -> str:
        return "".join(letters[j] for j in torch.randint(0, len(letters), (args.prompt_tokens,), generator=g))

    results: dict = {"preset": args.preset, "device": str(device), "new_tokens": args.new_tokens, "runs": []}
    for served in servers.values():  # warm-up: first allocations, compilation, CUDA graph capture
        load(served.url, [prompt() for _ in range(max(clients))], max(clients), 1, 4)
    for c in clients:
        prompts = [prompt() for _ in range(c * args.requests)]
        measured: dict[str, list] = {name: [] for name in servers}
        for name in order:
            measured[name].append(load(servers[name].url, prompts, c, args.requests, args.new_tokens))
        batch = [ByteTokenizer().encode(s) for s in prompts[:c]]
        params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0, ignore_eos=True)
        peer.generate(batch, params)  # warm-up for this batch size
        t1 = time.perf_counter()
        peer.generate(batch, params)
        run: dict[str, Any] = {"clients": c, "requests": len(prompts)}
        run["engine_batch_tokens_per_s"] = c * args.new_tokens / (time.perf_counter() - t1)
        for name, runs in measured.items():
            run[name] = mean_of(runs)
            run[name]["vs_engine"] = run[name]["tokens_per_s"] / run["engine_batch_tokens_per_s"]
        line = f"{c:>3} clients: engine alone {run['engine_batch_tokens_per_s']:,.0f} tok/s"
        for name in servers:
            r = run[name]
            ttft = f"{r['ttft_p50_ms']:.0f}/{r['ttft_p99_ms']:.0f}"
            line += f"; {name} {r['tokens_per_s']:,.0f} tok/s, TTFT p50/p99 {ttft} ms, {r['failures']:.0f} failures"
        if args.before:
            run["after_vs_before"] = run["after"]["tokens_per_s"] / run["before"]["tokens_per_s"]
            pairs = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(measured["after"], measured["before"])]
            run["after_vs_before_each"] = pairs
            run["cpu_before_vs_after"] = run["before"]["cpu_ms_per_token"] / run["after"]["cpu_ms_per_token"]
            line += f"; after/before {run['after_vs_before']:.3f} (pairs {min(pairs):.2f}-{max(pairs):.2f})"
            line += f", CPU per token before/after {run['cpu_before_vs_after']:.3f}"
        print(line, file=sys.stderr)
        results["runs"].append(run)
        print(json.dumps({**results, "complete": False}))
    for served in servers.values():
        served.close()
    print(json.dumps({**results, "complete": True}))


if __name__ == "__main__":
    main()
