"""`model.linear`: bf16 weights of a megabyte or more through a prepacked kernel on a CPU (ours, `cpu_kernel`, where
it is built; oneDNN's otherwise: every test runs with both), against F.linear and a float64 reference; the packed copy
following the weight (live weights); where it must not be used."""

from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F

from nanoseek.engine import Engine, SamplingParams
from nanoseek.model import Transformer, cpu_kernel, get_preset
from nanoseek.model import linear as L

pytestmark = [
    pytest.mark.usefixtures("one_thread", "kernel"),
    pytest.mark.skipif(not L.packing_available(), reason="torch without oneDNN's bf16 kernels on this processor"),
]


@pytest.fixture(params=["ours", "onednn"])
def kernel(request, monkeypatch) -> str:
    """Which prepacked kernel `linear` multiplies with: ours (skipped where it is not built) or oneDNN's."""
    if request.param == "ours" and not cpu_kernel.products_available():
        pytest.skip("nanoseek's bf16 product does not apply here (AVX-512 BF16 without AMX, a C++ compiler)")
    monkeypatch.setattr(cpu_kernel, "USE", request.param == "ours")
    return request.param


def weight(out_features: int = 2048, in_features: int = 512, seed: int = 0, **kw) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(out_features, in_features, generator=g) * 0.05).to(torch.bfloat16).requires_grad_(False)


def assert_the_product(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> None:
    """Within bf16 output rounding of the float64 product of the same bf16 numbers, and F.linear's (oneDNN's
    kernel: equal; ours: the same sums, so at most one bf16 step apart where their order of additions differs)."""
    ref = x.double() @ w.double().T + (0 if b is None else b.double())
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    torch.testing.assert_close(out.double(), ref, rtol=2**-7, atol=1e-3)
    assert_as_f_linear(out, F.linear(x.to(w.dtype), w, b))


def assert_as_f_linear(out: torch.Tensor, want: torch.Tensor) -> None:
    if not cpu_kernel.USE:
        assert torch.equal(out, want)
        return
    one_step = torch.maximum(out.float().abs(), want.float().abs()) * 2**-7
    assert bool(((out.float() - want.float()).abs() <= one_step).all())
    assert (out != want).float().mean().item() < 0.05  # an occasional last bit, not a different product


def packed(w: torch.Tensor) -> bool:
    return w in L._packed


@pytest.mark.parametrize("shape", [(1, 512), (8, 512), (3, 5, 512), "strided"])
def test_packed_product_equals_f_linear_and_float64(shape):
    w, b = weight(), weight(1, 2048, seed=1)[0]
    g = torch.Generator().manual_seed(2)
    if shape == "strided":  # the engine's last-position rows: hidden[:, -1]
        x = torch.randn(4, 7, 512, generator=g).to(torch.bfloat16)[:, -1]
        assert not x.is_contiguous()
    else:
        x = torch.randn(*shape, generator=g).to(torch.bfloat16)
    with torch.no_grad():
        out = L.linear(x, w)
        assert packed(w)
        assert_the_product(out, x, w)
        assert_the_product(L.linear(x, w, b), x, w, b)


def test_the_packed_copy_follows_the_weight():
    w = weight()
    x = torch.randn(4, 512).to(torch.bfloat16)
    with torch.no_grad():
        first = L.linear(x, w)
        w.copy_(weight(seed=3))  # an in-place update (an optimizer step, the RL twin's sync)
        assert not torch.equal(L.linear(x, w), first)
        assert_the_product(L.linear(x, w), x, w)
        w.data = weight(seed=4)  # a new storage
        assert_the_product(L.linear(x, w), x, w)
    n = len(L._packed)
    del w
    gc.collect()
    assert len(L._packed) == n - 1  # a dead weight's copy goes with it


def test_under_bf16_autocast_float32_rows_are_cast_as_autocast_would():
    w = weight()
    x = torch.randn(3, 512)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = L.linear(x, w)
        want = F.linear(x, w)
    assert packed(w)
    assert_as_f_linear(out, want)


def test_where_the_packed_kernel_is_not_used():
    x = torch.randn(2, 512).to(torch.bfloat16)
    with torch.no_grad():
        small = weight(1000)  # under PACKED_MIN_BYTES: it fits in the cache
        L.linear(x, small)
        w32 = weight().float()  # float32 weights are not packed (their products: `cpu_kernel.float32_rows`)
        torch.testing.assert_close(L.linear(x.float(), w32), F.linear(x.float(), w32), rtol=1e-5, atol=1e-5)
    assert not packed(small) and not packed(w32)

    # A gradient wanted: F.linear, with its backward (against the float64 product's)
    w = weight().requires_grad_()
    out = L.linear(x, w)
    assert not packed(w) and out.grad_fn is not None
    out.float().sum().backward()
    torch.testing.assert_close(w.grad.double(), x.double().sum(0).expand(2048, -1), rtol=2**-7, atol=1e-2)


def test_past_the_memory_budget_weights_keep_f_linear(monkeypatch):
    monkeypatch.setattr(L, "PACKED_MAX_MEMORY_FRACTION", 0.0)
    w = weight()
    x = torch.randn(2, 512).to(torch.bfloat16)
    q, k, v = layers(1024, 256, 256, bias=True)
    with torch.no_grad():
        assert_the_product(L.linear(x, w), x, w)
        for out, layer in zip(L.linears(x, (q, k, v)), (q, k, v)):  # a stack: each product on its own
            assert_the_product(out, x, layer.weight, layer.bias)
    assert not packed(w) and not packed(q.weight)


@pytest.mark.slow
def test_inside_a_compiled_graph_the_packed_copy_follows_live_weights():
    """As in the engine's compiled decode step (the C++ wrapper): the same product as eager, and after the weight
    changes in place the graph multiplies by the new weight, with no recompilation."""
    from torch._dynamo.utils import counters

    w = weight()
    x = torch.randn(4, 512).to(torch.bfloat16)
    torch._dynamo.reset()  # the other kernel's run compiled this same code
    step = torch.compile(lambda x, w: L.linear(x, w).float() * 2, options={"cpp_wrapper": True})
    counters.clear()
    with torch.no_grad():
        assert_as_f_linear(step(x, w), F.linear(x, w).float() * 2)
        assert packed(w)
        w.copy_(weight(seed=5))
        assert_as_f_linear(step(x, w), F.linear(x, w).float() * 2)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]


def test_a_bf16_model_decodes_the_same_with_and_without_packed_weights(monkeypatch):
    """tiny with a 4096-token vocabulary in bf16: its tied output layer (1 MiB) takes the packed kernel."""
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny", vocab_size=4096, init_std=0.2)).to(torch.bfloat16).eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 4096, (n,), generator=g).tolist() for n in (3, 11, 6)]
    params = SamplingParams(max_new_tokens=12, temperature=0)

    def run() -> list:
        engine = Engine(model, max_batch=4, compile=False)
        return [(c.token_ids, c.logprobs) for group in engine.generate(prompts, params) for c in group]

    got = run()
    assert packed(model.output_weight)
    monkeypatch.setattr(L, "USE_PACKED", False)
    want = run()
    if not cpu_kernel.USE:  # oneDNN's prepacked kernel: F.linear's values exactly
        assert got == want
    for (tokens, logprobs), (want_tokens, want_logprobs) in zip(got, want):  # ours: an occasional last bit
        assert tokens == want_tokens
        torch.testing.assert_close(torch.tensor(logprobs), torch.tensor(want_logprobs), rtol=0, atol=0.05)


def layers(*out_features: int, bias: bool = False, cls=L.Linear) -> list[torch.nn.Linear]:
    torch.manual_seed(0)
    return [cls(512, n, bias=bias).to(torch.bfloat16).requires_grad_(False) for n in out_features]


@pytest.mark.parametrize("bias", [False, True])
def test_stacked_layers_take_one_packed_product_equal_to_each_layers(bias):
    """q/k/v-like layers (one 1 MiB weight and two of 0.25 MiB, under PACKED_MIN_BYTES alone): one packed product
    of their stack, split; each part as the layer's own product; it follows an in-place change of any of them."""
    q, k, v = layers(1024, 256, 256, bias=bias)
    x = torch.randn(2, 3, 512).to(torch.bfloat16)
    with torch.no_grad():
        outs = L.linears(x, (q, k, v))
        assert packed(q.weight) and not packed(k.weight)  # one entry, for the stack, under its first weight
        for out, layer in zip(outs, (q, k, v)):
            assert_the_product(out, x, layer.weight, layer.bias)
        v.weight.copy_(torch.randn(256, 512).to(torch.bfloat16))
        assert_the_product(L.linears(x, (q, k, v))[2], x, v.weight, v.bias)


def test_stacked_layers_each_apply_where_they_cannot_be_stacked():
    x = torch.randn(4, 512).to(torch.bfloat16)
    plain = layers(1024, 256, cls=torch.nn.Linear)  # not the model's Linear (a LoRA wrapper, say): its own forward
    with torch.no_grad():
        outs = L.linears(x, plain)
    assert not packed(plain[0].weight) and all(torch.equal(o, m(x)) for o, m in zip(outs, plain))
    mixed = [*layers(1024), *layers(256, bias=True)]  # biases on some layers only
    with torch.no_grad():
        outs = L.linears(x, mixed)
        assert all(torch.equal(o, m(x)) for o, m in zip(outs, mixed))
    assert len(L._packed[mixed[0].weight][0]) == 1  # the 1 MiB layer packed alone, by its own forward: no stack
    grads = layers(1024, 256)
    for m in grads:
        m.requires_grad_(True)
    outs = L.linears(x, grads)  # gradients wanted: each layer, with its backward
    assert all(o.grad_fn is not None for o in outs)


def test_a_lora_layer_multiplies_its_frozen_bf16_base_through_the_packed_copy():
    from nanoseek.model.lora import LoRALinear

    (base,) = layers(2048)
    lora = LoRALinear(base, rank=4, scale=2.0, dropout=0.0, dtype=torch.float32)
    torch.nn.init.normal_(lora.lora_b)
    x = torch.randn(3, 512).to(torch.bfloat16)
    with torch.no_grad():
        out = lora(x)
        assert packed(base.weight)
        low = F.linear(F.linear(x.float(), lora.lora_a), lora.lora_b) * 2.0
        assert_as_f_linear(out, F.linear(x, base.weight) + low.to(torch.bfloat16))
    out = lora(x.requires_grad_())  # training: F.linear with its backward, the adapters get gradients
    out.float().sum().backward()
    assert lora.lora_a.grad is not None and base.weight.grad is None


def test_the_start_line_says_when_weights_are_packed(monkeypatch):
    """`describe_packing` (the commands' start line): said for a bf16 model with a Linear weight of PACKED_MIN_BYTES
    or more, which the first product then packs; nothing for the same model in float32, under the threshold, or
    with USE_PACKED off."""
    big = Transformer(get_preset("tiny", d_model=512, d_ff=1024, n_layers=1)).eval()  # a 1 MiB bf16 MLP weight
    assert big.layers[0].mlp.w1.weight.numel() * 2 >= L.PACKED_MIN_BYTES
    assert L.describe_packing(big) == ""  # float32
    big.to(torch.bfloat16)
    assert "prepacked" in L.describe_packing(big)
    with torch.no_grad():
        big.layers[0].mlp.w1(torch.randn(2, 512, dtype=torch.bfloat16))
    assert packed(big.layers[0].mlp.w1.weight)  # what the line says is what the product does
    assert L.describe_packing(Transformer(get_preset("tiny")).to(torch.bfloat16)) == ""  # every weight under 1 MiB
    monkeypatch.setattr(L, "USE_PACKED", False)
    assert L.describe_packing(big) == ""
    monkeypatch.setattr(L, "USE_PACKED", True)
    assert L.describe_packing(big.to("meta")) == ""  # weights off the CPU (a CUDA model's line said so until 12-04)
