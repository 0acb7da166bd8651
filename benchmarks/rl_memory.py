"""Peak memory and seconds of one GRPO step on a Qwen2.5-0.5B-shaped model: nanoseek vs TRL, full and LoRA.

    python benchmarks/rl_memory.py                     # 8 prompts x 8 samples, 256-token prompts, 512 new tokens
    python benchmarks/rl_memory.py --device cpu --prompts 2 --samples 4 --prompt-tokens 128 --max-new-tokens 128
    python benchmarks/rl_memory.py --only nanoseek:lora --model DIR ...   # one configuration (what each child runs)

The model: Qwen2.5-0.5B's config (vocabulary 151,936, 24 layers, d_model 896, GQA 14/2 heads, q/k/v
biases, tied embeddings) with random weights, built once by transformers and saved; both sides load
that directory in float32 (nanoseek through its HF loader, TRL through from_pretrained). The step:
P prompts x G samples generated to max-new-tokens (no eos), a dummy reward (character codes mod 7,
never equal within a group), group advantages, one optimizer step (AdamW, lr 1e-6) over micro-batches of
--micro-batch sequences. Prompts are digit strings chat-formatted to exactly --prompt-tokens tokens.

Modes: full fine-tuning, and LoRA rank 16, alpha 32 on q/k/v/o and gate/up/down (nanoseek:
train.lora; TRL: peft's LoraConfig with the same targets). nanoseek runs as `nanoseek rl` does
(engine on the live policy or its 16-bit twin, `update` with the chunked log-probs; under LoRA the
frozen base is stored in the autocast dtype). TRL runs GRPOTrainer at its defaults (gradient
checkpointing on, generation with transformers' generate, no vLLM), loss_type dapo, beta 0.

Each configuration runs in a fresh process; its peak memory is the process's peak RSS on CPU
(ru_maxrss: weights, optimizer, activations, the loading included) and torch.cuda.max_memory_allocated
on CUDA. Seconds per step: the one step, cold (generation + update), after loading; wall clock and the
process's CPU time (user + sys, all its threads: on a shared machine the fairer of the two). A
configuration may be listed more than once (`--configurations nanoseek:lora,trl:lora,trl:lora,nanoseek:lora`
alternates the sides, so a load that drifts during the run falls on both alike); the time ratios are then
of the means. The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.trl_grpo import grpo_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is built locally; never reach the Hub

QWEN25_05B = dict(
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    pad_token_id=0,
    bos_token_id=None,
    eos_token_id=None,
)
LORA_TARGETS_OURS = ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]
LORA_TARGETS_HF = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIGURATIONS = ("nanoseek:full", "nanoseek:lora", "trl:full", "trl:lora")


def dummy_reward(completions: list[str]) -> list[float]:
    """Free to compute, and never equal within a group: every sample has an advantage, so every one is trained on."""
    return [(i % 4) / 3 for i in range(len(completions))]


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prompts(tokenizer, n: int, length: int) -> list[str]:
    """n distinct digit strings whose chat-formatted prompts are exactly `length` tokens (one token per digit)."""
    from nanoseek.eval.runner import prompt_ids

    overhead = len(prompt_ids(tokenizer, ""))
    if length <= overhead:
        raise SystemExit(f"--prompt-tokens must exceed the chat template's {overhead} tokens")
    out = ["".join(str((i * 7 + j) % 10) for j in range(length - overhead)) for i in range(n)]
    assert all(len(prompt_ids(tokenizer, p)) == length for p in out)
    return out


# ----------------------------------------------------------------------------- the model directory
def build_model_dir(directory: Path, vocab_for_tokenizer: int, layers: int) -> None:
    """Qwen2.5-0.5B-shaped random weights (saved in bfloat16: half the disk; both sides load float32) + a tokenizer."""
    import transformers

    from nanoseek.tasks.corpus import pretrain_texts
    from nanoseek.tokenizer import Tokenizer

    torch.manual_seed(0)
    config = transformers.Qwen2Config(**{**QWEN25_05B, "num_hidden_layers": layers})
    model = transformers.Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(directory)
    del model
    Tokenizer.train(pretrain_texts(2000, seed=0), vocab_for_tokenizer).save(directory)


# ----------------------------------------------------------------------------- one configuration
def run_nanoseek(args, lora: bool, device: torch.device) -> dict:
    from nanoseek.config import RLConfig, TrainConfig
    from nanoseek.engine import Engine
    from nanoseek.engine.twin import rollout_policy, sync_rollout_policy
    from nanoseek.interop.hf import load_hf_model
    from nanoseek.model.lora import apply_lora
    from nanoseek.rewards import RewardSet
    from nanoseek.tokenizer import Tokenizer
    from nanoseek.train import grpo
    from nanoseek.train.optim import build_optimizers
    from nanoseek.train.parallel import checkpoint_blocks
    from nanoseek.train.rollouts import PromptSampler, collect
    from nanoseek.train.run import autocast_dtype, rollout_dtype
    from nanoseek.train.update import update

    tokenizer = Tokenizer.load(args.model)
    # As `nanoseek rl` loads it: float32 master weights, or under LoRA the frozen base in the autocast dtype.
    dtype = (lora and autocast_dtype(device)) or torch.float32
    model = load_hf_model(args.model, device=device, dtype=dtype).train()
    if lora:
        apply_lora(model, 16, 32.0, LORA_TARGETS_OURS, base=str(args.model), base_dtype=autocast_dtype(device))
    tcfg = TrainConfig(
        optimizer="adamw",
        lr=1e-6,
        weight_decay=0.0,
        grad_clip=1.0,
        activation_checkpointing=args.activation_checkpointing,
    )
    checkpoint_blocks(model, tcfg.activation_checkpointing)  # what `parallel.prepare` does in Run.begin
    optimizers = build_optimizers(model, tcfg, device)
    rcfg = RLConfig(
        prompts_per_step=args.prompts,
        group_size=args.samples,
        max_new_tokens=args.max_new_tokens,
        micro_batch_size=args.micro_batch,
    )
    rows = [
        dict(id=f"p{i}", prompt=p, answer="0")
        for i, p in enumerate(prompts(tokenizer, args.prompts, args.prompt_tokens))
    ]
    engine_policy = rollout_policy(model, rollout_dtype(model, device, args.prompts * args.samples))
    engine = Engine(
        engine_policy,
        tokenizer,
        max_batch=args.prompts * args.samples,
        eos_ids=[],
        max_seq_len=args.prompt_tokens + args.max_new_tokens + 8,
    )
    rewards = RewardSet().add("dummy", lambda prompts_, completions, rows_: dummy_reward(completions))
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    batch = collect(engine, tokenizer, PromptSampler(rows, seed=0), rewards, rcfg, seed=0)
    sync(device)
    t1, c1 = time.perf_counter(), time.process_time()
    advantages = grpo.group_advantages(batch.rewards, rcfg.group_size, rcfg.scale_rewards)
    update(model, None, optimizers, batch, advantages, rcfg, tcfg.grad_clip, device)
    sync_rollout_policy(engine_policy, model)
    sync(device)
    t2, c2 = time.perf_counter(), time.process_time()
    return dict(
        seconds_per_step=t2 - t0,
        rollout_s=t1 - t0,
        update_s=t2 - t1,
        cpu_seconds_per_step=c2 - c0,
        rollout_cpu_s=c1 - c0,
        update_cpu_s=c2 - c1,
        completion_tokens=sum(len(c) for c in batch.completion_ids),
        trainable_params_m=sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6,
        activation_checkpointing=tcfg.activation_checkpointing,
    )


def run_trl(args, lora: bool, device: torch.device) -> dict:
    import transformers
    import trl
    from datasets import Dataset

    from nanoseek.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(args.model)
    hf_tok = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(Path(args.model) / "tokenizer.json"),
        eos_token=tokenizer.eos_token,
        pad_token=tokenizer.pad_token,
    )
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
        for p in prompts(tokenizer, args.prompts, args.prompt_tokens)
    ]
    assert all(len(hf_tok(t)["input_ids"]) == args.prompt_tokens for t in texts)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(device)
    model.config.pad_token_id = model.generation_config.pad_token_id = hf_tok.pad_token_id
    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS_HF, task_type="CAUSAL_LM"
        )
    times: list[float] = []  # per step: wall, CPU time
    cpu_times: list[float] = []
    rollout: list[tuple[float, float]] = []  # per generation: wall, CPU time
    tokens: list[int] = []

    def reward(completions, completion_ids, **_):
        tokens.append(sum(len(c) for c in completion_ids))
        return dummy_reward(completions)

    class StepTimer(transformers.TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            sync(device)
            times.append(time.perf_counter())
            cpu_times.append(time.process_time())

        def on_step_end(self, a, state, control, **kw):
            sync(device)
            times[-1] = time.perf_counter() - times[-1]
            cpu_times[-1] = time.process_time() - cpu_times[-1]

    with tempfile.TemporaryDirectory() as out:
        config = grpo_config(out, args, device.type, max_steps=1)
        trainer = trl.GRPOTrainer(
            model=model,
            reward_funcs=[reward],
            args=config,
            train_dataset=Dataset.from_dict({"prompt": texts}),
            processing_class=hf_tok,
            callbacks=[StepTimer()],
            peft_config=peft_config,
        )
        trainer.remove_callback(transformers.trainer_callback.PrinterCallback)  # keep stdout for the JSON line
        generate = trainer._generate_and_score_completions  # TRL's rollout: generation, rewards, advantages

        def timed_generate(inputs):
            sync(device)
            t, c = time.perf_counter(), time.process_time()
            out = generate(inputs)
            sync(device)
            rollout.append((time.perf_counter() - t, time.process_time() - c))
            return out

        trainer._generate_and_score_completions = timed_generate
        trainer.train()
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad) / 1e6
    return dict(
        seconds_per_step=times[0],
        rollout_s=rollout[0][0],
        update_s=times[0] - rollout[0][0],
        cpu_seconds_per_step=cpu_times[0],
        rollout_cpu_s=rollout[0][1],
        update_cpu_s=cpu_times[0] - rollout[0][1],
        completion_tokens=sum(tokens),
        trainable_params_m=trainable,
        gradient_checkpointing=config.gradient_checkpointing,
        version=trl.__version__,
    )


def run_one(args, device: torch.device) -> dict:
    side, mode = args.only.split(":")
    load_before = os.getloadavg()[0]
    result = (run_nanoseek if side == "nanoseek" else run_trl)(args, mode == "lora", device)
    result["peak_memory_gb"] = peak_memory_gb(device)
    result["load_average_1min"] = [load_before, os.getloadavg()[0]]  # before and after this process's step
    return result


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per forward/backward (both sides)")
    p.add_argument("--layers", type=int, default=24, help="fewer layers than Qwen2.5-0.5B's 24: a smoke test")
    p.add_argument(
        "--activation-checkpointing",
        default="none",
        choices=("none", "block", "selective"),
        help="nanoseek's train.activation_checkpointing (TRL checkpoints at its default either way)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--configurations", default=",".join(CONFIGURATIONS), help="which of " + ", ".join(CONFIGURATIONS))
    p.add_argument("--only", choices=CONFIGURATIONS, help="run one configuration in this process")
    p.add_argument("--model", type=Path, help="the model directory (`build_model_dir`; default: built afresh)")
    args = p.parse_args(argv)

    from nanoseek.loading import pick_device

    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if (args.prompts * args.samples) % args.micro_batch:
        p.error("--micro-batch must divide prompts x samples")
    if args.only:
        print(json.dumps(run_one(args, device)))
        return 0

    figures: dict = dict(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        threads=args.threads or torch.get_num_threads(),
        torch=torch.__version__,
        model="Qwen2.5-0.5B shape, random weights" + (f" ({args.layers} layers)" if args.layers != 24 else ""),
        prompts=args.prompts,
        samples=args.samples,
        prompt_tokens=args.prompt_tokens,
        max_new_tokens=args.max_new_tokens,
        micro_batch=args.micro_batch,
        memory="peak RSS of a fresh process" if device.type == "cpu" else "torch.cuda.max_memory_allocated",
    )
    runs: dict[str, list[dict]] = {}  # configuration -> one result per time it was listed
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or Path(tmp) / "qwen2.5-0.5b-random"
        if args.model is None:
            build_model_dir(model_dir, 4096, args.layers)
        for configuration in args.configurations.split(","):
            command = [
                sys.executable,
                __file__,
                "--only",
                configuration,
                "--model",
                str(model_dir),
                "--device",
                args.device,
            ]
            for flag in (
                "prompts",
                "samples",
                "prompt_tokens",
                "max_new_tokens",
                "micro_batch",
                "threads",
                "activation_checkpointing",
            ):
                if getattr(args, flag) is not None:
                    command += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
            print(f"running {configuration} ...", file=sys.stderr, flush=True)
            done = subprocess.run(command, capture_output=True, text=True)
            lines = done.stdout.strip().splitlines()
            if done.returncode != 0 or not lines:
                result = {"error": (done.stderr.strip().splitlines() or ["no output"])[-1][:500]}
            else:
                result = json.loads(lines[-1])
            runs.setdefault(configuration, []).append(result)
            print(f"{configuration}: {json.dumps(result)}", file=sys.stderr, flush=True)
    figures.update({c: results[0] if len(results) == 1 else results for c, results in runs.items()})

    def mean(results: list[dict], key: str) -> float:
        return sum(r[key] for r in results) / len(results)

    for mode in ("full", "lora"):
        ours, theirs = ([r for r in runs.get(f"{side}:{mode}", []) if "error" not in r] for side in ("nanoseek", "trl"))
        if ours and theirs:
            figures[f"{mode}_memory_ratio"] = mean(ours, "peak_memory_gb") / mean(theirs, "peak_memory_gb")
            figures[f"{mode}_time_ratio"] = mean(ours, "seconds_per_step") / mean(theirs, "seconds_per_step")
            figures[f"{mode}_cpu_time_ratio"] = mean(ours, "cpu_seconds_per_step") / mean(
                theirs, "cpu_seconds_per_step"
            )
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
