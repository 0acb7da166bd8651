"""Which float format to run matmuls in on this machine: bf16 where the processor multiplies it natively.

CUDA GPUs: bf16. CPUs: bf16 when they have bf16 dot-product instructions (AVX-512 BF16 or AMX, read
from /proc/cpuinfo, and torch's oneDNN agrees it can use them) *and* the model's float32 weights do
not fit in the last-level cache: a decode step then reads every weight from memory, and bf16 halves
those bytes (the 100M `small` preset decodes 1.5-2x faster). Weights that fit in the cache are read
from it at no such cost, and bf16 kernels' conversions make the 0.85M `tiny` presets slower
(docs/LOG.md, 2026-12-01, has the measurements). Else float32.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
_DEFAULT_CACHE_BYTES = 32 * 2**20  # where sysfs does not say


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where there is none: macOS, Windows)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((ln for ln in text.splitlines() if ln.startswith(("flags", "Features"))), "")
    return frozenset(line.partition(":")[2].split())


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 dot products in hardware (AVX-512 BF16 or AMX) and torch can use them."""
    if not any(flag in cpu_flags() for flag in _CPU_BF16_FLAGS):
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@functools.cache
def cpu_cache_bytes() -> int:
    """The size of the CPU's largest (last-level) cache, from sysfs; 32 MiB where it is not there."""
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
    return max(sizes, default=_DEFAULT_CACHE_BYTES)


def inference_dtype(device: torch.device | str, n_params: int) -> torch.dtype:
    """The dtype to decode a model of n_params parameters in on `device` (see the module docstring)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16
    if device.type == "cpu" and cpu_has_native_bf16() and 4 * n_params > cpu_cache_bytes():
        return torch.bfloat16
    return torch.float32


def describe(device: torch.device | str, dtype: torch.dtype) -> str:
    """One line for the start of a run: the dtype chosen and why."""
    device = torch.device(device)
    name = str(dtype).removeprefix("torch.")
    if device.type != "cpu":
        return f"precision: {name} on {device.type}"
    native = [flag for flag in _CPU_BF16_FLAGS if flag in cpu_flags()]
    has = f"CPU has {', '.join(native)}" if cpu_has_native_bf16() else "CPU without native bf16"
    cache = cpu_cache_bytes() / 2**20
    return f"precision: {name} ({has}; bf16 when the float32 weights exceed the {cache:.0f} MiB CPU cache)"


__all__ = ["cpu_cache_bytes", "cpu_flags", "cpu_has_native_bf16", "describe", "inference_dtype"]
