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

from nanoseek.commands.common import add_engine_arguments, add_sampling_arguments, load_engine, read_prompts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    source.add_argument(
        "--prompts-file",
        metavar="FILE.jsonl",
        help='JSONL, one prompt per line: a JSON string, {"prompt": "..."} or {"messages": [{"role": "user", '
        '"content": "..."}]} (rendered with the chat template); other fields of an object are copied to its results',
    )
    parser.add_argument("--chat", action="store_true", help="wrap plain prompts in the chat template")
    parser.add_argument("--system", default=None, help="system message for --chat prompts")
    add_sampling_arguments(parser, max_new_tokens=256, temperature=1.0)
    parser.add_argument("--n", type=int, default=1, help="samples per prompt (they share one prefill)")
    parser.add_argument("--max-batch", type=int, default=64, help="sequences decoded at once")
    parser.add_argument("--logprobs", action="store_true", help="add token_ids and logprobs to each result")
    parser.add_argument("--out", help="write the JSONL results here (default: stdout)")


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
    from nanoseek.engine import SamplingParams
    from nanoseek.errors import as_user_error

    records = read_prompts(args.prompts_file) if args.prompts_file else [{"prompt": p} for p in args.prompt]
    with as_user_error():  # the checkpoint and the sampling flags, checked before any work
        engine, tokenizer = load_engine(args, args.max_batch)
        params = SamplingParams.from_config(args)  # --n samples per prompt, sharing one prefill
        params.validate(engine.vocab_size)
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
