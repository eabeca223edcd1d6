"""Launch geometry and host wrapper of ``kernels/delta_function.cu``.

Issue 13's kernel, the kernel-path twin of
:func:`gpudiffim.delta_function.delta_function_normal_equations`: the normal
equations of delta-function stamp fits with one weight per stamp, formed from
the template and science stamps without a design matrix.

The wrapper takes NumPy arrays (run by the CPU emulator) or CuPy arrays (run
on the GPU), as :func:`~gpudiffim._cuda.launch.launcher_for` says; outputs are
allocated in the inputs' array module.
"""

import numpy as np

from ._host import on_launcher, output, prepare
from .launch import launch

__all__ = ["DELTA_FUNCTION_DEFINES", "DELTA_FUNCTION_SHARED_DOUBLES", "DELTA_FUNCTION_STRIP", "DELTA_FUNCTION_THREADS",
           "normal_equations", "normal_equations_geometry"]

#: Threads per block of ``gdi_delta_function_normal_equations`` (any count works).
DELTA_FUNCTION_THREADS = 128
#: Doubles of its shared stage (``GDI_DF_SHARED_DOUBLES``, 32 KiB): the template stamp and the
#: science fit region, ``S^2 + F^2`` of them.
DELTA_FUNCTION_SHARED_DOUBLES = 4096
#: Entries of a kernel row each thread forms at once (``GDI_DF_RX``).
DELTA_FUNCTION_STRIP = 4
#: Compile-time constants of ``kernels/delta_function.cu``.
DELTA_FUNCTION_DEFINES = (("GDI_DF_SHARED_DOUBLES", DELTA_FUNCTION_SHARED_DOUBLES),
                          ("GDI_DF_RX", DELTA_FUNCTION_STRIP))

_MAX_GRID_Y = 65535


def normal_equations_geometry(n_stamps, kernel_width):
    """``(grid, block)`` of ``gdi_delta_function_normal_equations``.

    Block ``(n, q)``: stamp ``n`` and, for ``q < K (K + 1) / 2``, the kernel
    rows ``(r, r')``, ``r <= r'``, of pair ``q``; ``q = K (K + 1) / 2`` forms
    the vector and the background column.

    Raises
    ------
    ValueError
        If the pairs of kernel rows exceed the grid's y limit (65535: ``K`` above 360).
    """
    pairs = int(kernel_width) * (int(kernel_width) + 1) // 2
    if pairs + 1 > _MAX_GRID_Y:
        msg = f"gdi_delta_function_normal_equations takes kernels up to 360 wide, got {kernel_width}"
        raise ValueError(msg)
    return (max(int(n_stamps), 1), pairs + 1), (DELTA_FUNCTION_THREADS,)


def normal_equations(template, science, weights, kernel_width, with_background, *, out=None):
    """Normal equations of delta-function stamp fits (``gdi_delta_function_normal_equations``).

    Parameters
    ----------
    template, science : ndarray of shape (N, S, S)
        Template and science stamps (float64; converted if needed); NumPy or CuPy.
    weights : ndarray of N elements
        One weight per stamp (``1 / variance``), read as is.
    kernel_width : int
        ``K``, the delta-function kernel's width (px); ``F = S - K + 1``.
    with_background : bool or int
        Add the background's column of ones (the last unknown).
    out : tuple of two ndarrays, optional
        Buffers ``(matrix, vector)`` of shapes (N, P, P) and (N, P), float64.

    Returns
    -------
    matrix : ndarray of shape (N, P, P), float64
        ``M[n, (r, c), (r', c')] = w_n sum_{y, x < F} T(y + r, x + c) T(y + r', x + c')`` and
        the background's column, exactly symmetric; ``P = K^2 + with_background``.
    vector : ndarray of shape (N, P), float64
        ``b[n, (r, c)] = w_n sum_{y, x < F} T(y + r, x + c) I(y + h, x + h)`` (``h = K // 2``).

    Raises
    ------
    ValueError
        On stamps of different or non-square shapes, a kernel wider than the
        stamps, ``S^2 + F^2`` above :data:`DELTA_FUNCTION_SHARED_DOUBLES`, the
        wrong number of weights or wrong ``out`` shapes.

    Notes
    -----
    Sums are accumulated in double, in another order than the reference's
    products: they agree to ~1e-15 of the sums of absolute terms.
    """
    _, xp = on_launcher(template, science, weights)
    template = prepare(xp, template, np.float64, 3, "template")
    science = prepare(xp, science, np.float64, 3, "science")
    weights = prepare(xp, weights, np.float64, weights.ndim, "weights")
    n, size, width = template.shape
    k = int(kernel_width)
    fit = size - k + 1
    if science.shape != template.shape or size != width or weights.size != n:
        msg = (f"template and science stamps must be square and of one shape, with one weight each; got "
               f"{template.shape}, {science.shape} and {weights.size} weights")
        raise ValueError(msg)
    if not 1 <= k <= size or size * size + fit * fit > DELTA_FUNCTION_SHARED_DOUBLES:
        msg = (f"a {k} px kernel on {size} px stamps needs 1 <= K <= S and S^2 + F^2 <= "
               f"{DELTA_FUNCTION_SHARED_DOUBLES} (the kernel's shared stage)")
        raise ValueError(msg)
    p = k * k + int(bool(with_background))
    matrix, vector = (None, None) if out is None else out
    matrix = output(xp, matrix, (n, p, p), np.float64, "out[0] (matrix)")
    vector = output(xp, vector, (n, p), np.float64, "out[1] (vector)")
    if n:
        grid, block = normal_equations_geometry(n, k)
        launch("gdi_delta_function_normal_equations", grid, block,
               (template, science, weights, n, size, k, int(bool(with_background)), matrix, vector),
               defines=DELTA_FUNCTION_DEFINES)
    return matrix, vector
