"""What a decode step reads per KV slot, kept on the device between steps.

A decode step feeds row b = slot b its last token at its position and samples with its
parameters. Building those rows on the host at every step is Python work that grows with
the batch, plus an upload. Here they live in two device tensors, one row per slot:

* `ints` [n_slots, 7]: last token, its position, tokens generated so far (the sampling step),
  top-k, the two halves of the sampling key, and 1 for a live sequence / 0 for a free slot;
* `floats` [n_slots, 3] (float64): temperature, top-p, min-p.

A row is written once when its sequence is admitted (after the prefill drew its first token),
advanced by every decode step on the device (token = the sampled one; position and step + 1
for live rows), and reset to a free row (token 0 at position 0, greedy) when the sequence
ends: what the padded rows of a fixed-shape step (CUDA graphs) must feed anyway. Resets are
queued and applied, in one write, before the next admission or step reads the rows.
A kept sequence (its turn ended, its cache waits for a continuation) is parked instead: a dead
row at the position of its last token, which is not in the cache yet, so the junk a decode step
writes for that row lands where the continuation writes that token again.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from nanoseek.engine.sampling import SamplingBatch, SamplingParams

TOKEN, POSITION, STEP, TOP_K, KEY_A, KEY_B, LIVE = range(7)
_FREE_FLOATS = (0.0, 1.0, 0.0)  # greedy, top-p off, min-p off


class SlotState:
    def __init__(self, n_slots: int, device: torch.device) -> None:
        self.ints = torch.zeros(n_slots, 7, dtype=torch.int64, device=device)
        self._free_row = torch.tensor(_FREE_FLOATS, dtype=torch.float64).to(device)
        self.floats = self._free_row.repeat(n_slots, 1)
        self.device = device
        self._params: dict[int, SamplingParams] = {}  # live slot -> its parameters
        self._sampled = 0  # live rows with temperature > 0 (the sampler skips the noise when none)
        self._filtered = 0  # of those, rows with top-k / top-p / min-p (it skips the sort when none)
        self._freed: list[tuple[int, int]] = []  # (slot, position) resets to apply

    def admit(
        self,
        slots: Sequence[int],
        tokens: Tensor,
        positions: Sequence[int],
        params: Sequence[SamplingParams],
        keys: Sequence[tuple[int, int]],
        steps: Sequence[int] | None = None,
    ) -> None:
        """New (or continued) sequences in `slots`: token `tokens[i]` (on the device) at `positions[i]`,
        drawn at sampling step steps[i] (default 0)."""
        if self._freed:  # a reset still queued for a reused slot would wipe its new row
            self.flush()
        ints = torch.tensor(
            [
                [0, pos, step + 1, p.top_k, a, b, 1]
                for pos, p, (a, b), step in zip(positions, params, keys, steps or [0] * len(positions), strict=True)
            ],
            dtype=torch.int64,
        )
        floats = torch.tensor([[p.temperature, p.top_p, p.min_p] for p in params], dtype=torch.float64)
        index = torch.tensor(list(slots), dtype=torch.int64)
        ints, floats, index = (t.to(self.device, non_blocking=True) for t in (ints, floats, index))
        ints[:, TOKEN] = tokens
        self.ints.index_copy_(0, index, ints)
        self.floats.index_copy_(0, index, floats)
        for slot, p in zip(slots, params):
            self._params[slot] = p
            self._count(p, +1)

    def release(self, slot: int, position: int = 0) -> None:
        """The slot's sequence ended: reset its row before the next admission or step (see `flush`), to
        a dead row at `position` (0 for a free slot; a kept sequence's last position when parked)."""
        p = self._params.pop(slot, None)
        if p is not None:
            self._count(p, -1)
            self._freed.append((slot, position))

    def flush(self) -> None:
        """Apply the queued resets (one write); a no-op when none are queued."""
        if self._freed:
            slots, positions = zip(*self._freed)
            index = torch.tensor(slots, dtype=torch.int64).to(self.device, non_blocking=True)
            rows = torch.zeros(len(slots), 7, dtype=torch.int64)
            rows[:, POSITION] = torch.tensor(positions)
            self.ints.index_copy_(0, index, rows.to(self.device, non_blocking=True))
            self.floats.index_copy_(0, index, self._free_row.expand(len(self._freed), 3))
            self._freed.clear()

    def _count(self, p: SamplingParams, sign: int) -> None:
        if not p.greedy:
            self._sampled += sign
            self._filtered += sign * p.filtering

    def inputs(self, hi: int) -> tuple[Tensor, Tensor]:
        """(tokens, positions) of rows 0..hi-1, each [hi, 1]: views, nothing is copied."""
        return self.ints[:hi, TOKEN : TOKEN + 1], self.ints[:hi, POSITION : POSITION + 1]

    def batch(self, hi: int) -> SamplingBatch:
        """The sampling parameters of rows 0..hi-1 (views)."""
        return SamplingBatch(
            temperature=self.floats[:hi, 0],
            top_p=self.floats[:hi, 1],
            min_p=self.floats[:hi, 2],
            top_k=self.ints[:hi, TOP_K],
            keys=self.ints[:hi, KEY_A : KEY_B + 1],
            steps=self.ints[:hi, STEP],
            any_sampling=self._sampled > 0,
            any_filter=self._filtered > 0,
        )

    def live(self, hi: int) -> Tensor:
        """1 for the live rows among 0..hi-1, 0 for free or parked ones ([hi], a view)."""
        return self.ints[:hi, LIVE]

    def advance(self, hi: int, tokens: Tensor, n_steps: int = 1) -> None:
        """After n_steps steps over rows 0..hi-1 drew `tokens` ([hi], or [hi, n_steps]: the last is fed next): live
        rows move n_steps positions and sampling steps on."""
        rows = self.ints[:hi]
        rows[:, TOKEN] = tokens if tokens.dim() == 1 else tokens[:, -1]
        rows[:, POSITION : STEP + 1] += n_steps * rows[:, LIVE : LIVE + 1]


__all__ = ["SlotState"]
