"""`nanoseek model`: a preset's size, FLOPs per token and KV-cache bytes; with --devices, memory per device.

nanoseek model --preset moe-1b --seq-len 2048
nanoseek model --preset moe-1b --devices 8 --expert-parallel 4 --batch-size 4   # per layout, per device
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default=None, help="one preset (default: all)")
    p.add_argument("--seq-len", type=int, default=2048, help="sequence length for the FLOPs count")
    p.add_argument("--devices", type=int, default=None, help="memory per device for each layout over N devices")
    p.add_argument("--parallel", default="all", choices=["all", "ddp", "fsdp"], help="the layouts shown")
    p.add_argument("--expert-parallel", type=int, default=1, metavar="E", help="also with experts over E devices")
    p.add_argument("--batch-size", type=int, default=1, help="rows per micro-batch per device (activations)")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "muon"], help="whose state is counted")
    p.add_argument(
        "--activation-checkpointing", default="none", choices=["none", "block", "selective"], help="activations kept"
    )
    p.add_argument("--compute-bytes", type=int, default=2, choices=[2, 4], help="bf16 (2) or float32 (4) compute")


def run(args: argparse.Namespace) -> int:
    import torch

    from nanoseek.model import Transformer, get_preset, preset_names

    if args.devices is not None:
        return _memory(args)
    print(f"{'preset':<10} {'params':>10} {'active':>10} {'GFLOP/tok':>10} {'KV B/tok':>9}")
    for name in [args.preset] if args.preset else preset_names():
        with torch.device("meta"):
            m = Transformer(get_preset(name))
        print(
            f"{name:<10} {m.num_params() / 1e6:>9.1f}M {m.num_active_params() / 1e6:>9.1f}M "
            f"{m.flops_per_token(args.seq_len) / 1e9:>10.3f} {m.kv_bytes_per_token():>9}"
        )
    return 0


def _memory(args: argparse.Namespace) -> int:
    from nanoseek.errors import InputError
    from nanoseek.model import get_preset
    from nanoseek.train.expert_parallel import check
    from nanoseek.train.memory import GIB, Layout, estimate

    if not args.preset:
        raise InputError("--devices: name the model with --preset")
    cfg = get_preset(args.preset)
    n, ep = args.devices, args.expert_parallel
    if n < 1:
        raise InputError(f"--devices {n}: must be >= 1")
    if ep > 1:
        check(ep, n, cfg.n_routed_experts if cfg.is_moe else None)
    kinds = ["ddp", "fsdp"] if args.parallel == "all" else [args.parallel]
    layouts = [Layout(k, n) for k in kinds] + ([Layout(k, n, ep) for k in kinds] if ep > 1 else [])
    print(
        f"{args.preset} on {n} device(s), micro-batch {args.batch_size} x {args.seq_len}, {args.optimizer}, "
        f"activation checkpointing {args.activation_checkpointing}: GiB per device"
    )
    columns = ("weights", "gradients", "optimizer", "gathered", "buffers", "casts", "activations", "total")
    print(f"{'layout':<12}" + "".join(f"{c:>12}" for c in columns))
    for layout in layouts:
        est = estimate(
            cfg,
            layout,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            optimizer=args.optimizer,
            compute_bytes=args.compute_bytes,
            checkpointing=args.activation_checkpointing,
        )
        print(f"{layout.name():<12}" + "".join(f"{est[c] / GIB:>12.2f}" for c in columns))
    return 0
