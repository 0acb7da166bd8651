"""How the model is laid out over the ranks of `torchrun`, applied from outside the model (as torchtitan does).

    torchrun --standalone --nproc_per_node=8 -m nanoseek pretrain --set train.parallel=fsdp
    torchrun --standalone --nproc_per_node=8 -m nanoseek pretrain --set train.activation_checkpointing=block

train.parallel:
  ddp   every rank holds the whole model, gradients are averaged (PyTorch DDP; RL sums them itself);
  fsdp  FSDP2 (`torch.distributed.fsdp.fully_shard`) on every transformer block and then on the root:
        each rank holds 1/world of every parameter, gradient and optimizer state, a block's weights
        are all-gathered just before it runs and freed after, gradients are reduce-scattered. On CUDA
        the gathered weights are bf16 (float32 master shards, float32 gradient reduction);
  auto  fsdp when a CUDA device could not hold the replicated training state (16 bytes a parameter:
        float32 weights, gradients and two AdamW moments), else ddp.

train.expert_parallel = N splits each MoE layer's routed experts over N ranks (`expert_parallel.py`),
with ddp or fsdp for everything else.

train.activation_checkpointing (`none | block | selective`) recomputes each block's forward in the
backward: all of it (block), or all but the matmul and attention outputs (selective, op-level).
The MoE routers count tokens in their forward, so a recomputation restores their counts after it.

Everything else keeps working on the sharded model as on the whole one: the parameters keep their
names (they become DTensors), the optimizers, clipping and the balancing hook take them as they are,
and the routers' balancing biases are buffers, replicated on every rank and moved identically.
RL's engine decodes a full-weight twin refreshed from the shards after each step (`generation_policy`).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from nanoseek.config import TrainConfig
from nanoseek.engine.twin import rollout_policy, sync_rollout_policy
from nanoseek.errors import InputError
from nanoseek.model import Transformer
from nanoseek.model.moe import compile_model, moe_layers
from nanoseek.model.transformer import Block
from nanoseek.train import distributed, expert_parallel
from nanoseek.train.distributed import Topology
from nanoseek.train.logprobs import causal_lm_loss, model_loss


# ----------------------------------------------------------------------------- choosing the layout
def check_launch(cfg: TrainConfig) -> None:
    """FSDP and expert parallelism shard over torchrun's ranks: asked for without torchrun, or for a number
    of expert ranks that does not divide torchrun's, one line."""
    if "RANK" in os.environ:
        expert_parallel.check(cfg.expert_parallel, distributed.launched_world_size())
        return
    for name, asked in (("parallel", cfg.parallel == "fsdp"), ("expert_parallel", cfg.expert_parallel > 1)):
        if asked:
            value = getattr(cfg, name)
            raise InputError(
                f"train.{name} = {value!r}: shards the model over the ranks of torchrun; launch with "
                "torchrun --nproc_per_node=N -m nanoseek ... (one process: train.parallel = auto, expert_parallel = 1)"
            )


def resolve(cfg: TrainConfig, topo: Topology, device: torch.device, n_params: int) -> str:
    """The layout this run takes: 'single' (one process), 'ddp' or 'fsdp' (see the module doc)."""
    if topo.world == 1:
        return "single"
    if cfg.parallel != "auto":
        return cfg.parallel
    if device.type == "cuda" and 16 * n_params > 0.8 * torch.cuda.get_device_properties(device).total_memory:
        return "fsdp"
    return "ddp"


def prepare(model: Transformer, cfg: TrainConfig, layout: str, device: torch.device, sum_gradients: bool) -> None:
    """Activation checkpointing, then the sharding of `layout`, applied to `model` in place.

    sum_gradients: reduce gradients over ranks as a sum (RL's convention), not FSDP's average."""
    checkpoint_blocks(model, cfg.activation_checkpointing)
    if cfg.expert_parallel > 1:
        if not model.cfg.is_moe:
            raise InputError(f"train.expert_parallel = {cfg.expert_parallel}: the model has no routed experts")
        expert_parallel.check(cfg.expert_parallel, distributed.topology().world, model.cfg.n_routed_experts)
        if sum_gradients:
            raise InputError("train.expert_parallel: for pretraining and SFT (RL's engine decodes whole experts)")
        expert_parallel.apply(model, expert_parallel.mesh(device, cfg.expert_parallel))
    if layout == "fsdp":
        shard(model, device, sum_gradients)


def shard(model: Transformer, device: torch.device, sum_gradients: bool = False) -> None:
    """FSDP2 over all ranks: each block its own unit (gathered only while it runs), the rest the root's.
    Each rank's shards go to `device` (the model may still be on the host: the device never holds it whole).
    Experts split by expert parallelism stay as they are (their gradients are `finish_gradients`')."""
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if device.type == "cuda" else None
    kwargs: dict[str, Any] = {"mesh": init_device_mesh(device.type, (distributed.topology().world,))}
    if mp is not None:
        kwargs["mp_policy"] = mp
    experts = set(expert_parallel.expert_params(model).values())
    if experts:
        kwargs["ignored_params"] = experts
    for block in model.layers:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    if sum_gradients:
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_gradient_divide_factor(1.0)
                module.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no pre-scaled one)


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a DTensor gathered from its shards (a collective), any other tensor as it is."""
    return t.full_tensor() if isinstance(t, DTensor) else t


# ----------------------------------------------------------------------------- the loss under each layout
class _LossModule(nn.Module):
    """`model.loss` as a module's forward: DDP synchronises gradients through the forward it wraps."""

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, targets, positions, doc_ids) -> tuple[torch.Tensor, torch.Tensor]:
        return causal_lm_loss(self.model, input_ids, targets, positions, doc_ids, reduction="sum")


def loss_function(
    model: Transformer, layout: str, device: torch.device, compile: bool
) -> tuple[Callable[..., tuple[torch.Tensor, torch.Tensor]], Callable[[], AbstractContextManager]]:
    """(`model.loss` as this layout computes it, the context for a micro-batch that must not sync gradients).

    DDP averages gradients over ranks in the backward of the last micro-batch. FSDP reduce-scatters
    after every micro-batch (keeping unsharded gradients across micro-batches would cost what
    sharding saves); its average is DDP's."""
    if layout == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # Buffers are not broadcast: the routers' load counts are per rank until the balancing hook
        # sums them, and the balancing bias moves identically on every rank.
        # (newer torch renames `broadcast_buffers` and warns on the old name)
        no_buffer_sync = (
            "forward_sync_buffers"
            if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
            else "broadcast_buffers"
        )
        experts = [f"model.{name}" for name in expert_parallel.expert_params(model)]  # reduced over dp only
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(loss_module := _LossModule(model), experts)
        ddp = DistributedDataParallel(
            loss_module, device_ids=[device.index] if device.type == "cuda" else None, **{no_buffer_sync: False}
        )
        ddp_loss = compile_model(ddp) if compile else ddp
        return (lambda ids, tgt, pos, doc, reduction: ddp_loss(ids, tgt, pos, doc)), ddp.no_sync
    # Compile the loss function itself: `torch.compile(model)` would leave this function eager.
    loss = model_loss(model)
    return (compile_model(loss) if compile else loss), nullcontext


def finish_gradients(model: Transformer, max_norm: float) -> torch.Tensor:
    """After a step's last backward: the split experts' gradients reduced (expert parallelism), then every
    gradient clipped to a norm of max_norm (0: not clipped); returns the norm before clipping (0 unclipped)."""
    expert_parallel.reduce_gradients(model)
    if max_norm <= 0:
        return torch.tensor(0.0)
    return full(expert_parallel.clip_gradients(model, max_norm))


# ----------------------------------------------------------------------------- activation checkpointing
# Saved by selective checkpointing: what is costly to recompute (matmuls, attention); the rest
# (norms, activations, routing, casts) is recomputed in the backward.
_SAVED_OPS = {
    getattr(torch.ops.aten, name)
    for name in (
        "mm",
        "addmm",
        "bmm",
        "_grouped_mm",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
    )
    if hasattr(torch.ops.aten, name)
}


# ... and nanoseek's CPU kernels for the same (`model/cpu_kernel.py`; loaded at their first use, so named here).
_SAVED_OWN_OPS = {"nanoseek.chunk_attention", "nanoseek.float32_experts_train"}


def _selective_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    saved = op.overloadpacket in _SAVED_OPS or str(op.overloadpacket) in _SAVED_OWN_OPS
    return CheckpointPolicy.MUST_SAVE if saved else CheckpointPolicy.PREFER_RECOMPUTE


@contextmanager
def _routers_unchanged(block: nn.Module) -> Iterator[None]:
    """Undo what a recomputed forward does to the routers: count its tokens again, replace the aux loss."""
    layers = moe_layers(block)
    saved = [(m.router.tokens_per_expert.clone(), m.router.last_load.clone(), m.aux_loss) for m in layers]
    try:
        yield
    finally:
        for m, (tokens, load, aux) in zip(layers, saved):
            m.router.tokens_per_expert.copy_(tokens)
            m.router.last_load.copy_(load)
            m.aux_loss = aux


class CheckpointedBlock(Block):
    """A `Block` whose forward, when it is recorded for a backward, is recomputed there (the class of a
    block after `checkpoint_blocks`; its parameters keep their names, so checkpoints do not change)."""

    checkpointing = "block"

    def forward(self, *args: Any) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return super().forward(*args)
        return checkpoint(super().forward, *args, use_reentrant=False, context_fn=self._contexts)

    def _contexts(self) -> tuple[AbstractContextManager, AbstractContextManager]:
        if self.checkpointing == "selective":
            forward_ctx, recompute_ctx = create_selective_checkpoint_contexts(_selective_policy)
            return forward_ctx, _entered_together(_routers_unchanged(self), recompute_ctx)  # counts saved outside
        return nullcontext(), _routers_unchanged(self)


@contextmanager
def _entered_together(*contexts: AbstractContextManager) -> Iterator[None]:
    with contexts[0], contexts[1]:
        yield


def checkpoint_blocks(model: Transformer, mode: str) -> None:
    """Turn activation checkpointing of every block on ('block', 'selective') or leave it off ('none')."""
    if mode == "none":
        return
    for block in model.layers:
        block.__class__ = CheckpointedBlock
        block.checkpointing = mode


# ----------------------------------------------------------------------------- RL: generation and idle passes
def generation_policy(model: Transformer, dtype: torch.dtype | None) -> nn.Module:
    """The model the engine decodes: `rollout_policy`'s twin, or, when `model` is sharded, a whole-weight
    twin built from the shards (the only whole copy: the policy's float32 weights stay sharded)."""
    if not is_sharded(model):
        return rollout_policy(model, dtype)
    device = next(model.parameters()).device
    with torch.device("meta"):
        plain = Transformer(model.cfg)
    plain.to_empty(device=device)
    refresh_generation_policy(plain, model)
    twin = rollout_policy(plain, dtype)  # 16-bit matmul weights where autocast uses them; `plain` then goes
    return twin.eval()


@torch.no_grad()
def refresh_generation_policy(twin: nn.Module, model: Transformer) -> None:
    """After an optimizer step: the policy's weights into the engine's twin, in place (graphs stay valid).
    From shards, one parameter at a time is gathered (every rank must call this)."""
    if not is_sharded(model):
        sync_rollout_policy(twin, model)
        return
    params = dict(model.named_parameters())
    for name, p in twin.named_parameters():
        source = params[name] if name in params else params["embed.weight"]  # a tied output layer
        p.copy_(full(source.detach()))
    for name, b in twin.named_buffers():
        b.copy_(model.get_buffer(name))


def idle_pass(model: Transformer, device: torch.device, backward: bool) -> None:
    """A forward (and backward) that changes no weight, gradient or router count: under FSDP a rank with
    fewer micro-batches than the others must still join every all-gather and reduce-scatter."""
    ids = torch.zeros(1, 2, dtype=torch.long, device=device)
    with _routers_unchanged(model), torch.set_grad_enabled(backward):
        logits = model(ids)
        if backward:
            (logits.float().sum() * 0.0).backward()
