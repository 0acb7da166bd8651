"""Which float format to run matmuls in on this machine: bf16 where the processor multiplies it natively.

CUDA GPUs: bf16. CPUs: bf16 when they have bf16 dot-product instructions (AVX-512 BF16 or AMX, read
from /proc/cpuinfo, and torch's oneDNN agrees it can use them) *and* the model is large enough for
it to pay: a decode step then reads half the weight bytes, which is what limits it at 100M
parameters, while at a few million parameters the weights sit in cache and the bf16 kernels'
conversions cost more than they save (docs/LOG.md, 2026-12-01, has the measurements). Else float32.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

# Smallest model (parameters) that decodes faster in bf16 on a CPU with native bf16 (measured on
# 2 AVX-512 BF16 cores: tiny/tiny-moe, 0.85M, are slower or even in bf16; small, 100M, is faster).
CPU_BF16_MIN_PARAMS = 20_000_000
_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


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


def inference_dtype(device: torch.device | str, n_params: int) -> torch.dtype:
    """The dtype to decode a model of n_params parameters in on `device` (see the module docstring)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16
    if device.type == "cpu" and cpu_has_native_bf16() and n_params >= CPU_BF16_MIN_PARAMS:
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
    return f"precision: {name} ({has}; bf16 from {CPU_BF16_MIN_PARAMS / 1e6:.0f}M parameters)"


__all__ = ["CPU_BF16_MIN_PARAMS", "cpu_flags", "cpu_has_native_bf16", "describe", "inference_dtype"]
