"""The engine against naive generation: greedy outputs, log-probs, continuous batching, seeds,
n samples on one prefill, stopping, bad requests, the live-model contract, and the CLI commands."""

from __future__ import annotations

import io
import json
import sys

import pytest
import torch

from nanoseek.engine import Engine, KVCache, SamplingParams
from nanoseek.engine.cache import bf16_for_the_kernel
from nanoseek.engine.cuda_graphs import batch_buckets, kv_len_bucket
from nanoseek.engine.twin import rollout_policy, sync_rollout_policy
from nanoseek.model import ModelConfig, Transformer, get_preset, save_model
from nanoseek.model.transformer import RMSNorm

MLA = dict(attn_type="mla", q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)


pytestmark = pytest.mark.usefixtures("one_thread")


def build(name: str, **overrides) -> Transformer:
    """A random tiny model; init_std 0.2 (not 0.02) so greedy outputs vary with the context
    instead of repeating one token, which would make the comparisons below vacuous."""
    torch.manual_seed(0)
    overrides = {"init_std": 0.2, **overrides}
    cfg = (
        ModelConfig(**{**get_preset("tiny").to_dict(), **MLA, **overrides})
        if name == "mla"
        else get_preset(name, **overrides)
    )
    return Transformer(cfg).eval()


@pytest.fixture(scope="module")
def models() -> dict[str, Transformer]:
    return {name: build(name) for name in ("tiny", "tiny-moe", "mla")}


def prompts_of(lengths, vocab=512, seed=1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def naive_greedy(model: Transformer, prompt: list[int], n: int, stop: set[int] = frozenset()) -> list[int]:
    """Recompute the whole sequence every step, no cache."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids], device=model.embed.weight.device))[0, -1].argmax()))
        if ids[-1] in stop:
            break
    return ids[len(prompt) :]


GREEDY = SamplingParams(max_new_tokens=12, temperature=0)


@torch.no_grad()
def teacher_forced_logprobs(model: Transformer, completion, temperature: float = 1.0) -> torch.Tensor:
    """[new tokens, vocab]: the log-softmax the model gives each of a completion's positions in one full forward."""
    ids = torch.tensor([completion.prompt_ids + completion.token_ids])
    logp = torch.log_softmax(model(ids)[0] / temperature, -1)
    return logp[len(completion.prompt_ids) - 1 : -1]


# ----------------------------------------------------------------------------- correctness
@pytest.mark.parametrize("name", ["tiny", "tiny-moe", "mla"])
def test_greedy_matches_naive_generation(models, name):
    model = models[name]
    prompts = prompts_of([1, 5, 17, 30, 9])
    results = Engine(model, max_batch=8).generate(prompts, GREEDY)
    for prompt, [c] in zip(prompts, results):
        assert c.token_ids == naive_greedy(model, prompt, 12)
        assert len(set(c.token_ids)) > 3  # a meaningful comparison, not one repeated token
        assert c.finish_reason == "length" and c.prompt_ids == prompt and len(c.logprobs) == 12


@pytest.mark.parametrize(
    "name,dtype,atol", [("tiny", torch.float32, 1e-5), ("mla", torch.float32, 1e-5), ("tiny-moe", torch.float64, 1e-10)]
)
def test_logprobs_equal_teacher_forced_forward(name, dtype, atol):
    # float32 at the usual init scale (logits of order 1); float64 at the large init, to show the
    # remaining float32 differences are rounding (different summation orders), not a wrong definition.
    model = build(name, init_std=0.02 if dtype == torch.float32 else 0.2).to(dtype)
    prompts = prompts_of([3, 11, 20], seed=2)
    params = SamplingParams(max_new_tokens=10, temperature=0.7, top_k=50, top_p=0.9, n=2, seed=5)
    results = Engine(model, max_batch=8).generate(prompts, params) + Engine(model).generate(prompts[:1], GREEDY)
    temps = [0.7] * len(prompts) + [1.0]  # greedy: temperature 1
    for group, temp in zip(results, temps):
        for c in group:
            expected = teacher_forced_logprobs(model, c, temp).gather(1, torch.tensor(c.token_ids)[:, None]).squeeze(1)
            torch.testing.assert_close(torch.tensor(c.logprobs, dtype=dtype), expected, rtol=0, atol=atol)


@pytest.mark.parametrize("name", ["tiny", "mla"])
def test_many_rows_decode_through_matmul_attention_as_teacher_forcing(name):
    """From CPU_MANY_ROWS slots x heads the CPU decode step attends with plain matmuls, not SDPA."""
    from nanoseek.engine.cache import CPU_MANY_ROWS

    model = build(name).double()
    prompts = prompts_of([3 + i % 13 for i in range(64)], seed=4)
    assert len(prompts) * model.cfg.n_heads >= CPU_MANY_ROWS
    greedy = SamplingParams(max_new_tokens=6, temperature=0)
    engine = Engine(model, max_batch=64, compile=False)
    results = engine.generate(prompts, greedy)
    few = Engine(model, max_batch=8, compile=False)
    few.generate(prompts[:1], greedy)
    assert engine.cache.matmul_attention and not few.cache.matmul_attention
    for [c] in results:
        logp = teacher_forced_logprobs(model, c)
        assert c.token_ids == logp.argmax(-1).tolist()
        expected = logp.gather(1, torch.tensor(c.token_ids)[:, None]).squeeze(1)
        torch.testing.assert_close(torch.tensor(c.logprobs, dtype=torch.float64), expected, rtol=0, atol=1e-10)


def test_continuous_batching_matches_one_at_a_time(models):
    model = models["tiny-moe"]
    prompts = prompts_of([4, 25, 7, 2, 13, 30, 9], seed=3)
    max_new = [1, 25, 3, 18, 2, 9, 30]
    params = [SamplingParams(max_new_tokens=n, temperature=0) for n in max_new]
    engine = Engine(model, max_batch=2)
    together = engine.generate(prompts, params)
    assert engine.stats.max_running <= 2 and engine.n_slots == 2
    for prompt, p, [c] in zip(prompts, params, together):
        [[alone]] = Engine(model, max_batch=1).generate([prompt], p)
        assert c.token_ids == alone.token_ids == naive_greedy(model, prompt, p.max_new_tokens)


def test_finished_sequence_frees_its_slot_at_once(models):
    engine = Engine(models["tiny"], max_batch=2)
    long = engine.submit(prompts_of([5])[0], SamplingParams(max_new_tokens=40, temperature=0))
    short = engine.submit(prompts_of([6])[0], SamplingParams(max_new_tokens=2, temperature=0))
    waiting = engine.submit(prompts_of([7])[0], SamplingParams(max_new_tokens=5, temperature=0))
    steps = 0
    while not waiting.started:
        engine.step()
        steps += 1
    assert short.done and not long.done  # the waiting request joined while the long one decodes
    assert steps == 2  # step 1: prefill + decode finishes `short`; step 2 admits `waiting`
    while engine.has_work:
        engine.step()
    assert len(engine.completion(long.seqs[0]).token_ids) == 40


def test_static_shape_decode_path_matches_eager(models):
    """The padded, static-buffer path the CUDA graphs replay, run eagerly on CPU."""
    model = models["tiny-moe"]
    prompts = prompts_of([3, 40, 8, 15, 1], seed=4)
    params = [SamplingParams(max_new_tokens=n, temperature=0) for n in (20, 3, 30, 7, 12)]
    eager = Engine(model, max_batch=3).generate(prompts, params)
    static = Engine(model, max_batch=3, use_cuda_graphs=True)
    static.use_cuda_graphs, static._capture_graphs = True, False
    assert [[c.token_ids for c in g] for g in static.generate(prompts, params)] == [
        [c.token_ids for c in g] for g in eager
    ]
    assert static._graphs is not None and static._graphs.disabled_reason is None
    assert batch_buckets(128)[:8] == [1, 2, 4, 8, 16, 24, 32, 48] and batch_buckets(128)[-1] == 128
    assert batch_buckets(5) == [1, 2, 4, 5] and kv_len_bucket(65, 512) == 128 and kv_len_bucket(500, 300) == 300


def static_engine(model: Transformer, **kwargs) -> Engine:
    """An engine on the padded, static-buffer decode path that CUDA graphs replay (not captured: CPU)."""
    engine = Engine(model, **kwargs)
    engine.use_cuda_graphs, engine._capture_graphs = True, False
    return engine


def test_graph_weight_check_is_cheap_per_step_and_full_on_admission():
    model = build("tiny")
    prompts = prompts_of([4, 9], seed=17)
    engine = static_engine(model, max_batch=2)
    first = engine.generate(prompts, GREEDY)
    graphs = engine._graphs
    assert graphs.matches(model, engine.cache, full=False) and graphs.matches(model, engine.cache, full=True)
    # A parameter replaced by a new object (load_state_dict(assign=True), a hand edit): only the full
    # check sees it; the engine runs it when requests are admitted, so the next call rebuilds the graphs.
    model.norm.weight = torch.nn.Parameter(model.norm.weight.detach().clone())
    assert graphs.matches(model, engine.cache, full=False) and not graphs.matches(model, engine.cache, full=True)
    again = engine.generate(prompts, GREEDY)
    assert engine._graphs is not graphs
    assert [g[0].token_ids for g in again] == [g[0].token_ids for g in first]
    # New storage behind the same parameter (.to(), p.data = ...): the per-step check sees it.
    graphs = engine._graphs
    with torch.no_grad():
        model.norm.weight.data = model.norm.weight.data.clone()
    assert not graphs.matches(model, engine.cache, full=False)
    status = engine.cuda_graph_status()
    assert status == dict(enabled=True, captured=0, disabled_reason=None)  # static path: nothing captured
    assert Engine(model).cuda_graph_status() == dict(enabled=False, captured=0, disabled_reason="device cpu")


def test_decode_under_the_callers_autocast(models):
    """Under the caller's autocast the engine runs without autocast's weight-cast cache (a captured
    graph would keep reading cached casts freed when the caller's autocast exits), and the graphs
    are keyed by the autocast state."""
    model = models["tiny"]
    prompts = prompts_of([5, 2], seed=18)
    seen = []
    original = model.hidden_states

    def spy(*args, **kwargs):
        seen.append((torch.is_autocast_enabled("cpu"), torch.is_autocast_cache_enabled()))
        return original(*args, **kwargs)

    engine = static_engine(model, max_batch=2)
    model.hidden_states = spy
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under = engine.generate(prompts, GREEDY)
            assert torch.is_autocast_cache_enabled()  # the caller's setting is back
    finally:
        del model.hidden_states
    assert seen and all(s == (True, False) for s in seen)  # prefill and every decode step
    assert [len(g[0].token_ids) for g in under] == [12, 12]
    graphs = engine._graphs
    assert graphs.autocast == (True, torch.bfloat16) and not graphs.matches(model, engine.cache)
    plain = engine.generate(prompts, GREEDY)
    assert engine._graphs is not graphs and engine._graphs.autocast == (False, None)
    assert [g[0].token_ids for g in plain] == [g[0].token_ids for g in Engine(model).generate(prompts, GREEDY)]


# ----------------------------------------------------------------------------- sampling
def test_seeded_sampling_is_reproducible_and_batch_independent(models):
    model = models["tiny"]
    prompts = prompts_of([6, 12, 3], seed=5)
    params = SamplingParams(max_new_tokens=15, temperature=1.0, top_p=0.95, seed=123)
    a = Engine(model, max_batch=8).generate(prompts, params)
    b = Engine(model, max_batch=1).generate(prompts, params)  # other batches, other slots
    assert [g[0].token_ids for g in a] == [g[0].token_ids for g in b]
    c = Engine(model).generate(prompts, SamplingParams(max_new_tokens=15, temperature=1.0, top_p=0.95, seed=124))
    assert [g[0].token_ids for g in a] != [g[0].token_ids for g in c]
    # unseeded requests follow torch.manual_seed
    unseeded = SamplingParams(max_new_tokens=15, temperature=1.0)
    torch.manual_seed(7)
    d = Engine(model).generate(prompts, unseeded)
    torch.manual_seed(7)
    e = Engine(model).generate(prompts, unseeded)
    assert [g[0].token_ids for g in d] == [g[0].token_ids for g in e]


def test_n_samples_share_one_prefill(models):
    model = models["tiny-moe"]
    prompt = prompts_of([20], seed=6)[0]
    engine = Engine(model, max_batch=8)
    calls = []
    original = model.hidden_states

    def counting(ids, *args, **kwargs):
        calls.append(tuple(ids.shape))
        return original(ids, *args, **kwargs)

    model.hidden_states = counting
    try:
        [samples] = engine.generate([prompt], SamplingParams(max_new_tokens=8, temperature=1.5, n=5, seed=0))
    finally:
        del model.hidden_states
    assert [shape for shape in calls if shape[1] > 1] == [(1, 20)]  # the prompt went through the model once
    assert engine.stats.prefill_calls == 1 and engine.stats.prefill_tokens == 20
    assert len(samples) == 5 and [c.sample for c in samples] == list(range(5))
    assert len({tuple(c.token_ids) for c in samples}) > 1  # the samples differ
    # greedy samples over the copied prefix equal naive generation
    [greedy] = Engine(model, max_batch=8).generate([prompt], SamplingParams(max_new_tokens=8, temperature=0, n=3))
    assert all(c.token_ids == naive_greedy(model, prompt, 8) for c in greedy)


def test_n_samples_of_prompts_of_different_lengths_in_one_prefill(models):
    """Every prompt's prefix reaches its other samples' slots (one copy for the chunk, at its padded length)."""
    model = models["mla"]
    prompts = prompts_of([3, 17, 9], seed=16)
    engine = Engine(model, max_batch=9)
    results = engine.generate(prompts, SamplingParams(max_new_tokens=6, temperature=0, n=3))
    assert engine.stats.prefill_calls == 1
    for prompt, samples in zip(prompts, results):
        assert [c.token_ids for c in samples] == [naive_greedy(model, prompt, 6)] * 3


# ----------------------------------------------------------------------------- stopping
def first_new(tokens: list[int], start: int) -> int:
    """Index >= start of a token that does not occur earlier in `tokens`."""
    return next(i for i in range(start, len(tokens)) if tokens[i] not in tokens[:i])


def test_stop_ids_eos_and_ignore_eos(models):
    model = models["tiny"]
    prompt = prompts_of([8], seed=7)[0]
    ref = naive_greedy(model, prompt, 20)
    i = first_new(ref, 2)
    [[c]] = Engine(model).generate([prompt], SamplingParams(max_new_tokens=20, temperature=0, stop_ids=[ref[i]]))
    assert c.token_ids == ref[: i + 1] and c.finish_reason == "stop" and c.stop == ref[i]
    eos_engine = Engine(model, eos_ids=[ref[i]])
    [[c]] = eos_engine.generate([prompt], SamplingParams(max_new_tokens=20, temperature=0))
    assert c.token_ids == ref[: i + 1] and c.finish_reason == "stop"
    [[c]] = eos_engine.generate([prompt], SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True))
    assert c.token_ids == ref and c.finish_reason == "length"


def char_detok(ids) -> str:
    return "".join(chr(0x4E00 + i) for i in ids)  # one distinct character per token id


def test_stop_strings_and_text(models):
    model = models["tiny"]
    prompt = prompts_of([8], seed=8)[0]
    ref = naive_greedy(model, prompt, 20)
    j = first_new(ref, 3)
    stop = char_detok(ref[j - 1 : j + 1])  # a two-token stop string
    engine = Engine(model, detokenize=char_detok)
    [[c]] = engine.generate([prompt], SamplingParams(max_new_tokens=20, temperature=0, stop_strings=[stop, "zz"]))
    assert c.token_ids == ref[: j + 1] and c.finish_reason == "stop" and c.stop == stop
    assert c.text == char_detok(ref[: j - 1])
    # stop id: kept in the tokens, left out of the text
    [[c]] = engine.generate([prompt], SamplingParams(max_new_tokens=20, temperature=0, stop_ids=[ref[j]]))
    assert c.text == char_detok(ref[:j]) and c.token_ids[-1] == ref[j]


def test_context_limit_ends_with_length(models):
    model = models["tiny"]
    prompt = prompts_of([30], seed=9)[0]
    [[c]] = Engine(model, max_seq_len=32).generate([prompt], SamplingParams(max_new_tokens=10, temperature=0))
    assert c.token_ids == naive_greedy(model, prompt, 2) and c.finish_reason == "length"


def test_stream_yields_the_same_tokens_and_holds_back_stop_prefixes(models):
    model = models["tiny"]
    prompt = prompts_of([5], seed=10)[0]
    ref = naive_greedy(model, prompt, 16)
    j = first_new(ref, 4)
    stop = char_detok(ref[j - 1 : j + 1])
    engine = Engine(model, detokenize=char_detok)
    deltas = list(engine.stream(prompt, SamplingParams(max_new_tokens=16, temperature=0, stop_strings=[stop])))
    assert [t for d in deltas for t in d.token_ids] == ref[: j + 1]
    assert "".join(d.text for d in deltas) == deltas[-1].completion.text == char_detok(ref[: j - 1])
    assert all(d.completion is None for d in deltas[:-1])
    # breaking out of a stream aborts the request and frees its slot
    for _ in engine.stream(prompt, SamplingParams(max_new_tokens=16, temperature=0)):
        break
    assert not engine.has_work and len(engine._free) == engine.n_slots


def test_streamed_text_is_the_whole_decoding_and_decodes_each_token_a_bounded_number_of_times():
    # A byte-level BPE tokenizer and random sampling: samples cut multi-byte characters anywhere. The streamed text,
    # held back at an unfinished character, must add up to the text, and decoding must not redo the whole sample at
    # every step (it did: O(n^2) ids decoded over a stream of n tokens).
    from nanoseek.tasks.corpus import pretrain_texts
    from nanoseek.tokenizer import Tokenizer

    texts = [t + " café → 😀 naïve Ωμέγα" for t in pretrain_texts(200, seed=3)]
    tokenizer = Tokenizer.train(texts, 400)
    decoded_ids = []

    def detokenize(ids):
        decoded_ids.append(len(ids))
        return tokenizer.decode(ids)

    torch.manual_seed(0)
    model = Transformer(get_preset("tiny", vocab_size=448, init_std=0.5)).eval()
    engine = Engine(model, tokenizer, detokenize=detokenize, max_batch=2, max_seq_len=256)
    params = SamplingParams(max_new_tokens=200, temperature=1.0, ignore_eos=True, seed=1)
    text, sent_ids = "", []
    for delta in engine.stream(tokenizer.encode("Ωμέγα café"), params):
        text += delta.text
        sent_ids += delta.token_ids
        assert tokenizer.decode(sent_ids).startswith(text)  # never ahead of the whole decoding
    assert text == delta.completion.text == tokenizer.decode(sent_ids) and len(sent_ids) == 200
    assert "\ufffd" in text or any(ord(c) > 127 for c in text)  # the sample did cut or use multi-byte characters
    assert sum(decoded_ids) < 20 * len(sent_ids)  # whole-sample decoding: ~n^2 / 2 = 20,000 ids


# ----------------------------------------------------------------------------- requests and memory
@pytest.mark.parametrize(
    "prompt,params,field",
    [
        ([], GREEDY, "prompt"),
        (list(range(40)), GREEDY, "prompt"),  # max_seq_len=40: no room for a new token
        ([1, 600], GREEDY, "prompt"),  # token id outside the vocabulary
        ("text", GREEDY, "prompt"),  # no tokenizer
        ([1, 2], SamplingParams(max_new_tokens=0), "max_new_tokens"),
        ([1, 2], SamplingParams(max_new_tokens=-5), "max_new_tokens"),
        ([1, 2], SamplingParams(temperature=-1), "temperature"),
        ([1, 2], SamplingParams(top_p=0), "top_p"),
        ([1, 2], SamplingParams(top_p=1.2), "top_p"),
        ([1, 2], SamplingParams(top_k=-2), "top_k"),
        ([1, 2], SamplingParams(min_p=2.0), "min_p"),
        ([1, 2], SamplingParams(n=0), "n"),
        ([1, 2], SamplingParams(n=5), "n"),  # more samples than KV slots
        ([1, 2], SamplingParams(stop_strings=["x"]), "stop_strings"),  # no detokenizer
    ],
)
def test_bad_requests_are_rejected_naming_the_field(models, prompt, params, field):
    engine = Engine(models["tiny"], max_batch=4, max_seq_len=40)
    with pytest.raises(ValueError, match=field):
        engine.submit(prompt, params)
    assert not engine.has_work


def test_bad_requests_in_a_batch_do_not_disturb_the_others(models):
    model = models["tiny"]
    good = prompts_of([4, 9], seed=11)
    engine = Engine(model, max_batch=4, max_seq_len=40)
    prompts = [good[0], [], good[1], list(range(45))]
    params = [GREEDY, GREEDY, GREEDY, GREEDY]
    results = engine.generate(prompts, params)
    assert [len(r) for r in results] == [1, 1, 1, 1]
    assert results[1][0].finish_reason == "error" and "empty" in results[1][0].error
    assert results[3][0].finish_reason == "error" and "max_seq_len" in results[3][0].error
    assert results[0][0].token_ids == naive_greedy(model, good[0], 12)
    assert results[2][0].token_ids == naive_greedy(model, good[1], 12)
    bad_params = engine.generate(good, [GREEDY, SamplingParams(top_p=3.0)])
    assert bad_params[0][0].token_ids == results[0][0].token_ids and "top_p" in bad_params[1][0].error


def test_kv_budget_sets_the_slots_and_requests_wait(models):
    model = models["tiny"]
    per_slot = KVCache.bytes_per_slot(model, 64, torch.float32)
    assert per_slot == model.kv_bytes_per_token(4) * 64
    mla = models["mla"]  # the absorbed cache: keys [latent, rope key], values a view of the keys
    assert KVCache.bytes_per_slot(mla, 64, torch.float32) == mla.kv_bytes_per_token(4) * 64
    cache = KVCache.for_model(mla, 2, 64, torch.float32, torch.device("cpu"))
    assert cache.v is None and cache.nbytes == 2 * mla.kv_bytes_per_token(4) * 64
    engine = Engine(model, max_batch=16, max_seq_len=64, kv_cache_gb=3.5 * per_slot / 2**30)
    assert engine.n_slots == 3 and engine.kv_cache_bytes == 3 * per_slot
    prompts = prompts_of([5, 9, 2, 14, 7, 3], seed=12)
    results = engine.generate(prompts, SamplingParams(max_new_tokens=6, temperature=0))
    assert engine.stats.max_running == 3
    assert [r[0].token_ids for r in results] == [naive_greedy(model, p, 6) for p in prompts]
    with pytest.raises(ValueError, match="kv_cache_gb"):
        Engine(model, max_seq_len=64, kv_cache_gb=0.5 * per_slot / 2**30)


def test_live_training_model_is_left_as_it_was(models):
    model = build("tiny-moe")
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    routers = [m for m in model.modules() if hasattr(m, "tokens_per_expert")]
    prompts = prompts_of([5, 8], seed=13)
    results = Engine(model).generate(prompts, SamplingParams(max_new_tokens=5, temperature=0))
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(r.tokens_per_expert.sum() == 0 for r in routers)  # no balancing statistics from inference
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    assert [r[0].token_ids for r in results] == [naive_greedy(model, p, 5) for p in prompts]


def test_timings_are_reported(models):
    [[c]] = Engine(models["tiny"]).generate(prompts_of([5]), SamplingParams(max_new_tokens=8, temperature=0))
    assert 0 < c.ttft_s <= c.latency_s and c.tokens_per_s > 0


# ----------------------------------------------------------------------------- checkpoint and CLI
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from nanoseek.tokenizer import Tokenizer

    texts = ["hello there, how are you?", "12+35=47", "the quick brown fox jumps over the lazy dog"] * 20
    tok = Tokenizer.train(texts, vocab_size=300)
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny", vocab_size=tok.vocab_size, max_seq_len=128, init_std=0.2))
    directory = tmp_path_factory.mktemp("ckpt")
    save_model(model, directory)
    tok.save(directory)
    return directory


def test_engine_on_a_loaded_checkpoint(checkpoint):
    from nanoseek.loading import load_checkpoint

    model, tok = load_checkpoint(checkpoint, "cpu")
    engine = Engine(model, tok)
    assert engine.eos_ids == tok.stop_ids
    [[c]] = engine.generate(["hello"], SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True))
    assert c.prompt_ids == tok.encode("hello") and c.text == tok.decode(c.token_ids)
    assert c.token_ids == naive_greedy(model, c.prompt_ids, 6)


def test_cli_dtype_auto_follows_the_precision_rule(checkpoint, monkeypatch, capsys):
    """`--dtype auto` on a CPU decodes in `precision.inference_dtype`'s choice (the benchmarks' too): bf16 weights
    once the float32 ones outgrow the CPU cache on a CPU with native bf16, said on stderr; an explicit --dtype
    stands. The rule's threshold checked on both sides of the model's own size."""
    import argparse

    from nanoseek import precision
    from nanoseek.commands.common import load_model
    from nanoseek.loading import load_checkpoint

    reference, _ = load_checkpoint(checkpoint, "cpu")
    n_params = reference.num_params()
    monkeypatch.setattr(precision, "cpu_bf16", lambda: True)

    def load(dtype: str, cache_bytes: int):
        monkeypatch.setattr(precision, "cpu_cache_bytes", lambda: cache_bytes)
        args = argparse.Namespace(checkpoint=str(checkpoint), tokenizer=None, device="cpu", dtype=dtype)
        model, _ = load_model(args)
        return model, capsys.readouterr().err

    model, err = load("auto", 4 * n_params - 1)  # float32 weights one byte past the cache: bf16
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert "precision: bfloat16" in err and "(auto)" in err
    assert torch.equal(model.output_weight, reference.output_weight.to(torch.bfloat16))  # a cast, nothing more
    model, err = load("auto", 4 * n_params)  # they fit: float32, said only where the KV caches are bf16 for our kernel
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    if bf16_for_the_kernel("cpu"):
        assert "precision: float32" in err and "bf16 KV caches (nanoseek's decode attention reads them)" in err
    else:
        assert err == ""
    model, err = load("float32", 1)  # an explicit dtype stands
    assert {p.dtype for p in model.parameters()} == {torch.float32} and err == ""
    monkeypatch.setattr(precision, "cpu_bf16", lambda: False)  # no native bf16: float32 at any size
    model, err = load("auto", 1)
    assert {p.dtype for p in model.parameters()} == {torch.float32} and err == ""


def test_eval_by_checkpoint_name_follows_the_precision_rule(checkpoint, monkeypatch, tmp_path, capsys):
    """The library's `evaluate_checkpoint(name, ...)` loads as the commands do (`load_for_inference`) and records
    the precision its accuracies were measured in, in summary.json and report.md."""
    from nanoseek import precision
    from nanoseek.eval.harness import evaluate_checkpoint
    from nanoseek.loading import load_checkpoint

    n_params = load_checkpoint(checkpoint, "cpu")[0].num_params()
    monkeypatch.setattr(precision, "cpu_bf16", lambda: True)
    for cache_bytes, weights in ((4 * n_params - 1, "bfloat16"), (4 * n_params, "float32")):
        monkeypatch.setattr(precision, "cpu_cache_bytes", lambda b=cache_bytes: b)
        out = tmp_path / weights
        options = dict(n_problems=2, k=1, temperature=0, max_new_tokens=4, quiet=True, plots=False)
        summary = evaluate_checkpoint(str(checkpoint), None, ["arithmetic"], out, device="cpu", **options)
        assert summary["precision"]["weights"] == weights and summary["precision"]["device"] == "cpu"
        assert f"Weights {weights}" in (out / "report.md").read_text()
        said = capsys.readouterr().err
        assert ("precision: bfloat16" in said) == (weights == "bfloat16")


def test_generate_command(checkpoint, tmp_path, capsys):
    from nanoseek.cli import main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        '{"prompt": "hello", "id": "a"}\n"12+35="\n{"prompt": ""}\n{"messages": [{"role": "user", "content": "hi"}]}\n'
    )
    out = tmp_path / "out.jsonl"
    rc = main(
        [
            "generate",
            "--checkpoint",
            str(checkpoint),
            "--prompts-file",
            str(prompts),
            "--out",
            str(out),
            "--max-new-tokens",
            "5",
            "--temperature",
            "0",
            "--n",
            "2",
            "--logprobs",
            "--device",
            "cpu",
        ]
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rc == 1  # one bad request
    assert [r["index"] for r in rows] == [0, 0, 1, 1, 2, 3, 3]
    assert rows[0]["id"] == "a" and rows[0]["text"] == rows[1]["text"] and isinstance(rows[0]["text"], str)
    assert "error" in rows[4] and "empty" in rows[4]["error"]
    assert rows[5]["prompt"].startswith("<|im_start|>user\nhi") and len(rows[5]["logprobs"]) == rows[5]["num_tokens"]

    rc = main(
        [
            "generate",
            "--checkpoint",
            str(checkpoint),
            "--prompt",
            "hello",
            "--chat",
            "--ignore-eos",
            "--max-new-tokens",
            "4",
            "--temperature",
            "0.8",
            "--top-k",
            "20",
            "--top-p",
            "0.9",
            "--min-p",
            "0.01",
            "--seed",
            "3",
            "--device",
            "cpu",
        ]
    )
    [row] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rc == 0 and row["num_tokens"] == 4 and row["finish_reason"] == "length"
    assert row["prompt"] == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"


def test_chat_command_streams_and_keeps_history(checkpoint, monkeypatch, capsys):
    from nanoseek.cli import main

    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n\nhow are you?\n/reset\nhello\n"))
    rc = main(
        [
            "chat",
            "--checkpoint",
            str(checkpoint),
            "--temperature",
            "0",
            "--max-new-tokens",
            "6",
            "--ignore-eos",
            "--stats",
            "--device",
            "cpu",
        ]
    )
    captured = capsys.readouterr()
    assert rc == 0 and captured.out.strip()
    stats = [line for line in captured.err.splitlines() if "prompt tokens" in line]
    assert len(stats) == 3 and all("6 tokens" in line for line in stats)
    prompt_tokens = [int(line.split()[0].strip("[")) for line in stats]
    assert prompt_tokens[1] > prompt_tokens[0] + 6  # the second turn carries the first exchange
    assert prompt_tokens[2] == prompt_tokens[0]  # /reset forgot it


def test_release_frees_the_cache_and_the_engine_still_works(models):
    model = models["tiny"]
    engine = Engine(model, max_batch=4)
    prompts = prompts_of([5, 3], seed=14)
    first = engine.generate(prompts, GREEDY)
    assert engine.cache is not None and engine.cache.nbytes == engine.kv_cache_bytes
    engine.release()
    assert engine.cache is None
    assert [g[0].token_ids for g in engine.generate(prompts, GREEDY)] == [g[0].token_ids for g in first]
    assert json.loads(json.dumps(first[0][0].to_dict()))["finish_reason"] == "length"


# ----------------------------------------------------------------------------- model pieces of the decode step
def rms_norm_reference(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    """Normalise in float32 (float64 stays), cast back, then scale: the Hugging Face definition."""
    x32 = x if x.dtype == torch.float64 else x.float()
    return norm.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + norm.eps)).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_rms_norm_is_the_float32_formula_bit_for_bit(dtype):
    torch.manual_seed(0)
    norm = RMSNorm(96, 1e-6).to(dtype)
    torch.nn.init.normal_(norm.weight, 1.0, 0.2)
    x = (3 * torch.randn(2, 5, 96)).to(dtype)
    assert torch.equal(norm(x), rms_norm_reference(norm, x)) and norm(x).dtype == dtype
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the trainer's float32 residual stream
        norm32, x32 = RMSNorm(96, 1e-6), 3 * torch.randn(4, 96)
        assert torch.equal(norm32(x32), rms_norm_reference(norm32, x32))


# ----------------------------------------------------------------------------- CUDA (skipped without a GPU)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
def test_cuda_graph_replay_equals_the_same_step_run_eagerly():
    model = build("tiny").cuda().to(torch.bfloat16)
    prompts = prompts_of([3, 40, 8, 15, 1], seed=15)
    params = [SamplingParams(max_new_tokens=n, temperature=0.8, seed=1) for n in (20, 3, 30, 7, 12)]
    graphed = Engine(model, max_batch=3)
    static = Engine(model, max_batch=3)
    static._capture_graphs = False  # same padded shapes, no capture: replay must match it bit for bit
    a, b = graphed.generate(prompts, params), static.generate(prompts, params)
    assert graphed._graphs.disabled_reason is None and graphed._graphs.graphs
    assert [[(c.token_ids, c.logprobs) for c in g] for g in a] == [[(c.token_ids, c.logprobs) for c in g] for g in b]


@needs_cuda
@pytest.mark.parametrize("name", ["tiny", "tiny-moe", "mla"])
def test_cuda_engine_matches_naive_generation(name):
    # float32 weights and cache: graphs (or the eager fallback, for MoE until its counts stop
    # synchronising) must give the naive greedy tokens.
    model = build(name).cuda()
    prompts = prompts_of([1, 5, 17, 30, 9])
    engine = Engine(model, max_batch=4, kv_dtype=torch.float32)
    results = engine.generate(prompts, GREEDY)
    for prompt, [c] in zip(prompts, results):
        assert c.token_ids == naive_greedy(model, prompt, 12)
    if engine._graphs.disabled_reason is not None:
        assert name == "tiny-moe"  # only float32 MoE layers may synchronise (the padded-bmm fallback)


@needs_cuda
@pytest.mark.parametrize("name", ["tiny-moe", "mla"])
def test_cuda_bf16_decode_is_captured_and_replays_the_eager_step(name):
    # In bf16 the MoE experts run torch._grouped_mm, which reads the expert counts on the GPU: the
    # decode step must capture (no host sync), and replaying it must give the tokens of the same
    # padded step run eagerly.
    model = build(name).cuda().to(torch.bfloat16)
    prompts = prompts_of([3, 40, 8, 15, 1], seed=19)
    params = [SamplingParams(max_new_tokens=n, temperature=0) for n in (20, 3, 30, 7, 12)]
    graphed = Engine(model, max_batch=3)
    static = Engine(model, max_batch=3)
    static._capture_graphs = False
    a, b = graphed.generate(prompts, params), static.generate(prompts, params)
    status = graphed.cuda_graph_status()
    assert status["enabled"] and status["captured"] > 0 and status["disabled_reason"] is None, status
    assert [[c.token_ids for c in g] for g in a] == [[c.token_ids for c in g] for g in b]


@needs_cuda
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2**-7), (torch.float32, 1e-6)])
def test_cuda_rms_norm_matches_the_float32_formula(dtype, tol):
    # On CUDA F.rms_norm is one fused kernel; only its reduction order may differ from the formula.
    torch.manual_seed(0)
    norm = RMSNorm(768, 1e-6).cuda().to(dtype)
    torch.nn.init.normal_(norm.weight, 1.0, 0.2)
    x = (3 * torch.randn(64, 768, device="cuda")).to(dtype)
    out, ref = norm(x), rms_norm_reference(norm, x)
    assert out.dtype == dtype
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", ["tiny", "tiny-moe", "mla"])
def test_rl_engine_twin_with_16_bit_matmul_weights_decodes_bit_identically_under_autocast(name, monkeypatch):
    """`rollout_policy`: under bf16 autocast the twin (bf16 copies of the matmul weights, everything else
    shared) gives the engine the float32 policy's exact tokens and log-probs, and stays so after an
    optimizer step once synced. CPU autocast stands in for CUDA's here, so the CPU-only rule that keeps experts
    with little work in float32 (moe._experts_dtype, and through the float32 kernel moe._FLOAT32_KERNEL_MIN_MACS,
    which the twin does not follow) is off, and so is nanoseek's CPU attention kernel, which the twin's bf16 cache
    would take and the policy's float32 cache (the suite runs with NANOSEEK_CPU_BF16=0) would not."""
    monkeypatch.setattr("nanoseek.model.moe._CPU_BF16_MIN_MACS", 0)
    monkeypatch.setattr("nanoseek.engine.cache.KERNEL_ATTENTION", False)
    monkeypatch.setattr("nanoseek.model.moe._FLOAT32_KERNEL_MIN_MACS", 0)
    model = build(name).train()
    twin = rollout_policy(model, torch.bfloat16)
    assert rollout_policy(model, None) is model and rollout_policy(model, torch.float32) is model
    assert twin.embed.weight is model.embed.weight and twin.norm.weight is model.norm.weight  # shared
    assert twin.layers[0].attn.wo.weight.dtype == torch.bfloat16
    assert model.layers[0].attn.wo.weight.dtype == torch.float32
    assert model.lm_head is None and twin.lm_head.weight.dtype == torch.bfloat16  # tied: a 16-bit output copy
    if name == "tiny-moe":  # expert stacks and the router's matrix are matmul weights too (autocast casts both)
        moe = next(layer.mlp for layer in twin.layers if hasattr(layer.mlp, "router"))
        assert moe.w1.dtype == moe.router.weight.dtype == torch.bfloat16
        policy_moe = next(layer.mlp for layer in model.layers if hasattr(layer.mlp, "router"))
        assert moe.router.e_score_correction_bias is policy_moe.router.e_score_correction_bias  # a buffer: shared

    prompts = prompts_of([5, 9, 3])
    params = SamplingParams(max_new_tokens=12, temperature=0.8, n=2, seed=3, ignore_eos=True)

    def decode(policy):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = Engine(policy, None, max_batch=8, max_seq_len=64).generate(prompts, params)
        return [(c.token_ids, c.logprobs) for group in out for c in group]

    assert decode(twin) == decode(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.tensor(prompts[:1])).float().square().mean().backward()
    optimizer.step()
    assert decode(twin) != decode(model)  # stale until synced
    sync_rollout_policy(twin, model)
    assert decode(twin) == decode(model)


class RawMatrixMLP(torch.nn.Module):
    """A module type the twin has never seen: a raw matrix (no nn.Linear) that a matmul reads."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(d, d) / d**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w


def test_rl_twin_casts_the_matmul_weights_of_any_module_type(monkeypatch):
    """The twin's rule is 'floating, two or more dimensions, not an embedding table', not a list of module
    types: a new module's raw matrix gets a bf16 copy that syncs, and the logits stay autocast's exactly. CPU
    autocast stands in for CUDA's here, so the CPU-only rule that keeps small eager products of float32 weights in
    float32 (`precision.CPU_BF16_MIN_MACS`, which the twin's bf16 weights cannot follow) is off."""
    monkeypatch.setattr("nanoseek.precision.CPU_BF16_MIN_MACS", 0)
    model = build("tiny").train()
    model.layers[1].mlp = RawMatrixMLP(model.cfg.d_model)
    twin = rollout_policy(model, torch.bfloat16)
    assert twin.layers[1].mlp.w.dtype == torch.bfloat16 and model.layers[1].mlp.w.dtype == torch.float32
    ids = torch.tensor(prompts_of([7, 7], seed=4))

    def logits(policy):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return policy(ids)

    assert torch.equal(logits(twin), logits(model))
    with torch.no_grad():
        model.layers[1].mlp.w.mul_(-2.0)
    assert not torch.equal(logits(twin), logits(model))  # stale until synced
    sync_rollout_policy(twin, model)
    assert torch.equal(twin.layers[1].mlp.w, model.layers[1].mlp.w.to(torch.bfloat16))
    assert torch.equal(logits(twin), logits(model))


@needs_cuda
@pytest.mark.parametrize("name", ["tiny", "tiny-moe", "mla"])
def test_cuda_rl_twin_in_captured_graphs_follows_the_policy_through_syncs(name):
    """RL on CUDA: the engine replays captured graphs over `rollout_policy`'s bf16 twin. Its tokens and
    log-probs equal the float32 policy's under autocast (run eagerly), before and after an optimizer
    step, because the sync copies into the storage the graphs read."""
    model = build(name).cuda().train()
    twin = rollout_policy(model, torch.bfloat16)
    prompts = prompts_of([3, 17, 8], seed=23)
    params = SamplingParams(max_new_tokens=16, temperature=0.8, n=2, seed=5, ignore_eos=True)
    graphed = Engine(twin, None, max_batch=8, max_seq_len=64)

    def run(engine):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return [(c.token_ids, c.logprobs) for g in engine.generate(prompts, params) for c in g]

    def eager_policy():
        engine = Engine(model, None, max_batch=8, max_seq_len=64)
        engine._capture_graphs = False
        return run(engine)

    assert run(graphed) == eager_policy()
    assert graphed.cuda_graph_status()["captured"] > 0
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model(torch.tensor(prompts[:1], device="cuda")).float().square().mean().backward()
    optimizer.step()
    sync_rollout_policy(twin, model)
    assert run(graphed) == eager_policy()
