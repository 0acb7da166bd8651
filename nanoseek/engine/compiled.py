"""The CPU decode step and sampler through torch.compile (the inductor backend builds C++ kernels).

At the shapes a CPU runs, an eager decode step is a few hundred small ATen calls, each paying
Python and dispatch overhead that is larger than its arithmetic. Inductor fuses the elementwise
work (norms, RoPE, the attention mask, SiLU, the sampler's exp and hash) into a few C++ loops and
calls the matmuls and attention kernels directly, from a C++ wrapper (`cpp_wrapper`). What the
compiled step relies on:

* one graph, the forward and the sampling together (`decode_step`): each graph is one C++ file
  with a large fixed compilation cost (cold cache, 2 cores: the forward alone 32 s, the sampler
  alone 25 s, both in one graph 43 s; docs/LOG.md, 2026-12-02). Rows with top-k,
  top-p or min-p are sampled again, eagerly, from the graph's logits (the filters' sort would
  otherwise be a second graph, or cost every step);
* for all batches, contexts and engines: the rows (0..hi-1), the number of keys read
  and the cache's slot count and length are dynamic dimensions. Torch specialises a dimension
  of size 1, so the engine pads a batch of one with a free slot's dummy row rather than
  compile a second graph, until a long run of one-row steps pays for that graph
  (`ONE_ROW_GRAPH_AFTER`);
* in-place cache writes: `KVCache` writes new keys through the whole k/v tensors, which
  inductor keeps in place (a write through a view of a graph input would copy the layer);
* live weights: parameters are graph inputs read at every call, not constants folded in, so
  the trainer's updates are seen and nothing is rebuilt; engines over models of the same
  shapes share the graphs (dynamo caches them per function, and these functions are shared); a large bf16
  weight's prepacked copy (`model.linear`) lives outside the graph and is remade when the weight changes;
* no host synchronisation inside: the MoE experts run torch._grouped_mm (float32, bfloat16);
  the padded fallback (float64 models) reads a count on the host, which splits the graph;
* several steps per call for small models in engines of up to 128 slots (`decode_steps`, `steps_per_call`):
  each feeds the token the previous drew, inside the graph, so the call's fixed costs (Dynamo's guards, the
  wrapper, the engine's Python and its one host read) are paid once for all of them. Rows with top-k, top-p or min-p
  cannot be fed inside (their token is drawn eagerly from the logits): batches with such rows take one step a
  call (`decode_step`);
* failure is not fatal: if compiling raises (no C++ compiler, an unsupported operation),
  one warning, and the process decodes eagerly from then on.

Compiling takes seconds to tens of seconds (a 2-core machine, a cold inductor cache), so by
default an engine compiles only after `COMPILE_AFTER_STEPS` decode steps, when the run is
long enough to pay for it; a job that knows it is long (an RL run: `compile_for`) compiles at
the first step, as NANOSEEK_COMPILE=1 (or `Engine(compile=True)`) does; NANOSEEK_COMPILE=0 (or
`compile=False`) never.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

from nanoseek import precision
from nanoseek.engine.cache import KVCache
from nanoseek.engine.sampling import SamplingBatch, draw, sample
from nanoseek.model import cpu_kernel

COMPILE_ENV = "NANOSEEK_COMPILE"
COMPILE_AFTER_STEPS = 512
ONE_ROW_GRAPH_AFTER = 128
"""After this many one-row decode steps in a row an engine stops padding them to two rows (a free slot's dummy
row, through the graph of every batch size) and runs them through a graph of their own: one compilation more
(seconds with a warm inductor cache, ~40 s cold on 2 cores) for a step that does half the work with sizes known
at compile time: the tiny preset in an engine of 64 slots decoded one sequence at 3,450 tok/s against 2,450
(docs/LOG.md, 2026-12-02, ninth session). The short tails of a batch (RL's rollouts) never reach it."""
STEPS_PER_CALL = 4
"""Decode steps one compiled call runs when no row filters its sampling (`decode_steps`), where that pays
(`steps_per_call`). The tiny preset in an engine of 64 slots (2 threads, one process, interleaved): 3,646 -> 5,955
tok/s at batch 1, 1.15x at batch 64. Compiling takes longer in proportion to the steps (cold cache, batch 64: 28,
47 and 85 s for 1, 2 and 4). A sequence that stops inside a call wastes the call's remaining steps (docs/LOG.md,
2026-12-02, tenth session)."""
MANY_STEPS_MAX_SLOTS = 128
"""Larger engines run one step a call: a step over hundreds of rows dwarfs the call's fixed costs (tiny, 512 rows:
1.065x for four steps a call) and does not pay the longer compilation (the speedrun's RL engine, 512 slots: its
stage took 305 s instead of 217 on a cold inductor cache)."""


def steps_per_call(n_slots: int, n_params: int) -> int:
    """Decode steps a compiled call runs, rows allowing, in an engine of n_slots slots over a model of n_params
    parameters: STEPS_PER_CALL where a step is short against the call's fixed costs (~0.3 ms): at most
    MANY_STEPS_MAX_SLOTS rows, and float32 weights that fit in the CPU's last-level cache. A model read from memory
    at every step gains nothing and compiles four times the layers (the 100M `small` preset: 91.5 tok/s at batch 1
    against 91.7-94.2 at one step a call; the four-step graphs' cold compilation took 486 s)."""
    fits = 4 * n_params <= precision.cpu_cache_bytes()
    return STEPS_PER_CALL if n_slots <= MANY_STEPS_MAX_SLOTS and fits else 1


# The graph's wrapper in C++ too, not Python: at a batch of a few rows it halves the step (measured on the
# tiny preset: 0.41 -> 0.22 ms), the Python wrapper's per-kernel bookkeeping being most of it.
_OPTIONS = {"cpp_wrapper": True}


def compile_after(device: torch.device, compile: bool | None) -> int | None:
    """After how many decode steps an engine on `device` switches to the compiled step (None: never).

    Only CPUs compile (CUDA replays graphs). compile True/False decides; None reads NANOSEEK_COMPILE
    (1: at once, 0: never, unset or "auto": after COMPILE_AFTER_STEPS steps).
    """
    if device.type != "cpu" or compile is False:
        return None
    if compile:
        return 0
    setting = os.environ.get(COMPILE_ENV, "auto").strip().lower()
    if setting not in ("0", "1", "auto", ""):
        raise ValueError(f"{COMPILE_ENV}={setting!r}: must be 1 (compile), 0 (eager) or auto")
    return {"0": None, "1": 0}.get(setting, COMPILE_AFTER_STEPS)


LONG_JOB_STEPS = 4 * COMPILE_AFTER_STEPS
"""A job that will decode at least this many steps compiles its engine at the first step (`compile_for`)."""


def compile_for(device: torch.device, decode_steps: int) -> bool | None:
    """`Engine(compile=...)` for a job known to decode about `decode_steps` steps (RL: the steps it will run x
    max_new_tokens): True, compile at the first step, when the job is long (LONG_JOB_STEPS) and the default rule
    would compile within it anyway, so the eager steps before the switch are saved (the speedrun's RL stage: its
    first 9 steps' rollouts took ~1.0-1.4 s eagerly against ~0.6 s compiled, and its held-out evaluation before
    them ran eagerly); else None, the default rule (NANOSEEK_COMPILE=0 still means never)."""
    if compile_after(device, None) is None:
        return False
    return True if decode_steps >= LONG_JOB_STEPS else None


def decode_logits(model: nn.Module, cache: KVCache, ids: Tensor, pos: Tensor, keys: Tensor) -> Tensor:
    """Logits [B, V] of one decode step: row b is slot b, feeding ids[b] at pos[b] ([B, 1] each) and
    reading keys [0, kv_len) where kv_len = keys.shape[1] (`keys` holds no data: a dynamic size)."""
    hidden = model.hidden_states(ids, pos, cache=cache.decode(pos, keys.shape[1]))
    return model.logits(hidden[:, -1])


def decode_step(
    model: nn.Module,
    cache: KVCache,
    ids: Tensor,
    pos: Tensor,
    keys: Tensor,
    temperature: Tensor,
    sample_keys: Tensor,
    steps: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """One decode step and its unfiltered sampling in one graph: (logits, tokens, logprobs).

    One graph, not two: each graph's compilation has a large fixed cost (see the module docstring). Rows with
    top-k/p or min-p are re-sampled from the logits eagerly (`_Compiled.step`)."""
    logits = decode_logits(model, cache, ids, pos, keys)
    tokens, logprobs = draw(logits, temperature, sample_keys, steps)
    return logits, tokens, logprobs


def decode_steps(
    model: nn.Module,
    cache: KVCache,
    ids: Tensor,
    pos: Tensor,
    keys: Tensor,
    temperature: Tensor,
    sample_keys: Tensor,
    steps: Tensor,
    live: Tensor,
    n_steps: int,
) -> tuple[Tensor, Tensor]:
    """n_steps decode steps in one graph, each feeding the tokens the previous one drew: (tokens, logprobs), each
    [B, n_steps]. Live rows (live[b] = 1) move one position and one sampling step on per step, as `SlotState.advance`
    moves them between calls, so a call draws the tokens n_steps calls of `decode_step` would. `keys` must cover the
    last step's positions. A row that reaches the end of the cache stays at its last position: it has finished, and
    what it writes there is never read (a sequence's last token is drawn, never fed)."""
    last = cache.k.shape[3] - 1
    tokens, logprobs = [], []
    for _ in range(n_steps):
        _, drawn, logprob = decode_step(model, cache, ids, pos, keys, temperature, sample_keys, steps)
        tokens.append(drawn)
        logprobs.append(logprob)
        ids = drawn[:, None]
        pos = (pos + live[:, None]).clamp(max=last)
        steps = steps + live
    return torch.stack(tokens, 1), torch.stack(logprobs, 1)


class _Compiled:
    """The compiled steps of this process, built at first use; eager after a failure."""

    def __init__(self) -> None:
        self.failure: str | None = None
        self._compiled: dict[Callable, Callable] = {}

    def step(
        self, model: nn.Module, cache: KVCache, ids: Tensor, pos: Tensor, kv_len: int, batch: SamplingBatch
    ) -> tuple[Tensor, Tensor]:
        """Tokens and log-probs of one decode step over rows 0..B-1 (B = len(ids)), as `sample` gives them."""
        keys = ids.new_empty(0, kv_len)
        out = self._call(decode_step, model, cache, ids, pos, keys, batch.temperature, batch.keys, batch.steps)
        if out is None:
            return sample(decode_logits(model, cache, ids, pos, keys), batch)
        logits, tokens, logprobs = out
        if batch.any_sampling and batch.any_filter:
            return sample(logits, batch)
        return tokens, logprobs

    def steps(
        self,
        model: nn.Module,
        cache: KVCache,
        ids: Tensor,
        pos: Tensor,
        kv_len: int,
        batch: SamplingBatch,
        live: Tensor,
        n_steps: int,
    ) -> tuple[Tensor, Tensor] | None:
        """Tokens and log-probs [B, n_steps] of `decode_steps` (no row may filter: `batch.any_filter` False); None
        when compiling failed (nothing has run then: the caller decodes eagerly). kv_len covers the last step."""
        if batch.any_sampling and batch.any_filter:
            raise ValueError("decode_steps cannot feed rows with top-k / top-p / min-p: one step a call")
        keys = ids.new_empty(0, kv_len)
        torch._dynamo.maybe_mark_dynamic(live, 0)
        args = (model, cache, ids, pos, keys, batch.temperature, batch.keys, batch.steps, live, n_steps)
        return self._call(decode_steps, *args)

    def _call(self, fn: Callable, model: nn.Module, cache: KVCache, ids: Tensor, pos: Tensor, keys: Tensor, *rest):
        """fn compiled (at its first call), on these arguments; None, with one warning, if compiling fails."""
        if self.failure is not None:
            return None
        compiled_fn = self._compiled.get(fn)
        if compiled_fn is None:
            cpu_kernel.float32_available()  # both libraries built now, not while Dynamo traces (`model.linear`)
            cpu_kernel.available()
            compiled_fn = self._compiled[fn] = torch.compile(fn, options=_OPTIONS)
        # Rows, keys read, and the cache's slots and length: engines of other sizes reuse the graph.
        dynamic = [(ids, 0), (pos, 0), (keys, 1)] + [(t, 0) for t in rest[:3]]
        dynamic += [(t, d) for t in (cache.k, cache.v) if t is not None for d in (1, 3)]
        for t, dim in dynamic:
            torch._dynamo.maybe_mark_dynamic(t, dim)
        try:
            return compiled_fn(model, cache, ids, pos, keys, *rest)
        except Exception as e:  # compiling failed: the step had not run, so running it eagerly is safe
            text = str(e).strip()
            self.failure = f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"[:300]
            warnings.warn(
                f"compiled decoding disabled, decoding eagerly: torch.compile failed ({self.failure}); "
                f"set {COMPILE_ENV}=0 to skip the attempt",
                stacklevel=3,
            )
            return None


COMPILED = _Compiled()


__all__ = [
    "COMPILED",
    "COMPILE_AFTER_STEPS",
    "COMPILE_ENV",
    "LONG_JOB_STEPS",
    "MANY_STEPS_MAX_SLOTS",
    "ONE_ROW_GRAPH_AFTER",
    "STEPS_PER_CALL",
    "compile_after",
    "compile_for",
    "decode_logits",
    "decode_step",
    "decode_steps",
    "steps_per_call",
]
