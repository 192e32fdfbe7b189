"""Fixtures of the generator tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """These models are tiny: one thread avoids OpenMP spin-waiting, which makes small ops many times
    slower when the 2 cores are shared with other processes. The caller's setting is restored."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
