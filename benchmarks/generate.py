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
its own graph is compiled, `engine.compiled.ONE_ROW_GRAPH_AFTER`), then `--repeats` timed
calls (default 3), nanoseek's and transformers' alike; the row reports the median call (a single call
of a fraction of a second moved by up to 1.8x between runs on a shared 2-core VM; docs/LOG.md,
2026-12-02, sixth session). Output tokens/s = batch x new tokens / wall time of the whole call
(prefill included).

Precision: nanoseek runs `--dtype` (auto: nanoseek.precision's choice, printed at the start: bf16
on CUDA, and on a CPU with native bf16 for models large enough to gain; else float32).
transformers runs every dtype of `--hf-dtypes` (default on CPU: float32 and nanoseek's dtype), so
its best setting is among the rows; `vs_best_transformers` in the summary divides nanoseek's
tokens/s by the best transformers row at each batch size. On CPU nanoseek decodes through its
torch.compile'd step (`--compile on`, the default; the warm-up run compiles, `warmup_s` shows it).
Peak memory: torch.cuda.max_memory_allocated per run on CUDA (after reset_peak_memory_stats:
weights, KV cache, graph pools and the run's activations); on CPU, the process's peak resident
set size (it only grows). `cuda_graphs` (per nanoseek row and in the summary) says whether the
engine's decode steps replayed CUDA graphs, and if not, why (`disabled_reason`).

After every configuration a JSON line with every figure so far is printed ("complete": false),
so a run cut by a timeout still ends with one; the last line has "complete": true. A configuration
that fails (out of memory, an unsupported option) goes to "errors" and the next one runs.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanoseek import precision
from nanoseek.engine import Engine, SamplingParams, compiled
from nanoseek.errors import InputError
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


def measure(fn, device: torch.device, repeats: int = 1) -> tuple[float, float, object]:
    """(median seconds of `repeats` calls, peak memory MiB, the last call's result) of fn()."""
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        result = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return statistics.median(times), peak, result


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
    p.add_argument("--repeats", type=int, default=3, help="timed calls per configuration (the median is reported)")
    p.add_argument("--dtype", default="auto", help="nanoseek's weights: auto (nanoseek.precision), float32, bfloat16")
    p.add_argument("--hf-dtypes", default=None, help="transformers' weights, comma-separated (default: see above)")
    p.add_argument(
        "--compile", choices=["on", "off", "auto"], default="on", help="CPU: nanoseek's compiled decode step"
    )
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats {args.repeats}: must be >= 1")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads {args.threads}: must be >= 1")

    if args.threads:
        torch.set_num_threads(args.threads)
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
    results = []

    errors: list[dict] = []
    graph_status: dict[str, dict] = {}
    compiled_status: dict[str, object] = {}
    hf_params = None

    def vs_best_transformers() -> dict[int, float]:
        """nanoseek tokens/s / the best transformers row's, per batch size measured by both."""
        ours = {r["batch"]: r["tokens_per_s"] for r in results if r["impl"] == "nanoseek"}
        best: dict[int, float] = {}
        for r in results:
            if r["impl"].startswith("transformers"):
                best[r["batch"]] = max(best.get(r["batch"], 0.0), r["tokens_per_s"])
        return {b: round(ours[b] / best[b], 2) for b in ours if best.get(b)}

    def report(complete: bool) -> None:
        """The JSON line with every figure so far (printed after each configuration)."""
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
            repeats=args.repeats,
            cuda_graphs=graph_status.get("nanoseek"),
            compiled=compiled_status,
            results=results,
            vs_best_transformers=vs_best_transformers(),
            errors=errors,
            peak_memory_mb=round(max((r["peak_mem_mb"] for r in results), default=0.0), 1),
            peak_memory_kind="cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS",
            complete=complete,
        )
        print(json.dumps(summary), flush=True)

    def record(impl: str, batch: int, elapsed: float, peak: float, generated: int, **extra) -> None:
        row = dict(
            impl=impl,
            batch=batch,
            elapsed_s=round(elapsed, 4),
            tokens_per_s=round(generated / elapsed, 1),
            peak_mem_mb=round(peak, 1),
            **extra,
        )
        results.append(row)
        print(
            f"{impl:>22} batch {batch:>4}: {row['tokens_per_s']:>10.1f} tok/s  {elapsed:8.3f} s  "
            f"peak {row['peak_mem_mb']:9.1f} MiB" + "".join(f"  {k} {v}" for k, v in extra.items()),
            flush=True,
        )
        report(complete=False)

    def failed(impl: str, batch: int, e: BaseException) -> None:
        message = f"{type(e).__name__}: {str(e).strip()[:500]}"
        errors.append(dict(impl=impl, batch=batch, error=message))
        print(f"{impl:>22} batch {batch:>4}: FAILED {message}", file=sys.stderr, flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        report(complete=False)

    # --- the engine (eagerly too on CUDA, to show what the graphs buy)
    variants = [("nanoseek", True)] + ([("nanoseek (no graphs)", False)] if device.type == "cuda" else [])
    for name, graphs in variants:
        engine = Engine(
            model, max_batch=max(batch_sizes), max_seq_len=max_seq_len, use_cuda_graphs=graphs, compile=compile_engine
        )
        params = SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
        for batch in batch_sizes:
            prompts = all_prompts[:batch].tolist()
            try:
                warmup = time.perf_counter()
                # Warm-up: captures the graphs / compiles what this shape needs. A single sequence decoding alone
                # gets its own compiled graph after ONE_ROW_GRAPH_AFTER steps in a row: warm up past them.
                steps = compiled.ONE_ROW_GRAPH_AFTER + 1 if batch == 1 and engine.compile_after is not None else 0
                for _ in range(1 + -(-steps // new_tokens)):
                    engine.generate(prompts, params)
                warmup = time.perf_counter() - warmup
                elapsed, peak, out = measure(partial(engine.generate, prompts, params), device, args.repeats)
                assert all(len(c[0].token_ids) == new_tokens for c in out), "a sequence stopped early"
            except Exception as e:  # reported in the JSON; the next configuration runs
                failed(name, batch, e)
                continue
            graph_status[name] = status = engine.cuda_graph_status()
            used = status["enabled"] and status["captured"] > 0  # decode steps replayed captured graphs
            extra = dict(cuda_graphs=used)
            if device.type == "cpu":
                compiled_status.update(compiled=engine.compiling, failure=compiled.COMPILED.failure)
                extra = dict(compiled=engine.compiling, warmup_s=round(warmup, 2))
            record(name, batch, elapsed, peak, batch * new_tokens, dtype=str(dtype).removeprefix("torch."), **extra)
        engine.release()

    # --- transformers
    for hf_dtype in [] if args.no_hf else hf_dtypes:
        hf = hf_model(cfg, device, hf_dtype)
        hf_params = sum(p.numel() for p in hf.parameters())
        for cache in (None, "static"):
            name = "transformers" + (" static" if cache else " dynamic")
            if len(hf_dtypes) > 1:
                name += " " + str(hf_dtype).removeprefix("torch.").replace("bfloat16", "bf16")
            for batch in batch_sizes:
                ids = all_prompts[:batch].to(device)
                kwargs = dict(
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    do_sample=False,
                    pad_token_id=0,
                )
                if cache:
                    kwargs["cache_implementation"] = cache
                try:
                    with torch.inference_mode():
                        hf.generate(ids, **kwargs)  # warm-up
                        elapsed, peak, out = measure(partial(hf.generate, ids, **kwargs), device, args.repeats)
                    assert out.shape[1] == prompt_len + new_tokens, "a sequence stopped early"
                except Exception as e:  # reported in the JSON; the next configuration runs
                    failed(name, batch, e)
                    continue
                record(name, batch, elapsed, peak, batch * new_tokens)
        del hf

    for batch, ratio in vs_best_transformers().items():
        print(f"batch {batch:>4}: nanoseek / best transformers = {ratio:.2f}x", flush=True)
    report(complete=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
