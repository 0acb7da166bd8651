"""LoRA: low-rank adapters added to a built model from outside it, the base weights frozen.

    adapters = apply_lora(model, rank=16, alpha=32, targets=["wq", "wk", "wv", "wo", "w1", "w2", "w3"])
    # model(x) == base(x) until the adapters train (B starts at zero); only adapter parameters require grad

A target names a projection by its attribute name: each `nn.Linear` of that name inside the blocks
becomes a `LoRALinear` (the same weight and bias Parameters, so the state-dict names of the base do
not change, plus `lora_a` [r, in] and `lora_b` [out, r]); an MoE layer's stacked routed-expert weight of
that name (`w1` gate, `w3` up, `w2` down, [E, out, in]) gets one adapter per expert, stacked the same
way (`w1_lora_a` [E, r, in], `w1_lora_b` [E, out, r]), run through the same `grouped_mm` seam as the
experts themselves. The output is base(x) + (alpha / r) * B A dropout(x): never a merged weight, so the
engine decodes from the frozen base and the live adapters and sees every update at once.

MLA's `wkv_b` takes no adapter: the engine's absorbed decode reads its weight directly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nanoseek.errors import InputError
from nanoseek.model.linear import linear
from nanoseek.model.moe import MoE, grouped_mm

EXPERT_WEIGHTS = ("w1", "w3", "w2")
NOT_ADAPTABLE = {"wkv_b": "MLA's absorbed decode reads its weight directly"}


@dataclass
class Adapters:
    """What `apply_lora` did to a model (kept on it as `model.lora`)."""

    rank: int
    alpha: float
    dropout: float
    targets: list[str]
    base: str = ""
    """The directory of the base weights the adapters were trained on ('' when unknown: pretraining)."""
    names: list[str] = field(default_factory=list)
    """The adapted weights, by the state-dict name of the base weight (`layers.0.attn.wq.weight`, `layers.1.mlp.w1`)."""

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoRALinear(nn.Linear):
    """y = x W^T + b + scale * (dropout(x) A^T) B^T, with W and b the wrapped layer's own Parameters."""

    def __init__(self, base: nn.Linear, rank: int, scale: float, dropout: float, dtype: torch.dtype) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.scale = scale
        device = base.weight.device
        self.lora_a = nn.Parameter(torch.empty(rank, self.in_features, device=device, dtype=dtype))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, rank, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # PEFT's initialisation of A
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        y = linear(x, self.weight, self.bias)  # the frozen base: packed on a CPU where `linear` packs
        x = self.lora_dropout(x)
        if not torch.is_autocast_enabled(x.device.type):  # under autocast F.linear casts; a cast here would be
            x = x.to(self.lora_a.dtype)  # one more saved copy of the input per adapter
        return y + (F.linear(F.linear(x, self.lora_a), self.lora_b) * self.scale).to(y.dtype)


class LoRAMoE(MoE):
    """An MoE layer whose routed experts carry per-expert adapters on the weights in `lora_targets`.

    `apply_lora` turns an `MoE` into one in place (its class and new Parameters), so the layer keeps
    its own weights and names."""

    experts_are_weights_alone = False  # the adapters run beside them, through `experts`
    lora_targets: tuple[str, ...]
    lora_scale: float
    lora_dropout: nn.Module

    def experts(self, x_sorted: Tensor, counts: Tensor) -> Tensor:
        dtype = x_sorted.dtype
        if torch.is_autocast_enabled(x_sorted.device.type):  # autocast does not cover grouped_mm (see MoE.experts)
            dtype = torch.get_autocast_dtype(x_sorted.device.type)
        x = x_sorted.to(dtype)

        def project(name: str, rows: Tensor) -> Tensor:
            y = grouped_mm(rows, getattr(self, name).to(dtype), counts)
            if name not in self.lora_targets:
                return y
            a, b = getattr(self, f"{name}_lora_a"), getattr(self, f"{name}_lora_b")
            low = grouped_mm(self.lora_dropout(rows), a.to(dtype), counts)
            return y + grouped_mm(low, b.to(dtype), counts) * self.lora_scale

        return project("w2", F.silu(project("w1", x)) * project("w3", x))


def _lora_moe(moe: MoE, targets: Iterable[str], rank: int, scale: float, dropout: float, dtype: torch.dtype) -> None:
    moe.__class__ = LoRAMoE
    moe.lora_targets = tuple(targets)
    moe.lora_scale = scale
    moe.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
    for name in moe.lora_targets:
        w = getattr(moe, name)
        E, d_out, d_in = w.shape
        a = torch.empty(E, rank, d_in, device=w.device, dtype=dtype)
        for e in range(E):
            nn.init.kaiming_uniform_(a[e], a=math.sqrt(5))
        moe.register_parameter(f"{name}_lora_a", nn.Parameter(a))
        moe.register_parameter(
            f"{name}_lora_b", nn.Parameter(torch.zeros(E, d_out, rank, device=w.device, dtype=dtype))
        )


def apply_lora(
    model: nn.Module,
    rank: int,
    alpha: float,
    targets: list[str],
    dropout: float = 0.0,
    base: str = "",
    dtype: torch.dtype = torch.float32,
    base_dtype: torch.dtype | None = None,
) -> Adapters:
    """Freeze `model`, add adapters of `rank` to the `targets` projections of its blocks, and return what was done.

    The adapters are in `dtype` (float32 master weights for training); `base_dtype` (bf16 on CUDA) recasts
    the frozen matrices, which the optimizer no longer needs at full precision. Raises InputError for a
    rank <= 0, a target that matches nothing or one that cannot take an adapter.
    """
    if rank <= 0:
        raise InputError(f"train.lora.rank = {rank}: must be >= 1")
    if lora_of(model) is not None:
        raise ValueError("the model has adapters already")
    for t in targets:
        if t in NOT_ADAPTABLE:
            raise InputError(f"train.lora.targets: {t!r} cannot take an adapter ({NOT_ADAPTABLE[t]})")
    model.requires_grad_(False)
    if base_dtype is not None:
        for p in model.parameters():
            if p.is_floating_point() and p.dim() >= 2:
                p.data = p.data.to(base_dtype)
    adapters = Adapters(rank, alpha, dropout, list(targets), base)
    wanted = set(targets)
    for path, module in list(model.named_modules()):
        if not path.startswith("layers."):
            continue
        parent_path, _, attr = path.rpartition(".")
        if isinstance(module, nn.Linear) and attr in wanted:
            setattr(model.get_submodule(parent_path), attr, LoRALinear(module, rank, adapters.scale, dropout, dtype))
            adapters.names.append(f"{path}.weight")
        elif isinstance(module, MoE) and wanted & set(EXPERT_WEIGHTS):
            chosen = [w for w in EXPERT_WEIGHTS if w in wanted]
            _lora_moe(module, chosen, rank, adapters.scale, dropout, dtype)
            adapters.names += [f"{path}.{w}" for w in chosen]
    matched = {name.removesuffix(".weight").rpartition(".")[2] for name in adapters.names}
    unmatched = [t for t in targets if t not in matched]
    if unmatched or not targets:
        known = sorted({p.rpartition(".")[2] for p, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise InputError(
            f"train.lora.targets: {', '.join(map(repr, unmatched)) or 'none given'} match no projection of this model; "
            f"its projections: {', '.join(n for n in known if n not in NOT_ADAPTABLE)}"
        )
    model.lora = adapters
    return adapters


def lora_of(model: nn.Module) -> Adapters | None:
    """The model's `Adapters`, or None for a model without them."""
    return getattr(model, "lora", None)


def adapter_state(model: nn.Module) -> dict[str, Tensor]:
    """The adapter tensors by state-dict name (`layers.0.attn.wq.lora_a`, `layers.1.mlp.w1_lora_b`)."""
    return {k: v for k, v in model.state_dict().items() if ".lora_" in k or "_lora_" in k}


def adapter_key(base_name: str, which: str) -> str:
    """The state-dict name of the A or B matrix (which = 'a' | 'b') adapting the base weight `base_name`."""
    if base_name.endswith(".weight"):
        return f"{base_name.removesuffix('.weight')}.lora_{which}"
    return f"{base_name}_lora_{which}"


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold the adapters into the base weights (W + scale B A, computed in >= float32, stored in W's dtype)
    and remove them: the plain model again, as it computes with its adapters. Returns the model."""
    adapters = lora_of(model)
    if adapters is None:
        return model
    for name in adapters.names:
        w = model.get_parameter(name)
        acc = torch.promote_types(w.dtype, torch.float32)
        a, b = (model.get_parameter(adapter_key(name, which)).to(acc) for which in "ab")
        w.copy_((w.to(acc) + adapters.scale * (b @ a)).to(w.dtype))  # [E, out, r] @ [E, r, in] for experts
    for path, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
            plain.weight, plain.bias = module.weight, module.bias
            parent_path, _, attr = path.rpartition(".")
            setattr(model.get_submodule(parent_path), attr, plain)
        elif isinstance(module, LoRAMoE):
            for w in module.lora_targets:
                delattr(module, f"{w}_lora_a")
                delattr(module, f"{w}_lora_b")
            del module.lora_dropout, module.lora_targets, module.lora_scale
            module.__class__ = MoE
    del model.lora
    return model


__all__ = ["Adapters", "LoRALinear", "LoRAMoE", "adapter_key", "adapter_state", "apply_lora", "lora_of", "merge_lora"]
