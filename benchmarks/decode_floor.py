"""Is CPU decoding at its floor? nanoseek, transformers and the weight products alone, interleaved in one process.

    python benchmarks/decode_floor.py --preset small --batch-sizes 1,8 --new-tokens 64 --threads 2 --rounds 7
    python benchmarks/decode_floor.py --quick          # tiny, 2 rounds: a smoke run

A decode step of a dense model multiplies by every weight matrix once. The floor row is the rate a `generate` call
would reach if each of its steps cost only those products: every matrix a step multiplies by (each projection of
each block and the output layer), stacked into the fewest products (one per input width), through the fastest
product this torch and nanoseek have on this CPU (bf16 weights: oneDNN's prepacked kernel, called directly,
nanoseek's own few-rows kernel where it is built (`model.cpu_kernel`), and at one row also the product-sums inductor
compiles for the engine's one-row graph, the fastest in each round; float32: F.linear), on inputs of the batch's
rows; and the prefill's products the same way (the blocks' at batch x prompt rows, the output layer's at batch rows:
the first token's logits). Attention, norms, sampling and the host's work are free. Its tokens/s = batch x new
tokens / (the prefill's products + (new tokens - 1) x one step's products). With the products this torch and
nanoseek make, no implementation of the same weights in the same precision beats it on this machine at that
moment: where 3x the peer's rate is above it, a 3x goal is out of reach there (a faster way to make a product moves
the floor: the one-row product-sums did, 2026-12-03, and the few-rows kernel, 2026-12-04). The read floor is the
same rate with each step's products replaced by the fastest read of the step's weight bytes measured: one read with
no arithmetic (`read_once`) or, where faster, the products themselves (nanoseek's AMX product reads faster than
torch's reduction does); the prefill's products kept. No kernel can make a step's products faster than it reads
their weights, so an implementation of these weights in this precision beats the read floor on this machine at
that moment only by reading faster than anything here does.

Why interleaved: the 2-core VM's memory rate moves by up to 2x within minutes (`small`'s products at one row took
3.8 to 9.5 ms a step in one session), and the peer's and nanoseek's rates with it. Each round measures, for each
batch size, transformers' `generate` (dynamic and static cache, in nanoseek's dtype; the best of the two is "peer"),
nanoseek's engine (the compiled decode step, an engine per batch size, as `generate.py` runs it) and the products,
back to back, each timed call after an untimed one of its own, and every ratio is taken within a round; the
summary gives the median round and the range. The process keeps freed memory for reuse, as the `nanoseek` command
does (`nanoseek.host`; process-wide, so for all three).

Dense GQA presets only (a MoE step's bytes depend on its routing; transformers has no MLA peer here). The last line
is a JSON object: rounds, and per batch size the medians and ranges of tokens/s and of the ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.generate import batch_sizes_arg, check_engine, check_hf, hf_call, hf_model, warmup_calls
from nanoseek import precision
from nanoseek.engine import Engine, SamplingParams
from nanoseek.errors import InputError
from nanoseek.host import keep_freed_memory
from nanoseek.loading import describe_precision
from nanoseek.model import Transformer, cpu_kernel, get_preset
from nanoseek.model import linear as linear_mod
from nanoseek.model.config import ModelConfig
from nanoseek.model.linear import packing_available


def step_weights(model: Transformer) -> tuple[list[Tensor], Tensor]:
    """The weight matrices a decode step of a dense model multiplies by, each once: the blocks' projections and the
    output layer (a tied one is the embedding's matrix). Checked against the config's closed form, so a model that
    grows a projection this does not see fails here instead of flattering the floor."""
    output = model.output_weight
    blocks = [m.weight for m in model.modules() if isinstance(m, nn.Linear) and m.weight is not output]
    cfg: ModelConfig = model.cfg
    q, kv = cfg.n_heads * cfg.attn_head_dim, cfg.n_kv_heads * cfg.attn_head_dim
    expected = cfg.n_layers * (cfg.d_model * (2 * q + 2 * kv) + 3 * cfg.d_model * cfg.d_ff)
    found = sum(w.numel() for w in blocks)
    if found != expected or tuple(output.shape) != (cfg.vocab_size, cfg.d_model):
        raise RuntimeError(
            f"step_weights: {found} block weight elements found, the config's closed form says {expected}"
        )
    return blocks, output


def products(weights: list[Tensor], rows: int) -> list[Callable[[], None]]:
    """One step's products alone, at `rows` rows: the ways to make them, each a function to time (the floor takes
    the fastest in each round). The weights that share an input width are stacked into one matrix (`small`: two
    products a step, where the engine makes 49 and a plain model 85): fewer, larger products were the fastest
    arrangement measured (at one row 4.6 ms a step against 5.3 for the engine's stacking and 5.9 for one product a
    matrix), so the floor errs on the fast side. The ways: the library's product (bf16: oneDNN's prepacked kernel,
    called directly; float32: F.linear), nanoseek's few-rows kernel for bf16 weights where it is built, and, at one
    row of bf16 weights, the product-sums the engine's one-row graph compiles (`model.linear`: inductor streams each
    weight once, faster than oneDNN at one row). Each product is checked once against F.linear in float32."""
    packable = packing_available()  # as the engine's `linear` decides
    by_width: dict[int, list[Tensor]] = {}
    for w in weights:
        by_width.setdefault(w.shape[1], []).append(w.detach())
    library: list[Callable[[], Tensor]] = []
    pairs: list[tuple[Tensor, Tensor]] = []
    for group in by_width.values():
        w = torch.cat(group)
        x = torch.randn(rows, w.shape[1], dtype=w.dtype)
        if packable and w.dtype == torch.bfloat16:
            packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
            step = partial(torch.ops.mkldnn._linear_pointwise, x, packed, None, "none", [], "")
        else:
            step = partial(F.linear, x, w)
        check_product(step(), x, w)
        library.append(step)
        pairs.append((x, w))

    def run_library() -> None:
        for step in library:
            step()

    runs = [run_library]
    bf16 = all(w.dtype == torch.bfloat16 for _, w in pairs)
    if bf16 and all(cpu_kernel.fits(w) for _, w in pairs) and cpu_kernel.available():
        ours = [partial(cpu_kernel.product, x, cpu_kernel.pack(w)) for x, w in pairs]
        for (x, w), step in zip(pairs, ours):
            check_product(step(), x, w)
        runs.append(lambda: [step() for step in ours])
    if rows == 1 and bf16:
        summed = torch.compile(lambda: [linear_mod._summed_products(x, [w], [])[0] for x, w in pairs])
        for (x, w), y in zip(pairs, summed()):
            check_product(y, x, w)
        runs.append(summed)
    return runs


def read_once(weights: list[Tensor]) -> Callable[[], None]:
    """The step's weight bytes read once, with no arithmetic: every matrix's bytes in one buffer, reduced by an int32
    max (the fastest whole read of torch's measured: 29-30 GB/s over 201 MB on the Xeon, against 28 for a float32 sum
    and 24 for a float32 max; nanoseek's AMX product reads about as fast, sometimes faster)."""
    buffer = torch.cat([w.detach().reshape(-1) for w in weights])
    if buffer.numel() * buffer.element_size() % 4:
        buffer = torch.cat([buffer, buffer.new_zeros(1)])
    words = buffer.view(torch.uint8).view(torch.int32)
    return partial(torch.amax, words)


def check_product(y: Tensor, x: Tensor, w: Tensor) -> None:
    want = F.linear(x.float(), w.float())
    if not torch.allclose(y.float(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item()):
        raise RuntimeError(f"products: the {tuple(w.shape)} product differs from F.linear")


def spread(values: list[float]) -> dict[str, float]:
    return dict(median=round(statistics.median(values), 2), min=round(min(values), 2), max=round(max(values), 2))


def seconds(fn: Callable[[], object], calls: int = 1) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default=None, help="a dense GQA preset (default small; --quick: tiny)")
    p.add_argument("--batch-sizes", default=None, help="comma-separated (default 1,8; --quick: 1,4)")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=None, help="default 64 (--quick: 16)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 7; --quick: 2)")
    p.add_argument("--product-calls", type=int, default=10, help="steps of products timed per round (their mean)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--quick", action="store_true", help="tiny shapes, 2 rounds: a smoke run")
    args = p.parse_args(argv)
    preset = args.preset or ("tiny" if args.quick else "small")
    batch_sizes = batch_sizes_arg(p, args.batch_sizes or ("1,4" if args.quick else "1,8"))
    new_tokens = (16 if args.quick else 64) if args.new_tokens is None else args.new_tokens
    rounds = (2 if args.quick else 7) if args.rounds is None else args.rounds
    for flag, value, least in (
        ("--prompt-len", args.prompt_len, 1),
        ("--new-tokens", new_tokens, 2),  # the floor's steps are new tokens - 1
        ("--rounds", rounds, 1),
        ("--product-calls", args.product_calls, 1),
    ):
        if value < least:
            p.error(f"{flag} {value}: must be >= {least}")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads {args.threads}: must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    kept_freed = keep_freed_memory()  # as the `nanoseek` command and generate.py do
    try:
        cfg = get_preset(preset, max_seq_len=max(args.prompt_len + new_tokens, get_preset(preset).max_seq_len))
    except InputError as e:
        p.error(f"--preset: {e}")
    if cfg.is_moe or cfg.attn_type != "gqa":
        p.error(f"--preset {preset}: dense GQA presets only (a MoE step's bytes depend on its routing)")

    device = torch.device("cpu")
    torch.manual_seed(0)
    model = Transformer(cfg)
    dtype = precision.inference_dtype(device, model.num_params())
    model = model.to(dtype).eval()
    print(describe_precision(model, device, "auto"), flush=True)
    blocks, output = step_weights(model)
    weights = [*blocks, output]
    weight_bytes = sum(w.numel() * w.element_size() for w in weights)
    print(f"{preset}: {len(weights)} weight matrices, {weight_bytes / 1e6:.1f} MB read per step", flush=True)
    hf = hf_model(cfg, device, dtype)
    # An engine per batch size, all of the same size, as generate.py has: a lone sequence keeps its own graph.
    engines = {
        b: Engine(model, max_batch=max(batch_sizes), max_seq_len=args.prompt_len + new_tokens, compile=True)
        for b in batch_sizes
    }
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
    prompts = torch.randint(0, cfg.vocab_size, (max(batch_sizes), args.prompt_len))
    steps = {b: products(weights, b) for b in batch_sizes}
    read = read_once(weights)
    prefills = {b: (products(blocks, b * args.prompt_len), products([output], b)) for b in batch_sizes}

    peers = {(b, cache): hf_call(hf, prompts[:b], new_tokens, cache) for b in batch_sizes for cache in (None, "static")}

    def peer(batch: int, cache: str | None) -> None:
        check_hf(peers[batch, cache](), length=args.prompt_len + new_tokens)

    def ours(batch: int) -> None:
        check_engine(engines[batch].generate(prompts[:batch].tolist(), params), new_tokens)

    def warm_seconds(fn: Callable[[], object]) -> float:
        """Seconds of one call of fn, after an untimed one (its own steady state, not the last call's)."""
        fn()
        return seconds(fn)

    with torch.inference_mode():
        start = time.perf_counter()
        for b in batch_sizes:  # warm-up: compiles; a lone sequence gets its own graph
            for _ in range(warmup_calls(engines[b], b, new_tokens)):
                ours(b)
            peer(b, None), peer(b, "static")
            for run in (*steps[b], *prefills[b][0], *prefills[b][1]):
                run()
        compiling = all(e.compiling for e in engines.values())
        print(f"warm-up {time.perf_counter() - start:.1f} s; compiled: {compiling}", flush=True)
        measured = []
        for r in range(rounds):
            for b in batch_sizes:
                tokens = b * new_tokens
                peer_rate = max(tokens / warm_seconds(partial(peer, b, cache)) for cache in (None, "static"))
                ours_rate = tokens / warm_seconds(partial(ours, b))
                step_s = min(seconds(run, args.product_calls) for run in steps[b])
                prefill_s = sum(min(warm_seconds(run) for run in runs) for runs in prefills[b])
                floor_rate = tokens / (prefill_s + (new_tokens - 1) * step_s)
                # A product reads its weights too: where one is faster than the plain read, it is the faster read.
                read_s = min(seconds(read, args.product_calls), step_s)
                read_rate = tokens / (prefill_s + (new_tokens - 1) * read_s)
                row = dict(
                    round=r,
                    batch=b,
                    peer=round(peer_rate, 1),
                    nanoseek=round(ours_rate, 1),
                    floor=round(floor_rate, 1),
                    products_ms=round(step_s * 1e3, 3),
                    prefill_products_ms=round(prefill_s * 1e3, 2),
                    gb_per_s=round(weight_bytes / step_s / 1e9, 1),
                    read_floor=round(read_rate, 1),
                    read_ms=round(read_s * 1e3, 3),
                    read_gb_per_s=round(weight_bytes / read_s / 1e9, 1),
                )
                measured.append(row)
                print(
                    f"round {r} batch {b:>3}: transformers {peer_rate:8.1f}  nanoseek {ours_rate:8.1f} "
                    f"({ours_rate / peer_rate:.2f}x)  floor {floor_rate:8.1f} ({floor_rate / peer_rate:.2f}x the peer: "
                    f"products {step_s * 1e3:.2f} ms a step, {row['gb_per_s']} GB/s, the prefill's "
                    f"{prefill_s * 1e3:.1f} ms)  read floor {read_rate:8.1f} ({read_rate / peer_rate:.2f}x: "
                    f"{read_s * 1e3:.2f} ms, {row['read_gb_per_s']} GB/s)",
                    flush=True,
                )

    summary: dict[str, dict] = {}
    for b in batch_sizes:
        rows = [m for m in measured if m["batch"] == b]

        summary[str(b)] = dict(
            peer_tokens_per_s=spread([m["peer"] for m in rows]),
            nanoseek_tokens_per_s=spread([m["nanoseek"] for m in rows]),
            floor_tokens_per_s=spread([m["floor"] for m in rows]),
            nanoseek_over_peer=spread([m["nanoseek"] / m["peer"] for m in rows]),
            floor_over_peer=spread([m["floor"] / m["peer"] for m in rows]),
            nanoseek_over_floor=spread([m["nanoseek"] / m["floor"] for m in rows]),
            read_floor_tokens_per_s=spread([m["read_floor"] for m in rows]),
            read_floor_over_peer=spread([m["read_floor"] / m["peer"] for m in rows]),
            nanoseek_over_read_floor=spread([m["nanoseek"] / m["read_floor"] for m in rows]),
        )
        over_peer = summary[str(b)]["floor_over_peer"]
        print(
            f"batch {b:>3}: nanoseek / peer {summary[str(b)]['nanoseek_over_peer']['median']:.2f}x, floor / peer "
            f"{over_peer['median']:.2f}x ({over_peer['min']:.2f}-{over_peer['max']:.2f}), "
            f"nanoseek / floor {summary[str(b)]['nanoseek_over_floor']['median']:.2f}, read floor / peer "
            f"{summary[str(b)]['read_floor_over_peer']['median']:.2f}x (median rounds)",
            flush=True,
        )
    result = dict(
        preset=preset,
        dtype=str(dtype).removeprefix("torch."),
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        malloc_keeps_freed=kept_freed,
        prompt_len=args.prompt_len,
        new_tokens=new_tokens,
        weight_matrices=len(weights),
        weight_bytes=weight_bytes,
        rounds=measured,
        summary=summary,
    )
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
