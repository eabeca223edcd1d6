"""Shared fixtures and helpers: the real-data folder, simulated pairs, the CI checker, CLI errors."""

import functools
import importlib.util
import os
import sys
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parent.parent


@functools.cache
def ci_checker():
    """``.ci/check_docker_context.py`` as a module (its pip and Dockerfile helpers), loaded once."""
    name = "gpudiffim_ci_check_docker_context"
    spec = importlib.util.spec_from_file_location(name, _ROOT / ".ci" / "check_docker_context.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def one_line_error(capsys):
    """Reads stderr and returns the command line's one ``gpudiffim: ...`` error line (no traceback)."""

    def read():
        err = capsys.readouterr().err.strip().splitlines()
        errors = [line for line in err if line.startswith("gpudiffim:")]
        assert len(errors) == 1 and "Traceback" not in "\n".join(err), err
        return errors[0]

    return read


def data_dir():
    """``$GPUDIFFIM_TEST_DATA`` or ``../shared/data`` next to the project (may not exist)."""
    env = os.environ.get("GPUDIFFIM_TEST_DATA")
    return Path(env) if env else _ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def variable_star_pair():
    """256^2 pair with two stars 3x brighter in the science image (seed 3: both are
    rejected by kernel-sum clipping); shared by the diagnostics and quality tests."""
    from gpudiffim.testing import make_fake_pair

    return make_fake_pair(shape=(256, 256), n_stars=45, seed=3, n_variables=2, variable_factor=3.0)


@pytest.fixture(scope="session")
def variable_star_fit(variable_star_pair):
    """Subtraction of ``variable_star_pair`` (spatial kernel order 1, background fitted).

    The variance planes are used as simulated (no correction), so that tests
    can recompute statistics from the fixture's images independently.
    """
    from gpudiffim import ImagePsfMatchTask, PsfMatchConfig

    config = PsfMatchConfig(fit_for_background=True, spatial_kernel_order=1, variance_correction="none")
    return ImagePsfMatchTask(config).subtract_masked_images(variable_star_pair.template,
                                                           variable_star_pair.science)


@pytest.fixture(scope="session")
def emulator():
    """Skips the test when the CUDA emulator has no C++ compiler (g++ or ``$CXX``)."""
    from gpudiffim._cuda.emulator import compiler

    if compiler() is None:
        pytest.skip("the CUDA emulator needs g++ (or $CXX) and none was found")


@pytest.fixture
def rng(request):
    """A generator from a fresh seed, and the seed (recorded in the test report)."""
    import numpy as np

    seed = np.random.SeedSequence().entropy
    request.node.user_properties.append(("seed", seed))
    return np.random.default_rng(seed), seed


@pytest.fixture(scope="session")
def shared_data():
    """Path of the shared real-data folder; skips the test when it is absent."""
    path = data_dir()
    if not path.is_dir():
        pytest.skip(f"shared test data not found at {path} (set GPUDIFFIM_TEST_DATA)")
    return path


#: ``GPUDIFFIM_STANDIN_GPU=1 python -m pytest -m gpu``: the GPU tests against the counting CuPy
#: stand-in (``tests/cupy_standin.py``), a dry run that finds what changed under them before a GPU
#: is lent (its arrays run the kernels' NumPy versions; device-only CuPy features are absent).
_STANDIN = {}


def pytest_configure(config):
    if os.environ.get("GPUDIFFIM_STANDIN_GPU") == "1":
        from cupy_standin import cupy_standin

        context = cupy_standin(kernels="numpy")
        context.__enter__()
        _STANDIN["context"] = context


def pytest_unconfigure(config):
    context = _STANDIN.pop("context", None)
    if context is not None:
        context.__exit__(None, None, None)


def pytest_collection_modifyitems(config, items):
    """Report GPU tests as skipped (not absent) where CuPy or a CUDA device is unusable."""
    from gpudiffim._backend import _cupy_probe

    usable, reason = _cupy_probe()
    if usable and "context" in _STANDIN:
        stand_in = pytest.mark.skip(reason="measures real device time: not in the CuPy stand-in's dry run")
        for item in items:
            if "device_timing" in item.keywords:
                item.add_marker(stand_in)
        return
    if usable:
        return
    skip = pytest.mark.skip(reason=f"needs CuPy and a CUDA device: {reason}")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
