"""A decode step's bf16 weight products on a CPU: nanoseek's few-rows kernel against oneDNN's, interleaved.

    python benchmarks/cpu_products.py --preset small --rows 1,2,4,8,16,64 --threads 2
    python benchmarks/cpu_products.py --quick          # three small weights, 3 rounds: a smoke run

For each row count, one "step" multiplies rows of bf16 inputs by every weight a decode step of the preset's dense
model reads, as the engine groups them (each block's q/k/v stacked, its output projection, its gate/up stacked, its
down projection; the output layer): through nanoseek's kernel (`nanoseek.model.cpu_kernel`, the weights packed for
it), oneDNN's prepacked kernel (`torch.ops.mkldnn._linear_pointwise` on `_reorder_linear_weight` copies: what
`model.linear` uses where ours is not built) and plain F.linear (which reorders every weight at every call). The
three run one after another in every round, the order turned around every other round, so the machine's drifting
memory rate (up to 2x within minutes on the 2-core VM) falls on all of them; each row reports the median round, the
weight bytes read per second and the arithmetic rate, and the ratio to oneDNN's prepacked kernel per round. Every
way's first products are checked against F.linear in float32. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.decode_floor import check_product
from nanoseek.errors import InputError
from nanoseek.host import keep_freed_memory
from nanoseek.model import cpu_kernel, get_preset
from nanoseek.model.linear import packing_available


def step_shapes(preset: str) -> list[tuple[int, int]]:
    """[out, in] of each product a decode step of a dense preset makes, stacked as the engine's `linears` does."""
    cfg = get_preset(preset)
    if cfg.n_routed_experts:
        raise InputError(f"{preset!r} is a MoE preset; a dense one is needed (small, tiny, ...)")
    head = cfg.attn_head_dim
    q, kv = cfg.n_heads * head, cfg.n_kv_heads * head
    block = [(q + 2 * kv, cfg.d_model), (cfg.d_model, q), (2 * cfg.d_ff, cfg.d_model), (cfg.d_model, cfg.d_ff)]
    return block * cfg.n_layers + [(cfg.vocab_size, cfg.d_model)]


def ways(weights: list[Tensor], rows: int) -> dict[str, Callable[[], None]]:
    """Each way of making the step's products at `rows` rows, checked once (`decode_floor.check_product`)."""
    inputs = {k: torch.randn(rows, k).to(torch.bfloat16) for k in {w.shape[1] for w in weights}}
    calls: dict[str, list[Callable[[], Tensor]]] = {
        "f_linear": [lambda x=inputs[w.shape[1]], w=w: F.linear(x, w) for w in weights]
    }
    if packing_available():
        packed = [torch.ops.mkldnn._reorder_linear_weight(w, None) for w in weights]
        calls["onednn_prepacked"] = [
            lambda x=inputs[w.shape[1]], p=p: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")
            for w, p in zip(weights, packed)
        ]
    if cpu_kernel.available() and all(cpu_kernel.fits(w) for w in weights):
        ours = [cpu_kernel.pack(w) for w in weights]
        calls["nanoseek_kernel"] = [
            lambda x=inputs[w.shape[1]], p=p: cpu_kernel.product(x, p) for w, p in zip(weights, ours)
        ]
    for products in calls.values():
        for w, product in list(zip(weights, products))[:5]:
            check_product(product(), inputs[w.shape[1]], w)
    return {name: (lambda products=products: [p() for p in products]) for name, products in calls.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--rows", default="1,2,4,8,16,64", help="comma-separated row counts")
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="three small weights, rows 1,8, 3 rounds")
    args = p.parse_args(argv)
    try:
        rows_list = [int(r) for r in args.rows.split(",")]
    except ValueError:
        p.error(f"--rows {args.rows!r}: comma-separated positive integers")
    if any(r < 1 for r in rows_list) or args.rounds < 1 or (args.threads is not None and args.threads < 1):
        p.error("--rows, --rounds and --threads must be positive")
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()
    try:
        shapes = step_shapes(args.preset)
    except InputError as e:
        p.error(str(e))
    if args.quick:
        args.preset, shapes, rows_list, args.rounds = "quick", [(1024, 256), (256, 512), (4096, 256)], [1, 8], 3
    g = torch.Generator().manual_seed(0)
    weights = [(torch.randn(n, k, generator=g) / k**0.5).to(torch.bfloat16) for n, k in shapes]
    nbytes = sum(w.numel() * 2 for w in weights)
    macs = sum(w.numel() for w in weights)
    kernel = cpu_kernel.products_name() if cpu_kernel.available() else "not here"
    print(
        f"preset {args.preset}: {len(weights)} products a step, {nbytes / 2**20:.0f} MiB of bf16 weights, "
        f"{torch.get_num_threads()} threads, nanoseek's kernel {kernel}",
        flush=True,
    )
    summary: dict[str, dict] = {}
    for rows in rows_list:
        runs = ways(weights, rows)
        times: dict[str, list[float]] = {name: [] for name in runs}
        for fn in runs.values():
            fn()
        for r in range(args.rounds):
            for name in list(runs) if r % 2 == 0 else list(runs)[::-1]:
                start = time.perf_counter()
                runs[name]()
                times[name].append(time.perf_counter() - start)
        row: dict[str, dict] = {}
        for name, ts in times.items():
            median = statistics.median(ts)
            row[name] = {
                "ms": round(median * 1e3, 3),
                "gb_per_s": round(nbytes / median / 1e9, 1),
                "gmac_per_s": round(rows * macs / median / 1e9, 1),
            }
            if "onednn_prepacked" in times and name != "onednn_prepacked":
                ratios = [b / a for a, b in zip(ts, times["onednn_prepacked"])]
                row[name]["vs_onednn_prepacked"] = round(statistics.median(ratios), 3)
        summary[str(rows)] = row
        print(
            f"{rows} rows: " + ", ".join(f"{n} {v['ms']} ms ({v['gb_per_s']} GB/s)" for n, v in row.items()), flush=True
        )
    print(
        json.dumps(
            {
                "preset": args.preset,
                "threads": torch.get_num_threads(),
                "weight_bytes": nbytes,
                "rounds": args.rounds,
                "rows": summary,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
