"""The pretraining and SFT step, inside the run scaffold every stage shares (`nanoseek.train.run`).

    nanoseek pretrain                                    # stages.pretrain -> train(run, model, data, ...)
    nanoseek sft --checkpoint runs/pretrain              # stages.sft -> the same loop
    torchrun --standalone --nproc_per_node=8 -m nanoseek pretrain --preset moe-1b   # data-parallel

`train` takes a model and a stream of batches (dicts of `input_ids`, `targets`, `positions`,
`doc_ids`; targets are -100 where no loss is taken) and owns the gradient step: gradient
accumulation (the loss is normalised by the tokens of the whole step, not per micro-batch),
clipping, bf16 autocast where the device has it (`nanoseek.precision`), throughput and MFU,
the loss records and validation. Under `torchrun` it trains data-parallel
(`nanoseek.train.distributed`): each rank takes its share of the step's micro-batches, the model
laid out by `nanoseek.train.parallel` (DDP, FSDP, expert parallelism). The schedule, resume, metrics
file, checkpoints, summary and plots are the `Run`'s.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from typing import Any, Protocol

import torch

from nanoseek import precision
from nanoseek.model import Transformer, router_stats
from nanoseek.train import distributed, parallel
from nanoseek.train.logprobs import model_loss
from nanoseek.train.run import Run, autocast

# Dense bf16 peak FLOP/s by device-name substring; the first match wins, so variants precede their family.
PEAK_FLOPS = {
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,
    "H200": 989e12,
    "H800": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "4090": 165e12,
}


class BatchStream(Protocol):
    def next_batch(self) -> dict[str, torch.Tensor] | None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def batch_loss(
    loss_fn: Callable[..., tuple[torch.Tensor, torch.Tensor]], batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy over target tokens, MoE aux loss); loss_fn is `model_loss(model)` or its compiled form."""
    return loss_fn(batch["input_ids"], batch["targets"], batch.get("positions"), batch.get("doc_ids"), reduction="sum")


@torch.no_grad()
def evaluate_loss(model: Transformer, batches: Iterable[dict[str, torch.Tensor]], device: torch.device) -> float:
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        batch = to_device(batch, device)
        with autocast(device):
            ce, _ = batch_loss(model_loss(model), batch)
        total += ce.item()
        count += int((batch["targets"] != -100).sum())
    model.train(was_training)
    return total / max(count, 1)


def train(
    run: Run,
    model: Transformer,
    data: BatchStream,
    *,
    tokenizer: Any = None,
    val_data: Callable[[], BatchStream] | None = None,
) -> dict[str, Any]:
    """Train for train.steps optimizer steps in `run`; returns the summary (also written to RUN_DIR/summary.json).

    `val_data()` makes a fresh validation stream: its first train.eval_batches batches are the validation set.
    """
    cfg, device, topo = run.train_cfg, run.device, run.topo
    state = run.begin(model, tokenizer, lambda: {"data": data.state_dict(), "stage": run.stage})
    if state is not None:
        data.load_state_dict(state["data"])
    if not run.quiet:
        print(f"{run.stage}: matmuls in {precision.describe(device)}{'; loss compiled' if cfg.compile else ''}")

    # DDP, FSDP or one process (`nanoseek.train.parallel`; `run.begin` has sharded the model for FSDP).
    loss_fn, no_sync = parallel.loss_function(model, run.parallel, device, cfg.compile)
    flops_per_token = model.flops_per_token(cfg.seq_len)
    peak = peak_flops(device)
    peak = peak * topo.world if peak else None
    last_loss, val_loss, val_step, tokens_seen = math.nan, None, 0, 0

    for step in run.steps():
        t0 = time.perf_counter()
        # Every rank reads the whole step (the same stream everywhere) and trains on its share.
        host_batches = [_next(data) for _ in range(cfg.grad_accum * topo.world)]
        # Counted on the host batches: on the device this would wait for the previous step to finish.
        n_targets = sum(int((b["targets"] != -100).sum()) for b in host_batches)
        micro = [to_device(b, device) for b in host_batches[topo.rank :: topo.world]]
        ce_sum = torch.zeros((), device=device)
        aux_sum = torch.zeros((), device=device)
        for i, b in enumerate(micro):
            # DDP and FSDP average gradients over ranks: x world makes that average the step's token mean.
            # Under DDP only the last micro-batch's backward synchronises.
            with no_sync() if i < len(micro) - 1 else nullcontext():
                with autocast(device):
                    ce, aux = batch_loss(loss_fn, b)
                    loss = ce * topo.world / max(n_targets, 1) + aux / cfg.grad_accum
                loss.backward()
            ce_sum += ce.detach().float()
            aux_sum += aux.detach().float() if isinstance(aux, torch.Tensor) else aux
        grad_norm = parallel.finish_gradients(model, cfg.grad_clip)  # (and the experts' reduction, under EP)
        for opt in run.optimizers:
            opt.step()
        for opt in run.optimizers:
            opt.zero_grad(set_to_none=True)
        # One host sync per step, after the optimizer step is queued, so dt covers the whole step.
        ce_total, aux_total = distributed.all_reduce_sum(torch.stack([ce_sum, aux_sum])).tolist()
        aux_total /= topo.world

        dt = time.perf_counter() - t0
        step_tokens = sum(b["input_ids"].numel() for b in host_batches)
        tokens_seen += step_tokens
        last_loss = ce_total / max(n_targets, 1)
        tok_s = step_tokens / dt
        mfu = flops_per_token * tok_s / peak if peak else None
        done = step + 1

        if done % cfg.log_every == 0 or done == cfg.steps or done == run.start + 1:
            record: dict[str, Any] = dict(
                step=done,
                loss=last_loss,
                lr=run.lr(),
                grad_norm=float(grad_norm),
                tokens_per_s=tok_s,
                time=run.elapsed(),
            )
            if mfu is not None:
                record["mfu"] = mfu
            if aux_total:
                record["aux_loss"] = aux_total
            stats = router_stats(model)
            if stats:
                record["max_violation"] = stats["max_violation"]
            run.log.write(record)
        validated = val_data is not None and ((cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps)
        if validated:
            val_loss, val_step = evaluate_loss(model, _take(val_data(), cfg.eval_batches), device), done
            run.log.write(dict(step=done, val_loss=val_loss))
            model.train()

        # A line shows the validation loss only at a step that measured it (a repeated value looks stuck).
        if not run.quiet and cfg.print_every and (done % cfg.print_every == 0 or done == run.start + 1 or validated):
            val_text = f"  val {val_loss:.4f}" if validated else ""
            run.bar.write(f"{run.stage} step {done:>6}/{cfg.steps}  loss {last_loss:.4f}{val_text}  {tok_s:,.0f} tok/s")
        postfix = dict(loss=f"{last_loss:.3f}", tok_s=f"{tok_s:,.0f}")
        if mfu is not None:
            postfix["mfu"] = f"{100 * mfu:.1f}%"
        if val_loss is not None:
            postfix["val"] = f"{val_loss:.3f} (step {val_step})"
        run.bar.set_postfix(postfix, refresh=False)

    summary = dict(
        stage=run.stage,
        steps=run.done,
        final_loss=last_loss,
        val_loss=val_loss,
        wall_time_s=run.elapsed(),
        tokens=tokens_seen,
        params=model.num_params(),
        active_params=model.num_active_params(),
    )
    return run.finish(summary)


def _next(data: BatchStream) -> dict[str, torch.Tensor]:
    batch = data.next_batch()
    if batch is None:
        raise RuntimeError("the training data ran out (train streams should repeat: epochs=None)")
    return batch


def _take(dataset: BatchStream, n: int) -> list[dict[str, torch.Tensor]]:
    out = []
    while len(out) < n and (batch := dataset.next_batch()) is not None:
        out.append(batch)
    return out
