"""Shared fixtures: the real images in ../shared/data, skipped with a reason when absent."""

from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Root of the project's real test images; tests that need it skip when it is not beside the repo."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real images not found at {SHARED_DATA} (clone the repo beside ../shared)")
    return SHARED_DATA


@pytest.fixture
def one_thread():
    """One torch thread for tests of tiny convs: a second thread gains little, and OpenMP threads stall on shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
