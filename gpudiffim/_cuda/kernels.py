"""Launch geometry and host wrapper of the residual-moments kernel."""

import numpy as np

from .._backend import to_host
from ..statistics import core_slice, moments_to_statistics
from .launch import launch

__all__ = ["RESIDUAL_MOMENTS_THREADS", "residual_moments_geometry", "residual_moments"]

#: Threads per block of ``gdi_residual_moments`` (``GDI_RM_THREADS`` in the source).
RESIDUAL_MOMENTS_THREADS = 128


def residual_moments_geometry(n_stamps):
    """``(grid, block)`` of ``gdi_residual_moments``: one block per stamp."""
    return (max(int(n_stamps), 1),), (RESIDUAL_MOMENTS_THREADS,)


def residual_moments(difference, variance, mask, bad_bits, core_radius=None, *, backend=None, out=None):
    """:func:`gpudiffim.statistics.residual_statistics` through the ``residual_moments`` kernel.

    ``difference`` and ``variance`` are (N, H, W) float32 or float64 arrays
    of one dtype, ``mask`` an int32 array of the same shape; NumPy arrays for
    the emulator, CuPy arrays for CuPy.  ``out``, if given, is the (N, 3)
    float64 buffer of the sums (count, sum z, sum z^2), written by the kernel.

    Returns
    -------
    ResidualStatistics
        Finished on the host by :func:`~gpudiffim.statistics.moments_to_statistics`.
    """
    n, ny, nx = difference.shape
    if variance.shape != difference.shape or mask.shape != difference.shape:
        msg = f"difference, variance and mask shapes differ: {difference.shape}, {variance.shape}, {mask.shape}"
        raise ValueError(msg)
    ctype = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}.get(np.dtype(difference.dtype))
    if ctype is None:
        msg = f"difference must be float32 or float64, got {difference.dtype}"
        raise TypeError(msg)
    if core_radius is None:
        rows, cols = slice(0, ny), slice(0, nx)
    else:
        rows, cols = core_slice(ny, core_radius), core_slice(nx, core_radius)
    if out is None:
        out = np.full((n, 3), np.nan) if isinstance(difference, np.ndarray) else _cupy_full((n, 3))
    if n:
        grid, block = residual_moments_geometry(n)
        launch(f"gdi_residual_moments<{ctype}>", grid, block,
               (difference, variance, mask, int(bad_bits), n, ny, nx, rows.start, rows.stop, cols.start, cols.stop,
                out),
               defines=(("GDI_RM_THREADS", RESIDUAL_MOMENTS_THREADS),), backend=backend)
    sums = to_host(out)
    return moments_to_statistics(sums[:, 0].astype(np.int64), sums[:, 1], sums[:, 2])


def _cupy_full(shape):
    import cupy

    return cupy.full(shape, cupy.nan)
