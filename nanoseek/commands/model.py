"""`nanoseek model`: a preset's size, FLOPs per token and KV-cache bytes.

nanoseek model --preset moe-1b --seq-len 2048
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default=None, help="one preset (default: all)")
    p.add_argument("--seq-len", type=int, default=2048, help="sequence length for the FLOPs count")


def run(args: argparse.Namespace) -> int:
    import torch

    from nanoseek.model import Transformer, get_preset, preset_names

    print(f"{'preset':<10} {'params':>10} {'active':>10} {'GFLOP/tok':>10} {'KV B/tok':>9}")
    for name in [args.preset] if args.preset else preset_names():
        with torch.device("meta"):
            m = Transformer(get_preset(name))
        print(
            f"{name:<10} {m.num_params() / 1e6:>9.1f}M {m.num_active_params() / 1e6:>9.1f}M "
            f"{m.flops_per_token(args.seq_len) / 1e9:>10.3f} {m.kv_bytes_per_token():>9}"
        )
    return 0
