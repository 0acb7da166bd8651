"""Shared test fixtures."""

from __future__ import annotations

import pytest
import torch


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
