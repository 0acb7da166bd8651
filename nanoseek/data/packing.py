"""Pack a stream of documents into fixed-length rows of tokens for pretraining.

Each document is tokenised and followed by eos; documents are laid end to end and cut into rows
of `seq_len` tokens, so no compute is spent on padding. A batch is a dict of int64 tensors [B, T]:

- `input_ids`: the tokens;
- `targets`: the next token, or -100 where there is none in the same document (after each eos, and
  at the end of the data), so the model never learns to predict across a document boundary;
- `positions`: the position within the document, 0 at each document start. A document cut by a
  row boundary restarts at 0 in the next row too: the model cannot attend to the previous row,
  and positions stay below seq_len;
- `doc_ids`: which document of the row a token belongs to (0, 1, 2, ... per row); attention should
  be blocked between different doc_ids. Padding (only in the last row of a finite pass) is one more
  document of its own (own doc_id, positions from 0), with target -100.

Order: the train split goes through a shuffle buffer (streaming: only `shuffle_buffer` documents
are held in memory) seeded by (seed, epoch), and repeats forever by default. The validation split
is every document whose stable hash falls below `val_fraction`, plus the first document of the
source so it is never empty; it is read once, in order. Both splits see the same source and the
same rule, so they are disjoint, and duplicates of a document always land in the same split.

`state_dict()` / `load_state_dict()` capture the position (epoch, documents read, the shuffle
buffer, RNG state, tokens not yet emitted), so a resumed run continues with exactly the next batch.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from nanoseek.data.errors import BadInputStats
from nanoseek.data.text import iter_documents

IGNORE = -100


def hash_fraction(text: str) -> float:
    """A stable number in [0, 1) from the document text (blake2b, not Python's salted `hash`)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big") / 2**64


def is_validation(index: int, text: str, val_fraction: float) -> bool:
    """The split rule: the source's first document and about `val_fraction` of the rest."""
    return val_fraction > 0 and (index == 0 or hash_fraction(text) < val_fraction)


def make_row(tokens: list[int], docs: list[int], next_token: int | None, next_doc: int | None):
    """One row from `tokens` whose global document numbers are `docs`.

    `next_token`/`next_doc` are the token after the row in the stream (None at the end), for the last
    target. Returns (input_ids, targets, positions, doc_ids) as lists.
    """
    n = len(tokens)
    targets = [IGNORE] * n
    for t in range(n - 1):
        if docs[t + 1] == docs[t]:
            targets[t] = tokens[t + 1]
    if n and next_token is not None and next_doc == docs[-1]:
        targets[-1] = next_token
    positions, doc_ids = [0] * n, [0] * n
    for t in range(1, n):
        same = docs[t] == docs[t - 1]
        positions[t] = positions[t - 1] + 1 if same else 0
        doc_ids[t] = doc_ids[t - 1] if same else doc_ids[t - 1] + 1
    return tokens, targets, positions, doc_ids


def to_batch(rows: Sequence[tuple[list[int], ...]]) -> dict[str, Any]:
    """Rows (input_ids, targets, positions, doc_ids), of one length, as a batch of int64 tensors [B, T]."""
    import torch  # here: importing nanoseek.data stays torch-free (see the package docstring)

    names = ("input_ids", "targets", "positions", "doc_ids")
    return {name: torch.tensor([row[i] for row in rows], dtype=torch.long) for i, name in enumerate(names)}


def pad_row(row: tuple[list[int], ...], seq_len: int, pad_id: int) -> tuple[list[int], ...]:
    """Pad a short final row: the pad tokens form one extra document (positions 0, 1, ...) with target -100."""
    tokens, targets, positions, doc_ids = row
    k = seq_len - len(tokens)
    pad_doc = doc_ids[-1] + 1 if doc_ids else 0
    return tokens + [pad_id] * k, targets + [IGNORE] * k, positions + list(range(k)), doc_ids + [pad_doc] * k


class PackedTextDataset:
    """Iterable of packed batches; see the module docstring for the format and the order."""

    def __init__(
        self,
        documents: Sequence[str] | Callable[[], Iterable[str]],
        tokenizer: Any,
        seq_len: int,
        batch_size: int,
        *,
        split: str = "train",
        val_fraction: float = 0.01,
        seed: int = 0,
        shuffle_buffer: int = 1024,
        epochs: int | None = None,
    ):
        """documents: a list of texts, or a function returning a fresh iterable of them for each pass.

        tokenizer: anything with `encode(text) -> list[int]`, `eos_id` and `pad_id`.
        epochs: passes over the data (None: train repeats forever; validation defaults to one pass).
        """
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', not {split!r}")
        if seq_len < 1 or batch_size < 1:
            raise ValueError("seq_len and batch_size must be positive")
        if not 0 <= val_fraction < 1:
            raise ValueError("val_fraction must be in [0, 1)")
        if split == "val" and val_fraction == 0:
            raise ValueError("split='val' needs val_fraction > 0")
        self.source = documents if callable(documents) else (lambda: documents)
        self.tokenizer = tokenizer
        self.seq_len, self.batch_size = seq_len, batch_size
        self.split, self.val_fraction, self.seed = split, val_fraction, seed
        self.shuffle_buffer = shuffle_buffer if split == "train" else 0
        self.epochs = epochs if epochs is not None else (1 if split == "val" else None)
        self._reset_epoch(0)
        self.docs_started = 0  # global document counter (tells tokens of different documents apart)
        self.pending_tokens: list[int] = []
        self.pending_docs: list[int] = []
        self.rows: list[tuple[list[int], ...]] = []
        self.finished = False

    @classmethod
    def from_files(
        cls,
        paths: str | os.PathLike | Iterable[str | os.PathLike],
        tokenizer: Any,
        seq_len: int,
        batch_size: int,
        *,
        text_field: str = "text",
        skip_bad: bool = False,
        stats: BadInputStats | None = None,
        **kwargs: Any,
    ) -> PackedTextDataset:
        """Stream .txt/.jsonl/.parquet files. With skip_bad, `stats` counts bad records of every pass."""
        paths = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
        stats = stats if stats is not None else BadInputStats()
        source = lambda: iter_documents(paths, text_field=text_field, skip_bad=skip_bad, stats=stats)
        return cls(source, tokenizer, seq_len, batch_size, **kwargs)

    # ------------------------------------------------------------------ document stream
    def _reset_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.consumed = 0  # source documents read in this epoch (both splits)
        self.kept_this_epoch = 0
        self.buffer: list[str] = []
        self.exhausted = False
        self.rng = random.Random(f"pack:{self.seed}:{epoch}")
        self._iterator: Iterator[str] | None = None

    def _source_iterator(self) -> Iterator[str]:
        if self._iterator is None:
            self._iterator = itertools.islice(iter(self.source()), self.consumed, None)
        return self._iterator

    def _next_document(self) -> str | None:
        """The next document of this split in order, or None when all epochs are done."""
        while True:
            if not self.exhausted:
                text = next(self._source_iterator(), None)
                if text is None:
                    self.exhausted = True
                    continue
                index = self.consumed
                self.consumed += 1
                if is_validation(index, text, self.val_fraction) != (self.split == "val"):
                    continue
                self.kept_this_epoch += 1
                if not self.shuffle_buffer:
                    return text
                if len(self.buffer) < self.shuffle_buffer:
                    self.buffer.append(text)
                    continue
                j = self.rng.randrange(len(self.buffer))
                text, self.buffer[j] = self.buffer[j], text
                return text
            if self.buffer:
                return self.buffer.pop(self.rng.randrange(len(self.buffer)))
            if self.kept_this_epoch == 0:
                raise ValueError(f"the {self.split} split is empty (no documents in this pass over the source)")
            if self.epochs is not None and self.epoch + 1 >= self.epochs:
                return None
            self._reset_epoch(self.epoch + 1)

    # ------------------------------------------------------------------ rows and batches
    def _add_rows(self) -> bool:
        """Read one more document and cut full rows; False (after flushing) when the data is done."""
        text = self._next_document()
        if text is None:
            if self.pending_tokens:
                row = make_row(self.pending_tokens, self.pending_docs, None, None)
                self.rows.append(pad_row(row, self.seq_len, self.tokenizer.pad_id))
                self.pending_tokens, self.pending_docs = [], []
            return False
        ids = [*self.tokenizer.encode(text), self.tokenizer.eos_id]
        self.pending_tokens += ids
        self.pending_docs += [self.docs_started] * len(ids)
        self.docs_started += 1
        T = self.seq_len
        while len(self.pending_tokens) > T:  # a full row and the token after it
            tokens, docs = self.pending_tokens, self.pending_docs
            self.rows.append(make_row(tokens[:T], docs[:T], tokens[T], docs[T]))
            self.pending_tokens, self.pending_docs = tokens[T:], docs[T:]
        return True

    def next_batch(self) -> dict[str, Any] | None:
        """The next batch, or None at the end of a finite pass (the last batch may have fewer rows)."""
        while len(self.rows) < self.batch_size and not self.finished:
            if not self._add_rows():
                self.finished = True
        if not self.rows:
            return None
        rows, self.rows = self.rows[: self.batch_size], self.rows[self.batch_size :]
        return to_batch(rows)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while (batch := self.next_batch()) is not None:
            yield batch

    # ------------------------------------------------------------------ resume
    def _config(self) -> dict[str, Any]:
        return {
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "split": self.split,
            "val_fraction": self.val_fraction,
            "seed": self.seed,
            "shuffle_buffer": self.shuffle_buffer,
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue with exactly the next batch (plain Python values)."""
        version, internal, gauss = self.rng.getstate()
        return {
            "config": self._config(),
            "epoch": self.epoch,
            "consumed": self.consumed,
            "kept_this_epoch": self.kept_this_epoch,
            "exhausted": self.exhausted,
            "buffer": list(self.buffer),
            "rng": [version, list(internal), gauss],
            "docs_started": self.docs_started,
            "pending_tokens": list(self.pending_tokens),
            "pending_docs": list(self.pending_docs),
            "rows": [[list(part) for part in row] for row in self.rows],
            "finished": self.finished,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["config"] != self._config():
            raise ValueError(f"data state was saved with {state['config']}, this dataset has {self._config()}")
        self._reset_epoch(state["epoch"])
        self.consumed = state["consumed"]
        self.kept_this_epoch = state["kept_this_epoch"]
        self.exhausted = state["exhausted"]
        self.buffer = list(state["buffer"])
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.docs_started = state["docs_started"]
        self.pending_tokens = list(state["pending_tokens"])
        self.pending_docs = list(state["pending_docs"])
        self.rows = [tuple(list(part) for part in row) for row in state["rows"]]
        self.finished = state["finished"]
