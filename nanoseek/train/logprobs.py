"""Token log-probs, entropy and cross-entropy from hidden states, without the [tokens, vocab] float32 logits.

    logp, entropy = token_logprobs(hidden, model.output_weight, targets, temperature)   # the RL update
    ce, aux = causal_lm_loss(model, input_ids, targets, positions, doc_ids)              # pretraining, SFT

The plain computation, `log_softmax(hidden @ W.T / T)` gathered at the targets, holds the logits of
every token in float32, and autograd keeps them (and their softmax) for the backward pass: with a
152k-token vocabulary that is 0.6 MB per token, gigabytes for one RL micro-batch. Here the tokens
go through the output layer in chunks of `CHUNK_BYTES` (64 MiB) of float32 logits: the forward pass
keeps, per token, only the log-sum-exp and the entropy; the backward pass recomputes each chunk's
logits and turns them into the gradients of the hidden states and of the output weight at once.
So the memory is one chunk's logits whatever the batch, for one more output-layer matmul. When all
tokens fit in one chunk (small vocabularies) the logits are kept instead, and nothing is recomputed.

The matmul runs in the autocast dtype when autocast is on (bf16 logits, as the plain path under
autocast), and the softmax arithmetic in float32 (float64 for a float64 model).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributed.fsdp import FSDPModule

from nanoseek.model import Transformer

CHUNK_BYTES = 1 << 26
"""Float32 logits held at once (64 MiB: about 110 tokens of a 152k vocabulary; the backward pass holds
at most two such buffers and a tile of the weight's gradient of at most half that). Larger chunks are no
faster once a chunk's matmul fills the device."""


class _ChunkedLogprobs(torch.autograd.Function):
    """(log p(target), entropy) per row of hidden [N, D] under logits hidden @ weight.T / temperature."""

    @staticmethod
    def forward(ctx, hidden: Tensor, master: Tensor, targets: Tensor, temperature: float, chunk: int, tile: int):
        # The matmul dtype is hidden's; the weight is cast here, not by autograd, so its gradient comes
        # back in the master's dtype without a second [vocab, d_model] copy in the matmul dtype.
        weight = master.to(hidden.dtype)
        acc = torch.promote_types(hidden.dtype, torch.float32)
        n = hidden.shape[0]
        logp, entropy, lse = (torch.empty(n, dtype=acc, device=hidden.device) for _ in range(3))
        kept = None
        for s in range(0, n, chunk):
            z = F.linear(hidden[s : s + chunk], weight).to(acc) / temperature
            lse_c = torch.logsumexp(z, dim=-1)
            logp[s : s + chunk] = z.gather(-1, targets[s : s + chunk, None]).squeeze(-1) - lse_c
            entropy[s : s + chunk] = lse_c - (torch.softmax(z, dim=-1) * z).sum(-1)
            lse[s : s + chunk] = lse_c
            kept = z if n <= chunk else None  # one chunk: keep its logits, the backward needs no recompute
        ctx.save_for_backward(hidden, weight, targets, lse, entropy, kept)
        ctx.temperature, ctx.chunk, ctx.tile, ctx.master_dtype = temperature, chunk, tile, master.dtype
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx, g_logp: Tensor | None, g_entropy: Tensor | None):
        hidden, weight, targets, lse, entropy, kept = ctx.saved_tensors
        if g_logp is None and g_entropy is None:
            return None, None, None, None, None, None
        need_h, need_w = ctx.needs_input_grad[:2]  # a frozen output layer (LoRA) gets no [vocab, d] buffer
        grad_h = torch.empty_like(hidden) if need_h else None
        acc_w = torch.promote_types(ctx.master_dtype, torch.float32)
        grad_w = torch.zeros(weight.shape, dtype=acc_w, device=weight.device) if need_w else None
        T, chunk = ctx.temperature, ctx.chunk
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s : s + chunk]
            # In place from here on: at most two [chunk, vocab] buffers at once (`kept` itself is never written).
            z = kept if kept is not None else F.linear(h, weight).to(lse.dtype).div_(T)
            g = z - lse[s : s + chunk, None]  # log p
            del z
            gl = None if g_logp is None else g_logp[s : s + chunk, None]
            if g_entropy is not None:  # dH / dz_j = -p_j (log p_j + H)
                p = g.exp()
                g.add_(entropy[s : s + chunk, None]).mul_(p).mul_(-g_entropy[s : s + chunk, None])
                if gl is not None:
                    g.sub_(p.mul_(gl))
                del p
            else:
                g.exp_().mul_(-gl)
            if gl is not None:  # d log p_t / dz = onehot(t) - p
                g.scatter_add_(-1, targets[s : s + chunk, None], gl)
            g = g.div_(T).to(weight.dtype)
            if need_h:
                grad_h[s : s + chunk] = g @ weight
            # The weight's gradient a tile of vocabulary rows at a time: the product of a whole chunk would be
            # a [vocab, d_model] temporary (and its float32 copy) per chunk, each the size of the gradient itself.
            for v in range(0, weight.shape[0] if need_w else 0, ctx.tile):
                grad_w[v : v + ctx.tile] += (g[:, v : v + ctx.tile].T @ h).to(grad_w.dtype)
        return grad_h, grad_w.to(ctx.master_dtype) if need_w else None, None, None, None, None


def token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    temperature: float = 1.0,
    where: Tensor | None = None,
    chunk_bytes: int = CHUNK_BYTES,
) -> tuple[Tensor, Tensor]:
    """(log softmax(hidden @ weight.T / temperature) at targets, the softmax's entropy), each shaped like targets.

    hidden [..., D], targets [...]; `where` (bool or 0/1, shaped like targets) limits the work to those
    positions, the others read 0. Differentiable in hidden and weight, through both outputs.
    """
    device_type = hidden.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
    flat_h, flat_t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    rows = None if where is None else torch.nonzero(where.reshape(-1) != 0).squeeze(-1)
    if rows is not None:
        flat_h, flat_t = flat_h.index_select(0, rows), flat_t.index_select(0, rows)
    chunk = max(1, chunk_bytes // (4 * weight.shape[0]))  # tokens a chunk
    tile = max(1, chunk_bytes // (8 * weight.shape[1]))  # vocabulary rows of the weight gradient's tile: <= 1/2 chunk
    with torch.autocast(device_type, enabled=False):
        logp, entropy = _ChunkedLogprobs.apply(flat_h.to(dtype), weight, flat_t, temperature, chunk, tile)
    if rows is None:
        return logp.view(targets.shape), entropy.view(targets.shape)
    spread = lambda values: values.new_zeros(targets.numel()).index_put((rows,), values).view(targets.shape)
    return spread(logp), spread(entropy)


def cross_entropy_sum(hidden: Tensor, weight: Tensor, targets: Tensor, chunk_bytes: int = CHUNK_BYTES) -> Tensor:
    """Summed cross-entropy of hidden @ weight.T over the targets that are not -100 (F.cross_entropy's ignore)."""
    logp, _ = token_logprobs(hidden, weight, targets.clamp(min=0), where=targets != -100, chunk_bytes=chunk_bytes)
    return -logp.sum()


def causal_lm_loss(
    model: Transformer,
    input_ids: Tensor,
    targets: Tensor,
    positions: Tensor | None = None,
    doc_ids: Tensor | None = None,
    reduction: str = "sum",
) -> tuple[Tensor, Tensor]:
    """`model.loss` without the full logits: (cross-entropy over targets != -100, MoE auxiliary loss or 0)."""
    if isinstance(model, FSDPModule):  # FSDP gathers the weights in forward() only: the plain, full-logits path
        return model.loss(input_ids, targets, positions, doc_ids, reduction=reduction)
    ce = cross_entropy_sum(model.hidden_states(input_ids, positions, doc_ids), model.output_weight, targets)
    if reduction == "mean":
        ce = ce / (targets != -100).sum().clamp(min=1)
    elif reduction != "sum":
        raise ValueError(f"reduction {reduction!r}: expected 'sum' or 'mean'")
    return ce, model.aux_loss()


def model_loss(model: Transformer) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """`model.loss`, computed without the full float32 logits (`nanoseek.train.logprobs`)."""

    def loss(
        input_ids: torch.Tensor,
        targets: torch.Tensor,
        positions: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        reduction: str = "mean",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return causal_lm_loss(model, input_ids, targets, positions, doc_ids, reduction)

    return loss
