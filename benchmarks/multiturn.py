"""Multi-turn rollouts: the KV cache kept across turns vs re-prefilling the whole transcript every turn.

    python benchmarks/multiturn.py                     # tiny preset, 32 episodes, 4 and 8 turns, CPU
    python benchmarks/multiturn.py --quick             # a smoke run with tiny shapes
    python benchmarks/multiturn.py --preset tiny-moe --episodes 64 --turns 4,8,16

Both modes run the same episodes through `nanoseek.envs.episodes.run_episodes` under continuous batching:
`kept` appends each environment reply to the sequence's cache (`Engine.continue_sequence`), `reprefill`
makes every turn a new request that prefills the whole transcript so far (what a runner without a
continuation API does). A synthetic environment answers every turn with a fixed-length reply (like a
tool result) and ends after T turns; decoding is greedy with every turn forced to --turn-tokens tokens,
so both modes produce the same tokens (checked: "same_episodes"). Random weights, a tokenizer trained on
the built-in tasks' texts. Each run gets a fresh engine; the modes alternate, best of --rounds each after a
warm-up run. Reported per turn count: episodes/s and policy tokens/s of each mode (wall clock), the
process's CPU seconds (the steadier figure on a shared machine), and kept / reprefill for both.
One intra-op thread by default: on an oversubscribed machine two threads wait on each other at every op.
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any, ClassVar

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanoseek.engine import Engine, SamplingParams
from nanoseek.envs.base import Env, StepResult
from nanoseek.envs.episodes import run_episodes
from nanoseek.model import Transformer, get_preset
from nanoseek.tasks.corpus import pretrain_texts
from nanoseek.tokenizer import Tokenizer

WORDS = "the of and to in is that for it as with was on be by at this from or an are".split()


class Synthetic(Env):
    """Replies `reply_words` seeded words after each turn; done after `max_turns` turns."""

    name: ClassVar[str] = "synthetic"
    defaults: ClassVar[dict[str, Any]] = {"max_turns": 4, "reply_words": 16, "prompt_words": 24}

    def _reset(self, seed: int) -> list[dict[str, Any]]:
        self.rng = random.Random(seed)
        return [{"role": "user", "content": self._words(self.prompt_words)}]

    def _words(self, n: int) -> str:
        return " ".join(self.rng.choice(WORDS) for _ in range(n))

    def respond(self, text: str) -> StepResult:
        done = self.turns >= self.max_turns
        return StepResult([] if done else [{"role": "user", "content": self._words(self.reply_words)}], 0.0, done)

    def score(self) -> float:
        return 0.0

    def act(self, policy: str, messages: list[dict[str, Any]], rng: random.Random) -> str:
        return ""


def run(model: Transformer, tokenizer: Tokenizer, args: argparse.Namespace, turns: int, reprefill: bool):
    """One run on a fresh engine: (wall seconds, CPU seconds, episodes)."""
    # compile=False: both modes decode eagerly (compilation would time only the first mode's warm-up)
    engine = Engine(model, tokenizer, max_batch=args.episodes, compile=False)
    envs = [Synthetic(max_turns=turns, reply_words=args.reply_words) for _ in range(args.episodes)]
    params = SamplingParams(max_new_tokens=args.turn_tokens, temperature=0, ignore_eos=True)
    t0, c0 = time.perf_counter(), time.process_time()
    episodes = run_episodes(engine, tokenizer, envs, list(range(args.episodes)), params, reprefill=reprefill)
    return time.perf_counter() - t0, time.process_time() - c0, episodes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--episodes", type=int, default=32)
    p.add_argument("--turns", default="4,8", help="turn counts, comma separated")
    p.add_argument("--turn-tokens", type=int, default=24, help="tokens the policy writes per turn")
    p.add_argument("--reply-words", type=int, default=16, help="words of each environment reply")
    p.add_argument("--rounds", type=int, default=3, help="timed runs per mode (best kept)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="smoke run: 4 episodes, 2 and 3 turns, one round")
    args = p.parse_args()
    if args.quick:
        args.episodes, args.turns, args.rounds, args.turn_tokens, args.reply_words = 4, "2,3", 1, 6, 4
    torch.set_num_threads(args.threads)
    tokenizer = Tokenizer.train(pretrain_texts(300, seed=0), 400)
    torch.manual_seed(0)
    model = Transformer(get_preset(args.preset, vocab_size=tokenizer.vocab_size, max_seq_len=1024)).eval()
    results: dict[str, Any] = {"preset": args.preset, "episodes": args.episodes, "turn_tokens": args.turn_tokens}
    results.update(reply_words=args.reply_words, threads=args.threads, rounds=args.rounds, by_turns={})
    for turns in [int(t) for t in args.turns.split(",")]:
        best: dict[str, float] = {}
        cpu: dict[str, float] = {}
        tokens = {}
        for mode in ("kept", "reprefill"):  # warm-up
            *_, episodes = run(model, tokenizer, args, turns, mode == "reprefill")
            tokens[mode] = [e.token_ids for e in episodes]
        for _ in range(args.rounds):
            for mode in ("kept", "reprefill"):
                wall, cpu_s, episodes = run(model, tokenizer, args, turns, mode == "reprefill")
                best[mode] = min(best.get(mode, float("inf")), wall)
                cpu[mode] = min(cpu.get(mode, float("inf")), cpu_s)
        policy = sum(e.policy_tokens for e in episodes)
        row: dict[str, Any] = {"same_episodes": tokens["kept"] == tokens["reprefill"], "policy_tokens": policy}
        row["transcript_tokens"] = sum(len(e.prompt_ids) + len(e.token_ids) for e in episodes) / len(episodes)
        for mode, wall in best.items():
            row[mode] = {
                "wall_s": wall,
                "cpu_s": cpu[mode],
                "episodes_per_s": args.episodes / wall,
                "tokens_per_s": policy / wall,
                "tokens_per_cpu_s": policy / cpu[mode],
            }
        row["speedup"] = best["reprefill"] / best["kept"]
        row["speedup_cpu"] = cpu["reprefill"] / cpu["kept"]
        results["by_turns"][str(turns)] = row
        print(
            f"{turns} turns: kept {row['kept']['episodes_per_s']:.2f} episodes/s "
            f"({row['kept']['tokens_per_s']:.0f} tok/s), reprefill {row['reprefill']['episodes_per_s']:.2f} "
            f"({row['reprefill']['tokens_per_s']:.0f} tok/s): {row['speedup']:.2f}x wall, "
            f"{row['speedup_cpu']:.2f}x CPU time; "
            f"same episodes: {row['same_episodes']}",
            file=sys.stderr,
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
