"""Verifiable rewards: answer extraction, math equivalence, reward functions and their containment.

RL on verifiable rewards lives or dies by the grader. Three things matter here:

1. **Extraction.** The model's answer is the last `\\boxed{...}` (braces balanced), else an
   "answer is X" / "Answer: X" line, else a GSM8K `#### X` line. When the completion has a
   `</think>` only the text after the last one is the answer.
2. **Equivalence.** `math_equal` asks `math-verify` (sympy) whether two answers are the same
   mathematical object (`\\frac{1}{2}` = `0.5`, `(3, \\pi/2)` = `\\left( 3, \\frac{\\pi}{2} \\right)`).
   math-verify's own timeouts use `signal.alarm`, which only works in the main thread, and the RL loop
   grades from worker threads; and some inputs (`9^{9^{9}}`) make sympy run forever. So math-verify
   runs with its timeouts off in a small pool of persistent worker *processes*, and a call that
   exceeds its time limit kills and restarts its worker and counts as wrong. Trivially equal strings
   and plain integers are decided in-process without a round trip.
3. **Containment.** A reward function that raises, returns garbage or hangs must not kill a long
   RL run: `RewardSet.score` gives the affected samples 0, counts a warning (logged once per kind)
   and goes on. User reward functions named by import path run in their own worker process with a
   time limit, so a hang costs one timeout, not the run.

Every reward function has one signature: `fn(prompts, completions, rows) -> list[float]`, where each
row is the dataset row of that sample (at least `answer`, maybe `task`, `prompt`, `solution`, `meta`).
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import functools
import importlib
import importlib.util
import logging
import math
import os
import pickle
import queue
import re
import selectors
import signal
import struct
import subprocess
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields, replace
from fractions import Fraction
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

RewardFn = Callable[[list[str], list[str], list[dict]], list[float]]

__all__ = [
    "MathVerifyStats",
    "RewardFn",
    "RewardLoadError",
    "RewardResult",
    "RewardSet",
    "RewardTerm",
    "answer_region",
    "configure_math_verify",
    "extract_answer",
    "extract_boxed",
    "format_reward",
    "gsm8k_equal",
    "load_reward_fn",
    "math_equal",
    "math_equal_many",
    "math_reward",
    "math_verify_stats",
    "parse_gsm8k_number",
    "reset_math_verify_stats",
    "shutdown_workers",
    "task_reward",
]

# --------------------------------------------------------------------------------------------------
# Answer extraction
# --------------------------------------------------------------------------------------------------

_BOX_START = re.compile(r"\\(?:boxed|fbox)\s*\{")


def _closing_brace(text: str, start: int) -> int | None:
    """Index of the `}` closing the group whose content starts at `start`; None if it never closes.

    `\\{` and `\\}` are escaped (literal) braces and do not count, so `\\boxed{\\{1, 2\\}}` works.
    """
    depth = 1
    i = start
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "\\":
            i += 2  # skip the escaped character (`\{`, `\}`, `\\`)
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def extract_boxed(text: str | None) -> str | None:
    """The content of the LAST `\\boxed{...}` or `\\fbox{...}`, matching balanced braces.

    If the last box never closes (a generation cut off mid-answer) the result is None rather than an
    earlier box: an answer the model was in the middle of replacing is not its answer.
    """
    if not text:
        return None
    last = None
    for m in _BOX_START.finditer(text):
        last = m
    if last is None:
        return None
    end = _closing_brace(text, last.end())
    return None if end is None else text[last.end() : end]


_ANSWER_IS = re.compile(r"\banswer\b\s*(?:is\b\s*:?|:)[ \t*]*(?P<ans>[^\n]+)", re.IGNORECASE)
_GSM8K_MARK = re.compile(r"####[ \t]*(?P<ans>[^\n]+)")
_SENTENCE_END = re.compile(r"\.\s")


def _clean_inline_answer(text: str) -> str:
    """Trim an answer taken from running text: markdown bold, math delimiters, the final full stop."""
    s = text.strip()
    cut = _SENTENCE_END.search(s)  # "The answer is 3.5. So ..." -> "3.5." (the sentence, not the paragraph)
    if cut:
        s = s[: cut.start() + 1]
    s = s.strip().strip("*").strip()
    s = s.rstrip(".").strip()
    return _strip_math_delimiters(s)


def _strip_math_delimiters(s: str) -> str:
    s = s.strip()
    changed = True
    while changed and s:
        changed = False
        for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
            if len(s) >= len(left) + len(right) and s.startswith(left) and s.endswith(right):
                s = s[len(left) : len(s) - len(right)].strip()
                changed = True
                break
    return s


def answer_region(completion: str) -> str:
    """The part of a completion that holds the answer: after the last `</think>` if there is one."""
    _head, sep, tail = completion.rpartition("</think>")
    return tail if sep else completion


def extract_answer(text: str | None) -> str | None:
    """The model's final answer: the last boxed; else the last "answer is X"/"Answer: X"; else `#### X`.

    Returns a stripped string, or None when the text contains no recognisable answer.
    """
    if not text:
        return None
    boxed = extract_boxed(text)
    if boxed is not None and boxed.strip():
        return boxed.strip()
    for pattern in (_ANSWER_IS, _GSM8K_MARK):
        matches = list(pattern.finditer(text))
        for m in reversed(matches):
            ans = _clean_inline_answer(m.group("ans"))
            if ans:
                return ans
    return None


# --------------------------------------------------------------------------------------------------
# GSM8K numeric equality
# --------------------------------------------------------------------------------------------------

_GSM_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:\s*/\s*\d+(?:\.\d*)?)?")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_LATEX_FRAC = re.compile(r"\\[dt]?frac\s*\{\s*([^{}]+?)\s*\}\s*\{\s*([^{}]+?)\s*\}")
_LATEX_TEXT = re.compile(r"\\(?:text|textbf|mathrm|mbox)\s*\{([^{}]*)\}")


def parse_gsm8k_number(text: str | None) -> Fraction | None:
    """The exact number in a GSM8K-style answer ("$1,234.50", "18 dollars", "-3", "3/4", "25%").

    Dollar signs, thousands separators, LaTeX spacing, a trailing full stop and trailing units are
    dropped. Anything else that carries a second number ("18 or 19") is not a single answer: None.
    """
    if text is None:
        return None
    s = text.strip()
    if "####" in s:
        s = s.rsplit("####", 1)[1]
    boxed = extract_boxed(s)
    if boxed is not None:
        s = boxed
    s = s.replace("\u2212", "-").replace("\\$", "").replace("$", "")
    s = s.replace("{,}", ",").replace("\\!", "").replace("\\,", "").replace("\\ ", " ")
    s = s.replace("\\%", "").replace("%", "")
    s = _LATEX_TEXT.sub(r" \1", s)
    s = _LATEX_FRAC.sub(r"(\1)/(\2)", s).replace("(", "").replace(")", "")
    s = _THOUSANDS.sub("", s).strip().lstrip("=").strip()
    m = _GSM_NUMBER.match(s)
    if not m:
        return None
    rest = s[m.end() :].strip().rstrip(".")
    if any(ch.isdigit() for ch in rest):
        return None
    num = m.group(0).replace(" ", "")
    try:
        if "/" in num:
            a, b = num.split("/")
            return Fraction(a) / Fraction(b)
        return Fraction(num)
    except (ValueError, ZeroDivisionError):
        return None


def gsm8k_equal(pred: str | None, gold: str | None) -> bool:
    """Exact numeric equality of two GSM8K answers (`18`, `$18.00` and `18 dollars` are all 18)."""
    a, b = parse_gsm8k_number(pred), parse_gsm8k_number(gold)
    return a is not None and b is not None and a == b


# --------------------------------------------------------------------------------------------------
# Worker processes: a time limit that works from any thread
# --------------------------------------------------------------------------------------------------
#
# A worker is `python -c "...; _worker_main()"` talking length-prefixed pickles over its stdin and
# stdout. We use a plain subprocess rather than multiprocessing so that the parent's `__main__` is
# never re-imported (a script without an `if __name__ == "__main__"` guard would recurse) and so that a
# worker is a fresh interpreter no matter how the parent was started. The worker moves the protocol
# to private file descriptors and points fd 1 at stderr, so a reward function that prints cannot
# corrupt the channel.

_FRAME = struct.Struct("<Q")
_PKG_ROOT = str(Path(__file__).resolve().parent.parent)
_BOOT = "from nanoseek.rewards import _worker_main; _worker_main()"


class WorkerTimeout(Exception):
    """The worker did not answer within the time limit (it has been killed)."""


class WorkerDied(Exception):
    """The worker process exited or its pipe broke (it has been replaced)."""


class WorkerError(Exception):
    """The code running in the worker raised; `kind` is the exception's type name."""

    def __init__(self, kind: str, message: str, tb: str = ""):
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message
        self.tb = tb


class WorkerInputError(Exception):
    """The request could not be pickled for the worker (e.g. a row holds an open file)."""


class WorkerStartError(RuntimeError):
    """A worker could not start (its preload failed or it did not get ready in time)."""


def _dumps(obj: Any) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def _write_frame(stream: Any, data: bytes) -> None:
    stream.write(_FRAME.pack(len(data)))
    stream.write(data)
    stream.flush()


def _read_frame_blocking(stream: Any) -> bytes:
    """Child side: read one frame's bytes; exit quietly when the parent has gone away (EOF)."""

    def exact(n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = stream.read(n - len(buf))
            if not chunk:
                os._exit(0)
            buf += chunk
        return bytes(buf)

    (size,) = _FRAME.unpack(exact(_FRAME.size))
    return exact(size)


class _Worker:
    """One worker subprocess seen from the parent. Used by one thread at a time (the pool ensures it)."""

    def __init__(self, role: str, target: str | None):
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PKG_ROOT, env.get("PYTHONPATH", "")) if p)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _BOOT],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            start_new_session=True,  # its own process group: a kill also reaches anything it spawned
        )
        self._fd = self.proc.stdout.fileno()
        self._selector = selectors.DefaultSelector()  # epoll/kqueue: no FD_SETSIZE limit, unlike select()
        self._selector.register(self._fd, selectors.EVENT_READ)
        self.ready = False
        init = {"role": role, "target": target, "sys_path": [p for p in sys.path if isinstance(p, str)]}
        try:
            _write_frame(self.proc.stdin, _dumps(init))
        except OSError:
            pass  # it died at once; ensure_ready reports it

    def _read_exact(self, n: int, deadline: float) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._selector.select(remaining):
                raise WorkerTimeout
            chunk = os.read(self._fd, min(n - len(buf), 1 << 20))
            if not chunk:
                raise WorkerDied(f"worker exited with code {self.proc.poll()}")
            buf += chunk
        return bytes(buf)

    def _recv(self, timeout_s: float) -> Any:
        deadline = time.monotonic() + timeout_s
        (size,) = _FRAME.unpack(self._read_exact(_FRAME.size, deadline))
        return pickle.loads(self._read_exact(size, deadline))

    def ensure_ready(self, timeout_s: float) -> None:
        if self.ready:
            return
        try:
            status, payload = self._recv(timeout_s)
        except WorkerTimeout:
            raise WorkerStartError(f"worker not ready after {timeout_s:.0f} s") from None
        except WorkerDied as e:
            raise WorkerStartError(str(e)) from None
        if status != "ready":
            kind, message, _tb = payload
            raise WorkerStartError(f"{kind}: {message}")
        self.ready = True

    def request(self, data: bytes, timeout_s: float) -> Any:
        """Send a pickled (op, args) request and wait up to timeout_s for the reply."""
        try:
            _write_frame(self.proc.stdin, data)
        except (OSError, ValueError) as e:  # broken pipe, or stdin closed
            raise WorkerDied(f"cannot write to worker: {e}") from None
        status, payload = self._recv(timeout_s)
        if status == "ok":
            return payload
        raise WorkerError(*payload)

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            self.proc.kill()
        with contextlib.suppress(Exception):
            self.proc.wait(timeout=5)
        with contextlib.suppress(Exception):
            self._selector.close()
        for stream in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(Exception):
                stream.close()


_ALL_POOLS: weakref.WeakSet[_WorkerPool] = weakref.WeakSet()


class _WorkerPool:
    """Up to `size` workers of one role, started lazily, handed to one calling thread at a time.

    A request that times out, or whose worker dies, kills that worker and starts a replacement at
    once (its startup overlaps whatever the caller does next). The time limit covers the request
    only: waiting for a free worker, or for a fresh one to finish importing, does not count.
    """

    def __init__(self, role: str, target: str | None, size: int, start_timeout_s: float = 120.0):
        if size < 1:
            raise ValueError(f"worker pool size must be >= 1, got {size}")
        self.role, self.target, self.size = role, target, size
        self.start_timeout_s = start_timeout_s
        self.restarts = 0
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        self._busy: set[_Worker] = set()
        self._created = 0
        self._lock = threading.Lock()
        self._closed = False
        self.pid = os.getpid()
        _ALL_POOLS.add(self)

    def _checkout(self) -> _Worker:
        with self._lock:
            if self._closed:
                raise RuntimeError("worker pool is closed")
            try:
                worker = self._idle.get_nowait()
            except queue.Empty:
                worker = None
                if self._created < self.size:
                    self._created += 1
                    worker = _Worker(self.role, self.target)
            if worker is not None:
                self._busy.add(worker)
                return worker
        while True:  # all workers busy: wait for one, but notice a pool closed meanwhile
            try:
                worker = self._idle.get(timeout=1.0)
                break
            except queue.Empty:
                if self._closed:
                    raise RuntimeError("worker pool is closed") from None
        with self._lock:
            self._busy.add(worker)
        return worker

    def _checkin(self, worker: _Worker) -> None:
        with self._lock:
            self._busy.discard(worker)
            if self._closed:
                worker.kill()
                return
        self._idle.put(worker)

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        with self._lock:
            self._busy.discard(worker)
            self.restarts += 1
            if self._closed:
                return
        self._idle.put(_Worker(self.role, self.target))

    def run(self, op: str, args: tuple, timeout_s: float) -> Any:
        """Run `op(*args)` in a worker; raises WorkerTimeout, WorkerDied, WorkerError, WorkerInputError
        or WorkerStartError."""
        try:
            data = _dumps((op, args))
        except Exception as e:
            raise WorkerInputError(f"cannot send the arguments to a worker process: {type(e).__name__}: {e}") from None
        worker = self._checkout()
        try:
            worker.ensure_ready(self.start_timeout_s)
            result = worker.request(data, timeout_s)
        except WorkerError:
            self._checkin(worker)
            raise
        except BaseException:
            self._replace(worker)
            raise
        self._checkin(worker)
        return result

    def close(self) -> None:
        with self._lock:
            self._closed = True
            busy = list(self._busy)
        while True:
            try:
                self._idle.get_nowait().kill()
            except queue.Empty:
                break
        for worker in busy:
            worker.kill()


def shutdown_workers() -> None:
    """Kill every worker process this process started (also runs at interpreter exit)."""
    global _MATH_POOL
    for pool in list(_ALL_POOLS):
        if pool.pid == os.getpid():
            pool.close()
    _MATH_POOL = None


atexit.register(shutdown_workers)


# ---- child side ----------------------------------------------------------------------------------


def _orphan_watchdog(parent_pid: int) -> None:
    """Exit when the parent dies, even while the main thread is stuck in a hung computation."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os._exit(0)


def _worker_main() -> None:
    """Entry point of a worker process (see _Worker). Serves requests until its stdin closes."""
    proto_in = os.fdopen(os.dup(0), "rb")
    proto_out = os.fdopen(os.dup(1), "wb")
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)  # user code reading stdin must not eat the protocol
    os.dup2(2, 1)  # prints go to stderr, not into the protocol
    threading.Thread(target=_orphan_watchdog, args=(os.getppid(),), daemon=True).start()

    init = pickle.loads(_read_frame_blocking(proto_in))
    sys.path[:] = init["sys_path"]
    fn: Callable[..., Any] | None = None
    try:
        if init["role"] == "math":
            _mv_warmup()
        elif init["role"] == "call":
            fn = load_reward_fn(init["target"])
    except BaseException as e:
        _write_frame(proto_out, _dumps(("error", (type(e).__name__, str(e), traceback.format_exc()))))
        return
    _write_frame(proto_out, _dumps(("ready", None)))

    while True:
        request = _read_frame_blocking(proto_in)
        try:
            op, args = pickle.loads(request)
            if op == "math_equal":
                result: Any = _mv_equal(*args)
            elif op == "call":
                result = fn(*args)  # type: ignore[misc]
            else:
                raise ValueError(f"unknown worker op {op!r}")
            reply = _dumps(("ok", result))  # a result that cannot be sent back is the function's error
        except BaseException as e:
            reply = _dumps(("error", (type(e).__name__, str(e)[:2000], traceback.format_exc()[-4000:])))
        _write_frame(proto_out, reply)


# --------------------------------------------------------------------------------------------------
# math_equal
# --------------------------------------------------------------------------------------------------


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
_MATH_POOL: _WorkerPool | None = None
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


def _math_pool() -> _WorkerPool:
    global _MATH_POOL
    with _MATH_POOL_LOCK:
        if _MATH_POOL is None or _MATH_POOL.pid != os.getpid():  # a forked child must not share pipes
            _MATH_POOL = _WorkerPool("math", None, _MATH_WORKERS)
        return _MATH_POOL


_LATEX_SPACING = re.compile(r"\\left(?![a-zA-Z])|\\right(?![a-zA-Z])|\\[!,;:](?![a-zA-Z])|\\ ")
_INTEGER = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+|[+-]?\d+")


def _fast_equal(pred: str, gold: str) -> bool | None:
    """True/False when the answers are decidable without sympy; None to ask math-verify.

    Identical after dropping spacing and `\\left`/`\\right` means equal. Two plain integers (thousands
    separators allowed, but no spaces: "1, 234" may be a list) are compared as integers.
    """
    p = _strip_math_delimiters(pred).rstrip(".").strip()
    g = _strip_math_delimiters(gold).rstrip(".").strip()
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
    if pred is None or gold is None:
        _count("unparseable_pred" if pred is None else "unparseable_gold")
        return False
    pred, gold = str(pred), str(gold)
    fast = _fast_equal(pred, gold) if fast_path else None
    if fast is not None:
        with _STATS_LOCK:
            _STATS.calls += 1
            _STATS.fast_path += 1
            _STATS.equal += fast
            _STATS.unequal += not fast
        return fast

    key = (_strip_math_delimiters(pred).strip(), _strip_math_delimiters(gold).strip())
    with _STATS_LOCK:
        outcome = _RESULT_CACHE.get(key) if fast_path else None
        if outcome is not None:
            _RESULT_CACHE.move_to_end(key)
    if outcome is not None:
        _count(outcome, cached=True)
        return outcome == "equal"

    try:
        outcome = _math_pool().run("math_equal", key, timeout_s)
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
    return outcome == "equal"


def math_equal_many(preds: Sequence[str | None], golds: Sequence[str | None], timeout_s: float = 5.0) -> list[bool]:
    """math_equal over pairs, using all math workers in parallel (one calling thread per worker)."""
    if len(preds) != len(golds):
        raise ValueError(f"{len(preds)} predictions but {len(golds)} gold answers")
    if len(preds) <= 1:
        return [math_equal(p, g, timeout_s) for p, g in zip(preds, golds)]
    with ThreadPoolExecutor(max_workers=min(_MATH_WORKERS, len(preds))) as ex:
        return list(ex.map(lambda pg: math_equal(pg[0], pg[1], timeout_s), zip(preds, golds)))


# --------------------------------------------------------------------------------------------------
# Built-in reward functions
# --------------------------------------------------------------------------------------------------


def _check_batch(prompts: Sequence[str], completions: Sequence[str], rows: Sequence[dict]) -> None:
    if not (len(prompts) == len(completions) == len(rows)):
        raise ValueError(
            f"batch sizes differ: {len(prompts)} prompts, {len(completions)} completions, {len(rows)} rows"
        )


def math_reward(prompts: list[str], completions: list[str], rows: list[dict]) -> list[float]:
    """1.0 when the extracted answer is math_equal to row["answer"], else 0.0."""
    _check_batch(prompts, completions, rows)
    preds = [extract_answer(answer_region(c)) for c in completions]
    golds = [str(r["answer"]) for r in rows]  # a row without an answer is a bug: raise, RewardSet counts it
    return [float(ok) for ok in math_equal_many(preds, golds)]


_THINK_FORMAT = re.compile(r"\A\s*<think>(?P<think>.*?)</think>(?P<answer>.*)\Z", re.DOTALL)


def _well_formed(prompt: str, completion: str) -> bool:
    text = completion
    # Chat templates in the R1 style end the prompt with "<think>": the completion starts inside it.
    if not text.lstrip().startswith("<think>") and prompt.rstrip().endswith("<think>"):
        text = "<think>" + text
    m = _THINK_FORMAT.match(text)
    if m is None:
        return False
    think, answer = m.group("think"), m.group("answer")
    if "<think>" in think or "<think>" in answer or "</think>" in answer or not think.strip():
        return False
    boxed = extract_boxed(answer)
    return boxed is not None and bool(boxed.strip())


def format_reward(prompts: list[str], completions: list[str], rows: list[dict]) -> list[float]:
    """1.0 for `<think>reasoning</think>` followed by an answer with a non-empty `\\boxed{}`, else 0.0.

    Exactly one think block, non-empty, first; the box must be after it. If the prompt ends with
    `<think>` (the template opened the block), the completion may start inside it.
    """
    _check_batch(prompts, completions, rows)
    return [float(_well_formed(p, c)) for p, c in zip(prompts, completions)]


def task_reward(prompts: list[str], completions: list[str], rows: list[dict]) -> list[float]:
    """The reward of each row's own task verifier (`nanoseek.tasks.get_task(row["task"]).verify`)."""
    from nanoseek.tasks import get_task  # lazy: tasks is a sibling package that need not be loaded
    from nanoseek.tasks.base import Example

    _check_batch(prompts, completions, rows)
    out = []
    for prompt, completion, row in zip(prompts, completions, rows):
        example = Example(
            task=row["task"],
            prompt=row.get("prompt", prompt),
            answer=row["answer"],
            solution=row.get("solution", ""),
            meta=row.get("meta", {}),
        )
        out.append(float(get_task(row["task"]).verify(completion, example)))
    return out


BUILTIN_REWARDS: dict[str, RewardFn] = {"math": math_reward, "format": format_reward, "task": task_reward}


# --------------------------------------------------------------------------------------------------
# Loading reward functions by import path
# --------------------------------------------------------------------------------------------------


class RewardLoadError(ValueError):
    """A reward function spec could not be resolved; the message says which part failed and why."""


def _import_file(path: Path) -> Any:
    name = "nanoseek_user_reward_" + re.sub(r"\W", "_", str(path.resolve()))
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise RewardLoadError(f"cannot import {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _is_file_module(module_name: str) -> bool:
    return module_name.endswith(".py") or "/" in module_name or os.sep in module_name


def _absolute_spec(spec: str) -> str:
    """The same spec with a file path made absolute ("rewards.py:fn" -> "/abs/rewards.py:fn")."""
    module_name, sep, attr = spec.strip().rpartition(":")
    if sep and module_name and _is_file_module(module_name):
        return f"{Path(module_name).resolve()}:{attr}"
    return spec.strip()


def load_reward_fn(spec: str) -> RewardFn:
    """Resolve "pkg.module:function" (or "path/to/file.py:function", or a built-in name) to a callable.

    Errors are RewardLoadError with the spec and the reason: malformed spec, module not found, module
    failed to import, attribute missing, or attribute not callable.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise RewardLoadError(f"reward function spec must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    if spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec]
    module_name, sep, attr_path = spec.rpartition(":")
    if not sep or not module_name or not attr_path:
        raise RewardLoadError(
            f"reward function {spec!r}: expected 'package.module:function' or 'path/to/file.py:function'"
            f" (or one of the built-ins {sorted(BUILTIN_REWARDS)})"
        )
    try:
        if _is_file_module(module_name):
            path = Path(module_name)
            if not path.is_file():
                raise RewardLoadError(f"reward function {spec!r}: file {module_name!r} not found")
            module = _import_file(path)
        else:
            module = importlib.import_module(module_name)
    except RewardLoadError:
        raise
    except ModuleNotFoundError as e:
        if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise RewardLoadError(
                f"reward function {spec!r}: module {module_name!r} not found (is it installed or on "
                f"PYTHONPATH? a file works too: 'path/to/file.py:{attr_path}')"
            ) from e
        raise RewardLoadError(f"reward function {spec!r}: importing {module_name!r} failed: {e}") from e
    except Exception as e:
        raise RewardLoadError(
            f"reward function {spec!r}: importing {module_name!r} failed: {type(e).__name__}: {e}"
        ) from e
    obj: Any = module
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise RewardLoadError(f"reward function {spec!r}: {module_name!r} has no attribute {attr_path!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise RewardLoadError(f"reward function {spec!r}: {attr_path!r} is a {type(obj).__name__}, not callable")
    return obj


# --------------------------------------------------------------------------------------------------
# RewardSet: weighted reward functions with containment
# --------------------------------------------------------------------------------------------------


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
        self._pools: dict[str, _WorkerPool] = {}
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
            path = _absolute_spec(fn)  # the worker re-imports it; a relative file must not depend on cwd
            fn = load_reward_fn(path)  # fail now, with a clear message, rather than in a worker
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

    def _pool(self, term: RewardTerm) -> _WorkerPool:
        with self._lock:
            pool = self._pools.get(term.name)
            if pool is None or pool.pid != os.getpid():
                pool = self._pools[term.name] = _WorkerPool("call", term.path, 1)
            return pool

    def _call(self, term: RewardTerm, prompts: list[str], completions: list[str], rows: list[dict]) -> Any:
        """One call of the term's function; raises _TermFailure("raised:X" | "timeout" | ...)."""
        if not term.isolated:
            try:
                return term.fn(prompts, completions, rows)
            except (Exception, SystemExit) as e:
                raise _TermFailure(f"raised:{type(e).__name__}", f"{type(e).__name__}: {e}") from e
        try:
            return self._pool(term).run("call", (prompts, completions, rows), term.timeout_s)
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
        _check_batch(prompts, completions, rows)
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
