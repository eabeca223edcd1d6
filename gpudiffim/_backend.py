"""Compute-backend selection: NumPy everywhere, CuPy where a CUDA device works.

The environment variable ``GPUDIFFIM_BACKEND`` (``auto``, ``cupy``,
``numpy`` or ``cuda-emulator``; default ``auto``) is read when gpudiffim is
imported; a typo raises :class:`~gpudiffim.errors.ConfigurationError` naming
the variable wherever the backend is first asked for (so that ``import
gpudiffim`` and the command line can still report it cleanly).  Whether
CuPy and a device are usable is probed lazily, on first use, and cached: a
process that has not asked never initialises the CUDA driver (which would
make ``fork`` unsafe).  ``auto`` falls back to NumPy silently;
``cupy`` without a usable device raises
:class:`~gpudiffim.errors.BackendUnavailableError`.  :func:`use_backend`
overrides the choice for a block of code (per thread and task, through a
``ContextVar``).

The backends run two code paths:

* ``numpy``: the reference implementation (NumPy/SciPy, FFT correlations);
* ``cupy`` and ``cuda-emulator``: the *kernel path*, where the hot operations
  (basis correlation of the stamps, normal equations, residual moments,
  spatial assembly, term accumulation and mask propagation of the full-image
  application) are the CUDA kernels of ``kernels/``.  ``cupy`` runs them on
  the GPU with CuPy arrays (FFTs through cuFFT); ``cuda-emulator`` runs the
  *same kernel source* on the CPU, compiled by g++ with
  ``gpudiffim/_cuda/emulator.h``, on NumPy arrays (FFTs through SciPy).  It is
  slow and meant for verification without a GPU: its results must equal the
  ``numpy`` backend's to 1e-6 relative.

Two questions, one function each: :func:`on_kernel_path` (here) decides
whether an operation on an array takes the kernel path or the NumPy
reference; :func:`gpudiffim._cuda.launch.launcher_for` decides, from where
the data live, whether the kernels run through CuPy or the CPU emulator.
"""

import contextlib
import contextvars
import functools
import os
import threading
import time

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .errors import BackendUnavailableError, ConfigurationError

__all__ = ["array_module", "array_module_of", "backend_info", "BACKENDS", "compute_backend", "fft_functions",
           "host_map", "host_threads", "HOST_THREADS_VARIABLE", "index_dtype", "is_device_array", "moved",
           "ndimage_of", "on_device", "on_kernel_path", "row_blocks", "scatter_at", "single_threaded_blas",
           "stable_argsort", "stage_timer",
           "StageTimings", "synchronize", "read_only_view", "to_host", "tune_host_allocator",
           "use_backend"]

#: Accepted values of ``GPUDIFFIM_BACKEND`` and of :func:`use_backend`.
BACKENDS = ("auto", "cupy", "numpy", "cuda-emulator")


def _check_backend(name, source):
    value = str(name).strip().lower()
    if value not in BACKENDS:
        msg = f"invalid {source}={name!r}: expected one of {BACKENDS}"
        raise ConfigurationError(msg)
    return value


_ENVIRONMENT = os.environ.get("GPUDIFFIM_BACKEND", "auto")
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
    """The backend asked for: the :func:`use_backend` override, else the environment.

    Raises
    ------
    ConfigurationError
        If ``GPUDIFFIM_BACKEND`` holds an unknown name (and no override is active).
    """
    return _override.get() or _check_backend(_ENVIRONMENT, "GPUDIFFIM_BACKEND")


def compute_backend():
    """The backend that will run: ``"numpy"``, ``"cupy"`` or ``"cuda-emulator"``.

    Raises
    ------
    BackendUnavailableError
        If ``cupy`` was requested and CuPy or a CUDA device is not usable.
    """
    requested = requested_backend()
    if requested in ("numpy", "cuda-emulator"):
        return requested
    usable, reason = _cupy_probe()
    if usable:
        return "cupy"
    if requested == "cupy":
        msg = f"the CuPy backend was requested but {reason}; use GPUDIFFIM_BACKEND=numpy or auto"
        raise BackendUnavailableError(msg)
    return "numpy"


def on_kernel_path(array):
    """Whether operations on ``array`` take the kernel path (else the NumPy reference).

    True for a CuPy array, and for a NumPy array under the ``cuda-emulator``
    backend.  Where the kernels then run is not decided here but by
    :func:`gpudiffim._cuda.launch.launcher_for`, from the array's type: a
    NumPy array never goes to the GPU behind the caller's back (the task moves
    its images to the compute backend explicitly).
    """
    return is_device_array(array) or requested_backend() == "cuda-emulator"


def array_module(backend=None):
    """The array module of ``backend``: ``cupy`` for the CuPy backend, else ``numpy``."""
    backend = compute_backend() if backend is None else backend
    if backend == "cupy":
        import cupy

        return cupy
    return np


#: Whether each array type seen is CuPy's (read per launch and per operation: a dict lookup).
_IS_DEVICE_TYPE = {}


def is_device_array(array):
    """True for a CuPy array (checked without importing CuPy)."""
    kind = type(array)
    known = _IS_DEVICE_TYPE.get(kind)
    if known is None:
        known = _IS_DEVICE_TYPE[kind] = kind.__module__.split(".")[0] == "cupy"
    return known


def read_only_view(plane):
    """A view of a read-only NumPy plane (its flag cannot be turned back on through it); a device
    array as it is (CuPy has no read-only flag, so a view would protect nothing and cost a call)."""
    return plane.view() if isinstance(plane, np.ndarray) else plane


def array_module_of(array):
    """``cupy`` for a CuPy array, else ``numpy``."""
    if is_device_array(array):
        import cupy

        return cupy
    return np


def ndimage_of(array):
    """``cupyx.scipy.ndimage`` for a CuPy array, else ``scipy.ndimage``."""
    if is_device_array(array):
        from cupyx.scipy import ndimage

        return ndimage
    from scipy import ndimage

    return ndimage


# ---------------------------------------------------------------------------
# Where NumPy and CuPy differ.  The one place outside the operations layer that
# names a library by array type: every algorithm module calls these instead.

#: Pixels per host row block of :func:`row_blocks`: small enough for a block and
#: its temporaries to stay in cache.
HOST_BLOCK_PIXELS = 1 << 15


def on_device(xp):
    """Whether array module ``xp`` is CuPy's (work there is launched, not run)."""
    return xp is not np


def moved(array, xp):
    """``array`` in array module ``xp`` (a copy between host and device, else as it is)."""
    if xp is np:
        return to_host(array)
    return xp.asarray(array)


#: Environment variable that sets the host threads of :func:`host_map` (default: the usable cores).
HOST_THREADS_VARIABLE = "GPUDIFFIM_HOST_THREADS"

_host_pool = {}
#: Name prefix of the pool's threads (a :func:`host_map` inside one of them runs inline).
_POOL_PREFIX = "gpudiffim-host"


def host_threads():
    """Threads :func:`host_map` uses: ``GPUDIFFIM_HOST_THREADS`` if set (>= 1), else the usable cores.

    Raises
    ------
    ConfigurationError
        If the variable is not a positive integer.
    """
    value = os.environ.get(HOST_THREADS_VARIABLE, "").strip()
    if value:
        if not value.isdigit() or int(value) < 1:
            msg = f"{HOST_THREADS_VARIABLE}={value!r}: expected a positive integer"
            raise ConfigurationError(msg)
        return int(value)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:    # not on Linux
        return os.cpu_count() or 1


def host_map(function, items):
    """``[function(item) for item in items]``, on :func:`host_threads` threads when more than one.

    For host (NumPy/SciPy) work on disjoint outputs: NumPy and pocketfft
    release the GIL in their loops, so independent blocks scale with the
    cores, and every block computes exactly what it computes alone (results
    do not depend on the thread count).  The pool is made once per thread
    count and reused; a call from one of its threads runs inline.  Each item
    runs in a copy of the caller's context (:func:`use_backend` holds there).
    """
    items = list(items)
    threads = min(host_threads(), len(items))
    if threads <= 1 or threading.current_thread().name.startswith(_POOL_PREFIX):
        return [function(item) for item in items]   # nested in a pool thread: inline (no deadlock)
    key = (os.getpid(), threads)      # a pool does not survive a fork (Dask and multiprocessing workers)
    if key not in _host_pool:
        _host_pool[key] = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=_POOL_PREFIX)
    # each item in a copy of the caller's context: use_backend() and the like hold in the pool threads
    contexts = [contextvars.copy_context() for _ in items]
    return list(_host_pool[key].map(lambda context, item: context.run(function, item), contexts, items))


class _Done:
    """The result of a call made at once (:func:`host_background` without a thread)."""

    def __init__(self, function):
        self._function = function

    def result(self):
        """Run the call now and return its value (exceptions propagate)."""
        return self._function()


def host_background(function, *planes):
    """Start ``function()`` on a thread of its own while the caller goes on; ``.result()`` waits.

    For host work that overlaps other host work (the noise-correlation
    measurement during the full-image application, whose tiles leave a core
    idle part of the time).  With device ``planes``, or a single host
    thread, nothing starts: ``.result()`` makes the call then, in order with
    the caller's device work.  The call runs in a copy of the caller's
    context; its exception is raised by ``.result()``.
    """
    if host_threads() <= 1 or any(is_device_array(plane) for plane in planes):
        return _Done(function)
    context = contextvars.copy_context()
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gpudiffim-background")
    future = executor.submit(context.run, function)
    executor.shutdown(wait=False)       # the thread ends with the call
    return future


#: ``mallopt`` parameters of glibc (``malloc.h``) and the value :func:`tune_host_allocator` sets.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _ALLOCATOR_THRESHOLD = -1, -3, 1 << 30


def tune_host_allocator():
    """Keep freed host memory in the process for reuse (glibc only; a no-op elsewhere).

    By default glibc maps every large array (above a threshold of 128 kB to
    32 MB) afresh and returns it on free, so every full-image plane and stamp
    batch is faulted in and zeroed by the kernel page by page: at 2048^2 about
    16,600 page faults and 0.35 s of system time in a 2 s (CPU) subtraction.
    With both thresholds at 1 GiB the memory is reused instead (no faults);
    the resident size stays at its high-water mark (+3 % at 2048^2).  It
    changes the whole process's allocator, so gpudiffim's command line (and
    the Dask batch workers through it) call it; a library user can call it,
    or set ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_``.

    Returns
    -------
    bool
        Whether glibc accepted the settings.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, _ALLOCATOR_THRESHOLD)
                    and libc.mallopt(_M_TRIM_THRESHOLD, _ALLOCATOR_THRESHOLD))
    except (OSError, AttributeError):     # not glibc
        return False


_blas_controller = []


@contextlib.contextmanager
def single_threaded_blas():
    """Within the block, BLAS runs on one thread (``threadpoolctl``; nothing if it is missing).

    For the host threads of :func:`host_map` that each multiply mid-size
    matrices: with BLAS's own threads on top, a 23 x 43 by 43 x 5888
    product took 1.6-2.4 ms on two cores instead of 0.6-0.8 ms on one (and
    20 ms on a loaded machine).  The limit is process-wide while it lasts.
    """
    if not _blas_controller:
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:
            _blas_controller.append(None)
        else:
            _blas_controller.append(ThreadpoolController())
    controller = _blas_controller[0]
    if controller is None:
        yield
        return
    with controller.limit(limits=1, user_api="blas"):
        yield


def fft_functions(xp, threads=None):
    """``rfft``, ``fft``, ``irfft2``, ``rfft2`` for arrays of ``xp``, with a common signature.

    NumPy arrays use ``scipy.fft`` on ``threads`` threads (default :func:`host_threads`: 1 for
    transforms made on the host threads themselves); CuPy arrays ``cupyx.scipy.fft``
    (cuFFT).
    """
    names = ("rfft", "fft", "irfft2", "rfft2")
    if xp is np:
        import scipy.fft

        workers = host_threads() if threads is None else threads
        return {name: functools.partial(getattr(scipy.fft, name), workers=workers) for name in names}
    import cupyx.scipy.fft as cufft

    return {name: getattr(cufft, name) for name in names}


def scatter_at(xp, ufunc, target, index, values):
    """``ufunc.at(target, index, values)`` for ``np.maximum``/``np.minimum``, also on CuPy arrays.

    On the GPU, ``cupy.maximum.at``/``cupy.minimum.at`` (``cupyx.scatter_max``/
    ``scatter_min`` where ``.at`` is missing; CuPy 14 deprecates those):
    atomic operations, exact for int32 and uint64 targets (CuPy has no int64
    ones, and its float64 ones round through float32).
    """
    at = getattr(getattr(xp, ufunc.__name__), "at", None)
    if at is None:  # old CuPy
        import cupyx

        at = cupyx.scatter_max if ufunc is np.maximum else cupyx.scatter_min
    at(target, index, values)


def stable_argsort(xp, values):
    """Stable argsort (CuPy's argsort is always stable; NumPy's default is not)."""
    return np.argsort(values, kind="stable") if xp is np else xp.argsort(values)


def row_blocks(xp, shape, min_rows=1):
    """Row slices covering an image of ``shape``, for passes that are faster in blocks on the host.

    With CuPy one slice covers every row (a launch per block would cost more
    than it saves).  On the host the rows go in blocks of about
    :data:`HOST_BLOCK_PIXELS` pixels (at least ``min_rows`` rows), so that
    the temporaries of a pass stay in cache: three times faster than
    whole-image passes at 4096^2.
    """
    n_rows, n_cols = shape
    if xp is not np:
        return [slice(0, n_rows)]
    block = max(min_rows, HOST_BLOCK_PIXELS // max(n_cols, 1))
    return [slice(start, min(start + block, n_rows)) for start in range(0, n_rows, block)]


def synchronize():
    """Wait for queued GPU work (CuPy backend); a no-op otherwise.  Used by stage timers."""
    if compute_backend() == "cupy":
        import cupy

        cupy.cuda.runtime.deviceSynchronize()


class _EventClock:
    """A pair of CUDA events around a stage: the elapsed time between them on the device."""

    def __init__(self):
        import cupy

        self._cupy = cupy
        self._start, self._stop = cupy.cuda.Event(), cupy.cuda.Event()

    def start(self):
        self._start.record()

    def stop(self):
        """Seconds between the start and stop events (waits for the stop event)."""
        self._stop.record()
        self._stop.synchronize()
        return self._cupy.cuda.get_elapsed_time(self._start, self._stop) / 1e3


class _HostClock:
    def start(self):
        self._t0 = time.perf_counter()

    def stop(self):
        return time.perf_counter() - self._t0


class StageTimings(dict):
    """Seconds per stage (a dict), filled by :func:`stage_timer`.

    On the CuPy backend a stage is bracketed by two CUDA events recorded on
    the current stream, with no synchronisation; :meth:`read` waits for the
    last event once and turns every pending pair into seconds.  Elsewhere the
    host clock fills the dict as each stage ends.  ``log`` (a logger, or
    None) gets one line per stage when its time is known.
    """

    def __init__(self, *args, log=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.log = log
        self._pending = []

    def add(self, stage, seconds):
        self[stage] = self.get(stage, 0.0) + seconds
        if self.log is not None:
            self.log.info("%s: %.3f s", stage, self[stage])

    def read(self):
        """Resolve the pending CUDA-event pairs (one synchronisation); returns self."""
        if self._pending:
            self._pending[-1][2].synchronize()
            import cupy

            for stage, start, stop in self._pending:
                self.add(stage, cupy.cuda.get_elapsed_time(start, stop) / 1e3)
            self._pending.clear()
        return self


@contextlib.contextmanager
def stage_timer(timings, stage):
    """Add the wall time of the block to ``timings[stage]`` (seconds).

    On the CuPy backend with a :class:`StageTimings`, two CUDA events recorded
    on the current stream before and after the block, read later by
    :meth:`StageTimings.read` (the device time between them: all GPU work of
    the stage and the host time between its launches) without a
    synchronisation here.  With a plain dict on the CuPy backend, the same
    events read at once (queued work first waited for, so earlier stages do
    not leak in).  Elsewhere it is the host clock.
    """
    if compute_backend() != "cupy":
        clock = _HostClock()
        clock.start()
        yield
        seconds = clock.stop()
    elif isinstance(timings, StageTimings):
        import cupy

        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        yield
        stop.record()
        timings._pending.append((stage, start, stop))
        return
    else:
        clock = _EventClock()
        synchronize()
        clock.start()
        yield
        seconds = clock.stop()
    if isinstance(timings, StageTimings):
        timings.add(stage, seconds)
    else:
        timings[stage] = timings.get(stage, 0.0) + seconds


def index_dtype(n):
    """The narrowest signed integer dtype that indexes ``n`` rows: int16 up to 2^15 rows, else int32.

    For host indices uploaded to gather device rows: 2 bytes a row instead
    of 4 (or 8 for NumPy's default), and CuPy gathers with any integer type.

    Examples
    --------
    >>> index_dtype(1000), index_dtype(40000)
    (dtype('int16'), dtype('int32'))
    """
    return np.dtype(np.int16 if n <= 2**15 else np.int32)


def to_host(array):
    """A NumPy array of ``array`` (copied from the device for CuPy arrays)."""
    if is_device_array(array):
        return array.get()
    return np.asarray(array)


@contextlib.contextmanager
def use_backend(name):
    """Use backend ``name`` (``auto``, ``cupy``, ``numpy`` or ``cuda-emulator``) inside a ``with`` block.

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

    Raises :class:`~gpudiffim.errors.ConfigurationError` for an unknown
    ``GPUDIFFIM_BACKEND``; a backend that cannot run is reported, not raised
    (:func:`compute_backend` raises).

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
    if info["requested"] in ("numpy", "cuda-emulator"):
        info["backend"] = info["requested"]
    else:
        info["backend"] = "cupy" if usable else "numpy"
    info["reason"] = reason
    if usable:
        import cupy

        info["cupy"] = cupy.__version__
        info["cuda_runtime"] = cupy.cuda.runtime.runtimeGetVersion()
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        info["device"] = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    return info
