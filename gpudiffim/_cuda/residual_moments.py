"""Launch geometry and host wrapper of ``kernels/residual_moments.cu``."""

import numpy as np

from .._backend import to_host
from ..statistics import core_slice, statistics_of_sums
from ._host import on_launcher
from .launch import launch
from .signatures import float_ctype

__all__ = ["RESIDUAL_MOMENTS_THREADS", "residual_moments_geometry", "residual_moments", "residual_sums"]

#: Threads per block of ``gdi_residual_moments`` (``GDI_RM_THREADS`` in the source).
RESIDUAL_MOMENTS_THREADS = 128


def residual_moments_geometry(n_stamps):
    """``(grid, block)`` of ``gdi_residual_moments``: one block per stamp."""
    return (max(int(n_stamps), 1),), (RESIDUAL_MOMENTS_THREADS,)


def residual_moments(difference, variance, mask, bad_bits, core_radius=None, *, out=None):
    """:func:`gpudiffim.statistics.residual_statistics` through the ``residual_moments`` kernel.

    ``difference`` and ``variance`` are (N, H, W) float32 or float64 arrays
    of one dtype, ``mask`` an int32 array of the same shape; NumPy arrays run
    on the emulator, CuPy arrays on CuPy
    (:func:`~gpudiffim._cuda.launch.launcher_for`).  ``out``, if given, is the (N, 3)
    float64 buffer of the sums (count, sum z, sum z^2), written by the kernel.

    Returns
    -------
    ResidualStatistics
        Finished on the host by :func:`~gpudiffim.statistics.statistics_of_sums`.
    """
    return statistics_of_sums(to_host(residual_sums(difference, variance, mask, bad_bits, core_radius, out=out)))


def residual_sums(difference, variance, mask, bad_bits, core_radius=None, *, out=None):
    """The kernel's (N, 3) float64 sums (count, sum z, sum z^2), where the arrays live (no read-back).

    Parameters as :func:`residual_moments`.
    """
    n, ny, nx = difference.shape
    if variance.shape != difference.shape or mask.shape != difference.shape:
        msg = f"difference, variance and mask shapes differ: {difference.shape}, {variance.shape}, {mask.shape}"
        raise ValueError(msg)
    ctype = float_ctype("difference", difference.dtype)
    if core_radius is None:
        rows, cols = slice(0, ny), slice(0, nx)
    else:
        rows, cols = core_slice(ny, core_radius), core_slice(nx, core_radius)
    if out is None:
        _, xp = on_launcher(difference)
        out = xp.full((n, 3), np.nan)
    if n:
        grid, block = residual_moments_geometry(n)
        launch(f"gdi_residual_moments<{ctype}>", grid, block,
               (difference, variance, mask, int(bad_bits), n, ny, nx, rows.start, rows.stop, cols.start, cols.stop,
                out),
               defines=(("GDI_RM_THREADS", RESIDUAL_MOMENTS_THREADS),))
    return out
