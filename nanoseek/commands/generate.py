"""`nanoseek generate`: batched generation from a checkpoint, one JSON result per line.

    nanoseek generate --checkpoint runs/sft --prompt "12+35=" --temperature 0
    nanoseek generate --checkpoint runs/rl --prompts-file eval.jsonl --chat --n 4 --out samples.jsonl

A prompts file has one JSON value per line: a string, {"prompt": "..."} or
{"messages": [{"role": ..., "content": ...}, ...]} (always rendered with the chat
template); other fields of an object (an id, a reference answer) are copied into its
results. Each result line holds index, sample, prompt, text, finish_reason, num_tokens,
ttft_s and tokens_per_s (and token_ids + logprobs with --logprobs); a request that cannot
be served (empty, longer than the context) gets a line with "error" instead.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """Loading and engine options shared by `generate` and `chat`."""
    parser.add_argument("--checkpoint", required=True, help="checkpoint, run or Hugging Face model directory")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: the checkpoint's tokenizer.json)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    parser.add_argument("--dtype", default="auto", choices=DTYPES, help="auto: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--max-seq-len", type=int, default=None, help="context per sequence (default: the model's)")
    parser.add_argument("--kv-cache-gb", type=float, default=None, help="KV cache budget (default: automatic)")
    parser.add_argument("--no-cuda-graphs", action="store_true", help="decode eagerly on CUDA")


def add_sampling_arguments(parser: argparse.ArgumentParser, max_new_tokens: int, temperature: float) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    parser.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    parser.add_argument("--min-p", type=float, default=0.0, help="0 = off")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], metavar="STRING", help="stop string (repeatable)")
    parser.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-sequence tokens")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    source.add_argument("--prompts-file", help="JSONL file of prompts (see `nanoseek generate --help`)")
    parser.add_argument("--chat", action="store_true", help="wrap plain prompts in the chat template")
    parser.add_argument("--system", default=None, help="system message for --chat prompts")
    add_sampling_arguments(parser, max_new_tokens=256, temperature=1.0)
    parser.add_argument("--n", type=int, default=1, help="samples per prompt (they share one prefill)")
    parser.add_argument("--max-batch", type=int, default=64, help="sequences decoded at once")
    parser.add_argument("--logprobs", action="store_true", help="add token_ids and logprobs to each result")
    parser.add_argument("--out", help="write the JSONL results here (default: stdout)")


def load_engine(args: argparse.Namespace, max_batch: int):
    """(engine, tokenizer) from the shared command-line options."""
    import torch

    from nanoseek.engine import Engine
    from nanoseek.loading import load_checkpoint, pick_device

    device = pick_device(args.device)
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    model, tokenizer = load_checkpoint(args.checkpoint, device, dtype)
    if args.tokenizer:
        from nanoseek.tokenizer import Tokenizer

        tokenizer = Tokenizer.load(args.tokenizer)
    if tokenizer is None:
        raise ValueError(f"{args.checkpoint}: no tokenizer.json; pass --tokenizer DIR")
    engine = Engine(
        model,
        tokenizer,
        max_batch=max_batch,
        max_seq_len=args.max_seq_len,
        kv_cache_gb=args.kv_cache_gb,
        use_cuda_graphs=not args.no_cuda_graphs,
    )
    return engine, tokenizer


def sampling_params(args: argparse.Namespace, n: int = 1):
    from nanoseek.engine import SamplingParams

    return SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        n=n,
        seed=args.seed,
        stop_strings=list(args.stop),
        ignore_eos=args.ignore_eos,
    )


def read_prompts(path: str) -> list[dict[str, Any]]:
    """Records {"prompt": str} or {"messages": list}, plus the line's other fields."""
    from nanoseek.data.errors import BadInputError

    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise BadInputError(path, lineno, f"not valid JSON ({e.msg})") from None
            if isinstance(value, str):
                value = {"prompt": value}
            if not isinstance(value, dict):
                raise BadInputError(path, lineno, "expected a string or an object with 'prompt' or 'messages'")
            if isinstance(value.get("prompt"), str):
                records.append(value)
            elif isinstance(value.get("messages"), list):
                records.append(value)
            else:
                raise BadInputError(path, lineno, "expected a 'prompt' string or a 'messages' list")
    return records


def render(record: dict[str, Any], tokenizer, chat: bool, system: str | None) -> str:
    if "messages" in record and not isinstance(record.get("prompt"), str):
        return tokenizer.apply_chat_template(record["messages"], add_generation_prompt=True)
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": record["prompt"]}
        ]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return record["prompt"]


def run(args: argparse.Namespace) -> int:
    if args.prompts_file:
        try:
            records = read_prompts(args.prompts_file)
        except (OSError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    else:
        records = [{"prompt": p} for p in args.prompt]
    try:
        engine, tokenizer = load_engine(args, args.max_batch)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    params = sampling_params(args, n=args.n)
    prompts = [render(r, tokenizer, args.chat, args.system) for r in records]

    start = time.perf_counter()
    results = engine.generate(prompts, params)
    elapsed = time.perf_counter() - start

    out = open(args.out, "w", encoding="utf-8") if args.out else sys.stdout
    errors = tokens = 0
    try:
        for i, (record, completions) in enumerate(zip(records, results)):
            extra = {k: v for k, v in record.items() if k not in ("prompt", "messages")}
            for c in completions:
                if c.error is not None:
                    errors += 1
                    row = {**extra, "index": i, "error": c.error}
                else:
                    tokens += len(c.token_ids)
                    row = {
                        **extra,
                        "index": i,
                        "sample": c.sample,
                        "prompt": prompts[i],
                        "text": c.text,
                        "finish_reason": c.finish_reason,
                        "num_tokens": len(c.token_ids),
                        "ttft_s": round(c.ttft_s, 6),
                        "tokens_per_s": round(c.tokens_per_s, 3),
                    }
                    if args.logprobs:
                        row["token_ids"] = c.token_ids
                        row["logprobs"] = [round(x, 6) for x in c.logprobs]
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
        out.flush()
    finally:
        if args.out:
            out.close()
    where = f" -> {Path(args.out)}" if args.out else ""
    print(
        f"{len(records)} prompts, {tokens} tokens in {elapsed:.2f}s ({tokens / max(elapsed, 1e-9):.1f} tok/s), "
        f"{errors} errors{where}",
        file=sys.stderr,
    )
    return 1 if errors else 0
