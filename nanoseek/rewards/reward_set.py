"""RewardSet: weighted reward functions whose failures cost samples, never the run.

A reward function that raises, returns garbage or hangs must not kill a long RL run: `RewardSet.score`
gives the affected samples 0, counts a warning (logged once per kind) and goes on. Reward functions
named by import path run in their own worker process (`workers`) with a time limit, so a hang costs one
timeout, not the run.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from nanoseek.rewards.functions import BUILTIN_REWARDS, RewardFn, check_batch, load_reward_fn
from nanoseek.rewards.loading import RewardLoadError, absolute_spec
from nanoseek.rewards.workers import (
    WorkerDied,
    WorkerError,
    WorkerInputError,
    WorkerPool,
    WorkerStartError,
    WorkerTimeout,
)

__all__ = ["RewardResult", "RewardSet", "RewardTerm"]

logger = logging.getLogger(__name__)


@dataclass
class RewardTerm:
    """One weighted reward function. With `path` set and `isolated`, it runs in a worker process."""

    name: str
    fn: RewardFn
    weight: float = 1.0
    path: str | None = None
    isolated: bool = False
    timeout_s: float = 60.0  # per call on a batch, for isolated terms


@dataclass
class RewardResult:
    """What RewardSet.score returns: each function's values, the weighted total, and what went wrong."""

    per_function: dict[str, list[float]]
    total: list[float]
    failed: list[bool]  # per sample: some term gave this sample 0 because it failed
    warnings: dict[str, int] = field(default_factory=dict)  # this call's "term:kind" -> samples affected


class _TermFailure(Exception):
    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


class RewardSet:
    """A weighted list of reward functions whose failures cost samples, never the run.

        rewards = RewardSet().add("math", math_reward, 1.0).add("format", format_reward, 0.1)
        rewards.add("style", "my_pkg.rewards:style", 0.5)   # by path: runs isolated, with a time limit
        result = rewards.score(prompts, completions, rows)  # result.total[i], result.per_function["math"][i]

    A term that raises is retried sample by sample so only the samples it fails on get 0; one that
    hangs (isolated terms only) gives its whole batch 0 after `timeout_s`; a wrong-length or
    non-numeric return gives the batch 0; NaN/inf values become 0. Each is counted in `warnings` as
    "name:kind" and logged once per kind. In-process callables cannot be interrupted, so pass an
    import path for code that might hang.
    """

    def __init__(self, terms: Sequence[RewardTerm] = ()):
        self.terms: list[RewardTerm] = []
        self.warnings: collections.Counter[str] = collections.Counter()  # cumulative over all calls
        self._pools: dict[str, WorkerPool] = {}
        self._logged: set[str] = set()
        self._lock = threading.Lock()
        for term in terms:
            self._add_term(term)

    def _add_term(self, term: RewardTerm) -> None:
        if any(t.name == term.name for t in self.terms):
            raise ValueError(f"reward name {term.name!r} used twice")
        if not math.isfinite(term.weight):
            raise ValueError(f"reward {term.name!r}: weight must be finite, got {term.weight}")
        if term.isolated and not term.path:
            raise ValueError(f"reward {term.name!r}: only a function given by import path can run isolated")
        if not term.timeout_s > 0:
            raise ValueError(f"reward {term.name!r}: timeout_s must be > 0, got {term.timeout_s}")
        self.terms.append(term)

    def add(
        self,
        name: str,
        fn: RewardFn | str,
        weight: float = 1.0,
        *,
        isolated: bool | None = None,
        timeout_s: float = 60.0,
    ) -> RewardSet:
        """Add a term. `fn` is a callable (runs in-process) or a spec for load_reward_fn.

        By default a spec that resolves to a built-in runs in-process and any other spec is isolated
        in a worker process (re-imported there by path; killed and restarted on timeout).
        """
        path = None
        if isinstance(fn, str):
            spec = fn.strip()
            fn = load_reward_fn(spec)  # fail now, with a clear message, rather than in a worker
            # The worker re-imports it by path: a relative file must not depend on cwd, a built-in's name is no path.
            path = f"{fn.__module__}:{fn.__qualname__}" if spec in BUILTIN_REWARDS else absolute_spec(spec)
            if isolated is None:
                isolated = fn not in BUILTIN_REWARDS.values()
        elif not callable(fn):
            raise TypeError(f"reward {name!r}: expected a callable or an import path, got {type(fn).__name__}")
        self._add_term(RewardTerm(name, fn, float(weight), path, bool(isolated), timeout_s))
        return self

    @classmethod
    def parse(cls, spec: str, timeout_s: float = 60.0) -> RewardSet:
        """Build from "math=1.0,format=0.1,my_pkg.mod:fn=0.5" (weight defaults to 1; names from specs)."""
        rs = cls()
        for item in (s.strip() for s in spec.split(",")):
            if not item:
                continue
            fn_spec, eq, weight_str = item.rpartition("=")
            if not eq:
                fn_spec, weight_str = item, "1"
            try:
                weight = float(weight_str)
            except ValueError:
                raise RewardLoadError(f"reward {item!r}: weight {weight_str!r} is not a number") from None
            name = fn_spec.rsplit(":", 1)[-1].rsplit(".", 1)[-1]
            if name in rs.names:
                name = fn_spec
            rs.add(name, fn_spec, weight, timeout_s=timeout_s)
        if not rs.terms:
            raise RewardLoadError(f"no reward functions in {spec!r}")
        return rs

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.terms]

    def __len__(self) -> int:
        return len(self.terms)

    def close(self) -> None:
        """Stop this set's worker processes (also happens at exit)."""
        with self._lock:
            pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            pool.close()

    def _pool(self, term: RewardTerm) -> WorkerPool:
        with self._lock:
            pool = self._pools.get(term.name)
            if pool is None or pool.pid != os.getpid():
                pool = self._pools[term.name] = WorkerPool(term.path, 1)
            return pool

    def _call(self, term: RewardTerm, prompts: list[str], completions: list[str], rows: list[dict]) -> Any:
        """One call of the term's function; raises _TermFailure("raised:X" | "timeout" | ...)."""
        if not term.isolated:
            try:
                return term.fn(prompts, completions, rows)
            except (Exception, SystemExit) as e:
                raise _TermFailure(f"raised:{type(e).__name__}", f"{type(e).__name__}: {e}") from e
        try:
            return self._pool(term).run((prompts, completions, rows), term.timeout_s)
        except WorkerError as e:
            raise _TermFailure(f"raised:{e.kind}", f"{e.kind}: {e.message}\n{e.tb}") from None
        except WorkerTimeout:
            raise _TermFailure("timeout", f"no answer within {term.timeout_s} s; worker killed") from None
        except (WorkerDied, WorkerStartError) as e:
            raise _TermFailure("worker_failed", str(e)) from None
        except WorkerInputError as e:
            raise _TermFailure("unpicklable_input", str(e)) from None
        except Exception as e:  # e.g. a reply that cannot be unpickled here; the worker was replaced
            raise _TermFailure("worker_failed", f"{type(e).__name__}: {e}") from None

    @staticmethod
    def _coerce(values: Any, n: int) -> list[float | None]:
        """The returned values as floats (None where not a finite number); _TermFailure if unusable."""
        if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__len__"):
            raise _TermFailure("bad_return", f"returned {type(values).__name__}, expected a list of {n} floats")
        if len(values) != n:
            raise _TermFailure("bad_return", f"returned {len(values)} values for {n} samples")
        out: list[float | None] = []
        for v in values:
            try:
                f = float(v)
            except (TypeError, ValueError):
                raise _TermFailure("bad_return", f"returned a non-number {v!r:.100}") from None
            out.append(f if math.isfinite(f) else None)
        return out

    def _warn(self, counts: collections.Counter[str], term: RewardTerm, kind: str, detail: str, k: int) -> None:
        key = f"{term.name}:{kind}"
        counts[key] += k
        with self._lock:
            self.warnings[key] += k
            first = key not in self._logged
            self._logged.add(key)
        if first:
            logger.warning("reward %r failed (%s); affected samples get 0 (logged once): %s", term.name, kind, detail)

    def _score_term(
        self,
        term: RewardTerm,
        prompts: list[str],
        completions: list[str],
        rows: list[dict],
        counts: collections.Counter[str],
    ) -> tuple[list[float], list[bool]]:
        """This term's values for the batch and which samples were zeroed by a failure."""
        n = len(completions)
        try:
            values = self._coerce(self._call(term, prompts, completions, rows), n)
        except _TermFailure as failure:
            if not failure.kind.startswith("raised:") or n == 1:
                self._warn(counts, term, failure.kind, failure.detail, n)
                return [0.0] * n, [True] * n
            return self._retry_per_sample(term, prompts, completions, rows, counts)
        return self._zero_non_finite(term, values, counts)

    def _zero_non_finite(
        self, term: RewardTerm, values: list[float | None], counts: collections.Counter[str]
    ) -> tuple[list[float], list[bool]]:
        bad = [v is None for v in values]
        if any(bad):
            self._warn(counts, term, "non_finite", "returned NaN or inf", sum(bad))
        return [0.0 if v is None else v for v in values], bad

    def _retry_per_sample(
        self,
        term: RewardTerm,
        prompts: list[str],
        completions: list[str],
        rows: list[dict],
        counts: collections.Counter[str],
    ) -> tuple[list[float], list[bool]]:
        """The term raised on the batch: call it per sample so only the samples it fails on get 0."""
        n = len(completions)
        values: list[float | None] = [0.0] * n
        failed = [True] * n
        for i in range(n):
            try:
                (values[i],) = self._coerce(
                    self._call(term, prompts[i : i + 1], completions[i : i + 1], rows[i : i + 1]), 1
                )
                failed[i] = False
            except _TermFailure as f:
                if f.kind == "timeout":  # do not pay the time limit once per remaining sample
                    self._warn(counts, term, "timeout", f.detail, n - i)
                    break
                self._warn(counts, term, f.kind, f.detail, 1)
        out, bad = self._zero_non_finite(term, values, counts)
        return out, [a or b for a, b in zip(failed, bad)]

    def score(self, prompts: list[str], completions: list[str], rows: list[dict]) -> RewardResult:
        """Every term on the batch, the weighted total, and the failures (contained, never raised).

        Thread-safe: isolated terms use their worker one call at a time; built-ins are reentrant.
        """
        check_batch(prompts, completions, rows)
        prompts, completions, rows = list(prompts), list(completions), list(rows)
        n = len(completions)
        counts: collections.Counter[str] = collections.Counter()
        per_function: dict[str, list[float]] = {}
        total = [0.0] * n
        failed = [False] * n
        for term in self.terms:
            values, term_failed = self._score_term(term, prompts, completions, rows, counts) if n else ([], [])
            per_function[term.name] = values
            for i in range(n):
                total[i] += term.weight * values[i]
                failed[i] = failed[i] or term_failed[i]
        return RewardResult(per_function=per_function, total=total, failed=failed, warnings=dict(counts))

    def __repr__(self) -> str:
        inner = ", ".join(f"{t.name}={t.weight:g}{' (isolated)' if t.isolated else ''}" for t in self.terms)
        return f"RewardSet({inner})"
