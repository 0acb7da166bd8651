"""The RL update step: clipped policy-gradient passes over one step's rollouts (the losses are `grpo`'s).

    nanoseek rl --checkpoint runs/sft                     # `update` runs once per step, after `collect`
    nanoseek rl --checkpoint runs/sft --set rl.num_iterations=2 --set rl.beta=0.04   # 2 passes, KL to the start
    python benchmarks/rl_step.py --no-trl              # `collect` + `update` timed, as `nanoseek rl` runs them

Samples are packed into right-padded micro-batches of rl.micro_batch_size; log-probs are taken at the
sampling temperature; only the policy's tokens enter the loss (an episode's environment-written tokens
are context, masked out: `Rollouts.policy_masks`); gradients are accumulated over the micro-batches of a
pass and stepped once per pass. Under torchrun each rank updates on its share of the batch with
whole-batch normalisers, and the ranks' gradients are summed before each optimizer step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from nanoseek.config import RLConfig
from nanoseek.model import Transformer
from nanoseek.model.moe import compile_model
from nanoseek.train import distributed, grpo, logprobs, parallel
from nanoseek.train.rollouts import Rollouts
from nanoseek.train.run import autocast


def pack_sequences(
    prompt: list[list[int]], completion: list[list[int]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded [n, L] prompt+completion ids, next-token targets, and the completion mask."""
    n = len(prompt)
    length = max(len(p) + len(c) for p, c in zip(prompt, completion))
    ids = torch.zeros(n, length, dtype=torch.long)
    targets = torch.zeros(n, length, dtype=torch.long)
    mask = torch.zeros(n, length)
    for i, (p, c) in enumerate(zip(prompt, completion)):
        seq = p + c
        ids[i, : len(seq)] = torch.tensor(seq)
        targets[i, : len(seq) - 1] = torch.tensor(seq[1:])
        mask[i, len(p) - 1 : len(seq) - 1] = 1.0  # position t predicts token t + 1: the completion tokens
    return ids.to(device), targets.to(device), mask.to(device)


def sequence_logprobs(
    model: Transformer,
    ids: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    with_entropy: bool = False,
    where: torch.Tensor | None = None,
    hidden_states: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token log-probs [n, L] (and their entropy, detached) without the full logits (`nanoseek.train.logprobs`);
    with `where` (the loss mask) only at those positions, 0 elsewhere. `hidden_states` stands in for
    `model.hidden_states` (its compiled form: `compiled_hidden_states`)."""
    if parallel.is_sharded(model):  # FSDP gathers the weights in forward() only: the plain, full-logits path
        logits = model(ids)
        logp = grpo.token_logprobs(logits, targets, temperature)
        logp = logp if where is None else torch.where(where.bool(), logp, 0.0)
        return logp, grpo.token_entropy(logits, temperature).detach() if with_entropy else None
    hidden, weight = (hidden_states or model.hidden_states)(ids), model.output_weight
    logp, entropy = logprobs.token_logprobs(hidden, weight, targets, temperature, where=where)
    return logp, entropy.detach() if with_entropy else None


def compiled_hidden_states(model: Transformer) -> Callable[[torch.Tensor], torch.Tensor]:
    """`model.hidden_states` through torch.compile, for the update's gradient passes (`nanoseek rl` with
    train.compile = true), compiled at the first call: the forward and its backward each one graph, dynamic in
    the micro-batch's rows and length from the start (every RL micro-batch has its own; a micro-batch of one row
    compiles once more). The log-probs after it stay eager (a chunked autograd function). On CPU the compiled
    attention is one fused block (`chunk_attention.causal_matmul_attention`). Not for a sharded model (FSDP runs its
    own forward). Measured: docs/LOG.md, 2026-12-02, seventh session."""
    compiled = compile_model(model.hidden_states)

    def forward(ids: torch.Tensor) -> torch.Tensor:
        # Only these two sizes are dynamic: `dynamic=True` would make every size symbolic and let equal ones
        # share a symbol (16 rows and the rotary table's 16 frequencies), then pin the rows to 16 with the table.
        torch._dynamo.maybe_mark_dynamic(ids, 0)
        torch._dynamo.maybe_mark_dynamic(ids, 1)
        return compiled(ids)

    return forward


def update(
    model: Transformer,
    ref_model: Transformer | None,
    optimizers: list[torch.optim.Optimizer],
    batch: Rollouts,
    advantages: torch.Tensor,
    cfg: RLConfig,
    grad_clip: float,
    device: torch.device,
    token_advantages: list[list[float]] | None = None,
    hidden_states: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, float]:
    """num_iterations passes of clipped policy-gradient updates over the batch; returns statistics.

    token_advantages (rl.turn_credit): per completion token, replacing each sample's one advantage.
    hidden_states: the policy's forward for the gradient passes in place of `model.hidden_states` (its compiled
    form, `compiled_hidden_states`); the no-grad passes keep the eager model.

    A sample whose advantage is zero adds nothing to the loss or its gradient (and, without a KL
    term, nothing at all), so it is left out of the forward and backward passes; the normalisers
    still count the whole batch, so the loss is the one over every sample. With GRPO's all-equal
    groups (most groups of a weak policy) this skips most of the update's work.

    Under torchrun `batch` is this rank's share: the normalisers count every rank's samples and the
    gradients are summed over ranks before the step (one collective per optimizer step; DDP would
    need the same number of micro-batches on every rank, which skipping does not give).
    """
    topo = distributed.topology()
    n = len(batch.rows)
    mb = cfg.micro_batch_size
    if cfg.beta > 0:
        active = list(range(n))
    elif token_advantages is not None:
        active = [i for i in range(n) if any(token_advantages[i])]
    else:
        active = torch.nonzero(advantages.cpu() != 0).flatten().tolist()
    chunks = [active[i : i + mb] for i in range(0, len(active), mb)]
    packed = []
    for idx in chunks:
        ids, targets, mask = pack_sequences(
            [batch.prompt_ids[i] for i in idx], [batch.completion_ids[i] for i in idx], device
        )
        if cfg.overlong == "mask":
            keep = torch.tensor([0.0 if batch.truncated[i] else 1.0 for i in idx], device=device)
            mask = mask * keep[:, None]
        # filled on the host, one copy to the device: the engine's log-probs, who wrote each token, and
        # (turn credit) each token's advantage
        host = torch.zeros(3, *mask.shape, dtype=mask.dtype)
        for row, i in enumerate(idx):
            start, length = len(batch.prompt_ids[i]) - 1, len(batch.completion_ids[i])
            host[0, row, start : start + length] = torch.tensor(batch.engine_logprobs[i])
            host[1, row, start : start + length] = torch.tensor(batch.policy_masks[i], dtype=mask.dtype)
            if token_advantages is not None:
                host[2, row, start : start + length] = torch.tensor(token_advantages[i])
        engine_lp, policy, adv = host.to(device, non_blocking=True)
        adv = adv if token_advantages is not None else advantages[idx].to(device)
        packed.append((idx, ids, targets, mask * policy, engine_lp, adv))

    def loss_tokens(indices: list[int]) -> float:
        """Policy tokens that enter the loss (truncated samples are masked out under overlong=mask)."""
        return float(
            sum(sum(batch.policy_masks[i]) for i in indices if not (cfg.overlong == "mask" and batch.truncated[i]))
        )

    total_tokens, n_total, trained_tokens, n_trained = distributed.sum_over_ranks(
        loss_tokens(list(range(n))), n, loss_tokens(active), len(active)
    )
    norm = grpo.AggregationNorm(max(total_tokens, 1.0), max(int(n_total), 1), cfg.max_new_tokens)
    # Under FSDP every rank runs as many passes as the busiest one (the rest are `idle_pass`es): each
    # pass all-gathers the weights, and every rank has to take part.
    sharded = parallel.is_sharded(model)
    passes = int(distributed.max_over_ranks(len(packed))[0]) if sharded else len(packed)

    # The policy that produced the batch, as the trainer computes it (and the reference, if any).
    # With one update per batch the current policy *is* that policy, so its detached log-probs
    # serve and this extra forward pass is skipped. Eval mode: these passes must not count
    # towards the routers' load statistics.
    old: list[torch.Tensor | None] = [None] * len(packed)
    ref: list[torch.Tensor] = []
    model.eval()
    with torch.no_grad(), autocast(device):
        for k, (_, ids, targets, mask, _, _) in enumerate(packed):
            if cfg.num_iterations > 1:
                old[k] = sequence_logprobs(model, ids, targets, cfg.temperature, where=mask)[0]
            if ref_model is not None:
                ref.append(sequence_logprobs(ref_model, ids, targets, cfg.temperature, where=mask)[0])
        for _ in range(len(packed), passes if cfg.num_iterations > 1 else 0):
            parallel.idle_pass(model, device, backward=False)
    model.train()

    # Statistics stay on the device until the end: a float() per micro-batch would make the host wait
    # for each backward before it could queue the next forward.
    names = ("loss", "clip_low", "clip_high", "kl", "entropy", "grad_norm", "is_weight")
    acc = {name: torch.zeros((), device=device) for name in names}
    for it in range(cfg.num_iterations):
        for k, (_, ids, targets, mask, engine_lp, adv) in enumerate(packed):
            with autocast(device):
                logp, entropy = sequence_logprobs(
                    model, ids, targets, cfg.temperature, with_entropy=it == 0, where=mask, hidden_states=hidden_states
                )
                old_k = old[k] if old[k] is not None else logp.detach()
                is_w = grpo.truncated_is_weights(old_k, engine_lp, cfg.tis_cap) if cfg.tis_cap > 0 else None
                parts = grpo.policy_loss(
                    logp,
                    old_k,
                    adv,
                    mask,
                    norm,
                    epsilon_low=cfg.epsilon_low,
                    epsilon_high=cfg.epsilon_high,
                    loss_agg=cfg.loss_agg,
                    ref_logp=ref[k] if ref else None,
                    beta=cfg.beta,
                    is_weights=is_w,
                )
                loss = parts.loss + model.aux_loss() / (len(packed) * topo.world)
            loss.backward()
            acc["loss"] += parts.loss.detach()
            acc["clip_low"] += parts.clipped_low
            acc["clip_high"] += parts.clipped_high
            acc["kl"] += parts.kl
            if entropy is not None:
                acc["entropy"] += (entropy * mask).sum()
            if is_w is not None:
                acc["is_weight"] += (is_w * mask).sum()
        for _ in range(len(packed), passes):
            parallel.idle_pass(model, device, backward=True)
        if topo.world > 1 and not sharded:  # FSDP has summed them (`parallel.prepare`, sum_gradients)
            _sum_gradients_over_ranks(model)
        if grad_clip > 0:
            norm_ = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            acc["grad_norm"] = parallel.full(norm_).detach().float()
        for opt in optimizers:
            opt.step()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
    # Clip fractions and KL are per token of the whole batch (a skipped sample is never clipped and
    # has no KL term); entropy and the IS weight are means over the tokens that were trained on.
    summed = [name for name in names if name != "grad_norm"]  # the norm is of the summed gradient already
    stats = dict(zip(summed, distributed.all_reduce_sum(torch.stack([acc[k].float() for k in summed])).tolist()))
    stats["grad_norm"] = float(acc["grad_norm"])
    per_tok, trained = max(total_tokens, 1.0), max(trained_tokens, 1.0)
    iters = cfg.num_iterations
    return dict(
        loss=stats["loss"] / iters,
        clip_low=stats["clip_low"] / (per_tok * iters),
        clip_high=stats["clip_high"] / (per_tok * iters),
        kl=stats["kl"] / (per_tok * iters),
        entropy=stats["entropy"] / trained,
        grad_norm=stats["grad_norm"],
        is_weight=stats["is_weight"] / (trained * iters) if cfg.tis_cap > 0 else 1.0,
        trained_fraction=n_trained / max(n_total, 1),
    )


def _sum_gradients_over_ranks(model: torch.nn.Module) -> None:
    """All-reduce (sum) every gradient in one flat collective; a parameter without one counts as zeros."""
    params = [p for p in model.parameters() if p.requires_grad]
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    distributed.all_reduce_sum(flat)
    offset = 0
    for p in params:
        p.grad = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
