"""Multi-turn sequences: the engine's continuation API (mixed into `Engine`).

A request submitted with `keep=True` keeps each finished sample's KV slot (parked: see
slots.py). `continue_sequence(seq, token_ids, max_new_tokens)` appends tokens (an environment's
reply, rendered by the chat template) to it: at the next `step()` they are written into the slot's
cache at the sequence's position, in one forward with the other continuations of that step
(right-padded rows, each reading its own slot: `KVCache.decode(..., slots)`), the first new
token is sampled from the last one's logits, and the sequence decodes again with the others.
The history is never prefilled again. `release_sequence(seq)` frees the slot.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from nanoseek.engine.requests import SequenceState, chunks
from nanoseek.engine.sampling import sample

if TYPE_CHECKING:
    from nanoseek.engine.engine import Engine


class MultiTurn:
    """The continuation methods of `Engine` (they use its slots, cache and queues)."""

    def room(self: Engine, seq: SequenceState) -> int:
        """How many tokens `continue_sequence` can append to `seq` and still leave room for one new token."""
        return self.max_seq_len - 2 - seq.position

    def continue_sequence(self: Engine, seq: SequenceState, token_ids: Sequence[int], max_new_tokens: int) -> None:
        """Append `token_ids` to a kept, finished sequence and generate up to `max_new_tokens` more.

        The tokens go into the sequence's cache at the next `step()` (its history is not prefilled
        again); then `seq.tokens`/`seq.logprobs` hold the new turn's samples. ValueError when the
        sequence is not kept, or the tokens do not fit in the context (see `room`).
        """
        if self._kept.get(seq.slot) is not seq or seq in self._continuing:
            raise ValueError("continue_sequence: the sequence is not a finished sample of a keep=True request")
        ids = [int(t) for t in token_ids]
        if not ids or not all(0 <= t < self.vocab_size for t in ids):
            raise ValueError(f"continue_sequence: token ids must be non-empty and in [0, {self.vocab_size})")
        if len(ids) > self.room(seq):
            raise ValueError(
                f"continue_sequence: {len(ids)} tokens do not fit (room for {self.room(seq)}, max_seq_len="
                f"{self.max_seq_len})"
            )
        if max_new_tokens < 1:
            raise ValueError(f"continue_sequence: max_new_tokens = {max_new_tokens!r}: must be >= 1")
        seq.pending = [seq.tokens[-1], *ids]  # the turn's last sampled token is not in the cache yet
        seq.sampled += len(seq.tokens)
        seq.offset = seq.position + len(seq.pending)
        seq.max_new_tokens = min(max_new_tokens, self.max_seq_len - seq.offset)
        seq.tokens, seq.logprobs = [], []
        seq.finish_reason, seq.stop = None, None
        self._continuing.append(seq)

    def release_sequence(self: Engine, seq: SequenceState) -> None:
        """Free a kept sequence's slot (a no-op for a sequence that holds none)."""
        if self._kept.get(seq.slot) is seq:
            if seq in self._continuing:
                self._continuing.remove(seq)
            del self._kept[seq.slot]
            heapq.heappush(self._free, seq.slot)

    def _extend(self: Engine) -> None:
        """Prefill the continuing sequences' appended tokens into their own slots, in chunks of at most
        `max_prefill_tokens` (rows right-padded; padding is written past each row's end, see KVCache)."""
        seqs, self._continuing = self._continuing, []
        for chunk in chunks(seqs, lambda s: len(s.pending), self.max_prefill_tokens):
            self._extend_chunk(chunk)

    def _extend_chunk(self: Engine, seqs: list[SequenceState]) -> None:
        lengths = [len(s.pending) for s in seqs]
        B, T = len(seqs), max(lengths)
        starts = [s.offset - n for s, n in zip(seqs, lengths)]  # position of each row's first pending token
        top = self.max_seq_len - 1  # padding goes past the row's end, capped here (never a real position)
        ids, pos, slots, last = self._upload(
            [t for s in seqs for t in s.pending + [0] * (T - len(s.pending))],
            [min(a + t, top) for a in starts for t in range(T)],
            [s.slot for s in seqs],
            [n - 1 for n in lengths],
        )
        for seq in seqs:
            del self._kept[seq.slot]
            self._running[seq.slot] = seq
        pos = pos.view(B, T)
        batch = self._sampling_batch(seqs)
        kv_len = max(s.offset for s in seqs)
        hidden = self.model.hidden_states(ids.view(B, T), pos, cache=self.cache.decode(pos, kv_len, slots))
        logits = self.model.logits(hidden[torch.arange(B, device=self.device), last])
        self.stats.extend_calls += 1
        self.stats.extend_tokens += sum(lengths)
        tokens, logprobs = sample(logits, batch)
        self.slots.admit(
            [s.slot for s in seqs],
            tokens,
            [s.offset for s in seqs],
            [s.request.params for s in seqs],
            [s.key for s in seqs],
            [s.sampled for s in seqs],
        )
        for seq in seqs:
            seq.pending = []
        self._append_rows(list(enumerate(seqs)), tokens, logprobs)
