"""One launch helper for every kernel: argument checks, then CuPy or the CPU emulator.

:func:`launcher_for` is the one place that chooses between the two launchers,
from where the data live: CuPy arrays run on the GPU, NumPy arrays on the CPU
emulator.  :func:`launch` and every host wrapper (:mod:`.stamp_fit`,
:mod:`.spatial_assembly`, :mod:`.residual_moments`, :mod:`.image_apply`,
:mod:`.warp`) ask it; nothing here reads the requested backend.  Whether an
operation takes the kernel path at all (rather than the NumPy reference) is
decided before, by :func:`gpudiffim._backend.on_kernel_path`.
"""

import functools
import numbers

import numpy as np

from .._backend import is_device_array
from . import _loader
from .signatures import KERNELS, parse_ctype

__all__ = ["launch", "launcher_for", "check_args"]

#: The range of a C ``int`` (plain ints: ``numpy.iinfo``'s attributes are computed on each access).
_INT32_MIN, _INT32_MAX = int(np.iinfo(np.int32).min), int(np.iinfo(np.int32).max)


#: Launch geometries already checked, as 3-tuples (a launch looks its grid and block up here).
_CHECKED_DIMS = {}


def _dims(value, what):
    try:
        return _CHECKED_DIMS[value]
    except (KeyError, TypeError):         # not seen yet, or unhashable (a list)
        pass
    dims = (value,) if isinstance(value, numbers.Integral) else tuple(value)
    if not 1 <= len(dims) <= 3 or not all(isinstance(d, numbers.Integral) and d >= 1 for d in dims):
        msg = f"{what} must be a positive int or a tuple of 1 to 3 positive ints, got {value!r}"
        raise ValueError(msg)
    checked = tuple(int(d) for d in dims) + (1,) * (3 - len(dims))
    if isinstance(value, (int, tuple)) and len(_CHECKED_DIMS) < 4096:
        _CHECKED_DIMS[value] = checked
    return checked


def launcher_for(*arrays):
    """The launcher of kernels on ``arrays``: ``"cupy"`` or ``"emulator"``.

    ``"cupy"`` when any argument is a CuPy array, else ``"emulator"`` (NumPy
    arrays; scalars and array-likes count as host data).  Mixed arguments are
    caught by :func:`check_args`, which wants every array of the launcher's type.

    Examples
    --------
    >>> import numpy as np
    >>> from gpudiffim._cuda.launch import launcher_for
    >>> launcher_for(np.zeros(3), 2)
    'emulator'
    """
    for array in arrays:
        if is_device_array(array):
            return "cupy"
    return "emulator"


def check_args(kernel_name, args, array_type):
    """Check ``args`` against the declared signature; return them converted for the launch.

    Arrays must be ``array_type`` (``numpy.ndarray`` for the emulator,
    ``cupy.ndarray`` for CuPy) with exactly the declared dtype, C-contiguous,
    and writeable where the kernel writes.  Scalars become NumPy scalars of the
    declared width (CuPy would send a Python int as 64 bits).

    Raises
    ------
    TypeError
        On an unknown kernel, a wrong argument count or a wrong argument type.
    """
    plan = _plan(kernel_name)
    args = tuple(args)
    if len(args) != len(plan):
        spec = KERNELS[kernel_name]
        names = ", ".join(f"{c} {n}" for n, c in spec.params)
        msg = f"{kernel_name}({names}) takes {len(spec.params)} arguments, got {len(args)}"
        raise TypeError(msg)
    out = []
    append = out.append
    for (_, _, kind, dtype, const), arg in zip(plan, args):      # the common cases first, nothing described
        if kind == "pointer":
            if type(arg) is array_type and arg.dtype == dtype:
                flags = arg.flags
                if flags.c_contiguous and (const or getattr(flags, "writeable", True)):  # CuPy: no writeable
                    append(arg)
                    continue
        elif type(arg) is int:
            if dtype.kind != "i" or _INT32_MIN <= arg <= _INT32_MAX:
                append(dtype.type(arg))
                continue
        elif type(arg) is float and dtype.kind == "f":
            append(dtype.type(arg))
            continue
        append(_checked(kernel_name, plan, len(out), arg, array_type))
    return tuple(out)


def _checked(kernel_name, plan, index, arg, array_type):
    """Argument ``index`` of ``kernel_name`` converted for the launch, or the TypeError that says why not."""
    name, ctype, kind, dtype, const = plan[index]
    if kind == "pointer":
        if not isinstance(arg, array_type):
            problem = f"expected a {array_type.__module__}.{array_type.__name__}, got {type(arg).__name__}"
        elif arg.dtype != dtype:
            problem = f"expected dtype {dtype}, got {arg.dtype}"
        elif not (flags := arg.flags).c_contiguous:
            problem = "array must be C-contiguous"
        elif not const and not getattr(flags, "writeable", True):
            problem = "array is written by the kernel but is read-only"
        else:
            return arg
    elif dtype.kind == "i":
        if isinstance(arg, (bool, np.bool_)) or not isinstance(arg, numbers.Integral):
            problem = f"expected an int, got {type(arg).__name__}"
        elif not _INT32_MIN <= int(arg) <= _INT32_MAX:
            problem = f"{int(arg)} does not fit in a 32-bit int"
        else:
            return dtype.type(arg)
    elif isinstance(arg, (bool, np.bool_)) or not isinstance(arg, numbers.Real):
        problem = f"expected a real number, got {type(arg).__name__}"
    else:
        return dtype.type(arg)
    msg = f"{kernel_name} argument {index} ({ctype} {name}): {problem}"
    raise TypeError(msg)


@functools.lru_cache(maxsize=None)
def _plan(kernel_name):
    """``(name, ctype, kind, dtype, const)`` of every parameter of ``kernel_name`` (parsed once per kernel).

    Raises
    ------
    TypeError
        On an unknown kernel.
    """
    try:
        spec = KERNELS[kernel_name]
    except KeyError:
        msg = f"unknown kernel {kernel_name!r}; declared: {sorted(KERNELS)}"
        raise TypeError(msg) from None
    return tuple((name, ctype, *parse_ctype(ctype)) for name, ctype in spec.params)


def launch(kernel_name, grid, block, args, shared_mem=0, *, defines=()):
    """Launch ``kernel_name`` on ``grid`` x ``block`` with ``args``, on the launcher of ``args``.

    The launcher is :func:`launcher_for` of the arguments: CuPy when they are
    CuPy arrays, the CPU emulator when they are NumPy arrays.

    Parameters
    ----------
    kernel_name : str
        A key of :data:`gpudiffim._cuda.signatures.KERNELS` (``"gdi_residual_moments<double>"``).
    grid, block : int or tuple of up to 3 ints
        Launch geometry (from the unit's geometry helper, never inline).
    args : sequence
        Kernel arguments in declaration order; checked by :func:`check_args`.
    shared_mem : int
        Dynamic shared memory in bytes (CuPy only; the emulator supports static
        ``__shared__`` arrays only).
    defines : tuple of (str, int) pairs
        Compile-time constants of the unit's ``#define`` preamble.

    Raises
    ------
    TypeError
        From :func:`check_args`: an unknown kernel or a wrong argument.
    ValueError
        On a bad geometry, or dynamic shared memory on the emulator.
    """
    args = tuple(args)
    launcher = launcher_for(*args)
    grid, block = _dims(grid, "grid"), _dims(block, "block")
    defines = defines if type(defines) is tuple else tuple(defines)
    if launcher == "cupy":
        import cupy

        converted = check_args(kernel_name, args, cupy.ndarray)
        _cupy_function(cupy, kernel_name, defines)(grid, block, converted, shared_mem=int(shared_mem))
    else:
        from . import emulator

        converted = check_args(kernel_name, args, np.ndarray)
        if shared_mem:
            msg = "the CUDA emulator supports static __shared__ arrays only (shared_mem must be 0)"
            raise ValueError(msg)
        emulator.run(KERNELS[kernel_name].unit, defines, kernel_name, grid, block, converted)


#: CuPy kernel functions already looked up, by (module loader, device, kernel, defines).
_FUNCTIONS = {}


def _cupy_function(cupy, kernel_name, defines):
    """The ``RawModule`` function of ``kernel_name`` on the current device (one dict lookup after the first).

    Keyed by the loader too, so that a new loader (CuPy's modules cleared) looks the function up again.
    """
    loader = _loader.module_loader()
    key = (loader, cupy.cuda.runtime.getDevice(), kernel_name, defines)
    function = _FUNCTIONS.get(key)
    if function is None:
        function = loader(KERNELS[kernel_name].unit, defines).get_function(kernel_name)
        _FUNCTIONS[key] = function
    return function
