"""Noise covariance of the convolved image, and the variance of ``T * K`` that follows from it.

Resampled, drizzled or otherwise smoothed images have noise that correlates
between neighbouring pixels.  With ``Cov(T(p), T(q)) = rho(q - p) sqrt(V(p)
V(q))`` (a normalised autocorrelation ``rho`` that is the same over the
image, ``rho(0) = 1``) and ``V`` smooth on the kernel's scale, the matched
image ``M = T * K`` (the ``afw`` correlation ``M(x) = sum_u K(u) T(x + u)``)
has the variance

.. math::

   \\mathrm{Var}\\, M(x) = \\sum_{u, v} K(u) K(v)\\, \\rho(v - u)\\, V(x)
                      = f \\sum_u K(u)^2 V(x + u),
   \\qquad f = \\frac{\\sum_d \\rho(d) A_K(d)}{A_K(0)},

with ``A_K(d) = sum_u K(u) K(u + d)`` the kernel's autocorrelation.
:func:`gpudiffim.apply.convolve_masked_image` propagates the white-noise
variance ``sum K^2 V`` (``f = 1``); a smooth kernel adds neighbouring pixels
almost coherently, so ``f`` approaches ``sum_d rho(d)`` for correlated noise
(about 2 on the JWST NIRCam i2d pair, whose neighbouring pixels correlate at
0.37).

Measurement (:func:`measure_noise_correlation`): on the sky pixels of
:mod:`gpudiffim.variance` (no excluded mask bit, farther than ``grow`` = 4 px
from every pixel beyond ``threshold`` robust sigmas of the background-free
image), with two changes: the sources are found on that image smoothed by a
Gaussian of 1 px (a matched filter, which finds fainter sources) and beyond
4 sigmas, which noise itself rarely reaches.  Cutting the sky at 3 sigmas of
the pixels, as the variance correction does, also cuts out the larger noise
excursions and with them part of the correlation (``sum rho`` 4 % low on
smoothed white noise; unbiased with the matched filter at 4 sigmas).  Then
``z = (I - background) / sqrt(V)`` with its mean removed and ``|z| <``
:data:`CLIP`; ``rho(d) = <z(p) z(p + d)> / <z^2>`` over the pairs of sky
pixels, for ``|dx|, |dy| <= max_lag + PLATEAU_RINGS`` (one zero-padded FFT
product; NumPy or CuPy, wherever the planes live).  The noise is assumed to
be correlated over at most ``max_lag`` px (drizzling and Lanczos resampling
correlate over 1-3 px).  What the correlation holds at ``max_lag + 1`` and
``max_lag + 2`` px -- their median, the *plateau* -- is then large-scale
structure: the error of the binned background, faint sources and extended
light, which are no noise of the image (0.002-0.012 on simulated white-noise
fields with stars, 0.04 on the JWST cluster core); ``rho`` is
``(rho - plateau) / (1 - plateau)`` at the lags up to ``max_lag``.  Large-scale
correlated noise (e.g. 1/f stripes) is therefore not modelled.

Significance: on white noise each ``rho(d)`` scatters by ``1 / sqrt(n_pairs)``
(0.001 over a million sky pixels, 0.005 on a 256^2 image), and ``f`` would sum
that over up to 48 lags.  The correlation is used only when the chi-square of
the 24 independent lags (``rho(-d) = rho(d)``), each with the variance
``1 / n_pairs + SYSTEMATIC^2``, exceeds what white noise exceeds with
probability :data:`FALSE_ALARM`; otherwise ``f`` is exactly 1 and the variance
is left as it is.  :data:`SYSTEMATIC` (0.002) is what the plateau leaves of the
structure on simulated white-noise fields with stars.  Above the threshold
every measured lag is used (a per-lag cut would bias ``f`` low).

Application (:func:`correct_matched_variance`): ``f`` is evaluated for the
kernel at each pixel, exactly: with ``K(x, y) = sum_t P_t(x, y) K_t``, the
numerator and denominator of ``f`` are quadratic forms in the spatial terms
``P_t`` (the cross-correlations of the term kernels ``K_t`` weighted by
``rho``), one matrix product each on the pixel grid; a spatially constant
kernel has one ``f``.  No interpolation enters (on simulated pairs with a
fitted first-order kernel ``f`` varied by a factor 2-3 from the centre to the
corners, and a 5 x 5 grid interpolated bilinearly was off by up to 6 %).
The errors are those of ``rho`` (:meth:`NoiseCorrelation.factor_error`) and of
the assumptions above (``V`` smooth on the kernel's scale, noise correlated
over at most ``max_lag`` px and the same over the image).

Conventions: arrays are ``[row, column] = [y, x]``; ``rho[L + dy, L + dx]``
is the correlation of pixel ``(x, y)`` with ``(x + dx, y + dy)`` (symmetric
under ``d -> -d``); kernel images use the ``afw`` layout ``K[h + v, h + u]``.
The small results (``rho``, ``f``) are host NumPy values and floats.
"""

import logging
from dataclasses import dataclass

import numpy as np
import scipy.fft
import scipy.special

from ._backend import array_module_of, fft_functions, is_device_array, ndimage_of, to_host
from .errors import ConfigurationError
from ._ops import operations_for
from .variance import AUTO_SCALE_MIN, MAX_PIXELS, sky_pixels, sky_residual

__all__ = ["FALSE_ALARM", "MatchedVarianceCorrection", "NoiseCorrelation", "correct_matched_variance",
           "kernel_autocorrelation", "measure_noise_correlation"]

log = logging.getLogger(__name__)

#: Probability that white noise is declared correlated (chi-square of the independent lags).
FALSE_ALARM = 1.0e-6
#: Systematic error of one measured ``rho(d)`` (structure the plateau leaves), added in quadrature.
SYSTEMATIC = 0.002
#: Rings of lags (Chebyshev distance) beyond ``max_lag`` whose median correlation is the plateau.
PLATEAU_RINGS = 2
#: Normalised sky values beyond this many sigmas are left out (artefacts, missed sources).
CLIP = 6.0


@dataclass(frozen=True, eq=False)
class NoiseCorrelation:
    """Normalised noise autocorrelation measured on an image's sky pixels.

    Attributes
    ----------
    rho : ndarray of float64, shape (2 L + 1, 2 L + 1)
        ``rho[L + dy, L + dx]``: correlation of the normalised noise
        ``(I - background) / sqrt(V)`` at the pixel offset ``(dx, dy)``, the
        plateau removed; ``rho[L, L] = 1``, symmetric under ``d -> -d``.  As
        measured, also when not significant (all zero but the centre when
        not measured).
    standard_error : float
        Standard error of one ``rho(d)`` of white noise,
        ``sqrt(1 / n_pairs + SYSTEMATIC^2)`` at the lag with the most pairs.
    chi2 : float
        ``sum rho(d)^2 / (1 / n_pairs(d) + SYSTEMATIC^2)`` over the independent
        lags (one of each ``+-d``).
    dof : int
        Number of independent lags, ``((2 L + 1)^2 - 1) / 2``.
    significant : bool
        ``chi2`` is beyond what white noise exceeds with probability
        :data:`FALSE_ALARM`; only then does ``rho`` change a variance.
    n_pixels : int
        Sky pixels the products were taken over.
    plateau : float
        Median correlation at ``L + 1`` and ``L + 2`` px, removed from ``rho``
        (large-scale structure, see the module notes).
    """

    rho: np.ndarray
    standard_error: float
    chi2: float
    dof: int
    significant: bool
    n_pixels: int
    plateau: float = 0.0

    def __post_init__(self):
        rho = np.array(self.rho, dtype=np.float64)
        rho.flags.writeable = False
        object.__setattr__(self, "rho", rho)

    @property
    def max_lag(self):
        """Largest lag ``L`` (px) along each axis."""
        return self.rho.shape[0] // 2

    def variance_factor(self, kernel_image):
        """``f = sum_d rho(d) A_K(d) / A_K(0)`` for one kernel image; 1.0 when not significant.

        Parameters
        ----------
        kernel_image : ndarray of shape (kh, kw)
            ``afw`` layout.

        Returns
        -------
        float
            The variance of ``T * K`` over the white-noise ``sum K^2 V``.
        """
        if not self.significant:
            return 1.0
        autocorrelation = kernel_autocorrelation(kernel_image, self.max_lag)
        return float(np.sum(self.rho * autocorrelation) / autocorrelation[self.max_lag, self.max_lag])

    def factor_error(self, kernel_image):
        """Standard error of :meth:`variance_factor` from the scatter of ``rho``.

        ``2 standard_error sqrt(sum_d w(d)^2)`` over the independent lags,
        ``w = A_K(d) / A_K(0)``: exact for white noise, about right for
        weakly correlated noise.
        """
        autocorrelation = kernel_autocorrelation(kernel_image, self.max_lag)
        weights = (autocorrelation / autocorrelation[self.max_lag, self.max_lag]).ravel()
        return float(2.0 * self.standard_error * np.sqrt(np.sum(weights[: weights.size // 2] ** 2)))

    def describe(self):
        """One phrase for logs: the nearest lags, the sum, significance, plateau and sample."""
        lag = self.max_lag
        state = "significant" if self.significant else "not significant"
        return (f"rho(1,0) {self.rho[lag, lag + 1]:.3f}, rho(0,1) {self.rho[lag + 1, lag]:.3f}, sum "
                f"{self.rho.sum():.3f}, {state} (chi2 {self.chi2:.3g} for {self.dof} lags; plateau "
                f"{self.plateau:.3f} removed; {self.n_pixels} sky px)")


@dataclass(frozen=True, eq=False)
class MatchedVarianceCorrection:
    """What :func:`correct_matched_variance` did to the matched image's variance.

    Attributes
    ----------
    correlation : NoiseCorrelation
        The measurement on the image that was convolved.
    factor : float
        ``f`` at the image centre (1.0 when the correlation is not significant).
    factor_range : tuple of float
        Smallest and largest ``f`` applied (over the pixels away from the EDGE).
    factor_error : float
        Standard error of ``factor`` from the scatter of ``rho``
        (:meth:`NoiseCorrelation.factor_error`).
    applied : {"none", "constant", "map"}
        Nothing (not significant); ``factor`` everywhere (spatially constant
        kernel); or ``f`` of the kernel at each pixel (spatially varying).
    """

    correlation: NoiseCorrelation
    factor: float
    factor_range: tuple
    factor_error: float
    applied: str

    def describe(self):
        """One phrase for logs."""
        if self.applied == "none":
            return f"variance unchanged ({self.correlation.describe()})"
        where = (f"{self.factor_range[0]:.4g}-{self.factor_range[1]:.4g} over the image"
                 if self.applied == "map" else "constant")
        return (f"variance x {self.factor:.4g} +- {self.factor_error:.2g} at the centre, {where} "
                f"({self.correlation.describe()})")


def kernel_autocorrelation(kernel_image, max_lag):
    """``A_K(d) = sum_u K(u) K(u + d)`` for ``|dx|, |dy| <= max_lag``.

    Parameters
    ----------
    kernel_image : ndarray of shape (kh, kw)
    max_lag : int

    Returns
    -------
    ndarray of float64, shape (2 max_lag + 1, 2 max_lag + 1)
        ``[max_lag + dy, max_lag + dx]``; symmetric, ``A_K(0) = sum K^2``.

    Examples
    --------
    >>> import numpy as np
    >>> kernel_autocorrelation(np.array([[0, 0, 0], [0, 0.5, 0.5], [0, 0, 0]]), 1)
    array([[0.  , 0.  , 0.  ],
           [0.25, 0.5 , 0.25],
           [0.  , 0.  , 0.  ]])
    """
    return _cross_correlations(np.asarray(kernel_image, dtype=np.float64)[None], max_lag)[0, 0]


def _correlations(planes, far):
    """``sum_p a(p) a(p + d)`` of each plane of ``planes`` (P, R, C), circular over a padded grid.

    One zero-padded FFT product of the stack (``scipy.fft`` on the host,
    batched cuFFT for CuPy arrays); the padding by ``far`` keeps wrapped
    pairs out of the lags up to ``far`` (read with
    :func:`~gpudiffim.statistics.near_lags`).
    """
    fft = fft_functions(array_module_of(planes))
    rows, columns = planes.shape[-2:]
    shape = (scipy.fft.next_fast_len(rows + far, real=True),
             scipy.fft.next_fast_len(columns + far, real=True))
    transform = fft["rfft2"](planes, s=shape)
    return fft["irfft2"](transform * transform.conj(), s=shape)


def _products_and_pairs(planes, sums, far):
    """Host ``(products, pairs, n_sky)``: the autocorrelations of the sky values and weights (``planes``)
    for ``|dx|, |dy| <= far``, read back with the sums (the sky count last) in one transfer.  The two planes
    are transformed as one stack on the GPU, one after the other on the host (less memory at once)."""
    ops = operations_for(planes)
    xp = array_module_of(planes)
    if is_device_array(planes):
        numbers = ops.correlation_near(_correlations(planes, far), far, sums)
    else:
        near = [ops.correlation_near(_correlations(planes[p:p + 1], far), far, sums[:0]) for p in (0, 1)]
        numbers = xp.concatenate([*near, sums])
    numbers = np.asarray(to_host(numbers), dtype=np.float64)
    size = 2 * far + 1
    products, pairs = numbers[:2 * size * size].reshape(2, size, size)
    return products, np.rint(pairs), int(numbers[-1])


def _sky_planes(sky, smoothing, threshold, grow, gap):
    """The noise-correlation planes (2, rows, N) of a :class:`~gpudiffim.variance.SkyResidual`, and their sums.

    Plane 0 holds the sky values ``z = (I - background) / sqrt(V)``, their
    mean removed and 0 off the sky, plane 1 the 0/1 weights
    (:func:`gpudiffim.statistics.sky_value_planes`).  The bands of
    :func:`gpudiffim.variance.sampled_stack` are prepared together, each
    with margins for its background and source masks, so that large images
    cost what ``max_pixels`` pixels cost; their own rows are then placed one
    above the other with ``gap`` rows of weight 0 after each (the margins
    count as off the sky).  ``sums`` (sum of the values, sky pixels) stays
    where the planes live: the count comes back with the products.
    """
    sample, residual, exclude = sky.sample, sky.residual, sky.exclude
    xp = array_module_of(residual)
    ops = operations_for(residual)
    detection = xp.where(xp.isfinite(residual) > exclude, residual, 0.0)   # 0 where excluded or not finite
    if smoothing > 0:   # within each band: the 1-D passes of a 2-D Gaussian filter, rows then columns
        detection = ndimage_of(detection).gaussian_filter(detection, (0, smoothing, smoothing))
    selected = sky_pixels(sample, detection, threshold, grow, exclude)
    planes = ops.sky_value_planes(residual, sample.variance, selected, sample.own_rows, gap, CLIP)
    sums = planes.sum(axis=(1, 2))
    return ops.subtract_sky_mean(planes, sums), sums


def measure_noise_correlation(masked_image, *, max_lag=3, smoothing=1.0, threshold=4.0, grow=4,
                              bin_size=32, false_alarm=FALSE_ALARM, max_pixels=MAX_PIXELS, sky=None):
    """Normalised autocorrelation ``rho(dx, dy)`` of the noise on the sky pixels.

    Parameters
    ----------
    masked_image : MaskedImage
        NumPy or CuPy planes; the variance plane normalises the pixels, so a
        noise level that varies over the image does not read as correlation.
    max_lag : int
        Largest ``|dx|`` and ``|dy|`` (px) over which the noise correlates.
    smoothing, threshold, grow : float, float, int
        Sky pixels: farther than ``grow`` px from every pixel beyond
        ``threshold`` robust sigmas of the background-free image smoothed by
        a Gaussian of ``smoothing`` px (the selection of
        :func:`gpudiffim.variance.correct_variance`, on a matched-filter
        image; see the module notes).
    bin_size : int
        Bin size (px) of the background removed first.
    false_alarm : float
        Probability that white noise is declared correlated.
    max_pixels : int
        Larger images are sampled in evenly spaced bands of :data:`BAND_ROWS`
        rows totalling about this many pixels (a million sky pixels measure
        ``rho`` to about 0.001).
    sky : SkyResidual, optional
        :func:`gpudiffim.variance.sky_residual` of ``masked_image`` (its image
        plane) with ``bin_size`` and ``max_pixels``, made by the variance
        correction; made here if None.

    Returns
    -------
    NoiseCorrelation
        Not significant (white) also when fewer than 100 sky pixels are left,
        or when the sky varies less than half as much as the variance plane
        says (noise-free or smoothed images: no noise to measure).

    Raises
    ------
    ConfigurationError
        If ``max_lag`` is not a positive integer.

    Examples
    --------
    White noise averaged over 2 x 2 pixels correlates at 1/2 with its neighbours and at 1/4
    diagonally; a 3 x 3 box kernel then makes ``T * K`` (5/3)^2 = 2.8 x noisier than
    ``sum K^2 V``:

    >>> import numpy as np
    >>> from scipy import ndimage
    >>> from gpudiffim import MaskedImage
    >>> noise = ndimage.uniform_filter(np.random.default_rng(0).normal(size=(256, 256)), 2, mode="wrap")
    >>> correlation = measure_noise_correlation(MaskedImage(noise, variance=np.full(noise.shape, 0.25)))
    >>> correlation.significant
    True
    >>> expected = [[0.25, 0.5, 0.25], [0.5, 1.0, 0.5], [0.25, 0.5, 0.25]]
    >>> bool(np.allclose(correlation.rho[2:5, 2:5], expected, atol=0.02))
    True
    >>> round(correlation.variance_factor(np.full((3, 3), 1 / 9)), 1)
    2.8
    """
    if isinstance(max_lag, bool) or not isinstance(max_lag, (int, np.integer)) or max_lag < 1:
        msg = f"max_lag must be a positive integer, got {max_lag!r}"
        raise ConfigurationError(msg)
    lag, far = int(max_lag), int(max_lag) + PLATEAU_RINGS
    size = 2 * lag + 1
    dof = (size * size - 1) // 2
    white = np.zeros((size, size))
    white[lag, lag] = 1.0
    sky = (sky_residual(masked_image, bin_size, max_pixels) if sky is None
           else sky.check(masked_image, bin_size))
    products, pairs, n_sky = _products_and_pairs(*_sky_planes(sky, smoothing, threshold, grow, far), far)
    if n_sky < 100:
        log.warning("only %d sky pixels: noise correlation not measured (taken as white)", n_sky)
        return NoiseCorrelation(white, float("inf"), 0.0, dof, False, n_sky)
    zero_lag = products[far, far] / n_sky
    if zero_lag < AUTO_SCALE_MIN:
        log.warning("sky pixels vary %.3g x less than their variance plane says (noise-free or smoothed "
                    "image?): noise correlation not measured (taken as white)", zero_lag)
        return NoiseCorrelation(white, float("inf"), 0.0, dof, False, n_sky)
    measured = np.divide(products, pairs, out=np.zeros_like(products), where=pairs > 0) / zero_lag
    ring = np.maximum(*np.abs(np.mgrid[-far:far + 1, -far:far + 1]))
    plateau = float(np.median(measured[(ring > lag) & (pairs > 0)]))
    inner = np.s_[far - lag:far + lag + 1, far - lag:far + lag + 1]
    rho = (measured[inner] - plateau) / (1.0 - plateau)
    rho[lag, lag] = 1.0
    counts = pairs[inner]
    independent = (np.arange(size * size) < size * size // 2).reshape(size, size) & (counts > 0)
    variance = 1.0 / np.where(counts > 0, counts, np.inf) + SYSTEMATIC**2
    chi2 = float(np.sum(rho[independent] ** 2 / variance[independent]))
    # scipy.stats.chi2.isf is scipy.special.chdtri (the same value) behind ~50 us of argument handling
    significant = bool(chi2 > scipy.special.chdtri(int(np.count_nonzero(independent)), false_alarm))
    standard_error = float(np.sqrt(variance[independent].min())) if independent.any() else float("inf")
    return NoiseCorrelation(rho, standard_error, chi2, dof, significant, n_sky, plateau)


def _cross_correlations(kernels, max_lag):
    """``C[t, t', dy, dx] = sum_u K_t(u) K_t'(u + d)`` for ``|dx|, |dy| <= max_lag``.

    ``kernels`` has shape ``(n, kh, kw)``; the result ``(n, n, 2 L + 1, 2 L + 1)``
    is indexed ``[t, t', L + dy, L + dx]``.
    """
    kernels = np.asarray(kernels, dtype=np.float64)
    n, rows, columns = kernels.shape
    padded = np.zeros((n, rows + 2 * max_lag, columns + 2 * max_lag))
    padded[:, max_lag:max_lag + rows, max_lag:max_lag + columns] = kernels
    shifted = np.lib.stride_tricks.sliding_window_view(padded, (rows, columns), axis=(1, 2))  # [s, L+dy, L+dx, i, j]
    return np.tensordot(kernels, shifted, axes=([1, 2], [3, 4]))     # one product for every lag (was 1 a lag)


def _factor_map(correlation, kernel, shape, xy0, xp):
    """``f(x, y)`` of the spatially varying kernel at every pixel, exactly.

    With ``K(x, y) = sum_t P_t(x, y) K_t``, both ``sum_d rho(d) A_K(d)`` and
    ``A_K(0)`` are quadratic forms in the spatial terms ``P_t`` whose
    matrices are ``sum_d rho(d) C_tt'(d)`` and ``C_tt'(0)``
    (:func:`_cross_correlations` of the term kernels); on the grid each is
    one matrix product of the separable factors of ``P_t P_t'``.
    """
    lag = correlation.max_lag
    cross = _cross_correlations(kernel.term_kernels(), lag)
    numerator = np.einsum("tsij,ij->ts", cross, correlation.rho).ravel()
    denominator = cross[:, :, lag, lag].ravel()
    factors = kernel.spatial_function.grid_factors(xy0[0] + np.arange(shape[1]), xy0[1] + np.arange(shape[0]))
    rows = np.stack([r for r, _ in factors], axis=1)
    columns = np.stack([c for _, c in factors], axis=1)
    n = rows.shape[1]
    row_pairs = (rows[:, :, None] * rows[:, None, :]).reshape(shape[0], n * n)
    column_pairs = xp.asarray((columns[:, :, None] * columns[:, None, :]).reshape(shape[1], n * n).T)
    top = xp.asarray(row_pairs * numerator) @ column_pairs
    bottom = xp.asarray(row_pairs * denominator) @ column_pairs
    return xp.where(bottom > 0, top / xp.where(bottom > 0, bottom, 1.0), 1.0)


def correct_matched_variance(to_convolve, kernel, variance, *, max_lag=3, correlation=None):
    """Multiply the propagated variance of ``to_convolve * kernel`` by ``f`` (in place).

    Parameters
    ----------
    to_convolve : MaskedImage
        The image that was convolved; its noise correlation is measured
        (:func:`measure_noise_correlation`).
    kernel : SpatialKernel
        The kernel it was convolved with.
    variance : ndarray of shape (M, N)
        ``sum K^2 V`` from :func:`gpudiffim.apply.convolve_masked_image` on
        the grid of ``to_convolve``, in its array module; modified in place,
        except within the kernel half-width of the border (the EDGE pixels,
        which hold the unconvolved input variance).
    max_lag : int
        Largest lag (px) of the correlation.
    correlation : NoiseCorrelation, optional
        :func:`measure_noise_correlation` of ``to_convolve`` with ``max_lag``,
        if measured already (e.g. while the image was being convolved).

    Returns
    -------
    variance : ndarray
        The same array.
    correction : MatchedVarianceCorrection
    """
    if correlation is None:
        correlation = measure_noise_correlation(to_convolve, max_lag=max_lag)
    x0, y0, x1, y1 = to_convolve.bbox()
    centre = kernel.image(0.5 * (x0 + x1), 0.5 * (y0 + y1))
    factor, error = correlation.variance_factor(centre), correlation.factor_error(centre)
    rows, columns = variance.shape
    hy, hx = kernel.shape[0] // 2, kernel.shape[1] // 2
    interior = np.s_[hy:rows - hy, hx:columns - hx]
    if not correlation.significant:
        record = MatchedVarianceCorrection(correlation, 1.0, (1.0, 1.0), error, "none")
    elif kernel.is_spatially_invariant:
        variance[interior] *= variance.dtype.type(factor)
        record = MatchedVarianceCorrection(correlation, factor, (factor, factor), error, "constant")
    else:
        xp = array_module_of(variance)
        factor_map = _factor_map(correlation, kernel, (rows, columns), to_convolve.xy0, xp)[interior]
        variance[interior] *= factor_map.astype(variance.dtype)
        low, high = (float(factor_map.min()), float(factor_map.max())) if factor_map.size else (factor,) * 2
        record = MatchedVarianceCorrection(correlation, factor, (low, high), error, "map")
    log.info("noise correlation of the convolved image: %s", record.describe())
    return variance, record
