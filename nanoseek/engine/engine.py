"""The inference engine: continuous batching over a slot-based KV cache.

    engine = Engine(model, tokenizer)                      # the trainer's live model works too
    [[c]] = engine.generate(["2+2="], SamplingParams(max_new_tokens=8, temperature=0))
    c.text, c.token_ids, c.logprobs, c.finish_reason, c.ttft_s, c.tokens_per_s
    for delta in engine.stream(prompt_ids, params): print(delta.text, end="")

Scheduling, one `step()` at a time:
1. admit: while the oldest waiting request's n samples fit in free slots, it takes the
   lowest free slots (requests wait, in order, when the cache is full: nothing fails);
2. prefill the admitted prompts, right-padded into batches of at most
   `max_prefill_tokens` (sorted by length, so little padding), writing each prompt's
   k/v once into its first slot; the n - 1 other samples get a copy of that prefix; every
   sample draws its first token from the same last-position logits;
3. one decode step over slots 0..hi-1 (hi = highest running slot + 1; slot i is batch
   row i, free slots in between are dummy rows): a CUDA graph on CUDA, a torch.compile'd
   step on CPU (compiled.py), else eager. Its inputs (each slot's last token, position and
   sampling parameters) stay on the device between steps (slots.py): nothing is built per row;
4. sample, move the tokens to the host (the one synchronisation of the step) and check
   stopping per sequence: a finished sequence frees its slot at once, and the next step's
   admission fills it while the others keep decoding.

Multi-turn sequences (episodes) keep their slots between turns: see turns.py.
"""

from __future__ import annotations

import heapq
import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext

import torch
from torch import Tensor, nn

from nanoseek import precision
from nanoseek.engine import compiled
from nanoseek.engine.cache import KVCache, bf16_for_the_kernel
from nanoseek.engine.cuda_graphs import DecodeGraphs
from nanoseek.engine.requests import (
    Completion,
    Delta,
    DeltaTracker,
    EngineStats,
    Request,
    SequenceState,
    chunks,
    completion_of,
    prompt_ids,
    sequence_text,
)
from nanoseek.engine.sampling import SamplingBatch, SamplingParams, random_seed, sample
from nanoseek.engine.slots import SlotState
from nanoseek.engine.turns import MultiTurn

CPU_KV_CACHE_GB = 2.0  # default KV budget on CPU (capped at a quarter of the available memory)


class Engine(MultiTurn):
    """Batched generation with a preallocated KV cache, continuous batching and CUDA graphs.

    model: a `Transformer` (the trainer's own object: no copy; its train/eval mode is
    restored after each call). tokenizer: optional, for string prompts, eos ids and text.
    max_batch: most sequences decoded at once (= KV slots, unless the budget allows fewer).
    max_seq_len: prompt + generation length of a slot (default: the model's).
    kv_cache_gb: KV budget in GiB; default: kv_cache_fraction of the free GPU memory on CUDA,
    min(2 GiB, a quarter of the available RAM) on CPU. Only what max_batch slots need is allocated.
    kv_dtype: default `precision.kv_cache_dtype`: bfloat16 on CUDA, and on a CPU with native bf16 for a float32
    model where nanoseek's decode attention applies (`engine.cache.bf16_for_the_kernel`) or whose float32 cache
    for max_batch sequences would outgrow the CPU's last-level cache; elsewhere the dtype
    of the model's output-layer weight (the model's dtype; 16-bit for a twin from `engine.twin.rollout_policy`,
    which decodes under autocast).
    eos_ids: ids that end a sequence unless ignore_eos (default: the tokenizer's stop_ids).
    detokenize: ids -> text, for text and stop strings (default: tokenizer.decode).
    compile: on CPU, decode through torch.compile: True from the first step, False never, None
    (default) as NANOSEEK_COMPILE says, else after compiled.COMPILE_AFTER_STEPS steps.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer=None,
        *,
        max_batch: int = 64,
        max_seq_len: int | None = None,
        kv_cache_gb: float | None = None,
        kv_cache_fraction: float = 0.5,
        kv_dtype: torch.dtype | None = None,
        use_cuda_graphs: bool = True,
        max_prefill_tokens: int = 8192,
        eos_ids: Sequence[int] | None = None,
        detokenize: Callable[[Sequence[int]], str] | None = None,
        compile: bool | None = None,
    ) -> None:
        cfg = model.cfg
        self.model, self.tokenizer = model, tokenizer
        weight = model.embed.weight
        self.device, self.vocab_size = weight.device, cfg.vocab_size
        self.max_seq_len = cfg.max_seq_len if max_seq_len is None else max_seq_len
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch = {max_batch!r}: must be an integer >= 1")
        if not isinstance(self.max_seq_len, int) or not 2 <= self.max_seq_len <= cfg.max_seq_len:
            raise ValueError(f"max_seq_len = {max_seq_len!r}: must be in [2, model max_seq_len={cfg.max_seq_len}]")
        if max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens = {max_prefill_tokens!r}: must be >= 1")
        # Elsewhere the dtype the output layer's matmul runs in: the model's, or for RL's twin under autocast
        # (engine/twin.py) its 16-bit copies'. Under autocast a float32 cache is what every step's attention
        # matmuls would cast (and, for the keys, transpose) in full at each layer: the same values, read twice.
        float32_bytes = max_batch * KVCache.bytes_per_slot(model, self.max_seq_len, torch.float32)
        self.kv_dtype = kv_dtype or precision.kv_cache_dtype(
            self.device, model.output_weight.dtype, float32_bytes, bf16_for_the_kernel(self.device)
        )
        self.max_prefill_tokens = max_prefill_tokens
        self.eos_ids = list(eos_ids) if eos_ids is not None else list(tokenizer.stop_ids if tokenizer else [])
        self.detokenize = detokenize or (tokenizer.decode if tokenizer is not None else None)
        self.use_cuda_graphs = use_cuda_graphs and self.device.type == "cuda"
        self._capture_graphs = self.device.type == "cuda"  # False: run the static-shape path eagerly (tests)
        self.compile_after = compiled.compile_after(self.device, compile)
        n_params = sum(p.numel() for p in model.parameters())

        per_slot = KVCache.bytes_per_slot(model, self.max_seq_len, self.kv_dtype)
        budget = self._kv_budget(kv_cache_gb, kv_cache_fraction)
        self.n_slots = min(max_batch, budget // per_slot)
        if self.n_slots < 1:
            raise ValueError(
                f"the KV cache budget ({budget / 2**30:.3f} GiB) cannot hold one sequence of max_seq_len="
                f"{self.max_seq_len} ({per_slot / 2**20:.1f} MiB): lower max_seq_len or raise kv_cache_gb"
            )
        self.kv_cache_bytes = self.n_slots * per_slot
        self.steps_per_call = compiled.steps_per_call(self.n_slots, n_params)  # compiled calls with no row filtering
        self.cache: KVCache | None = None
        self.slots: SlotState | None = None
        self._graphs: DecodeGraphs | None = None
        self._check_weights = True
        self._waiting: deque[Request] = deque()
        self._running: dict[int, SequenceState] = {}  # slot -> sequence
        self._one_row_steps = 0  # decode steps in a row that had one row (slot 0) to run
        self._kept: dict[int, SequenceState] = {}  # slot -> finished sequence of a keep request
        self._continuing: list[SequenceState] = []  # kept sequences with tokens to append at the next step
        self._free: list[int] = list(range(self.n_slots))  # a heap: lowest slot first keeps the batch compact
        self.stats = EngineStats()

    # ------------------------------------------------------------------ memory
    def _kv_budget(self, kv_cache_gb: float | None, fraction: float) -> int:
        if kv_cache_gb is not None:
            if not kv_cache_gb > 0:
                raise ValueError(f"kv_cache_gb = {kv_cache_gb!r}: must be > 0")
            return int(kv_cache_gb * 2**30)
        if self.device.type == "cuda":
            if not 0 < fraction <= 1:
                raise ValueError(f"kv_cache_fraction = {fraction!r}: must be in (0, 1]")
            free, _ = torch.cuda.mem_get_info(self.device)
            free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
            return int(fraction * free)
        budget = int(CPU_KV_CACHE_GB * 2**30)
        try:
            budget = min(budget, os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4)
        except (ValueError, OSError, AttributeError):
            pass
        return budget

    def _ensure_cache(self) -> None:
        if self.cache is None:
            self.cache = KVCache.for_model(self.model, self.n_slots, self.max_seq_len, self.kv_dtype, self.device)
            self.slots = SlotState(self.n_slots, self.device)

    def release(self) -> None:
        """Free the KV cache and CUDA graphs (e.g. while the trainer trains); reallocated on next use."""
        if self._running or self._waiting or self._kept:
            raise RuntimeError("release() with requests in flight or kept; abort them first")
        self.cache, self.slots, self._graphs = None, None, None

    def cuda_graph_status(self) -> dict:
        """Whether decode steps replay CUDA graphs: {"enabled", "captured" (graphs held now), "disabled_reason"}.

        enabled: graphs are asked for and possible (CUDA, use_cuda_graphs) and no capture has failed;
        disabled_reason: why a capture failed (the engine then decodes eagerly), else None.
        """
        graphs = self._graphs
        reason = graphs.disabled_reason if graphs is not None else None
        if not self.use_cuda_graphs:
            reason = "use_cuda_graphs=False" if self.device.type == "cuda" else f"device {self.device.type}"
        return dict(
            enabled=self.use_cuda_graphs and reason is None,
            captured=len(graphs.graphs) if graphs is not None else 0,
            disabled_reason=reason,
        )

    @property
    def compiling(self) -> bool:
        """Whether decode steps run compiled now (CPU, asked for, enough steps run, no compile failure)."""
        after = self.compile_after
        return after is not None and self.stats.decode_steps >= after and compiled.COMPILED.failure is None

    # ------------------------------------------------------------------ requests
    def submit(
        self,
        prompt: str | Sequence[int] | Tensor,
        params: SamplingParams | None = None,
        *,
        index: int = 0,
        keep: bool = False,
    ) -> Request:
        """Validate and queue a request (ValueError naming the bad field; nothing is queued then).

        `index` goes into the sampling keys (prompts of one seeded `generate` call get different
        noise) and into Completion.index. `keep`: a sample that stops (or reaches max_new_tokens)
        keeps its slot for `continue_sequence` until `release_sequence`.
        """
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params: expected SamplingParams, got {type(params).__name__}")
        params.validate(self.vocab_size)
        if params.n > self.n_slots:
            raise ValueError(f"SamplingParams.n = {params.n}: must be <= the engine's KV slots ({self.n_slots})")
        if params.stop_strings and self.detokenize is None:
            raise ValueError("SamplingParams.stop_strings: needs a tokenizer or a detokenize callback")
        ids = prompt_ids(prompt, self.tokenizer, self.vocab_size, self.max_seq_len)
        stop_ids = set(params.stop_ids) | (set() if params.ignore_eos else set(self.eos_ids))
        max_new = min(params.max_new_tokens, self.max_seq_len - len(ids))
        seed = params.seed if params.seed is not None else random_seed()
        request = Request(index, ids, params, stop_ids, max_new, seed, keep)
        self._waiting.append(request)
        return request

    def abort(self, request: Request) -> None:
        """Drop a request: out of the queue, its running samples finished with 'abort', its kept slots freed."""
        if request in self._waiting:
            self._waiting.remove(request)
        request.aborted = True
        for seq in request.seqs:
            if seq.finish_reason is None:
                self._finish(seq, "abort")
            self.release_sequence(seq)

    def abort_all(self) -> None:
        live = list(self._running.values()) + list(self._kept.values())
        for request in list(self._waiting) + list({s.request: None for s in live}):
            self.abort(request)

    @property
    def has_work(self) -> bool:
        return bool(self._waiting or self._running or self._continuing)

    # ------------------------------------------------------------------ the loop
    @contextmanager
    def inference(self) -> Iterator[None]:
        """Eval mode, inference mode and the caller's autocast without its cache, for the steps run inside
        (each `step` enters it too; a loop of many steps, like `generate`'s, holds it once)."""
        was_training = self.model.training
        if was_training:
            self.model.eval()
        try:
            with torch.inference_mode(), self._autocast_without_cache():
                yield
        finally:
            if was_training:
                self.model.train()

    def _autocast_without_cache(self):
        """The caller's autocast (if any) without its cache of weight casts: a captured decode step
        would keep reading cached casts that the caller's autocast frees when it exits."""
        kind = self.device.type
        if not torch.is_autocast_enabled(kind):
            return nullcontext()
        return torch.autocast(kind, dtype=torch.get_autocast_dtype(kind), cache_enabled=False)

    def step(self) -> None:
        """Admit and prefill what fits, then one decode step over everything running."""
        with self.inference():
            self._ensure_cache()
            self.slots.flush()  # resets of the slots freed since the last step, before admission reuses them
            admitted = []
            while self._waiting and len(self._free) >= self._waiting[0].params.n:
                request = self._waiting.popleft()
                slots = sorted(heapq.heappop(self._free) for _ in range(request.params.n))
                request.seqs = [SequenceState(request, i, slot) for i, slot in enumerate(slots)]
                for seq in request.seqs:
                    self._running[seq.slot] = seq
                admitted.append(request)
            self.stats.max_running = max(self.stats.max_running, len(self._running))
            if admitted:
                self._check_weights = True
                self._prefill(admitted)
            if self._continuing:
                self._check_weights = True
                self._extend()
            if self._running:
                self._decode()

    def _prefill(self, requests: list[Request]) -> None:
        for chunk in chunks(requests, lambda r: len(r.prompt_ids), self.max_prefill_tokens):
            self._prefill_chunk(chunk)

    def _prefill_chunk(self, requests: list[Request]) -> None:
        """One forward over right-padded prompts; each prompt's k/v go to its first slot."""
        lengths = [len(r.prompt_ids) for r in requests]
        B, T = len(requests), max(lengths)
        seqs = [s for r in requests for s in r.seqs]
        rows = [b for b, r in enumerate(requests) for _ in r.seqs]  # logits row of each sample
        copies = [(r.seqs[0].slot, s.slot) for r in requests for s in r.seqs[1:]]  # prefix: first slot -> others
        ids, slots, last, src, dst, rows_t = self._upload(
            [t for r in requests for t in r.prompt_ids + [0] * (T - len(r.prompt_ids))],
            [r.seqs[0].slot for r in requests],
            [n - 1 for n in lengths],
            [a for a, _ in copies],
            [b for _, b in copies],
            rows,
        )
        batch = self._sampling_batch(seqs)
        positions = torch.arange(T, device=self.device).expand(B, T)
        autocast_to = precision.prefill_dtype(self.device, self.model.output_weight.dtype, B * T)
        with precision.autocast(self.device, autocast_to):  # many tokens: the matmuls' arithmetic is the cost
            hidden = self.model.hidden_states(ids.view(B, T), positions, cache=self.cache.prefill(slots))
        logits = self.model.logits(hidden[torch.arange(B, device=self.device), last])  # [B, V]
        self.cache.copy_slots(src, dst, T)  # one gather/scatter for the chunk
        if rows != list(range(B)):
            logits = logits[rows_t]
        self.stats.prefill_calls += 1
        self.stats.prefill_tokens += sum(lengths)
        self.stats.prefill_padded_tokens += B * T
        tokens, logprobs = sample(logits, batch)
        self.slots.admit(  # each sample's first token sits at position len(prompt)
            [s.slot for s in seqs],
            tokens,
            [lengths[b] for b in rows],
            [s.request.params for s in seqs],
            [s.key for s in seqs],
        )
        self._append_rows(list(enumerate(seqs)), tokens, logprobs)

    def _decode(self) -> None:
        self.slots.flush()  # rows of sequences that ended in this step's prefill
        hi = max(self._running) + 1
        kv_len = max(s.position for s in self._running.values()) + 1
        compiling = self.compiling
        one_row = hi == 1
        if compiling and one_row and self.n_slots > 1 and self._one_row_steps < compiled.ONE_ROW_GRAPH_AFTER:
            hi = 2  # a free slot's dummy row: the graph of every batch size, not one of its own (ONE_ROW_GRAPH_AFTER)
        batch = self.slots.batch(hi)
        # Several steps a call when no row filters its sampling (compiled.steps_per_call); the keys read cover the last.
        n_steps = self.steps_per_call if compiling and not (batch.any_sampling and batch.any_filter) else 1
        ids, pos = self.slots.inputs(hi)
        steps = None
        if n_steps > 1:
            # Not past max_seq_len - 1: only a row that has finished feeds there (a last token is drawn, not fed), and
            # a graph reading the whole cache would be a second one (slicing all of a dimension is a special case).
            keys_read = min(kv_len + n_steps - 1, self.max_seq_len - 1)
            live = self.slots.live(hi)
            steps = compiled.COMPILED.steps(self.model, self.cache, ids, pos, keys_read, batch, live, n_steps)
        if steps is not None:
            tokens, logprobs = steps
        elif compiling:  # the forward and the sampling in one graph
            n_steps = 1
            tokens, logprobs = compiled.COMPILED.step(self.model, self.cache, ids, pos, kv_len, batch)
        else:
            n_steps = 1
            if self.use_cuda_graphs and (self._graphs is None or self._graphs.disabled_reason is None):
                # Full check of the weights (re-assigned parameters too) when requests were admitted; the
                # cheap one (same tensors, same storage) at every other step.
                full, self._check_weights = self._check_weights, False
                if self._graphs is None or not self._graphs.matches(self.model, self.cache, full=full):
                    self._graphs = DecodeGraphs(self.model, self.cache, capture=self._capture_graphs)
                logits = self._graphs.run(ids[:, 0], pos[:, 0], kv_len)
            else:
                hidden = self.model.hidden_states(ids, pos, cache=self.cache.decode(pos, kv_len))
                logits = self.model.logits(hidden[:, -1])
            tokens, logprobs = sample(logits, batch)
        self.slots.advance(hi, tokens, n_steps)
        self._one_row_steps = self._one_row_steps + n_steps if one_row else 0
        self.stats.decode_steps += n_steps
        self.stats.decode_rows += hi * n_steps
        self.stats.decode_tokens += self._append_rows(list(self._running.items()), tokens, logprobs)  # row = slot

    # Host-to-device copies are made before a step's forward is queued, while the stream is idle (the
    # previous step ended with its one synchronisation): a copy from pageable memory queued behind GPU
    # work may wait for it ("the driver may synchronize with the stream"), stalling the host.
    def _upload(self, *columns: list[int]) -> list[Tensor]:
        """Integer lists as int64 tensors on the device, in one copy."""
        flat = torch.tensor([x for column in columns for x in column], dtype=torch.int64)
        return list(flat.to(self.device, non_blocking=True).split([len(c) for c in columns]))

    def _sampling_batch(self, seqs: list[SequenceState]) -> SamplingBatch:
        """Sampling rows for the prefill's samples (decode steps read theirs from `self.slots`)."""
        return SamplingBatch.build(
            [s.request.params for s in seqs],
            [s.key for s in seqs],
            [s.sampled + len(s.tokens) for s in seqs],
            self.device,
        )

    def _append_rows(self, rows: list[tuple[int, SequenceState]], tokens: Tensor, logprobs: Tensor) -> int:
        """Give each (row, sequence) its row's tokens and log-probs ([B], or [B, n] from n steps: a sequence takes
        them in order until it finishes); the number of tokens taken."""
        # The one host synchronisation of a step: the host decides who stops.
        tokens, logprobs = torch.stack([tokens.double(), logprobs.double()]).cpu().tolist()
        now = time.perf_counter()
        taken = 0
        for row, seq in rows:
            row_tokens, row_logprobs = tokens[row], logprobs[row]
            if not isinstance(row_tokens, list):
                row_tokens, row_logprobs = [row_tokens], [row_logprobs]
            for token, logprob in zip(row_tokens, row_logprobs):
                self._append(seq, int(token), logprob, now)
                taken += 1
                if seq.finish_reason is not None:
                    break
        return taken

    def _append(self, seq: SequenceState, token: int, logprob: float, now: float) -> None:
        request = seq.request
        seq.tokens.append(token)
        seq.logprobs.append(logprob)
        if len(seq.tokens) == 1:
            seq.first_token_time = now
        if token in request.stop_ids:
            self._finish(seq, "stop", token)
        elif request.params.stop_strings and (match := self._stop_string(seq)) is not None:
            self._finish(seq, "stop", match)
        elif len(seq.tokens) >= seq.max_new_tokens:
            self._finish(seq, "length")

    def _stop_string(self, seq: SequenceState) -> str | None:
        tail = self.detokenize(seq.tokens[-seq.request.stop_window :])
        return next((s for s in seq.request.params.stop_strings if s in tail), None)

    def _finish(self, seq: SequenceState, reason: str, stop: int | str | None = None) -> None:
        seq.finish_reason, seq.stop, seq.finish_time = reason, stop, time.perf_counter()
        if self._running.get(seq.slot) is seq:
            del self._running[seq.slot]
            keep = seq.request.keep and reason != "abort"
            if keep:
                self._kept[seq.slot] = seq
            else:
                heapq.heappush(self._free, seq.slot)
            if self.slots is not None:
                self.slots.release(seq.slot, seq.position if keep else 0)

    # ------------------------------------------------------------------ results
    def text(self, seq: SequenceState) -> str | None:
        """The sample's text: without a final stop token, cut before a stop string (None without a tokenizer)."""
        return sequence_text(seq, self.detokenize)

    def completion(self, seq: SequenceState) -> Completion:
        return completion_of(seq, self.detokenize)

    def completions(self, request: Request) -> list[Completion]:
        return [self.completion(seq) for seq in request.seqs]

    # ------------------------------------------------------------------ high-level APIs
    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[list[Completion]]:
        """n completions per prompt, in prompt order. A bad request gets one Completion with
        finish_reason 'error' and the message in `error`; the others are generated normally."""
        if isinstance(prompts, str | Tensor) or (prompts and isinstance(prompts[0], int)):
            raise TypeError("prompts: expected a list of prompts (strings or token-id lists)")
        if params is None or isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"params: {len(params)} SamplingParams for {len(prompts)} prompts")
        results: list[list[Completion] | None] = [None] * len(prompts)
        requests = []
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            try:
                requests.append(self.submit(prompt, p, index=i))
            except ValueError as e:
                ids = list(prompt) if isinstance(prompt, list | tuple) else []
                results[i] = [Completion(ids, [], [], None, "error", index=i, error=str(e))]
        try:
            with self.inference():
                while self.has_work:
                    self.step()
        except BaseException:
            self.abort_all()  # a failed step leaves no half-done state behind
            raise
        for r in requests:
            results[r.index] = self.completions(r)
        return results

    def stream(self, prompt: str | Sequence[int], params: SamplingParams | None = None) -> Iterator[Delta]:
        """Generate one request, yielding each sample's new tokens (and text) after every step.

        Text is held back while it ends in an incomplete character or could be the start of a
        stop string. Stopping the iteration early aborts the request.
        """
        request = self.submit(prompt, params)
        deltas = DeltaTracker(self, request)
        try:
            while not request.done:
                self.step()
                yield from deltas.poll()
        finally:
            if not request.done:
                self.abort(request)


__all__ = ["Completion", "Delta", "DeltaTracker", "Engine", "EngineStats", "Request"]
