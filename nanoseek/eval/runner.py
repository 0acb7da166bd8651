"""Generate k samples per problem with the engine, grade them, and summarise.

The one place where prompts become token ids for a model (chat template or plain),
shared by RL (rollouts and the held-out evaluation) and `nanoseek eval`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from nanoseek.eval.metrics import ProblemResult, summarize
from nanoseek.rewards import Grade


def prompt_ids(
    tokenizer: Any, prompt: str | list[dict[str, str]], chat: bool = True, system: str | None = None, prefill: str = ""
) -> list[int]:
    """Token ids of a prompt: through the chat template (with the assistant turn opened) or plain."""
    return tokenizer.encode(prompt_text(tokenizer, prompt, chat=chat, system=system, prefill=prefill))


def prompt_text(
    tokenizer: Any, prompt: str | list[dict[str, str]], chat: bool = True, system: str | None = None, prefill: str = ""
) -> str:
    """The text `prompt_ids` encodes: the rendered prompt, then the prefill."""
    if isinstance(prompt, list):
        messages = list(prompt)
    else:
        messages = [{"role": "user", "content": prompt}]
    if system and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": system}, *messages]
    if chat:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    else:
        text = "\n\n".join(m["content"] for m in messages) + "\n"
    return text + prefill


@dataclass
class SampleRecord:
    text: str
    correct: bool
    answer: str | None
    tokens: int
    finish_reason: str
    latency_s: float
    ttft_s: float
    status: str = ""
    """Why it is right or wrong (`Grade.status`: "correct", "wrong", "no_answer", "unparseable", ...; "error"
    when the engine refused the request)."""


@dataclass
class ProblemRecord:
    id: str
    prompt: str
    gold: str
    group: str
    """What the problem is reported under (a task name or the benchmark)."""
    samples: list[SampleRecord] = field(default_factory=list)

    def result(self) -> ProblemResult:
        return ProblemResult(self.id, [s.correct for s in self.samples], [s.answer for s in self.samples])


Grader = Callable[[dict[str, Any], str], Grade]
"""grade(row, completion) -> Grade: `nanoseek.rewards.grade`, or a function of the row that calls it."""


def run_problems(
    engine: Any,
    tokenizer: Any,
    rows: Sequence[dict[str, Any]],
    grade: Grader,
    params: Any,
    *,
    chat: bool = True,
    system: str | None = None,
    prefill: str = "",
    texts: Sequence[str] | None = None,
) -> tuple[list[ProblemRecord], float]:
    """rows: dicts with 'id', 'prompt', and optionally 'answer' (the gold, recorded; code rows have tests
    instead) and 'group'. Returns records and wall time.

    grade(row, completion_text) -> Grade. params.n samples per problem.
    The prompts are row['prompt'] rendered by `prompt_ids`, or `texts` (one per row, already rendered:
    chat and system are then not applied) followed by the prefill. The prefill is put back in front of
    each completion for grading.
    """
    if texts is not None:
        if len(texts) != len(rows):
            raise ValueError(f"{len(texts)} prompt texts for {len(rows)} rows")
        ids = [tokenizer.encode(t + prefill) for t in texts]
    else:
        ids = [prompt_ids(tokenizer, r["prompt"], chat=chat, system=system, prefill=prefill) for r in rows]
    t0 = time.perf_counter()
    outputs = engine.generate(ids, params)
    wall = time.perf_counter() - t0
    records = []
    for row, completions in zip(rows, outputs):
        ident, group = str(row.get("id", len(records))), str(row.get("group", "all"))
        rec = ProblemRecord(ident, str(row["prompt"]), str(row.get("answer", "")), group)
        for c in completions:
            text = c.text or ""
            graded = grade(row, prefill + text) if c.finish_reason != "error" else Grade(0.0, None, "error")
            rec.samples.append(
                SampleRecord(
                    text,
                    graded.correct,
                    graded.answer,
                    len(c.token_ids),
                    c.finish_reason,
                    c.latency_s,
                    c.ttft_s,
                    graded.status,
                )
            )
        records.append(rec)
    return records, wall


def summarize_records(records: Sequence[ProblemRecord], ks: Sequence[int] = (1,)) -> dict[str, Any]:
    """Overall and per-group pass@k / cons@k with standard errors."""
    out: dict[str, Any] = {"all": summarize([r.result() for r in records], list(ks))}
    groups = sorted({r.group for r in records})
    if len(groups) > 1:
        for g in groups:
            out[g] = summarize([r.result() for r in records if r.group == g], list(ks))
    return out
