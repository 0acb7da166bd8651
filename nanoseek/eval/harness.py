"""`nanoseek eval` as a function: benchmarks -> k samples per problem -> grades -> summary and report.

    from nanoseek.eval.harness import evaluate_checkpoint
    summary = evaluate_checkpoint("runs/rl", None, ["math500_test.jsonl", "arithmetic"], "runs/eval")
    summary = evaluate_checkpoint(model, tokenizer, ["tasks"], out_dir, k=8, engine=engine)  # no reload

A run writes `summary.json`, `records.jsonl` (one line per problem: prompt, samples, extracted
answers, correctness, tokens, latency), `report.md` and `plots/` into `out_dir`.

**Benchmarks.** A spec is a file (.jsonl, .json, .parquet in a layout `load_benchmark` reads:
GSM8K, MATH/MATH-500, AIME, task rows, or any other with `prompt_field`/`answer_field`) or the name
of a built-in task (`arithmetic`, `countdown`, ...; `tasks` = the mixture of all of them), whose
held-out problems (the test split, which no training text contains) are generated: `n_problems`
of them from `seed`, at the difficulty in `difficulty` ({task: {knob: value}}). `limit` keeps the
first N problems of every benchmark.

**Prompts.**
- Zero-shot (default): the chat template; the user turn is the problem followed by the instruction;
  `system` adds a system message; `think_prefill` opens the assistant turn with "<think>\\n" (unless
  the chat template already does, as R1-distilled models' do).
- `instruction`: "auto" (default) = the R1 suffix (`R1_INSTRUCTION`; `CODE_INSTRUCTION`, which asks
  for a ```python block, for code problems) for benchmark files and nothing for built-in task
  problems, generated or read from task-row files (the models trained here saw their prompts bare);
  "r1" = that suffix everywhere; "none" = nothing anywhere; any other text is appended, after a
  newline, everywhere.
- Few-shot (`few_shot=K`, for base models): plain text, no chat template: K solved problems, then
  the problem, as "Problem: ...\\nSolution: ...\\n\\n" ending in "Solution:"; generation stops at the
  next "\\nProblem:". The examples come from the same file (never the evaluated problem; its
  `solution` field, GSM8K's worked answer, or else just the boxed answer) or from the task's
  train split, and are the same for every problem (a seeded draw).

**Grading** is `benchmarks.grade`: math-verify for MATH/AIME, numeric equality for GSM8K, the task's
verifier for tasks, the problem's tests (run in a subprocess with limits) for code. Each sample gets
a status: correct, wrong, no_answer (nothing extractable: for code, no ```python block),
unparseable (math-verify cannot read the answer: wrong), grader_error (math-verify timed out or
failed: wrong), bad_gold, or error (the engine refused the request, e.g. a prompt longer than the context).

**Metrics** (`nanoseek.eval.metrics`): pass@1 averaged over the k samples, unbiased pass@k for
k in 1, 2, 4, ..., K, cons@k (majority vote of the first k), each with its standard error over
problems; with temperature 0 there is one (greedy) sample. Speed: generation wall time, output
tokens/s, per-problem latency (submission to its last sample's last token, queueing included:
the whole benchmark is submitted at once), time to first token, tokens per correct answer.
"""

from __future__ import annotations

import json
import math
import random
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from nanoseek.config import EvalConfig
from nanoseek.engine import Engine, SamplingParams
from nanoseek.eval.benchmarks import Problem, grade, load_benchmark
from nanoseek.eval.report import write_plots, write_report
from nanoseek.eval.runner import ProblemRecord, prompt_text, run_problems, summarize_records
from nanoseek.loading import load_for_inference
from nanoseek.rewards import Grade, extract_answer, math_verify_stats
from nanoseek.tasks import get_task, list_tasks
from nanoseek.tasks.corpus import task_mixture

__all__ = [
    "R1_INSTRUCTION",
    "Bench",
    "EvalConfig",
    "build_engine",
    "evaluate",
    "evaluate_checkpoint",
    "load_bench",
]

R1_INSTRUCTION = "\nPlease reason step by step, and put your final answer within \\boxed{}."
CODE_INSTRUCTION = "\nPlease reason step by step, then write your final solution in a ```python code block."
THINK_PREFILL = "<think>\n"
FEW_SHOT_STOP = "\nProblem:"
TASK_MIXTURE = "tasks"
BENCH_SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclass
class Bench:
    """One benchmark: its problems, where they came from, and the pool few-shot examples come from."""

    name: str
    source: str
    """The file, or "task:<name>" / "tasks" for generated problems."""
    problems: list[Problem]
    is_task: bool
    """Generated from the built-in tasks."""
    pool: list[Problem] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- benchmarks
def _task_problem(example: Any, ident: str) -> Problem:
    return Problem(ident, example.prompt, example.answer, f"task:{example.task}", example.to_dict())


def load_bench(spec: str, cfg: EvalConfig) -> Bench:
    """A benchmark file, a built-in task's held-out split, or "tasks" (the mixture of all tasks)."""
    path = Path(spec)
    if path.is_file() or path.suffix.lower() in BENCH_SUFFIXES:
        problems = load_benchmark(path, cfg.prompt_field, cfg.answer_field, skip_bad=cfg.skip_bad)
        chosen = list(problems)[: cfg.limit] if cfg.limit else list(problems)
        return Bench(path.stem, str(path), chosen, False, pool=list(problems), skipped=list(problems.skipped))
    n = min(cfg.n_problems, cfg.limit or cfg.n_problems)
    if spec == TASK_MIXTURE:
        examples = task_mixture(n, split="test", seed=cfg.seed, difficulty=cfg.difficulty)
        names = list_tasks()
    elif spec in list_tasks():
        examples = get_task(spec).generate(n, split="test", seed=cfg.seed, unique=True, **cfg.difficulty.get(spec, {}))
        names = [spec]
    else:
        raise ValueError(
            f"--bench {spec!r}: not a benchmark file ({', '.join(BENCH_SUFFIXES)}) nor a built-in task "
            f"({', '.join(list_tasks())}, or {TASK_MIXTURE!r} for all of them)"
        )
    problems = [_task_problem(e, f"{e.task}-{i}") for i, e in enumerate(examples)]
    pool = []
    if cfg.few_shot:  # solved examples from the train split: never a held-out problem
        for name in names:
            shots = get_task(name).generate(cfg.few_shot, split="train", seed=cfg.seed, **cfg.difficulty.get(name, {}))
            pool += [_task_problem(e, f"{name}-train-{i}") for i, e in enumerate(shots)]
    source = TASK_MIXTURE if spec == TASK_MIXTURE else f"task:{spec}"
    return Bench(spec, source, problems, True, pool=pool)


def _group(bench: Bench, problem: Problem) -> str:
    """What a problem is reported under: its task for task rows (so a mixture splits by task), else the bench."""
    return problem.kind.split(":", 1)[1] if problem.kind.startswith("task:") else bench.name


# ----------------------------------------------------------------------------- prompts
def _instruction(problem: Problem, cfg: EvalConfig) -> str:
    mode = cfg.instruction
    if mode == "auto":
        if problem.kind.startswith("task:") or cfg.few_shot:
            return ""
        return CODE_INSTRUCTION if problem.kind == "code" else R1_INSTRUCTION
    if mode == "r1":
        return CODE_INSTRUCTION if problem.kind == "code" else R1_INSTRUCTION
    if mode == "none":
        return ""
    return "\n" + mode


_GSM8K_CALC = re.compile(r"<<[^<>]*>>")


def solution_text(problem: Problem) -> str:
    """A worked solution for a few-shot example, ending in an answer the graders extract."""
    row = problem.row or {}
    if problem.kind == "code":
        if not problem.answer.strip():
            raise ValueError(f"problem {problem.id}: a few-shot code example needs a reference solution")
        return f"```python\n{problem.answer.strip()}\n```"
    if problem.kind == "gsm8k":
        solution = _GSM8K_CALC.sub("", str(row.get("answer", "")))  # drop the calculator annotations
    else:
        solution = str(row.get("solution") or "")
    solution = solution.strip()
    if extract_answer(solution) is None:
        solution = (solution + "\n" if solution else "") + f"The final answer is $\\boxed{{{problem.answer}}}$."
    return solution


def _few_shot_examples(bench: Bench, cfg: EvalConfig) -> dict[str, list[Problem]]:
    """Per problem kind, K + 1 candidate examples in a seeded order (one spare for the evaluated problem)."""
    order = list(bench.pool)
    random.Random(f"few-shot:{bench.name}:{cfg.seed}").shuffle(order)
    by_kind: dict[str, list[Problem]] = {}
    for p in order:
        if len(by_kind.setdefault(p.kind, [])) <= cfg.few_shot:
            by_kind[p.kind].append(p)
    return by_kind


def render_prompts(bench: Bench, tokenizer: Any, cfg: EvalConfig) -> list[str]:
    """The prompt text of every problem (without the think prefill)."""
    if not cfg.few_shot:
        if getattr(tokenizer, "chat_template", "") is None:
            raise ValueError("the tokenizer has no chat template: for a base model use few-shot prompts (--few-shot K)")
        return [
            prompt_text(tokenizer, p.prompt + _instruction(p, cfg), chat=True, system=cfg.system)
            for p in bench.problems
        ]
    candidates = _few_shot_examples(bench, cfg)
    texts = []
    for p in bench.problems:
        shots = [s for s in candidates.get(p.kind, []) if s is not p and s.prompt != p.prompt][: cfg.few_shot]
        if len(shots) < cfg.few_shot:
            raise ValueError(
                f"{bench.source}: {cfg.few_shot}-shot prompts need {cfg.few_shot} other solved problems "
                f"of the same kind ({p.kind}); found {len(shots)}"
            )
        suffix = _instruction(p, cfg)  # shots are of p's kind: the same instruction
        head = "".join(f"Problem: {s.prompt}{suffix}\nSolution: {solution_text(s)}\n\n" for s in shots)
        texts.append(f"{head}Problem: {p.prompt}{suffix}\nSolution:")
    return texts


# ----------------------------------------------------------------------------- grading
def _grade_with_status(row: dict[str, Any], completion: str) -> Grade:
    """benchmarks.grade of the row's problem: right or wrong, the answer read, and why (`Grade.status`)."""
    return grade(row["problem"], completion)


# ----------------------------------------------------------------------------- statistics
def _percentile(values: Sequence[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None for no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _mean(values: Sequence[float]) -> float | None:
    return math.fsum(values) / len(values) if values else None


def speed_stats(records: Sequence[ProblemRecord], wall_s: float) -> dict[str, Any]:
    samples = [s for r in records for s in r.samples if s.finish_reason != "error"]
    tokens = sum(s.tokens for s in samples)
    correct = sum(s.correct for s in samples)
    latency = [max(s.latency_s for s in r.samples) for r in records if r.samples]
    ttft = [s.ttft_s for s in samples]
    return {
        "wall_s": wall_s,
        "output_tokens": tokens,
        "tokens_per_s": tokens / wall_s if wall_s > 0 else None,
        "latency_mean_s": _mean(latency),
        "latency_p50_s": _percentile(latency, 50),
        "latency_p90_s": _percentile(latency, 90),
        "ttft_mean_s": _mean(ttft),
        "ttft_p50_s": _percentile(ttft, 50),
        "tokens_per_correct": tokens / correct if correct else None,
        "mean_response_tokens": _mean([s.tokens for s in samples]),
        "truncated_frac": _mean([float(s.finish_reason == "length") for s in samples]),
    }


def grading_stats(records: Sequence[ProblemRecord], bench: Bench) -> dict[str, Any]:
    statuses = [s.status for r in records for s in r.samples]
    out: dict[str, Any] = {"samples": len(statuses)}
    for status in ("correct", "wrong", "no_answer", "unparseable", "grader_error", "bad_gold", "error"):
        out[status] = statuses.count(status)
    out["skipped_rows"] = len(bench.skipped)
    return out


def _ks(k: int) -> list[int]:
    """1, 2, 4, ... up to k, and k itself."""
    ks = [2**i for i in range(k.bit_length()) if 2**i <= k]
    return sorted({*ks, k})


# ----------------------------------------------------------------------------- the run
def evaluate_bench(engine: Any, tokenizer: Any, bench: Bench, cfg: EvalConfig) -> tuple[dict, list[dict], list[int]]:
    """(summary entry, records.jsonl lines, response lengths) for one benchmark."""
    texts = render_prompts(bench, tokenizer, cfg)
    rows = [
        {"id": p.id, "prompt": p.prompt, "answer": p.answer, "group": _group(bench, p), "problem": p}
        for p in bench.problems
    ]
    n = cfg.samples
    params = SamplingParams.from_config(cfg, n=n, stop_strings=[*cfg.stop, *([FEW_SHOT_STOP] if cfg.few_shot else [])])
    # A template that already opens the think block (R1-distilled models) gets no second "<think>".
    opened = all(t.rstrip().endswith("<think>") for t in texts)
    prefill = THINK_PREFILL if cfg.think_prefill and not opened else ""
    mv_before = math_verify_stats()
    t0 = time.perf_counter()
    records, wall = run_problems(engine, tokenizer, rows, _grade_with_status, params, prefill=prefill, texts=texts)
    grade_s = time.perf_counter() - t0 - wall
    mv_after = math_verify_stats()
    math_verify = {f.name: getattr(mv_after, f.name) - getattr(mv_before, f.name) for f in fields(mv_after)}
    ks = _ks(n)
    by_group = summarize_records(records, ks)
    entry = {
        "source": bench.source,
        "problems": len(records),
        "samples_per_problem": n,
        "ks": ks,
        "metrics": by_group["all"],
        "groups": {g: v for g, v in by_group.items() if g != "all"},
        "grading": {**grading_stats(records, bench), "math_verify": math_verify},
        "speed": {**speed_stats(records, wall), "grade_s": grade_s},
        "skipped": bench.skipped[:20],
    }
    lines = []
    for rec, text in zip(records, texts):
        lines.append(
            {
                "bench": bench.name,
                "id": rec.id,
                "group": rec.group,
                "problem": rec.prompt,
                "prompt": text + prefill,
                "gold": rec.gold,
                "n_correct": sum(s.correct for s in rec.samples),
                "latency_s": max((s.latency_s for s in rec.samples), default=0.0),
                "samples": [asdict(s) for s in rec.samples],
            }
        )
    lengths = [s.tokens for r in records for s in r.samples if s.finish_reason != "error"]
    return entry, lines, lengths


def _json_safe(x: Any) -> Any:
    """NaN/inf (a standard error of one problem) as null: summary.json stays standard JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    return x


def _unique_names(benches: list[Bench]) -> None:
    seen: dict[str, int] = {}
    for b in benches:
        seen[b.name] = seen.get(b.name, 0) + 1
        if seen[b.name] > 1:
            b.name = f"{b.name}-{seen[b.name]}"


def evaluate(
    engine: Any, tokenizer: Any, benches: Sequence[str | Bench], out_dir: str | Path, cfg: EvalConfig, model: str = ""
) -> dict[str, Any]:
    """Evaluate every benchmark with `engine` and write summary.json, records.jsonl, report.md, plots/."""
    cfg.check()
    loaded = [b if isinstance(b, Bench) else load_bench(b, cfg) for b in benches]
    if not loaded:
        raise ValueError("no benchmarks to evaluate")
    _unique_names(loaded)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in ("benches", "plots", "quiet")}
    settings["samples"] = cfg.samples
    summary: dict[str, Any] = {
        "model": model,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "settings": settings,
        "benchmarks": {},
    }
    if isinstance(engine, Engine):  # what the accuracies were measured in: bf16 and float32 can differ
        summary["precision"] = {
            "weights": str(engine.model.output_weight.dtype).removeprefix("torch."),
            "kv_cache": str(engine.kv_dtype).removeprefix("torch."),
            "device": engine.device.type,
        }
    lengths: dict[str, list[int]] = {}
    t0 = time.perf_counter()
    with open(out_dir / "records.jsonl", "w", encoding="utf-8") as f:
        for bench in loaded:
            entry, lines, lengths[bench.name] = evaluate_bench(engine, tokenizer, bench, cfg)
            summary["benchmarks"][bench.name] = _json_safe(entry)
            for line in lines:
                f.write(json.dumps(_json_safe(line), ensure_ascii=False) + "\n")
            if entry["grading"]["error"]:
                print(
                    f"warning: {bench.name}: {entry['grading']['error']} samples failed in the engine (a prompt "
                    "longer than the context?); they count as wrong",
                    file=sys.stderr,
                )
            if not cfg.quiet:
                m = entry["metrics"]
                print(
                    f"{bench.name}: {entry['problems']} problems, pass@1 {100 * m['pass@1']:.1f}%"
                    f" ({entry['speed']['wall_s']:.1f} s)",
                    file=sys.stderr,
                )
    summary["wall_s"] = time.perf_counter() - t0
    if cfg.plots:
        summary["plots"] = [str(p.relative_to(out_dir)) for p in write_plots(out_dir, summary, lengths)]
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    write_report(out_dir, summary)
    return summary


def build_engine(
    model: Any, tokenizer: Any, benches: Sequence[Bench], cfg: EvalConfig, max_seq_len: int | None = None, **kwargs: Any
) -> Any:
    """An Engine whose sequences are as long as these benchmarks need (the longest prompt + max_new_tokens,
    at most the model's context), so a long-context model does not reserve KV memory it never uses."""
    if max_seq_len is None:
        longest = max(len(tokenizer.encode(t)) for b in benches for t in render_prompts(b, tokenizer, cfg))
        max_seq_len = min(model.cfg.max_seq_len, longest + cfg.max_new_tokens + 16)  # 16: the think prefill
    engine = Engine(model, tokenizer, max_batch=max(cfg.max_batch, cfg.samples), max_seq_len=max_seq_len, **kwargs)
    if engine.n_slots < cfg.samples:
        raise ValueError(
            f"the KV cache holds {engine.n_slots} sequences of {max_seq_len} tokens, fewer than the {cfg.samples} "
            "samples of a problem: lower max_new_tokens or k, or give the cache more memory"
        )
    return engine


def evaluate_checkpoint(
    model_or_checkpoint: Any,
    tokenizer: Any,
    benches: Sequence[str],
    out_dir: str | Path,
    *,
    engine: Any = None,
    device: str = "auto",
    **options: Any,
) -> dict[str, Any]:
    """Evaluate a model (a checkpoint/run/HF directory, or a loaded Transformer) on `benches`.

    tokenizer: None to use the checkpoint's (or the engine's). engine: an existing Engine to reuse
    (the model argument is then ignored). options: the fields of EvalConfig (k=, temperature=,
    top_p=, max_new_tokens=, n_problems=, limit=, few_shot=, instruction=, ...). Returns the summary
    (also in out_dir/summary.json).
    """
    cfg = EvalConfig(benches=list(benches), **options)
    cfg.check()
    loaded = [load_bench(b, cfg) for b in benches]  # a bad file fails before the model loads
    name = str(model_or_checkpoint) if isinstance(model_or_checkpoint, str | Path) else ""
    if engine is None:
        model = model_or_checkpoint
        if name:
            model, own_tokenizer, line = load_for_inference(name, device)
            if line:
                print(line, file=sys.stderr, flush=True)
            tokenizer = tokenizer or own_tokenizer
        if tokenizer is None:
            raise ValueError(f"{name or 'model'}: no tokenizer (pass one; a checkpoint needs a tokenizer.json)")
        engine = build_engine(model, tokenizer, loaded, cfg)
    tokenizer = tokenizer or engine.tokenizer
    return evaluate(engine, tokenizer, loaded, out_dir, cfg, model=name)
