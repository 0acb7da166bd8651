"""The transformer and the DeepSeekMoE layer against independent references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from nanoseek.model import (
    ATTENTIONS,
    ModelConfig,
    Transformer,
    cpu_kernel,
    get_preset,
    load_model,
    router_stats,
    save_model,
)
from nanoseek.model import moe as moe_mod
from nanoseek.model.moe import MoE, _padded_grouped_mm, install_balancing_hook


def moe_config(**kw) -> ModelConfig:
    base = dict(
        vocab_size=64,
        d_model=16,
        n_layers=2,
        n_heads=2,
        n_kv_heads=1,
        d_ff=32,
        n_routed_experts=8,
        n_shared_experts=1,
        moe_d_ff=12,
        top_k=3,
    )
    return ModelConfig(**{**base, **kw})


def naive_moe(m: MoE, x: torch.Tensor) -> torch.Tensor:
    """Per-token loop: score, pick, run each chosen expert on its own, combine. Written from the paper."""
    cfg = m.cfg
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        logits = m.router.weight @ x[t]
        s = torch.sigmoid(logits) if cfg.score_func == "sigmoid" else torch.softmax(logits, -1)
        choice = s + m.router.e_score_correction_bias
        allowed = torch.ones(cfg.n_routed_experts, dtype=torch.bool)
        if cfg.n_groups > 1:
            size = cfg.n_routed_experts // cfg.n_groups
            gs = []
            for g in range(cfg.n_groups):
                vals = sorted(choice[g * size : (g + 1) * size].tolist(), reverse=True)
                gs.append(vals[0] + vals[1] if cfg.score_func == "sigmoid" else vals[0])
            top_groups = sorted(range(cfg.n_groups), key=lambda g: -gs[g])[: cfg.topk_groups]
            allowed[:] = False
            for g in top_groups:
                allowed[g * size : (g + 1) * size] = True
        ranked = sorted((i for i in range(cfg.n_routed_experts) if allowed[i]), key=lambda i: -choice[i].item())
        chosen = ranked[: cfg.top_k]
        gates = torch.stack([s[i] for i in chosen])
        if cfg.norm_topk_prob:
            gates = gates / gates.sum()
        gates = gates * cfg.routed_scaling_factor
        for g, e in zip(gates, chosen):
            h = F.silu(m.w1[e] @ x[t]) * (m.w3[e] @ x[t])
            out[t] += g * (m.w2[e] @ h)
        if m.shared is not None:
            sh = m.shared.w2.weight @ (F.silu(m.shared.w1.weight @ x[t]) * (m.shared.w3.weight @ x[t]))
            if m.shared_gate is not None:
                sh = sh * torch.sigmoid(m.shared_gate.weight @ x[t])
            out[t] += sh
    return out


MOE_VARIANTS = [
    dict(score_func="softmax", norm_topk_prob=False),
    dict(score_func="softmax", norm_topk_prob=True, shared_expert_gate=True),
    dict(score_func="sigmoid", routed_scaling_factor=2.5, n_groups=4, topk_groups=2),
    dict(score_func="sigmoid", n_shared_experts=0),
]


def float64_moe(**kw) -> MoE:
    torch.manual_seed(0)
    m = MoE(moe_config(**kw)).double()
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.5)
    m.router.e_score_correction_bias.normal_(std=0.1)
    return m


@pytest.mark.parametrize("kw", MOE_VARIANTS)
@pytest.mark.parametrize("gathers", [False, True], ids=["scatter_add", "gathers"])
def test_moe_matches_naive_loop_float64(kw, gathers, monkeypatch):
    # gathers: the routing CUDA trains with (moe.GATHER_ROUTING_DEVICES), here on CPU
    monkeypatch.setattr(moe_mod, "GATHER_ROUTING_DEVICES", {"cpu", "cuda"} if gathers else set())
    m = float64_moe(**kw)
    x = torch.randn(2, 7, 16, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)

    out = m(x)
    params = [p for p in m.parameters()]
    grads = torch.autograd.grad(out.pow(2).sum(), [x, *params], allow_unused=True)
    ref = naive_moe(m, x_ref.view(-1, 16)).view(2, 7, 16)
    ref_grads = torch.autograd.grad(ref.pow(2).sum(), [x_ref, *params], allow_unused=True)

    assert (out - ref).abs().max().item() < 1e-10
    for g, r in zip(grads, ref_grads):
        if r is None:
            assert g is None or g.abs().max() == 0
        else:
            assert (g - r).abs().max().item() < 1e-10


@pytest.mark.parametrize("kw", MOE_VARIANTS)
def test_compiled_cpu_decode_runs_each_copy_by_its_own_expert(kw, monkeypatch):
    """A compiled CPU step without gradients of at most ROWS_AS_ONE_LOOP token copies multiplies each copy by its
    own expert's weights, unsorted (`MoE._each_copy_by_its_expert`): equal to the per-token loop; more copies, or
    gradients on, sort (the path the test above checks)."""
    m = float64_moe(**kw)
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    ran = []
    real = MoE._each_copy_by_its_expert
    monkeypatch.setattr(MoE, "_each_copy_by_its_expert", lambda self, *a: ran.append(1) or real(self, *a))
    with torch.no_grad():
        torch._dynamo.reset()
        out = torch.compile(m, backend="eager", fullgraph=True)(x)
        assert len(ran) == 1
        m(x)
        assert len(ran) == 1  # eagerly: sorted
        ref = naive_moe(m, x.view(-1, 16)).view(2, 7, 16)
        assert (out - ref).abs().max().item() < 1e-10
        ran.clear()
        monkeypatch.setattr(moe_mod, "ROWS_AS_ONE_LOOP", 14 * m.cfg.top_k - 1)
        torch._dynamo.reset()
        torch.compile(m, backend="eager", fullgraph=True)(x)
    torch._dynamo.reset()
    torch.compile(m, backend="eager")(x)  # gradients on: training sorts
    assert not ran


def test_padded_grouped_mm_equals_loop():
    torch.manual_seed(0)
    counts = torch.tensor([3, 0, 5, 1])
    x = torch.randn(int(counts.sum()), 6, dtype=torch.float64)
    w = torch.randn(4, 5, 6, dtype=torch.float64)
    out = _padded_grouped_mm(x, w, counts)
    start = 0
    for e, c in enumerate(counts.tolist()):
        assert torch.allclose(out[start : start + c], x[start : start + c] @ w[e].T, atol=1e-12)
        start += c


def float64_reference_layer(cfg):
    """An MoE layer in float64 with weights large enough (std 0.2) that low-precision errors show."""
    layer = MoE(cfg).double()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return layer


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["bf16 weights", "float32 weights under bf16 autocast"])
def test_cuda_grouped_kernel_matches_float64_loop(mode, monkeypatch):
    # The trainer's case is the second: float32 weights, bf16 autocast, float32 rows from the RMSNorm.
    torch.manual_seed(0)
    cfg = moe_config(d_model=64, moe_d_ff=32, n_routed_experts=16, top_k=4)
    ref_layer = float64_reference_layer(cfg)
    x = torch.randn(300, 64, dtype=torch.float64)
    counts = torch.tensor([40, 0, 75, 5, 0, 60, 20, 100] + [0] * 8)  # ragged, empty experts included
    ref = ref_layer.experts(x, counts)

    layer = MoE(cfg).cuda()
    layer.load_state_dict(ref_layer.state_dict())
    seen = []
    real_kernel = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: seen.append(1) or real_kernel(*a, **k))
    if mode == "bf16 weights":
        out = layer.to(torch.bfloat16).experts(x.cuda().bfloat16(), counts.cuda())
    else:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = layer.experts(x.cuda().float(), counts.cuda())
    assert len(seen) == 3  # gate, up and down each ran as one grouped GEMM
    rel = (out.double().cpu() - ref).norm() / ref.norm()
    assert rel < 2e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_training_routing_matches_naive_loop_float64():
    # On CUDA a training forward routes token copies by gathers both ways (moe.GATHER_ROUTING_DEVICES); float64
    # on the GPU against the naive loop on the CPU, forward and every gradient.
    torch.manual_seed(0)
    m = MoE(moe_config(score_func="sigmoid", routed_scaling_factor=2.5, n_groups=4, topk_groups=2)).double()
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    x_ref = x.clone().requires_grad_(True)
    ref = naive_moe(m, x_ref.view(-1, 16)).view(2, 7, 16)
    ref_grads = torch.autograd.grad(ref.pow(2).sum(), [x_ref, *m.parameters()], allow_unused=True)

    m.cuda()
    x_gpu = x.cuda().requires_grad_(True)
    out = m(x_gpu)
    grads = torch.autograd.grad(out.pow(2).sum(), [x_gpu, *m.parameters()], allow_unused=True)
    assert (out.cpu() - ref).abs().max().item() < 1e-10
    for g, r in zip(grads, ref_grads):
        if r is None:
            assert g is None or g.abs().max() == 0
        else:
            assert (g.cpu() - r).abs().max().item() < 1e-10


@pytest.mark.parametrize("rows_per_expert, kernel_dtype", [(4, torch.float32), (2048, torch.bfloat16)])
def test_cpu_experts_under_bf16_autocast_multiply_in_bf16_only_with_enough_work(rows_per_expert, kernel_dtype):
    # With few rows per expert a bf16 grouped GEMM on CPU is slower than float32 (per-call conversions), so the
    # experts keep the float32 rows; with many they take autocast's bf16. Either way within bf16 of float64.
    torch.manual_seed(0)
    cfg = moe_config(d_model=64, moe_d_ff=32, n_routed_experts=4, top_k=2)
    ref_layer = float64_reference_layer(cfg)
    counts = torch.full((4,), rows_per_expert)
    x = torch.randn(int(counts.sum()), 64, dtype=torch.float64)
    ref = ref_layer.experts(x, counts)
    layer = MoE(cfg)
    layer.load_state_dict(ref_layer.state_dict())
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):  # the grouped kernel: decoding only
        out = layer.experts(x.float(), counts)
    assert out.dtype == kernel_dtype
    rel = ((out.double() - ref).norm() / ref.norm()).item()
    assert rel < (1e-5 if kernel_dtype == torch.float32 else 2e-2)


def test_cpu_training_takes_the_padded_experts_and_matches_float64(monkeypatch):
    """Outside inference mode (the trainer, its no-grad passes too) CPU experts run the padded bmm (not
    torch._grouped_mm, slower to train on CPU); forward and gradients under bf16 autocast within bf16 of a
    float64 loop over experts."""
    torch.manual_seed(0)
    cfg = moe_config(d_model=64, moe_d_ff=32, n_routed_experts=8, top_k=2)
    ref_layer = float64_reference_layer(cfg)
    counts = torch.tensor([30, 0, 5, 60, 1, 0, 17, 40])  # ragged, empty experts included
    x64 = torch.randn(int(counts.sum()), 64, dtype=torch.float64, requires_grad=True)
    layer = MoE(cfg)
    layer.load_state_dict(ref_layer.state_dict())
    x = x64.detach().float().requires_grad_()
    seen = []
    real_kernel = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: seen.append(1) or real_kernel(*a, **k))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer.experts(x, counts)
    assert not seen and not layer.uses_grouped_kernel(x, torch.bfloat16)
    with torch.no_grad():
        assert not layer.uses_grouped_kernel(x, torch.bfloat16)  # the trainer's no-grad passes: the same path
    with torch.inference_mode():
        assert layer.uses_grouped_kernel(x, torch.bfloat16)  # decoding keeps the kernel
    # the float64 reference: each expert's rows through its own SwiGLU, one expert at a time
    starts = torch.cumsum(counts, 0) - counts
    ref = torch.cat(
        [
            (F.silu(x64[a : a + n] @ ref_layer.w1[e].T) * (x64[a : a + n] @ ref_layer.w3[e].T)) @ ref_layer.w2[e].T
            for e, (a, n) in enumerate(zip(starts.tolist(), counts.tolist()))
        ]
    )
    grad = torch.randn_like(ref)
    out.backward(grad.float())
    ref.backward(grad)
    pairs = [(out, ref), (x.grad, x64.grad)] + [
        (getattr(layer, n).grad, getattr(ref_layer, n).grad) for n in ("w1", "w3", "w2")
    ]
    for got, want in pairs:
        assert ((got.double() - want).norm() / want.norm()).item() < 2e-2


def test_selection_bias_changes_choice_not_gate_weights():
    torch.manual_seed(0)
    cfg = moe_config(score_func="sigmoid", norm_topk_prob=False)
    m = MoE(cfg).double()
    torch.nn.init.normal_(m.router.weight)
    x = torch.randn(32, 16, dtype=torch.float64)
    ids0, _w0, scores = m.router(x)
    # A large bias on expert 0 makes every token choose it ...
    m.router.e_score_correction_bias[0] = 100.0
    ids1, w1, _ = m.router(x)
    assert (ids1 == 0).any(-1).all() and not torch.equal(ids0, ids1)
    # ... but every gate weight is still the unbiased score of the chosen expert.
    assert torch.allclose(w1, scores.gather(1, ids1), atol=0)


@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
def test_router_scores_in_float32_under_bf16_autocast(score_func):
    """Under autocast the gate's matmul runs in bf16 (autocast decides), but the scores, the top-k and the gate
    weights are float32 functions of those logits, not bf16 ones (which would tie near-equal experts)."""
    torch.manual_seed(0)
    m = MoE(moe_config(score_func=score_func))
    torch.nn.init.normal_(m.router.weight)
    x = torch.randn(64, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ids, _w, scores = m.router(x)
    logits = F.linear(x.bfloat16(), m.router.weight.bfloat16()).float()  # what autocast's matmul gives
    want = logits.sigmoid() if score_func == "sigmoid" else logits.softmax(-1)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, want, rtol=0, atol=0)
    assert torch.equal(ids, (want + m.router.e_score_correction_bias).topk(m.cfg.top_k, dim=-1).indices)


def test_balancing_drives_max_violation_down():
    torch.manual_seed(0)
    cfg = moe_config(n_routed_experts=8, top_k=2, score_func="sigmoid", bias_update_rate=0.01)
    moe = MoE(cfg)
    u = torch.randn(16)
    u = u / u.norm()
    with torch.no_grad():  # skew: every token shares direction u, and experts 0 and 1 point along it
        moe.router.weight.normal_(std=0.1)
        moe.router.weight[:2] += 2 * u
    x = torch.randn(256, 16) + 2 * u
    opt = torch.optim.SGD(moe.parameters(), lr=0.0)  # lr 0: only the bias hook changes routing
    install_balancing_hook(opt, moe)
    moe.train()
    moe(x)
    start = router_stats(moe)["max_violation"][0]
    recent = []
    for _ in range(300):
        moe(x)
        recent = [*recent[-19:], moe.router.last_load.clone()]
        opt.step()
    # Sign updates on a fixed batch oscillate step to step; balance is judged on the mean load.
    load = torch.stack(recent).mean(0)
    end = (load.max() / load.mean() - 1).item()
    # Without balancing, experts 0 and 1 take almost every token: violation near 8/2 - 1 = 3.
    assert start > 2.0 and end < 0.1 * start, (start, end)
    assert moe.router.e_score_correction_bias[:2].max() < moe.router.e_score_correction_bias[2:].min()


def test_aux_loss_is_positive_and_differentiable():
    torch.manual_seed(0)
    model = Transformer(moe_config(aux_loss_coef=0.01, score_func="sigmoid"))
    x = torch.randint(0, 64, (2, 9))
    _ce, aux = model.loss(x, x)
    assert aux.item() > 0
    aux.backward()
    assert model.layers[1].mlp.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_causality(preset):
    torch.manual_seed(0)
    model = Transformer(get_preset(preset)).eval()
    x = torch.randint(0, 512, (2, 20))
    y = x.clone()
    y[:, 12:] = torch.randint(0, 512, (2, 8))
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.allclose(a[:, :12], b[:, :12], atol=1e-5)
    assert not torch.allclose(a[:, 12:], b[:, 12:], atol=1e-3)


@pytest.mark.parametrize("attn_type", ["gqa", "mla"])
def test_packed_attention_equals_documents_one_by_one(attn_type):
    torch.manual_seed(0)
    cfg = get_preset("tiny-moe", attn_type=attn_type)
    model = Transformer(cfg).eval()
    lengths = [5, 9, 3]
    docs = [torch.randint(0, 512, (n,)) for n in lengths]
    ids = torch.cat(docs)[None]
    doc_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        packed = model(ids, positions, doc_ids)[0]
        separate = torch.cat([model(d[None])[0] for d in docs])
    assert (packed - separate).abs().max().item() < 1e-5


def _packed_doc_ids(lengths_per_row: list[list[int]]) -> torch.Tensor:
    return torch.stack([torch.cat([torch.full((n,), i) for i, n in enumerate(row)]) for row in lengths_per_row])


def _attention_doc_by_doc(q, k, v, scale, doc_ids):
    """The reference: each document of each row attended alone (a plain causal softmax in float64)."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    out = torch.zeros(*q.shape[:3], v.shape[-1], dtype=torch.float64)
    for b in range(q.shape[0]):
        for doc in doc_ids[b].unique():
            t = torch.nonzero(doc_ids[b] == doc).flatten()
            qs, ks, vs = (x[b][:, t].double() for x in (q, k, v))
            scores = (qs @ ks.transpose(-1, -2)) * scale
            scores = scores.masked_fill(~torch.ones(len(t), len(t), dtype=torch.bool).tril(), float("-inf"))
            out[b][:, t] = scores.softmax(-1) @ vs
    return out


@pytest.mark.parametrize("kernel", [False, True], ids=["blocked", "kernel"])
@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_blocked_cpu_attention_equals_each_document_alone(dtype, packed, kernel, monkeypatch):
    """A CPU training chunk's attention (packed documents or one causal document a row, GQA), forward and
    gradients, against each document alone in float64: through `blocked_attention` (kernel off), or through
    `cpu_kernel.chunk_attention` where it is built (float32 and bf16; float64 keeps the blocked path)."""
    from nanoseek.model import chunk_attention as A
    from nanoseek.model.chunk_attention import BLOCK, attention, cpu_block_starts

    if kernel and not cpu_kernel.float32_available():
        pytest.skip("nanoseek's float32 CPU kernel does not apply here")
    monkeypatch.setattr(A, "KERNEL", kernel)
    calls = []
    real = cpu_kernel.chunk_attention
    monkeypatch.setattr(cpu_kernel, "chunk_attention", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    # 3 rows of 200 tokens (not a multiple of the block), documents of 7-90 tokens (or one causal document
    # per row); GQA (4 query heads, 2 kv)
    rows = [[90, 40, 70], [7, 60, 13, 80, 40], [50, 50, 50, 50]] if packed else [[200]] * 3
    doc_ids = _packed_doc_ids(rows)
    q = torch.randn(3, 4, 200, 16, dtype=torch.float64, requires_grad=True)
    k = torch.randn(3, 2, 200, 16, dtype=torch.float64, requires_grad=True)
    v = torch.randn(3, 2, 200, 16, dtype=torch.float64, requires_grad=True)
    assert cpu_block_starts(q, doc_ids if packed else None, BLOCK) is not None  # the blocked path is under test
    ref = _attention_doc_by_doc(q, k, v, 0.25, doc_ids)
    grad_out = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)
    qd, kd, vd = (x.detach().to(dtype).requires_grad_() for x in (q, k, v))
    out = attention(qd, kd, vd, 0.25, doc_ids if packed else None)
    grads = torch.autograd.grad(out, (qd, kd, vd), grad_out.to(dtype))
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 5e-2}[dtype]
    assert out.dtype == dtype and len(calls) == (kernel and dtype != torch.float64)
    assert (out.double() - ref).abs().max().item() < tol
    for g, r in zip(grads, ref_grads):
        assert (g.double() - r).abs().max().item() < tol * 10


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_causal_matmul_attention_equals_the_causal_reference(dtype, kv_heads, packed):
    """The compiled CPU training path's attention without our kernel (one block of the whole chunk, packed
    documents masked apart) against the naive reference, forward and gradients, with 1, 2 and 4 query heads a kv
    head (values narrower than keys); and `fits_one_block` keeps long or large chunks on SDPA."""
    from nanoseek.model.chunk_attention import causal_matmul_attention, fits_one_block

    torch.manual_seed(0)
    q, k = (torch.randn(2, h, 90, 16, dtype=torch.float64, requires_grad=True) for h in (4, kv_heads))
    v = torch.randn(2, kv_heads, 90, 8, dtype=torch.float64, requires_grad=True)
    doc_ids = _packed_doc_ids([[30, 45, 15], [7, 83]] if packed else [[90], [90]])
    ref = _attention_doc_by_doc(q, k, v, 0.25, doc_ids)
    grad_out = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)
    qd, kd, vd = (x.detach().to(dtype).requires_grad_() for x in (q, k, v))
    out = causal_matmul_attention(qd, kd, vd, 0.25, doc_ids if packed else None)
    grads = torch.autograd.grad(out, (qd, kd, vd), grad_out.to(dtype))
    tol = {torch.float64: 1e-10, torch.bfloat16: 5e-2}[dtype]
    assert out.dtype == dtype and (out.double() - ref).abs().max().item() < tol
    for g, r in zip(grads, ref_grads):
        assert (g.double() - r).abs().max().item() < tol * 10
    assert fits_one_block(q) and not fits_one_block(torch.zeros(2, 4, 300, 16))  # longer than BLOCKED_MAX_CAUSAL_LEN
    assert not fits_one_block(torch.zeros(1, 1, 1, 1).expand(256, 16, 256, 16))  # 256 MiB of float32 scores


def test_small_training_products_run_in_float32_under_cpu_autocast():
    """`precision.too_little_for_bf16`: under bf16 autocast on a CPU, an eager product of fewer than
    CPU_BF16_MIN_MACS multiply-adds (a `linear`, the training attention) runs in float32, equal to the float32
    product, gradients too; a larger one, one in inference mode and one inside a compiled graph follow autocast."""
    from nanoseek import precision
    from nanoseek.model.chunk_attention import _masked_attention
    from nanoseek.model.linear import linear

    torch.manual_seed(0)
    x, w = torch.randn(128, 64, requires_grad=True), torch.randn(64, 64, requires_grad=True)  # 2^19 macs
    assert 128 * 64 * 64 < precision.CPU_BF16_MIN_MACS
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = linear(x, w)
        y_bf16_input = linear(x.to(torch.bfloat16), w)
    assert y.dtype == torch.float32 and torch.equal(y, F.linear(x, w))
    assert torch.equal(y_bf16_input, F.linear(x.to(torch.bfloat16).float(), w))
    (gx, gw), (rx, rw) = torch.autograd.grad(y.sum(), (x, w)), torch.autograd.grad(F.linear(x, w).sum(), (x, w))
    assert torch.equal(gx, rx) and torch.equal(gw, rw)
    big = torch.randn(2048, 64)  # 2048 x 64 x 64 = 2^23 multiply-adds: bf16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert linear(big, w).dtype == torch.bfloat16
        with torch.inference_mode():
            assert linear(x.detach(), w.detach()).dtype == torch.bfloat16
        assert torch.compile(linear, backend="eager", fullgraph=True)(x, w).dtype == torch.bfloat16
    # The attention: [2, 4, 64, 16] queries against 2 kv heads, 2^19 macs a product.
    q, k, v = torch.randn(2, 4, 64, 16), torch.randn(2, 2, 64, 16), torch.randn(2, 2, 64, 16)
    hidden = torch.ones(64, 64, dtype=torch.bool).triu(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _masked_attention(q.to(torch.bfloat16), k, v, 0.25, hidden)
    assert out.dtype == torch.float32
    assert torch.equal(out, _masked_attention(q.to(torch.bfloat16).float(), k, v, 0.25, hidden))


def test_cpu_block_starts_fall_back_to_sdpa_where_blocks_do_not_pay():
    from nanoseek.model import chunk_attention as A

    q = torch.zeros(1, 4, 240, 16, requires_grad=True)
    short = _packed_doc_ids([[60, 60, 60, 60]])
    assert A.cpu_block_starts(q, short, 64) == [0, 60, 120, 180]  # each block from its first token's document
    assert A.cpu_block_starts(q, _packed_doc_ids([[240]]), 64) == [0, 0, 0, 0]  # one document: the triangle
    assert A.cpu_block_starts(q[:, :, :100], _packed_doc_ids([[100]]), 64) is None  # ... 77% of the scores
    assert A.cpu_block_starts(q, short.flip(1), 64) is None  # not packed in order
    assert A.cpu_block_starts(q, None, 64) == [0, 0, 0, 0]  # causal, training: the triangle's blocks
    with torch.no_grad():
        assert A.cpu_block_starts(q, None, 64) is None  # causal, no gradients: SDPA
    assert A.cpu_block_starts(q.expand(300, 4, 240, 16), None, 64) is None  # 37 MiB of scores: SDPA
    long = torch.zeros(1, 4, 320, 16, requires_grad=True)
    assert A.cpu_block_starts(long, None, 64) is None  # causal, longer than BLOCKED_MAX_CAUSAL_LEN: SDPA
    assert A.cpu_block_starts(long, _packed_doc_ids([[80] * 4]), 64) == [0, 0, 80, 160, 240]  # packed: blocks


class ConcatCache:
    """The simplest KV cache: keep concatenating; attend with an explicit causal mask."""

    def __init__(self) -> None:
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}

    def attend(self, layer, q, k, v, scale):
        if layer in self.k:
            k, v = torch.cat([self.k[layer], k], 2), torch.cat([self.v[layer], v], 2)
        self.k[layer], self.v[layer] = k, v
        T, S = q.shape[2], k.shape[2]
        mask = torch.ones(T, S, dtype=torch.bool).tril(S - T)
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


@pytest.mark.parametrize("attn_type", ["gqa", "mla"])
def test_cached_incremental_forward_equals_full(attn_type):
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny-moe", attn_type=attn_type)).eval()
    x = torch.randint(0, 512, (2, 14))
    cache = ConcatCache()
    with torch.no_grad():
        full = model(x)
        pieces = []
        for start, end in [(0, 6), (6, 7), (7, 8), (8, 14)]:
            pos = torch.arange(start, end).expand(2, -1)
            pieces.append(model(x[:, start:end], pos, cache=cache))
    assert (torch.cat(pieces, 1) - full).abs().max().item() < 1e-5


@pytest.mark.parametrize("attn_type", list(ATTENTIONS))
def test_attention_variant_hands_the_cache_what_its_layout_declares(attn_type):
    """The engine sizes its cache from `cache_layout()` alone: every variant's keys and values must have
    those shapes (and, with values_in_keys, be the keys' first v_dim numbers), for every layer."""
    model = Transformer(get_preset("tiny", attn_type=attn_type)).eval()
    layout, cache = model.cache_layout(), ConcatCache()
    with torch.no_grad():
        model(torch.randint(0, 512, (2, 7)), torch.arange(7).expand(2, -1), cache=cache)
    assert sorted(cache.k) == sorted(cache.v) == list(range(model.cfg.n_layers))
    for layer in cache.k:
        k, v = cache.k[layer], cache.v[layer]
        assert k.shape == (2, layout.kv_heads, 7, layout.k_dim) and v.shape == (2, layout.kv_heads, 7, layout.v_dim)
        if layout.values_in_keys:
            assert torch.equal(v, k[..., : layout.v_dim])


def test_mla_absorbed_cache_equals_decompressed_attention_in_float64():
    # With a cache MLA attends in latent space (W_uk folded into q, W_uv after attention); without one
    # it decompresses per-head keys and values. The two are the same function: float64, 1e-10.
    torch.manual_seed(0)
    cfg = get_preset("tiny", attn_type="mla", q_lora_rank=24, kv_lora_rank=20, qk_rope_head_dim=8, v_head_dim=12)
    model = Transformer(cfg).double().eval()
    x = torch.randint(0, cfg.vocab_size, (3, 11))
    cache = ConcatCache()
    with torch.no_grad():
        full = model(x)
        pieces = [model(x[:, a:b], torch.arange(a, b).expand(3, -1), cache=cache) for a, b in [(0, 5), (5, 6), (6, 11)]]
    assert (torch.cat(pieces, 1) - full).abs().max().item() < 1e-10
    # What was cached: one kv head per layer holding [latent, rope key], the latent as the value.
    assert cache.k[0].shape == (3, 1, 11, cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    assert torch.equal(cache.v[0], cache.k[0][..., : cfg.kv_lora_rank])


def reference_mha(x, attn, n_heads, cos_sin_fn):
    """Plain multi-head attention with an explicit softmax, written independently of SDPA."""
    B, T, _ = x.shape
    hd = attn.head_dim
    q = attn.wq(x).view(B, T, n_heads, hd)
    k = attn.wk(x).view(B, T, n_heads, hd)
    v = attn.wv(x).view(B, T, n_heads, hd)
    cos, sin = cos_sin_fn(T)

    def rot(t):
        t1, t2 = t[..., : hd // 2], t[..., hd // 2 :]
        c, s = cos[None, :, None, : hd // 2], sin[None, :, None, : hd // 2]
        return torch.cat([t1 * c - t2 * s, t2 * c + t1 * s], -1)

    q, k = rot(q), rot(k)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(hd)
    scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    out = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v)
    return attn.wo(out.reshape(B, T, -1))


def test_gqa_with_all_kv_heads_equals_plain_mha():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=32, d_model=32, n_layers=1, n_heads=4, n_kv_heads=4, d_ff=64)
    model = Transformer(cfg).double()
    attn = model.layers[0].attn
    x = torch.randn(2, 10, 32, dtype=torch.float64)
    pos = torch.arange(10).expand(2, -1)
    cos, sin = model._rope(pos, torch.float64)
    ours = attn(x, cos, sin, None, None)

    def cos_sin(T):
        inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, 8, 2, dtype=torch.float64) / 8))
        ang = torch.arange(T, dtype=torch.float64)[:, None] * inv
        return ang.cos().repeat(1, 2), ang.sin().repeat(1, 2)

    ref = reference_mha(x, attn, 4, cos_sin)
    assert (ours - ref).abs().max().item() < 1e-12


def test_rope_lookup_table_gives_the_computed_cos_sin_and_grows_past_the_context():
    """float32 cos/sin come from a table of positions 0..max_seq_len-1 (`rope.rope_table`): the same numbers as
    computing them for each position in float64 (yarn: the attention scaling is in the table), at any
    positions, and a sequence longer than the context grows the table instead of reading past its end."""
    scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
    model = Transformer(get_preset("tiny", max_seq_len=64, rope_scaling=scaling))
    positions = torch.tensor([[0, 5, 63, 17], [7, 7, 1, 40]])
    cos, sin = model._rope(positions, torch.float32)
    inv_freq, attention_scaling = model._inv_freq, model.rope_attention_scaling
    assert attention_scaling != 1.0
    angles = positions.double()[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    torch.testing.assert_close(cos, (angles.cos() * attention_scaling).float(), rtol=0, atol=2e-6)
    torch.testing.assert_close(sin, (angles.sin() * attention_scaling).float(), rtol=0, atol=2e-6)
    cos16, _ = model._rope(positions, torch.bfloat16)
    assert cos16.dtype == torch.bfloat16 and torch.equal(cos16, cos.to(torch.bfloat16))

    long_cos, _ = model._rope(torch.arange(100)[None], torch.float32)
    assert model._rope_tables[torch.device("cpu")][0].shape[0] == 100
    at99 = torch.cat([99 * inv_freq, 99 * inv_freq])
    torch.testing.assert_close(long_cos[0, 99], (at99.cos() * attention_scaling).float(), rtol=0, atol=2e-6)


def closed_form_params(c: ModelConfig) -> int:
    hd = c.attn_head_dim
    if c.attn_type == "mla":
        qk = c.qk_nope_head_dim + c.qk_rope_head_dim
        q = (
            (c.d_model * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * c.n_heads * qk)
            if c.q_lora_rank
            else c.d_model * c.n_heads * qk
        )
        attn = (
            q
            + c.d_model * (c.kv_lora_rank + c.qk_rope_head_dim)
            + c.kv_lora_rank
            + c.kv_lora_rank * c.n_heads * (c.qk_nope_head_dim + c.v_head_dim)
            + c.n_heads * c.v_head_dim * c.d_model
        )
    else:
        attn = c.d_model * hd * (2 * c.n_heads + 2 * c.n_kv_heads)
        attn += (c.n_heads + 2 * c.n_kv_heads) * hd if c.qkv_bias else 0
        attn += 2 * hd if c.qk_norm else 0
    dense_mlp = 3 * c.d_model * c.d_ff
    moe = (
        c.n_routed_experts * (3 * c.d_model * c.moe_d_ff + c.d_model)
        + 3 * c.d_model * c.n_shared_experts * c.moe_d_ff
        + (c.d_model if c.shared_expert_gate else 0)
    )
    per_layer = [attn + 2 * c.d_model + (moe if c.layer_is_moe(i) else dense_mlp) for i in range(c.n_layers)]
    head = 0 if c.tie_embeddings else c.vocab_size * c.d_model
    return c.vocab_size * c.d_model + sum(per_layer) + c.d_model + head


@pytest.mark.parametrize(
    "cfg",
    [
        get_preset("tiny"),
        get_preset("tiny-moe"),
        get_preset("small"),
        get_preset("moe-1b"),
        get_preset("tiny", qkv_bias=True, qk_norm=True, tie_embeddings=False),
        get_preset("tiny-moe", attn_type="mla", q_lora_rank=32, shared_expert_gate=True),
        get_preset("tiny", attn_type="mla"),
    ],
    ids=["tiny", "tiny-moe", "small", "moe-1b", "bias-qknorm-untied", "mla-moe", "mla-dense"],
)
def test_parameter_count_closed_form(cfg):
    with torch.device("meta"):
        model = Transformer(cfg)
    assert model.num_params() == closed_form_params(cfg)
    if cfg.is_moe:
        n_moe = cfg.n_layers - cfg.first_k_dense
        inactive = n_moe * (cfg.n_routed_experts - cfg.top_k) * 3 * cfg.d_model * cfg.moe_d_ff
        assert model.num_active_params() == model.num_params() - inactive
    else:
        assert model.num_active_params() == model.num_params()


def test_accounting_closed_form():
    cfg = get_preset("tiny")
    model = Transformer(cfg)
    hd = cfg.attn_head_dim
    assert model.kv_bytes_per_token(2) == cfg.n_layers * 2 * cfg.n_kv_heads * hd * 2
    mla = get_preset("tiny", attn_type="mla")
    assert Transformer(mla).kv_bytes_per_token(2) == mla.n_layers * (mla.kv_lora_rank + mla.qk_rope_head_dim) * 2
    non_embed = model.num_params() - cfg.vocab_size * cfg.d_model
    expected = 6 * (non_embed + cfg.vocab_size * cfg.d_model) + 6 * cfg.n_layers * cfg.n_heads * 2 * hd * 128
    assert model.flops_per_token(128) == expected


@pytest.mark.parametrize(
    "field, value, needle",
    [
        ("n_kv_heads", 3, "n_kv_heads"),
        ("d_model", 0, "d_model"),
        ("top_k", 9, "top_k"),
        ("score_func", "relu", "score_func"),
        ("n_groups", 3, "n_groups"),
        ("attn_type", "flash", "attn_type"),
        ("rope_scaling", {"rope_type": "weird"}, "rope_scaling"),
        ("first_k_dense", 7, "first_k_dense"),
    ],
)
def test_bad_config_values_raise_clear_errors(field, value, needle):
    kw = dict(get_preset("tiny-moe").to_dict(), **{field: value})
    with pytest.raises(ValueError, match=needle):
        ModelConfig(**kw)


def test_unknown_field_and_preset_rejected(tmp_path):
    with pytest.raises(ValueError, match="bogus"):
        ModelConfig.from_dict({"bogus": 1})
    with pytest.raises(ValueError, match="known"):
        get_preset("huge")
    bad = tmp_path / "config.json"
    bad.write_text('{"d_model": 12,\n "n_heads": 5}')
    with pytest.raises(ValueError, match=str(bad)):
        ModelConfig.load(bad)


def test_save_load_roundtrip(tmp_path):
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny-moe"))
    model.layers[1].mlp.router.e_score_correction_bias.normal_()
    save_model(model, tmp_path)
    loaded = load_model(tmp_path)
    assert loaded.cfg == model.cfg
    x = torch.randint(0, 512, (1, 12))
    saved, back = model.state_dict(), loaded.state_dict()
    assert saved.keys() == back.keys() and all(torch.equal(saved[k], back[k]) for k in saved)
    with torch.no_grad():
        # Outputs to float32 rounding, not bit for bit: on CPU the experts' matmuls sum in an
        # order that depends on the weights' memory alignment, which a memory-mapped load does not keep.
        torch.testing.assert_close(model.eval()(x), loaded.eval()(x), rtol=0, atol=1e-6)
    assert not list(tmp_path.glob("*.tmp"))


def test_bf16_load_keeps_router_bias_float32(tmp_path):
    model = Transformer(get_preset("tiny-moe"))
    model.layers[1].mlp.router.e_score_correction_bias.fill_(1e-3 + 1e-6)
    save_model(model, tmp_path)
    loaded = load_model(tmp_path, dtype=torch.bfloat16)
    bias = loaded.layers[1].mlp.router.e_score_correction_bias
    assert loaded.embed.weight.dtype == torch.bfloat16 and bias.dtype == torch.float32
    assert torch.equal(bias, model.layers[1].mlp.router.e_score_correction_bias)


def test_module_to_bf16_keeps_router_buffers_float32():
    # `.to(bfloat16)` casts every floating buffer by default; the router's would lose the bias's small
    # balancing steps and make token counts above 256 inexact.
    model = Transformer(get_preset("tiny-moe"))
    router = model.layers[1].mlp.router
    router.e_score_correction_bias.fill_(0.1 + 3e-4)  # bf16 rounds this to 0.10009765625
    want = router.e_score_correction_bias.clone()
    model.to(torch.bfloat16)
    assert model.embed.weight.dtype == torch.bfloat16 and router.weight.dtype == torch.bfloat16
    for name in ("e_score_correction_bias", "tokens_per_expert", "last_load"):
        assert getattr(router, name).dtype == torch.float32, name
    assert torch.equal(router.e_score_correction_bias, want)
    router.train()
    router(torch.randn(300, model.cfg.d_model, dtype=torch.bfloat16))
    assert router.tokens_per_expert.sum().item() == 300 * model.cfg.top_k  # exact, not rounded
    model.float()
    assert torch.equal(router.e_score_correction_bias, want)


@pytest.mark.skipif(not cpu_kernel.float32_available(), reason="nanoseek's float32 CPU kernel does not apply here")
def test_float32_moe_runs_its_experts_through_the_kernel_where_it_applies(monkeypatch):
    """A float32 CPU pass without gradients (eager, compiled, under bf16 autocast) runs the routed experts as one
    `cpu_kernel.float32_experts` call, equal to the per-token float64 loop to float32 rounding; so does an eager
    pass with gradients (the next test checks those); widths not in multiples of 16, a float64 layer or
    FLOAT32_EXPERTS off: the other paths."""
    calls = []
    real = cpu_kernel.float32_experts
    monkeypatch.setattr(cpu_kernel, "float32_experts", lambda *a: calls.append(1) or real(*a))
    m = float64_moe(score_func="sigmoid", routed_scaling_factor=2.5, moe_d_ff=16).float()
    x = torch.randn(2, 9, 16)
    want = naive_moe(m.double(), x.view(-1, 16).double()).view(2, 9, 16)
    m.float()
    with torch.no_grad():
        torch.testing.assert_close(m(x).double(), want, rtol=1e-5, atol=1e-5)
        assert len(calls) == 1
        torch._dynamo.reset()
        torch.testing.assert_close(torch.compile(m, backend="eager", fullgraph=True)(x).double(), want, rtol=1e-5,
                                   atol=1e-5)  # fmt: skip
        assert len(calls) == 2
        with torch.autocast("cpu", dtype=torch.bfloat16):
            m(x)
        assert len(calls) == 3
        monkeypatch.setattr(moe_mod, "FLOAT32_EXPERTS", False)
        torch.testing.assert_close(m(x).double(), want, rtol=1e-5, atol=1e-5)
        assert len(calls) == 3
    torch._dynamo.reset()
    monkeypatch.setattr(moe_mod, "FLOAT32_EXPERTS", True)
    m(x).sum().backward()  # gradients, eager: the kernel's training operations
    assert len(calls) == 4
    with torch.no_grad():
        m.double()(x.double())
        float64_moe(moe_d_ff=12).float()(x)  # 12 wide: not the kernel's
    assert len(calls) == 4


@pytest.mark.skipif(not cpu_kernel.float32_available(), reason="nanoseek's float32 CPU kernel does not apply here")
@pytest.mark.parametrize("kw", MOE_VARIANTS)
def test_float32_moe_trains_through_the_kernel(kw, monkeypatch):
    """An eager float32 CPU pass with gradients runs the routed experts through the kernel's forward and backward:
    the output and every gradient (the rows', the router's through the gate weights, the experts') within float32
    rounding of autograd through the per-token float64 loop. Under bf16 autocast it does only below
    `_FLOAT32_TRAIN_MAX_MACS` per expert. A compiled pass with gradients calls the same two operations (the
    profiler sees them from the graph) and gives the eager pass's output and gradients."""
    calls = []
    real = cpu_kernel.float32_experts
    monkeypatch.setattr(cpu_kernel, "float32_experts", lambda *a: calls.append(1) or real(*a))
    m = float64_moe(moe_d_ff=16, **kw)
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    wide = x.clone().requires_grad_()
    params = list(m.parameters())
    ref = naive_moe(m, wide.view(-1, 16)).view(2, 9, 16)
    ref_grads = torch.autograd.grad(ref.pow(2).sum(), [wide, *params], allow_unused=True)
    m.float()
    narrow = x.float().requires_grad_()
    out = m(narrow)
    grads = torch.autograd.grad(out.pow(2).sum(), [narrow, *params], allow_unused=True)
    assert len(calls) == 1
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        if r is None:
            assert g is None or not g.any()
        else:
            torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-6 * r.abs().max().item())  # float32's
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m(narrow).float().sum().backward()
        assert len(calls) == 2  # 18 copies of 16 x 16: little work per expert
        monkeypatch.setattr(moe_mod, "_FLOAT32_TRAIN_MAX_MACS", 0)
        m(narrow).float().sum().backward()
        assert len(calls) == 2
    monkeypatch.undo()  # the compiled graph calls the operations, not the Python wrapper
    torch._dynamo.reset()
    compiled = torch.compile(m)
    compiled(narrow).sum().backward()  # compiles the forward and (at its first use) the backward
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out_c = compiled(narrow)
        grads_c = torch.autograd.grad(out_c.pow(2).sum(), [narrow, *params], allow_unused=True)
    names = [event.name for event in prof.events()]
    assert names.count("nanoseek::float32_experts_train") == 1
    assert names.count("nanoseek::float32_experts_backward") == 1
    torch.testing.assert_close(out_c, out, rtol=1e-6, atol=1e-6)
    for g_c, g in zip(grads_c, grads, strict=True):
        if g is None or g_c is None:
            assert (g is None or not g.any()) and (g_c is None or not g_c.any())
        else:
            torch.testing.assert_close(g_c, g, rtol=1e-5, atol=1e-6 * g.abs().max().item())
