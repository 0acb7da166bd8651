"""Conversations for supervised fine-tuning: load, validate, tokenise, pack into batches.

Input is JSONL with one conversation per line: `{"messages": [{"role": ..., "content": ...}, ...]}`
(roles: system, user, assistant, tool; at least one assistant message, since only assistant tokens
carry loss), with `"tools": [...]` (function schemas the template lists) for an environment's transcript.
Conversations are rendered with the tokenizer's chat template, and `encode_chat` marks the assistant
content and its closing end-of-turn token as the tokens to learn.

Batches have the same format as pretraining (`nanoseek.data.packing`): int64 tensors [B, T]
`input_ids`, `targets`, `positions`, `doc_ids`. Several conversations are packed into one row
(whole conversations, never split, in shuffled order; one that does not fit starts a new row), each
with its own doc_id and positions from 0, so attention stays within a conversation. The rest of a
row is padding: one more "document" with its own doc_id, positions from 0 and target -100.
`targets[t]` is the next token where that token is an assistant token of the same conversation,
else -100. A conversation longer than `seq_len` is cut to `seq_len` tokens and
counted in `truncated` (reported on stderr), not dropped.
"""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from nanoseek.data.errors import BadInputError, BadInputStats
from nanoseek.data.jsonl import read_jsonl
from nanoseek.data.packing import IGNORE, to_batch
from nanoseek.data.text import expand_paths

ROLES = ("system", "user", "assistant", "tool")  # tool: a tool result (environment transcripts; never learned)
Messages = list[dict[str, str]]


def conversation_problem(record: Any) -> str | None:
    """Why `record` is not a usable conversation, or None if it is."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        return "missing or empty 'messages' list"
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"message {i} is {type(message).__name__}, not an object"
        if message.get("role") not in ROLES:
            return f"message {i} has role {message.get('role')!r}; expected one of {list(ROLES)}"
        if not isinstance(message.get("content"), str):
            return f"message {i} has no string 'content'"
    if not any(m["role"] == "assistant" for m in messages):
        return "no assistant message (nothing to learn from)"
    return None


def iter_conversations(
    paths: str | os.PathLike | Iterable[str | os.PathLike],
    skip_bad: bool = False,
    stats: BadInputStats | None = None,
) -> Iterator[Messages]:
    """Yield the message lists of JSONL files; bad lines raise BadInputError (or are counted with skip_bad).

    With skip_bad and no `stats` given, a summary of what was skipped goes to stderr at the end.
    """
    own_stats = stats is None
    stats = stats if stats is not None else BadInputStats()

    for path in expand_paths(paths):
        if path.suffix != ".jsonl":
            stats.skip_or_raise(BadInputError(str(path), None, "conversations must be in a .jsonl file"), skip_bad)
            continue
        records = 0
        for number, record in read_jsonl(path, errors="yield"):
            records += 1
            reason = record.reason if isinstance(record, BadInputError) else conversation_problem(record)
            if reason:
                stats.skip_or_raise(BadInputError(str(path), number, reason), skip_bad)
                continue
            messages = [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
            yield {"messages": messages, "tools": record["tools"]} if record.get("tools") else messages
        if records == 0:
            stats.skip_or_raise(BadInputError(str(path), None, "empty file (no JSON lines)"), skip_bad)
    if own_stats and stats.count:
        print(stats.report(), file=sys.stderr)


def load_conversations(
    paths: str | os.PathLike | Iterable[str | os.PathLike],
    skip_bad: bool = False,
    stats: BadInputStats | None = None,
) -> list[Messages]:
    return list(iter_conversations(paths, skip_bad=skip_bad, stats=stats))


def pack_conversations(
    encoded: Sequence[tuple[list[int], list[int]]], seq_len: int, pad_id: int
) -> list[tuple[list[int], ...]]:
    """Greedy packing, in the given order, of (ids, mask) pairs into padded rows of seq_len.

    Returns rows (input_ids, targets, positions, doc_ids). Each pair must be at most seq_len long.
    """
    rows: list[tuple[list[int], ...]] = []
    row: tuple[list[int], ...] = ([], [], [], [])

    def flush() -> None:
        nonlocal row
        k = seq_len - len(row[0])
        pad_doc = row[3][-1] + 1 if row[3] else 0
        row[0].extend([pad_id] * k)
        row[1].extend([IGNORE] * k)
        row[2].extend(range(k))
        row[3].extend([pad_doc] * k)
        rows.append(row)
        row = ([], [], [], [])

    for ids, mask in encoded:
        if len(row[0]) + len(ids) > seq_len:
            flush()
        doc = row[3][-1] + 1 if row[3] else 0
        row[0].extend(ids)
        row[1].extend([ids[t + 1] if mask[t + 1] else IGNORE for t in range(len(ids) - 1)] + [IGNORE])
        row[2].extend(range(len(ids)))
        row[3].extend([doc] * len(ids))
    if row[0]:
        flush()
    return rows


class SFTDataset:
    """Batches of packed, tokenised conversations; reshuffled every epoch from `seed`."""

    def __init__(
        self,
        conversations: Sequence[Messages | dict[str, Any]],
        tokenizer: Any,
        seq_len: int,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        epochs: int | None = None,
    ):
        """conversations: message lists or `{"messages": [...]}` dicts; tokenizer: a nanoseek Tokenizer.

        epochs: passes over the data (None: forever). The last batch of an epoch may have fewer rows.
        """
        self.tokenizer, self.seq_len, self.batch_size = tokenizer, seq_len, batch_size
        self.seed, self.shuffle, self.epochs = seed, shuffle, epochs
        self.truncated = 0
        self.encoded: list[tuple[list[int], list[int]]] = []
        for i, conversation in enumerate(conversations):
            record = conversation if isinstance(conversation, dict) else {"messages": conversation}
            reason = conversation_problem(record)
            if reason:
                raise ValueError(f"conversation {i}: {reason}")
            ids, mask = tokenizer.encode_chat(record["messages"], tools=record.get("tools"))
            if len(ids) > seq_len:
                self.truncated += 1
                ids, mask = ids[:seq_len], mask[:seq_len]
            self.encoded.append((ids, mask))
        if not self.encoded:
            raise ValueError("no conversations")
        if self.truncated:
            print(f"SFT: {self.truncated} conversation(s) longer than {seq_len} tokens were cut", file=sys.stderr)
        self.epoch, self.next_row = 0, 0
        self._rows_epoch: int | None = None
        self._rows: list[tuple[list[int], ...]] = []

    def rows_for_epoch(self, epoch: int) -> list[tuple[list[int], ...]]:
        """All packed rows of one epoch, in order (deterministic in seed and epoch)."""
        if self._rows_epoch != epoch:
            order = list(range(len(self.encoded)))
            if self.shuffle:
                random.Random(f"sft:{self.seed}:{epoch}").shuffle(order)
            self._rows = pack_conversations([self.encoded[i] for i in order], self.seq_len, self.tokenizer.pad_id)
            self._rows_epoch = epoch
        return self._rows

    def next_batch(self) -> dict[str, Any] | None:
        rows = self.rows_for_epoch(self.epoch)
        if self.next_row >= len(rows):
            if self.epochs is not None and self.epoch + 1 >= self.epochs:
                return None
            self.epoch, self.next_row = self.epoch + 1, 0
            rows = self.rows_for_epoch(self.epoch)
        batch = rows[self.next_row : self.next_row + self.batch_size]
        self.next_row += len(batch)
        return to_batch(batch)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while (batch := self.next_batch()) is not None:
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "next_row": self.next_row, "seed": self.seed, "seq_len": self.seq_len}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state["seed"], state["seq_len"]) != (self.seed, self.seq_len):
            raise ValueError(f"SFT data state was saved with seed/seq_len {state['seed']}/{state['seq_len']}")
        self.epoch, self.next_row = state["epoch"], state["next_row"]

    @property
    def num_tokens(self) -> int:
        return sum(len(ids) for ids, _ in self.encoded)

    @property
    def num_loss_tokens(self) -> int:
        return sum(sum(mask[1:]) for _, mask in self.encoded)
