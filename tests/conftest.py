"""Shared test fixtures."""

from __future__ import annotations

import os

import pytest
import torch

# CPU training autocasts to bf16 where the processor multiplies bf16 natively (nanoseek.precision). The
# suite's float32 references assume float32, on every machine alike, so it runs in float32 unless
# NANOSEEK_CPU_BF16 is set; tests/test_train_compile.py tests the bf16 path itself.
os.environ.setdefault("NANOSEEK_CPU_BF16", "0")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run faster on one intra-op thread, and stay fast when other processes share the machine.

    Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`. (A module-level
    torch.set_num_threads call would run at collection time, where the last module imported wins.)
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def attention_kernel_calls():
    """`with attention_kernel_calls() as calls: ...` fills the list `calls`, on leaving the block, with each call of
    nanoseek's CPU decode-attention kernel made inside it: eager or from a compiled graph's C++ wrapper alike, the
    torch profiler sees every dispatch of `nanoseek::decode_attention`. A call is (rows, tokens a row) where the
    profiler records its inputs' shapes (eager calls), else None. The test is skipped where the kernel does not apply
    (`model.cpu_kernel`)."""
    from contextlib import contextmanager

    from torch.profiler import ProfilerActivity, profile

    from nanoseek.model import cpu_kernel

    if not cpu_kernel.attention_available():
        pytest.skip("nanoseek's CPU attention kernel does not apply here")

    @contextmanager
    def counting():
        calls: list[tuple[int, int] | None] = []
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            yield calls
        for event in prof.events():
            if event.name == "nanoseek::decode_attention":
                positions = event.input_shapes[3] if event.input_shapes else []  # [B, T]
                calls.append((positions[0], positions[1]) if positions else None)

    return counting
