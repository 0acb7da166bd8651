"""Generation throughput: the nanoseek engine vs Hugging Face transformers' `generate`.

    python benchmarks/generate.py                      # preset small, batch 1/32/128, 64 + 256 tokens
    python benchmarks/generate.py --preset small-moe
    python benchmarks/generate.py --quick --device cpu # a smoke run with tiny shapes
    OMP_NUM_THREADS=2 python benchmarks/generate.py --device cpu --preset tiny --batch-sizes 1,64 --threads 2

Every sequence is forced to full length (ignore_eos / no eos), greedy, random weights and
random prompts. transformers gets the equivalent architecture built from a config, random
weights, same shapes: LlamaForCausalLM (no QK-norm), Qwen3ForCausalLM (QK-norm), or
Qwen2MoeForCausalLM for MoE presets (routed + shared experts, first layers dense; it has no
QK-norm, softmax routing and a d_model-wide shared-expert gate per layer, which cost about
the same). It runs with its default dynamic cache and with cache_implementation="static"
(on CUDA, transformers compiles the static-cache decode step itself: slow to warm up, so last).
Each configuration runs once to warm up (CUDA graph capture, compilation; nanoseek's batch of one on CPU until
its own graph is compiled, `engine.compiled.ONE_ROW_GRAPH_AFTER`), then `--repeats` rounds (default 3): each
round times one call of every configuration, nanoseek's and transformers' alike, the order reversed every other
round; on a CPU each timed call follows an untimed one of the same configuration, so it runs in its own steady
state (caches warm with its weights), not in the state the other configuration's call left. On CUDA each
configuration's first round is timed right after its warm-up, with a JSON line after it (a run cut during a later
configuration's slow warm-up still reports the earlier ones; a GPU's speed does not drift as the CPU's does).
A row reports its median call; `vs_best_transformers` is, per batch size, the median over rounds of
nanoseek's rate over the best transformers configuration's in the same round (`vs_best_transformers_rounds`
lists them). Rounds, because the speed of a shared 2-core VM drifts by up to 2x within minutes, and timing one
side's calls minutes after the other's moved the ratio with it (docs/LOG.md, 2026-12-03, fifteenth session).
Output tokens/s = batch x new tokens / wall time of the whole call (prefill included).

Precision: nanoseek runs `--dtype` (auto: nanoseek.precision's choice, printed at the start: bf16
on CUDA, and on a CPU with native bf16 for models large enough to gain; else float32).
transformers runs every dtype of `--hf-dtypes` (default on CPU: float32 and nanoseek's dtype), so
its best setting is among the rows; `vs_best_transformers` in the summary divides nanoseek's
tokens/s by the best transformers row at each batch size. On CPU nanoseek decodes through its
torch.compile'd step (`--compile on`, the default; the warm-up run compiles, `warmup_s` shows it).
The process keeps freed memory for reuse, as the `nanoseek` command does (`nanoseek.host`; process-wide, so for
both sides; `malloc_keeps_freed` in the summary).
Peak memory: torch.cuda.max_memory_allocated per run on CUDA (after reset_peak_memory_stats:
weights, KV cache, graph pools and the run's activations); on CPU, the process's peak resident
set size (it only grows). `cuda_graphs` (per nanoseek row and in the summary) says whether the
engine's decode steps replayed CUDA graphs, and if not, why (`disabled_reason`).

After the warm-ups and after every round a JSON line with every figure so far is printed ("complete": false),
so a run cut by a timeout still ends with one; the last line has "complete": true. A configuration
that fails (out of memory, an unsupported option) goes to "errors" and the others run on.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanoseek import precision
from nanoseek.engine import Engine, SamplingParams, compiled
from nanoseek.errors import InputError
from nanoseek.host import keep_freed_memory
from nanoseek.loading import describe_precision
from nanoseek.model import ModelConfig, Transformer, get_preset


def hf_model(cfg: ModelConfig, device: torch.device, dtype: torch.dtype):
    """The transformers model with our preset's shapes (random weights, built offline)."""
    import transformers

    common = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
    )
    if cfg.attn_type != "gqa":
        raise ValueError("the transformers comparison covers GQA presets only")
    if cfg.is_moe:
        config = transformers.Qwen2MoeConfig(
            **common,
            intermediate_size=cfg.d_ff,
            num_experts=cfg.n_routed_experts,
            num_experts_per_tok=cfg.top_k,
            moe_intermediate_size=cfg.moe_d_ff,
            shared_expert_intermediate_size=cfg.shared_hidden,
            decoder_sparse_step=1,
            mlp_only_layers=list(range(cfg.first_k_dense)),
            norm_topk_prob=cfg.norm_topk_prob,
            qkv_bias=cfg.qkv_bias,
        )
        cls = transformers.Qwen2MoeForCausalLM
    elif cfg.qk_norm:
        config = transformers.Qwen3Config(
            **common, intermediate_size=cfg.d_ff, head_dim=cfg.attn_head_dim, attention_bias=cfg.qkv_bias
        )
        cls = transformers.Qwen3ForCausalLM
    else:
        config = transformers.LlamaConfig(
            **common, intermediate_size=cfg.d_ff, head_dim=cfg.attn_head_dim, attention_bias=cfg.qkv_bias
        )
        cls = transformers.LlamaForCausalLM
    with torch.device(device):
        model = cls(config)
    return model.to(dtype).eval()


def batch_sizes_arg(parser: argparse.ArgumentParser, text: str) -> list[int]:
    """--batch-sizes as positive integers; otherwise the parser's one-line error (exit 2)."""
    try:
        sizes = [int(b) for b in text.split(",")]
    except ValueError:
        parser.error(f"--batch-sizes {text!r}: expected comma-separated integers")
    if min(sizes) < 1:
        parser.error(f"--batch-sizes {text!r}: every batch size must be >= 1")
    return sizes


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Contestant:
    """One configuration (an implementation at a batch size): its call, the check of its output, its timings."""

    impl: str
    batch: int
    call: Callable[[], object]
    check: Callable[[object], None]
    extra: dict
    times: list[float] = field(default_factory=list)
    peak_mb: float = 0.0
    failed: bool = False


def timed_call(c: Contestant, device: torch.device) -> tuple[float, float]:
    """(seconds, peak memory MiB) of one call of c, its output checked."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    start = time.perf_counter()
    out = c.call()
    sync(device)
    elapsed = time.perf_counter() - start
    c.check(out)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return elapsed, peak


def warmup_calls(engine: Engine, batch: int, new_tokens: int) -> int:
    """Untimed calls that bring an engine to its steady state at this batch size: one, or for a single sequence
    on a compiling CPU engine enough to pass ONE_ROW_GRAPH_AFTER steps in a row (it then gets its own graph)."""
    steps = compiled.ONE_ROW_GRAPH_AFTER + 1 if batch == 1 and engine.compile_after is not None else 0
    return 1 + -(-steps // new_tokens)


def hf_call(hf, ids: torch.Tensor, new_tokens: int, cache: str | None) -> Callable[[], torch.Tensor]:
    """transformers' `generate` as the peer runs: greedy, exactly new_tokens new tokens, its default dynamic cache
    or `cache` ("static")."""
    kwargs = dict(
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
    )
    if cache:
        kwargs["cache_implementation"] = cache
    return partial(hf.generate, ids, **kwargs)


def check_engine(out, new_tokens: int) -> None:
    if not all(len(c[0].token_ids) == new_tokens for c in out):
        raise RuntimeError("a sequence stopped early")


def check_hf(out, length: int) -> None:
    if out.shape[1] != length:
        raise RuntimeError("a sequence stopped early")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default=None, help="small (default) or small-moe; tiny / tiny-moe with --quick")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-sizes", default=None, help="comma-separated (default 1,32,128; --quick: 1,4,16)")
    p.add_argument("--prompt-len", type=int, default=None, help="default 64 (--quick: 16)")
    p.add_argument("--new-tokens", type=int, default=None, help="default 256 (--quick: 32)")
    p.add_argument("--quick", action="store_true", help="small shapes for a CPU smoke run")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers baselines")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (one call of every configuration each)")
    p.add_argument("--dtype", default="auto", help="nanoseek's weights: auto (nanoseek.precision), float32, bfloat16")
    p.add_argument("--hf-dtypes", default=None, help="transformers' weights, comma-separated (default: see above)")
    p.add_argument(
        "--compile", choices=["on", "off", "auto"], default="on", help="CPU: nanoseek's compiled decode step"
    )
    p.add_argument(
        "--eager-too",
        action="store_true",
        help="CUDA: also time the engine without CUDA graphs (what they buy; slow: ~60 ms a step at small on an H200)",
    )
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats {args.repeats}: must be >= 1")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads {args.threads}: must be >= 1")

    if args.threads:
        torch.set_num_threads(args.threads)
    kept_freed = keep_freed_memory()  # as the `nanoseek` command does
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    preset = args.preset or "small"
    if args.quick and args.preset is None:
        preset = "tiny"
    if args.quick and preset.startswith("small"):
        preset = preset.replace("small", "tiny")
    batch_sizes = batch_sizes_arg(p, args.batch_sizes or ("1,4,16" if args.quick else "1,32,128"))
    prompt_len = (16 if args.quick else 64) if args.prompt_len is None else args.prompt_len
    new_tokens = (32 if args.quick else 256) if args.new_tokens is None else args.new_tokens
    for flag, value in (("--prompt-len", prompt_len), ("--new-tokens", new_tokens)):
        if value < 1:
            p.error(f"{flag} {value}: must be >= 1")
    max_seq_len = prompt_len + new_tokens
    try:
        cfg = get_preset(preset, max_seq_len=max(max_seq_len, get_preset(preset).max_seq_len))
    except InputError as e:
        p.error(f"--preset: {e}")

    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(cfg)
    auto = args.dtype == "auto"
    dtype = precision.inference_dtype(device, model.num_params()) if auto else getattr(torch, args.dtype)
    model = model.to(dtype).eval()
    print(describe_precision(model, device, "auto" if auto else "--dtype"), flush=True)
    hf_dtypes = [dtype] if device.type == "cuda" else list(dict.fromkeys([torch.float32, dtype]))
    if args.hf_dtypes:
        hf_dtypes = [getattr(torch, d.strip()) for d in args.hf_dtypes.split(",")]
    compile_engine = {"on": True, "off": False, "auto": None}[args.compile]
    gen = torch.Generator().manual_seed(0)
    all_prompts = torch.randint(0, cfg.vocab_size, (max(batch_sizes), prompt_len), generator=gen)
    errors: list[dict] = []
    graph_status: dict[str, dict] = {}
    compiled_status: dict[str, object] = {}
    hf_params = None
    contestants: list[Contestant] = []

    def results() -> list[dict]:
        """A row per configuration timed so far: its median call."""
        rows = []
        for c in contestants:
            if c.times:
                elapsed = statistics.median(c.times)
                rows.append(
                    dict(
                        impl=c.impl,
                        batch=c.batch,
                        elapsed_s=round(elapsed, 4),
                        tokens_per_s=round(c.batch * new_tokens / elapsed, 1),
                        peak_mem_mb=round(c.peak_mb, 1),
                        **c.extra,
                    )
                )
        return rows

    def ratio_rounds() -> dict[int, list[float]]:
        """Per batch size, nanoseek's rate over the best transformers configuration's in each round."""
        out: dict[int, list[float]] = {}
        for batch in batch_sizes:
            ours = next((c for c in contestants if c.impl == "nanoseek" and c.batch == batch and c.times), None)
            peers = [c for c in contestants if c.impl.startswith("transformers") and c.batch == batch and c.times]
            if ours is None or not peers:
                continue
            rounds = min(len(c.times) for c in (ours, *peers))  # a peer stopped by an error may have fewer
            out[batch] = [min(c.times[r] for c in peers) / ours.times[r] for r in range(rounds)]
        return out

    def report(complete: bool) -> None:
        """The JSON line with every figure so far (printed after the warm-ups and after each round)."""
        rows = results()
        ratios = ratio_rounds()
        summary = dict(
            device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            dtype=str(dtype).removeprefix("torch."),
            torch=torch.__version__,
            preset=preset,
            params=model.num_params(),
            hf_params=hf_params,
            prompt_len=prompt_len,
            new_tokens=new_tokens,
            batch_sizes=batch_sizes,
            threads=torch.get_num_threads(),
            malloc_keeps_freed=kept_freed,
            repeats=args.repeats,
            cuda_graphs=graph_status.get("nanoseek"),
            compiled=compiled_status,
            results=rows,
            vs_best_transformers={b: round(statistics.median(r), 2) for b, r in ratios.items()},
            vs_best_transformers_rounds={b: [round(x, 2) for x in r] for b, r in ratios.items()},
            errors=errors,
            peak_memory_mb=round(max((r["peak_mem_mb"] for r in rows), default=0.0), 1),
            peak_memory_kind="cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS",
            complete=complete,
        )
        print(json.dumps(summary), flush=True)

    def failed(impl: str, batch: int, e: BaseException) -> None:
        message = f"{type(e).__name__}: {str(e).strip()[:500]}"
        errors.append(dict(impl=impl, batch=batch, error=message))
        print(f"{impl:>22} batch {batch:>4}: FAILED {message}", file=sys.stderr, flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    def warmed(impl: str, batch: int, seconds: float) -> None:
        """A progress line per warm-up: where the time went when a run is cut by its timeout."""
        print(f"{impl:>22} batch {batch:>4}: warmed up in {seconds:.1f} s", file=sys.stderr, flush=True)

    def time_once(c: Contestant) -> None:
        """One round of c: its time and peak memory recorded, or on an error c stops and the others run on."""
        try:
            with torch.inference_mode():
                if device.type == "cpu":  # untimed: back in its own steady state after the other's call
                    c.call()
                elapsed, peak = timed_call(c, device)
        except Exception as e:
            c.failed = True
            failed(c.impl, c.batch, e)
            return
        c.times.append(elapsed)
        c.peak_mb = max(c.peak_mb, peak)

    def enter(c: Contestant) -> None:
        """A warmed-up configuration joins the rounds. On CUDA its first round is timed now, with a JSON line after
        it: a GPU's speed does not drift as the shared CPU's does, and a run cut during a slow warm-up (each batch
        size costs transformers' static cache a compile) still reports the configurations before it."""
        contestants.append(c)
        if device.type == "cuda":
            time_once(c)
            report(complete=False)

    # --- warm-ups: every configuration once (with --eager-too on CUDA the engine without graphs as well)
    variants = [("nanoseek", True)] + (
        [("nanoseek (no graphs)", False)] if device.type == "cuda" and args.eager_too else []
    )
    engines = []
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
    for name, graphs in variants:
        for batch in batch_sizes:
            # An engine per batch size, all of the same size: a lone sequence keeps its own graph between rounds
            # (a batch in between would end its run of one-row steps, `compiled.ONE_ROW_GRAPH_AFTER`).
            engine = Engine(
                model,
                max_batch=max(batch_sizes),
                max_seq_len=max_seq_len,
                use_cuda_graphs=graphs,
                compile=compile_engine,
            )
            engines.append(engine)
            call = partial(engine.generate, all_prompts[:batch].tolist(), params)
            try:
                warmup = time.perf_counter()
                for _ in range(warmup_calls(engine, batch, new_tokens)):  # captures graphs / compiles
                    check_engine(call(), new_tokens)
                warmup = time.perf_counter() - warmup
            except Exception as e:  # reported in the JSON; the other configurations run
                failed(name, batch, e)
                continue
            warmed(name, batch, warmup)
            graph_status[name] = status = engine.cuda_graph_status()
            extra: dict[str, object] = dict(dtype=str(dtype).removeprefix("torch."), warmup_s=round(warmup, 2))
            if device.type == "cpu":
                compiled_status.update(compiled=engine.compiling, failure=compiled.COMPILED.failure)
                extra.update(compiled=engine.compiling)
            else:
                extra.update(cuda_graphs=status["enabled"] and status["captured"] > 0)  # steps replayed graphs
            enter(Contestant(name, batch, call, partial(check_engine, new_tokens=new_tokens), extra))

    hf_models = []  # held until the end: every configuration is timed in every round
    for hf_dtype in [] if args.no_hf else hf_dtypes:
        hf = hf_model(cfg, device, hf_dtype)
        hf_models.append(hf)
        hf_params = sum(p.numel() for p in hf.parameters())
        for cache in (None, "static"):
            name = "transformers" + (" static" if cache else " dynamic")
            if len(hf_dtypes) > 1:
                name += " " + str(hf_dtype).removeprefix("torch.").replace("bfloat16", "bf16")
            for batch in batch_sizes:
                call = hf_call(hf, all_prompts[:batch].to(device), new_tokens, cache)
                check = partial(check_hf, length=prompt_len + new_tokens)
                try:
                    warmup = time.perf_counter()
                    with torch.inference_mode():
                        check(call())
                    warmup = time.perf_counter() - warmup
                except Exception as e:  # reported in the JSON; the other configurations run
                    failed(name, batch, e)
                    continue
                warmed(name, batch, warmup)
                enter(Contestant(name, batch, call, check, dict(warmup_s=round(warmup, 2))))
    report(complete=False)

    # --- the timed rounds: one call of every configuration per round, the order reversed every other round
    first = 1 if device.type == "cuda" else 0  # CUDA timed each configuration's first round as it entered
    for r in range(first, args.repeats):
        for c in contestants if r % 2 == 0 else contestants[::-1]:
            if not c.failed:
                time_once(c)
        report(complete=False)
    for engine in engines:
        engine.release()
    del hf_models

    table_keys = ("impl", "batch", "elapsed_s", "tokens_per_s", "peak_mem_mb")
    for row in results():
        print(
            f"{row['impl']:>22} batch {row['batch']:>4}: {row['tokens_per_s']:>10.1f} tok/s  "
            f"{row['elapsed_s']:8.3f} s  peak {row['peak_mem_mb']:9.1f} MiB"
            + "".join(f"  {k} {v}" for k, v in row.items() if k not in table_keys),
            flush=True,
        )
    for batch, ratios in ratio_rounds().items():
        rounds = ", ".join(f"{x:.2f}" for x in ratios)
        print(
            f"batch {batch:>4}: nanoseek / best transformers = {statistics.median(ratios):.2f}x "
            f"(median of {len(ratios)} rounds: {rounds})",
            flush=True,
        )
    report(complete=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
