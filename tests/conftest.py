"""Shared fixtures."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

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


@pytest.fixture(scope="session")
def stage_cache(tmp_path_factory) -> Path:
    """One `cache_dir` for the end-to-end tests: runs with the same tiny SFT settings (test_end_to_end.py,
    test_ppo.py) share one SFT stage instead of each training it (~1 min of CI each)."""
    return tmp_path_factory.mktemp("stage_cache")
