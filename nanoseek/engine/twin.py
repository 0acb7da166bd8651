"""The policy as the engine runs it under autocast: a twin holding 16-bit copies of the matmul weights.

RL trains float32 master weights under bf16 autocast, which casts every float32 weight at every
matmul; inside a captured decode step that is an extra read and write of all the weights per
generated token. The engine therefore decodes `rollout_policy(model, dtype)`, a twin whose matmul
weights are stored in `dtype` (the values autocast would make: its logits are bit-identical) and
whose other parameters and buffers are the policy's own tensors. `sync_rollout_policy` refreshes
it after each optimizer step, in place, so captured graphs stay valid.

Which weights are copied is a rule, not a list of module types: every floating parameter with two or
more dimensions (a matrix or a stack of them is only ever read by a matmul), except embedding
tables, which are looked up, not multiplied. A tied embedding in its role as the output layer is a
matmul weight too: the twin gets a 16-bit `lm_head` for it and keeps the shared table for the lookup.
With LoRA the adapters are such weights (copied at every sync), and the frozen base, kept in bf16 on
CUDA already, is shared rather than copied: the twin costs only the adapters.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


def _matmul_weights(model: nn.Module) -> list[tuple[str, str]]:
    """(twin parameter, policy parameter) for each weight autocast casts at every use (see the module doc)."""
    tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    pairs = [
        (name, name)
        for name, p in model.named_parameters()
        if p.is_floating_point() and p.dim() >= 2 and id(p) not in tables
    ]
    if getattr(model, "lm_head", 0) is None:  # tied embeddings (a `Transformer` without an lm_head)
        pairs.append(("lm_head.weight", "embed.weight"))
    return pairs


def rollout_policy(model: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    """The policy as the engine should run it under autocast to `dtype`: a twin with the matmul weights
    stored in `dtype`, everything else shared with the policy. With dtype None or float32, the policy."""
    if dtype is None or dtype == torch.float32:
        return model
    memo: dict[int, Any] = {id(t): t for t in (*model.parameters(), *model.buffers())}  # shared, not copied
    copies: dict[str, nn.Parameter] = {}
    for twin_name, name in _matmul_weights(model):
        weight = model.get_parameter(name)
        # A weight already in `dtype` (LoRA's frozen bf16 base) is shared as it is: .to returns the same tensor.
        copies[twin_name] = nn.Parameter(weight.detach().to(dtype), requires_grad=False)
        if twin_name == name:
            memo[id(weight)] = copies[twin_name]  # deepcopy puts the 16-bit copy in its place
    twin = copy.deepcopy(model, memo)
    if "lm_head.weight" in copies and twin.lm_head is None:  # tied: the output layer is new in the twin
        twin.lm_head = nn.Linear(*reversed(copies["lm_head.weight"].shape), bias=False, device="meta")
        twin.lm_head.weight = copies["lm_head.weight"]
    return twin


@torch.no_grad()
def sync_rollout_policy(twin: nn.Module, model: nn.Module) -> None:
    """Copy the policy's matmul weights into its twin from `rollout_policy` (no-op for the policy itself)."""
    if twin is not model:
        for twin_name, name in _matmul_weights(model):
            weight = model.get_parameter(name)
            if weight.requires_grad:  # frozen weights (a LoRA base) never change; the adapters are copied
                twin.get_parameter(twin_name).copy_(weight)


__all__ = ["rollout_policy", "sync_rollout_policy"]
