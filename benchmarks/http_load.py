"""Streaming HTTP clients for benchmarks/serve.py, in a process of their own, so that the load generator does not
share the server's interpreter (and its GIL). Standard library only: it starts in tens of milliseconds.

    echo '{"url": "http://127.0.0.1:8000", "max_tokens": 64, "clients": [["abc", "def"], ["ghi"]]}' \
        | python benchmarks/http_load.py

Input (stdin, one JSON object): `clients`, one list of prompts per client; each client sends its prompts one after
another (`/v1/completions`, stream, greedy, ignore_eos), all clients at once, one thread each. Output (stdout, one
JSON line): `start` and `end` (time.monotonic, the same clock in every process on Linux: the caller spans several
of these processes), `cpu_s` (this process's CPU time over the run), and per request `[ttft_s, [gaps_s], tokens]`
or null if it failed.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise


def request(url: str, prompt: str, max_tokens: int) -> tuple[float, list[float], int] | None:
    """(time to first token, gaps between later chunks, tokens) of one streamed request; None if it failed."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode())
    t0 = time.perf_counter()
    stamps = []
    try:
        with urllib.request.urlopen(req, timeout=600) as response:
            for line in response:
                if line.startswith(b"data: {"):
                    stamps.append(time.perf_counter())
    except OSError:
        return None
    if not stamps:
        return None
    return stamps[0] - t0, [b - a for a, b in pairwise(stamps)], max_tokens


def main() -> None:
    job = json.load(sys.stdin)
    url, max_tokens, clients = job["url"], job["max_tokens"], job["clients"]

    def one_client(prompts: list[str]) -> list:
        return [request(url, p, max_tokens) for p in prompts]

    start, cpu0 = time.monotonic(), time.process_time()
    with ThreadPoolExecutor(max(1, len(clients))) as pool:
        results = [r for rs in pool.map(one_client, clients) for r in rs]
    end = time.monotonic()
    print(json.dumps(dict(start=start, end=end, cpu_s=time.process_time() - cpu0, results=results)))


if __name__ == "__main__":
    main()
