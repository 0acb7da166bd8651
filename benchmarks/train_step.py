"""Training throughput: forward + backward + AdamW step, tokens/s, MFU and peak memory, vs transformers' Qwen3-MoE.

    python benchmarks/train_step.py                                   # all three models, seq 2048, batch 8
    python benchmarks/train_step.py --presets moe-1b --precisions amp # the issue's MFU figure alone
    python benchmarks/train_step.py --compile --presets moe-1b        # the same through torch.compile
    python benchmarks/train_step.py --presets moe-1b --profile 15     # and where its step's time goes
    python benchmarks/train_step.py --quick --device cpu              # tiny shapes on CPU (seconds)

One step = forward with the loss (cross-entropy, logits upcast to float32, as both libraries compute it),
backward, gradient clipping at 1.0, AdamW (fused; nanoseek's `build_optimizers` with
optimizer="adamw" for both sides), zero_grad. Random weights, random token ids, no download.

Models (--presets, comma-separated):
  * a nanoseek preset (`small-moe`, `moe-1b`, ...): nanoseek only, trained as `nanoseek pretrain` trains it
    (float32 master weights, the balancing-bias optimizer hook);
  * `qwen3-moe-1.3b`: the issue's peer shape, 1.31B total / 0.25B active (hidden 1024, 12 layers, 16 heads /
    4 kv heads of 64, 64 experts of width 512, top-8, all layers MoE, vocab 32768, untied, QK-norm). It is
    written once as a Hugging Face config; transformers builds `Qwen3MoeForCausalLM` from it and nanoseek
    builds its model from the same dict through `nanoseek.interop.hf_config` (no balancing bias, like
    Qwen3-MoE), so both sides train the same architecture with the same parameter count.

Precisions (--precisions): `amp` = float32 weights and optimizer under the autocast of the nanoseek trainer
(`nanoseek.precision`: bf16 on CUDA and on CPUs with AVX-512 BF16 or AMX, none elsewhere, where `amp` is plain
float32), for both sides (transformers' Trainer with bf16=True autocasts the same way). `bf16` = bf16 weights
and AdamW states, no autocast. The JSON says per run how nanoseek's first MoE layer ran its routed experts
(`moe_experts`: "grouped kernel", torch._grouped_mm, on CUDA with bf16 activations at the MoE input; "float32
kernel", nanoseek's CPU forward and backward operations, `MoE.uses_float32_kernel`; else "padded bmm"), in which
dtype (`moe_input_dtype`), and which experts implementation transformers used.

The process keeps freed memory for reuse, as the `nanoseek` command does (`nanoseek.host`: glibc's thresholds,
process-wide, so for both sides; `malloc_keeps_freed` in the JSON).

Timing: --warmup untimed steps (the first compiles with --compile), then --steps steps, each bracketed by
CUDA events on CUDA (host clock elsewhere). tokens/s = batch x seq-len / median step time. With --rounds R
(default 6 with --quick, else 1) the peer shape runs R times per side, alternately (ABBA), each from fresh
weights; its rows are each side's median round (`step_ms_rounds` beside), and `speedup_vs_transformers` is
the median of the rounds' ratios (`speedup_rounds`). MFU =
flops_per_token(seq-len) (nanoseek's accounting: 6 x active matmul parameters + attention, the same for
both sides of the peer shape) x tokens/s / peak dense bf16 FLOP/s of the GPU (by name; --peak-tflops
otherwise). Peak memory: torch.cuda.max_memory_allocated from the model's build to the last step. A run
that runs out of memory is reported as such and the next one starts. With --profile N each run then profiles one
more step: its N costliest kernels (CUDA) or operations (CPU) go to stderr and into its row (`profile`), with
`device_busy` on CUDA: the kernels' time over the median step (under 1: the host's launches set the pace).
After each model and precision a JSON line with every figure so far ("complete": false), so a run cut by a
timeout still ends with one; the last line is the whole, with "complete": true.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch
from torch.autograd import DeviceType

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanoseek.config import TrainConfig
from nanoseek.host import keep_freed_memory
from nanoseek.interop.hf_config import hf_config_to_model_config
from nanoseek.loading import pick_device
from nanoseek.model import PRESETS, ModelConfig, Transformer, get_preset, install_balancing_hook
from nanoseek.model import moe as moe_mod
from nanoseek.precision import autocast_dtype, cpu_bf16_instructions
from nanoseek.train.loop import peak_flops
from nanoseek.train.optim import build_optimizers

PEER = "qwen3-moe-1.3b"
# The Qwen3-MoE shape, as a transformers config.json. moe_intermediate_size 512 puts the total at 1.31B.
QWEN3_MOE_SHAPE = dict(
    architectures=["Qwen3MoeForCausalLM"],
    model_type="qwen3_moe",
    vocab_size=32768,
    hidden_size=1024,
    intermediate_size=3072,  # dense MLP width: unused, every layer is MoE
    num_hidden_layers=12,
    num_attention_heads=16,
    num_key_value_heads=4,
    head_dim=64,
    num_experts=64,
    num_experts_per_tok=8,
    moe_intermediate_size=512,
    norm_topk_prob=True,
    decoder_sparse_step=1,
    mlp_only_layers=[],
    max_position_embeddings=2048,
    rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 1e6},
    tie_word_embeddings=False,
    hidden_act="silu",
    attention_bias=False,
    use_sliding_window=False,
    output_router_logits=False,
)
# --quick: every model shrunk to this (expert counts and top-k kept), seq 64, batch 2.
QUICK_SHAPE = dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=0, d_ff=128, moe_d_ff=32)
QUICK_HF = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    moe_intermediate_size=32,
)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def peak_tflops(device: torch.device, flag: float | None) -> tuple[float | None, str]:
    """(dense bf16 peak FLOP/s, where it came from)."""
    if flag:
        return flag * 1e12, "--peak-tflops"
    if device.type != "cuda":
        return None, "no peak on CPU"
    name = torch.cuda.get_device_name(device)
    value = peak_flops(device)
    return value, ("table (nanoseek.train.loop.PEAK_FLOPS)" if value else f"unknown GPU {name!r}: pass --peak-tflops")


def peer_hf_dict(seq_len: int, quick: bool) -> dict:
    hf = dict(QWEN3_MOE_SHAPE, max_position_embeddings=seq_len)
    return dict(hf, **QUICK_HF) if quick else hf


def nanoseek_config(name: str, seq_len: int, quick: bool) -> ModelConfig:
    if name == PEER:
        # No balancing bias: Qwen3-MoE routes by plain softmax top-k, and so does this model then.
        return hf_config_to_model_config(peer_hf_dict(seq_len, quick)).replace(bias_update_rate=0.0)
    cfg = get_preset(name, max_seq_len=max(seq_len, get_preset(name).max_seq_len))
    return cfg.replace(**QUICK_SHAPE) if quick else cfg


def build_hf(seq_len: int, quick: bool, device: torch.device, experts_impl: str | None):
    import transformers

    kwargs = {k: v for k, v in peer_hf_dict(seq_len, quick).items() if k != "model_type"}
    if experts_impl:
        kwargs["experts_implementation"] = experts_impl
    config = transformers.Qwen3MoeConfig(**kwargs)
    with torch.device(device):
        model = transformers.Qwen3MoeForCausalLM(config)
    impl = getattr(model.config, "_experts_implementation", None)
    return model, dict(
        transformers_version=transformers.__version__,
        experts_implementation=impl,
        attn_implementation=getattr(model.config, "_attn_implementation", None),
    )


def moe_input_probe(model: torch.nn.Module) -> dict:
    """Records how the first nanoseek MoE layer runs its routed experts and in which dtype."""
    seen: dict = {}
    layers = moe_mod.moe_layers(model)
    if layers:

        def hook(module, args):
            x = args[0]
            flat = x.reshape(-1, x.shape[-1])
            dtype = x.dtype
            if torch.is_autocast_enabled(x.device.type):  # the experts cast to the autocast dtype
                dtype = torch.get_autocast_dtype(x.device.type)
            if module.uses_float32_kernel(flat, module.cfg.top_k):
                seen.update(dtype=x.dtype, experts="float32 kernel")
            else:
                grouped = module.uses_grouped_kernel(flat, dtype)
                seen.update(dtype=dtype, experts="grouped kernel" if grouped else "padded bmm")

        layers[0].register_forward_pre_hook(hook)
    return seen


def run_one(model_name: str, impl: str, precision: str, args, device: torch.device, peak: float | None) -> dict:
    """Build, warm up and time one (model, implementation, precision); the row of the results table."""
    quick, seq, batch = args.quick, args.seq_len, args.batch_size
    cfg = nanoseek_config(model_name, seq, quick)
    with torch.device("meta"):
        meta = Transformer(cfg)
    flops_per_token = meta.flops_per_token(seq)
    row: dict = dict(
        model=model_name,
        impl=impl,
        precision=precision,
        batch=batch,
        seq_len=seq,
        params=meta.num_params(),
        active_params=meta.num_active_params(),
        flops_per_token=flops_per_token,
    )
    del meta
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    amp_dtype = autocast_dtype(device) if precision == "amp" else None
    param_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    tcfg = TrainConfig(optimizer="adamw", lr=1e-4, weight_decay=0.1, grad_clip=1.0)

    if impl == "nanoseek":
        with torch.device(device):
            model = Transformer(cfg)
        model.to(param_dtype).train()
        optimizers = build_optimizers(model, tcfg, device)
        if cfg.is_moe and cfg.bias_update_rate > 0:
            install_balancing_hook(optimizers[-1], model)
        probe = moe_input_probe(model)
    else:
        model, info = build_hf(seq, quick, device, args.hf_experts)
        model.to(param_dtype).train()
        row.update(info)
        row["hf_params"] = sum(p.numel() for p in model.parameters())
        optimizers = build_optimizers(model, tcfg, device)
        probe = {}
    # nanoseek: compile the loss method itself (forward + cross-entropy in one graph); compiling the module and
    # calling `.loss` on the wrapper would run the original, uncompiled forward.
    if impl == "nanoseek":
        forward_loss = moe_mod.compile_model(model.loss) if args.compile else model.loss
    else:
        forward_loss = torch.compile(model) if args.compile else model

    gen = torch.Generator().manual_seed(0)
    vocab = cfg.vocab_size
    batches = [torch.randint(0, vocab, (batch, seq + 1), generator=gen).to(device) for _ in range(2)]

    def step(i: int) -> torch.Tensor:
        ids = batches[i % len(batches)]
        with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext():
            if impl == "nanoseek":
                ce, aux = forward_loss(ids[:, :-1], ids[:, 1:])
                loss = ce + aux
            else:
                # transformers shifts the labels itself: seq-1 predicted tokens per row (nanoseek: seq).
                loss = forward_loss(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
        for opt in optimizers:
            opt.step()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        return loss.detach()

    losses = []
    t_warm = time.perf_counter()
    for i in range(args.warmup):
        losses.append(step(i))
    sync(device)
    row["warmup_s"] = round(time.perf_counter() - t_warm, 2)
    times: list[float] = []
    events = []
    for i in range(args.steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            losses.append(step(args.warmup + i))
            end.record()
            events.append((start, end))
        else:
            t0 = time.perf_counter()
            losses.append(step(args.warmup + i))
            times.append(time.perf_counter() - t0)
    sync(device)
    if events:
        times = [s.elapsed_time(e) / 1e3 for s, e in events]
    loss_values = torch.stack(losses).float().tolist()
    median = statistics.median(times)
    tokens = batch * seq
    row.update(
        step_ms=round(1e3 * median, 2),
        step_ms_mean=round(1e3 * statistics.mean(times), 2),
        step_ms_min=round(1e3 * min(times), 2),
        tokens_per_s=round(tokens / median, 1),
        achieved_tflops=round(flops_per_token * tokens / median / 1e12, 2),
        mfu=round(flops_per_token * tokens / median / peak, 4) if peak else None,
        peak_mem_gb=round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
        loss_first=round(loss_values[0], 4),
        loss_last=round(loss_values[-1], 4),
        finite=all(v == v and abs(v) != float("inf") for v in loss_values),
    )
    if probe:
        row["moe_input_dtype"] = str(probe["dtype"]).removeprefix("torch.")
        row["moe_experts"] = probe["experts"]
        row["moe_grouped_kernel"] = probe["experts"] == "grouped kernel"
    if args.profile:
        row["profile"] = profile_step(partial(step, args.warmup + args.steps), device, args.profile, median)
        print_profile(f"{model_name} {impl} {precision}", row["profile"])
    return row


def profile_step(step: Callable[[], object], device: torch.device, top: int, step_s: float) -> dict:
    """One more step under torch.profiler: the `top` entries by their own time (on CUDA the kernels' device time,
    elsewhere the operations' CPU time), each with its share of the total, and on CUDA how much of a timed step
    the kernels fill (`device_busy`: kernel time over the median step; well under 1 means the host's launches,
    not the GPU, set the pace)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync(device)
    with profile(activities=activities) as prof:
        step()
        sync(device)

    def own_us(e) -> float:
        return e.self_device_time_total if cuda else e.self_cpu_time_total

    events = [e for e in prof.key_averages() if own_us(e) > 0 and (not cuda or is_device_work(e))]
    total_us = sum(own_us(e) for e in events)
    ranked = sorted(events, key=own_us, reverse=True)[:top]
    out: dict = dict(
        kind="kernels, own device time" if cuda else "operations, own CPU time",
        total_ms=round(total_us / 1e3, 2),
        top=[
            dict(name=e.key[:100], ms=round(own_us(e) / 1e3, 3), share=round(own_us(e) / total_us, 4), calls=e.count)
            for e in ranked
        ],
    )
    if cuda:
        out["device_busy"] = round(total_us / 1e6 / step_s, 3)
    return out


# Device-side entries that are not work: CUPTI's overhead records, which span the time a launch waited.
PROFILER_OVERHEAD = ("Command Buffer Full",)


def is_device_work(e) -> bool:
    """Whether a profiler entry is a kernel, copy or memset on the device. An operator (aten::mm) carries the
    device time of the kernels it launched, so counting both counted every kernel twice (the first H200 run
    showed kernels "filling" 200% of a step); a GPU user annotation (Optimizer.step#AdamW.step) spans kernels
    counted on their own."""
    return (
        e.device_type != DeviceType.CPU
        and not getattr(e, "is_user_annotation", False)
        and e.key not in PROFILER_OVERHEAD
    )


def print_profile(title: str, prof: dict) -> None:
    busy = f", kernels fill {100 * prof['device_busy']:.0f}% of a step" if "device_busy" in prof else ""
    print(f"  profile of one {title} step ({prof['kind']}: {prof['total_ms']:.1f} ms{busy}):", file=sys.stderr)
    for e in prof["top"]:
        print(f"    {100 * e['share']:5.1f}% {e['ms']:9.3f} ms {e['calls']:6d}x  {e['name']}", file=sys.stderr)


def count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def print_table(rows: list[dict]) -> None:
    head = (
        f"{'model':<16} {'impl':<13} {'prec':<5} {'params':>8} {'active':>8} {'step ms':>9} {'tok/s':>11} "
        f"{'TFLOP/s':>8} {'MFU':>7} {'peak GiB':>9}  notes"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        if "error" in r:
            print(f"{r['model']:<16} {r['impl']:<13} {r['precision']:<5} {r['error']}")
            continue
        mfu = f"{100 * r['mfu']:6.1f}%" if r.get("mfu") is not None else "      -"
        mem = f"{r['peak_mem_gb']:9.2f}" if r.get("peak_mem_gb") is not None else "        -"
        notes = []
        if "moe_experts" in r:
            notes.append(f"moe in {r['moe_input_dtype']}, {r['moe_experts']}")
        if r.get("experts_implementation"):
            notes.append(f"experts={r['experts_implementation']}")
        if not r["finite"]:
            notes.append("NON-FINITE LOSS")
        print(
            f"{r['model']:<16} {r['impl']:<13} {r['precision']:<5} {count(r['params']):>8} "
            f"{count(r['active_params']):>8} {r['step_ms']:9.1f} {r['tokens_per_s']:11,.0f} "
            f"{r['achieved_tflops']:8.1f} {mfu} {mem}  {'; '.join(notes)}"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--presets",
        default=f"small-moe,moe-1b,{PEER}",
        help=f"comma-separated nanoseek presets and/or {PEER} (the transformers peer shape)",
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--seq-len", type=int, default=None, help="default 2048 (--quick: 64)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per step (default 8; --quick: 2)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10; --quick: 20)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; --quick: 3)")
    p.add_argument("--precisions", default=None, help="comma-separated amp,bf16 (default: both on CUDA, amp on CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile both models (warmup covers compilation)")
    p.add_argument("--no-hf", action="store_true", help=f"skip transformers' model on {PEER}")
    p.add_argument(
        "--hf-experts",
        default=None,
        help="transformers experts_implementation (eager, batched_mm, grouped_mm; default: its own)",
    )
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the GPU, for MFU")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--quick", action="store_true", help="tiny shapes (d_model 64, 2 layers), seq 64, batch 2")
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="after timing, profile one more step of each run: its N costliest kernels (CUDA) or operations",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=None,
        help=f"run nanoseek and transformers on {PEER} alternately this many times, ABBA (default 1; --quick: 6)",
    )
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    kept_freed = keep_freed_memory()  # as the `nanoseek` command does (nanoseek/host.py); for both sides
    args.seq_len = args.seq_len or (64 if args.quick else 2048)
    args.batch_size = args.batch_size or (2 if args.quick else 8)
    # --quick steps take milliseconds: 2 timed steps (as before 2026-12) gave ratios off by 2x on a shared machine.
    args.steps = args.steps or (20 if args.quick else 10)
    args.warmup = args.warmup if args.warmup is not None else 3
    # --quick runs take a second each: one pair of runs gave 0.87x-1.64x within minutes (docs/LOG.md, 2026-12-02).
    args.rounds = args.rounds if args.rounds is not None else (6 if args.quick else 1)
    if args.rounds < 1:
        p.error(f"--rounds {args.rounds}: must be >= 1")
    if args.profile < 0:
        p.error(f"--profile {args.profile}: must be >= 0 (0: no profile)")
    if args.compile and args.warmup < 1:
        p.error("--compile needs --warmup >= 1 (the first step compiles)")
    precisions = (args.precisions or ("amp,bf16" if device.type == "cuda" else "amp")).split(",")
    if not set(precisions) <= {"amp", "bf16"}:
        p.error(f"--precisions: amp and/or bf16, not {args.precisions!r}")
    names = [n.strip() for n in args.presets.split(",") if n.strip()]
    unknown = [n for n in names if n != PEER and n not in PRESETS]
    if unknown:
        p.error(f"--presets: unknown {', '.join(unknown)}; known: {', '.join(PRESETS)}, {PEER}")
    peak, peak_source = peak_tflops(device, args.peak_tflops)

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"train step on {device_name}: seq {args.seq_len} x batch {args.batch_size}, {args.warmup} warmup + "
        f"{args.steps} timed steps, precisions {','.join(precisions)} (amp autocasts to {autocast_dtype(device)})"
        f"{', compiled' if args.compile else ''}; "
        f"peak {peak / 1e12 if peak else '-'} TFLOP/s ({peak_source})",
        flush=True,
    )
    rows: list[dict] = []
    ratio_rounds: dict[str, list[float]] = {}
    failed = False

    def run_logged(name: str, impl: str, precision: str) -> dict:
        nonlocal failed
        try:
            row = run_one(name, impl, precision, args, device, peak)
        except torch.OutOfMemoryError as e:
            row = dict(model=name, impl=impl, precision=precision, error=f"OOM: {str(e).splitlines()[0]}")
        except Exception as e:  # report and go on: one broken configuration must not hide the rest
            row = dict(model=name, impl=impl, precision=precision, error=f"{type(e).__name__}: {e}")
            failed = True
        free_memory(device)
        if "error" in row:
            print(f"  {name} {impl} {precision}: {row['error']}", file=sys.stderr, flush=True)
        else:
            print(
                f"  {name} {impl} {precision}: {row['step_ms']:.1f} ms/step, {row['tokens_per_s']:,.0f} tok/s",
                file=sys.stderr,
                flush=True,
            )
        return row

    def summary(complete: bool) -> dict:
        # per precision, nanoseek tokens/s over transformers' on the peer shape (median of the rounds' ratios)
        speedups = {p: round(statistics.median(v), 3) for p, v in ratio_rounds.items() if v}
        return dict(
            benchmark="train_step",
            device=device_name,
            capability=".".join(map(str, torch.cuda.get_device_capability(device))) if device.type == "cuda" else None,
            torch=torch.__version__,
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            warmup=args.warmup,
            steps=args.steps,
            compile=args.compile,
            quick=args.quick,
            threads=torch.get_num_threads() if device.type == "cpu" else None,
            malloc_keeps_freed=kept_freed,
            amp_dtype=str(autocast_dtype(device)).removeprefix("torch."),
            cpu_bf16_instructions=cpu_bf16_instructions() if device.type == "cpu" else None,
            peak_tflops=peak / 1e12 if peak else None,
            peak_source=peak_source,
            results=rows,
            rounds=args.rounds,
            speedup_vs_transformers=speedups,
            speedup_rounds=ratio_rounds,
            complete=complete,
        )

    for name in names:
        impls = ["nanoseek"] + (["transformers"] if name == PEER and not args.no_hf else [])
        rounds = args.rounds if len(impls) == 2 else 1
        for precision in precisions:
            runs: dict[str, list[dict]] = {impl: [] for impl in impls}
            for r in range(rounds):  # ABBA: a machine whose speed drifts weighs on both sides alike
                for impl in impls if r % 2 == 0 else impls[::-1]:
                    runs[impl].append(run_logged(name, impl, precision))
            for impl in impls:
                ok = [row for row in runs[impl] if "error" not in row]
                if not ok:
                    rows.append(runs[impl][0])
                    continue
                row = sorted(ok, key=lambda x: x["step_ms"])[(len(ok) - 1) // 2]  # the median round's row
                if rounds > 1:
                    row["step_ms_rounds"] = [x["step_ms"] for x in runs[impl] if "error" not in x]
                rows.append(row)
            if len(impls) == 2:
                pairs = zip(runs["nanoseek"], runs["transformers"])
                ratio_rounds[precision] = [
                    round(b["step_ms"] / a["step_ms"], 3) for a, b in pairs if "error" not in a and "error" not in b
                ]
            # every figure so far: a run cut by a timeout (a slow compile) still ends with a JSON line
            print(json.dumps(summary(complete=False)), flush=True)

    print_table(rows)
    final = summary(complete=True)
    for precision, sp in final["speedup_vs_transformers"].items():
        print(f"{PEER} {precision}: nanoseek / transformers tokens/s = {sp:.2f}x")
    print(json.dumps(final))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
