"""GRPO and its refinements, as small pure functions over tensors.

Shapes: a batch is N = P x G completions (P prompts, G samples each, grouped
contiguously); per-token tensors are [N, T] with a 0/1 `mask` over completion tokens.

* advantages: reward minus the group mean, divided by the group std (GRPO), the batch
  std, or nothing (Dr. GRPO);
* the clipped surrogate with separate epsilon_low / epsilon_high (DAPO's clip-higher);
* loss aggregation: 'token-mean' (DAPO: every token of the batch weighs the same),
  'seq-mean' (GRPO: mean over each sequence, then over sequences), 'dr-grpo' (sum over
  tokens divided by a constant, N x max_new_tokens, so length carries no bias);
* the k3 KL estimator to a frozen reference; truncated importance sampling between
  the engine's and the trainer's log-probs; DAPO's soft overlong penalty.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from nanoseek.config import LOSS_AGGREGATIONS, REWARD_SCALINGS


def group_advantages(
    rewards: Tensor, group_size: int, scale: str = "group", eps: float = 1e-4, batch_std: float | None = None
) -> Tensor:
    """rewards [N] (N = P x G, groups contiguous) -> advantages [N].

    The std is the sample std (Bessel-corrected), as TRL computes it. `batch_std` replaces the std
    of `rewards` for scale="batch" when they are one rank's share of a larger batch.
    """
    if scale not in REWARD_SCALINGS:
        raise ValueError(f"rl.scale_rewards = {scale!r}: must be one of {', '.join(REWARD_SCALINGS)}")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale == "group":
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    elif scale == "batch":
        centred = centred / ((rewards.std() if batch_std is None else batch_std) + eps)
    return centred.reshape(-1)


def zero_variance_groups(rewards: Tensor, group_size: int) -> Tensor:
    """[P] bool: groups whose rewards are all equal (they carry no learning signal)."""
    grouped = rewards.view(-1, group_size)
    return (grouped == grouped[:, :1]).all(dim=1)


def soft_overlong_penalty(lengths: Tensor, max_new_tokens: int, buffer: int) -> Tensor:
    """DAPO: 0 up to max - buffer tokens, then falling linearly to -1 at max_new_tokens."""
    if buffer <= 0:
        return torch.zeros_like(lengths, dtype=torch.float32)
    start = max_new_tokens - buffer
    return ((start - lengths.float()) / buffer).clamp(min=-1.0, max=0.0)


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token k3 estimator of KL(policy || reference): exp(r) - r - 1 with r = ref - policy (>= 0)."""
    r = ref_logp - logp
    return torch.exp(r) - r - 1


@dataclass
class LossParts:
    loss: Tensor
    """The scalar to backpropagate (this micro-batch's share of the batch loss)."""
    clipped_low: Tensor
    """Tokens where the ratio fell below 1 - epsilon_low with a negative advantage (summed)."""
    clipped_high: Tensor
    """Tokens where the ratio rose above 1 + epsilon_high with a positive advantage (summed)."""
    kl: Tensor
    """Summed per-token KL (0 without a reference)."""


def aggregate(per_token: Tensor, mask: Tensor, mode: str, norm: AggregationNorm) -> Tensor:
    """Reduce per-token losses [n, T] of a micro-batch to its share of the whole batch's loss.

    Normalisers come from the whole batch (`norm`), so summing the micro-batch results
    gives exactly the loss of the batch in one piece.
    """
    if mode == "token-mean":
        return (per_token * mask).sum() / norm.total_tokens
    if mode == "seq-mean":
        per_seq = (per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        return per_seq.sum() / norm.n_sequences
    if mode == "dr-grpo":
        return (per_token * mask).sum() / (norm.n_sequences * norm.max_new_tokens)
    raise ValueError(f"rl.loss_agg = {mode!r}: must be one of {', '.join(LOSS_AGGREGATIONS)}")


@dataclass
class AggregationNorm:
    total_tokens: float
    n_sequences: int
    max_new_tokens: int


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    norm: AggregationNorm,
    *,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.28,
    loss_agg: str = "token-mean",
    ref_logp: Tensor | None = None,
    beta: float = 0.0,
    is_weights: Tensor | None = None,
) -> LossParts:
    """The clipped policy-gradient loss of one micro-batch.

    logp: [n, T] current policy log-probs of the sampled tokens (with grad); old_logp: the
    same under the policy that produced the batch (no grad); advantages: [n] (or [n, T] per token);
    is_weights: optional truncated importance weights [n, T] (trainer vs engine).
    """
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None] if advantages.dim() == 1 else advantages
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - epsilon_low, 1 + epsilon_high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    if is_weights is not None:
        per_token = per_token * is_weights
    kl = torch.zeros((), device=logp.device)
    if ref_logp is not None and beta > 0:
        kl_tok = kl_k3(logp, ref_logp)
        per_token = per_token + beta * kl_tok
        kl = (kl_tok.detach() * mask).sum()
    loss = aggregate(per_token, mask, loss_agg, norm)
    with torch.no_grad():
        low = ((ratio < 1 - epsilon_low) & (adv < 0)).float()
        high = ((ratio > 1 + epsilon_high) & (adv > 0)).float()
    return LossParts(loss, (low * mask).sum(), (high * mask).sum(), kl)


def truncated_is_weights(trainer_logp: Tensor, engine_logp: Tensor, cap: float) -> Tensor:
    """min(pi_trainer / pi_engine, cap) per token: corrects for engine/trainer numeric mismatch."""
    return torch.exp(trainer_logp - engine_logp).clamp(max=cap)


def token_logprobs(logits: Tensor, targets: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / T) at targets, in float32. logits [n, T, V], targets [n, T]."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, targets[..., None]).squeeze(-1)


def token_entropy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    logits = logits.float() / temperature
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)
