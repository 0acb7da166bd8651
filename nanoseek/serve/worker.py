"""The one thread that drives the engine; the HTTP side (an asyncio event loop) talks to it through queues.

A request's `Channel` is an asyncio queue on the server's loop. The worker admits new requests and
cancellations between decode steps, runs one step, and hands every channel its new events in one
`call_soon_threadsafe` per step (one wake-up of the event loop, however many clients are streaming).
With `stream_interval` N > 1 a request's tokens go out every N decode steps, several to an event (its first
token and its last at once): every per-event cost (detokenizing, an event, a JSON chunk, a socket write) is
paid once per N tokens, for throughput under many clients at the price of a burstier stream.
Events are (kind, value, top, index) with index the request's `index` (one HTTP request may carry several
prompts, all on one channel): ("delta", Delta, top, i) with top the top-log-prob rows of the delta's tokens
(None unless asked), ("done", None, None, i), ("error", message, None, i), ("scores", Scores, None, 0).
"""

from __future__ import annotations

import asyncio
import queue
import threading
from dataclasses import dataclass

import torch

from nanoseek.engine.engine import Delta, DeltaTracker, Engine, Request
from nanoseek.engine.sampling import SamplingParams

TopRow = list[tuple[int, float]]
"""The k most probable (token id, log-prob) at one position."""


@dataclass
class Scores:
    """Teacher-forced log-probs of ids[1:] (position i scores ids[i + 1]) and each position's top k."""

    logprobs: list[float]
    top: list[TopRow]


class Channel:
    """One request's events, delivered on the event loop that created it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, top_logprobs: int = 0, temperature: float = 1.0) -> None:
        self.loop, self.queue = loop, asyncio.Queue()
        self.top_logprobs, self.temperature = top_logprobs, temperature

    async def get(self) -> tuple:
        return await self.queue.get()


def _deliver(batch: list[tuple[Channel, tuple]]) -> None:
    for channel, event in batch:
        channel.queue.put_nowait(event)


class EngineWorker:
    """Every engine call happens on this thread; `submit`, `score` and `cancel` are safe from any other."""

    def __init__(self, engine: Engine, stream_interval: int = 1) -> None:
        if stream_interval < 1:
            raise ValueError(f"stream_interval {stream_interval}: must be >= 1 (decode steps between events)")
        self.engine, self.stream_interval = engine, stream_interval
        self._steps = 0
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._active: dict[Request, tuple[DeltaTracker, Channel]] = {}
        self._outbox: dict[asyncio.AbstractEventLoop, list[tuple[Channel, tuple]]] = {}
        self._stopping = False
        self.cancelled = 0
        """Requests aborted because their client went away or ran out of time."""
        self.queued = 0
        """Requests accepted and not yet in a slot (updated after every step)."""
        self.running = 0
        """Sequences holding a KV slot (updated after every step)."""
        self.kv_tokens = 0
        """Tokens held in the KV cache by running sequences (updated after every step)."""
        self._thread = threading.Thread(target=self._run, name="nanoseek-engine", daemon=True)
        self._thread.start()

    @property
    def backlog(self) -> int:
        """Requests waiting for a slot, the ones not yet taken from the inbox included."""
        return self.queued + self._inbox.qsize()

    def submit(self, prompt_ids: list[int], params: SamplingParams, channel: Channel, index: int = 0) -> None:
        self._inbox.put(("submit", prompt_ids, (params, index), channel))

    def score(self, ids: list[int], channel: Channel) -> None:
        """Teacher-force `ids` (channel.temperature, channel.top_logprobs): one ("scores", Scores) event."""
        self._inbox.put(("score", ids, None, channel))

    def cancel(self, channel: Channel) -> None:
        self._inbox.put(("cancel", None, None, channel))

    def close(self) -> None:
        self._stopping = True
        self._inbox.put(("stop", None, None, None))
        self._thread.join(timeout=30)

    # ------------------------------------------------------------------ the worker thread
    def _post(self, channel: Channel, event: tuple) -> None:
        self._outbox.setdefault(channel.loop, []).append((channel, event))

    def _flush(self) -> None:
        for loop, batch in self._outbox.items():
            try:
                loop.call_soon_threadsafe(_deliver, batch)
            except RuntimeError:  # the loop closed (the server is shutting down): nobody is listening
                pass
        self._outbox = {}

    def _take(self, block: bool) -> None:
        while True:
            try:
                kind, ids, params, channel = self._inbox.get(block=block)
            except queue.Empty:
                return
            block = False
            if kind == "submit":
                try:
                    request = self.engine.submit(ids, params[0], index=params[1])
                except ValueError as e:
                    self._post(channel, ("error", str(e), None, params[1]))
                    continue
                self._active[request] = (DeltaTracker(self.engine, request), channel)
            elif kind == "score":
                try:
                    self._post(channel, ("scores", self._score(ids, channel), None, 0))
                except Exception as e:
                    self._post(channel, ("error", f"scoring failed: {type(e).__name__}: {e}", None, 0))
            elif kind == "cancel":
                for request, (_, target) in list(self._active.items()):
                    if target is channel:
                        self.engine.abort(request)
                        del self._active[request]
                        self.cancelled += 1

    @torch.inference_mode()
    def _score(self, ids: list[int], channel: Channel) -> Scores:
        model = self.engine.model
        x = torch.tensor([ids], device=self.engine.device)
        logits = model.logits(model.hidden_states(x))[0, :-1]
        logp = torch.log_softmax(logits.double() / channel.temperature, dim=-1)
        chosen = logp.gather(1, x[0, 1:, None])[:, 0].tolist()
        top: list[TopRow] = []
        if channel.top_logprobs:
            values, indices = logp.topk(channel.top_logprobs, dim=-1)
            top = [list(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]
        return Scores(chosen, top)

    def _top_rows(self, request: Request, channel: Channel, delta: Delta) -> list[TopRow] | None:
        """Top log-probs of the delta's tokens: a teacher-forced pass over the prompt and the sample so far."""
        if not channel.top_logprobs or not delta.token_ids:
            return None
        ids = request.prompt_ids + request.seqs[delta.sample].tokens  # the delta's tokens end it
        k = len(delta.token_ids)
        return self._score(ids, channel).top[len(ids) - k - 1 : len(ids) - 1]  # row i scores ids[i + 1]

    def _run(self) -> None:
        engine = self.engine
        while not self._stopping:
            self._take(block=not engine.has_work)
            if not self._stopping and engine.has_work:
                try:
                    engine.step()
                except Exception as e:  # a failed step fails the requests in it, not the server
                    for request, (_, channel) in self._active.items():
                        engine.abort(request)
                        self._post(
                            channel, ("error", f"generation failed: {type(e).__name__}: {e}", None, request.index)
                        )
                    self._active.clear()
                self._steps += 1
                hold = self._steps % self.stream_interval != 0  # this step's tokens wait, unless first or last
                for request, (tracker, channel) in list(self._active.items()):
                    if hold and not request.done and any(tracker.sent_tokens):
                        continue
                    for delta in tracker.poll():
                        self._post(channel, ("delta", delta, self._top_rows(request, channel, delta), request.index))
                    if request.done:
                        self._post(channel, ("done", None, None, request.index))
                        del self._active[request]
            self._count()
            self._flush()
        engine.abort_all()
        self._count()

    def _count(self) -> None:
        running = [s for r in self._active for s in r.seqs if s.finish_reason is None]
        self.queued = sum(not r.started for r in self._active)
        self.running = len(running)
        self.kv_tokens = sum(s.position + 1 for s in running)


__all__ = ["Channel", "EngineWorker", "Scores", "TopRow"]
