"""The TRL `GRPOConfig` both RL benchmarks run the peer with (`rl_step.py`, `rl_memory.py`): one place, so the
two compare nanoseek against the same TRL settings. TRL is imported when called, as in the benchmarks."""

from __future__ import annotations

from typing import Any


def grpo_config(out: str, args: Any, device_type: str, max_steps: int) -> Any:
    """GRPO as nanoseek's RL step runs it: DAPO loss and clip-higher, no KL, one update per batch, constant lr,
    every completion `args.max_new_tokens` long; `args` has prompts, samples, micro_batch, max_new_tokens."""
    import trl

    batch = args.prompts * args.samples
    return trl.GRPOConfig(
        output_dir=out,
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=batch // args.micro_batch,
        num_generations=args.samples,
        max_completion_length=args.max_new_tokens,
        generation_kwargs={"min_new_tokens": args.max_new_tokens},
        temperature=1.0,
        learning_rate=1e-6,
        weight_decay=0.0,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        beta=0.0,
        epsilon=0.2,
        epsilon_high=0.28,
        loss_type="dapo",
        scale_rewards="group",
        num_iterations=1,
        max_steps=max_steps,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        bf16=device_type == "cuda",
        use_cpu=device_type == "cpu",
        dataloader_num_workers=0,
        seed=0,
    )
