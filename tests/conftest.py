"""Shared fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Run small models on one thread: on a shared 2-core machine two OpenMP threads that wait for each other
    made the model and sampler tests 5-7x slower (each op is tiny, so a second thread saves nothing anyway)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
