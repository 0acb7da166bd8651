"""FSDP, activation checkpointing and sharded checkpoints (`nanoseek.train.parallel`), on CPU with gloo.

The reference is always the single-process run on the same data, made in this test's own process;
two torchrun launches (tests/expert_ranks.py on 4 ranks, tests/parallel_ranks.py on 2) make every
sharded run, once for the module (machines running the suite have two cores: launches are what cost);
one more test starts two one-process "nodes" through the c10d rendezvous.
"""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import expert_ranks
import parallel_ranks
import pytest
import rl_ranks
import torch
from safetensors.torch import load_file
from test_distributed import launch, metrics

from nanoseek.cli import main as nanoseek
from nanoseek.errors import InputError
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


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """The references (this process), then every sharded run: one launch of 4 ranks, one of 2."""
    if not torch.distributed.is_available():
        pytest.skip("torch built without distributed")
    root = tmp_path_factory.mktemp("parallel")
    ref, two, four = root / "ref", root / "two", root / "four"
    for preset in parallel_ranks.STEPS:
        parallel_ranks.pretrain_run(preset, ref / preset, world=1)
    parallel_ranks.pretrain_run("tiny-moe", ref / "tiny-moe-4", world=1, micro=4)
    rl_ranks.main(ref / "rl")
    for run, preset in ((two / "tiny-moe", "tiny-moe"), (two / "tiny", "tiny"), (two / "tiny-moe-ep", "tiny-moe")):
        shutil.copytree(ref / preset / "tokenizer", run / "tokenizer")  # rank 0 would train the same one
    shutil.copytree(ref / "tiny-moe" / "tokenizer", four / "tiny-moe" / "tokenizer")

    launch([str(Path(expert_ranks.__file__)), str(four)], root, nproc=4)
    resumed_on_2 = root / "four-on-2"
    _copy_at_step_2(four / "tiny-moe", resumed_on_2)
    start = ref / "tiny-moe" / "checkpoints" / "step_4"  # where the RL run starts
    launch([str(Path(parallel_ranks.__file__)), str(two), str(start), str(resumed_on_2)], root, nproc=2)
    return root


def _copy_at_step_2(run: Path, to: Path) -> None:
    shutil.copytree(run, to)
    shutil.rmtree(to / "checkpoints" / "step_4")


def _consolidated(run: Path, out: Path) -> dict[str, torch.Tensor]:
    assert nanoseek(["checkpoint", "consolidate", str(run), "--out", str(out)]) == 0
    assert (out / "tokenizer.json").is_file()
    return weights(out)


def test_fsdp_pretraining_equals_one_process(runs):
    """Sharded over 2 ranks (activation checkpointing on) = one process with 2 micro-batches a step: the
    sharded checkpoints, consolidated, hold the same weights (balancing biases included); the losses agree."""
    for preset, steps in parallel_ranks.STEPS.items():
        sharded = runs / "two" / preset / "checkpoints" / f"step_{steps}"
        assert (sharded / "sharded").is_dir() and not (sharded / "model.safetensors").exists()
        whole = _consolidated(runs / "two" / preset, runs / "consolidated" / preset)
        assert_same_weights(weights(runs / "ref" / preset / "checkpoints" / f"step_{steps}"), whole, atol=1e-5)
        assert_same_metrics(runs / "ref" / preset, runs / "two" / preset)
    moe = weights(runs / "consolidated" / "tiny-moe")
    assert any(v.abs().sum() > 0 for k, v in moe.items() if k.endswith("e_score_correction_bias"))  # it moved


def test_expert_parallel_layer_equals_the_whole_layer_in_float64(runs):
    """4 ranks: experts over all 4, and over 2 beside 2 data-parallel rows; a rank receiving nothing included."""
    layer = json.loads((runs / "four" / "layer.json").read_text())
    assert set(layer) == {f"ep{ep}/{case}" for ep in (2, 4) for case in ("all", "two_unused", "rank_1_unused")}
    for case, diffs in layer.items():
        received = diffs.pop("least_received")
        assert received == 0 if case.endswith("rank_1_unused") else received > 0, case
        assert {"output", "input_grad", "w1_grad", "router.weight_grad", "shared.w2.weight_grad", "bias"} <= set(diffs)
        assert all(v <= 1e-6 for v in diffs.values()), (case, diffs)


def test_expert_parallel_training_equals_one_process(runs):
    """Experts over 2 ranks with FSDP for the rest, on 2 ranks (1 x 2) and on 4 (2 x 2)."""
    for run, ref in (("two/tiny-moe-ep", "ref/tiny-moe"), ("four/tiny-moe", "ref/tiny-moe-4")):
        whole = _consolidated(runs / run, runs / "consolidated" / run)
        assert_same_weights(weights(runs / ref / "checkpoints" / "step_4"), whole, atol=1e-5)
        assert_same_metrics(runs / ref, runs / run)


def test_sharded_checkpoints_resume_on_fewer_ranks(runs):
    """Saved at step 2 on 4 ranks: resumed on 2 and on 1; saved on 2: resumed on 1. Each goes on to the
    run that never stopped (weights and every logged number)."""
    ref4, ref2 = runs / "ref" / "tiny-moe-4", runs / "ref" / "tiny-moe"
    on_1 = runs / "four-on-1"
    _copy_at_step_2(runs / "four" / "tiny-moe", on_1)
    parallel_ranks.pretrain_run("tiny-moe", on_1, world=1, micro=4, resume=True)
    two_on_1 = runs / "two-on-1"
    _copy_at_step_2(runs / "two" / "tiny-moe", two_on_1)
    parallel_ranks.pretrain_run("tiny-moe", two_on_1, world=1, resume=True)
    on_2 = _consolidated(runs / "four-on-2", runs / "consolidated" / "four-on-2")  # resumed with EP: sharded
    for ref, resumed in ((ref4, weights(on_1 / "checkpoints" / "step_4")), (ref4, on_2), (ref2, None)):
        resumed = resumed if resumed is not None else weights(two_on_1 / "checkpoints" / "step_4")
        assert_same_weights(weights(ref / "checkpoints" / "step_4"), resumed, atol=1e-5)
    for ref, run in ((ref4, on_1), (ref4, runs / "four-on-2"), (ref2, two_on_1)):
        assert_same_metrics(ref, run)


def test_rl_update_under_fsdp_equals_one_process(runs):
    """RL's update with the policy sharded (gradients summed by FSDP, idle passes where a rank has fewer
    micro-batches) = the whole batch in one process; so does the engine's twin refreshed from the shards."""
    rl_one, rl_two = (load_file(str(runs / run / "rl" / "weights.safetensors")) for run in ("ref", "two"))
    twin = {k.replace("twin/", "token-mean/"): rl_two.pop(k) for k in list(rl_two) if k.startswith("twin/")}
    assert_same_weights(rl_one, rl_two, atol=1e-6)
    assert_same_weights({k: v for k, v in rl_one.items() if k.startswith("token-mean/")}, twin, atol=1e-6)
    # `nanoseek rl` under FSDP end to end: evaluations and the step ran on the twin; the checkpoint is sharded.
    summary = json.loads((runs / "two" / "rl_run" / "summary.json").read_text())
    assert summary["steps"] == 1 and "all" in summary["after"]
    assert (runs / "two" / "rl_run" / "checkpoints" / "step_1" / "sharded").is_dir()


def test_bad_parallel_settings_are_one_line_errors(runs, tmp_path, capsys):
    small = [*parallel_ranks.SMALL, "train.steps=6"]
    cases = [  # (arguments, what the one line says)
        (["--out", str(runs / "two" / "tiny-moe"), "--resume", *_sets([*small, "model.d_model=48"])],
         "a sharded checkpoint of another model (config.json differs in d_model)"),
        (["--out", str(tmp_path / "a"), *_sets(["train.parallel=fsdp"])], "train.parallel = 'fsdp': shards"),
        (["--out", str(tmp_path / "b"), *_sets(["train.expert_parallel=2"])], "train.expert_parallel = 2: shards"),
    ]  # fmt: skip
    for args, message in cases:
        capsys.readouterr()
        assert nanoseek(["pretrain", "--preset", "tiny-moe", "--quiet", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1 and err.startswith("error: "), err
        assert "torchrun" in err or "another model" in message
    # Under torchrun: expert ranks that divide neither the ranks nor the experts (checked before any work).
    from nanoseek.train import expert_parallel

    with pytest.raises(InputError, match=r"train.expert_parallel = 3: must divide the number of ranks \(4\)"):
        expert_parallel.check(3, 4)
    with pytest.raises(InputError, match=r"must divide model.n_routed_experts \(6\)"):
        expert_parallel.check(4, 8, n_experts=6)


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


def test_two_nodes_with_the_c10d_rendezvous_train_like_one_process(runs, tmp_path):
    """Two torchrun launches of one process each, as two nodes would start them (the README's command),
    meet through the c10d rendezvous and train tiny under FSDP as one process does."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "nodes"
    shutil.copytree(runs / "ref" / "tiny" / "tokenizer", out / "tokenizer")
    overrides = [*parallel_ranks.SMALL, "train.steps=3", "train.grad_accum=1", "train.parallel=fsdp"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1"]
    launcher += ["--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=nanoseek-test"]
    command = [*launcher, "-m", "nanoseek", "pretrain", "--preset", "tiny", "--quiet", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    nodes = [subprocess.Popen([*command, *_sets(overrides)], env=env, stderr=subprocess.PIPE, text=True) for _ in "ab"]
    for node in nodes:
        _, err = node.communicate(timeout=300)
        assert node.returncode == 0, err[-3000:]
    whole = _consolidated(out, tmp_path / "whole")
    assert_same_weights(weights(runs / "ref" / "tiny" / "checkpoints" / "step_3"), whole, atol=1e-5)
    assert_same_metrics(runs / "ref" / "tiny", out)


def test_memory_estimate_counts_the_model_s_own_parameters(capsys):
    """The state terms against the parameters of the built model: whole under DDP, 1/N under FSDP, the
    routed experts 1/ep under expert parallelism; `nanoseek model --devices` prints a row per layout."""
    from nanoseek.train.memory import Layout, estimate

    cfg = get_preset("tiny-moe")
    model = Transformer(cfg)
    total = sum(p.numel() for p in model.parameters())
    experts = sum(m.w1.numel() + m.w2.numel() + m.w3.numel() for m in moe_layers(model))
    at = lambda layout: estimate(cfg, layout, batch_size=1, seq_len=16)
    assert at(Layout("ddp", 1))["weights"] == 4 * total and at(Layout("ddp", 1))["optimizer"] == 8 * total
    assert at(Layout("fsdp", 4))["weights"] == pytest.approx(4 * total / 4)
    assert at(Layout("ddp", 4, 2))["weights"] == pytest.approx(4 * (total - experts / 2))
    assert at(Layout("fsdp", 4, 2))["gradients"] == pytest.approx(4 * ((total - experts) / 4 + experts / 2))
    # FSDP's working set: the root and the largest two neighbouring blocks gathered (bf16), the largest block's
    # and the root's whole float32 gradients; under expert parallelism without the split experts
    split = {id(p) for m in moe_layers(model) for p in (m.w1, m.w2, m.w3)}
    blocks = [[p for p in block.parameters() if id(p) not in split] for block in model.layers]
    size = lambda params: sum(p.numel() for p in params)
    root = total - sum(size(block.parameters()) for block in model.layers)
    for ep, per_block in ((1, [size(b.parameters()) for b in model.layers]), (2, [size(b) for b in blocks])):
        pair = max(a + b for a, b in itertools.pairwise(per_block))
        expected = 2 * (root + pair) + 4 * (max(per_block) + root)
        assert at(Layout("fsdp", 4, ep))["gathered"] == pytest.approx(expected)
    assert nanoseek(["model", "--preset", "tiny-moe", "--devices", "4", "--expert-parallel", "2"]) == 0
    rows = [line.split()[0] for line in capsys.readouterr().out.splitlines()[2:]]
    assert rows == ["ddp", "fsdp", "ddp", "fsdp"]  # then "+ ep2" after the latter two
    assert nanoseek(["model", "--preset", "tiny-moe", "--devices", "3", "--expert-parallel", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "must divide the number of ranks (3)" in err and len(err.splitlines()) == 1
