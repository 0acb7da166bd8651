"""DeepSeekMoE: fine-grained routed SwiGLU experts + always-on shared experts.

Routing is token-choice top-k. The per-expert `e_score_correction_bias` (DeepSeek-V3's
name, so checkpoints map one to one) is added to the scores only to *choose* experts;
the gate weights come from the unbiased scores. It is trained by no gradient: after
each optimizer step `update_bias()` nudges it by `rate * sign(mean_load - load)`
(auxiliary-loss-free load balancing), installed as an optimizer hook by
`install_balancing_hook`.

The experts run without a Python loop: token copies are sorted by expert and the
three expert matmuls each go through one call, `grouped_mm`, which is the seam to
swap kernels: torch._grouped_mm where this torch has it for the rows' dtype (bfloat16
on CUDA; float32 and bfloat16 on CPU for decoding only: `_kernel_ok`), a padded
bmm elsewhere (float64, other dtypes, training on CPU). A compiled CPU decode step of few rows
(`ROWS_AS_ONE_LOOP`) does not sort at all: each token copy is multiplied by its own expert's
weights in one fused loop (`MoE._each_copy_by_its_expert`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from nanoseek.model import cpu_kernel
from nanoseek.model.config import ModelConfig
from nanoseek.model.linear import Linear, linears

# Set to False to force the padded-bmm fallback everywhere (benchmarks compare both).
USE_GROUPED_MM_KERNEL = True


# Device types whose training forward routes token copies by gathers both ways (`_GatherRows`) instead of an
# index_select out and an index_add_ back. On CUDA those two are atomic scatter-adds (index_add_ forward, and
# index_select's backward): the largest kernel of an eager bf16 training step on an H200, 14% of moe-1b's and
# 18% of the Qwen3-MoE shape's (docs/LOG.md, 2026-12-04). On CPU index_add_ is a plain loop and the gathers
# measured 0.96-1.0x, so CPU keeps it (tests add "cpu" to check the gathers against float64).
GATHER_ROUTING_DEVICES = {"cuda"}

# The dtypes torch._grouped_mm takes, per device type (torch 2.13: bf16 on sm90+ GPUs; float32 and bf16 on CPU).
_KERNEL_DTYPES = {"cuda": (torch.bfloat16,), "cpu": (torch.float32, torch.bfloat16)}


def _kernel_ok(x: Tensor, dtype: torch.dtype | None = None) -> bool:
    """Whether torch._grouped_mm can take these rows (in `dtype`, when they are about to be cast).
    Rows must be 16-byte aligned: d_in a multiple of 8 (callers check d_out the same way).

    On CPU only in inference mode (the engine's decoding, eager or compiled): torch 2.13's CPU kernel is one
    matmul per expert, forward and backward, and the padded bmm's few large calls were faster to train at every
    shape measured (2 threads, bf16 autocast, whole training steps interleaved: 64 experts of 64 x 32 at 16 rows
    each 19.6 vs 24.1 ms, tiny-moe at 16 x 256 tokens 243 vs 304 ms, at 2 x 64 equal; docs/LOG.md, 2026-12-02,
    sixth session). The trainer's no-grad passes (RL's old and reference log-probs, evaluation losses) take the
    padded path too, so they multiply as its gradient passes do; a compiled training step could not take the
    kernel anyway (`_cpu_grouped_mm` has no autograd formula). Inside a compiled graph the test is on grad mode
    instead: Dynamo cannot trace `torch.is_inference_mode_enabled` and would split the engine's compiled decode
    step at every MoE layer (it did for a session: tiny-moe decoded at about half its speed)."""
    if x.device.type != "cpu":
        cpu_trainer = False
    elif torch.compiler.is_compiling():
        cpu_trainer = torch.is_grad_enabled()
    else:
        cpu_trainer = not torch.is_inference_mode_enabled()
    return (
        USE_GROUPED_MM_KERNEL
        and (dtype or x.dtype) in _KERNEL_DTYPES.get(x.device.type, ())
        and hasattr(torch, "_grouped_mm")
        and x.shape[-1] % 8 == 0
        and not cpu_trainer
    )


def grouped_mm(x: Tensor, w: Tensor, counts: Tensor) -> Tensor:
    """Rows of `x` grouped by expert (group e has counts[e] rows, in order) times `w[e].T`.

    x: [M, d_in], w: [E, d_out, d_in], counts: [E] int -> [M, d_out].
    Through the kernel this is one grouped GEMM with no host synchronisation (so it can sit in a
    CUDA graph or a compiled CPU decode step); the padded fallback reads the largest count on the host.
    """
    if _kernel_ok(x) and w.shape[-2] % 8 == 0:  # 16-byte aligned output rows too
        offsets = torch.cumsum(counts, 0, dtype=torch.int32)
        if x.device.type == "cpu" and torch.compiler.is_compiling():
            return _cpu_grouped_mm(x, w.transpose(-2, -1), offsets)
        return torch._grouped_mm(x, w.transpose(-2, -1), offs=offsets)
    return _padded_grouped_mm(x, w, counts)


ROWS_AS_ONE_LOOP = 256
"""A compiled CPU decode step with at most this many token copies (tokens x top_k) runs its experts as one fused
loop per matmul, each copy times its own expert's weights where they lie (`MoE.forward`), unsorted: no sort, no
counts, no scatter-add back, ~15 library calls a step fewer at tiny-moe's 3 MoE layers (whole calls, one process,
alternated: batch 32 1.07x / 1.03x, batch 4 1.09x against the same loop over sorted copies; docs/LOG.md, 2026-12-05).
torch._grouped_mm's per-expert calls cost ~10 us each (tiny-moe, batch 2 / 32 / 64 / 256: 0.57 -> 0.47, 1.7 -> 1.6,
5.6 -> 2.9, 19 -> 16 ms a step as one loop, sorted)."""


FLOAT32_EXPERTS = True
"""Set to False to keep the routed experts of a float32 pass without gradients off `cpu_kernel.float32_experts`
(`MoE.uses_float32_kernel`; benchmarks compare both)."""


def _times_own_expert(x: Tensor, w: Tensor, expert: Tensor) -> Tensor:
    """x [M, d_in] row i times w[expert[i]].T ([E, d_out, d_in]) -> [M, d_out], written as one reduction, which
    inductor compiles into one loop."""
    return (x[:, None, :] * w[expert]).sum(-1)


def _cpu_grouped_mm_kernel(x: Tensor, w_t: Tensor, offs: Tensor) -> Tensor:
    return torch._grouped_mm(x, w_t, offs=offs)


# torch._grouped_mm as an opaque operation for torch.compile on CPU (many rows): torch 2.13's shape function for it
# only accepts bfloat16, so a float32 call could not be traced. A plain CPU kernel (torch.library.define/impl, as
# `linear._packed_linear`), inference only: no autograd formula, so a compiled training step on CPU takes the padded
# path (`_kernel_ok`).
torch.library.define("nanoseek::cpu_grouped_mm", "(Tensor x, Tensor w_t, Tensor offs) -> Tensor")
torch.library.impl("nanoseek::cpu_grouped_mm", "cpu", _cpu_grouped_mm_kernel)


@torch.library.register_fake("nanoseek::cpu_grouped_mm")
def _(x: Tensor, w_t: Tensor, offs: Tensor) -> Tensor:
    return x.new_empty(x.shape[0], w_t.shape[-1])


_cpu_grouped_mm = torch.ops.nanoseek.cpu_grouped_mm.default


# On CPU each expert's 16-bit matmul costs tens of microseconds more than a float32 one (oneDNN converts and
# reorders per call), so under bf16 autocast the experts gain only when each does enough work; below this many
# multiply-adds per expert per matmul float32 is faster (torch 2.13, AVX-512 BF16: fwd + bwd 2-7x faster in
# float32 at 4-32 rows of 64 x 32; bf16 ahead from ~2^19: docs/LOG.md, 2026-12-01, fourth session). On CPU the
# kernel now serves decoding only (`_kernel_ok`; the trainer's padded bmm autocasts like any
# matmul); the engine's bf16 twin (engine/twin.py) does not follow this rule either, a CPU-only
# engine/trainer difference that truncated importance sampling absorbs like any other.
_CPU_BF16_MIN_MACS = 1 << 19


# Under bf16 autocast, float32 experts through `cpu_kernel.float32_experts` still beat bf16 products (their casts,
# sort and scatter) at 25M multiply-adds per expert per matmul (small-moe, 2,048 tokens, one layer: 13.4 against
# 14.5 ms; tiny-moe 2.6 against 3.6 at 6M; AMX, torch 2.13: docs/LOG.md, 2026-12-05, thirty-first session), so a
# long prefill's experts stay float32 below this many (`MoE.uses_float32_kernel`). Not measured above it.
_FLOAT32_KERNEL_MIN_MACS = 1 << 25

# Eager training through the kernel's forward and backward operations, one MoE layer's forward + backward against
# the padded bmm (AMX, 2 threads; docs/LOG.md, 2026-12-05, thirty-fourth session): in float32 1.18-1.6x faster at
# every shape measured (tiny-moe 128 and 4,096 tokens, small-moe 1,024 and 4,096), so a float32 trainer always takes
# it; under bf16 autocast 1.63x / 1.19x / 0.97x at 2^18.6 / 2^21.6 / 2^23.6 multiply-adds per expert per matmul
# (tiny-moe), 1.28x / 1.05x / 0.91x at 2^20.6 / 2^23.6 / 2^25.6 (small-moe), so below this many.
_FLOAT32_TRAIN_MAX_MACS = 1 << 23


def _experts_dtype(x: Tensor, n_experts: int, d_ff: int) -> torch.dtype:
    """The dtype the experts multiply in: autocast's, as for any matmul (autocast does not cover
    _grouped_mm), except on CPU for too little work per expert (the rows' own dtype, float32 in training)."""
    if not torch.is_autocast_enabled(x.device.type):
        return x.dtype
    # Eager only: a compiled step's padded experts follow autocast.
    if x.device.type == "cpu" and not torch.compiler.is_compiling():
        if _too_little_for_bf16(x.shape[0], n_experts, x.shape[-1] * d_ff, _CPU_BF16_MIN_MACS):
            return x.dtype
    return torch.get_autocast_dtype(x.device.type)


def _too_little_for_bf16(rows: int, n_experts: int, macs_per_row: int, min_macs: int) -> bool:
    """Whether experts sharing `rows` rows do fewer than `min_macs` multiply-adds each per matmul, so that under
    autocast on a CPU they are faster in float32. In integers: a traced row count stays a symbol, not a float."""
    return rows * macs_per_row < min_macs * max(n_experts, 1)


def count_per_expert(expert_ids: Tensor, n_experts: int) -> Tensor:
    """How many entries of expert_ids name each expert. Unlike torch.bincount, no host sync on CUDA."""
    flat = expert_ids.reshape(-1)
    return torch.zeros(n_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def _padded_rows(counts: Tensor, n_rows: int) -> tuple[Tensor, int]:
    """For n_rows rows grouped by expert: each row's index in a flat [E * capacity] padded buffer, and capacity."""
    n_experts = counts.shape[0]
    # output_size (= counts.sum()) spares a host read, and torch.compile a graph break.
    expert_of_row = torch.repeat_interleave(torch.arange(n_experts, device=counts.device), counts, output_size=n_rows)
    starts = torch.cumsum(counts, 0) - counts
    capacity = int(counts.max()) if counts.numel() else 0  # host read: the fallback's one sync
    if torch.compiler.is_compiling():
        # In a graph compiled by `compile_model` the capacity is a symbol, known only at run time. Inductor's bmm
        # asks whether its batch size is 1, which it cannot answer for a symbol: at least 2 answers it (one
        # padding row more when every expert gets at most one copy).
        capacity = max(capacity, 2)
    slot = torch.arange(expert_of_row.shape[0], device=counts.device) - starts[expert_of_row]
    return expert_of_row * capacity + slot, capacity


def _pad(x: Tensor, rows: Tensor, n_experts: int, capacity: int) -> Tensor:
    # index_copy/index_select (not advanced indexing): their backward passes are plain gathers/scatters.
    # (No -1 in the view: capacity is 0 on an expert-parallel rank that receives no rows.)
    buf = x.new_zeros(n_experts * capacity, x.shape[1]).index_copy(0, rows, x)
    return buf.view(n_experts, capacity, x.shape[1])


def _unpad(y: Tensor, rows: Tensor) -> Tensor:
    return y.reshape(-1, y.shape[-1]).index_select(0, rows)


def _padded_grouped_mm(x: Tensor, w: Tensor, counts: Tensor) -> Tensor:
    """Loop-free fallback: scatter rows into an [E, max_count, d_in] buffer and use one bmm.

    Correct for any device and dtype (float64 included); reads max_count on the host.
    """
    rows, capacity = _padded_rows(counts, x.shape[0])
    return _unpad(torch.bmm(_pad(x, rows, w.shape[0], capacity), w.transpose(-2, -1)), rows)


class _GatherRows(torch.autograd.Function):
    """`x.index_select(0, index)` where every row of `x` is taken exactly `k` times, with a backward that gathers
    too: the gradient of row r sums rows `inverse[r*k : r*k + k]` of the output's gradient. index_select's own
    backward, and the index_add_ this replaces in the combine, scatter-add with atomics on CUDA
    (`GATHER_ROUTING_DEVICES`); gathers are also deterministic."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, index: Tensor, inverse: Tensor, k: int) -> Tensor:
        ctx.save_for_backward(inverse)
        ctx.k = k
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        (inverse,) = ctx.saved_tensors
        rows = grad.index_select(0, inverse)
        if ctx.k > 1:
            rows = rows.view(-1, ctx.k, grad.shape[-1]).sum(1)
        return rows, None, None, None


def compile_model(fn: Callable, **options: Any) -> Callable:
    """torch.compile for a function that trains the model (a loss, a forward with gradients), with what the MoE
    layers' padded path needs: its one host read (the capacity) traced as a symbol (Dynamo's
    `capture_scalar_outputs`), so the forward and backward stay one graph each, not split at every MoE layer.
    Measured: a compiled CPU training step at `train_step.py --quick`'s shape went from 13 graphs to 1 (docs/LOG.md,
    2026-12-02, ninth session). The setting holds only while `fn` runs (Dynamo traces at the call; ~15 us a
    call, why the engine's decode step, which takes the grouped kernel and reads nothing, does without). On a CPU
    our float32 library is built before the first trace (Dynamo may not run a build: the training attention's
    kernel, `chunk_attention`, is in it)."""
    compiled = torch.compile(fn, **options)

    def run(*args: Any, **kwargs: Any) -> Any:
        if any(isinstance(a, Tensor) and a.device.type == "cpu" for a in args):
            cpu_kernel.float32_available()  # once: it remembers
        with torch._dynamo.config.patch(capture_scalar_outputs=True):
            return compiled(*args, **kwargs)

    return run


class SwiGLU(nn.Module):
    """Dense gated MLP: w2(silu(w1 x) * w3 x)."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.w1 = Linear(d_model, hidden, bias=False)  # gate
        self.w3 = Linear(d_model, hidden, bias=False)  # up
        self.w2 = Linear(hidden, d_model, bias=False)  # down

    def forward(self, x: Tensor) -> Tensor:
        gate, up = linears(x, (self.w1, self.w3))
        return self.w2(F.silu(gate) * up)


class Router(nn.Module):
    """Scores experts, picks top-k (optionally group-limited) with a selection-only bias."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.d_model))
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts))
        # Token copies routed to each expert since the last bias update (training only).
        self.register_buffer("tokens_per_expert", torch.zeros(cfg.n_routed_experts), persistent=False)
        # For logging: the loads of the most recent forward, or, once a training step's bias update
        # has run, of that whole step (every micro-batch, and every rank under torchrun).
        self.register_buffer("last_load", torch.zeros(cfg.n_routed_experts), persistent=False)

    _FLOAT32_BUFFERS = ("e_score_correction_bias", "tokens_per_expert", "last_load")

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Router:
        """`.to(bfloat16)` / `.half()` move these buffers but keep them float32: the selection bias moves
        by ~1e-3 per step, below bf16's resolution near 0.1, and bf16 token counts are inexact above 256."""
        kept = {name: getattr(self, name) for name in self._FLOAT32_BUFFERS}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            new = getattr(self, name)
            if old.dtype == torch.float32 and new.dtype != torch.float32:
                setattr(self, name, old.to(new.device))
        return self

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x: [N, D] -> (expert ids [N, k], gate weights [N, k] in x's dtype, scores [N, E] in >= float32)."""
        cfg = self.cfg
        # Scores in at least float32: bf16 scores would flip near-tied expert choices. Under autocast the matmul
        # itself runs in autocast's dtype whatever its inputs' (as DeepSeek-V3's gate runs in the model's dtype),
        # so its output is cast back before the score function and the top-k.
        work = torch.promote_types(x.dtype, torch.float32)
        logits = F.linear(x.to(work), self.weight.to(work)).to(work)
        scores = logits.sigmoid() if cfg.score_func == "sigmoid" else logits.softmax(dim=-1)
        choice = scores + self.e_score_correction_bias.to(work)
        if cfg.n_groups > 1:
            grouped = choice.view(x.shape[0], cfg.n_groups, -1)
            # DeepSeek-V3 ranks groups by the sum of their two best scores; softmax routers (V2) by the best.
            best = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values
            group_score = best.sum(-1) if cfg.score_func == "sigmoid" else best[..., 0]
            keep = torch.zeros_like(group_score, dtype=torch.bool)
            keep.scatter_(1, group_score.topk(cfg.topk_groups, dim=-1).indices, True)
            choice = grouped.masked_fill(~keep[..., None], float("-inf")).view_as(choice)
        expert_ids = choice.topk(cfg.top_k, dim=-1).indices
        weights = scores.gather(1, expert_ids)
        if cfg.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        weights = weights * cfg.routed_scaling_factor
        with torch.no_grad():
            load = count_per_expert(expert_ids, cfg.n_routed_experts).to(self.last_load.dtype)
            self.last_load.copy_(load)
            if self.training:
                self.tokens_per_expert.add_(load)
        return expert_ids, weights.to(x.dtype), scores

    @torch.no_grad()
    def update_bias(self) -> None:
        """Auxiliary-loss-free balancing step: raise the bias of under-loaded experts, lower over-loaded."""
        load = self.tokens_per_expert
        # No `if load.sum() == 0: return` (a host sync per layer per step): with no tokens counted,
        # sign(mean - load) is 0 everywhere and the bias does not move anyway.
        self.e_score_correction_bias.add_(self.cfg.bias_update_rate * torch.sign(load.mean() - load))
        self.last_load.copy_(load)
        load.zero_()


class MoE(nn.Module):
    """Routed experts (stacked weights, grouped GEMMs) + fused shared experts."""

    experts_are_weights_alone = True
    """The routed experts are w1, w3 and w2 alone, so paths that read them directly (not through `experts`) may run
    (`LoRAMoE` adds adapters beside them)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        E, D, F_ = cfg.n_routed_experts, cfg.d_model, cfg.moe_d_ff
        self.router = Router(cfg)
        # Stacked expert weights in nn.Linear layout ([out, in]) so per-expert HF tensors map directly.
        self.w1 = nn.Parameter(torch.empty(E, F_, D))  # gate
        self.w3 = nn.Parameter(torch.empty(E, F_, D))  # up
        self.w2 = nn.Parameter(torch.empty(E, D, F_))  # down
        self.shared = SwiGLU(D, cfg.shared_hidden) if cfg.shared_hidden > 0 else None
        self.shared_gate = Linear(D, 1, bias=False) if cfg.shared_expert_gate and self.shared else None
        self.aux_loss: Tensor | None = None
        # The seam for expert parallelism (`nanoseek.train.parallel`): when set, the sorted token copies and
        # their counts per expert go to it instead of `experts`, which then holds this rank's experts only.
        self.expert_dispatch: Callable[[Tensor, Tensor], Tensor] | None = None

    def uses_grouped_kernel(self, x: Tensor, dtype: torch.dtype) -> bool:
        """Whether `experts` runs torch._grouped_mm on rows like `x` cast to `dtype` (else the padded bmm; on
        CPU the kernel serves decoding only: `_kernel_ok`)."""
        return _kernel_ok(x, dtype) and self.cfg.moe_d_ff % 8 == 0

    def experts(self, x_sorted: Tensor, counts: Tensor) -> Tensor:
        """SwiGLU of each row by its own expert; rows sorted by expert with `counts` per expert."""
        # Training keeps float32 weights under bf16 autocast, and the RMSNorm before this layer hands
        # over float32 rows; autocast does not cover _grouped_mm, so cast here as autocast would for a
        # matmul, or the trainer would never reach the kernel. (.to is a no-op when nothing changes.)
        dtype = _experts_dtype(x_sorted, counts.shape[0], self.cfg.moe_d_ff)
        if self.uses_grouped_kernel(x_sorted, dtype):
            x = x_sorted.to(dtype)
            h = F.silu(grouped_mm(x, self.w1.to(dtype), counts)) * grouped_mm(x, self.w3.to(dtype), counts)
            return grouped_mm(h, self.w2.to(dtype), counts)
        # Fallback: pad once into [E, capacity, D], three bmm, unpad once (padding rows stay zero).
        rows, capacity = _padded_rows(counts, x_sorted.shape[0])
        buf = _pad(x_sorted, rows, self.w1.shape[0], capacity)  # the experts this module holds
        h = F.silu(torch.bmm(buf, self.w1.transpose(-2, -1))) * torch.bmm(buf, self.w3.transpose(-2, -1))
        return _unpad(torch.bmm(h, self.w2.transpose(-2, -1)), rows)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        expert_ids, weights, scores = self.router(flat)
        if self.uses_float32_kernel(flat, expert_ids.shape[1]):
            routed = cpu_kernel.float32_experts(flat, expert_ids, weights, self.w1, self.w3, self.w2)
        elif self._experts_as_one_loop(flat, expert_ids.shape[1]):
            routed = self._each_copy_by_its_expert(flat, expert_ids, weights)
        else:
            routed = self._sorted_by_expert(flat, expert_ids, weights)

        if self.shared is not None:
            shared = self.shared(flat)
            if self.shared_gate is not None:
                shared = shared * torch.sigmoid(self.shared_gate(flat))
            routed = routed + shared

        self.aux_loss = None
        if self.training and self.cfg.aux_loss_coef > 0:
            self.aux_loss = self._sequence_aux_loss(expert_ids, scores, shape)
        return routed.view(shape)

    def _sorted_by_expert(self, flat: Tensor, expert_ids: Tensor, weights: Tensor) -> Tensor:
        """The routed experts' output [N, D], the N*k token copies sorted by expert for `experts` (or the
        expert-parallel dispatch) and combined back, each token's k outputs weighted and summed."""
        k = expert_ids.shape[1]
        # Sort the N*k token copies (copy c = token c // k, its (c % k)-th expert) by expert; stable so equal
        # experts keep token order. order[i]: the copy at sorted position i.
        flat_ids = expert_ids.flatten()
        order = torch.argsort(flat_ids, stable=True)
        counts = count_per_expert(flat_ids, self.cfg.n_routed_experts)
        run_experts = self.experts if self.expert_dispatch is None else self.expert_dispatch
        if torch.is_grad_enabled() and flat.device.type in GATHER_ROUTING_DEVICES:
            # Gathers both ways (_GatherRows), back to token order, each token's k outputs weighted and summed.
            # inverse[c]: the sorted position of copy c.
            inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.shape[0], device=order.device))
            out_sorted = run_experts(_GatherRows.apply(flat, order // k, inverse, k), counts)
            per_copy = _GatherRows.apply(out_sorted, inverse, order, 1).view(flat.shape[0], k, -1)
            return (per_copy * weights.unsqueeze(-1)).sum(1).to(flat.dtype)
        # inference, and CPU training: the scatter-add combine (~30 us a layer less in eager CPU decoding)
        token_of_copy = order // k
        out_sorted = run_experts(flat.index_select(0, token_of_copy), counts) * weights.flatten()[order, None]
        return torch.zeros_like(flat).index_add_(0, token_of_copy, out_sorted)

    def uses_float32_kernel(self, flat: Tensor, k: int) -> bool:
        """Whether the routed experts of rows `flat` [N, D], k copies each, run as one `cpu_kernel.float32_experts`
        call: a CPU pass over float32 rows and weights with widths in multiples of 16, where the kernel is built.
        Without gradients (compiled and eager decoding, prefill, evaluation) under autocast only below the kernel's
        threshold, `_FLOAT32_KERNEL_MIN_MACS` (a long prefill's). With gradients (eager and compiled training: the
        backward is the kernel's own operation) under autocast only below `_FLOAT32_TRAIN_MAX_MACS`, where float32
        beats the padded bf16 bmm. Compiled, the rule reads the traced shapes (a guard: a batch across the line
        compiles anew)."""
        if not (FLOAT32_EXPERTS and flat.device.type == "cpu"):
            return False
        if not self.experts_are_weights_alone or self.expert_dispatch is not None:
            return False
        if any(t.dtype != torch.float32 for t in (flat, self.w1, self.w3, self.w2)):  # the gate weights: flat's
            return False
        E, F_, D = self.w1.shape
        if F_ % 16 or D % 16:
            return False
        most = _FLOAT32_TRAIN_MAX_MACS if torch.is_grad_enabled() else _FLOAT32_KERNEL_MIN_MACS
        if torch.is_autocast_enabled("cpu") and not _too_little_for_bf16(flat.shape[0] * k, E, D * F_, most):
            return False
        return cpu_kernel.float32_ready()

    def _experts_as_one_loop(self, flat: Tensor, k: int) -> bool:
        """Whether this is a compiled CPU decode step of at most `ROWS_AS_ONE_LOOP` token copies (with the experts'
        weights alone: the loop reads them directly)."""
        return (
            flat.device.type == "cpu"
            and torch.compiler.is_compiling()
            and not torch.is_grad_enabled()
            and self.experts_are_weights_alone
            and self.expert_dispatch is None
            and flat.shape[0] * k <= ROWS_AS_ONE_LOOP
        )

    def _each_copy_by_its_expert(self, flat: Tensor, expert_ids: Tensor, weights: Tensor) -> Tensor:
        """The routed experts' output [N, D], copy (n, j) multiplied by expert expert_ids[n, j]'s weights where
        they lie: no sort, no counts, no scatter-add; each token's k outputs summed in the order of its choices."""
        N, k = expert_ids.shape
        dtype = _experts_dtype(flat, self.cfg.n_routed_experts, self.cfg.moe_d_ff)
        copies = flat.to(dtype)[:, None].expand(N, k, flat.shape[-1]).reshape(N * k, -1)
        expert = expert_ids.flatten()
        h = F.silu(_times_own_expert(copies, self.w1.to(dtype), expert))
        h = h * _times_own_expert(copies, self.w3.to(dtype), expert)
        out = _times_own_expert(h, self.w2.to(dtype), expert).view(N, k, -1)
        return (out * weights[..., None]).sum(1).to(flat.dtype)  # in the wider dtype of the two, as the sorted path

    def _sequence_aux_loss(self, expert_ids: Tensor, scores: Tensor, shape: torch.Size) -> Tensor:
        """DeepSeek-V3 sequence-wise balance loss: alpha * sum_i f_i * P_i, averaged over sequences."""
        E, k = self.cfg.n_routed_experts, expert_ids.shape[1]
        B = shape[0] if len(shape) == 3 else 1
        T = expert_ids.shape[0] // B
        chosen = (
            torch.zeros(B * T, E, device=scores.device, dtype=scores.dtype).scatter_(1, expert_ids, 1.0).view(B, T, E)
        )
        f = chosen.sum(1) * E / (k * T)  # [B, E]
        p = (scores / scores.sum(-1, keepdim=True)).view(B, T, E).mean(1)  # [B, E]
        return self.cfg.aux_loss_coef * (f * p).sum(-1).mean()


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def update_router_biases(model: nn.Module) -> None:
    layers = moe_layers(model)
    if layers and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # Data parallel (torchrun): DDP averages gradients, not buffers. Every rank must move the
        # bias by the same, global load, so the token counts are summed over ranks first (one
        # collective for all layers).
        loads = torch.stack([m.router.tokens_per_expert for m in layers])
        dist.all_reduce(loads)
        for m, load in zip(layers, loads):
            m.router.tokens_per_expert.copy_(load)
    for m in layers:
        m.router.update_bias()


def install_balancing_hook(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """Run the auxiliary-loss-free bias update after every optimizer step."""
    if moe_layers(model):
        optimizer.register_step_post_hook(lambda *_: update_router_biases(model))


@torch.no_grad()
def router_stats(model: nn.Module) -> dict[str, list[float]]:
    """Per MoE layer: max-violation (max load / mean load - 1) of the most recent forward.

    One host transfer for all layers, so call it at logging time, not per step.
    """
    layers = moe_layers(model)
    if not layers:
        return {}
    loads = torch.stack([m.router.last_load for m in layers]).float()
    violation = loads.max(-1).values / loads.mean(-1).clamp_min(1e-9) - 1
    return {"max_violation": violation.tolist(), "tokens_per_expert": loads.tolist()}
