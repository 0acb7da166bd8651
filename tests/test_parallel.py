"""FSDP, activation checkpointing and sharded checkpoints (`nanoseek.train.parallel`), on CPU with gloo.

The reference is always the single-process run on the same data, made in this test's own process;
one torchrun launch of tests/parallel_ranks.py makes every sharded run (machines running the suite
have two cores: the launches are what cost).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import parallel_ranks
import pytest
import rl_ranks
import torch
from safetensors.torch import load_file
from test_distributed import launch, metrics

from nanoseek.cli import main as nanoseek
from nanoseek.model import Transformer, get_preset
from nanoseek.model.moe import moe_layers
from nanoseek.train import parallel


def assert_same_weights(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


def assert_same_metrics(one: Path, two: Path) -> None:
    ma, mb = metrics(one), metrics(two)
    assert [r["step"] for r in ma] == [r["step"] for r in mb] and len(ma) >= 4
    for ra, rb in zip(ma, mb):
        assert ra.keys() == rb.keys()
        for key in ra:
            assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-7), (ra["step"], key)


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt / "model.safetensors"))


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")
def test_fsdp_trains_resumes_and_updates_rl_like_one_process(tmp_path, capsys):
    ref, two = tmp_path / "ref", tmp_path / "two"
    for preset in parallel_ranks.STEPS:
        parallel_ranks.pretrain_run(preset, ref / preset, world=1)
        shutil.copytree(ref / preset / "tokenizer", two / preset / "tokenizer")  # rank 0 would train the same
    rl_ranks.main(ref / "rl")
    start = ref / "tiny-moe" / "checkpoints" / "step_4"  # where the RL run starts
    launch([str(Path(parallel_ranks.__file__)), str(two), str(start)], tmp_path, nproc=2)

    # Pretraining sharded over 2 ranks (activation checkpointing on) = one process with 2 micro-batches
    # a step: the sharded checkpoints, consolidated, hold the same weights, and the losses agree.
    for preset, steps in parallel_ranks.STEPS.items():
        sharded = two / preset / "checkpoints" / f"step_{steps}"
        assert (sharded / "sharded").is_dir() and not (sharded / "model.safetensors").exists()
        out = tmp_path / "consolidated" / preset
        assert nanoseek(["checkpoint", "consolidate", str(two / preset), "--out", str(out)]) == 0
        assert (out / "tokenizer.json").is_file()
        reference = ref / preset / "checkpoints" / f"step_{steps}"
        assert_same_weights(weights(reference), weights(out), atol=1e-5)
        assert_same_metrics(ref / preset, two / preset)
    biases = [k for k in weights(out.parent / "tiny-moe") if k.endswith("e_score_correction_bias")]
    assert biases and any(weights(out.parent / "tiny-moe")[k].abs().sum() > 0 for k in biases)

    # Saved on 2 ranks, resumed in one process: the step-2 shards load whole and train on to the same run.
    resumed = tmp_path / "resumed"
    shutil.copytree(two / "tiny-moe", resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_4")
    parallel_ranks.pretrain_run("tiny-moe", resumed, world=1, resume=True)
    assert_same_weights(
        weights(ref / "tiny-moe" / "checkpoints" / "step_4"), weights(resumed / "checkpoints" / "step_4"), 1e-5
    )
    assert_same_metrics(ref / "tiny-moe", resumed)

    # RL's update with the policy sharded (gradients summed by FSDP) = the whole batch in one process.
    # The engine's whole-weight twin, refreshed from the shards after the update, holds the same weights.
    rl_one, rl_two = (load_file(str(run / "rl" / "weights.safetensors")) for run in (ref, two))
    twin = {k.replace("twin/", "token-mean/"): rl_two.pop(k) for k in list(rl_two) if k.startswith("twin/")}
    assert_same_weights(rl_one, rl_two, atol=1e-6)
    assert_same_weights({k: v for k, v in rl_one.items() if k.startswith("token-mean/")}, twin, atol=1e-6)
    # `nanoseek rl` under FSDP end to end: the evaluations and the step ran on the twin, the checkpoint is sharded.
    summary = json.loads((two / "rl_run" / "summary.json").read_text())
    assert summary["steps"] == 1 and "all" in summary["after"]
    assert (two / "rl_run" / "checkpoints" / "step_1" / "sharded").is_dir()

    # Bad input, one line each: a sharded checkpoint of another model; FSDP without torchrun.
    capsys.readouterr()
    other = [*parallel_ranks.SMALL, "train.steps=6", "model.d_model=48"]
    assert (
        nanoseek(
            ["pretrain", "--preset", "tiny-moe", "--out", str(two / "tiny-moe"), "--resume", "--quiet", *_sets(other)]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert "a sharded checkpoint of another model" in err and "d_model" in err and len(err.splitlines()) == 1
    assert nanoseek(["pretrain", "--quiet", "--out", str(tmp_path / "x"), "--set", "train.parallel=fsdp"]) == 2
    err = capsys.readouterr().err.strip()
    assert "train.parallel = 'fsdp'" in err and "torchrun" in err and len(err.splitlines()) == 1


def _sets(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


@pytest.mark.parametrize("mode", ["block", "selective"])
@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_activation_checkpointing_changes_no_gradient(preset, mode):
    torch.manual_seed(0)
    # With an aux loss, whose gradient flows through the recomputed routers too.
    cfg = get_preset(
        preset, vocab_size=64, d_model=32, n_heads=2, n_kv_heads=1, d_ff=64, moe_d_ff=16, n_layers=2, aux_loss_coef=0.01
    )
    plain = Transformer(cfg).double().train()
    checkpointed = Transformer(cfg).double().train()
    checkpointed.load_state_dict(plain.state_dict())
    parallel.checkpoint_blocks(checkpointed, mode)
    ids = torch.randint(0, 64, (2, 12))
    for model in (plain, checkpointed):
        ce, aux = model.loss(ids, ids.roll(-1, 1))
        (ce + aux).backward()
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=1e-6, msg=name)
    # The recomputation leaves the routers' counts as the forward made them (the balancing step reads them).
    for a, b in zip(moe_layers(plain), moe_layers(checkpointed)):
        torch.testing.assert_close(b.router.tokens_per_expert, a.router.tokens_per_expert, rtol=0, atol=0)
        assert b.router.tokens_per_expert.sum() == ids.numel() * cfg.top_k
    assert type(checkpointed.layers[0]).__name__ == "CheckpointedBlock"
    assert checkpointed.state_dict().keys() == plain.state_dict().keys()
