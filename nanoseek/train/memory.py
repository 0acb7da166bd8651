"""Memory per device and bytes sent per step, for a model laid out over N devices: estimates to pick a layout by.

    nanoseek model --preset moe-1b --devices 8 --expert-parallel 4 --batch-size 4 --seq-len 2048

Training keeps float32 master weights, float32 gradients and the optimizer's float32 state
(AdamW: two moments; Muon: one momentum for the hidden matrices, AdamW for the rest).
Per device, under each layout (`nanoseek.train.parallel`):

  ddp    everything whole;
  fsdp   weights, gradients and optimizer state 1/N each, plus the weights gathered while they are used:
         the root's (embedding, head, final norm: kept from forward to backward) and two neighbouring
         blocks' (the one running and the one the backward prefetches), in the compute dtype, and whole
         float32 gradients before their reduce-scatter: one block's, and the root's (made by the head at
         the start of the backward, reduce-scattered at its end);
         DDP also keeps its gradient buckets, a second copy of the gradients it all-reduces;
  + EP   the routed experts 1/ep instead (split by expert parallelism, whole over the data-parallel ranks).

Under autocast the backward also keeps the 16-bit casts of the weights (all of them, also under FSDP
without its mixed precision: CPU). Activations are what the backward keeps of one micro-batch
(batch_size x seq_len tokens): per token and layer the inputs of each matmul and of each nonlinearity
in the compute dtype, the residual stream in float32, every routed copy's expert activations; plus
the float32 logits and their gradient. Activation checkpointing keeps each block's float32 input
instead, plus one block recomputed ('block'), or its matmul outputs ('selective'). Allocator slack,
the framework itself and communication buffers are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanoseek.model import Transformer
from nanoseek.model.attention import attention_class
from nanoseek.model.config import ModelConfig
from nanoseek.model.moe import moe_layers
from nanoseek.train.optim import _muon_eligible

GIB = 1024**3


@dataclass(frozen=True)
class Layout:
    parallel: str  # 'ddp' or 'fsdp'
    devices: int
    expert_parallel: int = 1

    def name(self) -> str:
        return self.parallel + (f" + ep{self.expert_parallel}" if self.expert_parallel > 1 else "")


@dataclass(frozen=True)
class Counts:
    """Parameter counts of a model, by what shards them and what the optimizer keeps for them."""

    total: int
    experts: int  # routed expert weights (split by expert parallelism)
    muon: int  # Muon-eligible (one state tensor under Muon)
    muon_experts: int
    root: int  # outside the blocks: embedding, head, final norm
    largest_block: int
    largest_block_without_experts: int
    largest_neighbours: int  # two consecutive blocks (one block if there is one)
    largest_neighbours_without_experts: int

    @staticmethod
    def of(cfg: ModelConfig) -> Counts:
        with torch.device("meta"):
            model = Transformer(cfg)
        experts = {id(p) for m in moe_layers(model) for p in (m.w1, m.w2, m.w3)}
        named = list(model.named_parameters())
        muon = [p for n, p in named if _muon_eligible(n, p)]
        blocks = [sum(p.numel() for p in block.parameters()) for block in model.layers]
        dense = [sum(p.numel() for p in block.parameters() if id(p) not in experts) for block in model.layers]
        neighbours = lambda sizes: max(sum(sizes[i : i + 2]) for i in range(len(sizes)))
        return Counts(
            total=sum(p.numel() for _, p in named),
            experts=sum(p.numel() for _, p in named if id(p) in experts),
            muon=sum(p.numel() for p in muon),
            muon_experts=sum(p.numel() for p in muon if id(p) in experts),
            root=sum(p.numel() for n, p in named if not n.startswith("layers.")),
            largest_block=max(blocks),
            largest_block_without_experts=max(dense),
            largest_neighbours=neighbours(blocks),
            largest_neighbours_without_experts=neighbours(dense),
        )


def state_bytes(counts: Counts, layout: Layout, optimizer: str, gather_bytes: int) -> dict[str, float]:
    """Weights, gradients, optimizer state and (FSDP) gathered weights, in bytes per device."""
    n, ep = layout.devices, layout.expert_parallel
    dense_share = 1 / n if layout.parallel == "fsdp" else 1.0
    expert_share = 1 / ep if ep > 1 else dense_share
    share = lambda experts, whole: experts * expert_share + (whole - experts) * dense_share
    params = share(counts.experts, counts.total)
    if optimizer == "muon":
        optim = 4 * share(counts.muon_experts, counts.muon) + 8 * (params - share(counts.muon_experts, counts.muon))
    else:
        optim = 8 * params
    gathered = 0.0
    if layout.parallel == "fsdp" and n > 1:  # (a block's split experts are not gathered)
        block = counts.largest_block if ep == 1 else counts.largest_block_without_experts
        pair = counts.largest_neighbours if ep == 1 else counts.largest_neighbours_without_experts
        # and in the backward whole float32 gradients before their reduce-scatter: one block's and the root's
        gathered = gather_bytes * (counts.root + pair) + 4 * (block + counts.root)
    # DDP's gradient buckets (a second copy of what it reduces; the split experts' are reduced in place)
    buffers = (
        4 * (counts.total - counts.experts if ep > 1 else counts.total) if layout.parallel == "ddp" and n > 1 else 0
    )
    return dict(weights=4 * params, gradients=4 * params, optimizer=optim, gathered=gathered, buffers=buffers)


def activation_bytes(cfg: ModelConfig, tokens: int, compute_bytes: int, checkpointing: str = "none") -> float:
    """What the backward keeps of one micro-batch of `tokens` tokens (see the module doc)."""
    q_dim, kv_dim = _attention_dims(cfg)
    d, c = cfg.d_model, compute_bytes
    attention = c * (d + 2 * q_dim + 2 * kv_dim) + 4 * 2 * d  # matmul inputs and outputs; norm inputs, fp32

    def mlp(hidden: int) -> float:
        return c * (d + 4 * hidden)  # input, gate and up outputs, silu, product

    per_layer = []
    for layer in range(cfg.n_layers):
        if cfg.layer_is_moe(layer):
            routed = cfg.top_k * mlp(cfg.moe_d_ff) + 4 * 2 * cfg.n_routed_experts  # copies; fp32 scores
            per_layer.append(attention + routed + (mlp(cfg.shared_hidden) if cfg.shared_hidden else 0))
        else:
            per_layer.append(attention + mlp(cfg.d_ff))
    logits = 2 * 4 * cfg.vocab_size  # float32 logits and their gradient
    if checkpointing == "block":
        kept = 4 * d * cfg.n_layers + max(per_layer)
    elif checkpointing == "selective":
        kept = 0.6 * sum(per_layer)  # matmul outputs kept, the elementwise rest recomputed: roughly
    else:
        kept = sum(per_layer)
    return tokens * (kept + logits)


def _attention_dims(cfg: ModelConfig) -> tuple[int, int]:
    qk, v = attention_class(cfg).head_dims(cfg)
    if cfg.attn_type == "mla":
        return cfg.n_heads * (qk + v) // 2, cfg.kv_lora_rank + cfg.qk_rope_head_dim
    return cfg.n_heads * qk, cfg.n_kv_heads * qk


def estimate(
    cfg: ModelConfig,
    layout: Layout,
    *,
    batch_size: int,
    seq_len: int,
    optimizer: str = "adamw",
    compute_bytes: int = 2,
    checkpointing: str = "none",
    gather_bytes: int | None = None,
    fsdp_mixed_precision: bool = True,
) -> dict[str, float]:
    """Bytes per device: weights, gradients, optimizer, gathered (FSDP), casts, activations and their total.

    gather_bytes: of an FSDP-gathered weight (default compute_bytes; 4 on CPU, which gathers float32).
    casts: autocast's 16-bit copies of the float32 weights, which the backward keeps: every weight a
    matmul of this device reads, unless FSDP gathers them in 16 bits already (its mixed precision on CUDA)."""
    counts = Counts.of(cfg)
    out = state_bytes(counts, layout, optimizer, gather_bytes or compute_bytes)
    cast = compute_bytes < 4 and not (layout.parallel == "fsdp" and layout.devices > 1 and fsdp_mixed_precision)
    local = counts.total - counts.experts + counts.experts / layout.expert_parallel
    out["casts"] = compute_bytes * local if cast else 0.0
    out["activations"] = activation_bytes(cfg, batch_size * seq_len, compute_bytes, checkpointing)
    out["total"] = sum(out.values())
    return out


def bytes_sent_per_step(
    cfg: ModelConfig, layout: Layout, *, tokens_per_micro_batch: int, micro_batches: int, element_bytes: int = 4
) -> dict[str, float]:
    """Closed form: bytes one device sends per optimizer step, by collective (ring algorithms; the routed
    copies spread evenly over the experts). DDP: one all-reduce of the gradients, 2 (N-1)/N of their
    bytes; FSDP, per micro-batch: each block's weights all-gathered in the forward and again in the
    backward, the root's once, every gradient reduce-scattered, (N-1)/N of the whole each; EP, per
    micro-batch and MoE layer: the copies bound for other ranks, out and back, forward and backward."""
    counts = Counts.of(cfg)
    n, ep = layout.devices, layout.expert_parallel
    dp_params = counts.total - (counts.experts if ep > 1 else 0)
    out: dict[str, float] = {}
    if n > 1 and layout.parallel == "ddp":
        out["all_reduce"] = 2 * (n - 1) / n * element_bytes * dp_params
    if n > 1 and layout.parallel == "fsdp":
        gathered = 2 * (dp_params - counts.root) + counts.root
        out["all_gather"] = micro_batches * (n - 1) / n * element_bytes * gathered
        out["reduce_scatter"] = micro_batches * (n - 1) / n * element_bytes * dp_params
    if ep > 1:
        dp = n // ep
        out["experts_all_reduce"] = 2 * (dp - 1) / dp * element_bytes * counts.experts / ep if dp > 1 else 0.0
        moe = sum(cfg.layer_is_moe(i) for i in range(cfg.n_layers))
        copies = tokens_per_micro_batch * cfg.top_k * (ep - 1) / ep
        out["all_to_all"] = micro_batches * moe * 4 * copies * cfg.d_model * element_bytes
    return out
