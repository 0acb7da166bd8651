"""Expert parallelism on however many ranks launched this script: the layer against the whole layer.

    torchrun --standalone --nproc_per_node=4 tests/expert_ranks.py OUT_DIR

Every rank builds the same MoE layer in float64 and its own tokens; the reference is the whole layer
(all experts) on every rank's tokens together, computed by each rank itself. For each expert mesh
(ep = world, and ep = 2 beside dp = world / 2) and each routing case (every expert used; two experts
unused; every expert of ep rank 1 unused, so that rank receives no token at all), the ranks compare
outputs, input gradients, expert gradients (their own experts), the summed router and shared-expert
gradients, and the balancing bias after the update. Rank 0 writes the largest differences to
OUT_DIR/layer.json; test_parallel.py checks them. Before that, tiny-moe pretraining with the experts
over 2 ranks and FSDP over all 4 (parallel_ranks.pretrain_run) into OUT_DIR/tiny-moe.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from parallel_ranks import pretrain_run

from nanoseek.model import get_preset
from nanoseek.model.moe import MoE, update_router_biases
from nanoseek.train import distributed, expert_parallel

TOKENS = 12  # per rank


def layer_case(ep: int, unused: list[int]) -> dict[str, float]:
    """The largest absolute difference of each compared quantity, over all ranks."""
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = get_preset("tiny-moe", d_model=16, moe_d_ff=8, n_routed_experts=8, top_k=2, shared_d_ff=8)
    torch.manual_seed(0)
    whole = MoE(cfg).double().train()
    for p in whole.parameters():
        torch.nn.init.normal_(p, std=0.3)
    whole.router.e_score_correction_bias[unused] = -100.0  # never chosen
    gen = torch.Generator().manual_seed(1)
    x_all = torch.randn(world, TOKENS, cfg.d_model, generator=gen, dtype=torch.float64)
    g_all = torch.randn(world, TOKENS, cfg.d_model, generator=gen, dtype=torch.float64)

    split = copy.deepcopy(whole)
    mesh = expert_parallel.mesh(torch.device("cpu"), ep)
    expert_parallel.apply(torch.nn.ModuleList([split]), mesh)

    x_ref = x_all.clone().requires_grad_(True)
    out_ref = whole(x_ref)
    (out_ref * g_all).sum().backward()
    x = x_all[rank].clone().requires_grad_(True)
    out = split(x)
    (out * g_all[rank]).sum().backward()

    diff = {
        "output": (out - out_ref[rank]).abs().max(),
        "input_grad": (x.grad - x_ref.grad[rank]).abs().max(),
    }
    n, ep_rank = cfg.n_routed_experts // ep, mesh.get_local_rank("ep")
    for name in ("w1", "w2", "w3"):
        mine = getattr(whole, name).grad[ep_rank * n : (ep_rank + 1) * n]
        total = getattr(split, name).grad.clone()
        dist.all_reduce(total, group=mesh.get_group("dp"))  # the other ep rows' tokens, for the same experts
        diff[f"{name}_grad"] = (total - mine).abs().max()
    # The replicated weights' gradients from this rank's tokens: summed over ranks, the whole one's.
    for name, p in split.named_parameters():
        if name not in ("w1", "w2", "w3"):
            total = distributed.all_reduce_sum(p.grad.clone())
            diff[f"{name}_grad"] = (total - whole.get_parameter(name).grad).abs().max()
    update_router_biases(torch.nn.ModuleList([split]))  # counts summed over ranks
    whole.router.update_bias()
    diff["bias"] = (split.router.e_score_correction_bias - whole.router.e_score_correction_bias).abs().max()
    received = float(split.expert_dispatch.received_rows)
    result = {k: float(distributed.max_over_ranks(float(v.detach()))[0]) for k, v in diff.items()}
    result["least_received"] = -distributed.max_over_ranks(-received)[0]
    return result


def main(out: Path) -> None:
    distributed.setup(torch.device("cpu"))
    world = dist.get_world_size()
    # Training with the experts over 2 ranks and FSDP over all 4 for the rest (4 micro-batches a step).
    pretrain_run("tiny-moe", out / "tiny-moe", world, ["train.expert_parallel=2"], micro=4)
    results = {}
    for ep in sorted({world, 2}):
        n = 8 // ep
        for case, unused in (("all", []), ("two_unused", [1, 6]), ("rank_1_unused", list(range(n, 2 * n)))):
            results[f"ep{ep}/{case}"] = layer_case(ep, unused)
    if dist.get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "layer.json").write_text(json.dumps(results, indent=1))
    distributed.barrier()
    distributed.leave()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
