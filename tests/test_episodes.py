"""The episode runner: multi-turn episodes on the engine with each sequence's cache kept across turns.

A multi-turn episode's stored log-probs equal teacher forcing of the whole transcript (float64); the
environment's tokens are the chat template's rendering of its reply (ChatML spelled out by hand); a
group's shared prompt is prefilled once and no history is prefilled again; an environment that raises
or hangs costs that episode only; a full context ends an episode as truncated.
"""

from __future__ import annotations

import random
import threading
import time
from typing import Any, ClassVar

import pytest
import torch

from nanoseek.engine import Engine, SamplingParams
from nanoseek.envs.base import HELD_OUT_SEED_START, Env, StepResult, step_info
from nanoseek.envs.episodes import render_after_turn, run_episodes
from nanoseek.model import Transformer, get_preset
from nanoseek.tasks.corpus import pretrain_texts
from nanoseek.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


class CountEnv(Env):
    """Replies 'turn k of seed s' after each assistant turn; done after `max_turns`; reward k / 10 per turn.
    `fail` makes it raise (on reset or step) or hang on step."""

    name: ClassVar[str] = "count"
    defaults: ClassVar[dict[str, Any]] = {"max_turns": 3, "fail": ""}

    def _reset(self, seed: int) -> list[dict[str, Any]]:
        if self.fail == "reset":
            raise RuntimeError("reset failed")
        self.seed, self.total = seed, 0.0
        return [{"role": "system", "content": "count"}, {"role": "user", "content": f"start {seed}"}]

    def respond(self, text: str) -> StepResult:
        if self.fail == "step":
            raise ValueError("bad env")
        if self.fail == "hang":
            time.sleep(3.0)
        reward = self.turns / 10
        self.total += reward
        done = self.turns >= self.max_turns
        messages = [] if done else [{"role": "user", "content": f"turn {self.turns} of {self.seed}"}]
        return StepResult(messages, reward, done, step_info())

    def score(self) -> float:
        return self.total

    def act(self, policy: str, messages: list[dict[str, Any]], rng: random.Random) -> str:
        return "ok"


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(pretrain_texts(200, seed=0), 300)


def model_for(tokenizer: Tokenizer) -> Transformer:
    torch.manual_seed(0)
    cfg = get_preset("tiny-moe", vocab_size=tokenizer.vocab_size, init_std=0.2, max_seq_len=256)
    return Transformer(cfg).eval().double()


def test_render_after_turn_is_chatml():
    tokenizer = Tokenizer.train(pretrain_texts(50, seed=0), 280)
    history = [{"role": "user", "content": "hi"}]
    reply = [{"role": "user", "content": "lower"}]
    expected = "\n<|im_start|>user\nlower<|im_end|>\n<|im_start|>assistant\n"
    assert render_after_turn(tokenizer, history, reply, [], "<|im_end|>") == expected
    assert render_after_turn(tokenizer, history, reply, [], "") == "<|im_end|>" + expected  # a turn cut at length
    tool = [{"role": "tool", "content": "42"}]
    tools = [{"type": "function", "function": {"name": "calculator", "parameters": {}}}]
    assert render_after_turn(tokenizer, history, tool, tools, "<|im_end|>") == (
        "\n<|im_start|>user\n<tool_response>\n42\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    )


def test_multi_turn_logprobs_equal_teacher_forcing_of_the_transcript(tokenizer):
    model = model_for(tokenizer)
    engine = Engine(model, tokenizer, max_batch=8, compile=False)
    G, seeds = 3, [5, 9]
    envs = [CountEnv() for _ in range(G * len(seeds))]
    params = SamplingParams(max_new_tokens=7, temperature=0.8, seed=1)
    episodes = run_episodes(engine, tokenizer, envs, seeds, params, group_size=G)

    assert [(e.seed, e.sample) for e in episodes] == [(s, k) for s in seeds for k in range(G)]
    prompts = set()
    for ep in episodes:
        assert ep.turns == 3 and ep.error is None and not ep.truncated
        assert ep.turn_rewards == [0.1, 0.2, 0.3] and ep.return_ == pytest.approx(0.6) == ep.score
        assert [m["role"] for m in ep.messages] == ["system", "user"] + ["assistant", "user"] * 2 + ["assistant"]
        assert len(ep.token_ids) == len(ep.logprobs) == len(ep.policy_mask)
        # teacher forcing of prompt + every turn + every reply, at the sampling temperature
        ids = ep.prompt_ids + ep.token_ids
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids]))[0] / 0.8, -1)
        P = len(ep.prompt_ids)
        policy = [P + t for t, m in enumerate(ep.policy_mask) if m]
        expected = logp[[p - 1 for p in policy], [ids[p] for p in policy]]
        stored = torch.tensor([lp for lp, m in zip(ep.logprobs, ep.policy_mask) if m], dtype=torch.float64)
        torch.testing.assert_close(stored, expected, rtol=0, atol=1e-9)
        # the policy's tokens are exactly its turns; between them, the environment's rendered replies
        assert [t for t, m in zip(ep.token_ids, ep.policy_mask) if m] == [
            t for s, e in ep.turn_spans for t in ep.token_ids[s:e]
        ]
        for k, ((_, end), (start, _)) in enumerate(zip(ep.turn_spans, ep.turn_spans[1:])):
            stop = tokenizer.decode([ep.token_ids[end - 1]]) if ep.finish_reasons[k] == "stop" else ""
            text = render_after_turn(tokenizer, ep.messages[: 2 + 2 * k], [ep.messages[3 + 2 * k]], [], stop)
            assert ep.token_ids[end:start] == tokenizer.encode(text) and not any(ep.policy_mask[end:start])
        prompts.add(tuple(ep.prompt_ids))
    # each group's prompt went in once; afterwards only each turn's last token and the replies
    assert engine.stats.prefill_tokens == sum(len(p) for p in prompts) and len(prompts) == len(seeds)
    appended = sum(len(ep.policy_mask) - sum(ep.policy_mask) + 2 for ep in episodes)  # 2 replies: +1 token each
    assert engine.stats.extend_tokens == appended
    assert not engine.has_work and len(engine._free) == engine.n_slots


def test_an_env_that_raises_or_hangs_costs_only_its_episode(tokenizer):
    model = model_for(tokenizer).float()
    engine = Engine(model, tokenizer, max_batch=8, compile=False)
    fails = ["", "step", "hang", "reset", ""]
    envs = [CountEnv(fail=f) for f in fails]
    t0 = time.perf_counter()
    episodes = run_episodes(
        engine, tokenizer, envs, [1, 2, 3, 4, 5], SamplingParams(max_new_tokens=4, seed=0), env_timeout_s=0.5
    )
    assert time.perf_counter() - t0 < 2.5  # the hanging step (3 s) was not waited for
    ok = [episodes[0], episodes[4]]
    assert all(e.turns == 3 and e.error is None and e.return_ == pytest.approx(0.6) for e in ok)
    assert "ValueError: bad env" in episodes[1].error and episodes[1].turns == 1
    assert "timed out" in episodes[2].error and episodes[2].turns == 1
    assert "reset failed" in episodes[3].error and episodes[3].turns == 0 and not episodes[3].token_ids
    assert not engine.has_work and len(engine._free) == engine.n_slots


class InlineCountEnv(CountEnv):
    """CountEnv called in the runner's own thread (`Env.inline`); records the threads it was called in."""

    inline: ClassVar[bool] = True

    def respond(self, text: str) -> StepResult:
        self.threads = [*getattr(self, "threads", []), threading.get_ident()]
        return super().respond(text)


def test_inline_envs_step_in_the_runners_thread_and_play_the_same_episodes(tokenizer):
    """An `inline` env is reset and stepped without a worker thread; its episodes are the threaded ones,
    token for token (sampled), and one that raises still ends only its own episode."""
    model = model_for(tokenizer).float()
    params = SamplingParams(max_new_tokens=5, temperature=0.9, seed=3)
    runs = {}
    for kind in (CountEnv, InlineCountEnv):
        envs = [kind(fail=f) for f in ("", "", "step", "", "", "")]
        engine = Engine(model, tokenizer, max_batch=8, compile=False)
        runs[kind] = run_episodes(engine, tokenizer, envs, [4, 8], params, group_size=3)
        assert not engine.has_work and len(engine._free) == engine.n_slots
        if kind is InlineCountEnv:
            assert {t for env in envs for t in getattr(env, "threads", [])} == {threading.get_ident()}
    threaded, inline = runs[CountEnv], runs[InlineCountEnv]
    assert [e.token_ids for e in inline] == [e.token_ids for e in threaded]
    assert [e.logprobs for e in inline] == [e.logprobs for e in threaded]
    outcome = [(e.turn_rewards, e.turns, e.error) for e in threaded]
    assert [(e.turn_rewards, e.turns, e.error) for e in inline] == outcome
    assert "ValueError: bad env" in inline[2].error and sum(e.turns == 3 for e in inline) == 5


def test_a_full_context_ends_the_episode_as_truncated(tokenizer):
    model = model_for(tokenizer).float()
    engine = Engine(model, tokenizer, max_batch=2, max_seq_len=40, compile=False)
    [ep] = run_episodes(
        engine, tokenizer, [CountEnv(max_turns=50)], [3], SamplingParams(max_new_tokens=6, ignore_eos=True, seed=0)
    )
    assert ep.truncated and ep.error is None and 1 <= ep.turns < 50
    assert len(ep.prompt_ids) + len(ep.token_ids) <= 40
    assert len(engine._free) == engine.n_slots


def test_eval_env_reports_what_the_transcripts_hold(tmp_path, tokenizer):
    """`nanoseek eval --env`: the summary's figures are the transcripts' means; the expert baseline of
    guess_number (binary search) always succeeds; bad input is one line and exit code 2."""
    import json

    from nanoseek.cli import main
    from nanoseek.model.io import save_model

    ckpt = tmp_path / "ckpt"
    save_model(model_for(tokenizer).float(), ckpt)
    tokenizer.save(ckpt)
    out = tmp_path / "eval"
    argv = ["eval", "--checkpoint", str(ckpt), "--env", "guess_number", "--n-episodes", "5", "--quiet"]
    assert main([*argv, "--max-new-tokens", "6", "--set", "n=8", "--set", "max_turns=3", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(line) for line in (out / "transcripts.jsonl").read_text().splitlines()]
    assert len(records) == summary["episodes"] == 5 and summary["knobs"]["n"] == 8
    assert {r["seed"] for r in records} == {HELD_OUT_SEED_START + i for i in range(5)}  # held-out seeds
    for key in ("score", "turns", "tool_calls", "policy_tokens", "tokens"):
        assert summary[key] == pytest.approx(sum(r[key] for r in records) / 5), key
    assert summary["success"] == sum(r["success"] for r in records) / 5
    assert all(r["turns"] == sum(m["role"] == "assistant" for m in r["messages"]) for r in records)
    assert summary["tokens_per_s"] > 0 and summary["episodes_per_s"] > 0

    expert = tmp_path / "expert"
    base = ["eval", "--env", "guess_number", "--n-episodes", "20", "--quiet"]
    assert main([*base, "--policy", "expert", "--out", str(expert)]) == 0
    assert json.loads((expert / "summary.json").read_text())["success"] == 1.0
    for bad in (["--policy", "bogus"], ["--set", "bogus=1", "--policy", "expert"], []):
        assert main([*base, *bad, "--out", str(tmp_path / "bad")]) == 2


def test_reprefill_baseline_plays_the_same_greedy_episodes(tokenizer):
    """The benchmark's baseline (each turn prefills the whole transcript again) gives the same greedy
    episodes as keeping the cache, at the cost of prefilling every turn's history again."""
    model = model_for(tokenizer)
    params = SamplingParams(max_new_tokens=5, temperature=0, ignore_eos=True)
    runs = {}
    for reprefill in (False, True):
        engine = Engine(model, tokenizer, max_batch=4, compile=False)
        episodes = run_episodes(
            engine, tokenizer, [CountEnv() for _ in range(3)], [1, 2, 3], params, reprefill=reprefill
        )
        runs[reprefill] = (episodes, engine.stats)
    (kept, kept_stats), (again, again_stats) = runs[False], runs[True]
    assert [e.token_ids for e in kept] == [e.token_ids for e in again] and all(e.turns == 3 for e in kept)
    for a, b in zip(kept, again):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), rtol=0, atol=1e-9)
    history = sum(len(e.prompt_ids) + e.turn_spans[k][0] for e in kept for k in range(3))  # each turn's context
    assert again_stats.prefill_tokens == history and again_stats.extend_tokens == 0
    assert kept_stats.prefill_tokens == sum(len(e.prompt_ids) for e in kept)
