"""`nanoseek eval`: the scoring pipeline against hand-computed metrics (a fake engine that answers from a
script), prompts (zero-shot R1, task prompts, few-shot), bad rows, the CLI end to end on a tiny random
checkpoint, and `eval compare`."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nanoseek.commands.common import parse_difficulty
from nanoseek.config import EvalConfig
from nanoseek.engine import Completion
from nanoseek.eval.harness import R1_INSTRUCTION, build_engine, evaluate_checkpoint, load_bench
from nanoseek.tasks import get_task

pytestmark = pytest.mark.usefixtures("one_thread")


MATH_ROWS = [
    {"problem": "Compute $1/2 + 1/4$.", "solution": "So $\\boxed{\\frac34}$.", "unique_id": "m1"},
    {"problem": "What is $2+2$?", "answer": "4", "solution": "Two and two: $\\boxed{4}$.", "unique_id": "m2"},
    {"problem": "Find $x$ if $x - 2 = 3$.", "answer": "5", "solution": "Add 2: $\\boxed{5}$.", "unique_id": "m3"},
]
GSM_ROWS = [
    {"question": "Janet has 3 apples and buys 4. How many?", "answer": "3 + 4 = <<3+4=7>>7 apples.\n#### 7"},
    {"question": "A TV costs $1,000 and a radio $250. Total?", "answer": "1000+250=<<1000+250=1250>>1250\n#### 1,250"},
    {"question": "Tom reads 2 pages a day for 5 days. Pages?", "answer": "2*5=<<2*5=10>>10\n#### 10"},
]
AIME_ROWS = [{"id": 1, "problem": "Find N mod 1000.", "answer": 33}, {"id": 2, "problem": "How many?", "answer": 204}]

# What the fake model answers, per problem (4 samples each), and the hand-computed results.
SCRIPT = {
    # MATH m1 (gold 3/4): wrong, right, unparseable, right -> c = 2
    MATH_ROWS[0]["problem"]: ["\\boxed{1}", "so \\boxed{\\frac34}", "\\boxed{???}", "\\boxed{\\frac34}"],
    MATH_ROWS[1]["problem"]: ["\\boxed{4}"] * 4,  # c = 4
    MATH_ROWS[2]["problem"]: ["no idea", "hmm", "\\boxed{6}", "\\boxed{6}"],  # c = 0, two without an answer
    GSM_ROWS[0]["question"]: ["#### 7", "The answer is 7.", "\\boxed{8}", "<think>\\boxed{8}</think>\\boxed{7}"],
    GSM_ROWS[1]["question"]: ["\\boxed{1250}"] * 4,
    GSM_ROWS[2]["question"]: ["\\boxed{12}"] * 4,
    AIME_ROWS[0]["problem"]: ["\\boxed{033}"] * 4,  # 033 = 33 for math-verify
    AIME_ROWS[1]["problem"]: ["\\boxed{1}", "\\boxed{2}", "\\boxed{3}", "\\boxed{204}"],
}


class FakeEngine:
    """Answers each prompt from a script (keyed by the problem text found in the prompt); records the calls."""

    def __init__(self, tokenizer, script: dict[str, list[str]]):
        self.tokenizer, self.script, self.calls = tokenizer, script, []

    def generate(self, prompts, params):
        texts = [self.tokenizer.decode(p) for p in prompts]
        self.calls.append((texts, params))
        out = []
        for i, text in enumerate(texts):
            key = max((k for k in self.script if k in text.rsplit("Problem:", 1)[-1]), key=len, default=None)
            answers = self.script[key] if key else ["?"]
            out.append(
                [
                    Completion(
                        prompt_ids=list(prompts[i]),
                        token_ids=[0] * len(answers[j % len(answers)]),  # one "token" per character
                        logprobs=[],
                        text=answers[j % len(answers)],
                        finish_reason="stop",
                        ttft_s=0.25,
                        latency_s=0.5 + 0.1 * j,
                        index=i,
                        sample=j,
                    )
                    for j in range(params.n)
                ]
            )
        return out


@pytest.fixture(scope="module")
def tok():
    from nanoseek.tokenizer import Tokenizer

    texts = [r["problem"] for r in MATH_ROWS] + [r["question"] for r in GSM_ROWS] + [R1_INSTRUCTION]
    return Tokenizer.train(texts * 10, 300)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bench")
    (d / "math.json").write_text(json.dumps(MATH_ROWS))
    (d / "gsm8k.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GSM_ROWS))
    pq.write_table(pa.Table.from_pylist(AIME_ROWS), d / "aime.parquet")
    return {"math": d / "math.json", "gsm8k": d / "gsm8k.jsonl", "aime": d / "aime.parquet"}


def arithmetic_script(n: int, seed: int = 0) -> dict[str, list[str]]:
    """The gold solution for each held-out arithmetic problem the harness will draw."""
    return {e.prompt: [e.solution] for e in get_task("arithmetic").generate(n, split="test", seed=seed, unique=True)}


@pytest.fixture(scope="module")
def fake_run(tok, files, tmp_path_factory):
    out = tmp_path_factory.mktemp("fake_run")
    engine = FakeEngine(tok, {**SCRIPT, **arithmetic_script(5)})
    benches = [str(files["math"]), str(files["gsm8k"]), str(files["aime"]), "arithmetic"]
    summary = evaluate_checkpoint(None, tok, benches, out, engine=engine, n_problems=5, quiet=True)
    return summary, out, engine


def test_metrics_match_hand_computed_values(fake_run) -> None:
    summary, _, engine = fake_run
    params = engine.calls[0][1]
    assert (params.n, params.temperature, params.top_p) == (4, 0.6, 0.95)
    m = summary["benchmarks"]["math"]["metrics"]
    assert m["problems"] == 3 and m["samples"] == 4
    assert m["pass@1"] == pytest.approx((2 / 4 + 1 + 0) / 3)
    assert m["pass@1_se"] == pytest.approx(math.sqrt(0.25 / 3))  # values .5, 1, 0: sample var .25
    assert m["pass@2"] == pytest.approx((1 - 1 / 6 + 1 + 0) / 3)  # 1 - C(2,2)/C(4,2) for c = 2
    assert m["pass@4"] == pytest.approx(2 / 3)
    assert m["cons@1"] == pytest.approx(1 / 3)  # first samples: wrong, right, no answer
    assert m["cons@2"] == pytest.approx(1 / 3)  # m1: "1" and "\frac34" tie, the first seen wins; m3: both None
    assert m["cons@4"] == pytest.approx(2 / 3)  # m1: \frac34 twice wins; m3: "6" twice wins, wrong
    assert summary["benchmarks"]["math"]["ks"] == [1, 2, 4]
    g = summary["benchmarks"]["math"]["grading"]
    assert (g["samples"], g["correct"], g["wrong"], g["no_answer"], g["unparseable"]) == (12, 6, 3, 2, 1)
    assert g["math_verify"]["unparseable_pred"] == 1  # the same count, straight from math_verify_stats

    gsm = summary["benchmarks"]["gsm8k"]["metrics"]  # c = 3, 4, 0
    assert gsm["pass@1"] == pytest.approx((3 / 4 + 1 + 0) / 3)
    assert gsm["pass@2"] == pytest.approx((1 + 1 + 0) / 3)  # n - c = 1 < 2: certain
    assert gsm["cons@4"] == pytest.approx(2 / 3)  # "7" x3 beats "8" on the first
    aime = summary["benchmarks"]["aime"]["metrics"]  # c = 4, 1
    assert aime["pass@1"] == pytest.approx((1 + 1 / 4) / 2)
    assert aime["pass@2"] == pytest.approx((1 + 0.5) / 2)
    assert aime["cons@4"] == pytest.approx(0.5)  # a four-way tie goes to the first (wrong) answer
    arith = summary["benchmarks"]["arithmetic"]
    assert arith["source"] == "task:arithmetic" and arith["problems"] == 5
    assert arith["metrics"]["pass@1"] == 1.0 and arith["metrics"]["cons@4"] == 1.0

    speed = summary["benchmarks"]["math"]["speed"]
    tokens = sum(len(t) for k in MATH_ROWS for t in SCRIPT[k["problem"]])
    assert speed["output_tokens"] == tokens
    assert speed["tokens_per_correct"] == pytest.approx(tokens / 6)
    assert speed["latency_mean_s"] == pytest.approx(0.8) and speed["latency_p90_s"] == pytest.approx(0.8)
    assert speed["ttft_p50_s"] == pytest.approx(0.25)
    assert summary["settings"]["samples"] == 4


def test_run_directory_files(fake_run) -> None:
    summary, out, _ = fake_run
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    lines = [json.loads(x) for x in (out / "records.jsonl").read_text().splitlines()]
    assert len(lines) == 3 + 3 + 2 + 5
    m1 = lines[0]
    assert (m1["bench"], m1["id"], m1["gold"], m1["n_correct"]) == ("math", "m1", "\\frac34", 2)
    assert m1["problem"] == MATH_ROWS[0]["problem"]
    assert m1["prompt"].startswith("<|im_start|>user\n" + MATH_ROWS[0]["problem"] + R1_INSTRUCTION)
    assert [s["answer"] for s in m1["samples"]] == ["1", "\\frac34", "???", "\\frac34"]
    assert [s["correct"] for s in m1["samples"]] == [False, True, False, True]
    assert [s["status"] for s in m1["samples"]] == ["wrong", "correct", "unparseable", "correct"]
    assert m1["samples"][0]["tokens"] == len("\\boxed{1}") and m1["latency_s"] == pytest.approx(0.8)
    report = (out / "report.md").read_text()
    for name in ("## math", "## gsm8k", "## aime", "## arithmetic", "| 1 | 50.0 ± 28.9 | 33.3 ± 33.3 |"):
        assert name in report
    assert "1 unparseable by math-verify" in report and "output tokens/s" in report
    for plot in ("pass_at_k.png", "response_length.png"):
        assert (out / "plots" / plot).read_bytes()[:4] == b"\x89PNG"
        assert f"(plots/{plot})" in report


def test_prompts(tok, files, tmp_path) -> None:
    script = {**SCRIPT, **arithmetic_script(2)}
    engine = FakeEngine(tok, script)
    evaluate_checkpoint(
        None,
        tok,
        [str(files["gsm8k"]), "arithmetic"],
        tmp_path / "a",
        engine=engine,
        n_problems=2,
        quiet=True,
        plots=False,
        system="Be brief.",
        think_prefill=True,
        temperature=0,
    )
    (gsm_texts, params), (task_texts, _) = engine.calls
    assert params.n == 1 and params.temperature == 0  # greedy: one sample
    assert gsm_texts[0] == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
        + GSM_ROWS[0]["question"]
        + R1_INSTRUCTION
        + "<|im_end|>\n<|im_start|>assistant\n<think>\n"
    )
    task_prompt = next(iter(arithmetic_script(1)))
    assert task_texts[0].endswith(f"user\n{task_prompt}<|im_end|>\n<|im_start|>assistant\n<think>\n")  # bare

    engine = FakeEngine(tok, script)
    evaluate_checkpoint(
        None,
        tok,
        ["arithmetic"],
        tmp_path / "b",
        engine=engine,
        n_problems=1,
        quiet=True,
        plots=False,
        instruction="r1",
    )
    assert R1_INSTRUCTION + "<|im_end|>" in engine.calls[0][0][0]
    engine = FakeEngine(tok, script)
    evaluate_checkpoint(
        None,
        tok,
        [str(files["gsm8k"])],
        tmp_path / "c",
        engine=engine,
        quiet=True,
        plots=False,
        instruction="Answer in one line.",
    )
    assert GSM_ROWS[0]["question"] + "\nAnswer in one line.<|im_end|>" in engine.calls[0][0][0]


def test_few_shot_prompts(tok, files, tmp_path) -> None:
    engine = FakeEngine(tok, SCRIPT)
    summary = evaluate_checkpoint(
        None, tok, [str(files["gsm8k"])], tmp_path, engine=engine, few_shot=2, k=2, quiet=True, plots=False
    )
    texts, params = engine.calls[0]
    assert "\nProblem:" in params.stop_strings
    for row, text in zip(GSM_ROWS, texts):
        assert "<|im_start|>" not in text and R1_INSTRUCTION not in text
        assert text.endswith(f"Problem: {row['question']}\nSolution:")
        shots = text.split("\n\n")[:-1]
        assert len(shots) == 2 and all(s.startswith("Problem: ") and "\nSolution: " in s for s in shots)
        assert row["question"] not in "".join(shots)  # never the evaluated problem
        assert "<<" not in text and "#### " in text  # GSM8K worked answers without calculator annotations
    assert summary["benchmarks"]["gsm8k"]["metrics"]["pass@1"] == pytest.approx((1 + 1 + 0) / 3)

    script = {e.prompt: [e.solution] for e in get_task("countdown").generate(3, split="test", seed=0, unique=True)}
    engine = FakeEngine(tok, script)
    summary = evaluate_checkpoint(
        None, tok, ["countdown"], tmp_path / "t", engine=engine, few_shot=1, n_problems=3, quiet=True, plots=False
    )
    (text, *_), _ = engine.calls[0]
    train = get_task("countdown").generate(1, split="train", seed=0)[0]
    assert text.startswith(f"Problem: {train.prompt}\nSolution: {train.solution}\n\nProblem: ")
    assert summary["benchmarks"]["countdown"]["metrics"]["pass@1"] == 1.0

    with pytest.raises(ValueError, match="need 3 other solved problems"):
        evaluate_checkpoint(None, tok, [str(files["gsm8k"])], tmp_path / "x", engine=engine, few_shot=3, quiet=True)
    with pytest.raises(ValueError, match="plain text"):
        EvalConfig(few_shot=2, think_prefill=True).check()


def test_task_settings() -> None:
    assert parse_difficulty(["arithmetic.digits=3", "countdown.use_all=true", "arithmetic.ops=+,*"]) == {
        "arithmetic": {"digits": 3, "ops": ("+", "*")},
        "countdown": {"use_all": True},
    }
    assert parse_difficulty(["digits=4"])["arithmetic"] == {"digits": 4}
    assert parse_difficulty(["digits=4"], ["countdown", "arithmetic"]) == {"arithmetic": {"digits": 4}}
    with pytest.raises(ValueError, match="unknown task"):
        parse_difficulty(["nosuch.digits=3"])
    with pytest.raises(ValueError, match="no difficulty knob"):
        parse_difficulty(["arithmetic.colour=3"])
    with pytest.raises(ValueError, match="no difficulty knob 'colour'"):
        parse_difficulty(["colour=3"])
    with pytest.raises(ValueError, match="countdown is not among the tasks"):
        parse_difficulty(["countdown.use_all=true"], ["arithmetic"])
    with pytest.raises(ValueError, match="arithmetic.digits: expected an integer, got 'two'"):
        parse_difficulty(["arithmetic.digits=two"])


def test_malformed_rows(tok, tmp_path, capsys) -> None:
    from nanoseek.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(GSM_ROWS[0]) + "\n{not json\n" + json.dumps(GSM_ROWS[1]) + "\n")
    engine = FakeEngine(tok, SCRIPT)
    with pytest.raises(ValueError, match=r"bad\.jsonl: line 2: not valid JSON"):
        evaluate_checkpoint(None, tok, [str(bad)], tmp_path / "a", engine=engine, quiet=True)
    assert main(["eval", "--checkpoint", str(tmp_path), "--bench", str(bad), "--out", str(tmp_path / "b")]) == 2
    assert "bad.jsonl: line 2" in capsys.readouterr().err  # fails before any model is loaded
    summary = evaluate_checkpoint(
        None, tok, [str(bad)], tmp_path / "c", engine=engine, skip_bad=True, quiet=True, plots=False
    )
    entry = summary["benchmarks"]["bad"]
    assert entry["problems"] == 2 and entry["grading"]["skipped_rows"] == 1
    assert "line 2" in entry["skipped"][0]
    with pytest.raises(ValueError, match="not a benchmark file .* nor a built-in task"):
        evaluate_checkpoint(None, tok, ["nosuchtask"], tmp_path / "d", engine=engine, quiet=True)


@pytest.fixture(scope="module")
def checkpoint(tok, tmp_path_factory) -> Path:
    from nanoseek.model import Transformer, get_preset, save_model

    torch.manual_seed(0)
    model = Transformer(get_preset("tiny", vocab_size=tok.vocab_size, max_seq_len=512))
    directory = tmp_path_factory.mktemp("ckpt")
    save_model(model, directory)
    tok.save(directory)
    return directory


def test_cli_end_to_end_and_compare(checkpoint, files, fake_run, tmp_path, capsys) -> None:
    from nanoseek.cli import main

    run = tmp_path / "run"
    argv = [
        "eval",
        "--checkpoint",
        str(checkpoint),
        "--bench",
        str(files["gsm8k"]),
        "--bench",
        "arithmetic",
        "--n-problems",
        "3",
        "--set",
        "arithmetic.digits=1",
        "--k",
        "2",
        "--max-new-tokens",
        "6",
        "--device",
        "cpu",
        "--out",
        str(run),
        "--quiet",
    ]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "| gsm8k | 3 |" in table and "| arithmetic | 3 |" in table
    summary = json.loads((run / "summary.json").read_text())
    assert summary["model"] == str(checkpoint) and summary["settings"]["difficulty"] == {"arithmetic": {"digits": 1}}
    for name, n in (("gsm8k", 3), ("arithmetic", 3)):
        entry = summary["benchmarks"][name]
        assert entry["problems"] == n and entry["samples_per_problem"] == 2
        assert 0.0 <= entry["metrics"]["pass@1"] <= 1.0 and "pass@2" in entry["metrics"]
        assert entry["speed"]["output_tokens"] > 0 and entry["speed"]["tokens_per_s"] > 0
    records = [json.loads(x) for x in (run / "records.jsonl").read_text().splitlines()]
    assert len(records) == 6 and all(len(r["samples"]) == 2 and r["samples"][0]["tokens"] <= 6 for r in records)
    arith = [r["problem"] for r in records if r["bench"] == "arithmetic"]
    assert all(re.fullmatch(r"What is \d [-+*] \d\?", p) for p in arith), arith  # --set arithmetic.digits=1
    assert (run / "report.md").is_file() and (run / "plots" / "pass_at_k.png").is_file()

    greedy = tmp_path / "greedy"
    assert main([*argv[:-3], "--out", str(greedy), "--temperature", "0", "--quiet", "--no-plots"]) == 0
    assert json.loads((greedy / "summary.json").read_text())["benchmarks"]["gsm8k"]["samples_per_problem"] == 1
    assert not (greedy / "plots").exists()
    capsys.readouterr()

    _, fake_dir, _ = fake_run
    assert main(["eval", "compare", str(run), str(fake_dir)]) == 0
    out = capsys.readouterr().out
    gsm_a = summary["benchmarks"]["gsm8k"]["metrics"]["pass@1"]
    gsm_b = (3 / 4 + 1) / 3
    assert f"| gsm8k | pass@1 (%) | {100 * gsm_a:.1f}" in out
    assert f"| {100 * gsm_b:.1f} ± " in out and f"{100 * (gsm_b - gsm_a):+.1f} |" in out
    assert "| arithmetic | pass@2 (%) |" in out and "Not in both runs: aime, math" in out

    assert main(["eval", "compare", str(run), str(tmp_path / "nothing")]) == 2
    assert "no summary.json" in capsys.readouterr().err
    assert main(["eval", "--bench", "arithmetic"]) == 2
    assert "needs --checkpoint" in capsys.readouterr().err


def test_evaluate_checkpoint_on_a_path_and_on_a_loaded_model(checkpoint, tok, tmp_path) -> None:
    from nanoseek.loading import load_checkpoint

    options = dict(n_problems=2, k=2, max_new_tokens=3, quiet=True, plots=False)
    summary = evaluate_checkpoint(str(checkpoint), None, ["arithmetic"], tmp_path / "a", device="cpu", **options)
    assert summary["model"] == str(checkpoint) and summary["benchmarks"]["arithmetic"]["problems"] == 2
    model, _ = load_checkpoint(checkpoint, "cpu")
    model.train()
    again = evaluate_checkpoint(model, tok, ["arithmetic"], tmp_path / "b", **options)
    assert model.training  # the trainer's model is handed back in its mode
    a, b = (json.loads((d / "records.jsonl").read_text().splitlines()[0]) for d in (tmp_path / "a", tmp_path / "b"))
    assert [s["text"] for s in a["samples"]] == [s["text"] for s in b["samples"]]  # same seed, same samples
    assert again["benchmarks"]["arithmetic"]["samples_per_problem"] == 2
    with pytest.raises(TypeError):
        evaluate_checkpoint(model, tok, ["arithmetic"], tmp_path / "c", temprature=0.5)

    cfg = EvalConfig(max_new_tokens=10, n_problems=3)
    engine = build_engine(model, tok, [load_bench("arithmetic", cfg)], cfg)
    assert engine.max_seq_len < 100  # the longest prompt + max_new_tokens, not the model's 512


def test_task_row_files_are_prompted_bare(tok, tmp_path) -> None:
    examples = get_task("arithmetic").generate(2, split="test", seed=3)
    rows = tmp_path / "arith_rows.jsonl"
    rows.write_text("".join(json.dumps(e.to_dict()) + "\n" for e in examples))  # `nanoseek data make` rows
    engine = FakeEngine(tok, {e.prompt: [e.solution] for e in examples})
    summary = evaluate_checkpoint(None, tok, [str(rows)], tmp_path / "r", engine=engine, quiet=True, plots=False)
    assert R1_INSTRUCTION not in engine.calls[0][0][0] and examples[0].prompt + "<|im_end|>" in engine.calls[0][0][0]
    entry = summary["benchmarks"]["arith_rows"]
    assert entry["metrics"]["pass@1"] == 1.0 and entry["groups"] == {}  # one task: no per-group split


def test_overview_table_has_one_column_per_distinct_metric():
    from nanoseek.eval.report import overview_table

    def summary(k: int) -> dict:
        metrics = {"pass@1": 0.5, "pass@1_se": 0.1, f"pass@{k}": 0.75, f"cons@{k}": 0.5}
        entry = dict(samples_per_problem=k, problems=4, metrics=metrics, speed={"tokens_per_s": 10.0})
        return {"benchmarks": {"b": entry}}

    one = overview_table(summary(1)).splitlines()
    assert one[0] == "| benchmark | problems | pass@1 (%) | tokens/s |"  # cons@1 = pass@1 with one sample
    assert one[2].count("|") == one[0].count("|") == one[1].count("|")
    four = overview_table(summary(4)).splitlines()
    assert four[0] == "| benchmark | problems | pass@1 (%) | pass@4 (%) | cons@4 (%) | tokens/s |"
    assert "75.0" in four[2] and four[2].count("|") == four[0].count("|")


def test_eval_usage_names_both_forms(capsys) -> None:
    """The usage line shows `eval --checkpoint ... --bench ...` and `eval compare RUN_A RUN_B`, not argparse's
    `{compare} ...` (and `eval compare --help` keeps its own usage)."""
    from nanoseek.cli import main

    for argv in (["eval", "--help"], ["eval", "compare", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
    out = capsys.readouterr().out
    assert "{compare}" not in out
    assert "usage: nanoseek eval --checkpoint CHECKPOINT --bench FILE_OR_TASK" in out
    assert "nanoseek eval compare RUN_A RUN_B" in out
    assert "usage: nanoseek eval compare [-h] RUN_A RUN_B" in out
