"""The CPU decode path: the torch.compile'd step against the eager one, its fallback and setting, the
slot rows kept on the device, the experts' grouped GEMM against the padded path, and bf16 against float32.

The two tests that compile (marked slow) take tens of seconds each on a 2-core machine; the rest are fast.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.nn.functional as F

from nanoseek.engine import Engine, SamplingParams, compiled
from nanoseek.engine import cache as cache_module
from nanoseek.engine.cache import CPU_MANY_ROWS
from nanoseek.engine.sampling import sample
from nanoseek.engine.slots import LIVE, POSITION, STEP, TOKEN
from nanoseek.model import Transformer, cpu_kernel, get_preset
from nanoseek.model import linear as L
from nanoseek.model import moe as moe_mod
from nanoseek.model.norm import RMSNorm

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def two_steps_a_call(monkeypatch):
    """Compiled calls of two decode steps, not STEPS_PER_CALL's four: the same code, half the compilation (which
    grows with the steps a graph holds: ~20 s a step on a cold 2-core machine)."""
    monkeypatch.setattr(compiled, "STEPS_PER_CALL", 2)


# Compiled vs eager, float32: the same tokens; log-probs to float32 rounding of differently ordered sums.
COMPILED_LOGPROB_ATOL = 1e-4
# bf16 vs float32 (tiny-moe at init_std 0.05, whose float32 log-probs spread over about [-4.8, -2.7]): each
# generated token's log-prob against the float32 model's for the same token in the same context, at most
# BF16_LOGPROB_MAX apart and BF16_LOGPROB_MEAN on average. A bf16 logit is off by ~2^-8 of its size; the
# largest single errors are routing flips (an expert choice that changes when the float32 router reads
# bf16-rounded activations), measured up to ~0.09 here.
BF16_LOGPROB_MAX = 0.25
BF16_LOGPROB_MEAN = 0.03


def build(name: str, **overrides) -> Transformer:
    torch.manual_seed(0)
    return Transformer(get_preset(name, **{"init_std": 0.2, **overrides})).eval()


def prompts_of(lengths, seed=1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 512, (n,), generator=g).tolist() for n in lengths]


# A mix that exercises continuous batching (4 slots, 6 requests: slots are freed and reused), greedy,
# sampled and filtered rows in one batch, and a tail where one sequence runs alone (a batch of one).
PROMPTS = prompts_of([1, 5, 17, 30, 9, 3])
PARAMS = [
    SamplingParams(max_new_tokens=3, temperature=0),
    SamplingParams(max_new_tokens=24, temperature=0.8, seed=1),
    SamplingParams(max_new_tokens=9, temperature=0.7, top_k=20, top_p=0.9, seed=2),
    SamplingParams(max_new_tokens=5, temperature=0),
    SamplingParams(max_new_tokens=40, temperature=0),
    SamplingParams(max_new_tokens=6, temperature=1.0, n=2, seed=3),
]


def outputs(engine: Engine, prompts=PROMPTS, params=PARAMS) -> list[tuple[list[int], list[float]]]:
    return [(c.token_ids, c.logprobs) for group in engine.generate(prompts, params) for c in group]


def assert_same_tokens_close_logprobs(got, want, atol: float) -> None:
    assert [t for t, _ in got] == [t for t, _ in want]
    for (_, a), (_, b) in zip(got, want):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=0, atol=atol)


# ----------------------------------------------------------------------------- the compiled step
def record_calls(monkeypatch) -> list[tuple[int, int]]:
    """(rows, steps) of each compiled call from now on: `COMPILED.step` runs one step, `COMPILED.steps` several."""
    calls = []
    step, steps = compiled.COMPILED.step, compiled.COMPILED.steps
    monkeypatch.setattr(compiled.COMPILED, "step", lambda *a: calls.append((a[2].shape[0], 1)) or step(*a))
    monkeypatch.setattr(compiled.COMPILED, "steps", lambda *a: calls.append((a[2].shape[0], a[-1])) or steps(*a))
    return calls


@pytest.mark.slow
def test_compiled_decode_gives_the_eager_tokens_and_logprobs(monkeypatch):
    """tiny-moe in float32: dense and MoE layers, the experts as one loop inside the one graph."""
    from torch._dynamo.utils import counters

    model = build("tiny-moe")
    calls = record_calls(monkeypatch)
    engine = Engine(model, max_batch=4, compile=True)
    counters.clear()
    got = outputs(engine)
    assert engine.compiling and compiled.COMPILED.failure is None
    assert not counters["graph_break"], dict(counters["graph_break"])  # one graph: no break at the MoE layers
    # One step a call while the filtered row runs (its token is drawn eagerly), two otherwise; the one-sequence
    # tail ran with a free slot's dummy row.
    assert {n for _, n in calls} == {1, 2} and all(rows > 1 for rows, _ in calls)
    want = outputs(Engine(model, max_batch=4, compile=False))
    assert len({len(t) for t, _ in want}) > 3  # varied lengths: slots were freed and reused
    assert_same_tokens_close_logprobs(got, want, COMPILED_LOGPROB_ATOL)

    # One sequence alone for long (ONE_ROW_GRAPH_AFTER steps in a row): its own one-row graph from then on. Slot 0
    # runs 12 tokens, slot 1 two: a call of two rows, two of slot 0 alone padded (to 4 steps in a row), three of
    # its own (the last step wasted: the sequence has its 12 tokens after the first).
    monkeypatch.setattr(compiled, "ONE_ROW_GRAPH_AFTER", 3)
    calls.clear()
    prompts = PROMPTS[2:4]
    params = [
        SamplingParams(max_new_tokens=12, temperature=0.8, seed=4),
        SamplingParams(max_new_tokens=2, temperature=0),
    ]
    got = outputs(engine, prompts, params)
    assert calls == [(2, 2)] * 3 + [(1, 2)] * 3, calls
    assert not counters["graph_break"], dict(counters["graph_break"])
    want = outputs(Engine(model, max_batch=4, compile=False), prompts, params)
    assert_same_tokens_close_logprobs(got, want, COMPILED_LOGPROB_ATOL)


def test_several_steps_a_call_stop_where_single_steps_stop(monkeypatch):
    """`decode_steps` as the engine calls it (run eagerly here: the compiled graph is the test above's), four steps a
    call: sequences that stop inside a call (a stop token, max_new_tokens), run to the end of the cache, or continue
    a kept turn get the tokens and log-probs of single steps, nothing after the stop; a slot freed inside a call
    serves the next request."""
    monkeypatch.setattr(compiled, "COMPILED", compiled._Compiled())
    monkeypatch.setattr(compiled.torch, "compile", lambda fn, **options: fn)
    monkeypatch.setattr(compiled, "STEPS_PER_CALL", 4)
    model = build("tiny-moe")
    prompts = prompts_of([3, 8, 21, 5, 12], seed=7)
    greedy = SamplingParams(max_new_tokens=40, temperature=0)
    first = outputs(Engine(model, max_batch=3, max_seq_len=40, compile=False), prompts, greedy)
    stops = [tokens[4] for tokens, _ in first]  # a stop at the 5th token (or before, where it comes earlier)
    params = [
        SamplingParams(max_new_tokens=40, temperature=0, stop_ids=[stops[0]]),
        SamplingParams(max_new_tokens=7, temperature=0),  # 6 decode steps: ends inside a call
        SamplingParams(max_new_tokens=40, temperature=0.9, seed=5),  # runs to the end of the cache (clamped rows)
        SamplingParams(max_new_tokens=40, temperature=0, stop_ids=[stops[3]]),
        SamplingParams(max_new_tokens=30, temperature=1.0, seed=6, n=2),
    ]
    calls = record_calls(monkeypatch)
    engine = Engine(model, max_batch=3, max_seq_len=40, compile=True)
    got = outputs(engine, prompts, params)
    want = outputs(Engine(model, max_batch=3, max_seq_len=40, compile=False), prompts, params)
    assert calls and {n for _, n in calls} == {4}
    assert_same_tokens_close_logprobs(got, want, 1e-5)
    lengths = [len(t) for t, _ in want]
    assert lengths[0] <= 5 and lengths[1] == 7 and lengths[2] == 40 - 21 and lengths[3] <= 5, lengths
    assert engine.stats.decode_tokens == sum(lengths) - len(lengths)  # the first tokens come from the prefills

    def two_turns(engine: Engine) -> list[tuple[list[int], list[float]]]:
        """A kept sequence that stops inside a call, continued with three tokens; a second sequence alongside."""
        kept = engine.submit(
            prompts[1], SamplingParams(max_new_tokens=9, temperature=0, stop_ids=[stops[1]]), keep=True
        )
        other = engine.submit(prompts[4], SamplingParams(max_new_tokens=15, temperature=0.7, seed=8), index=1)
        while engine.has_work:
            engine.step()
        [seq] = kept.seqs
        turns = [(list(seq.tokens), list(seq.logprobs))]
        engine.continue_sequence(seq, [7, 8, 9], max_new_tokens=6)
        while engine.has_work:
            engine.step()
        turns += [(list(seq.tokens), list(seq.logprobs)), (other.seqs[0].tokens, other.seqs[0].logprobs)]
        engine.release_sequence(seq)
        return turns

    calls.clear()
    got = two_turns(engine)
    assert calls and {n for _, n in calls} == {4}
    assert_same_tokens_close_logprobs(got, two_turns(Engine(model, max_batch=3, max_seq_len=40, compile=False)), 1e-5)

    # A stop string met inside a call: the text is searched after each of the call's tokens, as single steps do.
    text = lambda ids: "".join(f"<{t}>" for t in ids)
    by_text = SamplingParams(max_new_tokens=40, temperature=0, stop_strings=[f"{first[0][0][2]}><"])
    calls.clear()
    got = outputs(Engine(model, max_batch=3, max_seq_len=40, compile=True, detokenize=text), prompts[:1], by_text)
    want = outputs(Engine(model, max_batch=3, max_seq_len=40, compile=False, detokenize=text), prompts[:1], by_text)
    assert calls and {n for _, n in calls} == {4}
    assert_same_tokens_close_logprobs(got, want, 1e-5)
    assert len(want[0][0]) == 4, want  # found at the 4th token (the 3rd of the first call's 4): greedy's first 3 + 1

    # One step a call in an engine of more than MANY_STEPS_MAX_SLOTS slots, or over weights that outgrow the cache.
    want = outputs(Engine(model, max_batch=3, max_seq_len=40, compile=False), prompts, params)
    large = Engine(model, max_batch=compiled.MANY_STEPS_MAX_SLOTS + 1, max_seq_len=40, compile=True)
    monkeypatch.setattr(compiled.precision, "cpu_cache_bytes", lambda: 4 * model.num_params() - 1)
    for engine in (large, Engine(model, max_batch=3, max_seq_len=40, compile=True)):
        calls.clear()
        assert_same_tokens_close_logprobs(outputs(engine, prompts, params), want, COMPILED_LOGPROB_ATOL)  # row counts
        assert calls and {n for _, n in calls} == {1}


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-6), (torch.bfloat16, 8e-3)])
def test_summed_attention_equals_softmax_attention_in_float64(dtype, atol):
    """The compiled step's attention (`cache._summed_attention`, run eagerly here) on strided views of a cache,
    with masked keys, against softmax(q k^T * scale + mask) v in float64 on the same (rounded) inputs."""
    from nanoseek.engine.cache import _summed_attention

    g = torch.Generator().manual_seed(0)
    B, Hkv, rows, dk, dv, L = 3, 2, 4, 16, 8, 11
    cache_k = torch.randn(5, Hkv, 20, dk, generator=g).to(dtype)
    cache_v = torch.randn(5, Hkv, 20, dv, generator=g).to(dtype)
    q = torch.randn(B, Hkv, rows, dk, generator=g).to(dtype)
    mask = torch.zeros(B, 1, rows, L, dtype=dtype)
    mask[0, :, :, 7:] = float("-inf")  # a shorter sequence in row 0
    mask[2, :, 1:, 3:] = float("-inf")
    keys, values = cache_k[:B, :, :L], cache_v[:B, :, :L]
    got = _summed_attention(q, keys, values, 0.3, mask)
    scores = q.double() @ keys.double().transpose(-1, -2) * 0.3 + mask.double()
    want = scores.softmax(-1) @ values.double()
    assert got.dtype == dtype and got.shape == (B, Hkv, rows, dv)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=atol)


def test_a_failed_compile_decodes_eagerly_after_one_warning(monkeypatch):
    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")

        return run

    monkeypatch.setattr(compiled, "COMPILED", compiled._Compiled())
    monkeypatch.setattr(compiled.torch, "compile", broken_compile)
    model = build("tiny")
    with pytest.warns(UserWarning, match="decoding eagerly.*InvalidCxxCompiler") as seen:
        got = outputs(Engine(model, max_batch=4, compile=True))
    assert len(seen) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning, no second attempt
        engine = Engine(model, max_batch=4, compile=True)
        again = outputs(engine)
    assert not engine.compiling
    want = outputs(Engine(model, max_batch=4, compile=False))
    assert got == want and again == want


def test_compile_setting_from_the_flag_and_the_environment(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv(compiled.COMPILE_ENV, raising=False)
    assert compiled.compile_after(cpu, None) == compiled.COMPILE_AFTER_STEPS
    assert compiled.compile_after(cpu, True) == 0 and compiled.compile_after(cpu, False) is None
    assert compiled.compile_after(cuda, True) is None  # CUDA replays graphs instead
    for value, expected in (("1", 0), ("0", None), ("auto", compiled.COMPILE_AFTER_STEPS)):
        monkeypatch.setenv(compiled.COMPILE_ENV, value)
        assert compiled.compile_after(cpu, None) == expected
    assert compiled.compile_after(cpu, False) is None  # the flag wins
    monkeypatch.setenv(compiled.COMPILE_ENV, "yes")
    with pytest.raises(ValueError, match="NANOSEEK_COMPILE"):
        Engine(build("tiny"))


def test_a_long_job_compiles_at_the_first_step(monkeypatch):
    """`compile_for`: a job of LONG_JOB_STEPS decode steps or more compiles at once, a shorter one follows the
    default rule, NANOSEEK_COMPILE=0 still means never, and CUDA never compiles."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv(compiled.COMPILE_ENV, raising=False)
    assert compiled.LONG_JOB_STEPS >= compiled.COMPILE_AFTER_STEPS
    assert compiled.compile_for(cpu, compiled.LONG_JOB_STEPS) is True
    assert compiled.compile_for(cpu, compiled.LONG_JOB_STEPS - 1) is None
    assert compiled.compile_for(cuda, 10**6) is False
    monkeypatch.setenv(compiled.COMPILE_ENV, "0")
    assert compiled.compile_for(cpu, 10**6) is False
    monkeypatch.setenv(compiled.COMPILE_ENV, "1")
    assert compiled.compile_for(cpu, 1) is None and compiled.compile_after(cpu, None) == 0  # at once anyway


def test_engine_compiles_after_the_set_number_of_steps(monkeypatch):
    """By default the engine decodes eagerly for `compile_after` steps, then through the compiled step
    (here a stand-in that records its calls and runs the same step eagerly)."""
    calls = []

    def stand_in(model, cache, ids, pos, kv_len, batch):
        calls.append(ids.shape[0])
        return sample(model.logits(model.hidden_states(ids, pos, cache=cache.decode(pos, kv_len))[:, -1]), batch)

    monkeypatch.setattr(compiled.COMPILED, "step", stand_in)
    monkeypatch.setattr(compiled.COMPILED, "steps", lambda *args: None)  # as after a failed compile: one step a call
    monkeypatch.delenv(compiled.COMPILE_ENV, raising=False)
    model = build("tiny")
    engine = Engine(model, max_batch=2)
    assert engine.compile_after == compiled.COMPILE_AFTER_STEPS
    engine.compile_after = 5
    got = outputs(engine, PROMPTS[:1], SamplingParams(max_new_tokens=12, temperature=0))
    assert engine.stats.decode_steps == 11 and calls == [2] * 6  # one sequence + a dummy row, from step 5 on
    want = outputs(
        Engine(model, max_batch=2, compile=False), PROMPTS[:1], SamplingParams(max_new_tokens=12, temperature=0)
    )
    assert_same_tokens_close_logprobs(got, want, 1e-5)  # a 2-row matmul may round differently from a 1-row one


# ----------------------------------------------------------------------------- the slot rows
def test_slot_rows_follow_the_sequences_and_are_freed():
    """What the device holds per slot, against the host's record of each sequence, at every step."""
    engine = Engine(build("tiny"), max_batch=3, compile=False)
    for prompt, p in zip(PROMPTS, PARAMS):
        engine.submit(prompt, p)
    steps = 0
    while engine.has_work:
        engine.step()
        with torch.inference_mode():  # the engine's tensors are inference tensors
            engine.slots.flush()  # resets of this step's finished sequences (otherwise applied at the next step)
        ints, floats = engine.slots.ints.tolist(), engine.slots.floats.tolist()
        for slot in range(engine.n_slots):
            seq = engine._running.get(slot)
            if seq is None:
                assert ints[slot] == [0] * 7 and floats[slot] == [0.0, 1.0, 0.0]  # a free row
            else:
                p = seq.request.params
                assert ints[slot][TOKEN] == seq.tokens[-1] and ints[slot][POSITION] == seq.position
                assert ints[slot][STEP] == len(seq.tokens) and ints[slot][LIVE] == 1
                assert floats[slot] == [p.temperature, p.top_p, p.min_p]
        steps += 1
    assert steps > 10 and engine.stats.max_running == 3


# ----------------------------------------------------------------------------- grouped GEMM on CPU
def padded_reference(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    return moe_mod._padded_grouped_mm(x.double(), w.double(), counts)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_cpu_grouped_mm_equals_the_padded_path(dtype, tol, monkeypatch):
    torch.manual_seed(0)
    counts = torch.tensor([7, 0, 12, 1, 0, 20, 3, 0])  # ragged, with empty experts
    x = torch.randn(int(counts.sum()), 64, dtype=dtype, requires_grad=True)
    w = torch.randn(8, 48, 64, dtype=dtype, requires_grad=True)
    seen = []
    real = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: seen.append(1) or real(*a, **k))
    with torch.inference_mode():  # on CPU the kernel serves decoding only
        decoded = moe_mod.grouped_mm(x.detach(), w.detach(), counts)
    assert seen == [1] and decoded.dtype == dtype  # the kernel ran, not the padded fallback
    out = torch._grouped_mm(x, w.transpose(-2, -1), offs=torch.cumsum(counts, 0, dtype=torch.int32))
    assert out.equal(decoded)
    seen.clear()
    moe_mod.grouped_mm(x, w, counts)
    assert not seen  # outside inference mode (training): the padded path

    x64, w64 = (t.detach().double().requires_grad_() for t in (x, w))
    ref = moe_mod._padded_grouped_mm(x64, w64, counts)
    grad = torch.randn_like(ref)
    out.backward(grad.to(dtype))
    ref.backward(grad)
    for got, want in ((out, ref), (x.grad, x64.grad), (w.grad, w64.grad)):
        assert ((got.double() - want).norm() / want.norm()).item() < tol
    assert moe_mod._cpu_grouped_mm(x, w.transpose(-2, -1), torch.cumsum(counts, 0, dtype=torch.int32)).equal(out)
    seen.clear()
    with torch.inference_mode():
        moe_mod.grouped_mm(x64.detach(), w64.detach(), counts)
    assert not seen  # float64: the padded path


# ----------------------------------------------------------------------------- bf16
def float32_logprobs(model: Transformer, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prompt + tokens]))[0].float(), -1)
    return logp[len(prompt) - 1 : -1].gather(1, torch.tensor(tokens)[:, None]).squeeze(1)


def summed_calls(monkeypatch) -> list[int]:
    """The rows of each product `model.linear` sends to its one-row product-sums (counted when a graph is traced),
    with our AMX product off: where it is on, a one-row graph calls it instead (tested below)."""
    monkeypatch.setattr(cpu_kernel, "AMX", False)
    calls = []
    summed = L._summed_products
    monkeypatch.setattr(L, "_summed_products", lambda x, *a: calls.append(x.shape[:-1].numel()) or summed(x, *a))
    return calls


@pytest.mark.parametrize("bias", [False, True])
def test_a_compiled_one_row_product_is_summed_within_bf16_rounding_of_float64(bias, monkeypatch):
    """Inside a compiled graph, one row (known when the graph is built) of a bf16 product takes the product-sums:
    within the output's bf16 rounding of the float64 product of the same numbers, alone and for stacked layers
    (q/k/v); two rows, an eager call and a product that wants gradients keep the library's product."""
    calls = summed_calls(monkeypatch)
    torch.manual_seed(0)
    q, k = (L.Linear(512, n, bias=bias).to(torch.bfloat16).requires_grad_(False) for n in (1024, 256))
    with torch.no_grad():
        for shape in [(1, 512), (1, 1, 512)]:  # the engine's decode rows are [B, 1, d]
            x = torch.randn(*shape).to(torch.bfloat16)
            outs = torch.compile(lambda x: (q(x), *L.linears(x, (q, k))), dynamic=False)(x)
            assert calls and all(n == 1 for n in calls)
            for out, layer in zip(outs, (q, q, k)):
                ref = x.double() @ layer.weight.double().T + (layer.bias.double() if bias else 0)
                assert out.dtype == torch.bfloat16 and out.shape == ref.shape
                torch.testing.assert_close(out.double(), ref, rtol=2**-7, atol=1e-3)
        calls.clear()
        x2 = torch.randn(2, 512).to(torch.bfloat16)
        assert torch.equal(torch.compile(q, dynamic=False)(x2), F.linear(x2, q.weight, q.bias))
        assert torch.equal(q(x), F.linear(x, q.weight, q.bias))  # eager
    q.requires_grad_(True)
    out = torch.compile(q, dynamic=False)(x)
    assert out.grad_fn is not None and not calls


def test_with_our_amx_product_a_compiled_one_row_product_calls_it(monkeypatch):
    """Where our AMX product is in use, a one-row graph's bf16 products call it (through the packed copy), not the
    product-sums: within the output's bf16 rounding of the float64 product, alone and stacked (q/k/v)."""
    if not (cpu_kernel.available() and cpu_kernel.products_through_amx()):
        pytest.skip("no AMX product here")
    calls = []
    summed = L._summed_products
    monkeypatch.setattr(L, "_summed_products", lambda x, *a: calls.append(1) or summed(x, *a))
    torch.manual_seed(0)
    q, k = (L.Linear(512, n, bias=False).to(torch.bfloat16).requires_grad_(False) for n in (1024, 256))
    with torch.no_grad():
        x = torch.randn(1, 1, 512).to(torch.bfloat16)
        outs = torch.compile(lambda x: (q(x), *L.linears(x, (q, k))), dynamic=False)(x)
    assert not calls and L._packed[q.weight][1] == "ours"
    for out, layer in zip(outs, (q, q, k)):
        torch.testing.assert_close(out.double(), x.double() @ layer.weight.double().T, rtol=2**-7, atol=1e-3)


@pytest.mark.parametrize("realize", [True, False])
def test_a_one_row_product_of_a_row_made_in_the_graph_is_within_bf16_rounding(realize, monkeypatch):
    """The product-sums of a row the graph itself makes (an RMSNorm of a residual sum, as every decode product's
    input is), with the row written out once (`REALIZE_ROW`) or recomputed inside the loops: within the output's
    bf16 rounding of the float64 product of the eager row."""
    monkeypatch.setattr(L, "REALIZE_ROW", realize)
    calls = summed_calls(monkeypatch)
    torch.manual_seed(1)
    layer = L.Linear(512, 768, bias=False).to(torch.bfloat16).requires_grad_(False)
    norm = RMSNorm(512, eps=1e-6).to(torch.bfloat16).requires_grad_(False)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(512))
        a, b = (torch.randn(1, 1, 512).to(torch.bfloat16) for _ in range(2))
        out = torch.compile(lambda a, b: layer(norm(a + b)), dynamic=False)(a, b)
        ref = norm(a + b).double() @ layer.weight.double().T
    assert calls == [1] and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref, rtol=2**-7, atol=1e-2)


@pytest.mark.slow
def test_a_bf16_model_s_one_row_graph_decodes_as_eager_within_bf16_tolerance(monkeypatch):
    """A bf16 model decoding one sequence alone: after ONE_ROW_GRAPH_AFTER steps its one-row graph, whose products
    are the product-sums; the greedy tokens of the eager bf16 engine, each log-prob within bf16's tolerance of the
    float32 model's in the same context."""
    monkeypatch.setattr(compiled, "ONE_ROW_GRAPH_AFTER", 3)
    model = build("tiny", n_layers=2, init_std=0.05)
    whole = build("tiny", n_layers=2, init_std=0.05).to(torch.bfloat16)
    calls, products = record_calls(monkeypatch), summed_calls(monkeypatch)
    prompts, params = prompts_of([6]), SamplingParams(max_new_tokens=24, temperature=0)
    [[got]] = Engine(whole, max_batch=2, compile=True).generate(prompts, params)
    assert (1, 2) in calls and products and all(n == 1 for n in products)
    [[want]] = Engine(whole, max_batch=2, compile=False).generate(prompts, params)
    assert got.token_ids == want.token_ids
    errors = (torch.tensor(got.logprobs) - float32_logprobs(model, prompts[0], got.token_ids)).abs()
    assert errors.max() < BF16_LOGPROB_MAX and errors.mean() < BF16_LOGPROB_MEAN, errors


@pytest.mark.slow
def test_bf16_decoding_is_within_tolerance_of_float32():
    """The bf16 ways to decode on CPU: the RL twin (bf16 matmul weights, the rest shared) under bf16
    autocast, eager and compiled; a whole-model bf16 copy; the float32 model over a bf16 cache, eager and
    compiled. Greedy, so each path picks its own tokens; each token's log-prob is compared with the float32
    model's in the same context."""
    from nanoseek.engine.twin import rollout_policy

    model = build("tiny-moe", init_std=0.05)
    prompts = prompts_of([4, 11, 20], seed=5)
    params = SamplingParams(max_new_tokens=16, temperature=0)
    twin = rollout_policy(model, torch.bfloat16)
    whole = build("tiny-moe", init_std=0.05).to(torch.bfloat16)
    runs = {}
    for name, policy, compile_ in (("twin", twin, False), ("twin compiled", twin, True), ("bf16", whole, False)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            runs[name] = Engine(policy, max_batch=4, compile=compile_).generate(prompts, params)
    for compile_ in (False, True):  # the float32 model over a bf16 KV cache (`precision.kv_cache_dtype`)
        engine = Engine(model, max_batch=4, compile=compile_, kv_dtype=torch.bfloat16)
        runs[f"bf16 cache{' compiled' * compile_}"] = engine.generate(prompts, params)
    for name, results in runs.items():
        errors = []
        for prompt, [c] in zip(prompts, results):
            want = float32_logprobs(model, prompt, c.token_ids)
            errors.append((torch.tensor(c.logprobs) - want).abs())
        errors = torch.cat(errors)
        assert errors.max() < BF16_LOGPROB_MAX and errors.mean() < BF16_LOGPROB_MEAN, (name, errors)


@pytest.mark.slow
def test_a_bf16_cache_attends_through_the_kernel_within_bf16_tolerance(attention_kernel_calls):
    """A bf16 cache decodes through nanoseek's attention kernel, eagerly and compiled, many slots or few, and for
    MLA's cache (the values inside the keys): each greedy token's log-prob within bf16's tolerance of the float32
    model's in the same context."""
    from nanoseek.engine.twin import rollout_policy

    mla = dict(attn_type="mla", q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8)
    prompts = prompts_of([4, 11, 20, 7, 30, 2], seed=5)
    params = SamplingParams(max_new_tokens=16, temperature=0)
    for name, overrides, compile_ in (("tiny-moe", {}, False), ("tiny-moe", {}, True), ("tiny", mla, False)):
        model = build(name, init_std=0.05, **overrides)
        twin = rollout_policy(model, torch.bfloat16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            engine = Engine(twin, max_batch=64, compile=compile_)
            with attention_kernel_calls() as calls:
                results = engine.generate(prompts, params)
            assert engine.cache.kernel_attention and calls and engine.n_slots * model.cfg.n_heads >= CPU_MANY_ROWS
            few = Engine(twin, max_batch=2, compile=compile_)
            with attention_kernel_calls() as calls:
                alone = few.generate(prompts[:1], params)
            assert few.cache.kernel_attention and calls and alone[0][0].token_ids == results[0][0].token_ids
        want = [float32_logprobs(model, p, c.token_ids) for p, [c] in zip(prompts, results)]
        errors = torch.cat([(torch.tensor(c.logprobs) - w).abs() for w, [c] in zip(want, results)])
        assert errors.max() < BF16_LOGPROB_MAX and errors.mean() < BF16_LOGPROB_MEAN, (name, compile_, errors)


def test_the_twin_caches_keys_in_its_16bit_dtype_with_the_float32_cache_outputs(monkeypatch):
    """RL's twin decodes under bf16 autocast, where the attention matmuls read the cache in bf16 anyway: its
    engine caches in bf16 (half the bytes, no cast of the cache at every layer), with the tokens and log-probs
    of a float32 cache. The plain float32 model keeps a float32 cache (the suite runs with NANOSEEK_CPU_BF16=0).
    Both through the engine's own attention: nanoseek's kernel, which a bf16 cache takes where it applies, sums in
    another order (its tolerance: `test_a_bf16_cache_attends_through_the_kernel_within_bf16_tolerance`)."""
    from nanoseek.engine.twin import rollout_policy

    monkeypatch.setattr(cache_module, "KERNEL_ATTENTION", False)

    model = build("tiny", init_std=0.05)
    twin = rollout_policy(model, torch.bfloat16)
    prompts = prompts_of([4, 11, 20, 2], seed=6)
    params = SamplingParams(max_new_tokens=12, temperature=0)
    assert Engine(model, max_batch=4).kv_dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_cache = Engine(twin, max_batch=4, compile=False)
        assert bf16_cache.kv_dtype == torch.bfloat16
        got = outputs(bf16_cache, prompts, params)
        want = outputs(Engine(twin, max_batch=4, compile=False, kv_dtype=torch.float32), prompts, params)
    assert_same_tokens_close_logprobs(got, want, atol=1e-5)


def test_a_long_prefill_autocasts_to_bf16_within_tolerance_of_float32(monkeypatch):
    """A prefill chunk of PREFILL_BF16_MIN_TOKENS or more through a float32 model runs its matmuls in bf16 on a
    CPU with native bf16: the first tokens' log-probs and the cached keys and values move (so every later token's
    log-prob does), within the bf16 tolerance of the float32 model's; a shorter chunk stays float32 exactly (the KV
    cache float32 too: nanoseek's attention kernel, for which it would be bf16, off)."""
    from nanoseek import precision

    model = build("tiny-moe", init_std=0.05)
    params = SamplingParams(max_new_tokens=8, temperature=0)
    monkeypatch.setattr(precision, "cpu_bf16", lambda: True)
    monkeypatch.setattr(cache_module, "KERNEL_ATTENTION", False)
    long, short = prompts_of([300, 40, 120], seed=7), prompts_of([30, 40], seed=8)  # 3 x 300 and 2 x 40 padded
    assert 2 * 40 < precision.PREFILL_BF16_MIN_TOKENS <= 3 * 300
    for prompts, bf16 in ((long, True), (short, False)):
        errors = []
        for prompt, [c] in zip(prompts, Engine(model, max_batch=4, compile=False).generate(prompts, params)):
            want = float32_logprobs(model, prompt, c.token_ids)
            errors.append((torch.tensor(c.logprobs) - want).abs())
        errors = torch.cat(errors)
        if bf16:
            assert 1e-4 < errors.max() < BF16_LOGPROB_MAX and errors.mean() < BF16_LOGPROB_MEAN, errors
        else:
            assert errors.max() < 1e-4, errors


def test_the_cache_counted_is_at_most_a_share_per_cpu():
    """A VM's sysfs lists the host's whole last-level cache (480 MiB on a 2-CPU Xeon VM): counted at most
    CACHE_BYTES_PER_CPU for each CPU this process may run on; a cache within that counts whole."""
    from nanoseek import precision

    per_cpu = precision.CACHE_BYTES_PER_CPU
    assert precision.usable_cache_bytes(480 * 2**20, 2) == 2 * per_cpu
    assert precision.usable_cache_bytes(32 * 2**20, 2) == 32 * 2**20
    assert precision.usable_cache_bytes(480 * 2**20, 64) == 480 * 2**20
    assert precision.usable_cache_bytes(480 * 2**20, 0) == per_cpu
    assert precision.cpu_cache_bytes() <= per_cpu * len(os.sched_getaffinity(0))


def test_precision_rule_bf16_where_native_and_the_weights_outgrow_the_cache(monkeypatch):
    from nanoseek import precision

    monkeypatch.setattr(precision, "cpu_bf16", lambda: True)
    monkeypatch.setattr(precision, "cpu_cache_bytes", lambda: 32 * 2**20)
    assert precision.inference_dtype("cpu", 8_000_000) == torch.float32  # 32 MB of float32 weights: in the cache
    assert precision.inference_dtype("cpu", 8_400_000) == torch.bfloat16  # 33.6 MB: read from memory every step
    assert precision.inference_dtype("cuda", 1000) == torch.bfloat16
    assert "32 MiB" in precision.describe_inference("cpu", torch.float32)
    # The KV cache: bf16 for a float32 model whose float32 cache outgrows the CPU cache; other models keep theirs.
    # And for any float32 model's cache where nanoseek's decode attention kernel reads it.
    assert precision.kv_cache_dtype("cpu", torch.float32, 32 * 2**20) == torch.float32
    assert precision.kv_cache_dtype("cpu", torch.float32, 32 * 2**20 + 1) == torch.bfloat16
    assert precision.kv_cache_dtype("cpu", torch.float32, 1, bf16_attention=True) == torch.bfloat16
    assert precision.kv_cache_dtype("cpu", torch.float64, 2**40, bf16_attention=True) == torch.float64
    assert precision.kv_cache_dtype("cuda", torch.float32, 1) == torch.bfloat16
    assert "KV caches (nanoseek's decode attention" in precision.describe_inference("cpu", torch.float32, True)
    model = build("tiny")  # 2 KiB of float32 keys and values a token: 64 sequences of 320 tokens are 40 MiB
    monkeypatch.setattr(cache_module, "KERNEL_ATTENTION", False)  # the cache-size rule alone
    assert Engine(model, max_batch=64, max_seq_len=320).kv_dtype == torch.bfloat16
    assert Engine(model, max_batch=16, max_seq_len=320).kv_dtype == torch.float32
    monkeypatch.setattr(cache_module, "KERNEL_ATTENTION", True)
    kernel = cpu_kernel.attention_available()
    assert Engine(model, max_batch=16, max_seq_len=320).kv_dtype == (torch.bfloat16 if kernel else torch.float32)
    # The prefill: bf16 autocast for a float32 model's chunks of PREFILL_BF16_MIN_TOKENS tokens or more, on the CPU.
    n = precision.PREFILL_BF16_MIN_TOKENS
    assert precision.prefill_dtype("cpu", torch.float32, n - 1) is None
    assert precision.prefill_dtype("cpu", torch.float32, n) == torch.bfloat16
    assert precision.prefill_dtype("cpu", torch.bfloat16, 10 * n) is None
    assert precision.prefill_dtype("cuda", torch.float32, 10 * n) is None
    monkeypatch.setattr(precision, "cpu_bf16", lambda: False)
    assert precision.prefill_dtype("cpu", torch.float32, 10 * n) is None
    assert "MiB" not in precision.describe_inference("cpu", torch.float32)  # no bf16 rule to describe
    assert precision.inference_dtype("cpu", 10**9) == torch.float32
    assert Engine(model, max_batch=64, max_seq_len=320).kv_dtype == torch.float32
