"""lm-eval-harness's `local-completions` model against `nanoseek serve`, on a small local task file:
one log-likelihood task (multiple choice) and one generate-until task. Every score lm-eval gets through
the server equals what nanoseek computes directly on the same items (teacher forcing and the naive
greedy loop, no server)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from serving import naive_greedy_ids, serve_tiny

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is a dev extra: pip install -e '.[dev]'")
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]

QUESTIONS = ["What is 2 + 3?", "What is 7 * 6?", "Is 9 prime?", "What is 10 - 4?"]
CHOICES = [["5", "6", "7"], ["42", "36", "48"], ["yes", "no"], ["6", "14", "4"]]
ANSWERS = [0, 0, 1, 0]

TASKS = """
task: nanoseek_{kind}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
doc_to_text: question
"""
MC = "output_type: multiple_choice\ndoc_to_choice: choices\ndoc_to_target: answer\nmetric_list:\n  - metric: acc\n"
GEN = (
    "output_type: generate_until\ndoc_to_target: target\n"
    'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 8\n  do_sample: false\n  temperature: 0\n'
    "metric_list:\n  - metric: exact_match\n"
)


@torch.no_grad()
def loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """As lm-eval splits a pair: the whole text's tokens after the context's, scored by teacher forcing."""
    whole, context_ids = tokenizer.encode(context + continuation), tokenizer.encode(context)
    logp = torch.log_softmax(model(torch.tensor([whole]))[0].double(), dim=-1)
    return sum(float(logp[i - 1, whole[i]]) for i in range(len(context_ids), len(whole)))


def test_lm_eval_local_completions_scores_equal_nanoseeks_own(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    s = serve_tiny()
    try:
        model, tokenizer = s.model, s.tokenizer
        tokenizer.save(tmp_path / "tokenizer")  # lm-eval tokenizes with the same tokenizer.json
        generated = []
        for q in QUESTIONS:
            ids = naive_greedy_ids(model, tokenizer.encode(q), 8, tokenizer.stop_ids)
            text = tokenizer.decode(ids[:-1] if ids and ids[-1] in tokenizer.stop_ids else ids)
            generated.append(text.split("\n")[0])
        targets = [generated[0], "no such answer", generated[2], "nor this"]  # two match: exact_match is 0.5
        rows = [
            {"question": q, "choices": c, "answer": a, "target": t}
            for q, c, a, t in zip(QUESTIONS, CHOICES, ANSWERS, targets)
        ]
        data = tmp_path / "items.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        for kind, extra in (("mc", MC), ("gen", GEN)):
            (tmp_path / f"{kind}.yaml").write_text(TASKS.format(kind=kind, data=data) + extra)

        from lm_eval.tasks import TaskManager

        args = (
            f"base_url={s.url}/v1/completions,model=tiny-test,tokenizer_backend=huggingface,"
            f"tokenizer={tmp_path / 'tokenizer'},num_concurrent=1,max_retries=1,max_length=128"
        )
        out = lm_eval.simple_evaluate(
            model="local-completions",
            model_args=args,
            tasks=["nanoseek_mc", "nanoseek_gen"],
            task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
            log_samples=True,
        )
        # log-likelihood: every (item, choice) score, and acc
        expected_acc = 0.0
        for sample in out["samples"]["nanoseek_mc"]:
            i = sample["doc_id"]
            ours = [loglikelihood(model, tokenizer, QUESTIONS[i], " " + c) for c in CHOICES[i]]
            theirs = [resp[0][0] for resp in sample["resps"]]
            assert theirs == pytest.approx(ours, abs=1e-4)
            expected_acc += (max(range(len(ours)), key=ours.__getitem__) == ANSWERS[i]) / len(QUESTIONS)
        assert out["results"]["nanoseek_mc"]["acc,none"] == pytest.approx(expected_acc)
        # generate-until: every answer, and exact_match
        for sample in out["samples"]["nanoseek_gen"]:
            assert sample["filtered_resps"][0] == generated[sample["doc_id"]]
        assert out["results"]["nanoseek_gen"]["exact_match,none"] == pytest.approx(0.5)
    finally:
        s.close()
