"""The one training loop, shared by pretraining and SFT.

It takes a model, a stream of batches (dicts of `input_ids`, `targets`, `positions`,
`doc_ids`; targets are -100 where no loss is taken) and a TrainConfig, and owns
everything around the gradient step: the schedule, gradient accumulation (the loss
is normalised by the tokens of the whole step, not per micro-batch), clipping, bf16
autocast where the device has it (`nanoseek.precision`), the MoE balancing update (an optimizer
hook), progress, metrics, validation, checkpoints and exact resume. Under `torchrun` the same loop trains data-parallel
with DDP (`nanoseek.train.distributed`): each rank takes its share of the step's micro-batches.
"""

from __future__ import annotations

import inspect
import json
import math
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from nanoseek import precision
from nanoseek.config import TrainConfig
from nanoseek.model import Transformer, install_balancing_hook, router_stats
from nanoseek.plots import plot_training
from nanoseek.train import distributed
from nanoseek.train.checkpoint import find_resume_checkpoint, load_trainer_state, save_checkpoint
from nanoseek.train.optim import build_optimizers, lr_factor, set_lr

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


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype training autocasts matmuls to on this device (None: float32 throughout)."""
    return precision.autocast_dtype(device)


def autocast(device: torch.device):
    dtype = autocast_dtype(device)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


class MetricsLog:
    """metrics.jsonl: one JSON object per line; on resume, lines past the checkpoint are dropped."""

    def __init__(self, path: Path, resume_step: int | None) -> None:
        self.path = path
        if resume_step is not None and path.exists():
            kept = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= resume_step]
            path.write_text("".join(ln + "\n" for ln in kept))
        elif resume_step is None and path.exists():
            path.unlink()

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


# Newer torch renames DDP's `broadcast_buffers` (and warns on the old name).
_NO_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
    else {"broadcast_buffers": False}
)


class NullLog:
    """What ranks other than 0 log to: nothing."""

    def write(self, record: dict[str, Any]) -> None:
        pass


class LossModule(nn.Module):
    """`model.loss` as a module's forward: DDP synchronises gradients through the forward it wraps."""

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor,
        positions: torch.Tensor | None,
        doc_ids: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.loss(input_ids, targets, positions, doc_ids, reduction="sum")


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def batch_loss(
    loss_fn: Callable[..., tuple[torch.Tensor, torch.Tensor]], batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy over target tokens, MoE aux loss); loss_fn is `model.loss` or its compiled form."""
    return loss_fn(batch["input_ids"], batch["targets"], batch.get("positions"), batch.get("doc_ids"), reduction="sum")


@torch.no_grad()
def evaluate_loss(model: Transformer, batches: Iterable[dict[str, torch.Tensor]], device: torch.device) -> float:
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        batch = to_device(batch, device)
        with autocast(device):
            ce, _ = batch_loss(model.loss, batch)
        total += ce.item()
        count += int((batch["targets"] != -100).sum())
    model.train(was_training)
    return total / max(count, 1)


def train(
    model: Transformer,
    data: BatchStream,
    cfg: TrainConfig,
    run_dir: str | Path,
    *,
    tokenizer: Any = None,
    val_batches: Callable[[], Iterable[dict[str, torch.Tensor]]] | None = None,
    resume: bool = False,
    stage: str = "train",
    device: torch.device | None = None,
    quiet: bool = False,
    stop_at: int | None = None,
) -> dict[str, Any]:
    """Train for cfg.steps optimizer steps; returns the summary (also written to RUN_DIR/summary.json).

    `stop_at` ends this process early (with a checkpoint) as an interruption would; the
    schedule still spans cfg.steps, and `resume=True` continues exactly where it stopped.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = device or next(model.parameters()).device
    model.to(device).train()
    topo = distributed.topology()
    quiet = quiet or not topo.is_main
    optimizers = build_optimizers(model, cfg, device)
    install_balancing_hook(optimizers[-1], model)

    start = 0
    ckpt = find_resume_checkpoint(run_dir) if resume else None
    if ckpt is not None:
        model.load_state_dict(load_file(str(ckpt / "model.safetensors"), device=str(device)))
        state = load_trainer_state(ckpt, optimizers)
        data.load_state_dict(state["data"])
        start = state["step"]
        if not quiet:
            print(f"resuming {stage} from {ckpt} (step {start})")
    log = MetricsLog(run_dir / "metrics.jsonl", start if ckpt is not None else None) if topo.is_main else NullLog()

    ddp = None
    if topo.world > 1:
        # Buffers are not broadcast: the routers' load counts are per rank until the balancing hook
        # sums them, and the balancing bias moves identically on every rank.
        ddp = DistributedDataParallel(
            LossModule(model), device_ids=[device.index] if device.type == "cuda" else None, **_NO_BUFFER_SYNC
        )
        ddp_loss = torch.compile(ddp) if cfg.compile else ddp
        loss_fn = lambda ids, tgt, pos, doc, reduction: ddp_loss(ids, tgt, pos, doc)
    else:
        # Compile the loss method itself: `torch.compile(model).loss(...)` would run the eager model.
        loss_fn = torch.compile(model.loss) if cfg.compile else model.loss
    if not quiet:
        print(f"{stage}: matmuls in {precision.describe(device)}{'; loss compiled' if cfg.compile else ''}")
    flops_per_token = model.flops_per_token(cfg.seq_len)
    peak = peak_flops(device)
    peak = peak * topo.world if peak else None
    bar = tqdm(total=cfg.steps, initial=start, desc=stage, disable=quiet, dynamic_ncols=True)
    last_loss, val_loss, tokens_seen, done = math.nan, None, 0, start
    t_start = time.perf_counter()

    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        set_lr(optimizers, lr_factor(step, cfg))
        # Every rank reads the whole step (the same stream everywhere) and trains on its share.
        host_batches = [_next(data) for _ in range(cfg.grad_accum * topo.world)]
        # Counted on the host batches: on the device this would wait for the previous step to finish.
        n_targets = sum(int((b["targets"] != -100).sum()) for b in host_batches)
        micro = [to_device(b, device) for b in host_batches[topo.rank :: topo.world]]
        ce_sum = torch.zeros((), device=device)
        aux_sum = torch.zeros((), device=device)
        for i, b in enumerate(micro):
            # DDP averages gradients over ranks: x world makes that average the step's token mean.
            # Only the last micro-batch's backward synchronises.
            with ddp.no_sync() if ddp is not None and i < len(micro) - 1 else nullcontext():
                with autocast(device):
                    ce, aux = batch_loss(loss_fn, b)
                    loss = ce * topo.world / max(n_targets, 1) + aux / cfg.grad_accum
                loss.backward()
            ce_sum += ce.detach().float()
            aux_sum += aux.detach().float() if isinstance(aux, torch.Tensor) else aux
        grad_norm = (
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            if cfg.grad_clip > 0
            else torch.tensor(0.0)
        )
        for opt in optimizers:
            opt.step()
        for opt in optimizers:
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

        if done % cfg.log_every == 0 or done == cfg.steps or done == start + 1:
            record: dict[str, Any] = dict(
                step=done,
                loss=last_loss,
                lr=optimizers[0].param_groups[0]["lr"],
                grad_norm=float(grad_norm),
                tokens_per_s=tok_s,
                time=time.perf_counter() - t_start,
            )
            if mfu is not None:
                record["mfu"] = mfu
            if aux_total:
                record["aux_loss"] = aux_total
            stats = router_stats(model)
            if stats:
                record["max_violation"] = stats["max_violation"]
            log.write(record)
        if val_batches is not None and ((cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps):
            val_loss = evaluate_loss(model, val_batches(), device)
            log.write(dict(step=done, val_loss=val_loss))
            model.train()
        interrupted = stop_at is not None and done >= stop_at and done < cfg.steps
        if topo.is_main and (done % cfg.checkpoint_every == 0 or done == cfg.steps or interrupted):
            save_checkpoint(
                run_dir,
                done,
                model,
                optimizers,
                tokenizer,
                {"data": data.state_dict(), "stage": stage},
                keep=cfg.keep_checkpoints,
            )

        if not quiet and cfg.print_every and (done % cfg.print_every == 0 or done == start + 1):
            val_text = f"  val {val_loss:.4f}" if val_loss is not None else ""
            bar.write(f"{stage} step {done:>6}/{cfg.steps}  loss {last_loss:.4f}{val_text}  {tok_s:,.0f} tok/s")
        postfix = dict(loss=f"{last_loss:.3f}", tok_s=f"{tok_s:,.0f}")
        if mfu is not None:
            postfix["mfu"] = f"{100 * mfu:.1f}%"
        if val_loss is not None:
            postfix["val"] = f"{val_loss:.3f}"
        bar.set_postfix(postfix, refresh=False)
        bar.update(1)
        if interrupted:
            break
    bar.close()

    summary = dict(
        stage=stage,
        steps=done if cfg.steps > start else start,
        final_loss=last_loss,
        val_loss=val_loss,
        wall_time_s=time.perf_counter() - t_start,
        tokens=tokens_seen,
        params=model.num_params(),
        active_params=model.num_active_params(),
    )
    if topo.is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        plot_training(run_dir, stage)
    distributed.barrier()  # the other ranks return once rank 0's files are on disk
    return summary


def _next(data: BatchStream) -> dict[str, torch.Tensor]:
    batch = data.next_batch()
    if batch is None:
        raise RuntimeError("the training data ran out (train streams should repeat: epochs=None)")
    return batch
