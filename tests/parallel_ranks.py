"""Training sharded over the ranks that launched this script: the runs test_parallel.py compares.

    torchrun --standalone --nproc_per_node=2 tests/parallel_ranks.py OUT_DIR CHECKPOINT FOUR_RANK_RUN

Under FSDP: pretraining of tiny-moe (4 steps, sharded checkpoints at 2 and 4, activation checkpointing
on) and of tiny (3 steps) into OUT_DIR/<preset>; tiny-moe with expert parallelism into OUT_DIR/tiny-moe-ep;
the resumption of FOUR_RANK_RUN (saved by 4 ranks) from its step 2; the RL update of rl_ranks.py, and
the engine's twin refreshed after it, into OUT_DIR/rl; one step of `nanoseek rl` from CHECKPOINT into
OUT_DIR/rl_run.
The single-process references are the same functions run in the test's own process (`pretrain_run`,
`rl_ranks.main`). Not a test module itself (pytest does not collect it).
"""

from __future__ import annotations

import sys
from pathlib import Path

import rl_ranks
import torch
from safetensors.torch import save_file

from nanoseek.config import RLConfig
from nanoseek.config_toml import load_run_config
from nanoseek.model import Transformer, get_preset, install_balancing_hook
from nanoseek.train import distributed, grpo, parallel
from nanoseek.train.rl import rl, rl_defaults
from nanoseek.train.rollouts import batch_statistics
from nanoseek.train.stages import pretrain
from nanoseek.train.update import update

SMALL = [
    "data.vocab_size=300", "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1",
    "model.d_ff=64", "model.moe_d_ff=16", "train.batch_size=2", "train.seq_len=64", "train.eval_every=2",
    "train.log_every=1", "train.checkpoint_every=2", "data.builtin_examples=300", "train.device=cpu",
]  # fmt: skip
STEPS = {"tiny-moe": 4, "tiny": 3}
# Activation checkpointing on under FSDP: it must change nothing either.
CHECKPOINTING = {"tiny-moe": "selective", "tiny": "block"}


def pretrain_run(preset: str, out: Path, world: int, extra: list[str] = (), micro: int = 2, **options) -> dict:
    """The pretraining of `preset` that `world` ranks split: the same `micro` micro-batches a step on any world."""
    overrides = [*SMALL, f"train.steps={STEPS[preset]}", f"train.grad_accum={micro // world}", *extra]
    if world > 1:
        overrides += ["train.parallel=fsdp", f"train.activation_checkpointing={CHECKPOINTING[preset]}"]
    cfg = load_run_config(None, None, overrides)
    cfg.preset = preset
    cfg.check()
    return pretrain(cfg, out, quiet=True, **options)


def rl_under_fsdp(out: Path) -> None:
    """rl_ranks.main with the model sharded (gradients summed over ranks, as RL takes them)."""
    topo = distributed.topology()
    batch = rl_ranks.share(rl_ranks.full_batch(), topo.rank, topo.world)
    stats = batch_statistics(batch)
    weights = {}
    for loss_agg, scale, iters in rl_ranks.SETTINGS:
        torch.manual_seed(0)
        cfg = get_preset(
            "tiny-moe", vocab_size=64, d_model=32, n_heads=2, n_kv_heads=1, d_ff=64, moe_d_ff=16, n_layers=2
        )
        model = Transformer(cfg).train()
        parallel.shard(model, torch.device("cpu"), sum_gradients=True)
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        install_balancing_hook(opt, model)
        rl_cfg = RLConfig(
            group_size=rl_ranks.G, loss_agg=loss_agg, scale_rewards=scale, num_iterations=iters, micro_batch_size=3
        )
        twin = parallel.generation_policy(model, None)  # what the engine decodes: whole weights
        adv = grpo.group_advantages(batch.rewards, rl_ranks.G, scale, batch_std=stats["reward_std"])
        update(model, None, [opt], batch, adv, rl_cfg, 1.0, torch.device("cpu"))
        parallel.refresh_generation_policy(twin, model)
        for k, v in model.state_dict().items():
            weights[f"{loss_agg}/{k}"] = parallel.full(v).contiguous()
        if loss_agg == "token-mean":
            weights |= {f"twin/{k}": v.contiguous() for k, v in twin.state_dict().items()}
    if topo.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_file(weights, str(out / "weights.safetensors"))
    distributed.barrier()


def rl_run(out: Path, checkpoint: Path) -> dict:
    """`nanoseek rl` for one small step under FSDP: generation from the shards' twin, a sharded checkpoint."""
    overrides = [
        "train.device=cpu", "train.steps=1", "rl.prompts_per_step=2", "rl.group_size=2", "rl.max_new_tokens=4",
        "rl.eval_problems=2", "rl.eval_samples=1", "train.parallel=fsdp",
    ]  # fmt: skip
    cfg = load_run_config(rl_defaults(), None, overrides)
    cfg.check()
    return rl(cfg, out, checkpoint, quiet=True)


def main(out: Path, checkpoint: Path, four: Path) -> None:
    world = distributed.launched_world_size()
    for preset in STEPS:
        pretrain_run(preset, out / preset, world)
    # Expert parallelism over both ranks, FSDP for the rest.
    pretrain_run("tiny-moe", out / "tiny-moe-ep", world, ["train.expert_parallel=2"])
    # A run that 4 ranks (2 x 2 experts, expert_ranks.py) saved at step 2, resumed on these 2 (1 x 2).
    pretrain_run("tiny-moe", four, world, ["train.expert_parallel=2"], micro=4, resume=True)
    rl_under_fsdp(out / "rl")
    rl_run(out / "rl_run", checkpoint)
    distributed.leave()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
