"""Expert parallelism: each MoE layer's routed experts split over `train.expert_parallel` ranks.

    torchrun --standalone --nproc_per_node=8 -m nanoseek pretrain --preset moe-1b --set train.expert_parallel=4

The ranks form a 2-D mesh, (dp, ep) = (world / N, N): the ranks of one `ep` row hold one expert each of
E / N consecutive experts and exchange token copies; the rows are data parallel (DDP or FSDP over the
whole world for every other weight, a sum over `dp` for the experts). Applied from outside the model
through its one seam, `MoE.expert_dispatch`:

  1. the router runs on every rank for its own tokens, over all E experts (its weights replicated);
  2. the copies, sorted by expert, go to the ranks holding their experts (`all_to_all_single`, after
     one exchange of the counts per expert: the split sizes are read on the host, once per layer);
  3. each rank runs its experts on what it received, sorted by expert, with the same grouped matmuls;
  4. the outputs go back by the reverse exchange (the backward runs both exchanges the other way).

The routers' token counts are summed over all ranks before the balancing update, as under DDP, so
the bias stays identical everywhere. The experts' gradients are summed over `dp` (`reduce_gradients`),
and the gradient norm for clipping adds the experts' squares over `ep` (`clip_gradients`).
In checkpoints, an expert weight (and its optimizer state) is a DTensor sharded over `ep`, so the
sharded checkpoint of `torch.distributed.checkpoint` holds each expert once and reshards on load.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from nanoseek.errors import InputError
from nanoseek.model.moe import MoE, moe_layers


def check(ep: int, world: int, n_experts: int | None = None) -> None:
    """expert_parallel must divide the world size and the number of routed experts; else one line."""
    if world % ep:
        raise InputError(f"train.expert_parallel = {ep}: must divide the number of ranks ({world})")
    if n_experts is not None and n_experts % ep:
        raise InputError(f"train.expert_parallel = {ep}: must divide model.n_routed_experts ({n_experts})")


def mesh(device: torch.device, ep: int) -> DeviceMesh:
    world = dist.get_world_size()
    return init_device_mesh(device.type, (world // ep, ep), mesh_dim_names=("dp", "ep"))


class ExpertDispatch:
    """`MoE.expert_dispatch` for one layer: token copies to the ranks holding their experts and back."""

    def __init__(self, moe: MoE, device_mesh: DeviceMesh) -> None:
        self.moe = moe
        self.mesh = device_mesh
        self.group = device_mesh.get_group("ep")
        self.size = device_mesh.size(1)
        self.n_local = moe.cfg.n_routed_experts // self.size
        self.ep_rank = device_mesh.get_local_rank("ep")
        self.received_rows = 0
        self.sent_rows = 0  # to other ranks, out and back, since set to 0 (benchmarks/parallel_memory.py)

    def __call__(self, x_sorted: Tensor, counts: Tensor) -> Tensor:
        send_counts = counts.view(self.size, self.n_local).contiguous()  # [rank holding it, its expert]
        recv_counts = torch.empty_like(send_counts)  # [sending rank, my expert]
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        send_split, recv_split = send_counts.sum(1).tolist(), recv_counts.sum(1).tolist()  # host read
        self.received_rows = sum(recv_split)  # (for the tests: a rank may receive none)
        self.sent_rows += sum(send_split) - send_split[self.ep_rank] + sum(recv_split) - recv_split[self.ep_rank]
        received = _exchange(x_sorted, recv_split, send_split, self.group)
        # Rows arrive by sending rank, each rank's rows by expert: a stable sort by expert groups them.
        experts = torch.arange(self.n_local, device=counts.device).repeat(self.size)
        expert_of_row = torch.repeat_interleave(experts, recv_counts.flatten(), output_size=received.shape[0])
        order = torch.argsort(expert_of_row, stable=True)
        out = self.moe.experts(received.index_select(0, order), recv_counts.sum(0))
        back = torch.zeros_like(out).index_copy(0, order, out)  # the arrival order again
        return _exchange(back, send_split, recv_split, self.group)


def _exchange(x: Tensor, out_split: list[int], in_split: list[int], group: Any) -> Tensor:
    """Rows of x, in_split[j] of them to rank j, and out_split[j] from rank j, differentiably."""
    return all_to_all_single_autograd(x.contiguous(), out_split, in_split, group)


def apply(model: nn.Module, device_mesh: DeviceMesh) -> None:
    """Keep this rank's experts of every MoE layer (its `ep` coordinate's share) and install the dispatch."""
    ep_rank, ep = device_mesh.get_local_rank("ep"), device_mesh.size(1)
    for m in moe_layers(model):
        n = m.cfg.n_routed_experts // ep
        for name in ("w1", "w2", "w3"):
            whole = getattr(m, name)
            setattr(m, name, nn.Parameter(whole.detach()[ep_rank * n : (ep_rank + 1) * n].clone()))
        m.expert_dispatch = ExpertDispatch(m, device_mesh)


def _dispatches(model: nn.Module) -> list[ExpertDispatch]:
    return [m.expert_dispatch for m in moe_layers(model) if isinstance(m.expert_dispatch, ExpertDispatch)]


def expert_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """The split expert weights by name (none without expert parallelism)."""
    split = {id(d.moe) for d in _dispatches(model)}
    return {
        f"{prefix}.{name}": getattr(m, name)
        for prefix, m in model.named_modules()
        if id(m) in split
        for name in ("w1", "w2", "w3")
    }


def reduce_gradients(model: nn.Module) -> None:
    """The experts' gradients summed over `dp` (the ranks holding the same experts) and, like DDP's
    average of every other gradient, divided by the world size."""
    dispatches = _dispatches(model)
    if not dispatches:
        return
    params = [p for p in expert_params(model).values() if p.grad is not None]
    dp_group = dispatches[0].mesh.get_group("dp")
    if dist.get_world_size(dp_group) > 1:  # (else every expert is on one rank only: nothing to sum)
        # Each gradient in place, all in flight at once: no flat copy of this rank's expert gradients.
        for work in [dist.all_reduce(p.grad, group=dp_group, async_op=True) for p in params]:
            work.wait()
    torch._foreach_div_([p.grad for p in params], dist.get_world_size())


def clip_gradients(model: nn.Module, max_norm: float) -> Tensor:
    """torch's clip_grad_norm_, with the norm of the whole model: the experts' squares summed over `ep`."""
    dispatches = _dispatches(model)
    if not dispatches:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    experts = {id(p) for p in expert_params(model).values()}
    groups: dict[bool, list[Tensor]] = {True: [], False: []}  # DTensor (FSDP) or not
    for p in model.parameters():
        if p.grad is not None and id(p) not in experts:
            groups[isinstance(p, DTensor)].append(p)
    squares = []
    for params in groups.values():
        if params:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
            squares.append((norm.full_tensor() if isinstance(norm, DTensor) else norm) ** 2)
    mine = [p for p in expert_params(model).values() if p.grad is not None]
    expert_sq = torch.nn.utils.get_total_norm([p.grad for p in mine]) ** 2
    dist.all_reduce(expert_sq, group=dispatches[0].group)
    total = torch.stack([*squares, expert_sq]).sum().sqrt()
    for params in (*groups.values(), mine):
        if params:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


def as_dtensors(model: nn.Module, model_state: dict[str, Any], optim_state: dict[str, Any]) -> tuple[dict, dict]:
    """The two state dicts with each split expert weight and its optimizer state as a DTensor sharded over
    `ep` (replicated over `dp`), so a checkpoint holds each expert once and any layout can load it. New
    dicts (the optimizer's own state stays as it is); the DTensors share the tensors' memory."""
    dispatches = _dispatches(model)
    if not dispatches:
        return model_state, optim_state
    device_mesh, placements = dispatches[0].mesh, [Replicate(), Shard(0)]
    split = lambda t: DTensor.from_local(t, device_mesh, placements, run_check=False)
    names = set(expert_params(model))
    model_state = {k: split(v) if k in names else v for k, v in model_state.items()}
    state = {
        k: {key: split(v) if isinstance(v, Tensor) and v.dim() > 0 else v for key, v in s.items()} if k in names else s
        for k, s in optim_state.get("state", {}).items()
    }
    return model_state, {**optim_state, "state": state}


def as_local(state: Any) -> Any:
    """The local shards back (after `as_dtensors` and a load into them)."""
    if isinstance(state, dict):
        return {k: as_local(v) for k, v in state.items()}
    if isinstance(state, list):
        return [as_local(v) for v in state]
    split = isinstance(state, DTensor) and state.device_mesh.mesh_dim_names == ("dp", "ep")
    return state.to_local() if split else state


def bytes_per_token(d_model: int, top_k: int, ep: int, element_bytes: int) -> float:
    """Closed form: bytes one rank sends per token per MoE layer, forward and backward (4 exchanges), if the
    router spreads the copies evenly: the (ep - 1) / ep of its top_k copies bound for other ranks."""
    return 4 * top_k * d_model * element_bytes * (ep - 1) / ep
