"""Multi-turn sequences in the engine: appending tokens to a kept sequence's KV cache equals prefilling
the whole transcript (float64), continuations batched with each other and with decoding sequences,
the history is never prefilled again, and a group's n samples prefill their shared prompt once."""

from __future__ import annotations

import pytest
import torch

from nanoseek.engine import Engine, SamplingParams
from nanoseek.model import ModelConfig, Transformer, get_preset

pytestmark = pytest.mark.usefixtures("one_thread")

MLA = dict(attn_type="mla", q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)


def build(name: str) -> Transformer:
    """A random tiny float64 model; init_std 0.2 so greedy outputs depend on the context."""
    torch.manual_seed(0)
    base = get_preset("tiny").to_dict() if name == "mla" else get_preset(name).to_dict()
    cfg = ModelConfig(**{**base, **(MLA if name == "mla" else {}), "init_std": 0.2})
    return Transformer(cfg).eval().double()


def tokens(n: int, seed: int) -> list[int]:
    return torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def full_logits(model: Transformer, ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([ids]))[0]


@torch.no_grad()
def naive_greedy(model: Transformer, context: list[int], n: int) -> list[int]:
    ids = list(context)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(context) :]


def run_turns(engine: Engine, episodes: list[tuple[list[int], list[tuple[list[int], int]]]], first_max: list[int]):
    """Drive kept sequences through turns: episode = (prompt, [(appended tokens, max_new), ...]).
    Returns each episode's transcript and the (start, end) spans and log-probs of its generated turns."""
    requests = [
        engine.submit(p, SamplingParams(max_new_tokens=m, temperature=0, ignore_eos=True), index=i, keep=True)
        for i, ((p, _), m) in enumerate(zip(episodes, first_max))
    ]
    transcripts = [list(p) for p, _ in episodes]
    spans: list[list[tuple[int, int]]] = [[] for _ in episodes]
    logprobs: list[list[float]] = [[] for _ in episodes]
    turn = [0] * len(episodes)
    done = [False] * len(episodes)
    while not all(done):
        engine.step()
        for i, r in enumerate(requests):
            seq = r.seqs[0] if r.seqs else None
            if done[i] or seq is None or seq.finish_reason is None:
                continue
            spans[i].append((len(transcripts[i]), len(transcripts[i]) + len(seq.tokens)))
            transcripts[i] += seq.tokens
            logprobs[i] += seq.logprobs
            turns = episodes[i][1]
            if turn[i] == len(turns):
                engine.release_sequence(seq)
                done[i] = True
                continue
            appended, max_new = turns[turn[i]]
            turn[i] += 1
            transcripts[i] += appended
            engine.continue_sequence(seq, appended, max_new)
    return transcripts, spans, logprobs


@pytest.mark.parametrize("name", ["tiny", "tiny-moe", "mla"])
def test_continuation_logits_equal_prefilling_the_whole_transcript(name):
    model = build(name)
    engine = Engine(model, max_batch=2, compile=False)
    seen: list[torch.Tensor] = []
    logits = model.logits
    model.logits = lambda hidden: seen.append(out := logits(hidden)) or out  # every sampled position's logits
    try:
        [transcript], [spans], _ = run_turns(engine, [(tokens(9, 1), [(tokens(6, 2), 5), (tokens(3, 3), 4)])], [4])
    finally:
        del model.logits
    assert [e - s for s, e in spans] == [4, 5, 4]
    reference = full_logits(model, transcript)
    positions = [p - 1 for s, e in spans for p in range(s, e)]  # the logits that drew each generated token
    torch.testing.assert_close(torch.cat(seen), reference[positions], rtol=0, atol=1e-5)
    # the history went in once: the prompt by prefill, each turn's last token + the appended ones by extension
    assert engine.stats.prefill_tokens == 9 and engine.stats.extend_tokens == (1 + 6) + (1 + 3)


@pytest.mark.parametrize("name", ["tiny-moe", "mla"])
def test_batched_continuations_match_greedy_on_the_transcript(name):
    """Sequences of different lengths continue in the same steps (padded rows, gathered slots) while
    others are still decoding; every turn is the naive greedy continuation of its transcript so far, and
    the stored log-probs equal teacher forcing of the whole transcript."""
    model = build(name)
    engine = Engine(model, max_batch=4, compile=False)
    episodes = [
        (tokens(5, 10), [(tokens(7, 11), 3), (tokens(2, 12), 6)]),
        (tokens(12, 13), [(tokens(1, 14), 8)]),
        (tokens(3, 15), [(tokens(11, 16), 2), (tokens(4, 17), 2), (tokens(9, 18), 5)]),
        (tokens(8, 19), []),
    ]
    transcripts, spans, logprobs = run_turns(engine, episodes, [2, 6, 3, 9])
    assert engine.stats.extend_calls < sum(len(t) for _, t in episodes)  # some continuations shared a forward
    for transcript, turn_spans, lps in zip(transcripts, spans, logprobs):
        for s, e in turn_spans:
            assert transcript[s:e] == naive_greedy(model, transcript[:s], e - s)
        logp = torch.log_softmax(full_logits(model, transcript), -1)
        positions = [p for s, e in turn_spans for p in range(s, e)]
        expected = logp[[p - 1 for p in positions], [transcript[p] for p in positions]]
        torch.testing.assert_close(torch.tensor(lps, dtype=torch.float64), expected, rtol=0, atol=1e-10)
    assert not engine._kept and len(engine._free) == engine.n_slots  # released slots are free again


def test_shared_prompt_prefilled_once_equals_separate_prefills():
    model = build("tiny-moe")
    prompt = tokens(14, 30)
    params = SamplingParams(max_new_tokens=6, temperature=1.0, n=3, seed=4)
    engine = Engine(model, max_batch=3, compile=False)
    [group] = engine.generate([prompt], params)
    assert engine.stats.prefill_tokens == len(prompt) and engine.stats.prefill_calls == 1
    # each sample's log-probs equal teacher forcing of its own sequence (temperature 1: plain log-softmax)
    for c in group:
        logp = torch.log_softmax(full_logits(model, prompt + c.token_ids), -1)
        expected = logp[len(prompt) - 1 : -1].gather(1, torch.tensor(c.token_ids)[:, None]).squeeze(1)
        torch.testing.assert_close(torch.tensor(c.logprobs, dtype=torch.float64), expected, rtol=0, atol=1e-10)
    assert len({tuple(c.token_ids) for c in group}) > 1  # different samples: a real check of the copies
    # the cache the copies left equals three separate prefills of the prompt
    shared = Engine(model, max_batch=3, compile=False)
    shared.submit(prompt, SamplingParams(max_new_tokens=1, n=3), keep=True)
    shared.step()
    separate = Engine(model, max_batch=3, compile=False)
    for i in range(3):
        separate.submit(prompt, SamplingParams(max_new_tokens=1), index=i, keep=True)
    separate.step()
    assert separate.stats.prefill_tokens == 3 * len(prompt) and shared.stats.prefill_tokens == len(prompt)
    P = len(prompt)
    torch.testing.assert_close(shared.cache.k[:, :3, :, :P], separate.cache.k[:, :3, :, :P], rtol=0, atol=1e-12)


def test_continue_and_release_contract():
    model = build("tiny")
    engine = Engine(model, max_batch=2, max_seq_len=24, compile=False)
    plain = engine.submit(tokens(4, 40), SamplingParams(max_new_tokens=2, temperature=0))
    kept = engine.submit(tokens(4, 41), SamplingParams(max_new_tokens=2, temperature=0), keep=True)
    while engine.has_work:  # a kept, finished sequence is not work: generate-style loops end
        engine.step()
    with pytest.raises(ValueError, match="keep=True"):
        engine.continue_sequence(plain.seqs[0], [1, 2], 3)
    seq = kept.seqs[0]
    assert engine.room(seq) == 24 - 2 - seq.position and len(engine._free) == 1  # the kept slot stays taken
    with pytest.raises(ValueError, match="do not fit"):
        engine.continue_sequence(seq, [1] * (engine.room(seq) + 1), 3)
    engine.continue_sequence(seq, [1] * engine.room(seq), 50)
    while engine.has_work:
        engine.step()
    assert seq.finish_reason == "length" and len(seq.tokens) == 1 and seq.position == 23  # the context is full
    with pytest.raises(RuntimeError, match="kept"):
        engine.release()
    engine.release_sequence(seq)
    assert len(engine._free) == 2
    engine.release()


def test_continuations_through_the_cpu_attention_kernel_within_bf16_tolerance(monkeypatch, attention_kernel_calls):
    """A bf16 cache of many slots attends through nanoseek's CPU kernel, continuations too (rows of several new
    tokens, each reading its own slot): every generated token's log-prob within bf16's tolerance of the float32
    model's on the transcript, as close as the engine's own attention paths come."""
    from nanoseek.engine import cache as cache_mod
    from nanoseek.engine.twin import rollout_policy

    torch.manual_seed(0)
    model = Transformer(get_preset("tiny", init_std=0.05)).eval()
    twin = rollout_policy(model, torch.bfloat16)
    episodes = [(tokens(5 + 3 * i, i), [(tokens(4 + i % 3, 100 + i), 3), (tokens(2, 200 + i), 4)]) for i in range(6)]
    errors = {}
    for kernel in (True, False):
        monkeypatch.setattr(cache_mod, "KERNEL_ATTENTION", kernel)
        with torch.autocast("cpu", dtype=torch.bfloat16), attention_kernel_calls() as calls:
            engine = Engine(twin, max_batch=64, compile=False)
            transcripts, spans, logprobs = run_turns(engine, episodes, [3] * 6)
        assert engine.cache.kernel_attention == kernel and bool(calls) == kernel
        if kernel:  # the continuations' rows of several tokens went through it
            assert any(t > 1 for _, t in calls)  # eager: every call's shapes recorded
        errors[kernel] = []
        for transcript, turn_spans, got in zip(transcripts, spans, logprobs):
            logp = torch.log_softmax(full_logits(model, transcript).float(), -1)
            want = [logp[j - 1, transcript[j]].item() for start, end in turn_spans for j in range(start, end)]
            errors[kernel] += [abs(a - b) for a, b in zip(got, want)]
    for kernel, errs in errors.items():
        assert max(errs) < 0.1 and sum(errs) / len(errs) < 0.02, (kernel, max(errs))
