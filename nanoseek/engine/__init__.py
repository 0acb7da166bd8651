"""Inference: a slot-based KV cache, continuous batching, seeded sampling, CUDA-graph (GPU) or compiled (CPU) decode.

from nanoseek.engine import Engine, SamplingParams
engine = Engine(model, tokenizer, max_batch=64)
results = engine.generate(prompts, SamplingParams(max_new_tokens=256, temperature=1.0, n=8))
"""

from nanoseek.engine.cache import KVCache
from nanoseek.engine.engine import Completion, Delta, Engine, EngineStats, Request
from nanoseek.engine.sampling import SamplingParams, filter_logits, sample

__all__ = [
    "Completion",
    "Delta",
    "Engine",
    "EngineStats",
    "KVCache",
    "Request",
    "SamplingParams",
    "filter_logits",
    "sample",
]
