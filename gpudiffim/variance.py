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

``mode="auto"`` chooses: a scale factor up to :data:`AUTO_SCALE_MAX` means
the plane describes the noise up to a calibration error, so it is scaled;
a larger factor means a noise term is missing from the plane altogether
(typically the sky's photon noise of a sky-subtracted frame), so the
measured sky variance is added instead of inflating the sources' noise.
"""

import logging

import numpy as np

from .candidates import coarse_background
from .errors import ConfigurationError, InvalidVarianceError
from .image import MaskedImage
from .statistics import iqr_sigma

__all__ = ["scale_variance"]

log = logging.getLogger(__name__)

#: Largest scale factor that ``mode="auto"`` applies by scaling (above it, it adds).
AUTO_SCALE_MAX = 2.0
#: Planes whose pixels are left out of the noise estimate.
EXCLUDED_PLANES = ("DETECTED", "DETECTED_NEGATIVE", "BAD", "SAT", "NO_DATA", "INTRP", "EDGE")


def _sky_pixels(masked_image, residual, threshold):
    """Pixels without excluded mask bits and not above ``threshold`` sigma (sources)."""
    good = (masked_image.mask & masked_image.bits(EXCLUDED_PLANES)) == 0
    good &= masked_image.variance > 0
    sigma = iqr_sigma(residual[good])
    return good & (np.abs(residual) < threshold * max(sigma, np.finfo(float).tiny))


def scale_variance(masked_image, *, mode="scale", limit=10.0, bin_size=32, threshold=5.0):
    """Rescale the variance plane to the pixel noise (or add the missing sky variance).

    Parameters
    ----------
    masked_image : MaskedImage
    mode : {"scale", "add", "auto"}
        Multiply the plane by a factor, add a constant, or choose (see the
        module notes): scale when the factor is at most :data:`AUTO_SCALE_MAX`.
    limit : float
        Largest factor accepted (in "add" mode: largest ratio of the measured
        sky variance to the plane's median there).
    bin_size : int
        Bin size (px) of the background removed first.
    threshold : float
        Pixels beyond ``threshold`` robust sigmas of the background-free image
        (sources, and their negative counterparts) are left out.

    Returns
    -------
    scaled : MaskedImage
        A new masked image with ``variance * factor`` (or ``variance + added``).
    factor : float
        The factor, or in "add" mode the constant added (counts^2).

    Raises
    ------
    InvalidVarianceError
        If no usable sky pixel is left or the factor is not in ``(0, limit]``.
    """
    image = masked_image.image.astype(np.float64)
    exclude = (masked_image.mask & masked_image.bits(EXCLUDED_PLANES)) != 0
    residual = image - coarse_background(image, bin_size, exclude)
    sky = _sky_pixels(masked_image, residual, threshold)
    if np.count_nonzero(sky) < 100:
        msg = f"only {np.count_nonzero(sky)} sky pixels to measure the noise on: cannot scale the variance"
        raise InvalidVarianceError(msg)
    variance = masked_image.variance[sky].astype(np.float64)
    if mode not in ("scale", "add", "auto"):
        msg = f"invalid mode={mode!r}: expected 'scale', 'add' or 'auto'"
        raise ConfigurationError(msg)
    if mode == "add":
        return _add_sky_variance(masked_image, residual[sky], variance, limit)
    factor = iqr_sigma(residual[sky] / np.sqrt(variance)) ** 2
    if mode == "auto" and factor > AUTO_SCALE_MAX:
        log.info("variance plane %.3g x below the sky noise: adding the sky variance instead of scaling",
                 factor)
        return _add_sky_variance(masked_image, residual[sky], variance, limit)
    if not 0 < factor <= limit:
        factor = iqr_sigma(residual[sky]) ** 2 / np.median(variance)
    if not 0 < factor <= limit:
        msg = f"variance scale factor {factor:.3g} outside (0, {limit}]: the variance plane does not describe the noise"
        raise InvalidVarianceError(msg)
    level = logging.WARNING if not 0.1 <= factor <= 10.0 else logging.INFO
    log.log(level, "variance scaled by %.4g (from %d sky pixels)", factor, np.count_nonzero(sky))
    scaled = MaskedImage._from_planes(masked_image.image, masked_image.mask,
                                      masked_image.variance * masked_image.dtype.type(factor),
                                      masked_image.xy0, masked_image.mask_planes)
    return scaled, float(factor)


def _add_sky_variance(masked_image, sky_values, sky_variance, limit):
    measured = iqr_sigma(sky_values) ** 2
    median = float(np.median(sky_variance))
    if not 0 < measured <= limit * median:
        msg = (f"measured sky variance {measured:.4g} is not within (0, {limit} x {median:.4g}]: "
               f"the variance plane does not describe the noise")
        raise InvalidVarianceError(msg)
    added = max(measured - median, 0.0)
    log.info("added %.4g to the variance (sky variance %.4g, plane median %.4g)", added, measured, median)
    variance = masked_image.variance + masked_image.dtype.type(added)
    return MaskedImage._from_planes(masked_image.image, masked_image.mask, variance, masked_image.xy0,
                                    masked_image.mask_planes), added
