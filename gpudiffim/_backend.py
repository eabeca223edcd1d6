"""Compute-backend selection: NumPy everywhere, CuPy where a CUDA device works.

The environment variable ``GPUDIFFIM_BACKEND`` (``auto``, ``cupy`` or
``numpy``; default ``auto``) is read and validated when gpudiffim is imported;
a typo raises :class:`~gpudiffim.errors.ConfigurationError` at once.  Whether
CuPy and a device are usable is probed lazily, on first use, and cached: a
process that has not asked never initialises the CUDA driver (which would
make ``fork`` unsafe).  ``auto`` falls back to NumPy silently;
``cupy`` without a usable device raises
:class:`~gpudiffim.errors.BackendUnavailableError`.  :func:`use_backend`
overrides the choice for a block of code (per thread and task, through a
``ContextVar``).
"""

import contextlib
import contextvars
import functools
import os

import numpy as np

from .errors import BackendUnavailableError, ConfigurationError

__all__ = ["BACKENDS", "backend_info", "compute_backend", "use_backend"]

#: Accepted values of ``GPUDIFFIM_BACKEND`` and of :func:`use_backend`.
BACKENDS = ("auto", "cupy", "numpy")


def _check_backend(name, source):
    value = str(name).strip().lower()
    if value not in BACKENDS:
        msg = f"invalid {source}={name!r}: expected one of {BACKENDS}"
        raise ConfigurationError(msg)
    return value


_REQUESTED = _check_backend(os.environ.get("GPUDIFFIM_BACKEND", "auto"), "GPUDIFFIM_BACKEND")
_override = contextvars.ContextVar("gpudiffim_backend", default=None)


@functools.cache
def _cupy_probe():
    """(usable, reason): whether CuPy imports and a CUDA device answers."""
    try:
        import cupy
    except Exception as error:  # ImportError, or a broken CUDA installation
        return False, f"CuPy does not import ({type(error).__name__}: {error})"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:  # no driver, no device
        return False, f"no usable CUDA device ({type(error).__name__}: {error})"
    if count < 1:
        return False, "no CUDA device found"
    return True, ""


def requested_backend():
    """The backend asked for: the :func:`use_backend` override, else the environment."""
    return _override.get() or _REQUESTED


def compute_backend():
    """The backend that will run: ``"numpy"`` or ``"cupy"``.

    Raises
    ------
    BackendUnavailableError
        If ``cupy`` was requested and CuPy or a CUDA device is not usable.
    """
    requested = requested_backend()
    if requested == "numpy":
        return "numpy"
    usable, reason = _cupy_probe()
    if usable:
        return "cupy"
    if requested == "cupy":
        msg = f"the CuPy backend was requested but {reason}; use GPUDIFFIM_BACKEND=numpy or auto"
        raise BackendUnavailableError(msg)
    return "numpy"


@contextlib.contextmanager
def use_backend(name):
    """Use backend ``name`` (``auto``, ``cupy`` or ``numpy``) inside a ``with`` block.

    Examples
    --------
    >>> from gpudiffim import compute_backend, use_backend
    >>> with use_backend("numpy"):
    ...     compute_backend()
    'numpy'
    """
    token = _override.set(_check_backend(name, "backend"))
    try:
        yield
    finally:
        _override.reset(token)


def backend_info():
    """Which backend runs, on which device, with which library versions.

    Returns
    -------
    dict
        ``backend`` (running), ``requested``, ``numpy``, ``cupy`` (version or
        None), ``cuda_runtime`` (version or None), ``device`` (name or None),
        and ``reason`` (why CuPy is not used, "" when it is).
    """
    info = {"requested": requested_backend(), "numpy": np.__version__, "cupy": None,
            "cuda_runtime": None, "device": None}
    usable, reason = _cupy_probe()
    info["backend"] = "cupy" if usable and info["requested"] != "numpy" else "numpy"
    info["reason"] = reason
    if usable:
        import cupy

        info["cupy"] = cupy.__version__
        info["cuda_runtime"] = cupy.cuda.runtime.runtimeGetVersion()
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        info["device"] = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    return info
