"""nanoseek.host: glibc keeps freed memory, so a step that frees and reallocates the same blocks stops faulting
their pages in again. Each case runs in a child process (the setting is process-wide), and counts the page
faults of a cycle that allocates, fills and frees 8 blocks of 1 MiB through the C library: the work a training
step does with its tensors. The control child, with glibc's own thresholds, is the reference: it faults every
page in again each cycle."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from nanoseek.host import glibc

_CHILD = """
import ctypes, resource, sys
from nanoseek.host import glibc, keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
if sys.argv[1] == "command":  # what the `nanoseek` command leaves set, after a subcommand ran
    import contextlib, io
    from nanoseek.cli import main
    with contextlib.redirect_stdout(io.StringIO()):
        main(["model", "--preset", "tiny"])
libc = glibc()
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
def cycle():
    blocks = [libc.malloc(1 << 20) for _ in range(8)]
    for b in blocks:
        libc.memset(b, 1, 1 << 20)
    for b in blocks:
        libc.free(b)
for _ in range(3):
    cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    cycle()
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
"""

PAGES_PER_CYCLE = 8 * (1 << 20) // os.sysconf("SC_PAGE_SIZE")


pytestmark = pytest.mark.skipif(glibc() is None, reason="glibc's malloc only")


def _faults_per_cycle(mode: str, **env: str) -> tuple[str, float]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, mode], env={**clean, **env}, capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0], float(out[1])


def test_freed_blocks_are_reused_without_page_faults():
    applied, kept = _faults_per_cycle("keep")
    _, control = _faults_per_cycle("control")
    assert applied == "True"
    assert control >= 0.9 * PAGES_PER_CYCLE  # glibc's own thresholds hand the blocks back: every page again
    assert kept <= 0.05 * PAGES_PER_CYCLE


def test_a_users_environment_setting_stands():
    applied, faults = _faults_per_cycle("keep", MALLOC_TRIM_THRESHOLD_="0")
    assert applied == "False"  # the user's threshold (give everything back) was kept, not replaced
    assert faults >= 0.9 * PAGES_PER_CYCLE


def test_the_nanoseek_command_keeps_freed_memory():
    _, faults = _faults_per_cycle("command")
    assert faults <= 0.05 * PAGES_PER_CYCLE
