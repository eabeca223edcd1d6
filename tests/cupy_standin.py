"""A counting stand-in for CuPy: the pipeline's CuPy branches, run and measured on the CPU.

:func:`cupy_standin` installs fake ``cupy``, ``cupyx`` and ``cupy_backends``
modules whose arrays (:class:`ndarray`) wrap NumPy arrays.  The pipeline takes
them for device arrays (``gpudiffim._backend.is_device_array`` looks at the
type's module, ``"cupy"``) and runs its CuPy branches unchanged: array
functions and methods run on the wrapped NumPy arrays, ``RawModule`` kernels
run on the CUDA emulator (the same ``kernels/*.cu`` text compiled by g++),
cuFFT is ``scipy.fft``, cuBLAS batched LU and cuSOLVER batched Cholesky are LAPACK.

Every event a GPU run would pay for is recorded with its call site (the
innermost ``gpudiffim`` frame): a CuPy call (module function, array method or
operator), a kernel launch, a device->host synchronisation (``.get()``,
``asnumpy``, ``float()``/``int()``/``bool()``/``item()``/``tolist()``,
``deviceSynchronize``, event and stream waits, and what reads a count back:
boolean-mask indexing, ``nonzero``, ``flatnonzero``, ``unique`` and the like) and a host->device copy (with its
bytes).  The CPU time spent inside the emulated device work is kept apart,
so that :attr:`Recorder.host_seconds` is the host's own Python and NumPy time.

What real CuPy refuses is an error here too, so that the counts are those of
a program that would run: ``__array__`` (implicit conversion to NumPy),
arithmetic between a device array and a host array, and a host array passed
to a CuPy function other than ``asarray``/``array`` (and friends).  NumPy
ufuncs called on device arrays run as CuPy's (as ``__array_ufunc__`` does in
CuPy); other NumPy functions on device arrays (``__array_function__``) are
refused, stricter than CuPy, so that the pipeline names its array module.

Emulated device work runs on the host's cores and flushes their caches (a
2048^2 plane is 16 MB; the L3 of the CI machine 32 MB), so the host code after
it runs from memory: on this machine a one-line helper took 2-3 us warm and
15-40 us after a device operation.  A GPU leaves the host's caches alone.  A
*tape* (:class:`Tape`) removes the effect: a run records the form of every
device operation's result (shape, dtype and strides of arrays, Python values)
and the values every synchronisation read back; a second run of the same
subtraction with ``cupy_standin(tape=..., replay=True)`` then does no device
work at all (results are uninitialised arrays of the recorded forms, read-backs
the recorded values), so its host time is the pipeline's alone with warm
caches.  A replay that asks for another operation than the recorded one raises.
"""

import contextlib
import ctypes
import functools
import sys
import time
import types
import weakref
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.fft
import scipy.linalg
import scipy.ndimage

try:
    from threadpoolctl import threadpool_limits
except ImportError:  # a device machine without it: host times are then less precise (the counts are not)
    def threadpool_limits(limits=None):
        return contextlib.nullcontext()

import gpudiffim

PACKAGE_DIR = str(Path(gpudiffim.__file__).parent)
_THIS_FILE = __file__


class StandinError(RuntimeError):
    """Something real CuPy would refuse (or that the stand-in cannot emulate).

    Not a TypeError (which CuPy raises): NumPy swallows a TypeError from ``__array__``
    and falls back to the sequence protocol.
    """


@dataclass
class Event:
    kind: str       # "call", "launch", "sync", "h2d"
    name: str
    site: str
    stage: str
    nbytes: int = 0


#: The stand-in's clock: CPU time of the calling thread.  The pipeline's host work is the main
#: thread's Python; process CPU time would also count other threads of the process (a thread pool
#: winding down after emulated device work), charged to whichever host code runs next.
_clock = time.thread_time


@dataclass
class Recorder:
    """What a run through the stand-in cost.

    Attributes
    ----------
    events : list of Event
    device_seconds : float
        Thread CPU time (:data:`_clock`) inside emulated device work (array operations,
        kernel launches, FFTs): what a GPU would do.
    instrument_seconds : float
        Thread CPU time of the stand-in's own bookkeeping (recording events).
    host_seconds : float
        Thread CPU time of the recorded block minus ``device_seconds`` and
        ``instrument_seconds``: the pipeline's own host work.
    stage : str
        Current stage name (set by :meth:`in_stage`).
    device_bytes, peak_device_bytes : int
        Bytes of device memory held by live stand-in arrays (each buffer
        once, however many views share it), now and at most so far: what
        CuPy's pool would have in use (its cached free blocks, cuFFT plans
        and library workspaces not counted).  Reset the peak with
        :meth:`reset_peak`.
    """

    events: list = field(default_factory=list)
    device_seconds: float = 0.0
    host_seconds: float = 0.0
    stage: str = "-"
    stage_host: dict = field(default_factory=lambda: defaultdict(float))
    stage_device: dict = field(default_factory=lambda: defaultdict(float))
    launch_seconds: dict = field(default_factory=lambda: defaultdict(float))
    instrument_seconds: float = 0.0
    #: Host CPU seconds spent before each device operation since the previous one, by call site
    #: (where the host time goes; includes the call-site lookup itself).
    host_gaps: dict = field(default_factory=lambda: defaultdict(float))
    last_mark: float = None
    stage_instrument: dict = field(default_factory=lambda: defaultdict(float))
    _depth: int = 0
    _excluded_since: float = None
    _work_start: float = None
    device_bytes: int = 0
    peak_device_bytes: int = 0
    stage_peak_bytes: dict = field(default_factory=lambda: defaultdict(int))

    def hold(self, nbytes):
        """Count ``nbytes`` more (negative: fewer) of device memory in use."""
        self.device_bytes += nbytes
        if self.device_bytes > self.peak_device_bytes:
            self.peak_device_bytes = self.device_bytes
        if self.device_bytes > self.stage_peak_bytes[self.stage]:
            self.stage_peak_bytes[self.stage] = self.device_bytes

    def reset_peak(self):
        """Start the peak (overall and per stage) from the memory in use now."""
        self.peak_device_bytes = self.device_bytes
        self.stage_peak_bytes.clear()

    def host_clock(self):
        """Host CPU seconds so far, flat while stand-in work runs (emulated device work, bookkeeping).

        A timer for :class:`cProfile.Profile`: the profile's times are then the host's own
        Python and NumPy time, the quantity the budgets bound (``bench/gpu_budget.py --profile``).
        """
        now = _clock()
        excluded = self.device_seconds + self.instrument_seconds
        if self._excluded_since is not None:
            excluded += now - self._excluded_since
        return now - excluded

    def add(self, kind, name, nbytes=0):
        self.events.append(Event(kind, name, _call_site(), self.stage, int(nbytes)))

    def count(self, kind, stage=None):
        return sum(1 for e in self.events if e.kind == kind and (stage is None or e.stage == stage))

    def bytes(self, kind, stage=None):
        return sum(e.nbytes for e in self.events if e.kind == kind and (stage is None or e.stage == stage))

    def sites(self, kind, stage=None):
        """``Counter`` of call sites of one kind of event."""
        return Counter(e.site for e in self.events if e.kind == kind and (stage is None or e.stage == stage))

    @property
    def syncs(self):
        return self.count("sync")

    @property
    def calls(self):
        return self.count("call")

    @property
    def launches(self):
        return self.count("launch")

    @property
    def uploads(self):
        return self.count("h2d")

    def stages(self):
        """Stage names in order of first appearance."""
        seen = {}
        for e in self.events:
            seen.setdefault(e.stage, None)
        for name in self.stage_host:
            seen.setdefault(name, None)
        return list(seen)

    def table(self):
        """Per-stage rows: (stage, calls, launches, syncs, uploads, upload kB, host ms, device ms, peak device MB)."""
        rows = []
        for stage in self.stages():
            rows.append((stage, self.count("call", stage), self.count("launch", stage), self.count("sync", stage),
                         self.count("h2d", stage), self.bytes("h2d", stage) / 1e3,
                         1e3 * self.stage_host.get(stage, 0.0), 1e3 * self.stage_device.get(stage, 0.0),
                         self.stage_peak_bytes.get(stage, 0) / 1e6))
        rows.append(("total", self.calls, self.launches, self.syncs, self.uploads, self.bytes("h2d") / 1e3,
                     1e3 * self.host_seconds, 1e3 * self.device_seconds, self.peak_device_bytes / 1e6))
        return rows

    def format_table(self):
        head = ("stage", "CuPy calls", "launches", "syncs", "uploads", "upload kB", "host ms", "emulated device ms",
                "peak device MB")
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in self.table():
            lines.append(f"| {row[0]} | {row[1]} | {row[2]} | {row[3]} | {row[4]} | {row[5]:.1f} | {row[6]:.1f} | "
                         f"{row[7]:.1f} | {row[8]:.0f} |")
        return "\n".join(lines)

    @contextlib.contextmanager
    def in_stage(self, name):
        """Attribute the events and times of the block to stage ``name``."""
        previous, self.stage = self.stage, name
        host0, device0, instrument0 = _clock(), self.device_seconds, self.instrument_seconds
        try:
            yield
        finally:
            device = self.device_seconds - device0
            self.stage_device[name] += device
            self.stage_host[name] += (_clock() - host0 - device
                                      - (self.instrument_seconds - instrument0))
            self.stage = previous


#: The recorder of the active stand-in (one at a time).
_RECORDER = None
#: The tape being recorded, or replayed (see :class:`Tape`); None without one.
_TAPE = None
#: Whether :data:`_TAPE` is replayed (no device work) rather than recorded.
_REPLAY = False


class Tape:
    """The device operations of one run, in order: a label and the form of each result.

    Recorded by ``cupy_standin(tape=Tape())``; replayed by ``cupy_standin(tape=tape, replay=True)``
    on the same inputs, where every operation returns its recorded form without computing it.
    """

    def __init__(self):
        self.entries = []
        self.position = 0

    def __len__(self):
        return len(self.entries)

    def put(self, label, result):
        """Record ``label`` and the form of ``result``; return ``result``."""
        self.entries.append((label, _form(result)))
        return result

    def take(self, label):
        """The next recorded result (rebuilt from its form) of the operation ``label``."""
        if self.position >= len(self.entries):
            raise StandinError(f"replay past the end of the tape ({len(self.entries)} operations) at {label}")
        recorded, form = self.entries[self.position]
        if recorded != label:
            raise StandinError(f"replay diverged at operation {self.position}: recorded {recorded}, now {label} "
                               f"at {_call_site()}")
        self.position += 1
        return _rebuild(form)


def _form(value):
    """What :func:`_rebuild` needs of a result: array layouts, containers, Python values, read-back copies."""
    if isinstance(value, ndarray):
        return ("device", value._a.shape, value._a.dtype, value._a.strides)
    if isinstance(value, np.ndarray):
        return ("host", value.copy())
    if isinstance(value, (tuple, list)):
        return (type(value), [_form(v) for v in value])
    return ("value", value)


def _rebuild(form):
    kind = form[0]
    if kind == "device":
        return ndarray(_uninitialised(*form[1:]))
    if kind == "host":
        return form[1].copy()
    if kind == "value":
        return form[1]
    return kind(_rebuild(f) for f in form[1])


def _uninitialised(shape, dtype, strides):
    """An array of ``shape``, ``dtype`` and ``strides`` over fresh, untouched memory (no page is faulted in)."""
    itemsize = dtype.itemsize
    low = sum((n - 1) * stride for n, stride in zip(shape, strides) if stride < 0 and n)
    high = sum((n - 1) * stride for n, stride in zip(shape, strides) if stride > 0 and n)
    empty = 0 in shape
    buffer = np.empty(0 if empty else high - low + itemsize, dtype=np.uint8)
    return np.ndarray(shape, dtype, buffer=buffer, offset=0 if empty else -low, strides=strides)


def _tape_skips(label):
    """Put ``label`` (no result) on a recorded tape, or take it from a replayed one: True to skip the work."""
    if _TAPE is None:
        return False
    if _REPLAY:
        _TAPE.take(label)
        return True
    _TAPE.put(label, None)
    return False


def _taped(label, compute):
    """``compute()`` (device work), its result's form recorded on the tape; on a replay, the recorded form."""
    if _TAPE is None:
        return compute()
    if _REPLAY:
        return _TAPE.take(label)
    return _TAPE.put(label, compute())


#: Helpers whose callers are the call sites worth reporting.
_PASS_THROUGH = (str(Path(PACKAGE_DIR) / "_backend.py"),)


def _call_site():
    frame = sys._getframe(2)
    fallback = None
    while frame is not None:
        filename = frame.f_code.co_filename
        if filename.startswith(PACKAGE_DIR) and filename not in _PASS_THROUGH:
            return f"{Path(filename).relative_to(PACKAGE_DIR)}:{frame.f_lineno}"
        if fallback is None and filename != _THIS_FILE:
            fallback = f"{Path(filename).name}:{frame.f_lineno}"
        frame = frame.f_back
    return fallback or "?"


class _DeviceWork:
    """Time the block as emulated device work (outermost block only).

    A class rather than a generator context manager, so that entering and leaving
    cost the host clock next to nothing (the stand-in's own overhead is not the
    pipeline's host time: real CuPy's per-call cost is added by the estimate).
    """

    __slots__ = ()

    def __enter__(self):
        recorder = _RECORDER
        if recorder is None:
            return
        if recorder._depth:
            recorder._depth += 1
            return
        start = recorder._excluded_since = recorder._work_start = _clock()
        recorder._depth = 1
        if recorder.last_mark is not None:   # host time since the previous device work: charge it to this site
            recorder.host_gaps[_call_site()] += start - recorder.last_mark

    def __exit__(self, *exc):
        recorder = _RECORDER
        if recorder is None or not recorder._depth:
            return False
        recorder._depth -= 1
        if not recorder._depth:
            end = _clock()
            recorder.device_seconds += end - recorder._work_start
            recorder.last_mark = end
            recorder._excluded_since = None
        return False


_DEVICE_WORK = _DeviceWork()


def _device_work():
    """The context that times a block as emulated device work (see :class:`_DeviceWork`)."""
    return _DEVICE_WORK


def _record(kind, name, nbytes=0):
    """Record one event; the stand-in's own bookkeeping time is kept out of the host time."""
    recorder = _RECORDER
    if recorder is None:
        return
    if recorder._depth:         # inside a timed stand-in operation: its time is already kept apart
        recorder.add(kind, name, nbytes)
        return
    start = recorder._excluded_since = _clock()
    recorder.add(kind, name, nbytes)
    spent = _clock() - start
    recorder.instrument_seconds += spent
    recorder._excluded_since = None
    recorder.stage_instrument[recorder.stage] += spent


# ---------------------------------------------------------------------------
# arrays

def _refuse(what):
    raise StandinError(f"{what} (real CuPy refuses this) at {_call_site()}")


def _unwrap(value, what, host_ok=False):
    """NumPy data of a device argument; host arrays only where CuPy accepts them."""
    if isinstance(value, ndarray):
        return value._a
    if isinstance(value, np.ndarray):
        if host_ok:
            _record("h2d", what, value.nbytes)
            return value
        if value.ndim == 0:
            return value[()]
        _refuse(f"a host numpy.ndarray {value.shape} passed to {what}")
    if isinstance(value, (list, tuple)):
        return type(value)(_unwrap(v, what, host_ok) for v in value)
    if isinstance(value, dict):
        return {k: _unwrap(v, what, host_ok) for k, v in value.items()}
    return value


def _wrap(value):
    if isinstance(value, np.ndarray):
        return ndarray(value)
    if isinstance(value, np.generic):
        return ndarray(np.asarray(value))
    if isinstance(value, tuple):
        return tuple(_wrap(v) for v in value)
    if isinstance(value, list):
        return [_wrap(v) for v in value]
    return value


def _record_mask_sync(key, what):
    """CuPy counts the True entries of a device boolean index on the host (``int(cumsum[-1])``): a sync."""
    keys = key if isinstance(key, tuple) else (key,)
    if any(isinstance(k, ndarray) and k.dtype == np.bool_ for k in keys):
        _record("sync", what)


#: CuPy functions whose output size depends on the data: they read a count back (one sync each);
#: ``cupyx.scipy.ndimage.label`` returns the number of labels as a Python int.
_SIZE_FROM_DATA = {"nonzero", "flatnonzero", "argwhere", "unique", "compress", "extract", "label"}


def _operand(value, op):
    if isinstance(value, ndarray):
        return value._a
    if isinstance(value, np.ndarray):
        if value.ndim == 0:
            return value[()]
        _refuse(f"device array {op} host numpy.ndarray {value.shape}")
    if isinstance(value, (list, tuple)):
        _refuse(f"device array {op} a Python {type(value).__name__}")
    return value


class _Pointer:
    def __init__(self, array):
        self.ptr = array.ctypes.data


#: Buffers held by live stand-in arrays: id of the owning NumPy array -> (bytes, recorder, weak reference
#: whose callback releases them; a plain ``weakref.ref``, far cheaper than ``weakref.finalize``).
_HELD = {}


def _release(key):
    """Free a buffer's count (when its array is collected); bookkeeping, kept out of the host time."""
    nbytes, recorder, _ = _HELD.pop(key)
    if recorder._depth or recorder._excluded_since is not None:
        recorder.hold(-nbytes)
        return
    start = recorder._excluded_since = _clock()
    recorder.hold(-nbytes)
    recorder.instrument_seconds += _clock() - start
    recorder._excluded_since = None


def _hold_buffer(array):
    """Count the buffer under ``array`` as device memory of the active recorder until it is freed."""
    recorder = _RECORDER
    if recorder is None:
        return
    owner = array
    while isinstance(owner.base, np.ndarray):
        owner = owner.base
    key = id(owner)
    if key in _HELD:
        return
    _HELD[key] = (owner.nbytes, recorder, weakref.ref(owner, lambda _, key=key: _release(key)))
    recorder.hold(owner.nbytes)


class ndarray:
    """A device array of the stand-in: a NumPy array that only CuPy operations may touch."""

    __slots__ = ("_a", "__weakref__")
    __array_priority__ = 1000

    def __init__(self, array):
        if not isinstance(array, np.ndarray):
            raise StandinError(f"stand-in ndarray of {type(array).__name__}")
        self._a = array
        _hold_buffer(array)

    # metadata (no device work)
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    nbytes = property(lambda self: self._a.nbytes)
    itemsize = property(lambda self: self._a.itemsize)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: self._a.flags)
    data = property(lambda self: _Pointer(self._a))
    device = property(lambda self: _Device(0))

    def __len__(self):
        return len(self._a)

    # conversions that CuPy refuses or that synchronise
    def __array__(self, *args, **kwargs):
        _refuse("implicit conversion of a device array to NumPy (__array__)")

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        """CuPy runs NumPy ufuncs called on device arrays (``np.float64(2) * a``) as its own."""
        if method != "__call__" or "out" in kwargs:
            _refuse(f"NumPy ufunc numpy.{ufunc.__name__}.{method} on a device array")
        with _device_work():
            _record("call", f"cupy.{ufunc.__name__}")
            return _taped(f"cupy.{ufunc.__name__}",
                          lambda: _wrap(ufunc(*(_operand(x, ufunc.__name__) for x in inputs), **kwargs)))

    def __array_function__(self, func, types, args, kwargs):
        _refuse(f"NumPy function numpy.{func.__name__} on a device array")

    def get(self, stream=None, order="C", out=None, blocking=True):
        with _device_work():                # the copy is the transfer (device work), not host Python
            _record("sync", "ndarray.get", self._a.nbytes)
            return _taped("ndarray.get", lambda: np.array(self._a, order=order, copy=True))

    def set(self, array, stream=None):
        with _device_work():
            _record("h2d", "ndarray.set", np.asarray(array).nbytes)
            _taped("ndarray.set", lambda: self._a.__setitem__(Ellipsis, array))

    def _scalar(self, name):
        _record("sync", name, self._a.itemsize)
        return _taped(name, lambda: np.array(self._a))

    def item(self, *args):
        return self._scalar("ndarray.item").item(*args)

    def tolist(self):
        _record("sync", "ndarray.tolist", self._a.nbytes)
        return _taped("ndarray.tolist", self._a.tolist)

    def __float__(self):
        return float(self._scalar("float(ndarray)"))

    def __int__(self):
        return int(self._scalar("int(ndarray)"))

    def __index__(self):
        return self._scalar("operator.index(ndarray)").__index__()

    def __bool__(self):
        return bool(self._scalar("bool(ndarray)"))

    def __complex__(self):
        return complex(self._scalar("complex(ndarray)"))

    def __repr__(self):
        return f"standin.{self._a!r}"

    def __iter__(self):
        for k in range(len(self._a)):
            yield self[k]

    # indexing
    def __getitem__(self, key):
        with _device_work():
            _record("call", "ndarray.__getitem__")
            _record_mask_sync(key, "ndarray.__getitem__ with a boolean mask")
            key = _unwrap(key, "an index", host_ok=True)
            return _taped("ndarray.__getitem__", lambda: _wrap(self._a[key]))

    def __setitem__(self, key, value):
        with _device_work():
            _record("call", "ndarray.__setitem__")
            _record_mask_sync(key, "ndarray.__setitem__ with a boolean mask")
            key, value = _unwrap(key, "an index", host_ok=True), _unwrap(value, "a value", host_ok=True)
            _taped("ndarray.__setitem__", lambda: self._a.__setitem__(key, value))

    def argsort(self, axis=-1):
        """CuPy's argsort is stable (NumPy's default is not)."""
        with _device_work():
            _record("call", "ndarray.argsort")
            return _taped("ndarray.argsort", lambda: ndarray(np.argsort(self._a, axis=axis, kind="stable")))

    # any other array method
    def __getattr__(self, name):
        if name.startswith("__"):  # __array_interface__ and friends would expose the host buffer
            raise AttributeError(name)
        attribute = getattr(self._a, name)
        if not callable(attribute):
            return _wrap(attribute)

        def method(*args, **kwargs):
            with _device_work():
                _record("call", f"ndarray.{name}")
                if name in _SIZE_FROM_DATA:
                    _record("sync", f"ndarray.{name} (output size from the data)")
                return _taped(f"ndarray.{name}", lambda: _wrap(attribute(*_unwrap(args, f"ndarray.{name}"),
                                                                          **_unwrap(kwargs, f"ndarray.{name}"))))

        return method

    @property
    def T(self):
        return ndarray(self._a.T)

    @property
    def real(self):
        return ndarray(self._a.real)

    @property
    def imag(self):
        return ndarray(self._a.imag)


def _binary(name):
    def op(self, other):
        with _device_work():
            _record("call", f"ndarray.{name}")
            return _taped(f"ndarray.{name}", lambda: _wrap(getattr(self._a, name)(_operand(other, name))))

    op.__name__ = name
    return op


def _nothing(_):
    """No result (an in-place operation's, which returns its operand)."""
    return None


def _inplace(name):
    def op(self, other):
        with _device_work():
            _record("call", f"ndarray.{name}")
            _taped(f"ndarray.{name}", lambda: _nothing(getattr(self._a, name)(_operand(other, name))))
        return self

    op.__name__ = name
    return op


def _unary(name):
    def op(self):
        with _device_work():
            _record("call", f"ndarray.{name}")
            return _taped(f"ndarray.{name}", lambda: _wrap(getattr(self._a, name)()))

    op.__name__ = name
    return op


for _name in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or", "xor",
              "lshift", "rshift"):
    setattr(ndarray, f"__{_name}__", _binary(f"__{_name}__"))
    setattr(ndarray, f"__r{_name}__", _binary(f"__r{_name}__"))
    setattr(ndarray, f"__i{_name}__", _inplace(f"__i{_name}__"))
for _name in ("lt", "le", "gt", "ge", "eq", "ne"):
    setattr(ndarray, f"__{_name}__", _binary(f"__{_name}__"))
for _name in ("neg", "pos", "abs", "invert"):
    setattr(ndarray, f"__{_name}__", _unary(f"__{_name}__"))
ndarray.__hash__ = None
ndarray.__module__ = "cupy"
ndarray.__qualname__ = "ndarray"


# ---------------------------------------------------------------------------
# module functions

_HOST_ACCEPTING = {"asarray", "array", "asanyarray", "ascontiguousarray", "asfortranarray", "copyto"}
#: Keyword arguments that CuPy reads on the host (``cupyx.scipy.ndimage.label`` takes a NumPy structure).
_HOST_KEYWORDS = {"label": {"structure"}}


def _function(library, name, label):
    target = getattr(library, name)

    @functools.wraps(target)
    def call(*args, **kwargs):
        with _device_work():
            _record("call", label)
            if name in _SIZE_FROM_DATA or (name == "where" and len(args) + len(kwargs) == 1):
                _record("sync", f"{label} (output size from the data)")
            args, kwargs = _arguments(name, label, args, kwargs)      # uploads recorded on a replay too
            return _taped(label, lambda: _wrap(target(*args, **kwargs)))

    return call


def _arguments(name, label, args, kwargs):
    """The NumPy data of a CuPy function's arguments (host arrays where CuPy takes them: uploads)."""
    host_ok = name in _HOST_ACCEPTING
    host_keywords = _HOST_KEYWORDS.get(name, ())
    args = _unwrap(args, label, host_ok)
    kwargs = {k: v if k in host_keywords else _unwrap(v, label, host_ok) for k, v in kwargs.items()}
    return args, kwargs


class _Ufunc:
    def __init__(self, ufunc):
        self._ufunc = ufunc
        self.__name__ = ufunc.__name__

    def __call__(self, *args, **kwargs):
        with _device_work():
            label = f"cupy.{self.__name__}"
            _record("call", label)
            return _taped(label, lambda: _wrap(self._ufunc(*_unwrap(args, label), **_unwrap(kwargs, label))))

    def __getattr__(self, method):
        bound = getattr(self._ufunc, method)
        label = f"cupy.{self.__name__}.{method}"

        def call(*args, **kwargs):
            with _device_work():
                _record("call", label)
                return _taped(label, lambda: _wrap(bound(*_unwrap(args, label), **_unwrap(kwargs, label))))

        return call


class _Module(types.ModuleType):
    """A fake module: explicit attributes first, then ``library``'s functions as counted CuPy calls."""

    def __init__(self, name, library, **attributes):
        super().__init__(name)
        self._library = library
        self.__dict__.update(attributes)

    def __getattr__(self, name):
        if name.startswith("__") or self._library is None:
            raise AttributeError(name)
        target = getattr(self._library, name)
        if isinstance(target, np.ufunc):
            value = _Ufunc(target)
        elif callable(target) and not isinstance(target, type):
            value = _function(self._library, name, f"{self.__name__}.{name}")
        else:
            value = target
        setattr(self, name, value)
        return value


def _argsort(a, axis=-1):
    """``cupy.argsort``: stable, as CuPy's (NumPy's default is not)."""
    with _device_work():
        _record("call", "cupy.argsort")
        return _taped("cupy.argsort", lambda: ndarray(np.argsort(_unwrap(a, "cupy.argsort"), axis=axis,
                                                                 kind="stable")))


def _asnumpy(array, stream=None, order="C", out=None, blocking=True):
    if isinstance(array, ndarray):
        return array.get(order=order)
    return np.asarray(array)


def _get_array_module(*args):
    return _CUPY if any(isinstance(a, ndarray) for a in args) else np


def _memoize(for_each_device=False):
    return functools.cache


# ---------------------------------------------------------------------------
# cuda: runtime, devices, events, streams, kernels

class _Context:
    """``use()`` and ``with``: nothing to switch on the one stand-in device and stream."""

    def use(self):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _Device(_Context):
    def __init__(self, device=0):
        self.id = int(device)
        self.compute_capability = "90"

    def synchronize(self):
        _record("sync", "Device.synchronize")


class _CudaEvent:
    def __init__(self, block=False, disable_timing=False, interprocess=False):
        self.device_seconds = None

    def record(self, stream=None):
        _record("call", "Event.record")
        self.device_seconds = _RECORDER.device_seconds if _RECORDER is not None else 0.0

    def synchronize(self):
        _record("sync", "Event.synchronize")

    @property
    def done(self):
        return True


def _get_elapsed_time(start, stop):
    """Milliseconds of emulated device work between two recorded events."""
    return 1e3 * (stop.device_seconds - start.device_seconds)


class _Stream(_Context):
    null = None

    def __init__(self, null=False, non_blocking=False, ptr=0):
        self.ptr = 0

    def synchronize(self):
        _record("sync", "Stream.synchronize")


_Stream.null = _Stream()


def _device_synchronize():
    _record("sync", "cudaDeviceSynchronize")


_PROPERTIES = {"name": b"CuPy stand-in (NumPy + CUDA emulator)", "totalGlobalMem": 141 * 2**30,
               "multiProcessorCount": 132, "major": 9, "minor": 0}


def _parse_defines(code):
    defines = []
    for line in code.splitlines():
        if not line.startswith("#define "):
            break
        _, key, value = line.split(maxsplit=2)
        defines.append((key, int(value)))
    return tuple(defines)


class _RawModule:
    """``cupy.RawModule`` of a ``kernels/*.cu`` unit: its functions launch the CUDA emulator."""

    def __init__(self, code=None, options=(), name_expressions=(), **kwargs):
        from gpudiffim._cuda.signatures import KERNELS

        self._defines = _parse_defines(code or "")
        self._names = tuple(name_expressions)
        units = {KERNELS[name].unit for name in self._names}
        if len(units) != 1:
            raise StandinError(f"RawModule with kernels of units {units}")
        (self._unit,) = units

    def get_function(self, name):
        if name not in self._names:
            raise StandinError(f"{name} is not a name expression of this RawModule")
        return _RawKernel(self._unit, self._defines, name)


class _RawKernel:
    def __init__(self, unit, defines, name):
        self.unit, self.defines, self.name = unit, defines, name

    def __call__(self, grid, block, args, shared_mem=0, stream=None):
        with _device_work():          # the launch's own checks and dispatch are not the pipeline's host time
            start = _clock()
            _record("launch", self.name)
            if shared_mem:
                raise StandinError(f"{self.name}: dynamic shared memory cannot be emulated")
            leaked = [k for k, a in enumerate(args) if isinstance(a, np.ndarray)]
            if leaked:
                _refuse(f"host arrays as kernel arguments {leaked} of {self.name}")
            _taped(self.name, lambda: self._run(grid, block, args))
            if _RECORDER is not None:
                _RECORDER.launch_seconds[self.name] += _clock() - start


    def _run(self, grid, block, args):
        host_args = tuple(a._a if isinstance(a, ndarray) else a for a in args)
        fast = _FAST_KERNELS.get(self.name) if _KERNEL_MODE == "numpy" else None
        if fast is not None:
            fast(*host_args)
        else:
            from gpudiffim._cuda import emulator

            emulator.run(self.unit, self.defines, self.name, _dims(grid), _dims(block), host_args)


def _dims(value):
    dims = (value,) if isinstance(value, (int, np.integer)) else tuple(value)
    return tuple(int(d) for d in dims) + (1,) * (3 - len(dims))


# ---------------------------------------------------------------------------
# cuBLAS batched LU (pointer arrays hold the host addresses of the wrapped buffers)

def _matrix_at(address, shape):
    size = int(np.prod(shape))
    buffer = (ctypes.c_double * size).from_address(int(address))
    return np.frombuffer(buffer, dtype=np.float64).reshape(shape)


def _int32_at(address, count):
    return np.frombuffer((ctypes.c_int32 * count).from_address(int(address)), dtype=np.int32)


def _uintp_at(address, count):
    return np.frombuffer((ctypes.c_size_t * count).from_address(int(address)), dtype=np.uintp)


def _dgetrf_batched(handle, n, a_array, lda, pivots, info, batch):
    """Column-major LU with partial pivoting of ``batch`` n x n matrices (LAPACK getrf)."""
    with _device_work():
        _record("launch", "cublasDgetrfBatched")
        if _tape_skips("cublasDgetrfBatched"):
            return
        addresses = _uintp_at(a_array, batch)
        pivot_rows = _int32_at(pivots, batch * n).reshape(batch, n)
        infos = _int32_at(info, batch)
        for k, address in enumerate(addresses):
            column_major = _matrix_at(address, (n, n))       # row j holds column j
            with warnings.catch_warnings():                  # singular systems are expected (rank test)
                warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
                lu, piv = scipy.linalg.lu_factor(column_major.T, check_finite=False)
            column_major[...] = lu.T
            pivot_rows[k] = piv + 1
            infos[k] = 0


def _dgetrs_batched(handle, trans, n, nrhs, a_array, lda, pivots, b_array, ldb, info, batch):
    """Solve with the factors of :func:`_dgetrf_batched` (one right-hand side)."""
    with _device_work():
        _record("launch", "cublasDgetrsBatched")
        if _tape_skips("cublasDgetrsBatched"):
            return
        a_addresses, b_addresses = _uintp_at(a_array, batch), _uintp_at(b_array, batch)
        pivot_rows = _int32_at(pivots, batch * n).reshape(batch, n)
        for k in range(batch):
            lu = _matrix_at(a_addresses[k], (n, n)).T
            rhs = _matrix_at(b_addresses[k], (nrhs, n))
            rhs[...] = scipy.linalg.lu_solve((lu, pivot_rows[k] - 1), rhs.T, check_finite=False).T
        _int32_at(info, 1)[0] = 0


# ---------------------------------------------------------------------------
# cuSOLVER batched Cholesky (the same pointer arrays)

#: cuBLAS fill modes (``cublasFillMode_t``), which cuSOLVER takes.
_FILL_LOWER, _FILL_UPPER = 0, 1


def _check_cholesky_arguments(name, uplo, n, lda, nrhs=1, ldb=None):
    """What cuSOLVER rejects (``CUSOLVER_STATUS_INVALID_VALUE``, raised by CuPy) is refused here."""
    if uplo not in (_FILL_LOWER, _FILL_UPPER) or n < 0 or lda < max(1, n) or (ldb is not None and ldb < max(1, n)):
        _refuse(f"{name}(uplo={uplo}, n={n}, lda={lda}, ldb={ldb})")
    if nrhs != 1:
        _refuse(f"{name} with nrhs={nrhs} (cuSOLVER's batched solve takes one right-hand side)")


def _dpotrf_batched(handle, uplo, n, a_array, lda, info, batch):
    """Column-major Cholesky of ``batch`` n x n matrices in place (LAPACK potrf), one ``info`` each."""
    _check_cholesky_arguments("cusolverDnDpotrfBatched", uplo, n, lda)
    with _device_work():
        _record("launch", "cusolverDnDpotrfBatched")
        if _tape_skips("cusolverDnDpotrfBatched"):
            return
        infos = _int32_at(info, batch)
        for k, address in enumerate(_uintp_at(a_array, batch)):
            column_major = _matrix_at(address, (n, n))       # row j holds column j
            factor, infos[k] = scipy.linalg.lapack.dpotrf(column_major.T, lower=uplo == _FILL_LOWER, clean=0)
            column_major[...] = factor.T


def _dpotrs_batched(handle, uplo, n, nrhs, a_array, lda, b_array, ldb, info, batch):
    """Solve with the factors of :func:`_dpotrf_batched` (one right-hand side each); ``info`` 0."""
    _check_cholesky_arguments("cusolverDnDpotrsBatched", uplo, n, lda, nrhs, ldb)
    with _device_work():
        _record("launch", "cusolverDnDpotrsBatched")
        if _tape_skips("cusolverDnDpotrsBatched"):
            return
        for a_address, b_address in zip(_uintp_at(a_array, batch), _uintp_at(b_array, batch)):
            rhs = _matrix_at(b_address, (n,))
            with np.errstate(all="ignore"):     # a failed factor's solution is garbage, as on the GPU
                rhs[...], _ = scipy.linalg.lapack.dpotrs(_matrix_at(a_address, (n, n)).T, rhs,
                                                         lower=uplo == _FILL_LOWER)
        _int32_at(info, 1)[0] = 0


# ---------------------------------------------------------------------------
# installation

def _scipy_fft_module(name):
    return _Module(name, scipy.fft)


def _build_modules():
    cuda_runtime = types.SimpleNamespace(
        getDeviceCount=lambda: 1, deviceSynchronize=_device_synchronize, runtimeGetVersion=lambda: 13000,
        driverGetVersion=lambda: 13000, getDeviceProperties=lambda device: dict(_PROPERTIES),
        memGetInfo=lambda: (140 * 2**30, 141 * 2**30), getDevice=lambda: 0)
    cuda_device = types.SimpleNamespace(get_cublas_handle=lambda: 0, get_cusolver_handle=lambda: 0, Device=_Device)
    cuda = _Module("cupy.cuda", None, runtime=cuda_runtime, device=cuda_device, Device=_Device,
                   Event=_CudaEvent, Stream=_Stream, get_elapsed_time=_get_elapsed_time,
                   get_current_stream=lambda: _Stream.null, is_available=lambda: True)
    cupy = _Module("cupy", np, ndarray=ndarray, cuda=cuda, asnumpy=_asnumpy, argsort=_argsort,
                   get_array_module=_get_array_module, memoize=_memoize, RawModule=_RawModule,
                   __version__="13.0.0+standin", fft=_Module("cupy.fft", np.fft),
                   linalg=_Module("cupy.linalg", np.linalg))
    cupyx_scipy = types.ModuleType("cupyx.scipy")
    cupyx_scipy.fft = _scipy_fft_module("cupyx.scipy.fft")
    cupyx_scipy.ndimage = _Module("cupyx.scipy.ndimage", scipy.ndimage)
    cupyx = _Module("cupyx", None, scipy=cupyx_scipy)
    cublas = types.SimpleNamespace(dgetrfBatched=_dgetrf_batched, dgetrsBatched=_dgetrs_batched,
                                   CUBLAS_OP_N=0, CUBLAS_OP_T=1, CUBLAS_FILL_MODE_LOWER=_FILL_LOWER,
                                   CUBLAS_FILL_MODE_UPPER=_FILL_UPPER)
    cusolver = types.SimpleNamespace(dpotrfBatched=_dpotrf_batched, dpotrsBatched=_dpotrs_batched)
    libs = types.ModuleType("cupy_backends.cuda.libs")
    libs.cublas = cublas
    libs.cusolver = cusolver
    backends_cuda = types.ModuleType("cupy_backends.cuda")
    backends_cuda.libs = libs
    backends = types.ModuleType("cupy_backends")
    backends.cuda = backends_cuda
    return {"cupy": cupy, "cupy.cuda": cuda, "cupy.cuda.runtime": cuda_runtime, "cupy.fft": cupy.fft,
            "cupy.linalg": cupy.linalg, "cupyx": cupyx, "cupyx.scipy": cupyx_scipy,
            "cupyx.scipy.fft": cupyx_scipy.fft, "cupyx.scipy.ndimage": cupyx_scipy.ndimage,
            "cupy_backends": backends, "cupy_backends.cuda": backends_cuda,
            "cupy_backends.cuda.libs": libs, "cupy_backends.cuda.libs.cublas": cublas,
            "cupy_backends.cuda.libs.cusolver": cusolver}


_CUPY = None
#: How RawModule kernels run: "emulator" (the .cu text, thread by thread) or "numpy" (tests/standin_kernels.py).
_KERNEL_MODE = "emulator"
_FAST_KERNELS = {}


def _clear_caches():
    from gpudiffim import _backend
    from gpudiffim._cuda import _loader

    _backend._cupy_probe.cache_clear()
    _loader._memoized_module.cache_clear()


#: The stand-in's compiled-module cache, kept from one stand-in block to the next as CuPy keeps
#: its memoized ``RawModule`` objects for the life of the process: a measured run after a warm-up
#: run (``bench/gpu_budget.py``) then reads no kernel source, as on a GPU machine.
_STANDIN_LOADER = None


@contextlib.contextmanager
def _standin_loader():
    """Point ``gpudiffim._cuda._loader`` at the stand-in's own module cache for the block."""
    global _STANDIN_LOADER
    from gpudiffim._cuda import _loader

    original = _loader._memoized_module
    if _STANDIN_LOADER is None:
        _STANDIN_LOADER = original.__wrapped__()       # its ``module`` memoized by the stand-in's ``memoize``
    _loader._memoized_module = lambda: _STANDIN_LOADER
    try:
        yield
    finally:
        _loader._memoized_module = original


@contextlib.contextmanager
def cupy_standin(recorder=None, kernels="emulator", tape=None, replay=False):
    """Run the block with the stand-in as ``cupy`` and the ``cupy`` backend selected.

    Parameters
    ----------
    recorder : Recorder, optional
    kernels : {"emulator", "numpy"}
        Run the RawModule kernels on the CUDA emulator (faithful, slow) or as
        the NumPy versions of ``tests/standin_kernels.py`` (fast; the warp
        kernel always runs on the emulator).
    tape : Tape, optional
        Record the device operations' results on it, or with ``replay``
        replay them (no device work; the same inputs and calls as when it was
        recorded): see the module notes.

    Yields the :class:`Recorder` (a new one unless given); its
    ``host_seconds`` covers the whole block.
    """
    global _RECORDER, _CUPY, _KERNEL_MODE, _FAST_KERNELS, _TAPE, _REPLAY
    from gpudiffim import use_backend

    if kernels not in ("emulator", "numpy"):
        raise ValueError(f"kernels must be 'emulator' or 'numpy', got {kernels!r}")
    if kernels == "numpy":
        from standin_kernels import FAST

        _FAST_KERNELS = FAST
    _KERNEL_MODE = kernels

    if _RECORDER is not None:
        raise RuntimeError("the CuPy stand-in is already active")
    recorder = Recorder() if recorder is None else recorder
    modules = _build_modules()
    saved = {name: sys.modules.get(name) for name in modules}
    sys.modules.update(modules)
    _CUPY = modules["cupy"]
    _clear_caches()
    _RECORDER = recorder
    if replay and tape is None:
        raise ValueError("replay needs the tape of a recorded run")
    _TAPE, _REPLAY = tape, bool(replay)
    if tape is not None:
        tape.position = 0
    start, device0, instrument0 = _clock(), recorder.device_seconds, recorder.instrument_seconds
    from gpudiffim import task

    stage_timer = task.stage_timer

    @contextlib.contextmanager
    def staged(timings, stage):
        with recorder.in_stage(stage), stage_timer(timings, stage):
            yield

    task.stage_timer = staged
    try:
        # single-threaded BLAS: the thread's CPU time is then the emulated work done
        with use_backend("cupy"), threadpool_limits(1), _standin_loader():
            yield recorder
    finally:
        task.stage_timer = stage_timer
        recorder.host_seconds += (_clock() - start - (recorder.device_seconds - device0)
                                  - (recorder.instrument_seconds - instrument0))
        _RECORDER = None
        _TAPE, _REPLAY = None, False
        _CUPY = None
        _KERNEL_MODE = "emulator"
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
        _clear_caches()


def to_device(masked_image):
    """A MaskedImage with stand-in device planes (one recorded upload per plane)."""
    return masked_image.to_module(_CUPY)
