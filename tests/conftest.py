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
def attention_kernel_calls(monkeypatch) -> list[tuple[int, int]]:
    """Each call of nanoseek's CPU decode-attention kernel, as (rows, tokens a row), while the test runs; the test is
    skipped where the kernel does not apply (`model.cpu_kernel`)."""
    from nanoseek.model import cpu_kernel

    if not cpu_kernel.available():
        pytest.skip("nanoseek's CPU kernel does not apply here")
    kernels, calls = cpu_kernel._kernels, []

    def counted(*args):
        calls.append((args[11], args[14]))  # B and T of `nanoseek_decode_attention_bf16`
        kernels.attention(*args)

    monkeypatch.setattr(cpu_kernel, "_kernels", kernels._replace(attention=counted))
    return calls
