"""Launch geometry and host wrappers of ``kernels/stamp_fit.cu`` and ``kernels/spatial_assembly.cu``.

Issue 4's kernels 1, 2 and 4, each the kernel-path twin of a NumPy reference:

=====================================  ===========================================================
wrapper                                NumPy reference
=====================================  ===========================================================
:func:`correlate_stamps`               :func:`gpudiffim.convolve.correlate_stamps` (and
                                       ``correlate_stamps_each`` with ``per_stamp=True``)
:func:`normal_equations`               ``gpudiffim.stamps._normal_equations`` (ones column
                                       appended when ``with_background``)
:func:`spatial_normal_equations`       :func:`gpudiffim.spatial_fit.spatial_normal_equations`
=====================================  ===========================================================

Every wrapper takes NumPy arrays (run by the CPU emulator) or CuPy arrays
(run on the GPU); the outputs are allocated in the inputs' array module, with
``empty`` (every element is written by the kernel).  Inputs are converted to
C-contiguous arrays of the kernel's dtype (float32 stays float32, anything
else becomes float64; native byte order) before the launch.
"""

import numpy as np

from .._backend import array_module_of, is_device_array
from .launch import launch

__all__ = [
    "CORRELATE_MAX_TAPS",
    "CORRELATE_THREADS",
    "NORMAL_EQUATIONS_SHARED_DOUBLES",
    "NORMAL_EQUATIONS_THREADS",
    "SPATIAL_BLOCK",
    "STAMP_FIT_DEFINES",
    "correlate_stamps",
    "correlate_stamps_geometry",
    "normal_equations",
    "normal_equations_geometry",
    "spatial_map_structure",
    "spatial_normal_equations",
    "spatial_normal_equations_geometry",
]

#: Threads per block of ``gdi_correlate_stamps`` (any count works).
CORRELATE_THREADS = 128
#: Kernels per block and outputs per thread of ``gdi_correlate_stamps`` (``GDI_CS_KB``, ``GDI_CS_RX``).
CORRELATE_KERNELS_PER_BLOCK = 4
CORRELATE_OUTPUTS_PER_THREAD = 4
#: Most kernel taps ``kh * kw`` staged in shared memory (``GDI_CS_MAX_TAPS`` in the source).
CORRELATE_MAX_TAPS = 4096
#: Threads per block of ``gdi_normal_equations``.
NORMAL_EQUATIONS_THREADS = 256
#: Doubles of the pixel tile of ``gdi_normal_equations`` (``GDI_NE_SHARED_DOUBLES``): 32 KiB.
NORMAL_EQUATIONS_SHARED_DOUBLES = 4096
#: Block of ``gdi_spatial_normal_equations``: (columns b, rows a) of the output.
SPATIAL_BLOCK = (16, 16)
#: Compile-time constants of ``kernels/stamp_fit.cu``: one tuple for both of its
#: kernels, so that the unit is compiled once (the module cache is keyed on it).
STAMP_FIT_DEFINES = (("GDI_CS_MAX_TAPS", CORRELATE_MAX_TAPS),
                     ("GDI_CS_KB", CORRELATE_KERNELS_PER_BLOCK),
                     ("GDI_CS_RX", CORRELATE_OUTPUTS_PER_THREAD),
                     ("GDI_NE_SHARED_DOUBLES", NORMAL_EQUATIONS_SHARED_DOUBLES))

_MAX_GRID_Y = 65535
_CTYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}


# ---------------------------------------------------------------------------
# geometry

def correlate_stamps_geometry(n_stamps, k_out, n_taps=1):
    """``(grid, block)`` of ``gdi_correlate_stamps``: block ``(c, n)`` for kernels chunk ``c`` of stamp ``n``.

    A chunk holds ``min(GDI_CS_KB, GDI_CS_MAX_TAPS // n_taps)`` kernels (the
    kernel's ``gdi_cs_kernels_per_block``); ``n_taps = kh * kw``.

    Raises
    ------
    ValueError
        If ``n_stamps`` exceeds the grid's y limit (65535).
    """
    if n_stamps > _MAX_GRID_Y:
        msg = f"gdi_correlate_stamps takes at most {_MAX_GRID_Y} stamps per launch, got {n_stamps}"
        raise ValueError(msg)
    per_block = max(1, min(CORRELATE_KERNELS_PER_BLOCK, CORRELATE_MAX_TAPS // max(int(n_taps), 1)))
    chunks = -(-max(int(k_out), 1) // per_block)
    return (chunks, max(int(n_stamps), 1)), (CORRELATE_THREADS,)


def normal_equations_geometry(n_stamps):
    """``(grid, block)`` of ``gdi_normal_equations``: one block per stamp."""
    return (max(int(n_stamps), 1),), (NORMAL_EQUATIONS_THREADS,)


def spatial_normal_equations_geometry(n_theta):
    """``(grid, block)`` of ``gdi_spatial_normal_equations``: one thread per matrix element.

    ``grid.x`` covers the columns ``b`` and ``grid.y`` the rows ``a`` of the
    ``(n_theta, n_theta)`` output in :data:`SPATIAL_BLOCK` tiles.
    """
    bx, by = SPATIAL_BLOCK
    n = max(int(n_theta), 1)
    return (-(-n // bx), -(-n // by)), SPATIAL_BLOCK


# ---------------------------------------------------------------------------
# host side helpers

def _array_module(*arrays):
    """``cupy`` when any input is a CuPy array, else ``numpy``."""
    return next((array_module_of(a) for a in arrays if is_device_array(a)), np)


def _float_dtype(*arrays):
    """float32 when every input is float32, else float64."""
    dtypes = {np.dtype(getattr(a, "dtype", np.float64)).newbyteorder("=") for a in arrays}
    return np.dtype(np.float32) if dtypes == {np.dtype(np.float32)} else np.dtype(np.float64)


def _prepare(xp, array, dtype, ndim, name):
    """C-contiguous ``array`` of ``dtype`` in ``xp`` (a copy only where needed)."""
    array = xp.asarray(array, dtype=dtype)
    if array.ndim != ndim:
        msg = f"{name} must be {ndim}-D, got shape {array.shape}"
        raise ValueError(msg)
    return xp.ascontiguousarray(array)


def _output(xp, out, shape, dtype, name):
    """``out`` checked for ``shape``, or a new uninitialised array."""
    if out is None:
        return xp.empty(shape, dtype=dtype)
    if tuple(out.shape) != tuple(shape):
        msg = f"{name} must have shape {tuple(shape)}, got {tuple(out.shape)}"
        raise ValueError(msg)
    return out  # dtype, contiguity and array type are checked by launch()


def _default_backend(xp, backend):
    if backend is not None:
        return backend
    return "emulator" if xp is np else "cupy"


# ---------------------------------------------------------------------------
# kernel 1: basis correlation of the stamps

def correlate_stamps(stamps, kernels, *, per_stamp=False, backend=None, out=None):
    """Correlate stamps with kernel images, valid region only (``gdi_correlate_stamps``).

    Parameters
    ----------
    stamps : ndarray of shape (N, S_y, S_x)
        Image stamps; NumPy or CuPy.
    kernels : ndarray of shape (K, kh, kw)
        Kernel images in ``afw`` layout (:mod:`gpudiffim.convolve`); with
        ``per_stamp``, ``K == N``.
    per_stamp : bool
        Correlate stamp ``n`` with kernel ``n`` only (``correlate_stamps_each``)
        instead of every stamp with every kernel.
    backend : {"emulator", "cupy"}, optional
        Default: ``"emulator"`` for NumPy inputs, ``"cupy"`` for CuPy inputs.
    out : ndarray of shape (N, K_out, S_y - kh + 1, S_x - kw + 1), optional
        Output buffer, C-contiguous, of the computation dtype.

    Returns
    -------
    ndarray of shape (N, K_out, S_y - kh + 1, S_x - kw + 1)
        ``K_out = 1`` with ``per_stamp``, else ``K``; float32 when both inputs
        are float32, else float64 (sums are accumulated in double)::

            out[n, k, y, x] = sum_{j,i} kernels[k', j, i] * stamps[n, y + j, x + i]

        with ``k' = n`` when ``per_stamp``, else ``k' = k``.

    Raises
    ------
    ValueError
        On inconsistent shapes, a kernel larger than the stamps, more than
        :data:`CORRELATE_MAX_TAPS` taps (use the FFT path of
        :mod:`gpudiffim.convolve` then) or a wrong ``out`` shape.
    TypeError
        From :func:`~gpudiffim._cuda.launch.launch` on a wrong ``out`` dtype or array type.
    """
    xp = _array_module(stamps, kernels)
    dtype = _float_dtype(stamps, kernels)
    stamps = _prepare(xp, stamps, dtype, 3, "stamps")
    kernels = _prepare(xp, kernels, dtype, 3, "kernels")
    n, sy, sx = stamps.shape
    n_kernels, kh, kw = kernels.shape
    if kh < 1 or kw < 1 or kh > sy or kw > sx:
        msg = f"kernels of shape ({kh}, {kw}) need 1 <= kh <= S_y and 1 <= kw <= S_x for stamps ({sy}, {sx})"
        raise ValueError(msg)
    if per_stamp and n_kernels != n:
        msg = f"per_stamp needs one kernel per stamp, got {n_kernels} kernels for {n} stamps"
        raise ValueError(msg)
    if kh * kw > CORRELATE_MAX_TAPS:
        msg = (f"kernels of {kh} x {kw} = {kh * kw} taps exceed the {CORRELATE_MAX_TAPS} taps of "
               f"gdi_correlate_stamps' shared memory; use gpudiffim.convolve.correlate_stamps (FFT)")
        raise ValueError(msg)
    k_out = 1 if per_stamp else n_kernels
    out = _output(xp, out, (n, k_out, sy - kh + 1, sx - kw + 1), dtype, "out")
    if out.size:
        grid, block = correlate_stamps_geometry(n, k_out, kh * kw)
        launch(f"gdi_correlate_stamps<{_CTYPES[dtype]}>", grid, block,
               (stamps, kernels, n, n_kernels, int(bool(per_stamp)), sy, sx, kh, kw, out),
               defines=STAMP_FIT_DEFINES, backend=_default_backend(xp, backend))
    return out


# ---------------------------------------------------------------------------
# kernel 2: per-stamp normal equations

def normal_equations(columns, weights, target, with_background, *, backend=None, out=None):
    """Weighted normal equations of every stamp (``gdi_normal_equations``).

    Parameters
    ----------
    columns : ndarray of shape (N, n_basis, n_pix)
        Design columns ``c_a`` of each stamp (basis correlations, flattened);
        NumPy or CuPy.
    weights : ndarray of shape (N, n_pix)
        Pixel weights ``w`` (inverse variances); broadcast to ``target``'s shape.
    target : ndarray of shape (N, n_pix)
        Pixels ``y`` fitted.
    with_background : bool or int
        Add the implicit background column ``c_{n_basis} = 1`` (never stored).
    backend : {"emulator", "cupy"}, optional
        Default: ``"emulator"`` for NumPy inputs, ``"cupy"`` for CuPy inputs.
    out : tuple of two ndarrays, optional
        Buffers ``(matrix, vector)`` of shapes (N, P, P) and (N, P), float64.

    Returns
    -------
    matrix : ndarray of shape (N, P, P), float64
        ``M[n, a, b] = sum_q w[n, q] c_a[n, q] c_b[n, q]``, exactly symmetric;
        ``P = n_basis + with_background``.
    vector : ndarray of shape (N, P), float64
        ``b[n, a] = sum_q w[n, q] c_a[n, q] y[n, q]``.

    Raises
    ------
    ValueError
        On inconsistent shapes, ``P + 2`` above :data:`NORMAL_EQUATIONS_SHARED_DOUBLES`
        or wrong ``out`` shapes.

    Notes
    -----
    Sums are accumulated in double whatever the input dtype; they equal the
    NumPy products to ~1e-15 of ``|C|^T |W| |C|``.
    """
    xp = _array_module(columns, weights, target)
    dtype = _float_dtype(columns, weights, target)
    columns = _prepare(xp, columns, dtype, 3, "columns")
    target = _prepare(xp, target, dtype, 2, "target")
    n, n_basis, n_pix = columns.shape
    if target.shape != (n, n_pix):
        msg = f"target must have shape {(n, n_pix)} for columns of shape {columns.shape}, got {target.shape}"
        raise ValueError(msg)
    try:
        weights = xp.broadcast_to(xp.asarray(weights, dtype=dtype), target.shape)
    except ValueError:
        msg = f"weights of shape {np.shape(weights)} do not broadcast to the target's {target.shape}"
        raise ValueError(msg) from None
    weights = xp.ascontiguousarray(weights)
    background = int(bool(with_background))
    p = n_basis + background
    if p + 2 > NORMAL_EQUATIONS_SHARED_DOUBLES:
        msg = (f"{p} normal-equation columns exceed gdi_normal_equations' shared tile "
               f"({NORMAL_EQUATIONS_SHARED_DOUBLES} doubles hold at most {NORMAL_EQUATIONS_SHARED_DOUBLES - 2})")
        raise ValueError(msg)
    matrix, vector = (None, None) if out is None else out
    matrix = _output(xp, matrix, (n, p, p), np.float64, "out[0] (matrix)")
    vector = _output(xp, vector, (n, p), np.float64, "out[1] (vector)")
    if n and p:
        grid, block = normal_equations_geometry(n)
        launch(f"gdi_normal_equations<{_CTYPES[dtype]}>", grid, block,
               (columns, weights, target, n, n_basis, n_pix, background, matrix, vector),
               defines=STAMP_FIT_DEFINES, backend=_default_backend(xp, backend))
    return matrix, vector


# ---------------------------------------------------------------------------
# kernel 4: spatial normal equations

def spatial_map_structure(maps):
    """Owner rows and values of the local-parameter maps ``J``.

    Parameters
    ----------
    maps : ndarray of shape (N, P, n_theta)
        :func:`gpudiffim.spatial_fit.local_parameter_maps`; NumPy or CuPy.

    Returns
    -------
    owner : ndarray of shape (n_theta,), int32
        The one row of column ``a`` that is non-zero in some stamp (0 for an
        all-zero column).
    weights : ndarray of shape (N, n_theta), float64
        ``maps[n, owner[a], a]``.

    Raises
    ------
    ValueError
        If a column has non-zero entries in more than one row (in one stamp
        or across stamps): the kernel's sparse product would be wrong.
    """
    xp = _array_module(maps)
    maps = xp.asarray(maps, dtype=np.float64)
    if maps.ndim != 3:
        msg = f"maps must be 3-D (N, P, n_theta), got shape {maps.shape}"
        raise ValueError(msg)
    n, p, n_theta = maps.shape
    used = (maps != 0).any(axis=0)  # (P, n_theta); NaN counts as non-zero
    rows = used.sum(axis=0)
    shared = xp.flatnonzero(rows > 1)
    if shared.size:  # synchronizes! (CuPy: the size of a data-dependent result)
        columns = [int(a) for a in shared[:10].tolist()]
        msg = (f"maps columns {columns} have non-zero entries in more than one row; the spatial kernel "
               f"needs at most one local parameter per unknown (spatial_fit.local_parameter_maps)")
        raise ValueError(msg)
    if p == 0:
        return xp.zeros(n_theta, dtype=np.int32), xp.zeros((n, n_theta))
    owner = used.argmax(axis=0).astype(np.int32)
    weights = xp.ascontiguousarray(maps[:, owner, xp.arange(n_theta)])
    return owner, weights


def spatial_normal_equations(normal_matrices, normal_vectors, maps, *, backend=None, out=None):
    """Spatial normal equations ``M = sum J^T Q J``, ``b = sum J^T w`` (``gdi_spatial_normal_equations``).

    Parameters
    ----------
    normal_matrices : ndarray of shape (N, P, P)
        Per-stamp normal matrices ``Q_n``; NumPy or CuPy.
    normal_vectors : ndarray of shape (N, P)
        Per-stamp normal vectors ``w_n``.
    maps : ndarray of shape (N, P, n_theta)
        Local-parameter maps ``J_n`` (:func:`gpudiffim.spatial_fit.local_parameter_maps`),
        at most one non-zero row per column (:func:`spatial_map_structure`).
    backend : {"emulator", "cupy"}, optional
        Default: ``"emulator"`` for NumPy inputs, ``"cupy"`` for CuPy inputs.
    out : tuple of two ndarrays, optional
        Buffers ``(matrix, vector)`` of shapes (n_theta, n_theta) and (n_theta,), float64.

    Returns
    -------
    matrix : ndarray of shape (n_theta, n_theta), float64
        ``sum_n J_n^T (Q_n + Q_n^T) / 2 J_n``, exactly symmetric.
    vector : ndarray of shape (n_theta,), float64
        ``sum_n J_n^T w_n``.

    Raises
    ------
    ValueError
        On inconsistent shapes, maps that are not one-row-per-column, or wrong
        ``out`` shapes.
    """
    xp = _array_module(normal_matrices, normal_vectors, maps)
    maps = xp.asarray(maps, dtype=np.float64)
    if maps.ndim != 3:
        msg = f"maps must be 3-D (N, P, n_theta), got shape {maps.shape}"
        raise ValueError(msg)
    n, p, n_theta = maps.shape
    if normal_matrices.shape != (n, p, p) or normal_vectors.shape != (n, p):
        msg = (f"normal_matrices {normal_matrices.shape} and normal_vectors {normal_vectors.shape} do not "
               f"match maps {maps.shape}: expected {(n, p, p)} and {(n, p)}")
        raise ValueError(msg)
    owner, weights = spatial_map_structure(maps)
    return spatial_normal_equations_structured(normal_matrices, normal_vectors, owner, weights,
                                               backend=backend, out=out)


def spatial_normal_equations_structured(normal_matrices, normal_vectors, owner, weights, *, backend=None,
                                        out=None):
    """:func:`spatial_normal_equations` from the map structure (no dense ``J``).

    Parameters
    ----------
    normal_matrices : ndarray of shape (N, P, P)
    normal_vectors : ndarray of shape (N, P)
    owner : ndarray of int, shape (n_theta,)
        Local parameter (row of ``J``) of each unknown.
    weights : ndarray of shape (N, n_theta)
        ``J_n[owner[a], a]``.
    backend, out
        As :func:`spatial_normal_equations`.
    """
    xp = _array_module(normal_matrices, normal_vectors, weights)
    normal_matrices = _prepare(xp, normal_matrices, np.float64, 3, "normal_matrices")
    normal_vectors = _prepare(xp, normal_vectors, np.float64, 2, "normal_vectors")
    n, p = normal_vectors.shape
    owner = xp.ascontiguousarray(xp.asarray(owner), dtype=np.int32)
    weights = _prepare(xp, weights, np.float64, 2, "weights")
    n_theta = owner.shape[0]
    if normal_matrices.shape != (n, p, p) or weights.shape != (n, n_theta):
        msg = (f"normal_matrices {normal_matrices.shape}, normal_vectors {normal_vectors.shape} and weights "
               f"{weights.shape} do not match: expected {(n, p, p)} and {(n, n_theta)}")
        raise ValueError(msg)
    if n_theta and p and not (0 <= int(owner.min()) and int(owner.max()) < p):
        msg = f"owner rows must lie in [0, {p}), got [{int(owner.min())}, {int(owner.max())}]"
        raise ValueError(msg)
    matrix, vector = (None, None) if out is None else out
    matrix = _output(xp, matrix, (n_theta, n_theta), np.float64, "out[0] (matrix)")
    vector = _output(xp, vector, (n_theta,), np.float64, "out[1] (vector)")
    if n_theta and p == 0:
        matrix[...] = 0.0  # no local parameter: every column of J is zero
        vector[...] = 0.0
    elif n_theta:
        grid, block = spatial_normal_equations_geometry(n_theta)
        launch("gdi_spatial_normal_equations", grid, block,
               (normal_matrices, normal_vectors, owner, weights, n, p, n_theta, matrix, vector),
               backend=_default_backend(xp, backend))
    return matrix, vector
