"""Verifiable rewards: answer extraction, math equivalence, code execution, reward functions and their containment.

RL on verifiable rewards lives or dies by the grader. Four things matter here:

1. **Extraction** (`answers`). The model's answer is the last `\\boxed{...}` (braces balanced), else an
   "answer is X" / "Answer: X" line, else a GSM8K `#### X` line. When the completion has a
   `</think>` only the text after the last one is the answer.
2. **Equivalence** (`mathcheck`). `math_equal` asks `math-verify` (sympy) whether two answers are the
   same mathematical object (`\\frac{1}{2}` = `0.5`), in worker processes (`workers`) with a time limit
   that works from any thread; trivially equal strings and plain integers are decided in-process.
3. **Execution** (`code`). Code answers are run against the row's tests (MBPP, HumanEval or stdin/stdout
   cases), each program its own process (forked from a small, clean server) with memory, CPU, output
   and time limits.
4. **Containment** (here). A reward function that raises, returns garbage or hangs must not kill a long
   RL run: `RewardSet.score` gives the affected samples 0, counts a warning (logged once per kind)
   and goes on. User reward functions named by import path run in their own worker process with a
   time limit, so a hang costs one timeout, not the run.

Every reward function has one signature: `fn(prompts, completions, rows) -> list[float]`, where each
row is the dataset row of that sample (`answer` or tests, maybe `task`, `prompt`, `solution`, `meta`).
"""

from __future__ import annotations

import collections
import importlib
import importlib.util
import logging
import math
import os
import re
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanoseek.rewards.answers import (
    answer_region,
    extract_answer,
    extract_boxed,
    gsm8k_equal,
    parse_gsm8k_number,
)
from nanoseek.rewards.code import check_code, check_code_many, code_tests, extract_code, has_code_tests
from nanoseek.rewards.mathcheck import (
    MathVerifyStats,
    configure_math_verify,
    math_equal,
    math_equal_many,
    math_verify_stats,
    reset_math_verify_stats,
)
from nanoseek.rewards.workers import (
    WorkerDied,
    WorkerError,
    WorkerInputError,
    WorkerStartError,
    WorkerTimeout,
    _WorkerPool,
    shutdown_workers,
)

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
    "check_code",
    "check_code_many",
    "code_reward",
    "code_tests",
    "configure_math_verify",
    "extract_answer",
    "extract_boxed",
    "extract_code",
    "format_reward",
    "gsm8k_equal",
    "has_code_tests",
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


def code_reward(prompts: list[str], completions: list[str], rows: list[dict]) -> list[float]:
    """1.0 when the completion's last Python code block passes every test of its row (run in a
    subprocess with limits: `nanoseek.rewards.code`), else 0.0."""
    _check_batch(prompts, completions, rows)
    return [float(result.passed) for result in check_code_many(completions, rows)]


BUILTIN_REWARDS: dict[str, RewardFn] = {
    "math": math_reward,
    "format": format_reward,
    "task": task_reward,
    "code": code_reward,
}


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
