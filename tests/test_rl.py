"""The RL run loop: dynamic sampling, reward containment during a step, the update, exact resume.

A scripted fake engine (known texts, hence known rewards) stands in for generation where the test
is about what happens to the samples; the resume test runs the real `rl()` on a tiny checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nanoseek.config import RLConfig, RunConfig, TrainConfig
from nanoseek.model import Transformer, get_preset
from nanoseek.model.io import save_model
from nanoseek.rewards import RewardSet
from nanoseek.train import grpo
from nanoseek.train.rl import evaluate, rl
from nanoseek.train.rollouts import PromptSampler, Rollouts, collect, file_rows
from nanoseek.train.update import pack_sequences, sequence_logprobs, update

pytestmark = pytest.mark.usefixtures("one_thread")

FIXTURES = Path(__file__).resolve().parent / "rl_reward_fixtures.py"


def fixture(name: str) -> str:
    return f"{FIXTURES}:{name}"


# ----------------------------------------------------------------------------- fakes
class CharTokenizer:
    """One token per character (its code point): prompts and texts map to ids and back exactly."""

    stop_ids = ()

    def apply_chat_template(self, messages, add_generation_prompt=True, **_):
        return "".join(m["content"] for m in messages) + ">"

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids) -> str:
        return "".join(chr(i) for i in ids)


@dataclass
class FakeCompletion:
    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str
    error: str | None = None
    latency_s: float = 0.0
    ttft_s: float = 0.0


class FakeSequence:
    def __init__(self, text: str, finish_reason: str) -> None:
        self.text, self.finish_reason, self.stop = text, finish_reason, None
        self.tokens, self.logprobs = CharTokenizer().encode(text), [-1.0] * len(text)


class FakeRequest:
    def __init__(self, texts: list[str]) -> None:
        self.texts, self.seqs = texts, []


class ScriptedEngine:
    """Answers each prompt, in submission order, with the next scripted group of texts: through
    `generate` (the evaluation) or `submit` + `step` (the episode runner, one turn)."""

    device = torch.device("cpu")
    max_seq_len = 10_000
    model = torch.nn.Linear(2, 2)  # what it "decodes": float32 weights, so rollouts run without autocast
    n_slots = 8

    def __init__(self, script: list[list[str]], max_new_tokens: int | None = None) -> None:
        self.script = list(script)
        self.max_new_tokens = max_new_tokens
        self.calls: list[dict] = []  # per round (generate call, or submissions of one seed): prompts (text), seed, n
        self.queue: list[FakeRequest] = []

    def _finish(self, text: str) -> str:
        return "length" if self.max_new_tokens and len(text) >= self.max_new_tokens else "stop"

    def _record(self, prompt_ids, params) -> list[str]:
        if not self.calls or self.calls[-1]["seed"] != params.seed or self.calls[-1]["n"] != params.n:
            self.calls.append(dict(prompts=[], seed=params.seed, n=params.n))
        self.calls[-1]["prompts"].append(CharTokenizer().decode(prompt_ids))
        texts = self.script.pop(0)
        assert len(texts) == params.n
        return texts

    def generate(self, prompt_ids_list, params):
        self.calls.append(dict(prompts=[], seed=params.seed, n=params.n))  # a call of its own
        tok = CharTokenizer()
        out = []
        for p in prompt_ids_list:
            texts = self._record(p, params)
            out.append([FakeCompletion(tok.encode(t), [-1.0] * len(t), t, self._finish(t)) for t in texts])
        return out

    def submit(self, prompt_ids, params, index=0, keep=False):
        self.queue.append(FakeRequest(self._record(prompt_ids, params)))
        return self.queue[-1]

    @property
    def has_work(self) -> bool:
        return bool(self.queue)

    def step(self) -> None:
        for request in self.queue:
            request.seqs = [FakeSequence(t, self._finish(t)) for t in request.texts]
        self.queue = []

    def text(self, seq: FakeSequence) -> str:
        return seq.text

    def release_sequence(self, seq: FakeSequence) -> None:
        pass

    def inference(self):
        return contextlib.nullcontext()


def rows(n: int = 8) -> list[dict]:
    return [dict(id=f"q{i}", prompt=f"question {i}", answer="yes") for i in range(n)]


def exact_reward(prompts, completions, rows_):
    return [float(c == r["answer"]) for c, r in zip(completions, rows_)]


def reward_set() -> RewardSet:
    return RewardSet().add("exact", exact_reward, 1.0)


def prompt_of(row: dict) -> str:
    return CharTokenizer().apply_chat_template([{"role": "user", "content": row["prompt"]}])


# ----------------------------------------------------------------------------- dynamic sampling
def test_dynamic_sampling_drops_exactly_the_zero_variance_groups_and_refills():
    cfg = RLConfig(prompts_per_step=2, group_size=2, dynamic_sampling=True, max_sampling_rounds=3)
    data = rows()
    sampler, twin = PromptSampler(data, seed=5), PromptSampler(data, seed=5)
    order = twin.take(4)  # the order the sampler hands prompts out in
    # Round 1 (2 prompts): a mixed group (kept) and an all-wrong one (dropped); 1 group missing.
    # Round 2 (1 new prompt): all right (dropped). Round 3 (1 new prompt): mixed (kept): batch full.
    engine = ScriptedEngine([["yes", "no"], ["no", "no"], ["yes", "yes"], ["no", "yes"]])
    batch = collect(engine, CharTokenizer(), sampler, reward_set(), cfg, seed=7)

    assert [c["prompts"] for c in engine.calls] == [
        [prompt_of(order[0]), prompt_of(order[1])],
        [prompt_of(order[2])],
        [prompt_of(order[3])],
    ]
    assert len({c["seed"] for c in engine.calls}) == 3  # each round draws fresh noise
    assert all(c["n"] == 2 for c in engine.calls)
    assert sampler.state_dict() == twin.state_dict()  # the next step continues after the refills

    assert [r["id"] for r in batch.rows] == [order[0]["id"]] * 2 + [order[3]["id"]] * 2
    assert batch.texts == ["yes", "no", "no", "yes"]
    assert batch.rewards.tolist() == [1.0, 0.0, 0.0, 1.0]
    assert batch.per_function == {"exact": [1.0, 0.0, 0.0, 1.0]}
    assert batch.correct == [True, False, False, True]
    assert batch.completion_ids == [[ord(c) for c in t] for t in batch.texts]
    assert batch.prompt_ids[0] == [ord(c) for c in prompt_of(order[0])]
    assert batch.groups_generated == 4 and batch.zero_variance_fraction == pytest.approx(2 / 4)


def test_without_dynamic_sampling_every_group_is_kept_and_counted():
    cfg = RLConfig(prompts_per_step=3, group_size=2, dynamic_sampling=False)
    engine = ScriptedEngine([["yes", "no"], ["no", "no"], ["yes", "yes"]])
    batch = collect(engine, CharTokenizer(), PromptSampler(rows(), 0), reward_set(), cfg, seed=0)
    assert len(engine.calls) == 1
    assert batch.rewards.tolist() == [1.0, 0.0, 0.0, 0.0, 1.0, 1.0]
    assert batch.groups_generated == 3 and batch.zero_variance_fraction == pytest.approx(2 / 3)


def test_dynamic_sampling_when_the_rounds_run_out():
    cfg = RLConfig(prompts_per_step=2, group_size=2, dynamic_sampling=True, max_sampling_rounds=3)
    # Some signal, then none: the step goes on with the one informative group it found.
    engine = ScriptedEngine([["yes", "no"], ["no", "no"], ["no", "no"], ["yes", "yes"]])
    batch = collect(engine, CharTokenizer(), PromptSampler(rows(), 0), reward_set(), cfg, seed=0)
    assert batch.texts == ["yes", "no"] and batch.groups_generated == 4
    assert batch.zero_variance_fraction == pytest.approx(3 / 4)
    # No signal at all: the last round's groups are kept rather than an empty batch.
    engine = ScriptedEngine([["no", "no"]] * 4 + [["yes", "yes"], ["no", "no"]])
    sampler = PromptSampler(rows(), 0)
    batch = collect(engine, CharTokenizer(), sampler, reward_set(), cfg, seed=0)
    assert batch.texts == ["yes", "yes", "no", "no"] and batch.rewards.tolist() == [1.0, 1.0, 0.0, 0.0]
    assert [r["id"] for r in batch.rows[::2]] == [r["id"] for r in PromptSampler(rows(), 0).take(6)[4:]]
    assert batch.groups_generated == 6 and batch.zero_variance_fraction == 1.0


def test_soft_overlong_penalty_enters_the_rewards():
    # max_new_tokens 8, buffer 4: a 3-token "yes" keeps its 1.0; the 8-token "yesyesye" gets 0 - 1
    # (length 8 = L), the 6-token "noooo!" gets (4 - 6) / 4 = -0.5 on its 0.
    cfg = RLConfig(prompts_per_step=1, group_size=3, max_new_tokens=8, overlong="soft", overlong_buffer=4)
    engine = ScriptedEngine([["yes", "yesyesye", "noooo!"]], max_new_tokens=8)
    batch = collect(engine, CharTokenizer(), PromptSampler(rows(), 0), reward_set(), cfg, seed=0)
    assert batch.rewards.tolist() == [1.0, -1.0, -0.5]
    assert batch.truncated == [False, True, False]
    assert batch.per_function == {"exact": [1.0, 0.0, 0.0]}  # the penalty is not a reward function's


def test_prompt_sampler_resumes_where_it_stopped():
    data = rows(5)
    a = PromptSampler(data, seed=3)
    a.take(7)  # into the second epoch
    b = PromptSampler(data, seed=3)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert [r["id"] for r in a.take(6)] == [r["id"] for r in b.take(6)]
    # Every epoch is a permutation of the rows.
    c = PromptSampler(data, seed=3)
    assert sorted(r["id"] for r in c.take(5)) == sorted(r["id"] for r in data)


# ----------------------------------------------------------------------------- the update
def tiny_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    cfg = get_preset("tiny", vocab_size=128, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64, max_seq_len=64)
    return Transformer(cfg).train()


def test_pack_sequences_aligns_the_completion_mask():
    ids, targets, mask = pack_sequences([[5, 6, 7], [1]], [[8, 9], [2, 3, 4]], torch.device("cpu"))
    assert ids.tolist() == [[5, 6, 7, 8, 9], [1, 2, 3, 4, 0]]
    assert targets.tolist() == [[6, 7, 8, 9, 0], [2, 3, 4, 0, 0]]
    # Position t predicts token t + 1: the mask covers the positions whose target is a completion token.
    assert mask.tolist() == [[0, 0, 1, 1, 0], [1, 1, 1, 0, 0]]


def scripted_batch(texts: list[list[str]], cfg: RLConfig) -> Rollouts:
    return collect(ScriptedEngine(texts), CharTokenizer(), PromptSampler(rows(), 0), reward_set(), cfg, seed=0)


def test_update_micro_batches_give_the_one_piece_gradient():
    # With SGD at lr 1 and no clipping, the weight change of one update is minus the gradient.
    cfg = RLConfig(prompts_per_step=2, group_size=2, max_new_tokens=8, tis_cap=0.0)
    batch = scripted_batch([["yes", "no!"], ["yesss", "n"]], cfg)
    adv = grpo.group_advantages(batch.rewards, 2)
    deltas = []
    for mb in (4, 1, 3):
        model = tiny_model()
        before = [p.detach().clone() for p in model.parameters()]
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        update(
            model,
            None,
            [opt],
            batch,
            adv,
            RLConfig(**{**cfg.__dict__, "micro_batch_size": mb}),
            0.0,
            torch.device("cpu"),
        )
        deltas.append(torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)]))
    assert deltas[0].abs().max() > 0
    for d in deltas[1:]:
        torch.testing.assert_close(d, deltas[0], rtol=1e-4, atol=1e-6)


def test_update_skips_zero_advantage_samples_without_changing_the_gradient():
    # Group 2 is all correct (zero variance, zero advantages): the update leaves it out of the
    # forward/backward, yet its weight change must equal minus the gradient of the loss over the
    # whole batch, computed here in one piece with every sample in it.
    cfg = RLConfig(prompts_per_step=3, group_size=2, max_new_tokens=8, tis_cap=0.0, micro_batch_size=2)
    batch = scripted_batch([["yes", "no!"], ["yes", "yes"], ["yesss", "yes"]], cfg)
    adv = grpo.group_advantages(batch.rewards, 2)
    assert adv[2:4].abs().max() == 0 and adv.abs().max() > 0
    for loss_agg in grpo.LOSS_AGGREGATIONS:
        c = RLConfig(**{**cfg.__dict__, "loss_agg": loss_agg})
        model = tiny_model()
        reference = tiny_model()
        reference.load_state_dict(model.state_dict())
        before = [p.detach().clone() for p in model.parameters()]
        stats = update(
            model, None, [torch.optim.SGD(model.parameters(), lr=1.0)], batch, adv, c, 0.0, torch.device("cpu")
        )
        assert stats["trained_fraction"] == pytest.approx(4 / 6)
        delta = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])

        ids, targets, mask = pack_sequences(batch.prompt_ids, batch.completion_ids, torch.device("cpu"))
        logp, _ = sequence_logprobs(reference, ids, targets, c.temperature)
        norm = grpo.AggregationNorm(float(mask.sum()), len(batch.rows), c.max_new_tokens)
        grpo.policy_loss(logp, logp.detach(), adv, mask, norm, loss_agg=loss_agg).loss.backward()
        grad = torch.cat([p.grad.flatten() for p in reference.parameters()])
        torch.testing.assert_close(delta, -grad, rtol=1e-4, atol=1e-7)


def test_update_statistics_are_per_token_whatever_num_iterations():
    # Engine log-probs equal to the trainer's make every importance weight 1, so their mean is 1;
    # before any step ratio = 1, so nothing is clipped on the first pass.
    cfg = RLConfig(prompts_per_step=2, group_size=2, max_new_tokens=8, tis_cap=2.0, num_iterations=2)
    batch = scripted_batch([["yes", "no!"], ["yesss", "n"]], cfg)
    model = tiny_model()
    ids, targets, _ = pack_sequences(batch.prompt_ids, batch.completion_ids, torch.device("cpu"))
    with torch.no_grad():
        logp, _ = sequence_logprobs(model, ids, targets, 1.0)
    for i, p in enumerate(batch.prompt_ids):
        n = len(batch.completion_ids[i])
        batch.engine_logprobs[i] = logp[i, len(p) - 1 : len(p) - 1 + n].tolist()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    stats = update(model, None, [opt], batch, grpo.group_advantages(batch.rewards, 2), cfg, 1.0, torch.device("cpu"))
    assert stats["is_weight"] == pytest.approx(1.0, abs=1e-5)
    # Fractions of tokens per pass, averaged over the 2 passes; the first pass clips nothing.
    assert 0.0 <= stats["clip_low"] and 0.0 <= stats["clip_high"] and stats["clip_low"] + stats["clip_high"] <= 0.5
    assert all(map(lambda v: v == v, stats.values()))  # no NaN


# ----------------------------------------------------------------------------- containment
def test_raising_and_hanging_rewards_are_contained_during_an_rl_step():
    # Three isolated (import-path) reward functions on P = 2 prompts x G = 2 samples:
    #   has_a:  1 when the text has an 'a'                     -> [1, 1, 0, 0]
    #   raiser: 0.5 each, raises on a text with BAD            -> the batch raises, the retry per sample
    #           fails only on "a BAD"                          -> [0, 0.5, 0.5, 0.5], 1 warning
    #   hanger: 0.25 each, sleeps on any batch with HANG       -> timeout: all 4 get 0, 4 warnings
    # totals [1, 1.5, 0.5, 0.5].
    rs = (
        RewardSet()
        .add("has_a", fixture("has_a"), 1.0)
        .add("raiser", fixture("raise_on_bad"), 1.0)
        .add("hanger", fixture("sleep_on_hang"), 1.0, timeout_s=1.0)
    )
    try:
        assert all(t.isolated for t in rs.terms)
        cfg = RLConfig(prompts_per_step=2, group_size=2, max_new_tokens=8)
        engine = ScriptedEngine([["a BAD", "a"], ["HANG", "b"]])
        model = tiny_model()
        before = [p.detach().clone() for p in model.parameters()]
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        t0 = time.perf_counter()
        batch = collect(engine, CharTokenizer(), PromptSampler(rows(), 0), rs, cfg, seed=0)
        adv = grpo.group_advantages(batch.rewards, cfg.group_size, cfg.scale_rewards)
        stats = update(model, None, [opt], batch, adv, cfg, 1.0, torch.device("cpu"))
        assert time.perf_counter() - t0 < 30
    finally:
        rs.close()
    assert batch.per_function == {
        "has_a": [1.0, 1.0, 0.0, 0.0],
        "raiser": [0.0, 0.5, 0.5, 0.5],
        "hanger": [0.0, 0.0, 0.0, 0.0],
    }
    assert batch.rewards.tolist() == [1.0, 1.5, 0.5, 0.5]
    assert dict(rs.warnings) == {"raiser:raised:RuntimeError": 1, "hanger:timeout": 4}
    assert stats["loss"] == stats["loss"] and stats["grad_norm"] > 0  # a finite step was taken
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))


# ----------------------------------------------------------------------------- exact resume
def tiny_checkpoint(directory: Path) -> Path:
    """A random tiny MoE model and a tokenizer trained on a few task texts, saved as a checkpoint."""
    from nanoseek.tasks.corpus import pretrain_texts
    from nanoseek.tokenizer import Tokenizer

    tokenizer = Tokenizer.train(pretrain_texts(200, seed=0), 300)
    torch.manual_seed(0)
    cfg = get_preset("tiny-moe", vocab_size=320, d_model=32, n_heads=2, n_kv_heads=1, d_ff=64, moe_d_ff=16, n_layers=2)
    save_model(Transformer(cfg), directory)
    tokenizer.save(directory)
    return directory


def rl_run() -> RunConfig:
    cfg = RunConfig(preset="tiny-moe")
    cfg.train = TrainConfig(steps=4, warmup_steps=1, lr=1e-2, checkpoint_every=100, seed=0, device="cpu")
    cfg.rl = RLConfig(
        prompts_per_step=2,
        group_size=2,
        max_new_tokens=8,
        eval_problems=4,
        eval_samples=1,
        rewards=f"{fixture('char_code_reward')}=1.0",
        micro_batch_size=2,
    )
    return cfg


def test_rl_resume_is_exact(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "sft")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    rl(rl_run(), straight, ckpt, quiet=True)
    rl(rl_run(), resumed, ckpt, quiet=True, stop_at=2)
    assert (resumed / "checkpoints" / "step_2").is_dir() and not (resumed / "checkpoints" / "step_4").exists()
    summary = rl(rl_run(), resumed, ckpt, quiet=True, resume=True)
    assert summary["steps"] == 4

    a = load_file(str(straight / "checkpoints" / "step_4" / "model.safetensors"))
    b = load_file(str(resumed / "checkpoints" / "step_4" / "model.safetensors"))
    start = load_file(str(ckpt / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert any(not torch.equal(a[k], start[k]) for k in a)  # RL did change the weights
    # The router's balancing bias (a buffer the optimizer hook moves) is part of the exact state too.
    assert any("e_score_correction_bias" in k and a[k].abs().sum() > 0 for k in a)

    def records(run: Path) -> list[dict]:
        out = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        # Everything but the wall-clock figures must match.
        return [{k: v for k, v in r.items() if not k.startswith("time_") and not k.endswith("_per_s")} for r in out]

    ra, rb = records(straight), records(resumed)
    assert ra == rb
    steps = [r for r in ra if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    # Not a vacuous comparison: the reward varied, so the updates had a signal.
    assert any(r["reward_std"] > 0 for r in steps) and any(r["loss"] != 0 for r in steps)


@pytest.mark.parametrize("steps, stop_at", [(3, None), (4, None), (4, 3)])
def test_a_long_rl_run_decodes_compiled_from_its_first_step(tmp_path, monkeypatch, steps, stop_at):
    """RL knows its length (the steps this process will run x max_new_tokens): at LONG_JOB_STEPS or more its engine
    decodes through the compiled step from the first decode step (the held-out evaluation's included), else only
    after the default COMPILE_AFTER_STEPS; a run stopped early (`stop_at`) counts the steps it will run. The compiled
    step is a stand-in here that records its calls and runs the step eagerly."""
    from nanoseek.engine import compiled
    from nanoseek.engine.sampling import sample
    from nanoseek.train import rl as rl_module

    calls, engines = [], []

    def stand_in(model, cache, ids, pos, kv_len, batch):
        calls.append(ids.shape[0])
        return sample(model.logits(model.hidden_states(ids, pos, cache=cache.decode(pos, kv_len))[:, -1]), batch)

    class Recorded(rl_module.Engine):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            engines.append(self)

    monkeypatch.setattr(compiled.COMPILED, "step", stand_in)
    monkeypatch.setattr(compiled.COMPILED, "steps", lambda *args: None)
    monkeypatch.setattr(compiled, "COMPILE_AFTER_STEPS", 16)
    monkeypatch.setattr(compiled, "LONG_JOB_STEPS", 32)  # rl_run: 8 new tokens a step, so 4 steps and not 3
    monkeypatch.setattr(rl_module, "Engine", Recorded)
    monkeypatch.delenv(compiled.COMPILE_ENV, raising=False)
    cfg = rl_run()
    cfg.train.steps = steps
    rl(cfg, tmp_path / "run", tiny_checkpoint(tmp_path / "sft"), quiet=True, stop_at=stop_at)
    (engine,) = engines
    decoded = engine.stats.decode_steps
    assert decoded > 16
    assert len(calls) == (decoded if (steps, stop_at) == (4, None) else decoded - 16)


def test_rl_max_samples_ends_the_run_at_its_budget_as_at_a_last_step(tmp_path):
    from nanoseek.speedrun import stage_done

    ckpt = tiny_checkpoint(tmp_path / "sft")
    budget, reference = tmp_path / "budget", tmp_path / "reference"
    cfg = rl_run()
    cfg.rl.max_samples = 6  # 2 prompts x 2 samples a step: reached after step 2 (8 generated)
    cfg.rl.eval_every = 1
    summary = rl(cfg, budget, ckpt, quiet=True)
    assert (summary["steps"], summary["samples"], summary["finished"]) == (2, 8, True)
    assert "after" in summary  # the final held-out evaluation ran, as after a last step
    records = [json.loads(line) for line in (budget / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval_accuracy" in r] == [0, 1, 2]  # before, periodic, final: once each
    assert [r["samples_total"] for r in records if "samples_total" in r] == [4, 8]
    assert stage_done(budget, cfg.train.steps)
    assert sorted(p.name for p in (budget / "checkpoints").iterdir()) == ["step_2"]  # saved although 2 % 100 != 0
    # The same two steps as a 4-step run interrupted after step 2 (the schedule spans train.steps either way).
    rl(rl_run(), reference, ckpt, quiet=True, stop_at=2)
    a = load_file(str(budget / "checkpoints" / "step_2" / "model.safetensors"))
    b = load_file(str(reference / "checkpoints" / "step_2" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not stage_done(reference, 4)
    # Resuming a run that ended at its budget takes no more steps.
    again = rl(cfg, budget, ckpt, quiet=True, resume=True)
    assert (again["steps"], again["samples"]) == (2, 8)
    assert sorted(p.name for p in (budget / "checkpoints").iterdir()) == ["step_2"]


def test_rl_with_a_16_bit_engine_twin_trains_exactly_as_without_it(tmp_path, monkeypatch):
    """Under bf16 autocast (CPU standing in for CUDA) the engine decodes a twin with bf16 matmul weights;
    synced after every update (and made after the resume), the run's weights equal a run whose engine decodes
    the float32 policy itself (bit for bit: the twin's logits are autocast's)."""
    import nanoseek.model.moe as moe_module
    import nanoseek.train.parallel as parallel_module
    import nanoseek.train.rl as rl_module
    import nanoseek.train.run as run_module

    monkeypatch.setattr(run_module, "autocast_dtype", lambda device: torch.bfloat16)  # autocast() on CPU too
    # CPU only: experts with little work stay float32 under autocast (moe._experts_dtype, and through the float32
    # kernel moe._FLOAT32_KERNEL_MIN_MACS), which the twin's bf16 weights do not follow, and a bf16 cache (the
    # twin's) attends through nanoseek's kernel, a float32 one (the policy's) not; off here, where the CPU stands in
    # for CUDA.
    monkeypatch.setattr(moe_module, "_CPU_BF16_MIN_MACS", 0)
    monkeypatch.setattr(moe_module, "_FLOAT32_KERNEL_MIN_MACS", 0)
    monkeypatch.setattr("nanoseek.engine.cache.KERNEL_ATTENTION", False)
    ckpt = tiny_checkpoint(tmp_path / "sft")
    syncs = []
    real_sync = parallel_module.sync_rollout_policy
    monkeypatch.setattr(
        parallel_module, "sync_rollout_policy", lambda twin, model: syncs.append(1) or real_sync(twin, model)
    )
    # Rollouts under bf16 autocast in both runs (a float32 tiny model would decode without it on a CPU).
    monkeypatch.setattr(run_module, "rollout_dtype", lambda model, device, rows: torch.bfloat16)
    monkeypatch.setattr(rl_module, "rollout_dtype", lambda model, device, rows: torch.bfloat16)
    rl(rl_run(), tmp_path / "twin", ckpt, quiet=True, stop_at=2)
    rl(rl_run(), tmp_path / "twin", ckpt, quiet=True, resume=True)
    assert len(syncs) == 4  # after each of the 4 updates
    # The engine runs the policy itself.
    monkeypatch.setattr(rl_module, "rollout_dtype", lambda model, device, rows: None)
    rl(rl_run(), tmp_path / "policy", ckpt, quiet=True)
    a = load_file(str(tmp_path / "twin" / "checkpoints" / "step_4" / "model.safetensors"))
    b = load_file(str(tmp_path / "policy" / "checkpoints" / "step_4" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_rollouts_decode_a_float32_policy_that_fits_a_cpus_cache_as_it_is(monkeypatch):
    """`rollout_dtype` / `rollout_autocast`: on a CPU with bf16, a float32 policy whose weights fit the cache, at up to
    ROLLOUT_FLOAT32_MAX_ROWS rows, is decoded as it is, without autocast; with more rows, or a larger policy, through
    its bf16 twin under autocast; a model that holds bf16 weights (a twin) under autocast; on CUDA bf16; without bf16,
    float32."""
    from types import SimpleNamespace

    from nanoseek import precision
    from nanoseek.engine.twin import rollout_policy
    from nanoseek.train.run import ROLLOUT_FLOAT32_MAX_ROWS, rollout_autocast, rollout_dtype

    model = Transformer(get_preset("tiny"))
    float32_bytes = 4 * sum(p.numel() for p in model.parameters())
    cpu, rows = torch.device("cpu"), ROLLOUT_FLOAT32_MAX_ROWS
    monkeypatch.setattr(precision, "cpu_bf16", lambda: True)
    monkeypatch.setattr(precision, "cpu_cache_bytes", lambda: float32_bytes)
    assert rollout_dtype(model, cpu, rows) is None
    assert rollout_dtype(model, cpu, rows + 1) == torch.bfloat16
    with rollout_autocast(SimpleNamespace(model=model, device=cpu, n_slots=rows)):
        assert not torch.is_autocast_enabled("cpu")
    twin = rollout_policy(model, torch.bfloat16)
    assert rollout_dtype(twin, cpu, 8) == torch.bfloat16
    with rollout_autocast(SimpleNamespace(model=twin, device=cpu, n_slots=8)):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    monkeypatch.setattr(precision, "cpu_cache_bytes", lambda: float32_bytes - 1)
    assert rollout_dtype(model, cpu, 8) == torch.bfloat16
    assert rollout_dtype(model, torch.device("cuda"), 8) == torch.bfloat16
    monkeypatch.setattr(precision, "cpu_bf16", lambda: False)
    assert rollout_dtype(model, cpu, 8) is None


# ----------------------------------------------------------------------------- held-out evaluation
def write_jsonl(path: Path, rows_: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows_))
    return path


def test_evaluate_grades_file_rows_by_math_equivalence_or_tests_and_task_rows_by_their_verifier(tmp_path):
    from nanoseek.tasks import get_task

    file = write_jsonl(
        tmp_path / "held.jsonl",
        [
            {"prompt": "half of one?", "answer": "0.5", "group": "frac"},
            {"messages": [{"role": "user", "content": "two?"}], "answer": "2"},
            {"prompt": "Write inc(x).", "tests": ["assert inc(1) == 2"], "group": "code"},
        ],
    )
    example = get_task("arithmetic").generate(1, split="test", seed=0)[0]
    wrong = str(int(example.answer) + 1)
    rows_ = [*file_rows(str(file)), dict(example.to_dict(), id="t0", group="arithmetic")]
    engine = ScriptedEngine(
        [
            ["<think>h</think>\\boxed{\\frac{1}{2}}", "<think>h</think>\\boxed{0.4}"],  # 1 of 2 (1/2 == 0.5)
            ["The answer is 2.", "<think>1+1</think>\\boxed{2}"],  # 2 of 2
            ["```python\ndef inc(x):\n    return x + 1\n```", "```python\ndef inc(x):\n    return x\n```"],  # 1 of 2
            [example.solution, f"<think>x</think>\\boxed{{{wrong}}}"],  # 1 of 2
        ]
    )
    result = evaluate(engine, CharTokenizer(), rows_, RLConfig(eval_samples=2), seed=0)
    assert result["accuracy"] == {
        "all": pytest.approx(5 / 8),
        "arithmetic": 0.5,
        "code": 0.5,
        "file": 1.0,
        "frac": 0.5,
    }


def test_rl_with_a_prompts_file_evaluates_on_its_eval_file(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "sft")
    questions = [{"prompt": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(11)]
    train = write_jsonl(tmp_path / "train.jsonl", questions[:6])
    held = write_jsonl(tmp_path / "held.jsonl", questions[6:])
    cfg = rl_run()
    cfg.train.steps = 1
    cfg.rl.prompts_file, cfg.rl.eval_file, cfg.rl.eval_problems = str(train), str(held), 3
    summary = rl(cfg, tmp_path / "run", ckpt, quiet=True)
    assert summary["eval_problems"] == 3
    assert set(summary["before"]) == set(summary["after"]) == {"all"}
    # Without eval_file a prompts_file run has nothing held out to evaluate on.
    cfg.rl.eval_file = ""
    summary = rl(cfg, tmp_path / "run2", ckpt, quiet=True)
    assert "before" not in summary and "eval_problems" not in summary


def test_rl_on_code_rows_with_the_code_reward(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "sft")
    rows_ = [{"prompt": f"Write f(x) returning x + {i}.", "tests": [f"assert f(1) == {1 + i}"]} for i in range(4)]
    cfg = rl_run()
    cfg.train.steps = 1
    cfg.rl.prompts_file = str(write_jsonl(tmp_path / "train.jsonl", rows_))
    cfg.rl.eval_file = cfg.rl.prompts_file
    cfg.rl.rewards = "code=1.0"
    summary = rl(cfg, tmp_path / "run", ckpt, quiet=True)
    step = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"reward"' in x]
    assert step[0]["reward/code"] == 0.0 and "reward_warnings" not in step[0]  # no code block: 0, not a failure
    assert summary["before"]["all"] == summary["after"]["all"] == 0.0
    cfg.rl.rewards = "math=1.0"  # rows without an answer: refused before the run, naming the file and row
    with pytest.raises(ValueError, match=r"train.jsonl: row 1 has no 'answer' field"):
        rl(cfg, tmp_path / "run2", ckpt, quiet=True)


# ----------------------------------------------------------------------------- episodes and environments
def test_prompt_rows_through_the_episode_runner_give_the_completions_and_rewards_of_before():
    """One rollout path: a prompt row is a one-turn episode; its samples and rewards are the ones the
    engine's `generate` and the reward functions gave before (same seed, same sampling keys)."""
    from nanoseek.engine import Engine, SamplingParams

    model = tiny_model().eval()
    data = [dict(id=f"q{i}", prompt=f"say {'yes' if i % 2 else 'no'}", answer="yes") for i in range(6)]
    cfg = RLConfig(prompts_per_step=3, group_size=4, max_new_tokens=6, temperature=1.0)
    tok = CharTokenizer()
    order = PromptSampler(data, 0).take(3)
    # before: generate + the reward functions over the rows
    params = SamplingParams.from_config(cfg, n=cfg.group_size, seed=7 * 1000)
    before = Engine(model, tok, max_batch=16).generate([tok.encode(prompt_of(r)) for r in order], params)
    texts = [c.text for group in before for c in group]
    flat_rows = [r for r in order for _ in range(cfg.group_size)]
    expected = reward_set().score([r["prompt"] for r in flat_rows], texts, flat_rows).total
    # now: collect through run_episodes
    batch = collect(Engine(model, tok, max_batch=16), tok, PromptSampler(data, 0), reward_set(), cfg, seed=7)
    assert batch.completion_ids == [c.token_ids for group in before for c in group]
    assert batch.engine_logprobs == [c.logprobs for group in before for c in group]
    assert batch.texts == texts and batch.rewards.tolist() == expected
    assert batch.policy_masks == [[1] * len(c) for c in batch.completion_ids]
    assert len({tuple(c) for c in batch.completion_ids}) > 3  # different samples: a real comparison


def test_loss_gradient_on_environment_tokens_is_exactly_zero(monkeypatch):
    """Environment tokens are context: the loss's gradient with respect to their log-probs is exactly
    zero (policy tokens' is not), and they are not counted in the length statistics."""
    from nanoseek.train import update as update_module
    from nanoseek.train.rollouts import batch_statistics

    batch = Rollouts(
        rows=[dict(id="a", env="e"), dict(id="b", env="e")],
        prompt_ids=[[1, 2, 3], [4, 5]],
        completion_ids=[[6, 7, 8, 9, 10], [11, 12, 13]],
        engine_logprobs=[[-1.0, -1.0, 0.0, 0.0, -1.0], [-1.0, 0.0, -1.0]],
        texts=["", ""],
        truncated=[False, False],
        policy_masks=[[1, 1, 0, 0, 1], [1, 0, 1]],
        turn_advantage_spans=[[], []],
        rewards=torch.tensor([1.0, 0.0]),
        per_function={"return": [1.0, 0.0]},
        correct=[True, False],
        groups_generated=1,
        zero_variance_fraction=0.0,
        sampled_reward=0.5,
        sampled_accuracy=0.5,
        sampled_tokens=5,
        reward_warnings={},
    )
    seen = []

    def keep_grad(*args, **kwargs):
        logp, entropy = sequence_logprobs(*args, **kwargs)
        if logp.requires_grad:
            logp.retain_grad()
            seen.append(logp)
        return logp, entropy

    monkeypatch.setattr(update_module, "sequence_logprobs", keep_grad)
    for loss_agg in grpo.LOSS_AGGREGATIONS:
        seen.clear()
        model = tiny_model()
        cfg = RLConfig(group_size=2, tis_cap=2.0, loss_agg=loss_agg, max_new_tokens=8)
        update(
            model,
            None,
            [torch.optim.SGD(model.parameters(), lr=0.0)],
            batch,
            torch.tensor([1.0, -1.0]),
            cfg,
            0.0,
            torch.device("cpu"),
        )
        [logp] = seen
        grad = logp.grad
        env = [(0, 2 + 2), (0, 2 + 3), (1, 1 + 1)]  # (row, position predicting the token): prompt length - 1 + j
        policy = [(0, 2), (0, 3), (0, 6), (1, 1), (1, 3)]
        assert all(grad[r, t].item() == 0.0 for r, t in env)
        assert all(grad[r, t].item() != 0.0 for r, t in policy)
    assert batch_statistics(batch)["length_mean"] == (3 + 2) / 2


def test_rl_envs_setting_is_checked():
    from nanoseek.config import parse_env_weights
    from nanoseek.envs import HELD_OUT_SEED_START
    from nanoseek.errors import UserError
    from nanoseek.train.rollouts import EnvSampler, held_out_env_rows, make_envs

    assert parse_env_weights("guess_number, task:arithmetic:2,task:countdown", "rl.envs") == {
        "guess_number": 1.0,
        "task:arithmetic": 2.0,
        "task:countdown": 1.0,
    }
    for bad in ("guess_number:-1", ",", "a:nan"):
        cfg = RunConfig()
        cfg.rl.envs = bad
        with pytest.raises(UserError, match="rl.envs"):
            cfg.check()
    cfg = RunConfig()
    cfg.rl.envs, cfg.rl.prompts_file = "guess_number", "x.jsonl"
    with pytest.raises(UserError, match="rl.envs and rl.prompts_file"):
        cfg.check()
    with pytest.raises(UserError, match="no_such_env"):
        make_envs([{"env": "no_such_env"}], RLConfig(), 1)
    with pytest.raises(UserError, match="bogus"):
        make_envs([{"env": "guess_number"}], RLConfig(difficulty={"guess_number": {"bogus": 1}}), 1)
    # training seeds count up from 0, held-out ones from 1e9: disjoint
    sampler = EnvSampler("guess_number:1,task:arithmetic:3", seed=0)
    rows_ = sampler.take(40)
    assert [r["seed"] for r in rows_] == list(range(40)) and {r["env"] for r in rows_} == {
        "guess_number",
        "task:arithmetic",
    }
    assert min(r["seed"] for r in held_out_env_rows("guess_number", 5)) >= HELD_OUT_SEED_START


def test_rl_on_an_environment_trains_and_evaluates_on_held_out_seeds(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "sft")
    cfg = rl_run()
    cfg.train.steps = 2
    cfg.rl.envs, cfg.rl.rewards, cfg.rl.turn_credit = "guess_number", "task=1.0", True
    cfg.rl.difficulty = {"guess_number": {"n": 4, "max_turns": 3}}  # small: some episodes succeed by luck
    cfg.rl.max_new_tokens, cfg.rl.group_size = 6, 4
    summary = rl(cfg, tmp_path / "run", ckpt, quiet=True)
    assert set(summary["before"]) == {"guess_number", "all"} and summary["eval_problems"] == 4
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2] and all("reward/return" in r for r in steps)
