"""Host-side argument preparation shared by the host wrappers.

The wrappers (one module per ``.cu`` file) convert their inputs with these
helpers before :func:`~gpudiffim._cuda.launch.launch` checks them against the
signatures: the launcher and its array module from where the data live
(:func:`on_launcher`), C-contiguous arrays of the kernel's dtype in native
byte order, int32 masks, and output buffers.
"""

import numpy as np

from .._backend import array_module, is_device_array
from .launch import launcher_for

__all__ = ["centres_in", "check_array", "float_dtype", "int32_bits", "int32_mask", "native", "on_launcher", "output",
           "prepare"]

_INT32 = np.iinfo(np.int32)
_FLOAT32 = np.dtype(np.float32)


def on_launcher(*arrays):
    """``(launcher, xp)``: :func:`~gpudiffim._cuda.launch.launcher_for` of ``arrays`` and its array module."""
    launcher = launcher_for(*arrays)
    return launcher, array_module(launcher)


def check_array(name, array):
    """Raise ``TypeError`` unless ``array`` is a NumPy or a CuPy array."""
    if not (isinstance(array, np.ndarray) or is_device_array(array)):
        msg = f"{name}: expected a numpy.ndarray or a cupy.ndarray, got {type(array).__name__}"
        raise TypeError(msg)


def native(dtype):
    """``dtype`` in native byte order (FITS data are big-endian)."""
    return np.dtype(dtype).newbyteorder("=")


def float_dtype(*arrays):
    """float32 when every input is float32, else float64."""
    if arrays and all(getattr(a, "dtype", None) == _FLOAT32 for a in arrays):   # native float32: the common case
        return _FLOAT32
    dtypes = {native(getattr(a, "dtype", np.float64)) for a in arrays}
    return np.dtype(np.float32) if dtypes == {np.dtype(np.float32)} else np.dtype(np.float64)


def prepare(xp, array, dtype, ndim, name):
    """C-contiguous ``array`` of ``dtype`` in ``xp`` (a copy only where needed; no call when none is)."""
    if isinstance(array, xp.ndarray) and array.dtype == dtype and array.flags.c_contiguous:
        if array.ndim != ndim:
            msg = f"{name} must be {ndim}-D, got shape {array.shape}"
            raise ValueError(msg)
        return array
    if not isinstance(array, xp.ndarray):
        array = xp.asarray(array, dtype=dtype)
    if array.ndim != ndim:
        msg = f"{name} must be {ndim}-D, got shape {array.shape}"
        raise ValueError(msg)
    return xp.ascontiguousarray(array, dtype=dtype)


def output(xp, out, shape, dtype, name):
    """``out`` checked for ``shape``, or a new uninitialised array."""
    if out is None:
        return xp.empty(shape, dtype=dtype)
    if tuple(out.shape) != tuple(shape):
        msg = f"{name} must have shape {tuple(shape)}, got {tuple(out.shape)}"
        raise ValueError(msg)
    return out  # dtype, contiguity and array type are checked by launch()


def int32_mask(name, mask, xp):
    """``mask`` as a C-contiguous int32 array of ``xp``.

    Raises
    ------
    TypeError
        If ``mask`` is not boolean or integer.
    ValueError
        If a value does not fit in int32.
    """
    if isinstance(mask, xp.ndarray) and mask.dtype == np.int32 and mask.flags.c_contiguous:
        return mask   # already what the kernels read: no call
    mask = xp.asarray(mask)
    dtype = native(mask.dtype)
    if dtype.kind not in "biu":
        msg = f"{name} must be an integer (or boolean) array, got dtype {dtype}"
        raise TypeError(msg)
    if dtype.kind != "b" and mask.size and not np.can_cast(dtype, np.int32):
        low, high = int(mask.min()), int(mask.max())  # synchronizes! (CuPy input)
        if low < _INT32.min or high > _INT32.max:
            msg = f"{name} values must fit in int32, got the range [{low}, {high}] ({dtype})"
            raise ValueError(msg)
    return xp.ascontiguousarray(mask, dtype=np.int32)


def int32_bits(name, value):
    """``value`` as an int, checked to fit in int32."""
    value = int(value)
    if not _INT32.min <= value <= _INT32.max:
        msg = f"{name} must fit in int32, got {value}"
        raise ValueError(msg)
    return value


def centres_in(xp, centres_rc):
    """(n, 2) int32 ``(row, column)`` centres in ``xp``: an array of ``xp`` as it is (converted where
    needed), host centres converted on the host, then uploaded (one call, 8 bytes a centre)."""
    if isinstance(centres_rc, xp.ndarray):
        return prepare(xp, centres_rc, np.int32, 2, "centres_rc")
    return xp.asarray(np.ascontiguousarray(np.asarray(centres_rc).reshape(-1, 2), dtype=np.int32))
