"""Seconds per RL step and completion tokens/s: nanoseek's GRPO loop vs TRL's GRPOTrainer.

    python benchmarks/rl_step.py                       # `small` preset shape (~100M), 8 prompts x 8 samples, 256 tokens
    python benchmarks/rl_step.py --quick --device cpu  # a tiny CPU smoke run
    python benchmarks/rl_step.py --no-trl              # nanoseek only

One step = generate P prompts x G samples with the live policy, score them, group advantages,
one optimizer step over the batch (micro-batches of --micro-batch sequences, gradients accumulated).
Both sides get the same model shape with random weights, the same tokenizer (one trained here on
the built-in task corpus), the same chat-formatted arithmetic prompts and the same reward: a
length-independent dummy (character codes mod 7), so grading costs nothing on either side.
Every completion runs to max_new_tokens: nanoseek's engine gets no eos ids; TRL gets
generation_kwargs min_new_tokens = max_completion_length (eos suppressed until then).

nanoseek: `collect` (nanoseek.train.rollouts) + `update` (nanoseek.train.update), as `nanoseek rl` runs them
(float32 master weights, bf16 autocast on CUDA and on CPUs with AVX-512 BF16 or AMX, the engine on a twin
holding bf16 copies of the matmul weights, refreshed after each optimizer step, or on a CPU the float32 policy itself
where it fits the cache, at up to 64 rows (`train.run.rollout_dtype`); AdamW, `nanoseek rl`'s default
optimizer, as TRL's; one pass over the batch, whose detached log-probs serve as the old policy's for the
truncated importance-sampling weights, so no extra forward).
TRL: GRPOConfig(per_device_train_batch_size=micro-batch, gradient_accumulation_steps=P*G/micro-batch,
num_generations=G, loss_type="dapo", beta=0, epsilon 0.2 / epsilon_high 0.28, bf16 on CUDA), a
transformers model of the same shape (Qwen3ForCausalLM when the preset has QK-norm, else Llama),
generation with transformers' `generate` (no vLLM). Its steps are timed with a callback
(on_step_begin -> on_step_end: generation, scoring, forward/backward and the optimizer step).

--rounds R (R > 1) runs the two sides alternately in one process, ABBA (nanoseek, TRL, TRL, nanoseek, ...),
each time from fresh weights, so a machine whose load drifts weighs on both alike; each side's figures then
pool its timed steps over the rounds, with per_round_s beside them, and `trl_over_nanoseek` is the median of
the rounds' ratios of seconds per step (`trl_over_nanoseek_rounds`).

Both time steady-state steps after --warmup steps (on CUDA, default 2: TRL's first step after one warm-up was
still 3.7-5x its later ones on the H200). seconds_per_step = the median timed step (pooled over rounds); completion
tokens/s = completion tokens of a step / that median. peak_mem_gb (CUDA): torch.cuda.max_memory_allocated over the
timed steps (reset after the warmup; weights, optimizer states, KV cache and graph pools included).
cpu_s (both sides) / rollout_cpu_s (nanoseek): the process's CPU seconds (all its threads) per step / per
rollout, a figure that moves less than wall time when other processes share the cores (trl_over_nanoseek_cpu:
the rounds' median ratio of it).
With `--compile on` (the default on CPU) nanoseek's engine decodes on CPU through its torch.compile'd step from the
first (warm-up) step, what a `nanoseek rl` run does from its 512th decode step on (docs/LOG.md, 2026-12-02,
sixth session), and the update's gradient passes run a compiled forward (`update.compiled_hidden_states`), what
`nanoseek rl --set train.compile=true` does; both compile during the warm-up step. `compiled` in its figures
says whether the engine did. `--compile auto` (the default on CUDA, where compiling the update took 126 s on an
H200): the engine as `nanoseek rl` decides, the update eager (its default); `off`: neither compiled.
The process keeps freed memory for reuse, as the `nanoseek` command does (`nanoseek.host`, process-wide, so for
both sides; `malloc_keeps_freed` in the figures).
nanoseek's `cuda_graphs` says whether its engine's decode steps replayed CUDA graphs (and if not,
why). TRL is optional (pip install trl); without it, or if it fails, only nanoseek is reported.
A JSON line with nanoseek's figures is printed before TRL runs ("complete": false), so a run cut
by a timeout still ends with one; the last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.trl_grpo import grpo_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is built locally; never reach the Hub

from nanoseek.config import RLConfig, TrainConfig
from nanoseek.engine import Engine
from nanoseek.engine.twin import rollout_policy, sync_rollout_policy
from nanoseek.eval.runner import prompt_ids
from nanoseek.host import keep_freed_memory
from nanoseek.loading import pick_device
from nanoseek.model import ModelConfig, Transformer, get_preset, install_balancing_hook
from nanoseek.rewards import RewardSet
from nanoseek.tokenizer import Tokenizer
from nanoseek.train import grpo
from nanoseek.train.optim import build_optimizers
from nanoseek.train.rl import rl_defaults
from nanoseek.train.rollouts import PromptSampler, collect
from nanoseek.train.run import rollout_dtype
from nanoseek.train.update import compiled_hidden_states, update

QUICK_SHAPE = dict(vocab_size=1024, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=256)


def dummy_reward(completions: list[str]) -> list[float]:
    """Length-independent and free to compute; varies with the text so groups have some spread."""
    return [(sum(map(ord, c)) % 7) / 6 for c in completions]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None


def build_tokenizer(directory: Path, vocab_size: int) -> Tokenizer:
    from nanoseek.tasks.corpus import pretrain_texts

    tokenizer = Tokenizer.train(pretrain_texts(2000, seed=0), vocab_size)
    tokenizer.save(directory)
    return tokenizer


def build_rows(tokenizer: Tokenizer, n: int) -> list[dict]:
    """Arithmetic prompts; `text` is the chat-formatted prompt both sides feed to the model."""
    from nanoseek.tasks.corpus import task_mixture

    rows = []
    for i, e in enumerate(task_mixture(n, split="train", seed=0, weights={"arithmetic": 1.0})):
        text = tokenizer.apply_chat_template([{"role": "user", "content": e.prompt}], add_generation_prompt=True)
        rows.append(dict(id=f"p{i}", prompt=e.prompt, answer=e.answer, text=text))
    return rows


def summarize(step_s: list[float], tokens: list[int], **extra: list[float]) -> dict:
    """A side's figures: the median timed step (a mean let one slow step, TRL's first timed step on the H200 at
    29 s against 6-8 s after it, set the ratio), its completion tokens over that step's time."""
    median_s = statistics.median(step_s)
    tokens_per_step = statistics.mean(tokens)
    out = dict(
        seconds_per_step=median_s,
        step_s=step_s,
        completion_tokens_per_step=tokens_per_step,
        completion_tokens_per_s=tokens_per_step / median_s,
    )
    out.update({k: statistics.median(v) for k, v in extra.items()})
    return out


# ----------------------------------------------------------------------------- nanoseek
def bench_nanoseek(cfg: ModelConfig, tokenizer: Tokenizer, rows: list[dict], args, device: torch.device) -> dict:
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(cfg)
    model.train()  # float32 master weights, as `nanoseek rl` loads them
    # `nanoseek rl`'s optimizer (train.rl.rl_defaults: AdamW, no weight decay; TrainConfig's own default is Muon,
    # which this benchmark took before 2026-12-02 evening), at TRL's learning rate.
    tcfg = TrainConfig(optimizer=rl_defaults().train.optimizer, lr=1e-6, weight_decay=0.0, grad_clip=1.0)
    optimizers = build_optimizers(model, tcfg, device)
    install_balancing_hook(optimizers[-1], model)
    rcfg = RLConfig(
        prompts_per_step=args.prompts,
        group_size=args.samples,
        max_new_tokens=args.max_new_tokens,
        micro_batch_size=args.micro_batch,
    )
    max_prompt = max(len(prompt_ids(tokenizer, r["prompt"])) for r in rows)
    # bf16 matmul weights on CUDA; on a CPU the float32 policy where it fits the cache: as `nanoseek rl`
    engine_policy = rollout_policy(model, rollout_dtype(model, device, args.prompts * args.samples))
    engine = Engine(
        engine_policy,
        tokenizer,
        max_batch=args.prompts * args.samples,
        eos_ids=[],
        max_seq_len=min(cfg.max_seq_len, max_prompt + args.max_new_tokens + 8),
        compile={"on": True, "off": False, "auto": None}[args.compile],
    )
    forward = compiled_hidden_states(model) if args.compile == "on" else None  # train.compile = true
    sampler = PromptSampler(rows, seed=0)
    rewards = RewardSet().add("dummy", lambda prompts, completions, rows_: dummy_reward(completions))

    step_s, rollout_s, update_s, tokens, cpu_s, rollout_cpu_s = [], [], [], [], [], []
    for step in range(args.warmup + args.steps):
        sync(device)
        if step == args.warmup:
            reset_peak(device)
        t0, c0 = time.perf_counter(), time.process_time()
        batch = collect(engine, tokenizer, sampler, rewards, rcfg, seed=step)
        sync(device)
        t1, c1 = time.perf_counter(), time.process_time()
        advantages = grpo.group_advantages(batch.rewards, rcfg.group_size, rcfg.scale_rewards)
        update(model, None, optimizers, batch, advantages, rcfg, tcfg.grad_clip, device, hidden_states=forward)
        sync_rollout_policy(engine_policy, model)
        sync(device)
        t2, c2 = time.perf_counter(), time.process_time()
        n_tokens = sum(len(c) for c in batch.completion_ids)
        print(
            f"nanoseek step {step}{' (warmup)' if step < args.warmup else ''}: {t2 - t0:.2f} s "
            f"(rollout {t1 - t0:.2f} s, update {t2 - t1:.2f} s), {n_tokens} completion tokens",
            file=sys.stderr,
        )
        if step >= args.warmup:
            step_s.append(t2 - t0)
            rollout_s.append(t1 - t0)
            update_s.append(t2 - t1)
            tokens.append(n_tokens)
            cpu_s.append(c2 - c0)
            rollout_cpu_s.append(c1 - c0)
    result = summarize(step_s, tokens, rollout_s=rollout_s, update_s=update_s, cpu_s=cpu_s, rollout_cpu_s=rollout_cpu_s)
    result["peak_mem_gb"] = peak_gb(device)
    result["cuda_graphs"] = engine.cuda_graph_status()
    result["compiled"] = engine.compiling
    result["update_compiled"] = forward is not None
    engine.release()
    return result


# ----------------------------------------------------------------------------- TRL
def bench_trl(
    cfg: ModelConfig, tok_dir: Path, tokenizer: Tokenizer, rows: list[dict], args, device: torch.device
) -> dict:
    try:
        import trl
    except ImportError as e:
        print(
            f"note: TRL is not installed ({e}); reporting nanoseek only (pip install trl to compare)", file=sys.stderr
        )
        return {"skipped": f"trl not installed: {e}"}
    import transformers
    from datasets import Dataset

    from benchmarks.generate import hf_model  # the transformers model of the same shape, built offline

    torch.manual_seed(0)
    model = hf_model(cfg, device, torch.float32)
    hf_tok = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(tok_dir / "tokenizer.json"), eos_token=tokenizer.eos_token, pad_token=tokenizer.pad_token
    )
    model.config.pad_token_id = hf_tok.pad_token_id
    model.generation_config.pad_token_id = hf_tok.pad_token_id
    # Plain-text prompts, already chat-formatted: the same token ids nanoseek's engine is given.
    dataset = Dataset.from_dict({"prompt": [r["text"] for r in rows]})

    lengths: list[int] = []

    def reward(prompts, completions, completion_ids, **_):
        lengths.extend(len(c) for c in completion_ids)
        return dummy_reward(completions)

    class StepTimer(transformers.TrainerCallback):
        def __init__(self) -> None:
            self.start, self.start_cpu, self.times, self.tokens, self.cpu = 0.0, 0.0, [], [], []

        def on_step_begin(self, a, state, control, **kw):
            sync(device)
            if len(self.times) == args.warmup:
                reset_peak(device)
            lengths.clear()
            self.start, self.start_cpu = time.perf_counter(), time.process_time()

        def on_step_end(self, a, state, control, **kw):
            sync(device)
            self.times.append(time.perf_counter() - self.start)
            self.cpu.append(time.process_time() - self.start_cpu)
            self.tokens.append(sum(lengths))
            step = len(self.times) - 1
            print(
                f"trl step {step}{' (warmup)' if step < args.warmup else ''}: {self.times[-1]:.2f} s, "
                f"{self.tokens[-1]} completion tokens",
                file=sys.stderr,
            )

    with tempfile.TemporaryDirectory() as out:
        config = grpo_config(out, args, device.type, max_steps=args.warmup + args.steps)
        timer = StepTimer()
        trainer = trl.GRPOTrainer(
            model=model,
            reward_funcs=[reward],
            args=config,
            train_dataset=dataset,
            processing_class=hf_tok,
            callbacks=[timer],
        )
        trainer.remove_callback(transformers.trainer_callback.PrinterCallback)  # keep stdout for the JSON line
        trainer.train()
    result = summarize(timer.times[args.warmup :], timer.tokens[args.warmup :], cpu_s=timer.cpu[args.warmup :])
    result["peak_mem_gb"] = peak_gb(device)
    result["version"] = trl.__version__
    result["transformers_version"] = transformers.__version__
    return result


def pool(results: list[dict]) -> dict:
    """One side's figures over several rounds: the timed steps pooled, each round's seconds per step kept."""
    if len(results) == 1:
        return results[0]
    step_s = [t for r in results for t in r["step_s"]]
    tokens = sum(r["completion_tokens_per_step"] * len(r["step_s"]) for r in results)
    out = dict(results[0])
    median_s = statistics.median(step_s)
    out.update(
        seconds_per_step=median_s,
        step_s=step_s,
        per_round_s=[r["seconds_per_step"] for r in results],
        completion_tokens_per_step=tokens / len(step_s),
        completion_tokens_per_s=tokens / len(step_s) / median_s,
    )
    for key in ("rollout_s", "update_s", "cpu_s", "rollout_cpu_s"):
        if key in results[0]:
            out[key] = statistics.median(r[key] for r in results)
    return out


def run_trl(cfg: ModelConfig, tok_dir: Path, tokenizer: Tokenizer, rows: list[dict], args, device) -> dict:
    try:
        return bench_trl(cfg, tok_dir, tokenizer, rows, args, device)
    except Exception as e:  # reported in the JSON next to nanoseek's figures
        message = f"{type(e).__name__}: {str(e).strip()[:500]}"
        print(f"TRL failed: {message}", file=sys.stderr)
        return {"skipped": f"error: {message}", "error": message}


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="small", help="model preset whose shape both sides use (default small)")
    p.add_argument("--device", default="auto")
    p.add_argument("--prompts", type=int, default=8, help="P: prompts per step")
    p.add_argument("--samples", type=int, default=8, help="G: samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=16, help="sequences per forward/backward in the update")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2 on CUDA, else 1)")
    p.add_argument("--steps", type=int, default=3, help="timed steps")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 on CPU)")
    p.add_argument("--no-trl", action="store_true", help="skip the TRL comparison")
    p.add_argument("--rounds", type=int, default=1, help="run the sides alternately this many times (ABBA)")
    p.add_argument(
        "--compile",
        choices=["on", "off", "auto"],
        default=None,
        help="nanoseek on (the default on CPU): the engine's compiled CPU decode step from the first step and the "
        "update's compiled forward (train.compile); auto (the default elsewhere): the engine as `nanoseek rl` "
        "decides (after 512 decode steps on CPU; CUDA graphs on CUDA), the update eager; off: neither",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny smoke shape: d_model 64, 2 layers, vocab 1024, 4 prompts x 4 samples, 32 tokens",
    )
    args = p.parse_args(argv)

    device = pick_device(args.device)
    if args.compile is None:  # on CUDA the compiled update took 126 s to build (H200, 2026-12-04): not by default
        args.compile = "on" if device.type == "cpu" else "auto"
    if args.warmup is None:
        args.warmup = 2 if device.type == "cuda" else 1
    if args.warmup < 0 or args.steps < 1:
        p.error(f"--warmup {args.warmup} / --steps {args.steps}: need warmup >= 0 and steps >= 1")
    if device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    kept_freed = keep_freed_memory()  # as the `nanoseek` command does (nanoseek/host.py); for both sides
    cfg = get_preset(args.preset)
    if args.quick:
        cfg = cfg.replace(**QUICK_SHAPE)
        args.prompts, args.samples, args.max_new_tokens = 4, 4, 32
        args.micro_batch, args.steps = 8, 2
    batch = args.prompts * args.samples
    if args.micro_batch < 1 or batch % args.micro_batch:
        p.error(f"--micro-batch {args.micro_batch} must divide prompts x samples = {batch}")
    if args.rounds < 1:
        p.error(f"--rounds must be at least 1, got {args.rounds}")

    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = Path(tmp)
        # At most the model's vocabulary (the tiny preset has 512 ids; the corpus alone reaches ~600).
        tokenizer = build_tokenizer(tok_dir, min(4096, cfg.vocab_size))
        # Distinct prompts for every step (enough for warmup + steps without repeating).
        rows = build_rows(tokenizer, args.prompts * (args.warmup + args.steps))
        if tokenizer.vocab_size > cfg.vocab_size:
            raise SystemExit(f"the tokenizer has {tokenizer.vocab_size} ids, more than the model's {cfg.vocab_size}")
        with torch.device("meta"):
            params_m = Transformer(cfg).num_params() / 1e6
        cpu_name = platform.processor() or platform.machine()
        figures = dict(
            device=torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({cpu_name})",
            threads=torch.get_num_threads() if device.type == "cpu" else None,
            malloc_keeps_freed=kept_freed,
            torch=torch.__version__,
            preset=args.preset + (" (--quick shape)" if args.quick else ""),
            shape=dict(
                vocab_size=cfg.vocab_size,
                d_model=cfg.d_model,
                n_layers=cfg.n_layers,
                n_heads=cfg.n_heads,
                n_kv_heads=cfg.n_kv_heads,
                d_ff=cfg.d_ff,
                qk_norm=cfg.qk_norm,
                moe=cfg.is_moe,
            ),
            params_m=round(params_m, 2),
            prompts=args.prompts,
            samples=args.samples,
            max_new_tokens=args.max_new_tokens,
            micro_batch=args.micro_batch,
            warmup_steps=args.warmup,
            timed_steps=args.steps,
            prompt_tokens=[len(prompt_ids(tokenizer, r["prompt"])) for r in rows[: args.prompts]],
        )
        results: dict[str, list[dict]] = {"nanoseek": [], "trl": []}
        for r in range(args.rounds):
            for side in ("nanoseek", "trl") if r % 2 == 0 else ("trl", "nanoseek"):
                if side == "nanoseek":
                    results[side].append(bench_nanoseek(cfg, tokenizer, rows, args, device))
                elif not args.no_trl and not any("skipped" in t for t in results["trl"]):
                    # nanoseek's figures so far, before TRL runs (a run cut by a timeout still ends with them)
                    partial = {k: pool(v) for k, v in results.items() if v}
                    print(json.dumps({**figures, "trl": {"skipped": "not run yet"}, **partial, "complete": False}))
                    sys.stdout.flush()
                    results[side].append(run_trl(cfg, tok_dir, tokenizer, rows, args, device))
                gc.collect()  # one side's model, optimizer and engine go before the other's peak memory is measured
        figures["nanoseek"] = pool(results["nanoseek"])
        trl_ok = [t for t in results["trl"] if "skipped" not in t]
        if args.no_trl:
            figures["trl"] = {"skipped": "--no-trl"}
        elif len(trl_ok) < len(results["trl"]):
            figures["trl"] = next(t for t in results["trl"] if "skipped" in t)
        else:
            figures["trl"] = pool(trl_ok)
            ratios = [t["seconds_per_step"] / n["seconds_per_step"] for n, t in zip(results["nanoseek"], trl_ok)]
            figures["trl_over_nanoseek"] = statistics.median(ratios)
            figures["trl_over_nanoseek_rounds"] = ratios
            cpu = [t["cpu_s"] / n["cpu_s"] for n, t in zip(results["nanoseek"], trl_ok)]
            figures["trl_over_nanoseek_cpu"] = statistics.median(cpu)
            figures["trl_over_nanoseek_cpu_rounds"] = cpu
    print(json.dumps({**figures, "complete": True}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
