"""Measured memory per rank and bytes sent per step under DDP, FSDP and expert parallelism, against the estimates.

    torchrun --standalone --nproc_per_node=4 benchmarks/parallel_memory.py --parallel fsdp
    torchrun --standalone --nproc_per_node=4 benchmarks/parallel_memory.py --parallel fsdp --expert-parallel 2
    python benchmarks/parallel_memory.py --parallel ddp --tensor-peak            # one process; live tensors too

On CPU (gloo): the model is built on the meta device, laid out (`nanoseek.train.parallel.prepare`) and
only then materialised, so no rank ever holds more than its share. After one warm-up step (the
optimizer state exists), the kernel's peak-RSS mark is reset (/proc/self/clear_refs) and one more step
is measured: peak RSS minus the RSS before the model was built, against `nanoseek.train.memory.estimate`
(float32 gathered weights: CPU FSDP has no bf16 all-gather). With --tensor-peak, the peak of the bytes
held by live tensors during that step instead (the profiler's allocation events from before the model
was built: CPU's counterpart of CUDA's max_memory_allocated), which is what the estimate counts: RSS
also holds what glibc keeps of freed blocks, oneDNN's cache of matmul primitives and the libraries'
pages; the profiler's own records would add to RSS, so the two come from separate runs. Bytes sent:
every collective's payload on this rank during the measured step (FSDP's all-gathers and
reduce-scatters and every all-reduce, DDP's buckets included, patched in `torch.distributed`; the
expert all-to-alls' rows bound for other ranks, counted by the dispatch), as a ring algorithm sends
them, against `memory.bytes_sent_per_step`.
Rank 0 prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

import torch
import torch.distributed as dist

from nanoseek import precision
from nanoseek.config import TrainConfig
from nanoseek.model import Transformer, get_preset, install_balancing_hook
from nanoseek.train import distributed, expert_parallel, parallel
from nanoseek.train.memory import Layout, bytes_sent_per_step, estimate
from nanoseek.train.optim import build_optimizers

MEASURED = "parallel_memory.measured_step"


def rss_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def tensor_peak(prof: torch.profiler.profile) -> float:
    """Most bytes held by live CPU tensors during the `MEASURED` range: the allocation events (all of them since
    the profiler started, so the running sum is what is held) in time order."""
    events = prof.profiler.kineto_results.events()  # (the raw events: per allocation, with its time)
    step = next(e for e in events if e.name() == MEASURED)
    start, end = step.start_ns(), step.start_ns() + step.duration_ns()
    allocations = sorted(
        (e.start_ns(), e.nbytes())
        for e in events
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    held = peak = 0
    for t, nbytes in allocations:
        held += nbytes
        if start <= t <= end:
            peak = max(peak, held)
    return peak


class SentBytes:
    """Bytes this rank sends through the collectives FSDP calls (patched) and the others' counters."""

    def __init__(self) -> None:
        self.by_kind: dict[str, float] = {}
        self.on = False
        world = dist.get_world_size()
        # A ring all-gather sends N - 1 input chunks; a ring reduce-scatter N - 1 output chunks.
        for name in ("all_gather_single", "reduce_scatter_single"):
            real = getattr(dist, name)

            def counted(*args, _real=real, _name=name, **kwargs):
                group = kwargs.get("group")
                n = dist.get_world_size(group) if group is not None else world
                if _name == "all_gather_single":
                    chunk = args[1] if len(args) > 1 else kwargs["input_tensor"]
                else:
                    chunk = kwargs["output"] if "output" in kwargs else args[0]
                self.add(_name.removesuffix("_single"), (n - 1) * chunk.numel() * chunk.element_size())
                return _real(*args, **kwargs)

            setattr(dist, name, counted)
        real_all_reduce = dist.all_reduce

        def counted_all_reduce(tensor, *args, **kwargs):  # a ring all-reduce sends 2 (N - 1) / N of it
            group = kwargs.get("group")
            n = dist.get_world_size(group) if group is not None else world
            self.add("all_reduce", 2 * (n - 1) / n * tensor.numel() * tensor.element_size())
            return real_all_reduce(tensor, *args, **kwargs)

        dist.all_reduce = counted_all_reduce
        # DDP reduces its buckets in C++; its Python comm hook (the same all-reduce) goes through the count.
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        class CountedDDP(torch.nn.parallel.DistributedDataParallel):
            def __init__(self, *args, **kwargs) -> None:
                super().__init__(*args, **kwargs)
                self.register_comm_hook(None, allreduce_hook)

        torch.nn.parallel.DistributedDataParallel = CountedDDP

    def add(self, kind: str, nbytes: float) -> None:
        if self.on:
            self.by_kind[kind] = self.by_kind.get(kind, 0.0) + nbytes


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--parallel", default="fsdp", choices=["ddp", "fsdp"])
    p.add_argument("--expert-parallel", type=int, default=1)
    p.add_argument("--layers", type=int, default=2, help="moe-1b's width, this many layers (1 dense, the rest MoE)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--tensor-peak", action="store_true", help="the live tensors' peak (RSS then counts the profiler)")
    args = p.parse_args()
    device = torch.device("cpu")
    topo, _ = distributed.setup(device)
    world = topo.world
    cfg = get_preset("moe-1b", n_layers=args.layers)
    train_cfg = TrainConfig(optimizer="adamw", parallel=args.parallel, expert_parallel=args.expert_parallel)
    layout_name = parallel.resolve(train_cfg, topo, device, 0)
    counter = SentBytes() if world > 1 else None

    base = rss_kib("VmRSS")
    prof = None
    if args.tensor_peak:
        prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
        prof.start()
    with torch.device("meta"):
        model = Transformer(cfg)
    parallel.prepare(model, train_cfg, layout_name, device, sum_gradients=False)
    laid_out = rss_kib("VmRSS")  # the layout's own cost before any tensor exists (process groups of its meshes)
    model.to_empty(device=device)
    model.materialize_buffers(device)
    model.reset_parameters()
    model.train()
    opts = build_optimizers(model, train_cfg, device)
    install_balancing_hook(opts[-1], model)
    loss_fn, _ = parallel.loss_function(model, layout_name, device, compile=False)
    gen = torch.Generator().manual_seed(topo.rank)
    ids = torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len + 1), generator=gen)

    def step() -> None:
        with precision.autocast(device, precision.autocast_dtype(device)):
            ce, aux = loss_fn(ids[:, :-1], ids[:, 1:], None, None, "sum")
            (ce / ids[:, 1:].numel() + aux).backward()
        parallel.finish_gradients(model, 1.0)
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)

    step()  # the optimizer state exists from here on
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark
    before_step = rss_kib("VmRSS")
    if counter is not None:
        counter.on = True
    dispatches = expert_parallel._dispatches(model)
    for d in dispatches:
        d.sent_rows = 0
    with torch.profiler.record_function(MEASURED):
        step()
    peak = rss_kib("VmHWM")
    tensors = float("nan")
    if prof is not None:
        prof.stop()
        tensors = tensor_peak(prof)
    sent = dict(counter.by_kind) if counter is not None else {}
    if dispatches:  # rows the forward sent to other ranks (out and back); the backward sends as many again
        sent["all_to_all"] = 2 * sum(d.sent_rows for d in dispatches) * cfg.d_model * 4
    layout = Layout(layout_name if layout_name != "single" else "ddp", world, args.expert_parallel)
    est = estimate(
        cfg,
        layout,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        compute_bytes=2,
        gather_bytes=4,
        fsdp_mixed_precision=False,
    )
    closed = bytes_sent_per_step(cfg, layout, tokens_per_micro_batch=ids[:, 1:].numel(), micro_batches=1)
    measured = (peak - base) * 1024
    result = dict(
        world=world,
        layout=layout.name(),
        shape=f"moe-1b x {args.layers} layers",
        params=sum(p.numel() for p in model.parameters()) if layout_name != "fsdp" else None,
        peak_rss_above_start_gib=measured / 2**30,
        layout_groups_gib=(laid_out - base) * 1024 / 2**30,
        state_after_warmup_gib=(before_step - base) * 1024 / 2**30,
        estimate_gib={k: v / 2**30 for k, v in est.items()},
        estimate_over_measured=est["total"] / measured,
        tensor_peak_gib=tensors / 2**30,
        estimate_over_tensor_peak=est["total"] / tensors,
        sent_mib=sum(sent.values()) / 2**20,
        sent_by_kind_mib={k: v / 2**20 for k, v in sent.items()},
        closed_form_mib=sum(closed.values()) / 2**20,
        closed_form_by_kind_mib={k: v / 2**20 for k, v in closed.items()},
    )
    peaks = distributed.max_over_ranks(measured, tensors)
    result["largest_rank_peak_gib"] = peaks[0] / 2**30
    result["largest_rank_tensor_peak_gib"] = peaks[1] / 2**30
    if topo.is_main:
        print(json.dumps(result))
    distributed.barrier()
    distributed.leave()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
