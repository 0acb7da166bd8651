"""Serving under load: `nanoseek serve` over HTTP with C concurrent streaming clients vs the engine alone,
and (with --before REF) against the server as it was at a git revision, interleaved in one run.

    python benchmarks/serve.py                                   # preset small, 1/8/32/128 clients
    python benchmarks/serve.py --device cpu --preset tiny --before main --rounds 3   # the ASGI move's cost
    python benchmarks/serve.py --quick --device cpu              # a smoke run with tiny shapes

Each client sends its requests one after another (`/v1/completions`, stream, greedy, ignore_eos so every
answer is full length) with a prompt of --prompt-tokens random letters (one token each); the clients are threads
of --client-processes processes of their own (`benchmarks/http_load.py`), not of the server's. Measured per
concurrency and server: output tokens/s over the whole run, time to first token p50/p99, inter-token
latency p50 (from the streamed chunks as the client sees them), failures (goal 0), and CPU time per token: the
server's process (HTTP and engine: `cpu_ms_per_token`, steadier than wall time on a shared machine) and the
clients' processes (`client_cpu_ms_per_token`).
The peer, in the same run: the engine without HTTP, `Engine.generate` on the same prompts in one batch
of C, which bounds what a server can reach.

With --before REF, the server as it was at REF (the file `nanoseek/engine/server.py` there: the
standard library's HTTP server, before the move to uvicorn) runs too, on its own engine, every
concurrency as before/after/after/before (ABBA, --rounds times, so drift from other jobs falls on both
alike); reported: after / before of tokens/s (each pair's too) and before / after of the CPU time per
token (above 1: the move costs less). A JSON line follows every configuration; the last has "complete".

--switch-interval MS sets how long a thread may hold the GIL while another waits. The server's event loop and the
engine's thread share one interpreter; on the H200 at 128 clients the engine stepped every ~22 ms inside the
server against 2.3 ms alone, which is what a thread that gives the GIL up at every CUDA sync and waits up to the
5 ms default to get it back from a busy event loop would show (a hypothesis: the suite's `serve_gil` part runs
32 and 128 clients at 0.5 ms to test it).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, ClassVar

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanoseek.engine import Engine, SamplingParams
from nanoseek.model import Transformer, get_preset
from nanoseek.serve import Limits, Server

ROOT = Path(__file__).resolve().parents[1]
LOAD = Path(__file__).resolve().parent / "http_load.py"


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


class Served:
    """A server on its own engine and thread: the current one, or the module of an older revision."""

    def __init__(self, module: Any | None, engine: Engine, stream_interval: int = 1) -> None:
        if module is None:
            address, limits = ("127.0.0.1", 0), Limits(max_queue=4096)
            self.server = Server(engine, ByteTokenizer(), address, limits=limits, stream_interval=stream_interval)
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


def load(
    url: str, prompts: list[str], clients: int, requests: int, new_tokens: int, processes: int
) -> dict[str, float]:
    """C clients (client k sends prompts[k * requests : (k + 1) * requests] one after another), spread over
    `processes` client processes (benchmarks/http_load.py), none of them this one: the load generator must not
    share the server's interpreter. (Until 2026-12-04 the clients were threads of this process: on the H200 the
    figure at 128 clients was the GIL's, clients' parsing included.)"""
    per_client = [prompts[k * requests : (k + 1) * requests] for k in range(clients)]
    shares = [per_client[i::processes] for i in range(min(processes, clients))]
    cpu0 = time.process_time()
    procs = [
        subprocess.Popen([sys.executable, str(LOAD)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for _ in shares
    ]
    for proc, share in zip(procs, shares):  # every process gets its job before any is read: they run together
        proc.stdin.write(json.dumps(dict(url=url, max_tokens=new_tokens, clients=share)))
        proc.stdin.close()
    outs = []
    for proc in procs:
        out = proc.stdout.read()
        if proc.wait() != 0:
            raise SystemExit(f"benchmarks/http_load.py exited with {proc.returncode}")
        outs.append(json.loads(out))
    cpu = time.process_time() - cpu0
    wall = max(o["end"] for o in outs) - min(o["start"] for o in outs)
    results = [r for o in outs for r in o["results"]]
    done = [x for x in results if x is not None]
    ttft = [x[0] for x in done]
    gaps = [gap for x in done for gap in x[1]]
    tokens = sum(x[2] for x in done)
    return dict(
        tokens_per_s=tokens / wall,
        cpu_ms_per_token=1e3 * cpu / max(tokens, 1),
        client_cpu_ms_per_token=1e3 * sum(o["cpu_s"] for o in outs) / max(tokens, 1),
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
    p.add_argument(
        "--client-processes",
        type=int,
        default=max(1, min(4, (os.cpu_count() or 1) // 4)),
        help="processes the clients are spread over (default: a quarter of the cores, 1 to 4)",
    )
    p.add_argument(
        "--stream-interval",
        type=int,
        default=1,
        help="the server's decode steps between a stream's events (`nanoseek serve --stream-interval`; default 1)",
    )
    p.add_argument(
        "--switch-interval",
        type=float,
        default=None,
        metavar="MS",
        help="the interpreter's GIL switch interval for the run (sys.setswitchinterval; Python's default: 5 ms)",
    )
    p.add_argument("--quick", action="store_true", help="tiny preset and shapes (a smoke run)")
    args = p.parse_args()
    if args.switch_interval is not None:
        if args.switch_interval <= 0:
            p.error(f"--switch-interval {args.switch_interval}: must be > 0 (milliseconds)")
        sys.setswitchinterval(args.switch_interval / 1e3)
    if args.stream_interval < 1:
        p.error(f"--stream-interval {args.stream_interval}: must be >= 1")
    if args.client_processes < 1:
        p.error(f"--client-processes {args.client_processes}: must be >= 1")
    if args.quick:
        args.preset, args.clients, args.new_tokens, args.prompt_tokens = "tiny", "1,4", 16, 16
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    model = Transformer(get_preset(args.preset, vocab_size=max(256, get_preset(args.preset).vocab_size)))
    model = model.to(device, dtype).eval()
    clients = [int(c) for c in args.clients.split(",")]
    shape = dict(max_batch=max(clients), max_seq_len=args.prompt_tokens + args.new_tokens + 8)
    servers = {"after": Served(None, Engine(model, ByteTokenizer(), **shape), args.stream_interval)}
    if args.before:
        servers["before"] = Served(old_server_module(args.before), Engine(model, ByteTokenizer(), **shape))
    order = (["before", "after", "after", "before"] if args.before else ["after"]) * args.rounds
    peer = Engine(model, ByteTokenizer(), **shape)  # its own KV cache: each server's worker owns its engine
    g = torch.Generator().manual_seed(1)
    letters = "abcdefghijklmnopqrstuvwxyz "

    def prompt() -> str:
        return "".join(letters[j] for j in torch.randint(0, len(letters), (args.prompt_tokens,), generator=g))

    results: dict = {"preset": args.preset, "device": str(device), "new_tokens": args.new_tokens, "runs": []}
    results["switch_interval_ms"] = 1e3 * sys.getswitchinterval()
    results["stream_interval"] = args.stream_interval
    for served in servers.values():  # warm-up: first allocations, compilation, CUDA graph capture
        load(served.url, [prompt() for _ in range(max(clients))], max(clients), 1, 4, args.client_processes)
    for c in clients:
        prompts = [prompt() for _ in range(c * args.requests)]
        measured: dict[str, list] = {name: [] for name in servers}
        for name in order:
            measured[name].append(
                load(servers[name].url, prompts, c, args.requests, args.new_tokens, args.client_processes)
            )
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
