"""Backend selection: environment variable, scoped override, information."""

import subprocess
import sys
import time

import pytest

from gpudiffim import BackendUnavailableError, ConfigurationError, backend_info, compute_backend, use_backend
from gpudiffim._backend import _cupy_probe, stage_timer


def _import_with(value):
    env = {"GPUDIFFIM_BACKEND": value, "PATH": "", "PYTHONPATH": ":".join(sys.path)}
    code = "import gpudiffim; print(gpudiffim.compute_backend())"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=False)


def test_typo_in_environment_fails_at_first_use():
    run = _import_with("cupyy")
    assert run.returncode != 0
    assert "ConfigurationError" in run.stderr and "GPUDIFFIM_BACKEND='cupyy'" in run.stderr
    assert "import gpudiffim" not in run.stderr      # the import itself went through


@pytest.mark.parametrize(("value", "message"), [
    ("bogus", "invalid GPUDIFFIM_BACKEND='bogus'"),
    pytest.param("cupy", "the CuPy backend was requested but",
                 marks=pytest.mark.skipif(_cupy_probe()[0], reason="a CUDA device is usable here")),
])
def test_command_line_reports_an_unusable_backend_in_one_line(value, message):
    env = {"GPUDIFFIM_BACKEND": value, "PATH": "", "PYTHONPATH": ":".join(sys.path)}
    run = subprocess.run([sys.executable, "-m", "gpudiffim.cli", "info"], env=env, capture_output=True,
                         text=True, check=False)
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    assert run.stderr.count("\n") == 1 and message in run.stderr


@pytest.mark.parametrize("value", ["numpy", "NumPy ", "auto"])
def test_valid_environment_values(value):
    run = _import_with(value)
    assert run.returncode == 0, run.stderr
    expected = "numpy" if value.strip().lower() == "numpy" or not _cupy_probe()[0] else "cupy"
    assert run.stdout.strip() == expected


def test_scoped_override_is_restored():
    before = compute_backend()
    with use_backend("numpy"):
        assert compute_backend() == "numpy"
        assert backend_info()["requested"] == "numpy"
    assert compute_backend() == before


def test_invalid_override():
    with pytest.raises(ConfigurationError, match="backend"), use_backend("gpu"):
        pass


@pytest.mark.skipif(_cupy_probe()[0], reason="a CUDA device is usable here")
def test_cupy_requested_without_device_raises():
    with use_backend("cupy"), pytest.raises(BackendUnavailableError, match="CuPy"):
        compute_backend()
    with use_backend("auto"):
        assert compute_backend() == "numpy"
    info = backend_info()
    assert info["backend"] == "numpy" and info["device"] is None and info["reason"]


@pytest.mark.gpu
def test_device_reported():
    info = backend_info()
    assert info["backend"] == "cupy" and info["device"] and info["cupy"]


@pytest.mark.parametrize("backend", ["numpy", pytest.param("cupy", marks=[pytest.mark.gpu,
                                                                           pytest.mark.device_timing])])
def test_stage_timer_adds_the_wall_time_of_each_block(backend):
    timings = {}
    with use_backend(backend):
        for pause in (0.03, 0.02):
            with stage_timer(timings, "stage"):
                time.sleep(pause)
    assert set(timings) == {"stage"}
    assert 0.05 <= timings["stage"] < 0.5


@pytest.mark.gpu
@pytest.mark.device_timing
def test_stage_timer_counts_queued_device_work():
    import cupy

    a = cupy.random.random((4096, 4096))
    a = a @ a / 4096.0                      # warm-up: cuRAND and cuBLAS set up outside the timing
    cupy.cuda.runtime.deviceSynchronize()
    timings = {}
    with use_backend("cupy"):
        host = time.perf_counter()
        with stage_timer(timings, "matmul"):
            for _ in range(20):
                a = a @ a / 4096.0          # 20 x 137 GFLOP fp64: tens of ms, enqueued asynchronously
        cupy.cuda.runtime.deviceSynchronize()
        host = time.perf_counter() - host
    assert 0.5 * host <= timings["matmul"] <= 1.05 * host


@pytest.mark.gpu
@pytest.mark.device_timing
def test_stage_timings_read_once_count_the_queued_work():
    """StageTimings: CUDA events recorded without a synchronisation, read once at the end, still
    cover the stage's queued device work."""
    import cupy

    from gpudiffim._backend import StageTimings

    a = cupy.random.random((4096, 4096))
    a = a @ a / 4096.0
    cupy.cuda.runtime.deviceSynchronize()
    timings = StageTimings()
    with use_backend("cupy"):
        host = time.perf_counter()
        with stage_timer(timings, "first"):
            for _ in range(10):
                a = a @ a / 4096.0
        with stage_timer(timings, "second"):
            for _ in range(10):
                a = a @ a / 4096.0
        assert timings == {}                     # nothing read yet: no synchronisation per stage
        timings.read()
        host = time.perf_counter() - host
    assert set(timings) == {"first", "second"}
    assert 0.5 * host <= timings["first"] + timings["second"] <= 1.05 * host
