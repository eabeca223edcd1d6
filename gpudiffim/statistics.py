"""Residual statistics of candidate difference stamps, and afw-style clipping.

:func:`residual_statistics` is ``ip_diffim``'s ``ImageStatistics`` batched over
candidates: for each stamp, over the usable pixels (no bad mask bit, finite
positive variance, finite D; :func:`usable_normalised_residual`, the one
definition the quality report and the figures share), ``z = D / sqrt(V)``,
``mean = sum(z)/n`` and ``rms = sqrt((sum(z^2)/n - mean^2) n/(n-1))``.

:func:`clipped_mean_std` is ``afw``'s MEANCLIP / STDEVCLIP with the default
StatisticsControl (3 sigma, 3 iterations), used by kernel-sum clipping.
"""

from dataclasses import dataclass

import numpy as np

from ._backend import array_module_of

__all__ = ["ResidualStatistics", "usable_normalised_residual", "residual_statistics", "moments_to_statistics",
           "clipped_mean_std", "core_slice", "iqr_sigma", "mad_sigma"]

#: Ratio of the standard deviation to the interquartile range of a Gaussian.
_IQR_TO_SIGMA = 0.741301109
#: Ratio of the standard deviation to the median absolute deviation of a Gaussian.
_MAD_TO_SIGMA = 1.4826


def iqr_sigma(values):
    """Gaussian-equivalent standard deviation from the interquartile range.

    Quartiles use linear interpolation at ``p (n - 1)`` (as ``afw``).
    ``values`` may be a NumPy or a CuPy array (the quartiles are taken where
    they live).
    """
    xp = array_module_of(values)
    q1, q3 = (float(q) for q in xp.quantile(xp.asarray(values, dtype=np.float64), xp.asarray([0.25, 0.75])))
    return _IQR_TO_SIGMA * (q3 - q1)


def mad_sigma(values):
    """Gaussian-equivalent standard deviation from the median absolute deviation.

    ``values`` may be a NumPy or a CuPy array (the median is taken where they live).
    """
    xp = array_module_of(values)
    values = xp.asarray(values)
    return _MAD_TO_SIGMA * float(xp.median(xp.abs(values - xp.median(values))))


@dataclass(frozen=True)
class ResidualStatistics:
    """Normalised-residual moments of a batch of stamps.

    Attributes
    ----------
    mean, rms : ndarray of shape (N,)
        Mean and unbiased rms of D/sigma; NaN where fewer than 1 (mean) or 2
        (rms) pixels are usable.
    n_pixels : ndarray of int, shape (N,)
        Pixels used.
    """

    mean: np.ndarray
    rms: np.ndarray
    n_pixels: np.ndarray


def core_slice(size, radius):
    """Slice of the ``(2 radius + 1)`` core of an axis of length ``size``."""
    centre = size // 2
    return slice(max(centre - radius, 0), min(centre + radius + 1, size))


def usable_normalised_residual(difference, variance, mask, bad_bits, *, fill=0.0):
    """``z = D / sigma`` and the pixels where it is usable: the one definition of usable D/sigma.

    A pixel is usable when it has none of ``bad_bits`` in ``mask``, ``V > 0``,
    ``1/V`` finite (computed in the dtype of ``V``; ``V = inf`` gives
    ``z = 0``) and ``D`` finite; there ``z = D sqrt(1/V)``.  The CUDA
    residual-moments kernel (``kernels/residual_moments.cu``) applies the
    same selection and arithmetic.

    Parameters
    ----------
    difference : ndarray
        Difference ``D`` (any shape).
    variance : ndarray
        Variance ``V`` of ``D`` (same shape).
    mask : ndarray of int or int
        Mask of ``D`` (same shape, or a scalar such as 0 for none).
    bad_bits : int
        Pixels with any of these bits are unusable.
    fill : float
        ``z`` at unusable pixels (0 for sums, NaN for samples and figures).

    Returns
    -------
    z : ndarray
        In the dtype of ``D sqrt(1/V)``.
    usable : ndarray of bool

    Examples
    --------
    >>> d, v = np.array([2.0, 1.0, 3.0, np.nan]), np.array([4.0, 0.0, np.inf, 1.0])
    >>> z, usable = usable_normalised_residual(d, v, np.zeros(4, int), 1, fill=np.nan)
    >>> z.tolist(), usable.tolist()
    ([1.0, nan, 0.0, nan], [True, False, True, False])
    """
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):  # unusable pixels are discarded
        inverse = 1.0 / variance
        usable = ((mask & bad_bits) == 0) & np.isfinite(inverse) & (variance > 0) & np.isfinite(difference)
        z = np.where(usable, difference * np.sqrt(np.where(usable, inverse, 0.0)), fill)
    return z, usable


def residual_statistics(difference, variance, mask, bad_bits, core_radius=None):
    """Mean, rms and pixel count of D/sigma for a stack of stamps.

    Parameters
    ----------
    difference : ndarray of shape (N, H, W)
        Difference stamps D.
    variance : ndarray of shape (N, H, W)
        Variance of D.
    mask : ndarray of int, shape (N, H, W)
        Mask of D.
    bad_bits : int
        Pixels with any of these bits are ignored.
    core_radius : int, optional
        If given, use only the central ``(2r+1)^2`` pixels.

    Returns
    -------
    ResidualStatistics
    """
    if core_radius is not None:
        rows = core_slice(difference.shape[1], core_radius)
        cols = core_slice(difference.shape[2], core_radius)
        difference, variance, mask = (a[:, rows, cols] for a in (difference, variance, mask))
    z, good = usable_normalised_residual(difference, variance, mask, bad_bits)
    n = good.sum(axis=(1, 2))
    sum_z = z.sum(axis=(1, 2))
    sum_z2 = (z * z).sum(axis=(1, 2))
    return moments_to_statistics(n, sum_z, sum_z2)


def moments_to_statistics(n, sum_z, sum_z2):
    """Finish :class:`ResidualStatistics` from per-stamp count, sum(z) and sum(z^2).

    Shared by :func:`residual_statistics` and the CUDA residual-moments kernel
    (which returns the three sums), so both finish identically.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = np.where(n > 0, sum_z / n, np.nan)
        var = np.where(n > 1, (sum_z2 / n - mean**2) * n / (n - 1), np.nan)
    return ResidualStatistics(mean=mean, rms=np.sqrt(np.maximum(var, 0.0)), n_pixels=n)


def _quartiles(values):
    """Median and quartiles with linear interpolation at p (n - 1)."""
    q1, median, q3 = np.quantile(values, [0.25, 0.5, 0.75], method="linear")
    return median, q3 - q1


def clipped_mean_std(values, n_sigma=3.0, n_iter=3):
    """``afw`` MEANCLIP and STDEVCLIP of a sample.

    Pass 1 keeps ``|x - median| <= n_sigma * 0.741301109 * IQR``; each later
    pass re-clips the *full* sample with ``|x - mean_prev| <= n_sigma *
    std_prev``.  Mean and unbiased (n - 1) standard deviation of the kept
    values after ``n_iter`` passes are returned.  Non-finite values are
    ignored.

    Parameters
    ----------
    values : array_like
        Sample.
    n_sigma : float
        Clipping threshold in standard deviations.
    n_iter : int
        Number of passes.

    Returns
    -------
    mean, std : float
        For a single value, ``(value, 0.0)``; for none, ``(nan, nan)``.
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    if values.size == 0:
        return np.nan, np.nan
    if values.size == 1:
        return float(values[0]), 0.0
    median, iqr = _quartiles(values)
    centre, half_width = median, n_sigma * _IQR_TO_SIGMA * iqr
    mean = std = np.nan
    for _ in range(n_iter):
        kept = values[np.abs(values - centre) <= half_width]
        if kept.size == 0:
            break
        mean = float(kept.mean())
        std = float(kept.std(ddof=1)) if kept.size > 1 else 0.0
        centre, half_width = mean, n_sigma * std
    return mean, std
