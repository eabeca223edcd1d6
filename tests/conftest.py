"""Shared fixtures: the real-data folder and simulated pairs."""

import os
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parent.parent


def data_dir():
    """``$GPUDIFFIM_TEST_DATA`` or ``../shared/data`` next to the project (may not exist)."""
    env = os.environ.get("GPUDIFFIM_TEST_DATA")
    return Path(env) if env else _ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data():
    """Path of the shared real-data folder; skips the test when it is absent."""
    path = data_dir()
    if not path.is_dir():
        pytest.skip(f"shared test data not found at {path} (set GPUDIFFIM_TEST_DATA)")
    return path


def pytest_collection_modifyitems(config, items):
    """Report GPU tests as skipped (not absent) where CuPy or a CUDA device is unusable."""
    from gpudiffim._backend import _cupy_probe

    usable, reason = _cupy_probe()
    if usable:
        return
    skip = pytest.mark.skip(reason=f"needs CuPy and a CUDA device: {reason}")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
