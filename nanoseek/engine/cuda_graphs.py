"""The decode step with fixed shapes, captured once per (batch bucket, kv-length bucket) as a CUDA graph.

A decode step launches a few hundred small kernels; at small batch the GPU waits on the
Python that launches them. A CUDA graph records the launches once and replays them with
one call. What it needs, and how this file provides it:

* fixed shapes: the running slots 0..hi-1 are padded up to a batch bucket b (1, 2, 4, 8,
  16, 24, 32, 48, ...) and the keys read up to a length bucket L (a power of two >= 64);
  padding rows feed token 0 at position 0 of slots that are free (every slot >= hi is),
  so they only scribble on free slots;
* fixed addresses: the inputs live in static buffers (`ids`, `pos`), copied into before
  each replay; the cache tensors are allocated once; the logits come back in the graph's
  own output tensor, read (sampled) right after the replay;
* no host synchronisation inside the step: checked before capture by running the step
  once under `torch.cuda.set_sync_debug_mode("error")`. If it does synchronise (e.g. a
  data-dependent shape), graphs are switched off with a warning and the engine decodes
  eagerly;
* the same weights and autocast state: the graphs are rebuilt when a weight's storage moves
  (checked at every step, cheaply), a parameter is replaced (checked when requests are
  admitted) or the caller's autocast differs from the one at capture (the engine runs
  autocast without its weight-cast cache, which a graph must not bake in).

With `capture=False` the same padded, static-buffer path runs eagerly; the CPU tests use
that to check the padding logic the graphs rely on.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from nanoseek.engine.cache import KVCache


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, 16, 24, 32, 48, 64, 96, ... below max_batch, and max_batch itself."""
    sizes, s = {1, 2, 4, 8}, 16
    while s < max_batch:
        sizes.update((s, s * 3 // 2))
        s *= 2
    return sorted({x for x in sizes if x < max_batch} | {max_batch})


def kv_len_bucket(kv_len: int, max_seq_len: int) -> int:
    return min(max_seq_len, max(64, 1 << (kv_len - 1).bit_length()))


def weights_signature(model: nn.Module) -> tuple[int, ...]:
    """Addresses of the weights a graph baked in; they change if parameters are re-assigned."""
    return tuple(t.data_ptr() for t in _weights(model))


def _weights(model: nn.Module) -> list[Tensor]:
    return [*model.parameters(), *model.buffers()]


def autocast_state(device_type: str) -> tuple[bool, torch.dtype | None]:
    """Whether (and to what) autocast casts: a graph captured under one state replays only under it."""
    if not torch.is_autocast_enabled(device_type):
        return False, None
    return True, torch.get_autocast_dtype(device_type)


class DecodeGraphs:
    def __init__(self, model: nn.Module, cache: KVCache, capture: bool) -> None:
        self.model, self.cache, self.capture = model, cache, capture
        self.buckets = batch_buckets(cache.n_slots)
        device = cache.k.device
        self.ids = torch.zeros(cache.n_slots, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(cache.n_slots, 1, dtype=torch.long, device=device)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        self.pool = None
        self.disabled_reason: str | None = None
        self.weights = _weights(model)
        self.signature = tuple(t.data_ptr() for t in self.weights)
        self.autocast = autocast_state(device.type)

    def matches(self, model: nn.Module, cache: KVCache, full: bool = True) -> bool:
        """Whether the graphs still read this model's weights and this cache.

        full=False only checks that the tensors seen at capture still have their storage (catches
        `.to()` and `p.data = ...`): a few microseconds, for every decode step. full=True also walks
        the modules (catches parameters replaced by new objects): about a millisecond on a 12-layer
        model, so the engine does it when requests are admitted, not at every step.
        """
        if model is not self.model or cache is not self.cache or autocast_state(self.ids.device.type) != self.autocast:
            return False
        if full:
            return weights_signature(model) == self.signature
        return tuple(t.data_ptr() for t in self.weights) == self.signature

    def bucket(self, hi: int, kv_len: int) -> tuple[int, int]:
        b = next(x for x in self.buckets if x >= hi)
        return b, kv_len_bucket(kv_len, self.cache.max_seq_len)

    def _forward(self, b: int, kv_len: int) -> Tensor:
        ids, pos = self.ids[:b], self.pos[:b]
        hidden = self.model.hidden_states(ids, pos, cache=self.cache.decode(pos, kv_len))
        return self.model.logits(hidden[:, -1])

    def run(self, ids: Tensor, pos: Tensor, kv_len: int) -> Tensor:
        """Logits [hi, V] for row i = slot i feeding ids[i] at pos[i] (free slots: 0, 0)."""
        hi = ids.shape[0]
        b, L = self.bucket(hi, kv_len)
        self.ids[:hi, 0].copy_(ids)
        self.pos[:hi, 0].copy_(pos)
        self.ids[hi:b].zero_()  # padding rows: token 0 at position 0 of free slots (no kernel when hi == b)
        self.pos[hi:b].zero_()
        if not self.capture:
            return self._forward(b, L)[:hi]
        if (b, L) not in self.graphs:
            captured = self._capture(b, L)
            if captured is None:
                return self._forward(b, L)[:hi]
            self.graphs[(b, L)] = captured
        graph, logits = self.graphs[(b, L)]
        graph.replay()
        return logits[:hi]

    def _capture(self, b: int, L: int) -> tuple[torch.cuda.CUDAGraph, Tensor] | None:
        # The static buffers already hold this step's inputs, so the warm-up forwards below
        # write exactly the k/v the replay will write: running them is harmless.
        try:
            previous = torch.cuda.get_sync_debug_mode()
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                self._forward(b, L)
            finally:
                torch.cuda.set_sync_debug_mode(previous)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self._forward(b, L)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                logits = self._forward(b, L)
            self.pool = graph.pool()
            return graph, logits
        except RuntimeError as e:
            torch.cuda.synchronize()
            self.disabled_reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            warnings.warn(
                f"CUDA graphs disabled, decoding eagerly: capturing the decode step failed ({self.disabled_reason}). "
                "MoE layers synchronise with the host unless their experts run torch._grouped_mm (bfloat16 "
                "activations on a GPU that has the kernel, e.g. sm90); float32 MoE models take the padded path.",
                stacklevel=3,
            )
            return None


__all__ = ["DecodeGraphs", "batch_buckets", "kv_len_bucket"]
