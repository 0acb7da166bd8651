"""Process-wide settings for work on the host CPU: how glibc's malloc keeps freed memory.

A training step on the CPU frees and allocates the same few hundred tensors every step. glibc's malloc, left to
itself, hands a freed block back to the kernel when it is larger than its (adaptive) mmap threshold, or when the
free space at the top of its heap passes the trim threshold (twice the mmap threshold); the next step then
faults every page of it in again, zero-filled by the kernel. Measured (docs/LOG.md, 2026-12-03, seventeenth
session; 2-core VM): the tiny preset's pretraining step (16 x 256 tokens) took ~5,100 page faults a step, 180-420
with the thresholds below; the MoE training step of `benchmarks/train_step.py --quick` ~800 and ~140
(transformers' step ~10 either way), at ~1.3 us a fault here. Fixed thresholds keep freed blocks in the process
for reuse: the resident memory stays near the step's peak instead of dropping between steps.

The engine's decode steps likewise: tiny at 64 rows ~85 faults a step, tiny-moe at 32 rows 120-170, ~1 with them.

Applied by the `nanoseek` command (every subcommand, `cli.main`) and by the benchmarks (process-wide: for every
side they time); a script of your own that trains or decodes on a CPU calls `keep_freed_memory()` first.
`MALLOC_TRIM_THRESHOLD_` / `MALLOC_MMAP_THRESHOLD_` in the environment are the same settings from outside (a
user's value stands).
"""

from __future__ import annotations

import ctypes
import os

# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 32 << 20
"""Blocks below this come from the heap and are kept for reuse (glibc's largest adaptive threshold, 32 MiB on
64-bit). Larger ones are mapped and unmapped each time, as by default."""
TRIM_THRESHOLD = 1 << 30
"""Free space at the top of the heap that glibc keeps before giving it back to the kernel."""

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Fix glibc's thresholds (above) for this process; True when they are set (now or earlier), False where
    the C library is not glibc or the user set either threshold in the environment (theirs stands)."""
    global _applied
    if _applied is None:
        _applied = _apply()
    return _applied


def glibc() -> ctypes.CDLL | None:
    """This process's C library when it is glibc (whose malloc the thresholds are for), else None."""
    try:  # the symbols already loaded into this process: its own C library, found without ldconfig (~5 ms)
        libc = ctypes.CDLL(None)
    except (OSError, TypeError):  # (Windows has no such handle)
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") else None  # musl and macOS have no such symbol


def _apply() -> bool:
    if "MALLOC_TRIM_THRESHOLD_" in os.environ or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    libc = glibc()
    if libc is None:
        return False
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # The mmap threshold first: setting either one ends glibc's adaptation of both.
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "glibc", "keep_freed_memory"]
