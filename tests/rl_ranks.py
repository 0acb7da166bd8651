"""One RL update on a fixed batch, split over however many ranks launched this script.

    python tests/rl_ranks.py OUT_DIR                                  # one process: the reference
    torchrun --standalone --nproc_per_node=2 tests/rl_ranks.py OUT_DIR

Groups go to ranks as `collect` deals them out (group g to rank g % world). Rank 0 writes the
updated weights of each setting and the batch statistics; test_distributed.py compares the runs.
Not a test module itself (pytest does not collect it).
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from nanoseek.config import RLConfig
from nanoseek.model import Transformer, get_preset, install_balancing_hook
from nanoseek.train import distributed, grpo
from nanoseek.train.rollouts import Rollouts, batch_statistics
from nanoseek.train.update import update

SETTINGS = [  # (loss_agg, scale_rewards, num_iterations)
    ("token-mean", "group", 1),
    ("seq-mean", "batch", 2),
    ("dr-grpo", "none", 1),
]
P, G = 6, 4


def full_batch() -> Rollouts:
    gen = torch.Generator().manual_seed(1)
    n = P * G
    prompts = [
        torch.randint(1, 60, (int(torch.randint(3, 7, (1,), generator=gen)),), generator=gen).tolist() for _ in range(P)
    ]
    lengths = torch.randint(2, 9, (n,), generator=gen).tolist()
    rewards = torch.randint(0, 3, (n,), generator=gen).float() / 2
    rewards[G : 2 * G] = 1.0  # one all-equal group: skipped by the update, still counted
    return Rollouts(
        rows=[{"id": i // G} for i in range(n)],
        prompt_ids=[prompts[i // G] for i in range(n)],
        completion_ids=[torch.randint(1, 60, (k,), generator=gen).tolist() for k in lengths],
        engine_logprobs=[(-torch.rand(k, generator=gen)).tolist() for k in lengths],
        texts=[""] * n,
        truncated=[k == 8 for k in lengths],
        policy_masks=[[1] * k for k in lengths],  # single-turn: every completion token is the policy's
        turn_advantage_spans=[[] for _ in lengths],
        rewards=rewards,
        per_function={"task": rewards.tolist()},
        correct=[bool(v == 1.0) for v in rewards],
        groups_generated=P,
        zero_variance_fraction=0.0,
        sampled_reward=0.0,
        sampled_accuracy=0.0,
        sampled_tokens=sum(lengths),
        reward_warnings={},
    )


def share(batch: Rollouts, rank: int, world: int) -> Rollouts:
    idx = [i for i in range(len(batch.rows)) if (i // G) % world == rank]
    pick = lambda xs: [xs[i] for i in idx]
    return replace(
        batch,
        rows=pick(batch.rows),
        prompt_ids=pick(batch.prompt_ids),
        completion_ids=pick(batch.completion_ids),
        engine_logprobs=pick(batch.engine_logprobs),
        texts=pick(batch.texts),
        truncated=pick(batch.truncated),
        policy_masks=pick(batch.policy_masks),
        turn_advantage_spans=pick(batch.turn_advantage_spans),
        rewards=batch.rewards[idx],
        per_function={k: pick(v) for k, v in batch.per_function.items()},
        correct=pick(batch.correct),
    )


def main(out: Path) -> None:
    topo, device = distributed.setup(torch.device("cpu"))
    batch = share(full_batch(), topo.rank, topo.world)
    stats = batch_statistics(batch)
    weights = {}
    for loss_agg, scale, iters in SETTINGS:
        torch.manual_seed(0)
        cfg = get_preset(
            "tiny-moe", vocab_size=64, d_model=32, n_heads=2, n_kv_heads=1, d_ff=64, moe_d_ff=16, n_layers=2
        )
        model = Transformer(cfg).train()
        # SGD: the weight change is the gradient itself (Adam would magnify float noise in near-zero entries).
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        install_balancing_hook(opt, model)
        rl_cfg = RLConfig(
            group_size=G, loss_agg=loss_agg, scale_rewards=scale, num_iterations=iters, micro_batch_size=3
        )
        adv = grpo.group_advantages(batch.rewards, G, scale, batch_std=stats["reward_std"] if topo.world > 1 else None)
        upd = update(model, None, [opt], batch, adv, rl_cfg, 1.0, device)
        stats.update({f"{loss_agg}/{k}": v for k, v in upd.items()})
        for k, v in model.state_dict().items():
            weights[f"{loss_agg}/{k}"] = v.contiguous()
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                weights[f"{loss_agg}/{name}"] = buf.clone()
    if topo.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_file(weights, str(out / "weights.safetensors"))
        (out / "stats.json").write_text(json.dumps(stats))
    distributed.barrier()
    distributed.leave()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
