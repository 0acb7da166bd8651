"""MoE layer forward+backward throughput: grouped GEMMs vs a loop over experts.

    python benchmarks/moe_layer.py                       # the issue's shape on CUDA bf16
    python benchmarks/moe_layer.py --device cpu --quick  # small shape, CPU float32
    python benchmarks/moe_layer.py --device cpu --quick --dtype bfloat16

"grouped" is the layer as it runs (torch._grouped_mm where the device and dtype have it: CUDA
bf16, CPU float32/bf16), "padded_bmm" the same layer on its fallback, "loop" a loop over experts.

TFLOP/s counts the expert GEMMs only (3 matmuls of D x F per routed token copy,
x3 for forward+backward), as the goal is stated. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanoseek.model import ModelConfig
from nanoseek.model import moe as moe_mod


class LoopMoE(torch.nn.Module):
    """The reference everyone starts from: mask the tokens of each expert, run it, scatter back."""

    def __init__(self, m: moe_mod.MoE) -> None:
        super().__init__()
        self.m = m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.m
        flat = x.reshape(-1, x.shape[-1])
        ids, weights, _ = m.router(flat)
        out = torch.zeros_like(flat)
        for e in range(m.cfg.n_routed_experts):
            token, slot = torch.where(ids == e)
            if token.numel() == 0:
                continue
            h = F.silu(flat[token] @ m.w1[e].T) * (flat[token] @ m.w3[e].T)
            out.index_add_(0, token, (h @ m.w2[e].T) * weights[token, slot, None])
        if m.shared is not None:
            out = out + m.shared(flat)
        return out.view_as(x)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_fwd_bwd(layer: torch.nn.Module, x: torch.Tensor, iters: int, warmup: int) -> float:
    device = x.device
    for _ in range(warmup):
        layer(x).float().pow(2).mean().backward()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        layer(x).float().pow(2).mean().backward()
    sync(device)
    return (time.perf_counter() - t0) / iters


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="bfloat16 (CUDA default) or float32 (CPU default)")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--d-model", type=int, default=2048)
    p.add_argument("--d-ff", type=int, default=1408)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=6)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; each implementation keeps its best")
    p.add_argument("--quick", action="store_true", help="small shape for a CPU smoke run")
    args = p.parse_args()
    if args.quick:
        args.tokens, args.d_model, args.d_ff, args.experts, args.top_k, args.iters = 1024, 256, 128, 16, 4, 3
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)

    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=8,
        d_model=args.d_model,
        n_heads=8,
        n_kv_heads=8,
        n_routed_experts=args.experts,
        n_shared_experts=0,
        moe_d_ff=args.d_ff,
        top_k=args.top_k,
        score_func="sigmoid",
    )
    layer = moe_mod.MoE(cfg)
    for prm in layer.parameters():
        torch.nn.init.normal_(prm, std=0.02)
    layer = layer.to(device=device, dtype=dtype).train()
    x = torch.randn(1, args.tokens, args.d_model, device=device, dtype=dtype, requires_grad=True)
    flops = 6 * args.tokens * args.top_k * 3 * args.d_model * args.d_ff

    # Implementations take turns over several rounds and each keeps its best round: on a shared
    # machine, running one after the other lets background load decide the comparison.
    impls: dict[str, tuple[torch.nn.Module, bool]] = {"grouped": (layer, True), "loop": (LoopMoE(layer), True)}
    if moe_mod._kernel_ok(x):  # "grouped" runs torch._grouped_mm: the loop-free fallback, for reference
        impls["padded_bmm"] = (layer, False)
    best: dict[str, float] = {}
    peak_mem: dict[str, float] = {}
    for _ in range(args.rounds):
        for name, (impl, use_kernel) in impls.items():
            moe_mod.USE_GROUPED_MM_KERNEL = use_kernel
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            s = time_fwd_bwd(impl, x, args.iters, warmup=2)
            best[name] = min(best.get(name, float("inf")), s)
            if device.type == "cuda":
                peak_mem[name] = torch.cuda.max_memory_allocated() / 2**30
    moe_mod.USE_GROUPED_MM_KERNEL = True
    results = {}
    for name, s in best.items():
        results[name] = dict(ms=1e3 * s, tokens_per_s=args.tokens / s, tflops=flops / s / 1e12)
        if name in peak_mem:
            results[name]["peak_mem_gb"] = peak_mem[name]

    print(
        f"MoE layer fwd+bwd on {device} {dtype}: tokens={args.tokens} D={args.d_model} F={args.d_ff} "
        f"E={args.experts} top-{args.top_k}"
    )
    for name, r in results.items():
        print(f"  {name:<11} {r['ms']:9.2f} ms  {r['tokens_per_s']:12,.0f} tok/s  {r['tflops']:8.2f} TFLOP/s")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        json.dumps(
            dict(
                benchmark="moe_layer",
                device=device_name,
                dtype=str(dtype).removeprefix("torch."),
                tokens=args.tokens,
                d_model=args.d_model,
                d_ff=args.d_ff,
                experts=args.experts,
                top_k=args.top_k,
                grouped_kernel=moe_mod._kernel_ok(x),  # "grouped" ran torch._grouped_mm (else the padded bmm)
                results=results,
                speedup_vs_loop=results["grouped"]["tokens_per_s"] / results["loop"]["tokens_per_s"],
            )
        )
    )


if __name__ == "__main__":
    main()
