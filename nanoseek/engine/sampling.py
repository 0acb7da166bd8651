"""Sampling: parameters, logit filters (top-k, top-p, min-p) and a seeded, batched sampler.

Definitions (what the tests check against brute-force references):

* temperature T: the distribution is softmax(logits / T); T = 0 means greedy (argmax of the
  raw logits) and the filters are ignored.
* top-k (k > 0): keep the k most probable tokens.
* top-p (p < 1): of the tokens left by top-k, renormalised, keep the most probable ones
  until their mass reaches p: a token is kept when the mass of the tokens ranked strictly
  above it is < p (so the most probable token is always kept).
* min-p (m > 0): keep the tokens whose probability is >= m x the largest probability.
  (A ratio, so renormalisation after top-k / top-p does not change it.)
  The filters apply in that order, as in Hugging Face transformers and vLLM.
* the log-probability reported for a token is log_softmax(logits / T) at that token,
  computed BEFORE the filters (with T = 1 for greedy rows). It is the quantity an RL
  trainer recomputes with a forward pass at the same temperature; the filters are a
  property of the sampler, not of the policy.

Sampling inverts the cumulative distribution: token = the first id whose running sum of the
filtered weights exp(logit / T - max) reaches u x their total, with u in (0, 1) drawn from a
counter-based hash of (sequence key, step) rather than from a stateful generator. So a seeded
request gives the same tokens whatever else is in the batch, in whichever slot it runs, and
the whole batch is sampled in a handful of kernels over [B, vocab] and one hash per row (the
Gumbel-max trick it replaced hashed every (row, token): ~30 int64 operations per element,
most of a CPU decode step's sampling time; docs/LOG.md, 2026-12-02, sixth session). The
running sum is float64: in float32 a sum near 1 drops the terms below ~6e-8, so a large
vocabulary's long tail would lose its mass.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF
_MASK64 = 0xFFFFFFFFFFFFFFFF

# The fields of SamplingParams that settings carry under the same name (see from_config).
_FROM_SETTINGS = ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "n", "seed", "ignore_eos")


@dataclass
class SamplingParams:
    """How to sample one request. Checked by `validate()` when the request is submitted."""

    max_new_tokens: int = 256
    """Generate at most this many tokens (fewer when the context, the engine's max_seq_len, is full)."""
    temperature: float = 1.0
    """Softmax temperature; 0 = greedy."""
    top_k: int = 0
    """Keep the k most probable tokens; 0 = off."""
    top_p: float = 1.0
    """Nucleus sampling mass in (0, 1]; 1 = off."""
    min_p: float = 0.0
    """Keep tokens with probability >= min_p x the top probability; 0 = off."""
    n: int = 1
    """Samples per prompt; they share one prefill of the prompt."""
    seed: int | None = None
    """Makes the request reproducible; None draws a seed from torch's default generator."""
    stop_ids: list[int] = field(default_factory=list)
    """Extra token ids that end a sequence (kept in its tokens, left out of its text)."""
    stop_strings: list[str] = field(default_factory=list)
    """Strings that end a sequence (needs a tokenizer or detokenize callback); the text is cut before them."""
    ignore_eos: bool = False
    """Do not stop on the engine's eos ids (stop_ids and stop_strings still apply)."""

    @classmethod
    def from_config(cls, settings: object, **overrides: object) -> SamplingParams:
        """The request that some settings describe: a config section (EvalConfig, RLConfig), parsed
        command-line options or a dict (an HTTP request body), whose fields or keys named like these
        fields set them (`stop` sets stop_strings; stop_ids never come from settings); `overrides` win."""
        source = settings if isinstance(settings, dict) else vars(settings)
        values = {name: source[name] for name in _FROM_SETTINGS if name in source}
        if "stop" in source:
            values["stop_strings"] = source["stop"]
        return cls(**(values | overrides))

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise ValueError naming the first bad field."""

        def bad(name: str, allowed: str) -> ValueError:
            return ValueError(f"SamplingParams.{name} = {getattr(self, name)!r}: must be {allowed}")

        def is_int(x: object) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        def is_num(x: object) -> bool:
            return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)

        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise bad("max_new_tokens", "an integer >= 1")
        if not is_num(self.temperature) or self.temperature < 0:
            raise bad("temperature", "a finite number >= 0 (0 = greedy)")
        if not is_int(self.top_k) or self.top_k < 0:
            raise bad("top_k", "an integer >= 0 (0 = off)")
        if not is_num(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", "in (0, 1] (1 = off)")
        if not is_num(self.min_p) or not 0 <= self.min_p <= 1:
            raise bad("min_p", "in [0, 1] (0 = off)")
        if not is_int(self.n) or self.n < 1:
            raise bad("n", "an integer >= 1")
        if self.seed is not None and (not is_int(self.seed) or self.seed < 0):
            raise bad("seed", "None or an integer >= 0")
        if not isinstance(self.stop_ids, list | tuple) or not all(is_int(t) and t >= 0 for t in self.stop_ids):
            raise bad("stop_ids", "a list of token ids")
        if vocab_size is not None and any(t >= vocab_size for t in self.stop_ids):
            raise bad("stop_ids", f"token ids < vocab_size={vocab_size}")
        if not isinstance(self.stop_strings, list | tuple) or not all(
            isinstance(s, str) and s for s in self.stop_strings
        ):
            raise bad("stop_strings", "a list of non-empty strings")
        if not isinstance(self.ignore_eos, bool):
            raise bad("ignore_eos", "True or False")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def filtering(self) -> bool:
        return self.top_k > 0 or self.top_p < 1 or self.min_p > 0


# ----------------------------------------------------------------------------- filters
def filter_logits(logits: Tensor, top_k: Tensor, top_p: Tensor, min_p: Tensor) -> Tensor:
    """Set the logits outside each row's top-k / top-p / min-p set to -inf (see module docstring).

    logits: [B, V] float (already divided by the temperature); top_k [B] int (0 = off),
    top_p [B] float (1 = off), min_p [B] float (0 = off). Returns a new [B, V] tensor.
    """
    V = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(V, device=logits.device)
    k = torch.where(top_k > 0, top_k, V).to(rank.dtype)
    sorted_logits = sorted_logits.masked_fill(rank[None, :] >= k[:, None], float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # exclusive cumsum (exactly 0 at rank 0)
    drop = (mass_before >= top_p[:, None]) & (top_p[:, None] < 1)
    # min-p in log space: p_i >= m * p_max  <=>  logit_i - logit_max >= log(m)
    drop |= sorted_logits - sorted_logits[:, :1] < torch.log(min_p)[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


# ----------------------------------------------------------------------------- noise
def _mul32(x: Tensor, c: int) -> Tensor:
    """(x * c) mod 2^32 for int64 x in [0, 2^32) and c in [0, 2^32), in two operations without int64
    overflow: c is replaced by c - 2^32 when c >= 2^31 (the same residue), so |x * c| < 2^63."""
    return (x * (c - (1 << 32) if c >= 1 << 31 else c)) & _MASK32


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer finaliser (xorshift-multiply, 'lowbias32' constants) on int64 tensors."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x ^= x >> 15
    x = _mul32(x, 0x846CA68B)
    return x.bitwise_xor_(x >> 16)


def uniform_noise(keys: Tensor, steps: Tensor) -> Tensor:
    """One uniform in (0, 1) per row [B] float64, determined by (keys[b] (two 32-bit halves), steps[b]).

    keys: [B, 2] int64 in [0, 2^32); steps: [B] int64. 48 random bits; same inputs, same draw, on any device.
    """
    ka = _mix32(keys[:, 0] ^ _mix32(steps & _MASK32))
    kb = _mix32(keys[:, 1] ^ ka)
    low = _mix32(kb ^ ka ^ 0x9E3779B9)
    bits = (kb << 16) | (low >> 16)
    return (bits.double() + 0.5) * 2.0**-48


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def sequence_key(seed: int, *counters: int) -> tuple[int, int]:
    """The two 32-bit halves of a 64-bit hash of (seed, counters...): one noise stream per sequence."""
    h = _splitmix64(seed & _MASK64)
    for c in counters:
        h = _splitmix64(h ^ (c & _MASK64))
    return h & _MASK32, h >> 32


def random_seed() -> int:
    """A seed for an unseeded request; follows torch.manual_seed so whole runs stay reproducible."""
    return int(torch.randint(0, 2**62, (1,)).item())


# ----------------------------------------------------------------------------- sampler
@dataclass
class SamplingBatch:
    """Per-row sampling parameters of one batch, as tensors on the logits' device."""

    temperature: Tensor  # [B] float64 (cast to the logits' dtype when used), 0 = greedy
    top_k: Tensor  # [B] int64
    top_p: Tensor  # [B] float64
    min_p: Tensor  # [B] float64
    keys: Tensor  # [B, 2] int64
    steps: Tensor  # [B] int64
    any_sampling: bool  # some row has temperature > 0
    any_filter: bool  # some sampled row uses top-k / top-p / min-p

    @classmethod
    def build(
        cls,
        params: Sequence[SamplingParams | None],
        keys: Sequence[tuple[int, int]],
        steps: Sequence[int],
        device: torch.device,
    ) -> SamplingBatch:
        """Rows with params None (padding) are greedy."""
        # One float64 upload per step: the integers (keys < 2^32, steps, top_k) are exact in float64.
        rows = torch.tensor(
            [
                [p.temperature, p.top_p, p.min_p, p.top_k, a, b, s] if p else [0.0, 1.0, 0.0, 0, a, b, s]
                for p, (a, b), s in zip(params, keys, steps, strict=True)
            ],
            dtype=torch.float64,
        ).to(device, non_blocking=True)
        ints = rows[:, 3:].long()
        sampled = [p for p in params if p is not None and not p.greedy]
        return cls(
            temperature=rows[:, 0],
            top_p=rows[:, 1],
            min_p=rows[:, 2],
            top_k=ints[:, 0],
            keys=ints[:, 1:3],
            steps=ints[:, 3],
            any_sampling=bool(sampled),
            any_filter=any(p.filtering for p in sampled),
        )


def sample(logits: Tensor, batch: SamplingBatch) -> tuple[Tensor, Tensor]:
    """Pick one token per row and its log-probability. logits: [B, V] (any float dtype).

    Returns (tokens [B] int64, logprobs [B]: float32, or float64 for float64 logits);
    see the module docstring for the definitions.
    """
    filters = (batch.top_k, batch.top_p, batch.min_p) if batch.any_sampling and batch.any_filter else None
    return draw(logits, batch.temperature, batch.keys, batch.steps, filters, sampling=batch.any_sampling)


def draw(
    logits: Tensor,
    temperature: Tensor,
    keys: Tensor,
    steps: Tensor,
    filters: tuple[Tensor, Tensor, Tensor] | None = None,
    sampling: bool = True,
) -> tuple[Tensor, Tensor]:
    """`sample` on a batch's tensors: what a compiled graph takes (no flags of the batch to guard on).

    filters: (top_k, top_p, min_p) or None (no row filters); sampling False: every row is greedy.
    """
    logits = logits if logits.dtype == torch.float64 else logits.float()
    dtype = logits.dtype
    top, greedy_token = logits.max(dim=-1)
    temperature_or_1 = torch.where(temperature > 0, temperature, 1.0).to(dtype)
    scaled = logits / temperature_or_1[:, None]
    shift = (top / temperature_or_1)[:, None]  # each row's largest scaled logit (division keeps the order)
    weights = (scaled - shift).exp()  # unnormalised probabilities, the largest exactly 1
    if sampling:
        kept = weights
        if filters is not None:
            top_k, top_p, min_p = filters
            kept = (filter_logits(scaled, top_k, top_p.to(dtype), min_p.to(dtype)) - shift).exp()  # 0 if dropped
        cdf = kept.cumsum(dim=-1, dtype=torch.float64)
        target = uniform_noise(keys, steps) * cdf[:, -1]  # in (0, total]: lands on a kept token's step
        sampled = torch.searchsorted(cdf, target[:, None]).squeeze(1).clamp_(max=logits.shape[-1] - 1)
        tokens = torch.where(temperature > 0, sampled, greedy_token)
    else:
        tokens = greedy_token
    chosen = scaled.gather(1, tokens[:, None]).squeeze(1)
    return tokens, chosen - shift.squeeze(1) - weights.sum(dim=-1).log()


__all__ = ["SamplingBatch", "SamplingParams", "draw", "filter_logits", "sample", "sequence_key", "uniform_noise"]
