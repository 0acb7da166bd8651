"""`model.cpu_kernel`: our few-rows bf16 product against float64 and oneDNN's prepacked kernel at every row count it
specialises; our decode attention against a float64 loop over every query row; the build (cached, atomic, a failed
compiler or a wrong answer: a warning, oneDNN's kernel and the cache's own attention)."""

from __future__ import annotations

import ctypes
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

from nanoseek.model import cpu_kernel
from nanoseek.model import linear as L

needs_kernel = pytest.mark.skipif(
    not cpu_kernel.available(), reason="nanoseek's CPU kernel does not apply here (AVX-512 BF16, g++)"
)
needs_attention = pytest.mark.skipif(
    not cpu_kernel.attention_available(), reason="nanoseek's CPU attention does not apply here (AVX-512 BF16, g++)"
)
needs_products = pytest.mark.skipif(
    not cpu_kernel.products_available(), reason="nanoseek's bf16 product is not linear's here (AMX: oneDNN's)"
)


def bf16(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    ("kernel", "n", "k"),
    [
        *[("avx512", n, k) for n, k in [(16, 2), (48, 36), (1056, 768)]],  # one block; a lone last block; many
        *[("amx", n, k) for n, k in [(16, 32), (80, 64), (1056, 768)]],  # one tile; four blocks and one; many
    ],
)
def test_the_product_at_every_row_count_against_float64_and_onednn(kernel, n, k, threads, monkeypatch):
    """1-20 rows (the AVX-512 loop's chunks of 8 and every tail; AMX's chunk of 16 and the zero-padded tails past it)
    and 33, with and without a bias: within bf16 output rounding of the float64 product of the same numbers, and
    oneDNN's prepacked product of the same weight but for an occasional last bit. The AMX product only where the CPU
    has it and Linux granted its tiles; the AVX-512 one everywhere (`AMX` off)."""
    if kernel == "amx" and not (cpu_kernel.available() and cpu_kernel.products_through_amx()):
        pytest.skip("no AMX here (or Linux did not grant its tiles)")
    monkeypatch.setattr(cpu_kernel, "AMX", kernel == "amx")
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    w, b, x = bf16(n, k, seed=0) / k**0.5, bf16(n, seed=1), bf16(33, k, seed=2)
    packed, onednn = cpu_kernel.pack(w), torch.ops.mkldnn._reorder_linear_weight(w, None)
    for rows in [*range(1, 21), 33]:
        for bias in (None, b):
            got = cpu_kernel.product(x[:rows], packed, bias)
            want = F.linear(x[:rows].double(), w.double(), None if bias is None else bias.double())
            assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
            torch.testing.assert_close(got.double(), want, rtol=2**-8, atol=1e-6)  # bf16 rounding: half a step
            theirs = torch.ops.mkldnn._linear_pointwise(x[:rows], onednn, bias, "none", [], "")
            # one bf16 step apart at most (float32 sums added in another order round differently near a tie); near
            # zero, where the sums cancel, by their float32 rounding
            torch.testing.assert_close(got.float(), theirs.float(), rtol=2**-7, atol=1e-5)
            assert (got != theirs).float().mean().item() < 0.01


@needs_kernel
def test_rows_of_any_leading_shape_and_none():
    w = bf16(64, 32, seed=0)
    packed = cpu_kernel.pack(w)
    x = bf16(3, 5, 64, seed=1)[..., ::2]  # [3, 5, 32], not contiguous
    got = cpu_kernel.product(x, packed)
    assert got.shape == (3, 5, 64)
    torch.testing.assert_close(got.double(), x.double() @ w.double().T, rtol=2**-8, atol=1e-6)
    assert cpu_kernel.product(x[:0], packed).shape == (0, 5, 64)
    with pytest.raises(ValueError, match="must be bf16"):  # the kernel would read float32 bytes as bf16 pairs
        cpu_kernel.product(x.float(), packed)
    with pytest.raises(ValueError, match="must be bf16"):  # or read past the row's end
        cpu_kernel.product(x[..., :16], packed)


def test_the_shapes_it_takes(monkeypatch):
    monkeypatch.setattr(cpu_kernel, "_has_amx", lambda: False)
    assert cpu_kernel.fits(torch.empty(32, 64)) and cpu_kernel.fits(torch.empty(16, 2))
    assert not cpu_kernel.fits(torch.empty(24, 64))  # not whole blocks of 16 outputs
    assert not cpu_kernel.fits(torch.empty(32, 63))  # not whole pairs of inputs
    w = torch.arange(32 * 4, dtype=torch.float32).view(32, 4)
    packed = cpu_kernel.pack(w)  # [N/16, K/2, 16, 2]: block, input pair, output in the block, the pair's two
    assert packed.shape == (2, 2, 16, 2)
    assert packed[1, 1, 3].tolist() == [w[16 + 3, 2].item(), w[16 + 3, 3].item()]
    monkeypatch.setattr(cpu_kernel, "_has_amx", lambda: True)  # AMX's tiles take 32 inputs
    assert cpu_kernel.fits(torch.empty(32, 64)) and not cpu_kernel.fits(torch.empty(32, 48))
    monkeypatch.setattr(cpu_kernel, "AMX", False)
    assert cpu_kernel.fits(torch.empty(32, 48))


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """The module as before its first build, building into an empty directory."""
    monkeypatch.setattr(cpu_kernel, "_kernels", None)
    monkeypatch.setattr(cpu_kernel, "_failure", None)
    monkeypatch.setattr(cpu_kernel, "USE", True)
    monkeypatch.setenv(cpu_kernel.DIR_ENV, str(tmp_path))
    return tmp_path


@needs_kernel
def test_a_build_is_kept_and_reused(fresh, monkeypatch):
    assert cpu_kernel.available()
    (library,) = fresh.glob("kernels-*.so")
    assert list(fresh.iterdir()) == [library]  # no partial file left
    monkeypatch.setattr(cpu_kernel, "_kernels", None)  # a new process, say

    def no_compiling(*args, **kwargs):
        raise AssertionError("compiled again")

    monkeypatch.setattr(cpu_kernel.subprocess, "run", no_compiling)
    assert cpu_kernel.available() and list(fresh.iterdir()) == [library]


@needs_kernel
@pytest.mark.parametrize("failure", ["compiler", "wrong product"])
def test_a_failed_build_warns_once_and_the_products_stay_onednns(failure, fresh, monkeypatch):
    if failure == "compiler":
        monkeypatch.setenv("CXX", "false")  # exits 1
    else:
        real_load = cpu_kernel._load

        def flip_top_mantissa_bits(out: int, count: int) -> None:
            words = (ctypes.c_int16 * count).from_address(out)
            torch.frombuffer(words, dtype=torch.int16).bitwise_xor_(0x40)

        def kernels_with_a_bug(library):
            kernels = real_load(library)

            def wrong_product(x, m, p, bias, out, n, k, threads):
                kernels.product(x, m, p, bias, out, n, k, threads)
                flip_top_mantissa_bits(out, m * n)

            return kernels._replace(product=wrong_product)

        monkeypatch.setattr(cpu_kernel, "_load", kernels_with_a_bug)
    with pytest.warns(UserWarning, match="CPU kernel is off"):
        assert not cpu_kernel.available()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not cpu_kernel.available()  # warned once
        w, x = bf16(2048, 512, seed=0), bf16(2, 512, seed=1)
        with torch.no_grad():
            out = L.linear(x, w)
        assert L._packed[w][1] == "onednn" and torch.equal(out, F.linear(x, w))


def test_where_it_does_not_apply(fresh, monkeypatch):
    monkeypatch.setenv(cpu_kernel.ENV, "0")
    assert not cpu_kernel.available()
    monkeypatch.setenv(cpu_kernel.ENV, "yes")
    with pytest.raises(ValueError, match="NANOSEEK_CPU_KERNEL"):
        cpu_kernel.available()
    monkeypatch.delenv(cpu_kernel.ENV)
    monkeypatch.setattr(cpu_kernel.precision, "cpu_bf16_instructions", lambda: None)
    assert not cpu_kernel.available() and not list(fresh.iterdir())  # nothing built


@needs_kernel
def test_with_amx_the_product_is_ours_only_through_amx(monkeypatch):
    """On a CPU with AMX, `model.linear` packs for our product where the AMX product is built and Linux granted its
    tiles (not for the AVX-512 loop alone, 1.7-4x behind oneDNN's AMX kernel from 8 rows); with `AMX` off, oneDNN's.
    The attention applies either way."""
    monkeypatch.setattr(cpu_kernel, "_has_amx", lambda: True)
    granted = cpu_kernel.available() and cpu_kernel.products_through_amx()
    assert cpu_kernel.attention_available() and cpu_kernel.products_available() == granted
    w, x = bf16(2048, 512, seed=0), bf16(3, 512, seed=1)
    with torch.no_grad():
        want = L.linear(x, w)
    assert L._packed[w][1] == ("ours" if granted else "onednn")
    monkeypatch.setattr(cpu_kernel, "AMX", False)
    assert not cpu_kernel.products_available()
    with torch.no_grad():
        got = L.linear(x, w)
    assert L._packed[w][1] == "onednn"
    torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=1e-5)
    monkeypatch.setattr(cpu_kernel, "_has_amx", lambda: False)
    assert cpu_kernel.products_available()


@needs_products
def test_linear_packs_for_the_kernel_in_use(monkeypatch):
    """`model.linear` multiplies a 2 MiB bf16 weight through ours; with USE off, the same weight is packed again for
    oneDNN at its next product (not multiplied through a copy laid out for the other kernel), and back."""
    w, x = bf16(2048, 512, seed=0), bf16(3, 512, seed=1)
    want = x.double() @ w.double().T
    for use, kernel in ((True, "ours"), (False, "onednn"), (True, "ours")):
        monkeypatch.setattr(cpu_kernel, "USE", use)
        with torch.no_grad():
            out = L.linear(x, w)
        assert L._packed[w][1] == kernel
        torch.testing.assert_close(out.double(), want, rtol=2**-8, atol=1e-6)
    odd = bf16(2040, 512, seed=2)  # not whole blocks of 16 outputs: oneDNN's, with ours on
    with torch.no_grad():
        L.linear(x, odd)
    assert L._packed[odd][1] == "onednn"


def attention_loop(q, keys, values, positions, slots, kv_len, scale):
    """The reference: each (row, kv head, query row) on its own in float64, over the keys its token may see."""
    B, Hkv, R, _ = q.shape
    T = positions.shape[1]
    out = torch.zeros(B, Hkv, R, values.shape[-1], dtype=torch.float64)
    for b in range(B):
        s = b if slots is None else int(slots[b])
        for h in range(Hkv):
            for r in range(R):
                n = min(int(positions[b, r % T]) + 1, kv_len)
                scores = keys[s, h, :n].double() @ q[b, h, r].double() * scale
                out[b, h, r] = scores.softmax(0) @ values[s, h, :n].double()
    return out


@needs_attention
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    ("rep", "T", "dk", "dv", "kv_len"),
    [
        (2, 1, 32, 32, 37),  # tiny's heads; a partial last block of 16 keys
        (3, 1, 64, 64, 80),  # small's: 3 query heads a kv head, two chunks of 32 numbers a key
        (1, 3, 40, 24, 16),  # three tokens a row (an append), partial chunks of the key and the value
        (4, 2, 144, 128, 33),  # five chunks a key: the loop for any key width
    ],
)
def test_decode_attention_against_a_float64_loop(rep, T, dk, dv, kv_len, threads):
    """Rows reading their own slot or other slots (int64 and int32 indices), positions before, at and past the keys
    read: within bf16 output rounding of the float64 attention over the same bf16 numbers."""
    n_slots, max_len, Hkv, B = 6, 96, 2, 5
    keys, values = bf16(n_slots, Hkv, max_len, dk, seed=0), bf16(n_slots, Hkv, max_len, dv, seed=1)
    q = bf16(B, Hkv, rep * T, dk, seed=2)
    g = torch.Generator().manual_seed(3)
    positions = torch.randint(0, kv_len + 4, (B, T), generator=g)
    positions[0] = 0  # a row that sees one key
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for slots in (None, torch.tensor([4, 0, 5, 2, 2]), torch.tensor([1, 1, 3, 0, 5], dtype=torch.int32)):
            got = cpu_kernel.decode_attention(q, keys, values, positions, slots, kv_len, dk**-0.5)
            want = attention_loop(q, keys, values, positions, slots, kv_len, dk**-0.5)
            assert got.dtype == torch.bfloat16 and got.shape == want.shape
            torch.testing.assert_close(got.double(), want, rtol=2**-8, atol=1e-5)
    finally:
        torch.set_num_threads(previous)


@needs_attention
def test_decode_attention_reads_values_inside_the_keys():
    """MLA's absorbed cache: the value is the first v_dim numbers of each key (a strided view, no copy)."""
    keys = bf16(3, 1, 40, 80, seed=0)  # [slots, one kv "head", positions, latent + rope]
    values = keys[..., :64]
    q = bf16(3, 1, 4, 80, seed=1)
    positions = torch.tensor([[5], [39], [17]])
    got = cpu_kernel.decode_attention(q, keys, values, positions, None, 40, 0.1)
    want = attention_loop(q, keys, values, positions, None, 40, 0.1)
    torch.testing.assert_close(got.double(), want, rtol=2**-8, atol=1e-5)


@needs_attention
def test_decode_attention_refuses_what_it_cannot_read():
    keys = bf16(2, 1, 8, 32, seed=0)
    q, positions = bf16(2, 1, 2, 32, seed=1), torch.zeros(2, 1, dtype=torch.int64)
    for bad in (
        dict(q=q.float()),  # not bf16
        dict(keys=keys[..., :16]),  # a key narrower than the query
        dict(keys=keys.transpose(-1, -2).contiguous().transpose(-1, -2)),  # numbers of a key not contiguous
        dict(positions=positions.int()),
        dict(kv_len=9),  # more keys than the cache holds
        dict(kv_len=0),
        dict(values=bf16(2, 1, 4, 32, seed=2)),  # fewer positions than the keys
        dict(q=bf16(3, 1, 2, 32, seed=3), positions=torch.zeros(3, 1, dtype=torch.int64)),  # rows past the cache's
        dict(slots=torch.tensor([0])),  # a slot for each row, not fewer
        dict(positions=torch.zeros(2, 3, dtype=torch.int64)),  # query rows not whole tokens (2 rows, 3 tokens)
    ):
        args = dict(q=q, keys=keys, values=keys, positions=positions, slots=None, kv_len=8, scale=1.0) | bad
        with pytest.raises(ValueError, match="cpu_kernel.decode_attention"):
            cpu_kernel.decode_attention(**args)


needs_float32 = pytest.mark.skipif(
    not cpu_kernel.float32_available(), reason="nanoseek's float32 CPU kernel does not apply here (AVX-512, g++)"
)


def f32(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@needs_float32
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(("outputs", "k"), [((16,), 16), ((48, 32, 16), 128), ((64,), 400)])
def test_float32_rows_against_float64_and_mkl(outputs, k, threads):
    """1-20 rows (chunks of 8 and every tail), 64 and 130; one weight or several side by side (odd counts of blocks
    of 16, so a thread's last group holds one block); with and without biases: within float32 rounding of the float64
    product, and of F.linear's (MKL's) float32 product."""
    weights = [f32(n, k, seed=i) / k**0.5 for i, n in enumerate(outputs)]
    biases = [f32(n, seed=10 + i) for i, n in enumerate(outputs)]
    x = f32(130, k, seed=20)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for rows in [*range(1, 21), 64, 130]:
            for bias in ([], biases):
                got = cpu_kernel.float32_rows(x[:rows], weights, bias)
                parts = [F.linear(x[:rows], w, bias[i] if bias else None) for i, w in enumerate(weights)]
                want = torch.cat(
                    [F.linear(x[:rows].double(), w.double(), bias[i].double() if bias else None) for i, w in
                     enumerate(weights)], dim=-1,
                )  # fmt: skip
                assert got.dtype == torch.float32 and got.shape == (rows, sum(outputs))
                torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(got, torch.cat(parts, dim=-1), rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(previous)


@needs_float32
def test_float32_rows_of_any_leading_shape_none_and_bad_input():
    w = f32(32, 64, seed=0)
    x = f32(3, 5, 128, seed=1)[..., ::2]  # [3, 5, 64], not contiguous
    got = cpu_kernel.float32_rows(x, [w], [])
    assert got.shape == (3, 5, 32)
    torch.testing.assert_close(got.double(), x.double() @ w.double().T, rtol=1e-5, atol=1e-5)
    assert cpu_kernel.float32_rows(x[:0], [w], []).shape == (0, 5, 32)
    # the kernel reads raw memory: what it cannot read is an error, not a wrong answer
    with pytest.raises(RuntimeError, match="multiple of 16"):
        cpu_kernel.float32_rows(f32(2, 24, seed=2), [f32(16, 24, seed=3)], [])
    with pytest.raises(RuntimeError, match="weight 0 must be float32"):
        cpu_kernel.float32_rows(f32(2, 64, seed=2), [f32(24, 64, seed=3)], [])
    with pytest.raises(RuntimeError, match="x must be float32"):
        cpu_kernel.float32_rows(x.double(), [w], [])
    with pytest.raises(RuntimeError, match="bias 0"):
        cpu_kernel.float32_rows(x, [w], [f32(16, seed=4)])


@needs_float32
def test_linear_takes_float32_rows_only_where_it_applies(monkeypatch):
    """No gradient wanted, no autocast, float32, at most FLOAT32_MAX_ROWS rows, shapes it takes; else F.linear. The
    q/k/v-style stack: one call, each output as its own layer's."""
    calls = []
    real = cpu_kernel.float32_rows

    def counted(x, weights, biases):
        calls.append(len(weights))
        return real(x, weights, biases)

    monkeypatch.setattr(cpu_kernel, "float32_rows", counted)
    layers = [L.Linear(64, n, bias=False) for n in (64, 32, 32)]
    x = f32(4, 64, seed=0)
    with torch.no_grad():
        torch.testing.assert_close(L.linear(x, layers[0].weight), F.linear(x, layers[0].weight), rtol=1e-5, atol=1e-6)
        assert calls == [1]
        outs = L.linears(x, layers)
        assert calls == [1, 3]
        for out, layer in zip(outs, layers):
            torch.testing.assert_close(out, F.linear(x, layer.weight), rtol=1e-5, atol=1e-6)
        L.linear(f32(cpu_kernel.FLOAT32_MAX_ROWS + 1, 64, seed=1), layers[0].weight)  # many rows: MKL's
        L.linear(x, f32(24, 64, seed=2))  # not whole blocks of 16 outputs
        L.linear(x.double(), layers[0].weight.double())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            L.linear(x, layers[0].weight)
        monkeypatch.setattr(L, "FLOAT32_ROWS", False)
        L.linear(x, layers[0].weight)
    assert calls == [1, 3]
    monkeypatch.setattr(L, "FLOAT32_ROWS", True)
    out = L.linear(x, layers[0].weight)  # a gradient wanted: the kernel has no backward
    out.sum().backward()
    assert calls == [1, 3] and layers[0].weight.grad is not None


@needs_float32
def test_float32_rows_inside_a_compiled_graph():
    """Traced as one operation (its shape function), rows dynamic: the compiled product equals the eager one."""
    w = f32(48, 32, seed=0)

    def step(x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(L.linear(x, w) * 2)

    compiled = torch.compile(step, dynamic=True)
    with torch.no_grad():
        for rows in (3, 7):
            x = f32(rows, 32, seed=rows)
            torch.testing.assert_close(compiled(x), step(x), rtol=1e-6, atol=1e-6)


def test_a_failed_float32_build_warns_once_and_the_products_stay_mkls(fresh, monkeypatch):
    monkeypatch.setattr(cpu_kernel, "_float32_state", None)
    monkeypatch.setenv("CXX", "false")  # exits 1
    x86_avx512 = torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    if not x86_avx512 or cpu_kernel.platform.machine() not in ("x86_64", "AMD64"):
        assert not cpu_kernel.float32_available()
        return
    with pytest.warns(UserWarning, match="float32 CPU kernel is off"):
        assert not cpu_kernel.float32_available()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not cpu_kernel.float32_available()  # warned once
        w, x = f32(32, 64, seed=0), f32(4, 64, seed=1)
        with torch.no_grad():
            assert torch.equal(L.linear(x, w), F.linear(x, w))
    monkeypatch.setenv(cpu_kernel.ENV, "0")
    monkeypatch.setattr(cpu_kernel, "_float32_state", None)
    assert not cpu_kernel.float32_available() and not list(fresh.iterdir())  # off: nothing built


@needs_attention
def test_a_wrong_attention_turns_its_library_off_with_one_warning(monkeypatch):
    """The attention is checked with the float32 library it is built into: a wrong answer there turns both off."""
    monkeypatch.setattr(cpu_kernel, "_float32_state", None)
    right = cpu_kernel.decode_attention
    monkeypatch.setattr(cpu_kernel, "decode_attention", lambda *args: right(*args) * 1.02)
    with pytest.warns(UserWarning, match="float32 CPU kernel is off.*attention is off by"):
        assert not cpu_kernel.attention_available()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not cpu_kernel.float32_available() and not cpu_kernel.attention_available()  # warned once


def test_no_build_while_dynamo_traces(monkeypatch):
    """Before the float32 kernel was tried, a graph traced now multiplies with F.linear and builds nothing: the engine
    builds the kernel before it compiles (`engine.compiled`)."""
    monkeypatch.setattr(cpu_kernel, "_float32_state", None)

    def no_building(*args, **kwargs):
        raise AssertionError("built while Dynamo traced")

    monkeypatch.setattr(cpu_kernel, "_build", no_building)
    w = f32(32, 32, seed=0)
    compiled = torch.compile(lambda x: L.linear(x, w) * 2)
    with torch.no_grad():
        x = f32(4, 32, seed=1)
        torch.testing.assert_close(compiled(x), F.linear(x, w) * 2)


def routed_case(tokens: int, k: int, experts: int, hidden: int, width: int, g: torch.Generator) -> tuple:
    """(x, ids, weights, w1, w3, w2) for the experts: the last expert never chosen, expert 0 by most tokens (chunks of
    8 rows and tails)."""
    w1, w3 = (torch.randn(experts, hidden, width, generator=g) / width**0.5 for _ in range(2))
    w2 = torch.randn(experts, width, hidden, generator=g) / hidden**0.5
    x, weights = torch.randn(tokens, width, generator=g), torch.rand(tokens, k, generator=g)
    ids = torch.randint(0, experts - 1, (tokens, k), generator=g)
    ids[: tokens // 2, 0] = 0
    return x, ids, weights, w1, w3, w2


@needs_float32
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    ("tokens", "k", "experts", "hidden", "width"),
    [(1, 1, 4, 16, 16), (21, 2, 8, 96, 128), (37, 3, 5, 32, 48), (300, 2, 4, 16, 32)],
)
def test_float32_experts_against_a_float64_loop(tokens, k, experts, hidden, width, threads):
    """Token copies routed to experts (the last expert never chosen; expert 0 by most tokens: chunks of 8 rows and
    tails), a weighted sum per token in the order of its choices: within float32 rounding of a float64 loop over
    tokens and choices (`cpu_kernel.experts_float64`)."""
    x, ids, weights, w1, w3, w2 = routed_case(tokens, k, experts, hidden, width, torch.Generator().manual_seed(tokens))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = cpu_kernel.float32_experts(x, ids, weights, w1, w3, w2)
        empty = cpu_kernel.float32_experts(x[:0], ids[:0], weights[:0], w1, w3, w2)
    finally:
        torch.set_num_threads(previous)
    assert got.dtype == torch.float32 and got.shape == (tokens, width) and empty.shape == (0, width)
    want = cpu_kernel.experts_float64(x, ids, weights, w1, w3, w2)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@needs_float32
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    ("tokens", "k", "experts", "hidden", "width"),
    [(1, 1, 4, 16, 16), (21, 2, 8, 96, 128), (37, 3, 5, 32, 48), (128, 8, 64, 32, 64)],
)
def test_float32_experts_gradients_against_float64_autograd(tokens, k, experts, hidden, width, threads):
    """With gradients on, `float32_experts` runs its training operations: the output and the gradients of the rows,
    the gate weights and the three expert weights (zero for the expert no copy chose) within float32 rounding of
    autograd through the float64 loop; the rows' own gradient as well through a second use of them."""
    g = torch.Generator().manual_seed(tokens + 1)
    x, ids, weights, w1, w3, w2 = routed_case(tokens, k, experts, hidden, width, g)
    grad = torch.randn(tokens, width, generator=g)
    leaves = [t.clone().requires_grad_() for t in (x, weights, w1, w3, w2)]
    wide = [t.double().requires_grad_() for t in (x, weights, w1, w3, w2)]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = cpu_kernel.float32_experts(leaves[0], ids, *leaves[1:])
        (got * grad + leaves[0] ** 2).sum().backward()
    finally:
        torch.set_num_threads(previous)
    want = cpu_kernel.experts_float64(wide[0], ids, *wide[1:])
    (want * grad.double() + wide[0] ** 2).sum().backward()
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-5)
    for name, a, b in zip(("x", "weights", "w1", "w3", "w2"), leaves, wide, strict=True):
        assert a.grad.dtype == torch.float32, name
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-5, atol=1e-5, msg=name)
    assert not leaves[2].grad[experts - 1].any() and not leaves[4].grad[experts - 1].any()


@needs_float32
def test_float32_experts_training_operations_refuse_what_they_cannot_read():
    """The backward checks what the forward kept: a wrong saved shape is one error, not a read out of bounds."""
    w1, w3, w2 = f32(4, 16, 32, seed=0), f32(4, 16, 32, seed=1), f32(4, 32, 16, seed=2)
    x, ids, weights = f32(3, 32, seed=3), torch.tensor([[0, 1], [2, 3], [1, 1]]), f32(3, 2, seed=4)
    out, gate, up, ys = torch.ops.nanoseek.float32_experts_train.default(x, ids, weights, w1, w3, w2)
    assert gate.shape == up.shape == (6, 16) and ys.shape == (6, 32)
    backward = torch.ops.nanoseek.float32_experts_backward.default
    backward(out, x, ids, weights, w1, w3, w2, gate, up, ys)  # what it takes
    with pytest.raises(RuntimeError, match=r"gate and up \[N \* k, F\]"):
        backward(out, x, ids, weights, w1, w3, w2, gate[:5], up[:5], ys)
    with pytest.raises(RuntimeError, match=r"grad \[N, D\]"):
        backward(out[:, :16], x, ids, weights, w1, w3, w2, gate, up, ys)
    with pytest.raises(RuntimeError, match="out of range for 4 experts"):
        backward(out, x, ids + 1, weights, w1, w3, w2, gate, up, ys)


@needs_float32
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    ("batch", "heads", "kv_heads", "tokens", "width", "value_width", "docs"),
    [
        (2, 4, 2, 37, 32, 32, "packed"),  # a partial last block of keys
        (3, 2, 1, 70, 16, 48, None),  # causal, values wider than keys
        (2, 4, 4, 64, 32, 16, "out of order"),  # ids that go back: every earlier key tested
        (4, 4, 2, 256, 32, 32, "packed"),  # the demo's length
        (1, 2, 2, 1, 16, 16, None),  # one token
    ],
)
def test_chunk_attention_against_float64(batch, heads, kv_heads, tokens, width, value_width, docs, threads):
    """The training attention's output and the gradients of q, k and v within float32 rounding of autograd through
    the float64 reference over the whole masked T x T scores (`cpu_kernel.chunk_attention_float64`); bf16 heads in,
    bf16 out, within bf16 rounding."""
    g = torch.Generator().manual_seed(tokens)
    q = torch.randn(batch, heads, tokens, width, generator=g)
    k = torch.randn(batch, kv_heads, tokens, width, generator=g)
    v = torch.randn(batch, kv_heads, tokens, value_width, generator=g)
    doc_ids = None
    if docs == "packed":
        doc_ids = torch.cumsum((torch.rand(batch, tokens, generator=g) < 0.05).long(), dim=1)
    elif docs == "out of order":
        doc_ids = torch.randint(0, 3, (batch, tokens), generator=g)
    grad = torch.randn(batch, heads, tokens, value_width, generator=g)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    wide = [t.double().requires_grad_() for t in (q, k, v)]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = cpu_kernel.chunk_attention(*leaves, 0.3, doc_ids)
        out.backward(grad)
        half = cpu_kernel.chunk_attention(*(t.to(torch.bfloat16) for t in (q, k, v)), 0.3, doc_ids)
    finally:
        torch.set_num_threads(previous)
    want = cpu_kernel.chunk_attention_float64(*wide, 0.3, doc_ids)
    want.backward(grad.double())
    assert out.dtype == torch.float32 and out.shape == want.shape
    torch.testing.assert_close(out.double(), want.detach(), rtol=1e-5, atol=1e-5)
    for name, a, b in zip("qkv", leaves, wide, strict=True):
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-5, atol=1e-5, msg=name)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.double(), want.detach(), rtol=0, atol=5e-2)


CHECKPOINTED_FIRST_USE = """
import sys
import torch
from nanoseek.model import Transformer, cpu_kernel, get_preset
from nanoseek.train.parallel import checkpoint_blocks
torch.manual_seed(0)
model = Transformer(get_preset("tiny-moe", n_layers=2, d_model=32, n_heads=2, n_kv_heads=1, moe_d_ff=16)).train()
checkpoint_blocks(model, sys.argv[1])
ids, docs = torch.randint(0, 512, (2, 33)), torch.tensor([[0] * 10 + [1] * 22, [0] * 32])
ce, aux = model.loss(ids[:, :-1], ids[:, 1:], None, docs)
(ce + aux).backward()
print(cpu_kernel._float32_state, all(p.grad is not None for p in model.parameters() if p.requires_grad))
"""


@needs_float32
@pytest.mark.parametrize("checkpointing", ["block", "selective"])
def test_the_check_runs_apart_from_a_checkpointed_forward(checkpointing):
    """The library first asked for inside an activation-checkpointed training forward (its attention and experts):
    the build's check runs in a thread of its own, so the checkpoint's saved-tensor hooks and selective dispatch mode
    neither record its operations as the layer's (a recompute replayed them: a shape error in torchrun ranks) nor
    run the layer again under the lock the check holds (a hang). A fresh process, so the library is untried there;
    the build is the one this session made."""
    done = subprocess.run(
        [sys.executable, "-c", CHECKPOINTED_FIRST_USE, checkpointing], capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["ok", "True"]


@needs_float32
def test_chunk_attention_refuses_what_it_cannot_read():
    q, k, v = f32(2, 4, 8, 16, seed=0), f32(2, 2, 8, 16, seed=1), f32(2, 2, 8, 16, seed=2)
    attend = torch.ops.nanoseek.chunk_attention.default
    attend(q, k, v, None, 0.25)  # the shapes it takes
    with pytest.raises(ValueError, match="H a multiple of Hkv"):
        attend(q, k[:, :1].expand(2, 3, 8, 16), v[:, :1].expand(2, 3, 8, 16), None, 0.25)
    with pytest.raises(ValueError, match="multiples of 16"):
        attend(q[..., :8], k[..., :8], v, None, 0.25)
    with pytest.raises(ValueError, match="float32 CPU tensors only"):
        attend(q.double(), k, v, None, 0.25)
    with pytest.raises(ValueError, match=r"doc_ids \[B, T\] int64"):
        attend(q, k, v, torch.zeros(2, 7, dtype=torch.long), 0.25)
    out, lse = attend(q, k, v, None, 0.25)
    with pytest.raises(ValueError, match=r"lse \[B, H, T\]"):
        torch.ops.nanoseek.chunk_attention_backward.default(out, q, k, v, None, out, lse[:, :2], 0.25)


@needs_float32
def test_float32_experts_refuses_what_it_cannot_read():
    w1, w3, w2 = f32(4, 16, 32, seed=0), f32(4, 16, 32, seed=1), f32(4, 32, 16, seed=2)
    x, ids, weights = f32(3, 32, seed=3), torch.tensor([[0, 1], [2, 3], [1, 1]]), f32(3, 2, seed=4)
    cpu_kernel.float32_experts(x, ids, weights, w1, w3, w2)  # the shapes it takes
    with pytest.raises(RuntimeError, match="out of range for 4 experts"):
        cpu_kernel.float32_experts(x, ids + 1, weights, w1, w3, w2)
    with pytest.raises(RuntimeError, match="multiples of 16"):
        cpu_kernel.float32_experts(x[:, :24], ids, weights, w1[..., :24], w3[..., :24], w2[:, :24])
    with pytest.raises(RuntimeError, match="float32 CPU tensors only"):
        cpu_kernel.float32_experts(x.double(), ids, weights, w1, w3, w2)
    with pytest.raises(RuntimeError, match=r"ids \[N, k\] \(int64\)"):
        cpu_kernel.float32_experts(x, ids.int(), weights, w1, w3, w2)
    with pytest.raises(RuntimeError, match="w2 \\[E, D, F\\]"):
        cpu_kernel.float32_experts(x, ids, weights, w1, w3, w2.transpose(1, 2))
