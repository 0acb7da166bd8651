"""Serving under load: `nanoseek serve` over HTTP with C concurrent streaming clients vs the engine offline.

    python benchmarks/serve.py                             # preset small, 1/8/32 clients, 64 + 256 tokens
    python benchmarks/serve.py --quick --device cpu        # a smoke run with tiny shapes

Each client sends its requests one after another (`/v1/completions`, stream, greedy, ignore_eos so every
answer is full length) with a prompt of --prompt-tokens random token ids rendered as text. Measured per
concurrency: output tokens/s over the whole run, time to first token and inter-token latency
(p50/p90, from the streamed chunks as the client sees them). The peer, in the same run: the engine
without HTTP, `Engine.generate` on the same prompts in one batch of C, which bounds what the server
can reach; their ratio is the serving overhead (HTTP, JSON, threads, admission between steps).
A JSON line follows every configuration; the last line has "complete": true.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise
from pathlib import Path
from typing import ClassVar

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanoseek.engine import Engine, SamplingParams
from nanoseek.engine.server import Server
from nanoseek.model import Transformer, get_preset


class ByteTokenizer:
    """Text <-> ids for random-weight models: one id per byte (ids below 256), enough for load tests."""

    stop_ids: ClassVar[list[int]] = []

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i % 256 for i in ids).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages, add_generation_prompt=True) -> str:
        return "".join(m["content"] for m in messages)


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def client(url: str, prompt: str, max_tokens: int) -> tuple[float, list[float], int]:
    """(time to first token, gaps between later chunks, tokens) of one streamed request."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    request = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode())
    t0 = time.perf_counter()
    stamps = []
    with urllib.request.urlopen(request, timeout=600) as response:
        for line in response:
            if line.startswith(b"data: {"):
                stamps.append(time.perf_counter())
    return stamps[0] - t0, [b - a for a, b in pairwise(stamps)], max_tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--clients", default="1,8,32")
    p.add_argument("--requests", type=int, default=2, help="requests per client, one after another")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=256)
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
    server = Server(Engine(model, ByteTokenizer(), **shape), ByteTokenizer(), ("127.0.0.1", 0))
    peer = Engine(model, ByteTokenizer(), **shape)  # its own KV cache: the server's worker owns the other
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    g = torch.Generator().manual_seed(1)
    letters = "abcdefghijklmnopqrstuvwxyz "

    def prompt(i: int) -> str:
        idx = torch.randint(0, len(letters), (args.prompt_tokens,), generator=g).tolist()
        return "".join(letters[j] for j in idx)

    results: dict = {"preset": args.preset, "device": str(device), "new_tokens": args.new_tokens, "runs": []}
    client(url, prompt(0), 4)  # warm-up: first allocations, CUDA graph capture
    for c in clients:
        prompts = [prompt(i) for i in range(c * args.requests)]
        t0 = time.perf_counter()

        def one_client(k: int, prompts: list[str] = prompts) -> list[tuple[float, list[float], int]]:
            return [client(url, prompts[k * args.requests + r], args.new_tokens) for r in range(args.requests)]

        with ThreadPoolExecutor(c) as pool:
            per_client = list(pool.map(one_client, range(c)))
        wall = time.perf_counter() - t0
        done = [x for xs in per_client for x in xs]
        ttft = [x[0] for x in done]
        gaps = [gap for x in done for gap in x[1]]
        tokens = sum(x[2] for x in done)

        batch = [ByteTokenizer().encode(s) for s in prompts[:c]]
        params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0, ignore_eos=True)
        peer.generate(batch, params)  # warm-up (graph capture for this batch size)
        t1 = time.perf_counter()
        peer.generate(batch, params)
        engine_wall = time.perf_counter() - t1
        run = dict(
            clients=c,
            requests=len(done),
            server_tokens_per_s=tokens / wall,
            ttft_p50_ms=1e3 * percentile(ttft, 0.5),
            ttft_p90_ms=1e3 * percentile(ttft, 0.9),
            itl_p50_ms=1e3 * percentile(gaps, 0.5),
            itl_p90_ms=1e3 * percentile(gaps, 0.9),
            engine_batch_tokens_per_s=c * args.new_tokens / engine_wall,
        )
        run["server_vs_engine"] = run["server_tokens_per_s"] / run["engine_batch_tokens_per_s"]
        results["runs"].append(run)
        print(
            f"{c:>3} clients: server {run['server_tokens_per_s']:,.0f} tok/s, TTFT p50 {run['ttft_p50_ms']:.0f} ms, "
            f"ITL p50 {run['itl_p50_ms']:.1f} ms; engine alone {run['engine_batch_tokens_per_s']:,.0f} tok/s",
            file=sys.stderr,
        )
        print(json.dumps({**results, "complete": False}))
    server.shutdown()
    server.server_close()
    results["itl_median_over_runs_ms"] = statistics.median(r["itl_p50_ms"] for r in results["runs"])
    print(json.dumps({**results, "complete": True}))


if __name__ == "__main__":
    main()
