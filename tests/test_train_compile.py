"""The CPU training step's fast paths against their plain references.

* the compiled loss (`moe.compile_model`, what `train.compile = true` runs) vs the eager model: same loss and
  gradients on packed batches, for dense GQA, MoE and MLA, one graph and no recompilation (the MoE layer's
  padded experts read their capacity on the host: a symbol in the graph).
* bf16 autocast on CPU (`nanoseek.precision`) vs float32: one step's loss and gradients, and a whole
  short training run's losses.
* Muon's batched, shape-grouped step vs the per-matrix textbook update.

Stated tolerances. Compiled vs eager (float32): loss to 1e-5 relative, gradients to 1e-4 relative /
1e-6 absolute (inductor fuses and reorders float32 sums). bf16 autocast vs float64, one step: loss to 1e-3
relative (measured ~5e-5), the whole gradient to cosine similarity > 0.999 and each parameter's to > 0.95
(bf16 keeps 8 mantissa bits; the MoE router's and experts' gradients, sums of many products that cancel,
measured 0.96-0.98, every other tensor > 0.9999). A 12-step training run: each step's loss within 0.5%
of float32's (measured: 2e-4).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch._dynamo

from nanoseek import precision
from nanoseek.config import RunConfig, TrainConfig
from nanoseek.model import Transformer, get_preset
from nanoseek.model.moe import compile_model, moe_layers
from nanoseek.train.optim import Muon, newton_schulz
from nanoseek.train.stages import pretrain

pytestmark = pytest.mark.usefixtures("one_thread")

# Two layers keep each compilation short; tiny-moe's first layer is dense, its second MoE.
SHAPES = {
    "gqa": get_preset("tiny", n_layers=2),
    "moe": get_preset("tiny-moe", n_layers=2),
    "mla": get_preset("tiny", n_layers=2, attn_type="mla", kv_lora_rank=32, qk_nope_head_dim=16, v_head_dim=16),
}


def packed_batch(vocab: int, seed: int, batch: int = 2, seq: int = 32) -> dict[str, torch.Tensor]:
    """A batch as the packer makes it: documents of random lengths, positions restarting at each."""
    g = torch.Generator().manual_seed(seed)
    doc_ids = (torch.rand(batch, seq, generator=g) < 0.15).long().cumsum(1)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    index = torch.arange(seq).expand(batch, seq)
    positions = index - torch.cummax(torch.where(starts, index, 0), dim=1).values
    targets = torch.randint(0, vocab, (batch, seq), generator=g)
    targets[~torch.roll(~starts, -1, dims=1)] = -100  # no target across a document boundary
    return dict(
        input_ids=torch.randint(0, vocab, (batch, seq), generator=g),
        targets=targets,
        positions=positions,
        doc_ids=doc_ids,
    )


def loss_and_grads(model: Transformer, loss_fn, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list]:
    model.zero_grad(set_to_none=True)
    ce, aux = loss_fn(batch["input_ids"], batch["targets"], batch["positions"], batch["doc_ids"], reduction="sum")
    loss = ce / (batch["targets"] != -100).sum() + aux
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("shape", list(SHAPES))
def test_compiled_step_matches_eager_without_recompiling(shape):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    cfg = SHAPES[shape]
    torch.manual_seed(0)
    model = Transformer(cfg).train()
    compiled = compile_model(model.loss)
    # The MoE layer's capacity (its experts' largest count) differs between batches and is a symbol in the graph.
    capacities = set()
    for seed in range(3):
        batch = packed_batch(cfg.vocab_size, seed)
        with torch._dynamo.config.patch(error_on_recompile=seed >= 1):
            loss_c, grads_c = loss_and_grads(model, compiled, batch)
        capacities.add(tuple(int(m.router.last_load.max()) for m in moe_layers(model)))
        loss_e, grads_e = loss_and_grads(model, model.loss, batch)
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=0)
        for (name, _), g_c, g_e in zip(model.named_parameters(), grads_c, grads_e):
            torch.testing.assert_close(g_c, g_e, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{shape} {n}: {m}")
    assert not counters["graph_break"], dict(counters["graph_break"])  # one graph, not split at the MoE layers
    assert not cfg.is_moe or len(capacities) > 1  # the batches did need different capacities


def test_compiled_step_attends_through_the_kernel(monkeypatch):
    """A compiled CPU training step on packed rows calls nanoseek's training attention and its backward once a layer
    (seen by the profiler from the graph's wrapper), with the eager step's loss and gradients through the blocked
    matmuls (the kernel off)."""
    from torch.profiler import ProfilerActivity, profile

    from nanoseek.model import chunk_attention, cpu_kernel

    if not cpu_kernel.float32_available():
        pytest.skip("nanoseek's float32 CPU kernel does not apply here")
    torch._dynamo.reset()
    cfg = SHAPES["gqa"]
    torch.manual_seed(0)
    model = Transformer(cfg).train()
    compiled = compile_model(model.loss)
    batch = packed_batch(cfg.vocab_size, 0)
    loss_and_grads(model, compiled, batch)  # compiles
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        loss_c, grads_c = loss_and_grads(model, compiled, batch)
    names = [event.name for event in prof.events()]
    assert names.count("nanoseek::chunk_attention") == cfg.n_layers
    assert names.count("nanoseek::chunk_attention_backward") == cfg.n_layers
    monkeypatch.setattr(chunk_attention, "KERNEL", False)
    loss_e, grads_e = loss_and_grads(model, model.loss, batch)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=0)
    for (name, _), g_c, g_e in zip(model.named_parameters(), grads_c, grads_e, strict=True):
        torch.testing.assert_close(g_c, g_e, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


@pytest.mark.parametrize("shape", ["moe", "mla"])
def test_bf16_autocast_step_is_close_to_float32(shape, monkeypatch):
    monkeypatch.setenv(precision.CPU_BF16_ENV, "1")
    assert precision.autocast_dtype(torch.device("cpu")) == torch.bfloat16
    cfg = SHAPES[shape]
    torch.manual_seed(0)
    model = Transformer(cfg).train()
    batch = packed_batch(cfg.vocab_size, 0, batch=4, seq=64)
    reference = Transformer(cfg).double().train()
    reference.load_state_dict(model.state_dict())
    loss_64, grads_64 = loss_and_grads(reference, reference.loss, {k: v for k, v in batch.items()})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_16, grads_16 = loss_and_grads(model, model.loss, batch)
    assert abs(float(loss_16) / float(loss_64) - 1) < 1e-3
    assert cosine(torch.cat([g.flatten() for g in grads_16]), torch.cat([g.flatten() for g in grads_64])) > 0.999
    for (name, _), g_16, g_64 in zip(model.named_parameters(), grads_16, grads_64):
        assert cosine(g_16, g_64) > 0.95, name


def short_run() -> RunConfig:
    cfg = RunConfig(preset="tiny")
    cfg.model.update(n_layers=2)
    cfg.data.builtin_examples = 400
    cfg.data.vocab_size = 300
    cfg.train = TrainConfig(
        steps=12, batch_size=4, seq_len=64, warmup_steps=2, eval_every=0, checkpoint_every=100, log_every=1
    )
    return cfg


def test_trainer_losses_in_bf16_follow_float32(tmp_path, monkeypatch):
    """The whole trainer (Muon + AdamW, packed data, schedule) in bf16 vs float32 from the same start."""
    losses = {}
    for flag in ("0", "1"):
        monkeypatch.setenv(precision.CPU_BF16_ENV, flag)
        pretrain(short_run(), tmp_path / flag, quiet=True)
        records = [json.loads(line) for line in (tmp_path / flag / "metrics.jsonl").read_text().splitlines()]
        losses[flag] = [r["loss"] for r in records if "loss" in r]
    assert len(losses["0"]) == 12 and losses["0"][-1] < losses["0"][0] - 1  # it learns
    for step, (l32, l16) in enumerate(zip(losses["0"], losses["1"]), 1):
        assert abs(l16 / l32 - 1) < 0.005, (step, l32, l16)


def test_muon_grouped_step_equals_the_per_matrix_update(monkeypatch):
    monkeypatch.setenv(precision.CPU_BF16_ENV, "0")  # float32 Newton-Schulz, so the comparison is tight
    torch.manual_seed(0)
    shapes = [(16, 8), (16, 8), (8, 24), (3, 8, 8), (16, 8)]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    start = [p.detach().clone() for p in params]
    lr, momentum, wd = 0.02, 0.95, 0.1
    opt = Muon(params, lr=lr, momentum=momentum, weight_decay=wd)
    bufs = [torch.zeros_like(p) for p in params]
    expected = [p.clone() for p in start]
    for _ in range(3):
        grads = [torch.randn(s) for s in shapes]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for i, g in enumerate(grads):  # the textbook update, one matrix at a time
            bufs[i] = bufs[i] * momentum + g * (1 - momentum)
            update = newton_schulz(g * (1 - momentum) + bufs[i] * momentum)
            scale = max(1.0, shapes[i][-2] / shapes[i][-1]) ** 0.5
            expected[i] = expected[i] * (1 - lr * wd) - lr * scale * update
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-5, atol=1e-6)


def test_precision_switch(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv(precision.CPU_BF16_ENV, "0")
    assert precision.autocast_dtype(cpu) is None and "float32" in precision.describe(cpu)
    monkeypatch.setenv(precision.CPU_BF16_ENV, "1")
    assert precision.autocast_dtype(cpu) == torch.bfloat16 and "bf16" in precision.describe(cpu)
    monkeypatch.delenv(precision.CPU_BF16_ENV)
    native = precision.cpu_bf16_instructions() is not None
    assert (precision.autocast_dtype(cpu) == torch.bfloat16) == native
    monkeypatch.setenv(precision.CPU_BF16_ENV, "yes")
    with pytest.raises(ValueError, match="NANOSEEK_CPU_BF16='yes'"):
        precision.autocast_dtype(cpu)


def rollouts(lengths: list[tuple[int, int]], vocab: int, seed: int):
    """A batch of prompt/completion pairs of these lengths, random tokens (the update's input)."""
    from nanoseek.train.rollouts import Rollouts

    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(1, vocab, (n,), generator=g).tolist()
    completions = [ids(c) for _, c in lengths]
    n = len(lengths)
    return Rollouts(
        rows=[dict(id=str(i)) for i in range(n)],
        prompt_ids=[ids(p) for p, _ in lengths],
        completion_ids=completions,
        engine_logprobs=[[-1.0] * len(c) for c in completions],
        texts=[""] * n,
        truncated=[False] * n,
        policy_masks=[[1] * len(c) for c in completions],
        turn_advantage_spans=[[] for _ in range(n)],
        rewards=torch.zeros(n),
        per_function={},
        correct=[False] * n,
        groups_generated=1,
        zero_variance_fraction=0.0,
        sampled_reward=0.0,
        sampled_accuracy=0.0,
        sampled_tokens=sum(c for _, c in lengths),
        reward_warnings={},
    )


@pytest.mark.parametrize("shape", ["gqa", "moe"])
def test_compiled_rl_update_matches_eager_without_recompiling(shape):
    """`nanoseek rl` with train.compile: the update's gradient passes through `compiled_hidden_states` (on CPU its
    attention is `causal_matmul_attention`) give the eager update's weights, over micro-batches of other row
    counts and lengths without compiling again (MoE: with the experts' capacity a symbol too)."""
    from nanoseek.config import RLConfig
    from nanoseek.train.update import compiled_hidden_states, update

    torch._dynamo.reset()
    cfg = SHAPES[shape]
    torch.manual_seed(0)
    start = Transformer(cfg).train()
    rl = RLConfig(group_size=5, micro_batch_size=3, max_new_tokens=24, tis_cap=2.0)
    models = {mode: Transformer(cfg).train() for mode in ("eager", "compiled")}
    for model in models.values():
        model.load_state_dict(start.state_dict())
    forward = compiled_hidden_states(models["compiled"])
    batches = [  # micro-batches of 3 and 2 rows, and of other lengths in the second step
        rollouts([(5, 20), (7, 11), (6, 24), (4, 9), (5, 17)], cfg.vocab_size, 0),
        rollouts([(8, 13), (3, 22), (5, 5), (6, 19), (4, 12)], cfg.vocab_size, 1),
    ]
    advantages = torch.tensor([1.0, -0.5, 0.25, -1.0, 0.5])
    for step, batch in enumerate(batches):
        for mode, model in models.items():
            opt = torch.optim.SGD(model.parameters(), lr=20.0)  # policy-gradient steps are small: make them show
            with torch._dynamo.config.patch(error_on_recompile=step > 0):
                update(
                    model,
                    None,
                    [opt],
                    batch,
                    advantages,
                    rl,
                    1.0,
                    torch.device("cpu"),
                    hidden_states=forward if mode == "compiled" else None,
                )
    moved = 0.0
    for (name, p_e), p_c, p_0 in zip(
        models["eager"].named_parameters(), models["compiled"].parameters(), start.parameters()
    ):
        torch.testing.assert_close(p_c, p_e, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
        moved = max(moved, float((p_e - p_0).detach().abs().max()))
    assert moved > 1e-3  # the update moved the weights: the comparison is not of two untouched models
