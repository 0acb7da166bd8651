"""A request, its samples, and what the engine hands back: completions, stream deltas, statistics."""

from __future__ import annotations

import numbers
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from torch import Tensor

from nanoseek.engine.sampling import SamplingParams, sequence_key

if TYPE_CHECKING:
    from nanoseek.engine.engine import Engine


@dataclass
class Completion:
    """One generated sample."""

    prompt_ids: list[int]
    token_ids: list[int]
    """Generated tokens; a stop token that ended the sequence is included (RL needs its log-prob)."""
    logprobs: list[float]
    """log_softmax(logits / T) at each generated token, before top-k/top-p/min-p (T = 1 when greedy)."""
    text: str | None
    """Decoded token_ids without a final stop token and cut before a stop string; None without a tokenizer."""
    finish_reason: str
    """'stop' (stop id or string), 'length' (max_new_tokens or the context), 'error' (bad request), 'abort'."""
    ttft_s: float = 0.0
    """Time to first token, from submission (queueing included)."""
    tokens_per_s: float = 0.0
    """Decode speed of this sample: tokens after the first / time after the first (0 for one token)."""
    latency_s: float = 0.0
    """Submission to last token."""
    index: int = 0
    """Which prompt (position in `generate`'s list, or `submit(index=...)`)."""
    sample: int = 0
    """Which of the prompt's n samples."""
    stop: int | str | None = None
    """The stop id or stop string that ended it."""
    error: str | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None or k == "text"}


@dataclass
class Delta:
    """What `Engine.stream` yields: one sample's new tokens since the last delta, and their text."""

    sample: int
    token_ids: list[int]
    logprobs: list[float]
    text: str
    completion: Completion | None = None
    """Set on the sample's last delta."""


@dataclass
class EngineStats:
    prefill_calls: int = 0
    prefill_tokens: int = 0
    """Prompt tokens prefilled (padding excluded)."""
    prefill_padded_tokens: int = 0
    decode_steps: int = 0
    decode_tokens: int = 0
    """Tokens produced by decode steps (dummy rows excluded)."""
    decode_rows: int = 0
    """Rows run by decode steps (dummy rows of free slots included)."""
    max_running: int = 0
    extend_calls: int = 0
    extend_tokens: int = 0
    """Tokens appended to kept sequences' caches (continuations), padding excluded."""


class SequenceState:
    """One sample being generated, in one slot.

    A sequence of a `keep` request can run several turns (`Engine.continue_sequence`): `tokens`
    and `logprobs` hold the current turn's generated tokens, `offset` counts the tokens before
    them (the prompt, earlier turns and the appended ones), `sampled` the tokens sampled in
    earlier turns (the sampling step goes on counting, so no turn reuses another's noise).
    """

    __slots__ = (
        "finish_reason",
        "finish_time",
        "first_token_time",
        "key",
        "logprobs",
        "max_new_tokens",
        "offset",
        "pending",
        "request",
        "sample",
        "sampled",
        "slot",
        "stop",
        "tokens",
    )

    def __init__(self, request: Request, sample: int, slot: int) -> None:
        self.request, self.sample, self.slot = request, sample, slot
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.key = sequence_key(request.seed, request.index, sample)
        self.finish_reason: str | None = None
        self.stop: int | str | None = None
        self.first_token_time = self.finish_time = 0.0
        self.offset, self.sampled, self.max_new_tokens = len(request.prompt_ids), 0, request.max_new_tokens
        self.pending: list[int] = []  # tokens to append to the cache at the next step (continuations)

    @property
    def position(self) -> int:
        """Position of the last token, the one the next decode step feeds (not in the cache yet)."""
        return self.offset + len(self.tokens) - 1


class Request:
    """A submitted prompt and its n samples; `done` once all are finished."""

    def __init__(
        self,
        index: int,
        prompt_ids: list[int],
        params: SamplingParams,
        stop_ids: set[int],
        max_new_tokens: int,
        seed: int,
        keep: bool = False,
    ) -> None:
        self.index, self.prompt_ids, self.params, self.seed = index, prompt_ids, params, seed
        self.keep = keep  # finished samples keep their KV slot for a continuation until released
        self.stop_ids, self.max_new_tokens = stop_ids, max_new_tokens
        # A stop string of c characters spans at most 4c tokens (every token decodes to >= 1 byte).
        self.stop_window = 4 * max((len(s) for s in params.stop_strings), default=0) + 4
        self.seqs: list[SequenceState] = []
        self.submit_time = time.perf_counter()
        self.aborted = False

    @property
    def started(self) -> bool:
        return bool(self.seqs)

    @property
    def done(self) -> bool:
        return self.aborted or (bool(self.seqs) and all(s.finish_reason is not None for s in self.seqs))


def prompt_ids(prompt: str | Sequence[int] | Tensor, tokenizer, vocab_size: int, max_seq_len: int) -> list[int]:
    """A prompt as validated token ids (ValueError naming what is wrong)."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("prompt: a string, but the engine has no tokenizer (pass token ids)")
        ids = tokenizer.encode(prompt)
    elif isinstance(prompt, Tensor):
        if prompt.dim() != 1:
            raise ValueError(f"prompt: a tensor of shape {tuple(prompt.shape)}, expected 1-D token ids")
        ids = prompt.tolist()
    elif isinstance(prompt, list | tuple):
        if not all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in prompt):
            raise ValueError("prompt: expected a list of integer token ids")
        ids = [int(t) for t in prompt]
    else:
        raise ValueError(f"prompt: expected a string or token ids, got {type(prompt).__name__}")
    if not ids:
        raise ValueError("prompt: empty (needs at least one token)")
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ValueError(f"prompt: token id {bad} outside [0, vocab_size={vocab_size})")
    if len(ids) >= max_seq_len:
        raise ValueError(
            f"prompt: {len(ids)} tokens, longer than the context allows (max_seq_len={max_seq_len}, "
            "and at least one new token must fit)"
        )
    return ids


def sequence_text(seq: SequenceState, detokenize: Callable[[Sequence[int]], str] | None) -> str | None:
    """The sample's text: without a final stop token, cut before a stop string (None without a detokenizer)."""
    if detokenize is None:
        return None
    text = detokenize(seq.tokens[:-1] if isinstance(seq.stop, int) else seq.tokens)
    if isinstance(seq.stop, str):
        stops = seq.request.params.stop_strings
        text = text[: min((i for s in stops if (i := text.find(s)) >= 0), default=len(text))]
    return text


def completion_of(seq: SequenceState, detokenize: Callable[[Sequence[int]], str] | None) -> Completion:
    """The sample (its current turn, for a multi-turn sequence) as a Completion."""
    request, n = seq.request, len(seq.tokens)
    after_first = seq.finish_time - seq.first_token_time
    return Completion(
        prompt_ids=request.prompt_ids,
        token_ids=list(seq.tokens),
        logprobs=list(seq.logprobs),
        text=sequence_text(seq, detokenize),
        finish_reason=seq.finish_reason or "abort",
        ttft_s=max(seq.first_token_time - request.submit_time, 0.0) if n else 0.0,
        tokens_per_s=(n - 1) / after_first if n > 1 and after_first > 0 else 0.0,
        latency_s=seq.finish_time - request.submit_time,
        index=request.index,
        sample=seq.sample,
        stop=seq.stop,
    )


Item = TypeVar("Item")


def chunks(items: list[Item], length: Callable[[Item], int], max_tokens: int) -> list[list[Item]]:
    """Items sorted by length, cut into chunks whose right-padded size (rows x longest) stays within
    max_tokens (an item longer than that gets a chunk of its own): the prefill batches."""
    out: list[list[Item]] = [[]]
    for item in sorted(items, key=length):
        if out[-1] and (len(out[-1]) + 1) * length(item) > max_tokens:
            out.append([])
        out[-1].append(item)
    return out


class DeltaTracker:
    """One request's output as it grows: `poll()` after each engine step gives every sample's new
    tokens and text since the last poll (what `Engine.stream` yields and the server sends)."""

    def __init__(self, engine: Engine, request: Request) -> None:
        self.engine, self.request = engine, request
        self.sent_tokens = [0] * request.params.n
        self.sent_text = [""] * request.params.n
        self.closed: set[int] = set()
        # Per sample: its text decoded so far and the token offsets of that decoding (see `_decoded`).
        self._text = [""] * request.params.n
        self._offsets = [(0, 0)] * request.params.n

    def poll(self) -> list[Delta]:
        out = []
        for seq in self.request.seqs:
            if seq.sample in self.closed:
                continue
            start, finished = self.sent_tokens[seq.sample], seq.finish_reason is not None
            if start == len(seq.tokens) and not finished:
                continue
            text = self._text_since(seq, self.sent_text[seq.sample])
            self.sent_text[seq.sample] += text
            self.sent_tokens[seq.sample] = len(seq.tokens)
            if finished:
                self.closed.add(seq.sample)
            completion = self.engine.completion(seq) if finished else None
            out.append(Delta(seq.sample, seq.tokens[start:], seq.logprobs[start:], text, completion))
        return out

    def _text_since(self, seq: SequenceState, sent: str) -> str:
        """The sample's text after `sent`, held back while it ends in an incomplete character or could
        be the start of a stop string."""
        engine = self.engine
        if engine.detokenize is None:
            return ""
        if seq.finish_reason is not None:
            full = engine.text(seq) or ""
        else:
            full = self._decoded(seq)
            hold = 0
            for s in seq.request.params.stop_strings:
                hold = max(hold, next((k for k in range(min(len(s) - 1, len(full)), 0, -1) if full.endswith(s[:k])), 0))
            full = full[: len(full) - hold]
        return full[len(sent) :] if full.startswith(sent) else ""

    def _decoded(self, seq: SequenceState) -> str:
        """The sample's text up to its last whole character, decoding only the tokens after the previous poll's
        whole characters, and the poll's tokens before them as context: a token may render differently at the
        start of a sequence (a leading space), and the context's text, decoded both ways, cancels that out.
        Decoding the whole sample at every poll cost O(its length) per token (a 1,024-token sample: 154 us a
        poll, per stream; docs/LOG.md, 2026-12-04)."""
        i, tokens, detokenize = seq.sample, seq.tokens, self.engine.detokenize
        context, read = self._offsets[i]
        if len(tokens) > read:
            before = detokenize(tokens[context:read])
            after = detokenize(tokens[context:])
            if not after.endswith("\ufffd"):  # else the last character is unfinished: wait for its next bytes
                if after.startswith(before):
                    self._text[i] += after[len(before) :]
                else:  # the context rendered differently: the whole sample, this once
                    self._text[i] = detokenize(tokens)
                self._offsets[i] = (read, len(tokens))
        return self._text[i]


__all__ = [
    "Completion",
    "Delta",
    "DeltaTracker",
    "EngineStats",
    "Request",
    "SequenceState",
    "chunks",
    "completion_of",
    "prompt_ids",
    "sequence_text",
]
