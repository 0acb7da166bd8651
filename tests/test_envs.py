"""Environments: the contract (seeded, never raising on any text), tool errors inside episodes, the built-in
environments against their references (binary search's bound, the tasks' grader, exact arithmetic), the
scripted baselines, transcripts read by the SFT data path, and the command line's one-line errors."""

from __future__ import annotations

import json
import math
import random
import sys
import threading
from typing import Any, ClassVar

import pytest

from nanoseek.envs import ENVS, Env, describe, make, register
from nanoseek.envs.base import StepResult, step_info
from nanoseek.envs.baselines import mean_and_error, play_policy, summarize
from nanoseek.envs.calculator import calculate
from nanoseek.envs.tools import CALCULATOR, Tool, render_tool_call
from nanoseek.errors import InputError
from nanoseek.rewards.grading import grade
from nanoseek.tasks import get_task, list_tasks

ALL = ["guess_number", "calculator_arithmetic", "task:arithmetic", "task:countdown"]


# ----------------------------------------------------------------------------- the contract
@pytest.mark.parametrize("spec", ALL)
def test_reset_is_deterministic_by_seed(spec):
    a, b = make(spec), make(spec)
    assert a.reset(7) == b.reset(7)
    assert play_policy(a, "expert", 7) == play_policy(b, "expert", 7)
    assert play_policy(a, "random", 3) == play_policy(make(spec), "random", 3)
    episodes = {json.dumps(play_policy(make(spec), "expert", seed).messages) for seed in range(20)}
    assert len(episodes) >= 15  # other seeds, other episodes


@pytest.mark.parametrize("spec", ALL)
def test_step_never_raises_and_the_episode_ends(spec):
    rng = random.Random(0)
    pieces = ["<tool_call>", "</tool_call>", '{"name": "calculator"', "}", "\\boxed{", "<think>", "</think>", "12"]
    pieces += ["higher", "-3", "\n", "é", '"arguments": {"expression": "1/0"}', "\x00", "9" * 40]
    for seed in range(30):
        env = make(spec)
        env.reset(seed)
        done, turns = False, 0
        while not done:
            result = env.step("".join(rng.choice(pieces) for _ in range(rng.randint(0, 12))))
            assert isinstance(result, StepResult) and set(result.info) >= {"tool_calls", "tool_errors", "invalid"}
            assert all(m["role"] in ("user", "tool") for m in result.messages)
            assert not (result.done and result.messages)
            done, turns = result.done, turns + 1
            assert turns <= env.max_turns
        assert 0.0 <= env.score() <= 1.0
        assert env.step("after the end").done  # a step past the end changes nothing


def test_unknown_names_and_knobs_are_one_line_errors():
    with pytest.raises(InputError, match="unknown env 'guess_numbr' \\(did you mean 'guess_number'\\?\\)"):
        make("guess_numbr")
    with pytest.raises(InputError, match="env guess_number: unknown knob 'size'; known: max_turns, n, noise"):
        make("guess_number", size=3)
    with pytest.raises(InputError, match="knob n: expected an integer, got 'many'"):
        make("guess_number", n="many")
    with pytest.raises(InputError, match="unknown task 'arithmatic'"):
        make("task:arithmatic")
    with pytest.raises(InputError, match="needs a task name"):
        make("task")
    with pytest.raises(InputError, match="takes no argument"):
        make("guess_number:5")
    with pytest.raises(InputError, match="unknown policy 'oracle'"):
        play_policy(make("guess_number"), "oracle", 0)
    assert make("guess_number", n="1000", noise="0.5").knobs == {"n": 1000, "max_turns": 10, "noise": 0.5}
    assert make("calculator_arithmetic", tools="false").tools == []


def test_registry_and_describe():
    names = {d["name"] for d in describe()}
    assert {"guess_number", "calculator_arithmetic", "task:ARG", "reasoning_gym:ARG"} <= names
    task = next(d for d in describe() if d["name"] == "task:ARG")
    assert task["args"] == list_tasks()
    calc = next(d for d in describe() if d["name"] == "calculator_arithmetic")
    assert calc["tools"] == ["calculator"] and calc["knobs"]["tools"] is True

    class Other(Env):
        name: ClassVar[str] = "guess_number"

    make("guess_number")
    with pytest.raises(ValueError, match="already registered"):
        register(Other)
    assert ENVS["guess_number"] is not Other


# ----------------------------------------------------------------------------- tools inside an episode
def hang(seconds: str) -> str:
    threading.Event().wait(float(seconds))
    return "never"


def explode(x: str) -> str:
    raise KeyError(x)


class ToolUser(Env):
    """One question; the model may call a hanging tool, a raising one and the calculator, then answers."""

    name: ClassVar[str] = "tool_user_for_tests"
    defaults: ClassVar[dict[str, Any]] = {"max_turns": 6}
    tool_set: ClassVar[tuple[Tool, ...]] = (
        CALCULATOR,
        Tool("hang", "hangs", {"type": "object", "properties": {"seconds": {"type": "string"}}}, hang, 0.3),
        Tool("explode", "raises", {"type": "object", "properties": {"x": {"type": "string"}}}, explode),
    )

    def _reset(self, seed: int) -> list[dict[str, Any]]:
        self.reward = 0.0
        return [{"role": "user", "content": "What is 6 * 7?"}]

    def respond(self, text: str) -> StepResult:
        self.reward = float(text.strip() == "42")
        return StepResult([], self.reward, True, step_info())

    def score(self) -> float:
        return self.reward


def test_a_hanging_or_raising_tool_costs_only_that_call():
    import time

    env = ToolUser()
    env.reset(0)
    start = time.perf_counter()
    calls = render_tool_call("hang", {"seconds": "60"}) + render_tool_call("calculator", {"expression": "6*7"})
    hanging = env.step(calls)
    assert time.perf_counter() - start < 5
    assert not hanging.done and hanging.info["tool_calls"] == 2 and hanging.info["tool_errors"] == 1
    assert "did not finish within 0.3 s" in hanging.messages[0]["content"] and hanging.messages[1]["content"] == "42"
    raising = env.step(render_tool_call("explode", {"x": "boom"}))
    assert not raising.done and "KeyError" in raising.messages[0]["content"]
    final = env.step("42")
    assert final.done and final.reward == 1.0 and env.success()
    assert (env.tool_calls, env.tool_errors, env.turns) == (3, 2, 3)


def test_every_malformed_call_class_inside_an_episode():
    from test_tools import MALFORMED

    env = make("calculator_arithmetic", max_turns=len(MALFORMED) + 1)
    messages = env.reset(5)
    for text, message in MALFORMED:
        if '"slow"' in text or '"broken"' in text or '"refusing"' in text:
            continue  # those tools exist only in test_tools; here they are unknown tools, also an error
        result = env.step(text)
        assert not result.done and result.info["tool_errors"] == 1, text
        assert message in result.messages[0]["content"]
    answer = play_policy(make("calculator_arithmetic"), "expert", 5).messages[-1]["content"]
    assert env.step(answer).reward == 1.0
    assert messages[0]["content"].startswith("What is")


def test_a_tool_call_in_the_last_turn_ends_the_episode_unanswered():
    env = make("calculator_arithmetic", max_turns=1)
    env.reset(0)
    result = env.step(render_tool_call("calculator", {"expression": "1+1"}))
    assert result.done and result.messages == [] and env.score() == 0.0


# ----------------------------------------------------------------------------- guess_number
@pytest.mark.parametrize("n", [1, 2, 3, 7, 100, 1000])
def test_binary_search_always_finds_within_the_bound(n):
    bound = math.ceil(math.log2(n)) + 1
    env = make("guess_number", n=n, max_turns=bound)
    for secret in range(1, n + 1):  # every hidden number, not only those some seeds draw
        messages = env.reset(0)
        env.secret = secret
        rng = random.Random(secret)
        while not env.done:
            text = env.act("expert", messages, rng)
            messages += [{"role": "assistant", "content": text}, *env.step(text).messages]
        assert env.success() and env.turns <= bound, (secret, messages)
    for seed in range(50):  # and as the episodes are played, from seeds
        t = play_policy(env, "expert", seed)
        assert t.success and t.turns <= bound and t.return_ == 1.0
        assert int(t.messages[-1]["content"].split()[-1]) == env.secret


def test_guess_number_replies_and_baselines():
    env = make("guess_number", n=100)
    env.reset(1)
    secret = env.secret
    low, high = env.step(str(secret - 1)), env.step(f"<think>{secret}</think> {secret + 1}")
    assert low.messages == [{"role": "user", "content": "higher"}] and high.messages[0]["content"] == "lower"
    invalid = env.step("no idea")
    assert invalid.info["invalid"] and not invalid.done
    assert env.step(f"it is {secret}").reward == 1.0 and env.success()
    expert = summarize([play_policy(make("guess_number", n=1000), "expert", s) for s in range(100)])
    blind = summarize([play_policy(make("guess_number", n=1000), "random", s) for s in range(100)])
    assert expert["success"] == 1.0 and blind["success"] < 0.1
    # the noisy expert still plays in the range that remains, so it takes more turns and sometimes runs out
    noisy = summarize([play_policy(make("guess_number", n=1000, noise=0.5), "expert", s) for s in range(100)])
    assert noisy["turns"] > expert["turns"] and noisy["success"] < 1.0


# ----------------------------------------------------------------------------- calculator_arithmetic
def test_calculator_arithmetic_problems_and_experts():
    with_tool, without = make("calculator_arithmetic"), make("calculator_arithmetic", tools=False)
    for seed in range(40):
        t = play_policy(with_tool, "expert", seed)
        assert with_tool.answer == calculate(with_tool.expression)  # the env's value, by the exact calculator
        assert t.success and t.turns == 2 and (t.tool_calls, t.tool_errors) == (1, 0)
        assert t.messages[2] == {"role": "tool", "content": str(with_tool.answer)}
        u = play_policy(without, "expert", seed)
        assert without.expression == with_tool.expression and u.success and u.turns == 1 and u.tool_calls == 0
        assert u.tools == [] and t.tools == [CALCULATOR.schema()]
        digits = [len(x) for x in with_tool.expression.replace("(", " ").replace(")", " ").split() if x.isdigit()]
        assert all(4 <= d <= 7 for d in digits)  # 4-6 digits (a - b swaps may carry one more)
    # without the tool, a tool call is just a wrong answer
    without.reset(0)
    result = without.step(render_tool_call("calculator", {"expression": without.expression}))
    assert result.done and result.reward == 0.0 and result.info["tool_calls"] == 0
    assert summarize([play_policy(with_tool, "random", s) for s in range(40)])["success"] < 0.1


# ----------------------------------------------------------------------------- task:NAME
@pytest.mark.parametrize("task", list_tasks())
def test_task_adapter_rewards_equal_the_grader(task):
    env = make(f"task:{task}")
    test_env = make(f"task:{task}", split="test")
    rng = random.Random(0)
    for seed in range(15):
        messages = env.reset(seed)
        example = get_task(task).generate(1, split="train", seed=seed)[0]
        assert env.row["prompt"] == example.prompt and env.row["answer"] == example.answer
        assert messages == [{"role": "user", "content": example.prompt}]
        texts = [example.solution, f"\\boxed{{{example.answer}}}", "\\boxed{-12345}", "no answer", ""]
        texts.append(env.act("random", messages, rng))
        for text in texts:
            env.reset(seed)
            result = env.step(text)
            assert result.done and result.reward == grade(env.row, text).score == env.score()
        test_env.reset(seed)
        assert test_env.row["meta"]["split"] == "test"
    assert make(f"task:{task}", max_turns=1).knobs["split"] == "train"


def test_task_adapter_takes_the_tasks_knobs():
    env = make("task:arithmetic", digits=4, min_digits=4, ops="*")
    env.reset(0)
    assert env.row["meta"]["op"] == "*" and len(str(env.row["meta"]["a"])) == 4
    with pytest.raises(InputError, match="unknown knob 'digitz'"):
        make("task:arithmetic", digitz=3)


# ----------------------------------------------------------------------------- reasoning_gym:DATASET
def test_reasoning_gym_adapter_scores_with_its_own_scorer():
    rg = pytest.importorskip("reasoning_gym")
    env = make("reasoning_gym:leg_counting", max_animals=4)
    for seed in range(10):
        messages = env.reset(seed)
        entry = rg.create_dataset("leg_counting", size=1, seed=seed, max_animals=4)[0]
        assert entry["question"] in messages[0]["content"]
        for text in (f"\\boxed{{{entry['answer']}}}", f"<answer>{entry['answer']}</answer>", "\\boxed{1}", "nothing"):
            env.reset(seed)
            from nanoseek.envs.reasoning_gym import read_answer

            want = env._data.score_answer(read_answer(text), entry) if read_answer(text) else 0.0
            assert env.step(text).reward == want
    assert summarize([play_policy(env, "expert", s) for s in range(20)])["success"] == 1.0
    with pytest.raises(InputError, match="unknown reasoning-gym dataset 'leg_countin'"):
        make("reasoning_gym:leg_countin")
    with pytest.raises(InputError, match="unknown knob 'animals'"):
        make("reasoning_gym:leg_counting", animals=3)


def test_reasoning_gym_missing_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "reasoning_gym", None)  # import fails as if not installed
    with pytest.raises(InputError, match="needs the reasoning-gym package"):
        make("reasoning_gym:leg_counting")
    listed = next(d for d in describe() if d["name"] == "reasoning_gym:ARG")
    assert "needs the reasoning-gym package" in listed["args"][0]


# ----------------------------------------------------------------------------- baselines, SFT data, CLI
def test_mean_and_error():
    values = [0.0, 1.0, 1.0, 0.0, 1.0]
    mean, se = mean_and_error(values)
    assert mean == pytest.approx(0.6)
    assert se == pytest.approx(math.sqrt(sum((v - 0.6) ** 2 for v in values) / 4 / 5))


@pytest.fixture(scope="module")
def tokenizer():
    from nanoseek.tasks.corpus import pretrain_texts
    from nanoseek.tokenizer import Tokenizer

    return Tokenizer.train(pretrain_texts(300, seed=1), vocab_size=300)


@pytest.mark.parametrize("spec", ["calculator_arithmetic", "guess_number", "task:countdown"])
def test_transcripts_load_in_the_sft_data_path(spec, tokenizer, tmp_path):
    from nanoseek.cli import main
    from nanoseek.data.sft import SFTDataset, load_conversations

    out = tmp_path / "t.jsonl"
    assert main(["data", "make", "--env", spec, "--n", "6", "--out", str(out), "--set", "max_turns=12"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    conversations = load_conversations(out)
    assert len(conversations) == 6
    data = SFTDataset(conversations, tokenizer, seq_len=4096, batch_size=2, epochs=1)
    for row, (ids, mask) in zip(rows, data.encoded):
        tools = row.get("tools")
        assert ids == tokenizer.encode(tokenizer.apply_chat_template(row["messages"], tools=tools))
        learned = tokenizer.decode([i for i, m in zip(ids, mask) if m])
        assistant = [m["content"] + "<|im_end|>" for m in row["messages"] if m["role"] == "assistant"]
        assert learned == "".join(assistant)
        assert row["env"] == spec and row["policy"] == "expert" and row["score"] == 1.0
    if spec == "calculator_arithmetic":
        assert rows[0]["tools"] == [CALCULATOR.schema()] and rows[0]["messages"][2]["role"] == "tool"
        assert "# Tools" in tokenizer.decode(data.encoded[0][0])


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    from nanoseek.cli import main

    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "args, culprit",
    [
        (["env", "baseline", "guess_numbr"], "unknown env 'guess_numbr'"),
        (["env", "baseline", "guess_number", "--set", "size=3"], "unknown knob 'size'"),
        (["env", "baseline", "guess_number", "--set", "n=big"], "knob n: expected an integer"),
        (["env", "baseline", "guess_number", "--set", "a.b=1"], "expected KNOB=VALUE"),
        (["env", "baseline", "guess_number", "--policy", "oracle"], "unknown policy 'oracle'"),
        (["env", "baseline", "guess_number", "--n-episodes", "0"], "--n-episodes"),
        (["env", "play", "nope"], "unknown env 'nope'"),
        (["data", "make", "--env", "nope", "--n", "2", "--out", "x.jsonl"], "unknown env 'nope'"),
        (["data", "make", "--env", "guess_number", "--n", "2", "--out", "x.jsonl", "--set", "k=1"], "unknown knob"),
        (["env", "baseline", "reasoning_gym:no_such_dataset"], "no_such_dataset"),
    ],
)
def test_cli_errors_are_one_line(args, culprit, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(args, capsys)
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: ") and culprit in err, err
    assert not (tmp_path / "x.jsonl").exists()


def test_cli_list_baseline_and_play(capsys, tmp_path, monkeypatch):
    import io

    code, out, _ = run_cli(["env", "list"], capsys)
    assert code == 0 and "guess_number" in out and "knobs: n=100 max_turns=10 noise=0.0" in out
    transcripts = tmp_path / "b.jsonl"
    args = ["env", "baseline", "guess_number", "--n-episodes", "20", "--seed", "5", "--transcripts", str(transcripts)]
    code, out, _ = run_cli(args, capsys)
    summary = json.loads(out.splitlines()[-1])
    want = summarize([play_policy(make("guess_number"), "expert", 5 + i) for i in range(20)])
    knobs = make("guess_number").knobs
    assert code == 0 and summary == {"env": "guess_number", "policy": "expert", "knobs": knobs, **want}
    assert [json.loads(line)["seed"] for line in transcripts.read_text().splitlines()] == list(range(5, 25))
    env = make("guess_number")
    env.reset(2)
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{env.secret - 1}\n{env.secret}\n"))
    code, out, _ = run_cli(["env", "play", "guess_number", "--seed", "2"], capsys)
    assert code == 0 and "higher<|im_end|>\n<|im_start|>assistant\n" in out
    assert "your score: 1.000 (success: True, turns: 2)" in out and "expert: 1.000" in out
    assert out.startswith("# guess_number") and "<|im_start|>user\nI am thinking" in out
