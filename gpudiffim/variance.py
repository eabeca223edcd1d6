"""Correction of a variance plane to the noise measured in the pixels.

``ip_diffim``'s ``ScaleVarianceTask`` (spec section 10.4): with a smooth
background removed, the scale factor is ``(0.741 IQR(I / sqrt(V)))^2`` over
pixels that are not part of a source and carry no bad mask bit; if that is
above ``limit``, ``(0.741 IQR(I))^2 / median(V)`` is tried; a factor still
above ``limit`` (or not positive) is an error.  Images whose variance plane
misses the sky noise (e.g. sky-subtracted frames with a variance from gain
and read noise only) need this before their residuals can be judged.

``mode="add"`` instead adds the missing sky variance as a constant (measured
sky variance minus the plane's median there): right when the plane already
holds the source photon noise and only the sky term is missing, where scaling
would inflate the variance on stars by the same factor.

``mode="auto"`` chooses: a scale factor within :data:`AUTO_TOLERANCE` of 1
is no better known than the plane (the estimate's own bias in crowded fields
is of that order), so the plane is kept; one between :data:`AUTO_SCALE_MIN`
and :data:`AUTO_SCALE_MAX` means the plane describes the noise up to a
calibration error, so it is scaled; a larger factor means a noise term is
missing from the plane altogether (typically the sky's photon noise of a
sky-subtracted frame), so the measured sky variance is added instead of
inflating the sources' noise; a smaller one means the pixels are smoother
than their variance says (noise-free simulations and models, smoothed or
resampled data), where shrinking the plane would understate the noise, so
the plane is kept and a warning logged.
"""

import logging
from dataclasses import dataclass

import numpy as np

from ._backend import array_module_of, ndimage_of
from .candidates import coarse_background
from .errors import ConfigurationError, InvalidVarianceError
from .image import MaskedImage
from .statistics import iqr_sigma

__all__ = ["VarianceCorrection", "background_free", "correct_variance", "sampled_bands", "scale_variance",
           "sky_pixels"]

log = logging.getLogger(__name__)

#: Largest scale factor that ``mode="auto"`` applies by scaling (above it, it adds).
AUTO_SCALE_MAX = 2.0
#: Below this factor ``mode="auto"`` keeps the plane (the pixels are smoother than it says).
AUTO_SCALE_MIN = 0.5
#: ``mode="auto"`` keeps a plane whose factor is within this of 1: the measurement's own bias
#: (source wings left in the sky) is 1-2 % on simulated fields of 1000-4000 stars per 1-4 Mpx.
AUTO_TOLERANCE = 0.03
#: Planes whose pixels are left out of the noise estimate.
EXCLUDED_PLANES = ("DETECTED", "DETECTED_NEGATIVE", "BAD", "SAT", "NO_DATA", "INTRP", "EDGE")
#: Modes of :func:`correct_variance`.
MODES = ("scale", "add", "auto")


@dataclass(frozen=True)
class VarianceCorrection:
    """What :func:`correct_variance` did to a variance plane.

    Attributes
    ----------
    applied : {"scale", "add", "none"}
        The operation applied (``mode="auto"`` resolves to one of them;
        "none" when it kept the plane: within :data:`AUTO_TOLERANCE` of the
        measured noise, or claiming far more noise than the pixels show).
    value : float
        The scale factor ("scale"; for "none" the factor measured and not
        applied), or the variance added ("add", counts^2).
    n_sky_pixels : int
        Sky pixels the noise was measured on.
    """

    applied: str
    value: float
    n_sky_pixels: int

    def describe(self):
        """One phrase for logs: ``"scaled by 1.02"`` or ``"added 812.3"``."""
        if self.applied == "none":
            return f"kept (measured factor {self.value:.4g} not applied)"
        return f"scaled by {self.value:.4g}" if self.applied == "scale" else f"added {self.value:.4g}"


#: Images of more pixels are measured on evenly spaced bands of :data:`BAND_ROWS` rows
#: totalling about this many pixels (a million sky pixels measure a variance to ~0.2 %).
MAX_PIXELS = 1 << 20
#: Height (rows) of the sampled bands.
BAND_ROWS = 64
#: Rows read beyond each band for its background and source masks (one background bin).
BAND_MARGIN = 32


def _bands(shape, max_pixels):
    """Row ranges sampled: the whole image, or evenly spaced bands of :data:`BAND_ROWS` rows."""
    rows, columns = shape
    if rows * columns <= max_pixels or rows <= BAND_ROWS:
        return [(0, rows)]
    n_bands = max(1, min(rows // BAND_ROWS, max_pixels // (BAND_ROWS * columns)))
    starts = np.linspace(0, rows - BAND_ROWS, n_bands).astype(int)
    return [(int(start), int(start) + BAND_ROWS) for start in starts]


def sampled_bands(masked_image, max_pixels=MAX_PIXELS):
    """The parts of an image that its noise is measured on, each with margins for its own preparation.

    Parameters
    ----------
    masked_image : MaskedImage
    max_pixels : int
        Images of at most this many pixels are measured whole.

    Yields
    ------
    band : MaskedImage
        A band of rows with :data:`BAND_MARGIN` rows around it (the image itself when measured whole).
    inner : slice
        The band's own rows within ``band`` (outside them are margins).
    """
    rows = masked_image.shape[0]
    x0, y0, x1, _ = masked_image.bbox()
    for start, stop in _bands(masked_image.shape, max_pixels):
        low, high = max(start - BAND_MARGIN, 0), min(stop + BAND_MARGIN, rows)
        if (low, high) == (0, rows):
            yield masked_image, slice(start, stop)
        else:
            yield masked_image.subimage((x0, y0 + low, x1, y0 + high - 1)), slice(start - low, stop - low)


def background_free(masked_image, bin_size):
    """The image less its coarse background (float64), and its pixels with an excluded mask bit.

    The background is :func:`gpudiffim.candidates.coarse_background` over bins
    of ``bin_size`` px, leaving out the :data:`EXCLUDED_PLANES` pixels.
    """
    image = masked_image.image.astype(np.float64)
    exclude = (masked_image.mask & masked_image.bits(EXCLUDED_PLANES)) != 0
    return image - coarse_background(image, bin_size, exclude), exclude


def sky_pixels(masked_image, residual, threshold, grow):
    """Pixels without excluded mask bits and farther than ``grow`` px from a source.

    Sources are pixels beyond ``threshold`` robust sigmas of ``residual`` (and
    negative ones, e.g. artefacts); growing them keeps the faint wings of
    bright stars out of the noise estimate, which would otherwise read them
    as noise (about +15 % in variance on a simulated field with stars of up
    to 5e4 sigma).
    """
    good = (masked_image.mask & masked_image.bits(EXCLUDED_PLANES)) == 0
    good &= masked_image.variance > 0
    sigma = iqr_sigma(residual[good])
    sources = array_module_of(residual).abs(residual) >= threshold * max(sigma, np.finfo(float).tiny)
    if grow > 0:
        sources = ndimage_of(sources).maximum_filter(sources, size=2 * grow + 1)
    return good & ~sources


def correct_variance(masked_image, *, mode="scale", limit=10.0, bin_size=32, threshold=3.0, grow=4):
    """Correct the variance plane to the pixel noise on the sky.

    Parameters
    ----------
    masked_image : MaskedImage
        NumPy or CuPy planes; the statistics are computed where they live.
    mode : {"scale", "add", "auto"}
        Multiply the plane by a factor, add a constant, or choose (see the
        module notes): keep the plane when the factor is within
        :data:`AUTO_TOLERANCE` of 1, scale when it is within
        [:data:`AUTO_SCALE_MIN`, :data:`AUTO_SCALE_MAX`], add above, keep below.
    limit : float
        Largest factor accepted (in "add" mode: largest ratio of the measured
        sky variance to the plane's median there).
    bin_size : int
        Bin size (px) of the background removed first.
    threshold : float
        Pixels beyond ``threshold`` robust sigmas of the background-free image
        (sources, and their negative counterparts) are left out...
    grow : int
        ... with every pixel within ``grow`` px of them (a square box).

    Returns
    -------
    corrected : MaskedImage
        A new masked image with ``variance * factor`` (or ``variance + added``).
    correction : VarianceCorrection

    Raises
    ------
    ConfigurationError
        For an unknown ``mode``.
    InvalidVarianceError
        If no usable sky pixel is left or the factor is not in ``(0, limit]``.
    """
    if mode not in MODES:
        msg = f"invalid mode={mode!r}: expected one of {MODES}"
        raise ConfigurationError(msg)
    xp = masked_image.xp
    values, variance = [], []
    for band, inner in sampled_bands(masked_image):
        residual, _ = background_free(band, bin_size)
        sky = sky_pixels(band, residual, threshold, grow)[inner]
        values.append(residual[inner][sky])
        variance.append(band.variance[inner][sky].astype(np.float64))
    values, variance = xp.concatenate(values), xp.concatenate(variance)
    n_sky = int(values.size)
    if n_sky < 100:
        msg = f"only {n_sky} sky pixels to measure the noise on: cannot correct the variance"
        raise InvalidVarianceError(msg)
    if mode == "add":
        return _add_sky_variance(masked_image, values, variance, limit, n_sky)
    factor = iqr_sigma(values / xp.sqrt(variance)) ** 2
    if mode == "auto" and factor > AUTO_SCALE_MAX:
        log.info("variance plane %.3g x below the sky noise: adding the sky variance instead of scaling",
                 factor)
        return _add_sky_variance(masked_image, values, variance, limit, n_sky)
    if mode == "auto" and abs(factor - 1.0) <= AUTO_TOLERANCE:
        log.info("variance plane within %.0f %% of the sky noise (factor %.4g): kept", 100 * AUTO_TOLERANCE,
                 factor)
        return masked_image, VarianceCorrection("none", float(factor), n_sky)
    if mode == "auto" and factor < AUTO_SCALE_MIN:
        log.warning("variance plane %.3g x above the pixel noise on the sky (noise-free, smoothed or "
                    "resampled image?): kept unchanged", 1.0 / factor if factor > 0 else float("inf"))
        return masked_image, VarianceCorrection("none", float(factor), n_sky)
    if not 0 < factor <= limit:
        factor = iqr_sigma(values) ** 2 / float(xp.median(variance))
    if not 0 < factor <= limit:
        msg = f"variance scale factor {factor:.3g} outside (0, {limit}]: the variance plane does not describe the noise"
        raise InvalidVarianceError(msg)
    level = logging.WARNING if not 0.1 <= factor <= 10.0 else logging.INFO
    log.log(level, "variance scaled by %.4g (from %d sky pixels)", factor, n_sky)
    scaled = MaskedImage._from_planes(masked_image.image, masked_image.mask,
                                      masked_image.variance * masked_image.dtype.type(factor),
                                      masked_image.xy0, masked_image.mask_planes)
    return scaled, VarianceCorrection("scale", float(factor), n_sky)


def scale_variance(masked_image, *, mode="scale", limit=10.0, bin_size=32, threshold=3.0, grow=4):
    """:func:`correct_variance` returning ``(corrected, factor or added variance)``."""
    corrected, correction = correct_variance(masked_image, mode=mode, limit=limit, bin_size=bin_size,
                                             threshold=threshold, grow=grow)
    return corrected, correction.value


def _add_sky_variance(masked_image, sky_values, sky_variance, limit, n_sky):
    measured = iqr_sigma(sky_values) ** 2
    median = float(array_module_of(sky_variance).median(sky_variance))
    if not 0 < measured <= limit * median:
        msg = (f"measured sky variance {measured:.4g} is not within (0, {limit} x {median:.4g}]: "
               f"the variance plane does not describe the noise")
        raise InvalidVarianceError(msg)
    added = max(measured - median, 0.0)
    log.info("added %.4g to the variance (sky variance %.4g, plane median %.4g)", added, measured, median)
    variance = masked_image.variance + masked_image.dtype.type(added)
    corrected = MaskedImage._from_planes(masked_image.image, masked_image.mask, variance, masked_image.xy0,
                                         masked_image.mask_planes)
    return corrected, VarianceCorrection("add", added, n_sky)
