"""Shared test settings."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

# Tests run offline: a stray hub lookup must fail at once instead of waiting on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(autouse=True, scope="session")
def _one_thread() -> Iterator[None]:
    """Tiny models are dominated by per-op overhead, which a second thread only adds to on 2 cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
