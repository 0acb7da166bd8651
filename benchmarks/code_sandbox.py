"""Per-program overhead of the code sandbox (`nanoseek.rewards.sandbox.run_python`) at each level.

    python benchmarks/code_sandbox.py                 # 10 rounds x 20 programs per level, interleaved
    python benchmarks/code_sandbox.py --quick         # 3 rounds x 5
    python benchmarks/code_sandbox.py --threads 4     # 4 programs in flight at a time

A program here is `pass`: what is timed is the runner itself (job directory, fork server, namespaces,
limits, reading the output back), one program at a time unless --threads. The levels take turns
round by round, so a busy neighbour on a shared machine slows each alike; each level's figure is the
median over its rounds of the mean time per program (and the best round); a server's start (once
per trainer process) is timed apart. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanoseek.rewards.sandbox import SandboxError, configure_sandbox, run_python, sandbox_level


def one_round(programs: int, threads: int) -> float:
    """Seconds per program over `programs` programs."""
    t0 = time.perf_counter()
    if threads <= 1:
        results = [run_python("pass") for _ in range(programs)]
    else:
        with ThreadPoolExecutor(threads) as pool:
            results = list(pool.map(lambda _: run_python("pass"), range(programs)))
    elapsed = time.perf_counter() - t0
    bad = [r for r in results if r.status != "ok"]
    if bad:
        raise RuntimeError(f"a program failed: {bad[0]}")
    return elapsed / programs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--programs", type=int, default=20, help="programs per round")
    parser.add_argument("--threads", type=int, default=1, help="programs in flight at a time")
    parser.add_argument("--quick", action="store_true", help="3 rounds of 5 programs")
    args = parser.parse_args()
    rounds, programs = (3, 5) if args.quick else (args.rounds, args.programs)

    levels = []
    for level in ("process", "namespaces"):
        configure_sandbox(level)
        try:
            sandbox_level()
            levels.append(level)
        except SandboxError as e:
            print(f"{level}: not available here ({e})", file=sys.stderr)
    times: dict[str, list[float]] = {level: [] for level in levels}
    starts: dict[str, list[float]] = {level: [] for level in levels}
    for _ in range(rounds):
        for level in levels:
            configure_sandbox(level)  # a new server, whose start is timed apart
            t0 = time.perf_counter()
            sandbox_level()
            starts[level].append(time.perf_counter() - t0)
            run_python("pass")  # warm
            times[level].append(one_round(programs, args.threads))
    out = {
        "benchmark": "code_sandbox",
        "programs_per_round": programs,
        "rounds": rounds,
        "threads": args.threads,
        **{f"{level}_ms": round(1e3 * statistics.median(t), 2) for level, t in times.items()},
        **{f"{level}_best_ms": round(1e3 * min(t), 2) for level, t in times.items()},
        **{f"{level}_server_start_ms": round(1e3 * statistics.median(t), 1) for level, t in starts.items()},
    }
    if "process" in times and "namespaces" in times:
        out["namespaces_over_process"] = round(out["namespaces_ms"] / out["process_ms"], 2)
    for level in times:
        print(
            f"{level:<11} {out[f'{level}_ms']:7.2f} ms a program (best round {out[f'{level}_best_ms']:.2f}); "
            f"server start {out[f'{level}_server_start_ms']:.0f} ms"
        )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
