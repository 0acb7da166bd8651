"""Sampling: filters against a brute-force reference, the sampler's draws, log-probs, seeds, validation."""

from __future__ import annotations

import bisect
import math
import random

import pytest
import torch

from nanoseek.engine.sampling import (
    SamplingBatch,
    SamplingParams,
    _mix32,
    _mul32,
    filter_logits,
    sample,
    sequence_key,
    uniform_noise,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def reference_keep(logits: list[float], k: int, p: float, m: float) -> set[int]:
    """The kept set, written from the definitions with Python floats (float64)."""
    order = sorted(range(len(logits)), key=lambda i: -logits[i])
    if k > 0:
        order = order[:k]
    top = logits[order[0]]
    weight = {i: math.exp(logits[i] - top) for i in order}
    total = sum(weight.values())
    if p < 1:
        kept, mass_before = [], 0.0
        for i in order:
            if mass_before < p:
                kept.append(i)
            mass_before += weight[i] / total
        order = kept
    # min-p: p_i >= m * p_max, i.e. exp(l_i - l_max) >= m
    return {i for i in order if weight[i] >= m}


def random_settings(rng: random.Random, V: int) -> tuple[int, float, float]:
    k = rng.choice([0, 0, 1, 2, 5, rng.randint(1, V), V + 3])
    p = rng.choice([1.0, 1.0, rng.uniform(0.05, 0.999), 0.5])
    m = rng.choice([0.0, 0.0, rng.uniform(0.001, 0.5), 1.0])
    return k, p, m


def batch_for(temps, ks, ps, ms, keys=None, steps=None) -> SamplingBatch:
    B = len(temps)
    params = [SamplingParams(temperature=t, top_k=k, top_p=p, min_p=m) for t, k, p, m in zip(temps, ks, ps, ms)]
    keys = keys or [sequence_key(0, i) for i in range(B)]
    return SamplingBatch.build(params, keys, steps or [0] * B, torch.device("cpu"))


def test_filter_matches_brute_force_reference():
    rng = random.Random(0)
    gen = torch.Generator().manual_seed(0)
    B, V = 64, 40
    logits = torch.randn(B, V, generator=gen) * torch.rand(B, 1, generator=gen) * 4
    settings = [random_settings(rng, V) for _ in range(B)]
    k, p, m = (torch.tensor([s[j] for s in settings]) for j in range(3))
    kept = filter_logits(logits, k, p.float(), m.float())
    for b in range(B):
        got = set(torch.nonzero(kept[b] > float("-inf")).flatten().tolist())
        assert got == reference_keep(logits[b].tolist(), *settings[b]), (b, settings[b])
        # kept logits are unchanged
        assert torch.equal(kept[b][list(got)], logits[b][list(got)])


def test_filters_off_keep_everything():
    logits = torch.randn(3, 17)
    kept = filter_logits(logits, torch.zeros(3, dtype=torch.long), torch.ones(3), torch.zeros(3))
    assert torch.equal(kept, logits)


def test_sampled_tokens_stay_in_the_set_and_follow_the_distribution():
    gen = torch.Generator().manual_seed(1)
    V, draws = 12, 4000
    base = torch.randn(V, generator=gen) * 1.5
    for k, p, m, t in [(4, 1.0, 0.0, 1.0), (0, 0.7, 0.0, 0.8), (0, 1.0, 0.2, 1.3), (6, 0.9, 0.05, 1.0)]:
        logits = base.expand(draws, V)
        batch = batch_for(
            [t] * draws, [k] * draws, [p] * draws, [m] * draws, keys=[sequence_key(7, i) for i in range(draws)]
        )
        tokens, _ = sample(logits, batch)
        allowed = reference_keep((base / t).tolist(), k, p, m)
        assert set(tokens.tolist()) <= allowed
        # frequencies match the renormalised, filtered distribution
        mask = torch.full((V,), float("-inf"))
        mask[list(allowed)] = 0
        target = (base / t + mask).softmax(-1)
        freq = torch.bincount(tokens, minlength=V).float() / draws
        assert (freq - target).abs().max() < 0.035, (k, p, m, t)


def test_greedy_rows_ignore_filters_and_logprobs_come_before_filtering():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 30, generator=gen) * 3
    temps, ks, ps, ms = [0.0, 0.7, 0.7, 1.0], [3, 3, 0, 0], [0.5, 1.0, 0.3, 1.0], [0.0, 0.0, 0.0, 0.5]
    tokens, logprobs = sample(logits, batch_for(temps, ks, ps, ms))
    assert tokens[0] == logits[0].argmax()
    for b, t in enumerate(temps):
        expected = torch.log_softmax(logits[b] / (t or 1.0), -1)[tokens[b]]
        torch.testing.assert_close(logprobs[b], expected, rtol=0, atol=1e-6)


def test_sampling_is_seeded_and_independent_of_the_batch():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 50, generator=gen)
    keys = [sequence_key(s, 0, 0) for s in range(6)]
    a, _ = sample(logits, batch_for([1.0] * 6, [0] * 6, [1.0] * 6, [0.0] * 6, keys=keys, steps=[5] * 6))
    b, _ = sample(logits, batch_for([1.0] * 6, [0] * 6, [1.0] * 6, [0.0] * 6, keys=keys, steps=[5] * 6))
    assert torch.equal(a, b)
    # row 3 alone draws what it drew in the batch
    c, _ = sample(logits[3:4], batch_for([1.0], [0], [1.0], [0.0], keys=keys[3:4], steps=[5]))
    assert c.item() == a[3].item()
    # other steps / keys give other draws
    draws = uniform_noise(torch.tensor([keys[0], keys[0], keys[1]]), torch.tensor([5, 6, 5])).tolist()
    assert len(set(draws)) == 3
    assert sequence_key(1, 0, 0) != sequence_key(1, 0, 1) != sequence_key(1, 1, 0)


def test_batch_upload_keeps_keys_steps_and_top_k_exact():
    """The per-step parameters travel as one float64 tensor: integers below 2^53 come back exactly."""
    keys = [(2**32 - 1, 2**32 - 2), (0, 1)]
    params = [SamplingParams(temperature=0.7, top_k=151_935, top_p=0.9, min_p=0.05), None]
    batch = SamplingBatch.build(params, keys, [2**31 + 5, 0], torch.device("cpu"))
    assert batch.keys.dtype == batch.steps.dtype == batch.top_k.dtype == torch.int64
    assert batch.keys.tolist() == [list(k) for k in keys] and batch.steps.tolist() == [2**31 + 5, 0]
    assert batch.top_k.tolist() == [151_935, 0] and batch.temperature.tolist() == [0.7, 0.0]
    assert batch.top_p.tolist() == [0.9, 1.0] and batch.min_p.tolist() == [0.05, 0.0]
    assert batch.any_sampling and batch.any_filter


def test_hash_arithmetic_and_noise_statistics():
    rng = random.Random(4)
    xs = [rng.getrandbits(32) for _ in range(1000)] + [0, 2**32 - 1]
    for c in (0x7FEB352D, 0x846CA68B, 0xFFFFFFFF):
        assert _mul32(torch.tensor(xs), c).tolist() == [(x * c) % 2**32 for x in xs]
    assert _mix32(torch.tensor(xs)).max() < 2**32 and _mix32(torch.tensor(xs)).min() >= 0
    keys = torch.tensor([sequence_key(9, i) for i in range(20_000)])
    u = uniform_noise(keys, torch.arange(20_000) % 7)
    assert u.dtype == torch.float64 and 0 < u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.005 and abs(u.std().item() - 1 / math.sqrt(12)) < 0.005
    assert u.unique().numel() == 20_000
    # 48 bits: the draws' fractional parts past 2^-24 are used too (a 24-bit draw would be a multiple of 2^-24)
    assert ((u * 2.0**24) % 1).std() > 0.25


def test_sampled_tokens_are_the_inverse_cdf_of_the_draw_even_in_a_long_tail():
    """The sampler picks the first token whose running sum of exp(logit - max) reaches u x total, u the row's
    draw: checked against Python's float64 running sum, on a row whose top token is followed by 20,000 tokens
    of relative weight 5.6e-8 each (0.11% of the mass together). A float32 running sum near 1 would drop them:
    each is below half a float32 step at 1."""
    V = 20_001
    logits = torch.full((V,), -16.7, dtype=torch.float64)
    logits[0] = 0.0
    cum, running = [], 0.0
    for w in (logits - logits.max()).exp().tolist():
        running += w
        cum.append(running)
    tail = 1 - cum[0] / running  # the mass after the top token
    # keys whose draw lands past the top token, and some that do not
    candidates = torch.tensor([sequence_key(11, i) for i in range(200_000)])
    u = uniform_noise(candidates, torch.zeros(len(candidates), dtype=torch.int64))
    rows = torch.cat([(u > 1 - tail).nonzero().squeeze(1)[:150], torch.arange(50)])
    keys, draws = candidates[rows], u[rows].tolist()
    batch = SamplingBatch(
        temperature=torch.ones(len(rows), dtype=torch.float64),
        top_k=torch.zeros(len(rows), dtype=torch.int64),
        top_p=torch.ones(len(rows), dtype=torch.float64),
        min_p=torch.zeros(len(rows), dtype=torch.float64),
        keys=keys,
        steps=torch.zeros(len(rows), dtype=torch.int64),
        any_sampling=True,
        any_filter=False,
    )
    tokens, _ = sample(logits.expand(len(rows), V), batch)
    expected = [bisect.bisect_left(cum, d * running) for d in draws]
    assert tokens.tolist() == expected
    assert sum(t != 0 for t in expected) >= 150 and len(set(expected)) > 100  # the tail was reached


@pytest.mark.parametrize(
    "field,value",
    [
        ("max_new_tokens", 0),
        ("max_new_tokens", 2.5),
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("top_k", -1),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("min_p", -0.1),
        ("min_p", 1.01),
        ("n", 0),
        ("seed", -3),
        ("stop_ids", [-1]),
        ("stop_ids", [10**6]),
        ("stop_strings", [""]),
        ("ignore_eos", "yes"),
    ],
)
def test_bad_params_name_the_field(field, value):
    params = SamplingParams(**{field: value})
    with pytest.raises(ValueError, match=f"SamplingParams.{field}"):
        params.validate(vocab_size=1000)


def test_good_params_pass():
    SamplingParams().validate(10)
    SamplingParams(
        temperature=0, top_k=5, top_p=0.3, min_p=0.1, n=4, seed=0, stop_ids=[1], stop_strings=["\n"]
    ).validate(10)


def test_from_config_reads_the_settings_named_like_its_fields():
    """Every place that turns settings into a request: a config section, command-line options, an HTTP body.
    The reference is the field-by-field construction each of them wrote before."""
    import argparse

    from nanoseek.config import EvalConfig, RLConfig

    ev = EvalConfig(temperature=0.3, top_p=0.5, top_k=7, min_p=0.1, max_new_tokens=9, seed=4, stop=["x"])
    expected = SamplingParams(
        max_new_tokens=9, temperature=0.3, top_k=7, top_p=0.5, min_p=0.1, n=3, seed=4, stop_strings=["x", "y"]
    )
    assert SamplingParams.from_config(ev, n=3, stop_strings=["x", "y"]) == expected
    rl = RLConfig(max_new_tokens=5, temperature=0.7, top_p=0.9, group_size=4)
    assert SamplingParams.from_config(rl, n=rl.group_size, seed=1) == SamplingParams(
        max_new_tokens=5, temperature=0.7, top_p=0.9, n=4, seed=1
    )
    args = argparse.Namespace(max_new_tokens=6, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, seed=None)
    args.stop, args.ignore_eos, args.n, args.chat = ["\n"], True, 2, True
    assert SamplingParams.from_config(args) == SamplingParams(
        max_new_tokens=6, temperature=0.0, n=2, stop_strings=["\n"], ignore_eos=True
    )
    body = {"temperature": 0.5, "n": 2, "seed": 3, "stop_ids": [1], "max_tokens": 7, "model": "m"}
    assert SamplingParams.from_config(body, max_new_tokens=7) == SamplingParams(
        max_new_tokens=7, temperature=0.5, n=2, seed=3
    )  # stop_ids are token ids, never a setting
