"""Data parallelism under `torchrun`: one process per device, PyTorch DDP, nothing home-made.

    torchrun --standalone --nproc_per_node=8 -m nanoseek pretrain --preset moe-1b --out runs/pt
    torchrun --standalone --nproc_per_node=8 -m nanoseek sft --checkpoint runs/pt --out runs/sft

The same commands as on one device; `torchrun` sets RANK / WORLD_SIZE / LOCAL_RANK and this
module turns them into a process group (NCCL on CUDA, gloo on CPU) and a device per rank.

How a step is split: every rank reads the *same* data stream and trains on its share of the
step's micro-batches (micro-batch i goes to rank i % world). The data position is therefore the
same on every rank, so the checkpoint rank 0 writes resumes all of them exactly, and a run on W
processes with grad_accum A takes the same steps as one process with grad_accum A x W (tested).
The price is that every rank tokenises the whole stream, which is cheap next to a GPU step at
the sizes this project trains. `train.batch_size` is per micro-batch per rank: a step sees
batch_size x grad_accum x world rows.

How the model itself is laid out over the ranks (DDP, FSDP, expert parallelism, activation
checkpointing) is `nanoseek.train.parallel`'s; the data split above is the same under each.

Rank 0 alone writes files (config, tokenizer, checkpoints, metrics, plots) and prints progress.
The MoE balancing bias is a buffer, not a parameter: DDP does not average it, so the routers'
token counts are summed over ranks before each bias update (`update_router_biases`), which keeps
the bias identical everywhere.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Topology:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_world_size() -> int:
    """The number of processes `torchrun` started (1 when run directly)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def topology() -> Topology:
    if not (dist.is_available() and dist.is_initialized()):
        return Topology()
    return Topology(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def setup(device: torch.device) -> tuple[Topology, torch.device]:
    """Join the process group when launched by torchrun; returns the topology and this rank's device.

    Idempotent (pretraining then SFT in one process joins once). On CUDA each rank takes the GPU of
    its LOCAL_RANK.
    """
    if launched_world_size() <= 1:
        return Topology(), device
    if not dist.is_initialized():
        for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise RuntimeError(f"WORLD_SIZE is set but {name} is not: launch multi-process runs with torchrun")
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    topo = topology()
    if device.type == "cuda":
        device = torch.device("cuda", topo.local_rank)
    return topo, device


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def leave() -> None:
    """Leave the process group on the way out (a no-op in a single process).

    A process that exits with its gloo group alive can abort while the interpreter shuts down
    ("terminate called without an active exception", SIGABRT: pytorch/pytorch#190489; it failed
    tests/rl_ranks.py in CI once), and torch warns about a group left behind, so every program
    that joined one ends here.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over ranks in place (a no-op in a single process); returns it."""
    if _spread():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def _spread() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _host_reduce(values: tuple[float, ...], op: dist.ReduceOp) -> list[float]:
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return t.tolist()


def sum_over_ranks(*values: float) -> list[float]:
    """Host numbers summed over ranks, all in one collective."""
    return _host_reduce(values, dist.ReduceOp.SUM) if _spread() else list(values)


def max_over_ranks(*values: float) -> list[float]:
    return _host_reduce(values, dist.ReduceOp.MAX) if _spread() else list(values)


def gather_lists(items: list) -> list:
    """Every rank's list, concatenated in rank order, on every rank (objects of our own processes)."""
    if not _spread():
        return list(items)
    parts: list[list | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in part]  # type: ignore[union-attr]
