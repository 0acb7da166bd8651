"""The training loop: exact resume, accumulation, schedules, optimizers, checkpoints (configs: test_config.py)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from nanoseek.config import RunConfig, TrainConfig
from nanoseek.errors import InputError
from nanoseek.model import Transformer, get_preset
from nanoseek.train import checkpoint as ckpt_mod
from nanoseek.train.loop import batch_loss
from nanoseek.train.optim import lr_factor, newton_schulz
from nanoseek.train.run import with_context
from nanoseek.train.stages import pretrain, sft


def small_run(optimizer: str = "adamw", **train) -> RunConfig:
    cfg = RunConfig(preset="tiny-moe")
    cfg.model.update(d_model=32, n_heads=2, n_kv_heads=1, d_ff=64, moe_d_ff=16, n_layers=2)
    cfg.data.builtin_examples = 300
    cfg.data.vocab_size = 300
    cfg.train = TrainConfig(
        steps=6,
        batch_size=4,
        seq_len=48,
        grad_accum=2,
        warmup_steps=2,
        eval_every=3,
        eval_batches=1,
        checkpoint_every=100,
        log_every=1,
        optimizer=optimizer,
        **train,
    )
    return cfg


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_is_bit_exact(tmp_path, optimizer):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    pretrain(small_run(optimizer), straight, quiet=True)
    pretrain(small_run(optimizer), resumed, quiet=True, stop_at=3)
    assert (resumed / "checkpoints" / "step_3").is_dir() and not (resumed / "checkpoints" / "step_6").exists()
    pretrain(small_run(optimizer), resumed, resume=True, quiet=True)

    a = load_file(str(straight / "checkpoints" / "step_6" / "model.safetensors"))
    b = load_file(str(resumed / "checkpoints" / "step_6" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # The router's balancing bias (a buffer, not a parameter) is part of the exact state too.
    assert any("e_score_correction_bias" in k and a[k].abs().sum() > 0 for k in a)
    losses = lambda d: [
        r["loss"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if "loss" in r
    ]
    assert losses(straight) == losses(resumed)
    assert len(losses(straight)) == 6


def test_sft_resume_is_bit_exact_and_keeps_its_data_position(tmp_path):
    """SFT goes through the same run scaffold from its own entry point, with its own data state."""
    base = small_run()
    base.train.steps = 2
    pretrain(base, tmp_path / "pt", quiet=True)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    sft(small_run(), straight, tmp_path / "pt", quiet=True)
    sft(small_run(), resumed, tmp_path / "pt", quiet=True, stop_at=4)
    state = json.loads((resumed / "checkpoints" / "step_4" / "trainer_state.json").read_text())
    assert set(state) == {"step", "rng", "data", "stage"} and (state["step"], state["stage"]) == (4, "sft")
    summary = sft(small_run(), resumed, tmp_path / "pt", resume=True, quiet=True)
    assert summary["steps"] == 6 and summary == json.loads((resumed / "summary.json").read_text())

    a = load_file(str(straight / "checkpoints" / "step_6" / "model.safetensors"))
    b = load_file(str(resumed / "checkpoints" / "step_6" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    records = lambda d: [
        {k: v for k, v in r.items() if k not in ("time", "tokens_per_s")}
        for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
    ]
    assert records(straight) == records(resumed)
    assert [r["step"] for r in records(straight) if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_accumulation_matches_one_big_batch():
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny")).double()
    ids = torch.randint(0, 512, (4, 16))
    targets = torch.randint(0, 512, (4, 16))
    targets[0, :10] = -100  # unequal numbers of target tokens per micro-batch
    batch = dict(input_ids=ids, targets=targets)

    ce, _ = batch_loss(model.loss, batch)
    (ce / (targets != -100).sum()).backward()
    big = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    n = int((targets != -100).sum())
    for half in (slice(0, 2), slice(2, 4)):
        ce, _ = batch_loss(model.loss, dict(input_ids=ids[half], targets=targets[half]))
        (ce / n).backward()
    for g, p in zip(big, model.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-12)


def test_lr_schedules_closed_form():
    cfg = TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1, schedule="cosine")
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == pytest.approx(1.0)
    mid = 10 + 45
    assert lr_factor(mid, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(100, cfg) == pytest.approx(0.1)
    wsd = TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.0, schedule="wsd", decay_fraction=0.2)
    assert lr_factor(50, wsd) == 1.0
    assert lr_factor(90, wsd) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="train.schedule"):
        lr_factor(50, TrainConfig(schedule="linear"))


def test_newton_schulz_orthogonalises():
    torch.manual_seed(0)
    for shape in [(32, 16), (16, 48), (3, 8, 8)]:
        g = torch.randn(*shape)
        s = torch.linalg.svdvals(newton_schulz(g))
        # The quintic iteration trades exactness for speed: singular values land near 1, not on it.
        assert s.min() > 0.5 and s.max() < 1.3, (shape, s.min(), s.max())


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    model = Transformer(get_preset("tiny"))
    ckpt_mod.save_checkpoint(tmp_path, 1, model, keep=5)

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod, "save_file", broken)
    with pytest.raises(OSError):
        ckpt_mod.save_checkpoint(tmp_path, 2, model, keep=5)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_1"]  # no half-written step_2, no temporary left behind
    assert ckpt_mod.find_resume_checkpoint(tmp_path).name == "step_1"


def test_old_checkpoints_pruned(tmp_path):
    model = Transformer(get_preset("tiny"))
    for step in (1, 2, 3, 10):
        ckpt_mod.save_checkpoint(tmp_path, step, model, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_10", "step_3"]


def test_compile_option_compiles_the_loss_the_loop_calls(tmp_path, monkeypatch):
    # `torch.compile(model).loss(...)` would run the eager model; the loop must call the compiled loss.
    compiled, calls = [], []

    def fake_compile(fn, **kwargs):
        compiled.append(fn)

        def wrapper(*args, **kw):
            calls.append(1)
            return fn(*args, **kw)

        return wrapper

    monkeypatch.setattr(torch, "compile", fake_compile)
    cfg = small_run()
    cfg.train.compile = True
    pretrain(cfg, tmp_path / "run", quiet=True)
    assert len(compiled) == 1 and getattr(compiled[0], "__name__", "") == "loss"
    assert len(calls) == cfg.train.steps * cfg.train.grad_accum


@pytest.mark.parametrize("lora", [False, True])
def test_a_checkpoints_longer_context_is_kept_by_what_it_saves(tmp_path, lora, capsys):
    """`sft --checkpoint C --set model.max_seq_len=N`: the saved model has context N, which eval accepts;
    the weights and every other setting are the checkpoint's, and the positions it knew encode as before."""
    from nanoseek.cli import main
    from nanoseek.loading import load_checkpoint
    from nanoseek.model.config import ModelConfig
    from nanoseek.model.lora import merge_lora

    base = small_run()
    base.train.steps = 2
    pretrain(base, tmp_path / "pt", quiet=True)
    start = ModelConfig.load(tmp_path / "pt" / "checkpoints" / "step_2" / "config.json")
    longer = 2 * start.max_seq_len
    cfg = small_run()
    cfg.train.steps, cfg.train.eval_every = 2, 0
    cfg.model["max_seq_len"] = longer
    cfg.model["n_layers"] = start.n_layers  # an architecture setting equal to the checkpoint's: accepted
    cfg.train.lora.enabled = lora
    sft(cfg, tmp_path / "sft", tmp_path / "pt", quiet=True)

    saved = tmp_path / "sft" / "checkpoints" / "step_2"
    model, _ = load_checkpoint(saved, device="cpu")
    assert model.cfg == dataclasses.replace(start, max_seq_len=longer)
    # The same weights under the checkpoint's own context give the same logits (RoPE has no weights).
    if lora:
        merge_lora(model)
    old = Transformer(start)
    old.load_state_dict(model.state_dict())
    ids = torch.randint(0, start.vocab_size, (2, 40))
    with torch.no_grad():  # one attention path for both (with gradients, CPU attention takes `blocked_attention`)
        torch.testing.assert_close(model(ids), old.eval()(ids), rtol=0, atol=0)

    run_eval = lambda ckpt, out: main(
        [
            *("eval", "--checkpoint", str(ckpt), "--env", "calculator_arithmetic", "--n-episodes", "1", "--quiet"),
            *("--max-seq-len", str(longer), "--temperature", "0", "--max-new-tokens", "4", "--device", "cpu"),
            *("--no-plots", "--out", str(tmp_path / out)),
        ]
    )
    assert run_eval(saved, "eval") == 0
    assert run_eval(tmp_path / "pt", "eval_pt") == 2  # the checkpoint it started from: context too short
    if not lora:  # another architecture on the command line: one line naming the field, exit 2, nothing written
        capsys.readouterr()
        args = ["sft", "--checkpoint", str(tmp_path / "pt"), "--out", str(tmp_path / "bad")]
        assert main([*args, "--set", "model.n_layers=3", "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert "model.n_layers = 3:" in err and "\n" not in err and "Traceback" not in err
        assert not (tmp_path / "bad" / "checkpoints").exists()


def test_a_checkpoints_architecture_is_not_overridden_but_its_balancing_knobs_are():
    """model.* settings on a checkpoint: another n_layers is an error naming the field; the balancing knobs reach
    every module that reads them (a bias step moves by the new rate, closed form); equal values change nothing."""
    from nanoseek.train.run import apply_model_settings

    start = get_preset("tiny-moe")
    model = Transformer(start)
    with pytest.raises(InputError, match=r"model\.n_layers = 3: ckpt has n_layers = "):
        apply_model_settings(model, {"n_layers": 3}, "ckpt")
    assert model.cfg is start
    same = {"n_layers": start.n_layers, "bias_update_rate": start.bias_update_rate}
    assert not apply_model_settings(model, same, "ckpt")
    assert apply_model_settings(model, {"bias_update_rate": 0.25, "aux_loss_coef": 0.5}, "ckpt")
    assert model.cfg == dataclasses.replace(start, bias_update_rate=0.25, aux_loss_coef=0.5)
    assert all(m.cfg is model.cfg for m in model.modules() if hasattr(m, "cfg"))
    router = next(m for m in model.modules() if type(m).__name__ == "Router")
    router.tokens_per_expert.copy_(torch.arange(start.n_routed_experts, dtype=torch.float32))
    want = 0.25 * torch.sign(router.tokens_per_expert.mean() - router.tokens_per_expert)
    router.update_bias()
    torch.testing.assert_close(router.e_score_correction_bias, want, rtol=0, atol=0)


@pytest.mark.parametrize(
    "scaling",
    [
        {"rope_type": "yarn", "factor": 4.0},
        {"rope_type": "dynamic", "factor": 2.0},
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0},
    ],
)
def test_longer_context_keeps_a_scaled_rope(scaling):
    """A rope_scaling that reads its original length from max_seq_len still reads the old one."""
    start = get_preset("tiny", max_seq_len=64, rope_scaling=scaling)
    model = Transformer(start)
    with_context(model, 256)
    assert model.cfg.max_seq_len == 256
    positions = torch.arange(200)[None]
    # Reference: the model built from its checkpoint's config, where 64 is the original length.
    for built in (model, Transformer(model.cfg)):
        for got, want in zip(built._rope(positions, torch.float64), Transformer(start)._rope(positions, torch.float64)):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    # The float32 cos/sin table grew with the context at once (not on first use, perhaps inside a compiled
    # graph), to the values a model built with that context looks up.
    assert model._rope_tables[torch.device("cpu")][0].shape[0] == 256
    for got, want in zip(model._rope(positions, torch.float32), Transformer(model.cfg)._rope(positions, torch.float32)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
