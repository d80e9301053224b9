"""Shared test fixtures (keep minimal)."""
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` next to the repository (real observed data); skip the test when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared real data not found at {SHARED_DATA} (absent on a fresh clone)")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One torch thread per test (2 cores; two threads spin when other work shares the machine)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
