"""Which float format the matmuls run in on this machine: bf16 where the processor multiplies it natively.

Weights, optimizer states and the loss stay float32 everywhere; "bf16" means matmuls under bf16
autocast (and Muon's Newton-Schulz iteration in bf16), or, for decoding, the RL twin's bf16 copies.

Training (`autocast_dtype`): bf16 on CUDA, and on a CPU that multiplies bf16 natively: AVX-512 BF16
(Intel Cooper Lake and later, AMD Zen 4 and later) or AMX (Intel Sapphire Rapids and later). Measured
on a 2-core AMD EPYC with AVX-512 BF16 (docs/LOG.md, 2026-12-01): forward + backward 1.5-1.8x faster
than float32 at the tiny presets (the trainer's whole step 1.3-1.7x), 2.4x at `small`; Newton-Schulz
2-4x. One shape lost: many narrow experts (64 of width 32) through torch._grouped_mm (2x slower).
Without those instructions bf16 is emulated and slower than float32, so such CPUs stay in float32.

Decoding (`inference_dtype`): bf16 on CUDA; on a CPU with native bf16 only when the model's float32
weights do not fit in the last-level cache (the share of it this process can count on: `cpu_cache_bytes`, at most
16 MiB a CPU, since a VM sees its host's whole cache): a decode step then reads every weight from memory and
bf16 halves those bytes (the 100M `small` preset decodes 1.5-2x faster), while weights that fit are
read from the cache at no such cost and bf16's conversions make the 0.85M `tiny` presets slower.
Those bf16 weights are multiplied through prepacked copies where a weight is large enough (`model.linear`:
oneDNN otherwise reorders each weight at every call; `small` at one row 96-99 -> 163-181 tok/s), laid out for
nanoseek's own few-rows kernel on a CPU with AVX-512 BF16 and no AMX (`model.cpu_kernel`: 2-8 rows 1.1-1.4x more).

The engine's KV cache (`kv_cache_dtype`): bf16 on CUDA; on a CPU with native bf16, bf16 for a float32 model
whose float32 cache would not fit in the last-level cache, for the same reason: every decode step reads the keys
and values of every running sequence from memory (the tiny preset, 64 sequences of 320 tokens: 1.17-1.26x the
tokens/s of a float32 cache; at one sequence, 4% fewer). Attention still sums in float32 (docs/LOG.md,
2026-12-02, tenth session). And bf16 for any float32 model's cache where nanoseek's decode attention kernel applies
(`engine.cache.bf16_for_the_kernel`; it reads a bf16 cache): as a C++ operation it beats the compiled step's own
attention over a float32 cache at every batch measured, 1.06x at one sequence of tiny, 1.10-1.23x at 8-64 of tiny
and tiny-moe (docs/LOG.md, 2026-12-05, thirty-third session).

The engine's prefill (`prefill_dtype`): a float32 model's prefill autocasts its matmuls to bf16 on a CPU with native
bf16 when the chunk holds at least PREFILL_BF16_MIN_TOKENS tokens. Unlike a decode step, a prefill of many tokens
is bound by the matmuls' arithmetic, which bf16 dot products do at twice float32's rate: 2048-4096 prompt tokens
through the tiny presets 1.8-1.9x faster; below ~256 tokens bf16 is slower (docs/LOG.md, 2026-12-02, eleventh
session). Only the keys and values it caches and the first token's logits see it (the logits layer is float32).

`NANOSEEK_CPU_BF16=0` keeps a bf16-capable CPU in float32 (and `=1` forces bf16 on any CPU), for both.
"""

from __future__ import annotations

import math
import os
from contextlib import nullcontext
from functools import cache
from pathlib import Path

import torch
from torch import Tensor

CPU_BF16_ENV = "NANOSEEK_CPU_BF16"
_DEFAULT_CACHE_BYTES = 32 * 2**20  # where sysfs does not say


@cache
def cpu_bf16_instructions() -> str | None:
    """The processor's native bf16 matmul instructions ("AMX" or "AVX-512 BF16"), or None."""
    cpu = getattr(torch, "cpu", None)
    if getattr(cpu, "_is_amx_tile_supported", lambda: False)():
        return "AMX"
    if getattr(cpu, "_is_avx512_bf16_supported", lambda: False)():
        return "AVX-512 BF16"
    return None


def cpu_bf16() -> bool:
    """Whether the CPU computes in bf16: it has native bf16, unless NANOSEEK_CPU_BF16 says otherwise."""
    setting = os.environ.get(CPU_BF16_ENV, "").strip()
    if setting in ("0", "1"):
        return setting == "1"
    if setting:
        raise ValueError(f"{CPU_BF16_ENV}={setting!r}: must be 0 (float32) or 1 (bf16)")
    return cpu_bf16_instructions() is not None


@cache
def cpu_cache_bytes() -> int:
    """The last-level cache this process can count on: the largest cache sysfs lists (32 MiB where it lists none),
    at most CACHE_BYTES_PER_CPU for each CPU the process may run on. A virtual machine's sysfs shows the whole host
    processor's cache, shared with every other tenant: 480 MiB on a 2-CPU Xeon VM, where `small`'s 400 MB of float32
    weights then counted as cached and decoded from memory at 24 GB/s (37 tok/s at one sequence; docs/LOG.md,
    2026-12-05, thirty-first session)."""
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip().upper()
        except OSError:
            continue
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    affinity = getattr(os, "sched_getaffinity", None)  # Linux; elsewhere every CPU
    cpus = len(affinity(0)) if affinity else (os.cpu_count() or 1)
    return usable_cache_bytes(max(sizes, default=_DEFAULT_CACHE_BYTES), cpus)


CACHE_BYTES_PER_CPU = 16 * 2**20
"""The most last-level cache counted per CPU: above what processors hold (AMD Zen 4: 4 MiB a core, 12 with 3D
V-Cache; Intel server parts ~2-5 MiB), so only a cache shared beyond the process's CPUs is cut."""


def usable_cache_bytes(largest_cache: int, cpus: int) -> int:
    """`cpu_cache_bytes` from what sysfs lists and how many CPUs the process may run on."""
    return min(largest_cache, CACHE_BYTES_PER_CPU * max(cpus, 1))


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype training autocasts matmuls to on this device (None: float32 throughout)."""
    if device.type == "cuda" or (device.type == "cpu" and cpu_bf16()):
        return torch.bfloat16
    return None


def inference_dtype(device: torch.device | str, n_params: int) -> torch.dtype:
    """The dtype to decode a model of n_params parameters in on `device` (see the module docstring)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16
    if device.type == "cpu" and cpu_bf16() and 4 * n_params > cpu_cache_bytes():
        return torch.bfloat16
    return torch.float32


def kv_cache_dtype(
    device: torch.device | str, model_dtype: torch.dtype, float32_bytes: int, bf16_attention: bool = False
) -> torch.dtype:
    """The dtype of an engine's KV cache for a model of `model_dtype` whose cache would take float32_bytes in
    float32, `bf16_attention` saying whether nanoseek's CPU decode attention applies here (the caller asks
    `engine.cache.bf16_for_the_kernel`: this module is a leaf); see the module docstring."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16
    if device.type == "cpu" and model_dtype == torch.float32 and cpu_bf16():
        if bf16_attention or float32_bytes > cpu_cache_bytes():
            return torch.bfloat16
    return model_dtype


# Prompt tokens in one prefill chunk from which bf16 autocast pays on a CPU (the crossover, measured on the tiny
# presets: 0.64-0.91x at 16-64 tokens, 1.10-1.29x at 256, 1.8-2.0x at 1024).
PREFILL_BF16_MIN_TOKENS = 256


def prefill_dtype(device: torch.device | str, model_dtype: torch.dtype, tokens: int) -> torch.dtype | None:
    """The dtype a prefill of `tokens` (padded) tokens through a `model_dtype` model autocasts its matmuls to, or
    None for none (see the module docstring). A 16-bit model, or RL's twin under its own autocast, needs none."""
    device = torch.device(device)
    if device.type == "cpu" and model_dtype == torch.float32 and tokens >= PREFILL_BF16_MIN_TOKENS and cpu_bf16():
        return torch.bfloat16
    return None


CPU_BF16_MIN_MACS = 1 << 23
"""Under bf16 autocast on a CPU, an eager training product of fewer multiply-adds than this runs in float32
(`too_little_for_bf16`): oneDNN's bf16 call casts and reorders its operands each time, which small products do not
win back. Forward + backward of one product (rows x in x out), 2 threads, AMX: 2^19 multiply-adds 2.2x slower in bf16,
2^22 1.2x slower, 2^23.6 0.89x, 2^25 0.70x of float32's time (docs/LOG.md, 2026-12-05, thirty-second session)."""


def too_little_for_bf16(x: Tensor, macs_per_row: int) -> bool:
    """Whether a product of `macs_per_row` multiply-adds for each row of x (all but its last dimension), under bf16
    autocast on a CPU, eager and outside inference mode (training's passes, with or without gradients, alike), runs
    in float32 (CPU_BF16_MIN_MACS) instead: `model.linear` and the CPU training attention ask. A compiled graph
    follows autocast."""
    if x.device.type != "cpu" or torch.compiler.is_compiling() or not torch.is_autocast_enabled("cpu"):
        return False
    return not torch.is_inference_mode_enabled() and math.prod(x.shape[:-1]) * macs_per_row < CPU_BF16_MIN_MACS


def autocast(device: torch.device, dtype: torch.dtype | None):
    """A context that autocasts matmuls to `dtype` on `device` (none for None or float32)."""
    if dtype is None or dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def describe(device: torch.device) -> str:
    """One line for the start of a training stage: what the matmuls compute in, and why."""
    if autocast_dtype(device) is None:
        why = f"{CPU_BF16_ENV}=0" if device.type == "cpu" and cpu_bf16_instructions() else "no native bf16"
        return f"float32 ({why})" if device.type == "cpu" else "float32"
    if device.type != "cpu":
        return "bf16 autocast, float32 weights"
    found = cpu_bf16_instructions()
    return f"bf16 autocast, float32 weights (CPU has {found})" if found else f"bf16 autocast ({CPU_BF16_ENV}=1)"


def describe_inference(device: torch.device | str, dtype: torch.dtype, bf16_attention: bool = False) -> str:
    """One line for the start of decoding: the dtype chosen and why (`bf16_attention` as for `kv_cache_dtype`)."""
    device = torch.device(device)
    name = str(dtype).removeprefix("torch.")
    if device.type != "cpu":
        return f"precision: {name} on {device.type}"
    found = cpu_bf16_instructions()
    if not cpu_bf16():  # no bf16 rule applies: say why
        return f"precision: {name} ({f'{CPU_BF16_ENV}=0' if found else 'CPU without native bf16'})"
    has = f"CPU has {found}" if found else f"{CPU_BF16_ENV}=1"
    cache_mib = cpu_cache_bytes() / 2**20
    caches = "bf16 KV caches (nanoseek's decode attention reads them); " if bf16_attention else ""
    weights = "bf16 weights" if bf16_attention else "bf16 weights, and KV caches,"
    return (
        f"precision: {name} ({has}; {caches}{weights} when their float32 bytes exceed the {cache_mib:.0f} MiB CPU "
        f"cache; bf16 autocast for prefills of {PREFILL_BF16_MIN_TOKENS}+ tokens)"
    )


__all__ = [
    "CACHE_BYTES_PER_CPU",
    "CPU_BF16_ENV",
    "autocast",
    "autocast_dtype",
    "cpu_bf16",
    "cpu_bf16_instructions",
    "cpu_cache_bytes",
    "describe",
    "describe_inference",
    "inference_dtype",
    "kv_cache_dtype",
    "usable_cache_bytes",
]
