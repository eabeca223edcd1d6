"""Launch geometry and host wrapper of ``kernels/residual_moments.cu``."""

import numpy as np

from .._backend import to_host
from ..statistics import core_slice, statistics_of_sums
from ._host import on_launcher, prepare
from .launch import launch
from .signatures import float_ctype

__all__ = ["RESIDUAL_MOMENTS_DEFINES", "RESIDUAL_MOMENTS_THREADS", "STAMP_RESIDUALS_MAX_TAPS",
           "residual_moments_geometry", "residual_moments", "residual_sums", "stamp_residuals"]

#: Threads per block of ``gdi_residual_moments`` (``GDI_RM_THREADS`` in the source).
RESIDUAL_MOMENTS_THREADS = 128
#: Largest kernel of ``gdi_stamp_residuals`` (taps staged in shared memory; ``GDI_SR_MAX_TAPS``).
STAMP_RESIDUALS_MAX_TAPS = 4096
#: The unit's compile-time constants (one module for both kernels).
RESIDUAL_MOMENTS_DEFINES = (("GDI_RM_THREADS", RESIDUAL_MOMENTS_THREADS),
                            ("GDI_SR_MAX_TAPS", STAMP_RESIDUALS_MAX_TAPS))


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
               defines=RESIDUAL_MOMENTS_DEFINES)
    return out


def stamp_residuals(stamps, kernels, background, bad_bits, core_radius=None, *, rows=False):
    """Residual sums of a batch's difference stamps, and optionally their D/sigma rows (``gdi_stamp_residuals``).

    The fused kernel-path form of :func:`gpudiffim.stamps.difference_stamps`
    followed by :func:`residual_sums`: nothing but the sums (and the rows)
    is written.

    Parameters
    ----------
    stamps : sequence of 6 ndarray
        ``(template, science, template_variance, science_variance,
        template_mask, science_mask)`` of a :class:`~gpudiffim.stamps.StampBatch`:
        (N, S, S) float64 and int32 (converted if needed).
    kernels : ndarray of shape (N, kw, kw)
    background : ndarray of shape (N,)
    bad_bits : int
    core_radius : int, optional
        Sums over the central ``(2r+1)^2`` pixels of the fit region only.
    rows : bool
        Also return every stamp's D/sigma over its fit region, NaN where unusable.

    Returns
    -------
    sums : ndarray of shape (N, 3)
        float64 count, sum z, sum z^2, in the stamps' array module.
    z : ndarray of shape (N, F*F)
        With ``rows`` only.
    """
    template, science, template_variance, science_variance, template_mask, science_mask = stamps
    _, xp = on_launcher(template, kernels)
    planes = [prepare(xp, a, np.float64, 3, name) for a, name in
              ((template, "template"), (template_variance, "template_variance"))]
    planes.append(prepare(xp, template_mask, np.int32, 3, "template_mask"))
    planes += [prepare(xp, a, np.float64, 3, name) for a, name in
               ((science, "science"), (science_variance, "science_variance"))]
    planes.append(prepare(xp, science_mask, np.int32, 3, "science_mask"))
    kernels = prepare(xp, kernels, np.float64, 3, "kernels")
    background = prepare(xp, background, np.float64, 1, "background")
    n, s, _ = template.shape
    kw = kernels.shape[-1]
    if kernels.shape != (n, kw, kw) or kw > s or kw * kw > STAMP_RESIDUALS_MAX_TAPS:
        msg = f"kernels {kernels.shape} must be (N, kw, kw) with kw <= {s} and kw^2 <= {STAMP_RESIDUALS_MAX_TAPS}"
        raise ValueError(msg)
    f = s - kw + 1
    window = (slice(0, f), slice(0, f)) if core_radius is None else (core_slice(f, core_radius),) * 2
    sums = xp.full((n, 3), np.nan)
    z = xp.empty((n, f * f)) if rows else sums   # not written without rows
    if n:
        launch("gdi_stamp_residuals", (n,), (RESIDUAL_MOMENTS_THREADS,),
               (*planes[:3], *planes[3:], kernels, background, n, s, kw, int(bad_bits),
                window[0].start, window[0].stop, window[1].start, window[1].stop, int(bool(rows)), np.nan,
                sums, z),
               defines=RESIDUAL_MOMENTS_DEFINES)
    return (sums, z) if rows else sums
