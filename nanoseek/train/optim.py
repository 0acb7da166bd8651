"""Optimizers and learning-rate schedules.

AdamW: weight decay on matrices only (not norms, biases, embeddings, the router); torch's fused
kernel on CUDA and CPU (one pass over all parameters: 3x faster than the per-tensor loop at the
tiny presets on CPU).
Muon: momentum orthogonalised by a Newton-Schulz iteration, for the 2-D hidden weights
(and each expert's matrices); everything else stays on AdamW. Matrices of one shape are
orthogonalised together (one batched iteration) and in bf16 where the device multiplies bf16
natively (`nanoseek.precision`; 2-4x faster than float32 on an AVX-512 BF16 CPU).
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from nanoseek import precision
from nanoseek.config import TrainConfig


def _no_decay(name: str, p: Tensor) -> bool:
    return p.dim() < 2 or "embed" in name or "router" in name


def _muon_eligible(name: str, p: Tensor) -> bool:
    """Hidden matrices: 2-D linear weights and 3-D stacked expert weights, not embedding/head/router, nor
    LoRA's low-rank factors (orthogonalising an update of rank r is not what they need: AdamW trains them)."""
    hidden = "embed" not in name and "lm_head" not in name and "router" not in name and "lora_" not in name
    return p.dim() >= 2 and hidden


def newton_schulz(g: Tensor, steps: int = 5) -> Tensor:
    """Approximately orthogonalise the last two dims of g (quintic iteration tuned for speed, as in Muon)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.to(precision.autocast_dtype(g.device) or torch.float32)
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.mT if tall else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, weight_decay: float = 0.0) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            # One Newton-Schulz iteration per shape: fewer, larger matmuls (tiny, bf16: 26 -> 18 ms a step, one core).
            # (and of one kind: FSDP's DTensors are not stacked with expert parallelism's plain tensors)
            same_shape: dict[tuple[torch.Size, type], list[Tensor]] = defaultdict(list)
            for p in group["params"]:
                if p.grad is not None:
                    same_shape[(p.shape, type(p))].append(p)
            for (shape, _), params in same_shape.items():
                grads = [p.grad for p in params]
                for p in params:
                    if "momentum" not in self.state[p]:
                        self.state[p]["momentum"] = torch.zeros_like(p)
                bufs = [self.state[p]["momentum"] for p in params]
                torch._foreach_lerp_(bufs, grads, 1 - group["momentum"])
                nesterov = torch._foreach_lerp(grads, bufs, group["momentum"])
                updates = newton_schulz(torch.stack(nesterov)).unbind(0)
                scale = max(1.0, shape[-2] / shape[-1]) ** 0.5
                if group["weight_decay"]:
                    torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
                torch._foreach_add_(params, updates, alpha=-group["lr"] * scale)


def build_optimizers(model: nn.Module, cfg: TrainConfig, device: torch.device) -> list[torch.optim.Optimizer]:
    """One AdamW (and a Muon when asked); each group remembers its peak lr in 'base_lr'."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    muon_params = [p for n, p in named if cfg.optimizer == "muon" and _muon_eligible(n, p)]
    muon_ids = {id(p) for p in muon_params}
    decay = [p for n, p in named if id(p) not in muon_ids and not _no_decay(n, p)]
    no_decay = [p for n, p in named if id(p) not in muon_ids and _no_decay(n, p)]
    groups = [
        dict(params=decay, weight_decay=cfg.weight_decay, lr=cfg.lr, base_lr=cfg.lr),
        dict(params=no_decay, weight_decay=0.0, lr=cfg.lr, base_lr=cfg.lr),
    ]
    # FSDP's DTensors apart from expert parallelism's plain tensors: a fused step takes one kind.
    groups = [dict(g, params=[p for p in g["params"] if isinstance(p, DTensor) == d]) for g in groups for d in (0, 1)]
    fused = device.type in ("cuda", "cpu")
    opts: list[torch.optim.Optimizer] = [
        torch.optim.AdamW([g for g in groups if g["params"]], betas=(cfg.beta1, cfg.beta2), fused=fused)
    ]
    if cfg.optimizer == "muon":
        if not muon_params:  # LoRA: the adapters are all AdamW's
            return opts
        opts.append(
            Muon(
                [dict(params=muon_params, lr=cfg.muon_lr, base_lr=cfg.muon_lr)],
                lr=cfg.muon_lr,
                weight_decay=cfg.weight_decay,
            )
        )
    elif cfg.optimizer != "adamw":
        raise ValueError(f"train.optimizer = {cfg.optimizer!r}: must be 'adamw' or 'muon'")
    return opts


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak lr at `step` (0-based): linear warmup, then cosine / WSD / constant."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    floor = cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        span = max(1, cfg.steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "wsd":
        decay_steps = max(1, int(cfg.steps * cfg.decay_fraction))
        decay_start = cfg.steps - decay_steps
        if step < decay_start:
            return 1.0
        return 1.0 - (1.0 - floor) * min(1.0, (step - decay_start) / decay_steps)
    raise ValueError(f"train.schedule = {cfg.schedule!r}: must be 'cosine', 'wsd' or 'constant'")


def set_lr(optimizers: list[torch.optim.Optimizer], factor: float) -> None:
    for opt in optimizers:
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * factor
