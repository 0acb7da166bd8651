"""math_equal: are two answers the same mathematical object, according to math-verify (sympy)?

`\\frac{1}{2}` = `0.5`, `(3, \\pi/2)` = `\\left( 3, \\frac{\\pi}{2} \\right)`. math-verify's own timeouts use
`signal.alarm`, which only works in the main thread, and the RL loop grades from worker threads; and
some inputs (`9^{9^{9}}`) make sympy run forever. So math-verify runs with its timeouts off in a
small pool of persistent worker processes (`workers`), and a call that exceeds its time limit kills
and restarts its worker and counts as wrong. Trivially equal strings and plain integers are decided
in-process without a round trip, and outcomes are cached.
"""

from __future__ import annotations

import collections
import functools
import logging
import os
import re
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields, replace
from typing import Any

from nanoseek.answers import strip_math_delimiters
from nanoseek.rewards.workers import WorkerDied, WorkerError, WorkerPool, WorkerTimeout

logger = logging.getLogger(__name__)

__all__ = [
    "MathVerifyStats",
    "configure_math_verify",
    "math_equal",
    "math_equal_many",
    "math_outcome",
    "math_verify_stats",
    "reset_math_verify_stats",
]


# math-verify (and sympy, ~0.2 s and tens of MB) is imported inside these functions: they run in the
# worker processes, so the processes that only send them answers never import it.
def _mv_warmup() -> None:
    """Import math-verify with its signal-based timeouts off (we time out the process instead)."""
    import math_verify.grader
    import math_verify.parser

    # The "you must provide the timeout yourself" warning: we do, by killing this process.
    math_verify.parser.TIMEOUT_WARNING_SHOWN = True
    math_verify.grader.TIMEOUT_WARNING_SHOWN = True
    _mv_equal("\\frac{1}{2}", "0.5")  # loads the LaTeX parser so the first real call is not slow


def _mv_parse(text: str) -> list:
    """Parse one answer string: as the content of a box (LaTeX), else as a plain expression."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    boxed = parse(
        "\\boxed{" + text + "}",
        extraction_config=[LatexExtractionConfig(boxed_match_priority=0)],
        parsing_timeout=None,
    )
    if _mv_has_expr(boxed):
        return boxed
    plain = parse(text, extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()], parsing_timeout=None)
    return plain if _mv_has_expr(plain) else boxed


def _mv_has_expr(parsed: list) -> bool:
    return any(not isinstance(x, str) for x in parsed)


_mv_parse_gold = functools.lru_cache(maxsize=4096)(_mv_parse)
_mv_parse_pred = functools.lru_cache(maxsize=4096)(_mv_parse)


def _mv_equal(pred: str, gold: str) -> str:
    """Worker side of math_equal: 'equal', 'unequal', 'unparseable_pred' or 'unparseable_gold'."""
    from math_verify import verify

    gold_parsed = _mv_parse_gold(gold)  # the same gold is graded against many samples: parse it once
    if not _mv_has_expr(gold_parsed):
        return "unparseable_gold"
    pred_parsed = _mv_parse_pred(pred)
    if not _mv_has_expr(pred_parsed):
        return "unparseable_pred"
    return "equal" if verify(gold_parsed, pred_parsed, timeout_seconds=None) else "unequal"


@dataclass
class MathVerifyStats:
    """Counts of math_equal outcomes in this process (each call counts once, cached or not)."""

    calls: int = 0
    fast_path: int = 0  # decided in-process (identical after normalisation, or two integers)
    equal: int = 0
    unequal: int = 0
    unparseable_pred: int = 0  # the prediction is not a math expression math-verify can read: wrong
    unparseable_gold: int = 0  # the gold answer is not readable: wrong, and the dataset needs a look
    timeouts: int = 0  # exceeded the time limit: wrong, and the worker was restarted
    worker_errors: int = 0  # math-verify raised inside the worker, or the worker died: wrong
    cache_hits: int = 0


_STATS = MathVerifyStats()
_STATS_LOCK = threading.Lock()
_MATH_POOL: WorkerPool | None = None
_MATH_POOL_LOCK = threading.Lock()
_MATH_WORKERS = int(os.environ.get("NANOSEEK_MATH_WORKERS", "0")) or min(4, os.cpu_count() or 1)
_RESULT_CACHE: collections.OrderedDict[tuple[str, str], str] = collections.OrderedDict()
_RESULT_CACHE_SIZE = 65536
_RESULT_CACHE_MAX_CHARS = 1000
_LOGGED_ONCE: set[str] = set()


def _log_once(key: str, message: str, *args: Any, level: int = logging.WARNING) -> None:
    with _STATS_LOCK:
        if key in _LOGGED_ONCE:
            return
        _LOGGED_ONCE.add(key)
    logger.log(level, message, *args)


def math_verify_stats() -> MathVerifyStats:
    """A snapshot of the math_equal counters."""
    with _STATS_LOCK:
        return replace(_STATS)


def reset_math_verify_stats() -> None:
    with _STATS_LOCK:
        for f in fields(_STATS):
            setattr(_STATS, f.name, 0)


def configure_math_verify(workers: int | None = None, clear_cache: bool = False) -> None:
    """Set the number of math-verify worker processes (restarts the pool) and/or clear the cache."""
    global _MATH_POOL, _MATH_WORKERS
    with _MATH_POOL_LOCK:
        if workers is not None:
            if workers < 1:
                raise ValueError(f"workers must be >= 1, got {workers}")
            _MATH_WORKERS = workers
            if _MATH_POOL is not None:
                _MATH_POOL.close()
                _MATH_POOL = None
    if clear_cache:
        with _STATS_LOCK:
            _RESULT_CACHE.clear()


def _math_pool() -> WorkerPool:
    global _MATH_POOL
    with _MATH_POOL_LOCK:
        # None before first use; closed after shutdown_workers(); a forked child must not share pipes.
        if _MATH_POOL is None or _MATH_POOL.closed or _MATH_POOL.pid != os.getpid():
            _MATH_POOL = WorkerPool(f"{__name__}:_mv_equal", _MATH_WORKERS, setup=f"{__name__}:_mv_warmup")
        return _MATH_POOL


_LATEX_SPACING = re.compile(r"\\left(?![a-zA-Z])|\\right(?![a-zA-Z])|\\[!,;:](?![a-zA-Z])|\\ ")
_INTEGER = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+|[+-]?\d+")


def _fast_equal(pred: str, gold: str) -> bool | None:
    """True/False when the answers are decidable without sympy; None to ask math-verify.

    Identical after dropping spacing and `\\left`/`\\right` means equal. Two plain integers (thousands
    separators allowed, but no spaces: "1, 234" may be a list) are compared as integers.
    """
    p = strip_math_delimiters(pred).rstrip(".").strip()
    g = strip_math_delimiters(gold).rstrip(".").strip()
    if _INTEGER.fullmatch(p) and _INTEGER.fullmatch(g):
        return int(p.replace(",", "")) == int(g.replace(",", ""))
    p, g = _squeeze(p), _squeeze(g)
    if p == g and p:
        return True
    return None


def _squeeze(s: str) -> str:
    """Drop LaTeX spacing and whitespace, except that a comma followed by space stays ", ": "1, 234"
    may be a list while "1,234" is a number, so the two must not become the same string."""
    s = _LATEX_SPACING.sub("", s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac"))
    s = re.sub(r",\s+", ",\0", s)
    return re.sub(r"\s+", "", s).replace(",\0", ", ")


def _count(outcome: str, cached: bool = False) -> None:
    with _STATS_LOCK:
        _STATS.calls += 1
        if cached:
            _STATS.cache_hits += 1
        if outcome == "timeout":
            _STATS.timeouts += 1
        elif outcome == "worker_error":
            _STATS.worker_errors += 1
        else:
            setattr(_STATS, outcome, getattr(_STATS, outcome) + 1)


def math_equal(pred: str | None, gold: str | None, timeout_s: float = 5.0, *, fast_path: bool = True) -> bool:
    """Whether `pred` and `gold` (extracted answers, LaTeX or plain) are the same mathematical object.

    Safe to call from any thread. Decided by math-verify in a worker process under `timeout_s`; a
    timeout, an unreadable answer or a math-verify error counts as not equal (see math_verify_stats()).
    Percentages follow math-verify: gold `10\\%` accepts `10\\%`, `10` and `0.1`.
    `fast_path=False` sends even identical strings to math-verify (to test math-verify itself).
    """
    return math_outcome(pred, gold, timeout_s, fast_path=fast_path) == "equal"


def math_outcome(pred: str | None, gold: str | None, timeout_s: float = 5.0, *, fast_path: bool = True) -> str:
    """math_equal's verdict and why: "equal", "unequal", "unparseable_pred", "unparseable_gold",
    "timeout" or "worker_error" (each counted in math_verify_stats())."""
    if pred is None or gold is None:
        outcome = "unparseable_pred" if pred is None else "unparseable_gold"
        _count(outcome)
        return outcome
    pred, gold = str(pred), str(gold)
    fast = _fast_equal(pred, gold) if fast_path else None
    if fast is not None:
        with _STATS_LOCK:
            _STATS.calls += 1
            _STATS.fast_path += 1
            _STATS.equal += fast
            _STATS.unequal += not fast
        return "equal" if fast else "unequal"

    key = (strip_math_delimiters(pred).strip(), strip_math_delimiters(gold).strip())
    with _STATS_LOCK:
        outcome = _RESULT_CACHE.get(key) if fast_path else None
        if outcome is not None:
            _RESULT_CACHE.move_to_end(key)
    if outcome is not None:
        _count(outcome, cached=True)
        return outcome

    try:
        outcome = _math_pool().run(key, timeout_s)
    except WorkerTimeout:
        outcome = "timeout"
        _log_once("math_equal:timeout", "math_equal: timed out after %.1f s (counted wrong): %.200r", timeout_s, pred)
    except (WorkerError, WorkerDied) as e:
        outcome = "worker_error"
        _log_once(f"math_equal:{type(e).__name__}", "math_equal: worker failed (counted wrong): %s", e)
    # A crash may be transient; every other outcome is a property of the pair. Long strings are not kept.
    if outcome != "worker_error" and len(key[0]) + len(key[1]) <= _RESULT_CACHE_MAX_CHARS:
        with _STATS_LOCK:
            _RESULT_CACHE[key] = outcome
            if len(_RESULT_CACHE) > _RESULT_CACHE_SIZE:
                _RESULT_CACHE.popitem(last=False)
    if outcome == "unparseable_gold":
        _log_once(f"gold:{gold}", "math_equal: gold answer %.200r cannot be parsed by math-verify", gold)
    _count(outcome)
    return outcome


def math_equal_many(preds: Sequence[str | None], golds: Sequence[str | None], timeout_s: float = 5.0) -> list[bool]:
    """math_equal over pairs, using all math workers in parallel (one calling thread per worker)."""
    if len(preds) != len(golds):
        raise ValueError(f"{len(preds)} predictions but {len(golds)} gold answers")
    if len(preds) <= 1:
        return [math_equal(p, g, timeout_s) for p, g in zip(preds, golds)]
    with ThreadPoolExecutor(max_workers=min(_MATH_WORKERS, len(preds))) as ex:
        return list(ex.map(lambda pg: math_equal(pg[0], pg[1], timeout_s), zip(preds, golds)))
