"""Which precision the trainer computes in on a device: bf16 where the hardware has it, float32 elsewhere.

Weights, optimizer states and the loss stay float32 everywhere; "bf16" means the matmuls run under
bf16 autocast (and Muon's Newton-Schulz iteration runs in bf16). On CUDA that is always the case.
On a CPU it is the case when the processor multiplies bf16 natively: AVX-512 BF16 (Intel Cooper
Lake and later, AMD Zen 4 and later) or AMX (Intel Sapphire Rapids and later). Measured on a 2-core
AMD EPYC with AVX-512 BF16 (docs/LOG.md, 2026-12-01): forward + backward 1.5-1.8x faster than float32
at the tiny presets (the trainer's whole step 1.3-1.7x), 2.4x at `small`; Newton-Schulz 2-4x. One
shape lost: many narrow experts (64 of width 32) through torch._grouped_mm, whose per-expert bf16
matmuls change size every step, and oneDNN builds a kernel per new size (2x slower there). Without
those instructions bf16 is emulated and slower than float32, so such CPUs stay in float32.

`NANOSEEK_CPU_BF16=0` keeps a bf16-capable CPU in float32 (and `=1` forces bf16 on any CPU).
"""

from __future__ import annotations

import os
from functools import cache

import torch

CPU_BF16_ENV = "NANOSEEK_CPU_BF16"


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
    """Whether CPU training runs in bf16: the processor has native bf16, unless NANOSEEK_CPU_BF16 says otherwise."""
    setting = os.environ.get(CPU_BF16_ENV, "").strip()
    if setting in ("0", "1"):
        return setting == "1"
    if setting:
        raise ValueError(f"{CPU_BF16_ENV}={setting!r}: must be 0 (float32) or 1 (bf16)")
    return cpu_bf16_instructions() is not None


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype training autocasts matmuls to on this device (None: float32 throughout)."""
    if device.type == "cuda" or (device.type == "cpu" and cpu_bf16()):
        return torch.bfloat16
    return None


def describe(device: torch.device) -> str:
    """One line for the start of a run: what the matmuls compute in, and why."""
    if autocast_dtype(device) is None:
        why = f"{CPU_BF16_ENV}=0" if device.type == "cpu" and cpu_bf16_instructions() else "no native bf16"
        return f"float32 ({why})" if device.type == "cpu" else "float32"
    if device.type != "cpu":
        return "bf16 autocast, float32 weights"
    found = cpu_bf16_instructions()
    return f"bf16 autocast, float32 weights (CPU has {found})" if found else f"bf16 autocast ({CPU_BF16_ENV}=1)"


__all__ = ["CPU_BF16_ENV", "autocast_dtype", "cpu_bf16", "cpu_bf16_instructions", "describe"]
