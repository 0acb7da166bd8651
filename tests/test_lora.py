"""LoRA (nanoseek.model.lora, interop.peft): base outputs at zero B, the step against a float64 hand-built
reference, PEFT's own loader on our adapter files, merged export, adapter directories as --checkpoint,
exact resume of a LoRA RL run, and the bad inputs."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch.func import functional_call

from nanoseek.config import RunConfig, TrainConfig
from nanoseek.errors import InputError
from nanoseek.interop.peft import load_adapters, save_adapters
from nanoseek.loading import load_checkpoint
from nanoseek.model import Transformer, get_preset, save_model
from nanoseek.model import moe as moe_mod
from nanoseek.model.lora import adapter_key, apply_lora, lora_of, merge_lora
from nanoseek.train.loop import model_loss
from nanoseek.train.optim import build_optimizers

ALL = ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]
VOCAB = 320
SMALL = dict(vocab_size=VOCAB, d_model=32, n_heads=2, n_kv_heads=1, d_ff=48, n_layers=2, max_seq_len=64)


def small_model(preset: str = "tiny", seed: int = 0, **fields) -> Transformer:
    torch.manual_seed(seed)
    extra = dict(moe_d_ff=16) if "moe" in preset else {}
    return Transformer(get_preset(preset, **{**SMALL, **extra, **fields}))


@torch.no_grad()
def randomize_adapters(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64))


def ids(seed: int = 0, shape=(2, 12), vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_zero_b_gives_exactly_the_base_outputs_and_only_adapters_train(preset, monkeypatch):
    # Adapters run beside the routed experts through `MoE.experts`; the plain layer would take the float32 kernel
    # (a sum in another order), so both sides here take `experts`, and zero adapters must change nothing at all.
    monkeypatch.setattr(moe_mod, "FLOAT32_EXPERTS", False)
    model = small_model(preset).eval()
    x = ids()
    with torch.no_grad():
        base = model(x)
    adapters = apply_lora(model, rank=4, alpha=8, targets=ALL)
    with torch.no_grad():
        assert torch.equal(model(x), base)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 2 * len(adapters.names)
    if preset == "tiny-moe":  # routed experts: one adapter per expert, stacked
        moe = model.layers[1].mlp
        assert moe.w1_lora_a.shape == (moe.w1.shape[0], 4, moe.w1.shape[2])
    optimizers = build_optimizers(model, TrainConfig(optimizer="adamw"), torch.device("cpu"))
    in_optimizer = {id(p) for opt in optimizers for g in opt.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in model.parameters() if p.requires_grad}


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_a_lora_step_equals_the_step_of_the_adapter_parametrisation(preset):
    """One AdamW step through the training loss on a LoRA model, against the same step written out by hand:
    loss of the plain model whose weights are W + (alpha / r) B A, gradients in A and B, AdamW's formula."""
    model = small_model(preset, seed=1).double()
    base = copy.deepcopy(model)
    adapters = apply_lora(model, rank=3, alpha=6, targets=ALL, dtype=torch.float64)
    randomize_adapters(model, 0)
    x, y = ids(1), ids(2)
    y[0, :4] = -100
    leaves = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters() if p.requires_grad}

    cfg = TrainConfig(optimizer="adamw", lr=1e-2, weight_decay=0.1, beta1=0.9, beta2=0.95)
    (opt,) = build_optimizers(model, cfg, torch.device("cpu"))
    ce, _ = model_loss(model)(x, y, reduction="sum")
    ce.backward()
    opt.step()

    merged = {
        name: base.get_parameter(name)
        + adapters.scale * (leaves[adapter_key(name, "b")] @ leaves[adapter_key(name, "a")])
        for name in adapters.names
    }
    logits = functional_call(base, merged, (x,))
    ref = torch.nn.functional.cross_entropy(logits.view(-1, VOCAB), y.view(-1), ignore_index=-100, reduction="sum")
    torch.testing.assert_close(ce, ref, atol=1e-9, rtol=0)
    grads = torch.autograd.grad(ref, list(leaves.values()))
    for (name, p0), g in zip(leaves.items(), grads):
        decay = cfg.weight_decay if p0.dim() >= 2 else 0.0
        m, v = (1 - cfg.beta1) * g, (1 - cfg.beta2) * g * g
        step = cfg.lr * (m / (1 - cfg.beta1)) / ((v / (1 - cfg.beta2)).sqrt() + 1e-8)
        want = p0.detach() * (1 - cfg.lr * decay) - step
        torch.testing.assert_close(model.get_parameter(name).detach(), want, atol=1e-9, rtol=0)
    # the base did not move
    assert all(torch.equal(base.state_dict()[k], v) for k, v in model.state_dict().items() if "lora_" not in k)


def test_merge_equals_base_plus_adapters_and_computes_the_same():
    model = small_model("tiny-moe", seed=2).double()
    apply_lora(model, rank=2, alpha=4, targets=ALL, dtype=torch.float64)
    randomize_adapters(model, 1)
    x = ids(3)
    with torch.no_grad():
        want = model(x)
        w = model.layers[0].attn.wq
        wq = w.weight + 2.0 * w.lora_b @ w.lora_a
        merge_lora(model)
        got = model(x)
    assert lora_of(model) is None and not any("lora_" in k for k in model.state_dict())
    assert torch.equal(model.layers[0].attn.wq.weight, wq)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)


def test_adapter_directory_is_a_checkpoint_and_another_base_is_refused(tmp_path):
    from nanoseek.tasks.corpus import pretrain_texts
    from nanoseek.tokenizer import Tokenizer

    model = small_model("tiny-moe", seed=3)
    save_model(model, tmp_path / "base")
    Tokenizer.train(pretrain_texts(50, seed=0), 300).save(tmp_path / "base")
    apply_lora(model, rank=4, alpha=4, targets=["wq", "wo", "w1", "w2"], base=str(tmp_path / "base"))
    randomize_adapters(model, 2)
    save_adapters(model, tmp_path / "adapter")
    meta = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert meta["r"] == 4 and meta["peft_type"] == "LORA"
    loaded, tokenizer = load_checkpoint(tmp_path / "adapter", device="cpu", dtype=torch.float32)
    assert tokenizer is not None
    x = ids(4)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x), atol=1e-6, rtol=0)

    other = small_model("tiny-moe", seed=3, d_ff=64)  # another shape
    with pytest.raises(InputError, match="do not fit this base model"):
        load_adapters(other, tmp_path / "adapter")
    other = small_model("tiny-moe", seed=3, n_layers=3)  # other names
    with pytest.raises(InputError, match="do not fit this base model"):
        load_adapters(other, tmp_path / "adapter")


def test_bad_targets_and_rank():
    with pytest.raises(InputError, match=r"'w9'.*match no projection"):
        apply_lora(small_model(), rank=2, alpha=2, targets=["wq", "w9"])
    with pytest.raises(InputError, match=r"rank = 0"):
        apply_lora(small_model(), rank=0, alpha=2, targets=["wq"])


# ----------------------------------------------------------------------------- PEFT and transformers
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


@pytest.mark.parametrize(
    "preset,targets",
    [
        ("tiny", ALL),  # exports as Llama
        # DeepSeek-V3, rotary rows permuted. Attention only: peft 0.21 turns gate/up/down_proj targets on a
        # DeepSeek-V3 model into its fused-expert parameters, and then adapts no MLP Linear at all.
        ("tiny-mla", ["wq_a", "wq_b", "wkv_a", "wo"]),
    ],
)
def test_peft_loads_our_adapters_onto_the_exported_model(tmp_path, preset, targets):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from nanoseek.interop.hf import save_hf

    if preset == "tiny-mla":
        fields = dict(
            attn_type="mla",
            q_lora_rank=16,
            kv_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
            n_kv_heads=2,
        )
        model = small_model("tiny", seed=4, **fields)
    else:
        model = small_model("tiny", seed=4)
    save_hf(model, tmp_path / "hf")
    apply_lora(model, rank=4, alpha=8, targets=targets, base=str(tmp_path / "hf"))
    randomize_adapters(model, 3)
    save_adapters(model, tmp_path / "adapter")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32, attn_implementation="eager")
    hf = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    x = ids(5)
    with torch.no_grad():
        theirs = hf(input_ids=x).logits
        ours = model.eval()(x)
        plain = hf.get_base_model()  # not vacuous: the adapters do change the logits
    assert (theirs - ours).abs().max() < 1e-5
    with hf.disable_adapter(), torch.no_grad():
        assert (plain(input_ids=x).logits - ours).abs().max() > 1e-3


def test_convert_merge_lora_writes_base_plus_adapters(tmp_path, capsys):
    from nanoseek.interop.hf import load_hf_model
    from nanoseek.tasks.corpus import pretrain_texts
    from nanoseek.tokenizer import Tokenizer

    model = small_model("tiny", seed=5)
    save_model(model, tmp_path / "base")
    Tokenizer.train(pretrain_texts(50, seed=0), 300).save(tmp_path / "base")
    apply_lora(model, rank=4, alpha=8, targets=ALL, base=str(tmp_path / "base"))
    randomize_adapters(model, 4)
    save_adapters(model, tmp_path / "adapter")
    from nanoseek.cli import main

    assert (
        main(["convert", "--to-hf", str(tmp_path / "adapter"), "--merge-lora", "--out", str(tmp_path / "merged")]) == 0
    )
    merged = load_hf_model(tmp_path / "merged")
    w = model.layers[1].mlp.w3
    torch.testing.assert_close(merged.layers[1].mlp.w3.weight, w.weight + 2.0 * w.lora_b @ w.lora_a, atol=1e-6, rtol=0)
    x = ids(6)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), model.eval()(x), atol=1e-5, rtol=0)
    # without --merge-lora an adapter directory is refused, with one line
    assert main(["convert", "--to-hf", str(tmp_path / "adapter"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "--merge-lora" in err[0]


# ----------------------------------------------------------------------------- RL with LoRA, stopped and resumed
def test_rl_with_lora_resumed_equals_the_straight_run(tmp_path):
    from safetensors.torch import load_file
    from test_rl import rl_run, tiny_checkpoint

    from nanoseek.train.rl import rl

    def lora_run() -> RunConfig:
        cfg = rl_run()
        cfg.train.lora.enabled = True
        cfg.train.lora.rank = 4
        cfg.train.optimizer = "adamw"
        return cfg

    ckpt = tiny_checkpoint(tmp_path / "sft")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    rl(lora_run(), straight, ckpt, quiet=True)
    rl(lora_run(), resumed, ckpt, quiet=True, stop_at=2)
    assert (resumed / "checkpoints" / "step_2" / "adapter_model.safetensors").is_file()
    rl(lora_run(), resumed, ckpt, quiet=True, resume=True)
    a = load_file(str(straight / "checkpoints" / "step_4" / "adapter_model.safetensors"))
    b = load_file(str(resumed / "checkpoints" / "step_4" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith("lora_B.weight") and a[k].abs().sum() > 0 for k in a)  # the adapters did train
    records = [
        [
            {k: v for k, v in json.loads(line).items() if not k.startswith("time_") and not k.endswith("_per_s")}
            for line in (run / "metrics.jsonl").read_text().splitlines()
        ]
        for run in (straight, resumed)
    ]
    assert records[0] == records[1]
    # the run directory is a checkpoint: its base with the trained adapters
    model, _ = load_checkpoint(straight, device="cpu", dtype=torch.float32)
    assert lora_of(model) is not None and Path(lora_of(model).base) == ckpt.resolve()


def test_cli_bad_lora_settings_are_one_line_exit_2(tmp_path):
    from test_cli_errors import TINY, assert_one_line_error, nanoseek

    done = nanoseek(
        "pretrain",
        *TINY,
        "--set",
        "train.lora.enabled=true",
        "--set",
        "train.lora.targets=wq,nope",
        "--out",
        "pt",
        "--quiet",
        cwd=tmp_path,
    )
    assert_one_line_error(done, "'nope'")
    done = nanoseek("pretrain", *TINY, "--set", "train.lora.rank=0", "--out", "pt", "--quiet", cwd=tmp_path)
    assert_one_line_error(done, "train.lora.rank")

    # an adapter directory whose base is another model (here: a wider MLP)
    from nanoseek.tasks.corpus import pretrain_texts
    from nanoseek.tokenizer import Tokenizer

    model = small_model()
    apply_lora(model, rank=2, alpha=2, targets=ALL, base=str(tmp_path / "other"))
    save_adapters(model, tmp_path / "adapter")
    save_model(small_model(d_ff=64), tmp_path / "other")
    Tokenizer.train(pretrain_texts(50, seed=0), 300).save(tmp_path / "other")
    done = nanoseek("generate", "--checkpoint", "adapter", "--prompt", "hi", "--max-new-tokens", "2", cwd=tmp_path)
    assert_one_line_error(done, "do not fit this base model")


def test_the_engine_twin_shares_the_frozen_base_and_sees_new_adapters_after_a_sync():
    """Under bf16 autocast the RL engine decodes `rollout_policy`'s twin: with a bf16 base it holds the
    policy's own base tensors (no copy), its own copies of the adapters, refreshed by `sync_rollout_policy`."""
    from nanoseek.engine.twin import rollout_policy, sync_rollout_policy

    model = small_model("tiny-moe", seed=6)
    apply_lora(model, rank=8, alpha=8, targets=ALL, base_dtype=torch.bfloat16)
    twin = rollout_policy(model, torch.bfloat16)
    assert twin.layers[0].attn.wq.weight.data_ptr() == model.layers[0].attn.wq.weight.data_ptr()
    assert twin.layers[1].mlp.w1.data_ptr() == model.layers[1].mlp.w1.data_ptr()
    assert twin.layers[0].attn.wq.lora_b.dtype == torch.bfloat16
    randomize_adapters(model, 5)  # an "update"
    x = ids(7)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        stale = twin.eval()(x)
        sync_rollout_policy(twin, model)
        fresh, policy = twin(x), model.eval()(x)
    assert not torch.equal(stale, policy)
    torch.testing.assert_close(fresh.float(), policy.float(), atol=0.05, rtol=0)  # bf16 copies of the adapters


def test_pretraining_with_lora_keeps_its_random_base_beside_the_adapters(tmp_path):
    """A fresh model's base is on no disk: the run writes it to RUN_DIR/base, which its adapter checkpoints
    name; loading the run gives the base with the trained adapters, and resuming continues them exactly."""
    from safetensors.torch import load_file
    from test_train import small_run

    from nanoseek.train.stages import pretrain

    def lora_run() -> RunConfig:
        cfg = small_run("muon")
        cfg.train.steps, cfg.train.eval_every = 4, 0
        cfg.train.lora.enabled = True
        return cfg

    pretrain(lora_run(), tmp_path / "straight", quiet=True)
    pretrain(lora_run(), tmp_path / "resumed", quiet=True, stop_at=2)
    pretrain(lora_run(), tmp_path / "resumed", quiet=True, resume=True)
    a, b = (
        load_file(str(tmp_path / r / "checkpoints" / "step_4" / "adapter_model.safetensors"))
        for r in ("straight", "resumed")
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith("lora_B.weight") and a[k].abs().sum() > 0 for k in a)
    model, tokenizer = load_checkpoint(tmp_path / "straight", device="cpu", dtype=torch.float32)
    assert tokenizer is not None and Path(lora_of(model).base) == (tmp_path / "straight" / "base").resolve()


def test_a_compiled_cpu_decode_step_keeps_the_experts_adapters():
    """A compiled CPU pass without gradients multiplies token copies by the experts' weights where they lie (one loop
    per copy, or `cpu_kernel.float32_experts`): an MoE layer with adapters runs them through `experts` instead, so
    its compiled output equals its eager one (it once dropped the adapters), in float64 and in float32."""
    for dtype in (torch.float64, torch.float32):
        model = small_model("tiny-moe", seed=3).to(dtype)
        apply_lora(model, rank=2, alpha=4, targets=["w1", "w2", "w3"], dtype=dtype)
        randomize_adapters(model, 2)
        layer = next(m for m in model.modules() if type(m).__name__ == "LoRAMoE")
        x = torch.randn(5, model.cfg.d_model, dtype=dtype)
        torch._dynamo.reset()
        with torch.no_grad():
            want = layer(x)
            got = torch.compile(layer, backend="eager", fullgraph=True)(x)
        torch.testing.assert_close(got, want, atol=1e-5 if dtype == torch.float32 else 1e-10, rtol=0)
    torch._dynamo.reset()
