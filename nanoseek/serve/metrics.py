"""`GET /metrics` in the Prometheus text format (version 0.0.4), written by hand: a few counters,
gauges read from the engine worker, and two latency histograms. Updated on the event loop's thread only."""

from __future__ import annotations

import bisect
from collections import Counter

from nanoseek.serve.worker import EngineWorker

TTFT_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets, self.counts = buckets, [0] * (len(buckets) + 1)
        self.sum, self.count = 0.0, 0

    def observe(self, value: float, times: int = 1) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += times
        self.sum += value * times
        self.count += times

    def lines(self, name: str) -> list[str]:
        out, total = [], 0
        for bound, count in zip((*self.buckets, float("inf")), self.counts):
            total += count
            out.append(f'{name}_bucket{{le="{"+Inf" if bound == float("inf") else f"{bound:g}"}"}} {total}')
        return [*out, f"{name}_sum {self.sum:.6f}", f"{name}_count {self.count}"]


class Metrics:
    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.requests: Counter[tuple[str, int]] = Counter()
        """(route, status) -> responses."""
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS_S)
        self.itl = Histogram(ITL_BUCKETS_S)

    def count(self, route: str, status: int) -> None:
        self.requests[(route, status)] += 1

    def render(self, worker: EngineWorker) -> str:
        engine = worker.engine
        capacity = engine.n_slots * engine.max_seq_len

        def metric(name: str, kind: str, help_: str, lines: list[str]) -> list[str]:
            return [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", *lines]

        by_status = [
            f'nanoseek_requests_total{{route="{route}",status="{status}"}} {n}'
            for (route, status), n in sorted(self.requests.items())
        ]
        out = [
            *metric("nanoseek_requests_total", "counter", "HTTP responses by route and status.", by_status),
            *metric(
                "nanoseek_prompt_tokens_total",
                "counter",
                "Prompt tokens accepted.",
                [f"nanoseek_prompt_tokens_total {self.prompt_tokens}"],
            ),
            *metric(
                "nanoseek_generation_tokens_total",
                "counter",
                "Tokens generated.",
                [f"nanoseek_generation_tokens_total {self.generation_tokens}"],
            ),
            *metric(
                "nanoseek_queue_depth",
                "gauge",
                "Requests waiting for a KV slot.",
                [f"nanoseek_queue_depth {worker.backlog}"],
            ),
            *metric(
                "nanoseek_running_sequences",
                "gauge",
                "Sequences holding a KV slot.",
                [f"nanoseek_running_sequences {worker.running}"],
            ),
            *metric(
                "nanoseek_kv_slots",
                "gauge",
                "KV cache slots (one sequence each).",
                [f"nanoseek_kv_slots {engine.n_slots}"],
            ),
            *metric(
                "nanoseek_kv_cache_usage_ratio",
                "gauge",
                "Fraction of the KV cache's token positions held by running sequences.",
                [f"nanoseek_kv_cache_usage_ratio {worker.kv_tokens / capacity:.6f}"],
            ),
            *metric(
                "nanoseek_cancelled_requests_total",
                "counter",
                "Requests aborted because the client left or ran out of time.",
                [f"nanoseek_cancelled_requests_total {worker.cancelled}"],
            ),
            *metric(
                "nanoseek_time_to_first_token_seconds",
                "histogram",
                "From the request's arrival to its first token.",
                self.ttft.lines("nanoseek_time_to_first_token_seconds"),
            ),
            *metric(
                "nanoseek_inter_token_latency_seconds",
                "histogram",
                "Time between a sample's consecutive tokens.",
                self.itl.lines("nanoseek_inter_token_latency_seconds"),
            ),
        ]
        return "\n".join(out) + "\n"


__all__ = ["Histogram", "Metrics"]
