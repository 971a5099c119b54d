"""Shared fixtures."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest
import torch


def skip_or_fail(reason: str) -> NoReturn:
    """Skip a test that cannot run here, saying what is missing (data, a package); under CI (CI=true) fail instead,
    so that a CI machine set up without it does not pass by running fewer tests (as tests/test_slurm.py does)."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must run this test, but {reason}")
    pytest.skip(reason)


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
