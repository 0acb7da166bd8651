"""`nanoseek eval`: accuracy (pass@k, cons@k) and speed of a checkpoint on benchmarks; `eval compare A B`.

    nanoseek eval --checkpoint runs/rl --bench arithmetic --bench countdown --out runs/eval-rl
    nanoseek eval --checkpoint runs/rl --bench tasks --n-problems 200 --set arithmetic.digits=3
    nanoseek eval --checkpoint R1-Distill-Qwen-1.5B/ --bench math500_test.jsonl --bench gsm8k_test.jsonl \\
        --k 4 --max-new-tokens 8192 --think-prefill --out runs/eval-r1
    nanoseek eval --checkpoint Qwen2.5-Math-1.5B/ --bench gsm8k_test.jsonl --few-shot 4 --temperature 0
    nanoseek eval compare runs/eval-sft runs/eval-rl          # markdown table of both, with the difference
    nanoseek eval --checkpoint runs/rl --env guess_number --n-episodes 200 --max-new-tokens 64 --set n=100
    nanoseek eval --env calculator_arithmetic --policy expert --n-episodes 200   # an env's baseline, no model

--bench (repeatable) is a file (.jsonl/.json/.parquet: GSM8K, MATH/MATH-500, AIME, `nanoseek data`
task rows, HumanEval, MBPP, rows with `prompt` and `tests` (code: run against the tests in a subprocess
with limits), or any layout with --prompt-field/--answer-field) or a built-in task (`nanoseek data
list`; `tasks` = all of them) whose held-out test split is generated (--n-problems, --seed,
--set TASK.KNOB=VALUE).

Prompts: the chat template, with the user turn = the problem + an instruction chosen by
--instruction: `auto` (default: the R1 suffix "Please reason step by step, and put your final
answer within \\boxed{}." for files, or for code "... write your final solution in a ```python code
block."; nothing for built-in tasks, whose models never saw one), `r1`
(the suffix for everything), `none`, or your own text. --few-shot K (base models) writes plain
"Problem: ...\\nSolution: ..." text with K solved examples instead of using the chat template.

Sampling defaults follow R1: temperature 0.6, top-p 0.95, --k 4 samples per problem (--temperature 0:
one greedy sample). Writes RUN_DIR/summary.json, records.jsonl, report.md and plots/.

--env NAME (or NAME:ARG; `nanoseek env list`) plays --n-episodes episodes of an environment from its
held-out seeds instead (--set KNOB=VALUE: its knobs; --max-new-tokens: each turn's limit), by the
checkpoint or, with --policy random|expert, by the environment's own scripted policy: mean normalised
score ± s.e., success rate, turns, tool calls and errors, tokens per episode and speed (see
nanoseek.eval.episodes). Writes RUN_DIR/summary.json and transcripts.jsonl.
"""

from __future__ import annotations

import argparse
import sys

from nanoseek.commands.common import (
    add_engine_arguments,
    add_sampling_arguments,
    add_set_argument,
    engine_options,
    load_model,
    parse_difficulty,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = __doc__
    # argparse's own usage lists every option and ends in "{compare} ...": say the two forms instead.
    parser.usage = (
        "%(prog)s --checkpoint CHECKPOINT --bench FILE_OR_TASK [--bench ...] [options]\n"
        "       %(prog)s compare RUN_A RUN_B"
    )
    add_engine_arguments(parser)
    for action in parser._actions:  # not required: `eval compare A B` needs no checkpoint
        if action.dest == "checkpoint":
            action.required = False
    parser.add_argument(
        "--bench",
        dest="benches",
        action="append",
        default=[],
        metavar="FILE_OR_TASK",
        help="benchmark file or task (repeatable)",
    )
    env = parser.add_argument_group("environments (instead of --bench)")
    env.add_argument("--env", default=None, metavar="NAME", help="evaluate on an environment's held-out episodes")
    env.add_argument("--n-episodes", type=int, default=100, help="episodes of --env (100)")
    env.add_argument("--policy", default=None, metavar="random|expert", help="the env's scripted policy, no model")
    env.add_argument("--max-turns", type=int, default=None, help="assistant turns per episode (default: the env's)")
    parser.add_argument("--out", default="runs/eval", metavar="RUN_DIR", help="output directory (default: runs/eval)")
    problems = parser.add_argument_group("problems")
    problems.add_argument("--limit", type=int, default=None, metavar="N", help="evaluate the first N problems of each")
    problems.add_argument("--n-problems", type=int, default=100, help="problems per built-in task benchmark (100)")
    add_set_argument(
        problems,
        "TASK.KNOB=VALUE",
        "task difficulty, e.g. arithmetic.digits=3 (KNOB=VALUE: every task with that knob)",
    )
    problems.add_argument("--skip-bad", action="store_true", help="skip (and count) malformed rows instead of failing")
    problems.add_argument("--prompt-field", default=None, help="the problem's field, for other file layouts")
    problems.add_argument("--answer-field", default=None, help="the gold answer's field, for other file layouts")
    prompts = parser.add_argument_group("prompts")
    prompts.add_argument(
        "--instruction",
        default="auto",
        metavar="auto|r1|none|TEXT",
        help="appended to each problem (default auto: R1 suffix for files, none for built-in tasks)",
    )
    prompts.add_argument("--system", default=None, help="system message")
    prompts.add_argument("--think-prefill", action="store_true", help="start the answer with '<think>\\n'")
    prompts.add_argument("--few-shot", type=int, default=0, metavar="K", help="K solved examples, plain text (base)")
    sampling = parser.add_argument_group("sampling")
    add_sampling_arguments(sampling, max_new_tokens=2048, temperature=0.6)
    sampling.add_argument("--k", type=int, default=4, help="samples per problem (default 4; 1 when greedy)")
    parser.set_defaults(top_p=0.95, seed=0)
    parser.add_argument("--max-batch", type=int, default=64, help="sequences decoded at once")
    parser.add_argument(
        "--sandbox",
        choices=("auto", "namespaces", "process"),
        default="auto",
        help="isolation of code benchmarks' programs (default auto: the strongest this machine allows)",
    )
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or messages")
    sub = parser.add_subparsers(
        dest="action", title="compare two eval runs", metavar="compare RUN_A RUN_B", prog=parser.prog
    )
    compare = sub.add_parser("compare", help="side-by-side markdown table of two eval runs")
    compare.add_argument("run_a", metavar="RUN_A", help="eval run directory (or its summary.json)")
    compare.add_argument("run_b", metavar="RUN_B")


def _compare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from nanoseek.errors import as_user_error
    from nanoseek.eval.report import compare_table, load_summary

    with as_user_error():
        a, b = load_summary(args.run_a), load_summary(args.run_b)
    name_a, name_b = Path(args.run_a).name or "A", Path(args.run_b).name or "B"
    if name_a == name_b:
        name_a, name_b = f"A ({name_a})", f"B ({name_b})"
    print(compare_table(a, b, name_a, name_b))
    return 0


def _evaluate_env(args: argparse.Namespace) -> int:
    from nanoseek.commands.env import parse_knobs
    from nanoseek.engine import Engine, SamplingParams
    from nanoseek.envs import make
    from nanoseek.errors import InputError, as_user_error
    from nanoseek.eval.episodes import evaluate_env, summary_line

    with as_user_error():  # the flags, the environment and the checkpoint: checked before any work
        knobs = parse_knobs(args.overrides)
        if args.n_episodes < 1:
            raise InputError(f"--n-episodes must be at least 1, got {args.n_episodes}")
        if args.max_turns is not None and args.max_turns < 1:
            raise InputError(f"--max-turns must be at least 1, got {args.max_turns}")
        make(args.env, **knobs)
        engine = tokenizer = params = None
        if args.policy is None:
            if not args.checkpoint:
                raise InputError("nanoseek eval --env needs --checkpoint (or --policy for the env's own baseline)")
            params = SamplingParams.from_config(args, n=1)
            params.validate()
            model, tokenizer = load_model(args)
            engine = Engine(model, tokenizer, max_batch=args.max_batch, **engine_options(args))
        else:
            make(args.env, **knobs).check_policy(args.policy)
    summary = evaluate_env(
        args.env,
        knobs,
        args.n_episodes,
        args.out,
        engine=engine,
        tokenizer=tokenizer,
        params=params,
        policy=args.policy,
        seed=args.seed or 0,
        max_turns=args.max_turns,
    )
    print(summary_line(summary))
    if not args.quiet:
        print(f"wrote {args.out}/summary.json, transcripts.jsonl", file=sys.stderr)
    return 0


def run(args: argparse.Namespace) -> int:
    from nanoseek.errors import InputError

    if getattr(args, "action", None) == "compare":
        return _compare(args)
    if args.env:
        return _evaluate_env(args)
    if not args.checkpoint or not args.benches:
        raise InputError("nanoseek eval needs --checkpoint and --bench (or: nanoseek eval compare RUN_A RUN_B)")

    from dataclasses import fields

    from nanoseek.config import EvalConfig
    from nanoseek.errors import as_user_error
    from nanoseek.eval.harness import build_engine, evaluate, load_bench
    from nanoseek.eval.report import overview_table
    from nanoseek.rewards.sandbox import configure_sandbox

    with as_user_error():  # the flags, the benchmark files and the checkpoint: checked before any work
        named = {f.name: getattr(args, f.name) for f in fields(EvalConfig) if f.name in args}  # flags named as fields
        cfg = EvalConfig(**named, difficulty=parse_difficulty(args.overrides), plots=not args.no_plots)
        cfg.check()
        configure_sandbox(args.sandbox)
        benches = [load_bench(spec, cfg) for spec in cfg.benches]  # bad files fail before the model loads
        model, tokenizer = load_model(args)
        engine = build_engine(model, tokenizer, benches, cfg, **engine_options(args))
    summary = evaluate(engine, tokenizer, benches, args.out, cfg, model=args.checkpoint)

    print(overview_table(summary))
    if not args.quiet:
        print(f"wrote {args.out}/summary.json, records.jsonl, report.md", file=sys.stderr)
    return 0
