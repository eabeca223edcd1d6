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

import dataclasses
import functools
import logging
from dataclasses import dataclass

import numpy as np

from ._backend import array_module_of, host_map, is_device_array, to_host
from ._ops import operations_for
from .candidates import coarse_background
from .errors import ConfigurationError, InvalidVarianceError
from .image import MaskedImage
from .statistics import own_rows_mask, sigma_of_quartiles

__all__ = ["SkyResidual", "SkySample", "VarianceCorrection", "background_free", "correct_variance",
           "correct_variances", "sampled_stack", "scale_variance", "sky_pixels", "sky_residual"]

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


@dataclass(frozen=True)
class SkySample:
    """The parts of an image its noise is measured on, stacked: equal bands with margins.

    Attributes
    ----------
    image, variance : ndarray of shape (B, H, N)
        The bands' planes (the image's dtype), in its array module.
    mask : ndarray of int32, shape (B, H, N)
    bits : callable
        ``bits(planes)`` of the image's mask planes.
    own_rows : ndarray of int, shape (B, R)
        Host: the indices of each band's own rows in its window (the rest
        are margins, read only for its own background and source masks); of
        one image, when several are stacked.
    windows : ndarray of int, shape (B,), or None
        Host: the first image row of every window of one image; None when
        the sample is the whole image (B = 1).
    """

    image: object
    variance: object
    mask: object
    bits: object
    own_rows: np.ndarray
    windows: np.ndarray = None

    @property
    def inner(self):
        """bool (B, H, 1): the bands' own rows, in the image's array module (uploaded from the host)."""
        inner = own_rows_mask(self.own_rows, self.image.shape[1], len(self.image) // len(self.own_rows))
        return array_module_of(self.image).asarray(inner)

    def with_variance(self, variance):
        """The same sample with the bands of another variance plane (M, N) of the image."""
        return dataclasses.replace(self, variance=_bands_of([[variance]], self.windows, self.image.shape[1])[0])

    def part(self, bands, variance=None):
        """The sample of the bands ``bands`` (a slice): one image of a stack (with the bands of the
        variance plane ``variance`` (M, N) of the image, if given)."""
        part = dataclasses.replace(self, image=self.image[bands], mask=self.mask[bands],
                                   variance=None if variance is not None else self.variance[bands])
        return part if variance is None else part.with_variance(variance)


def _bands_of(groups, windows, height):
    """For each group of planes (M, N), their windows of ``height`` rows starting at ``windows``, stacked
    plane after plane (the whole planes for ``windows`` None)."""
    if windows is None:
        xp = array_module_of(groups[0][0])
        return [planes[0][None] if len(planes) == 1 else xp.stack(planes) for planes in groups]
    return operations_for(groups[0][0]).band_rows(groups, windows, height)


def sampled_stack(masked_image, max_pixels=MAX_PIXELS):
    """The image whole (B = 1), or its :data:`BAND_ROWS`-row bands with :data:`BAND_MARGIN` rows of margin.

    Every band is read as a window of the same height, ``BAND_ROWS + 2
    BAND_MARGIN`` rows, moved inside the image at its top and bottom (so those
    bands have a wider margin on the other side): the bands stack into one
    array, and every later step treats all of them in one pass.
    ``masked_image`` may also be a sequence of images of one shape and mask
    planes: their samples are stacked image after image (B bands each).

    Returns
    -------
    SkySample
    """
    images = list(masked_image) if isinstance(masked_image, (list, tuple)) else [masked_image]
    first = images[0]
    rows = first.shape[0]
    bands = _bands(first.shape, max_pixels)
    if bands == [(0, rows)]:
        windows, height, own_rows = None, rows, np.arange(rows)[None]
    else:
        height = min(rows, BAND_ROWS + 2 * BAND_MARGIN)
        starts = np.array([start for start, _ in bands])
        windows = np.clip(starts - BAND_MARGIN, 0, rows - height)
        own_rows = (starts - windows)[:, None] + np.arange(BAND_ROWS)
    planes = _bands_of([[getattr(m, name) for m in images] for name in ("image", "variance", "mask")], windows,
                       height)
    return SkySample(*planes, first.bits, own_rows, windows)


@dataclass(frozen=True, eq=False)
class SkyResidual:
    """An image's noise sample less its coarse background: what its noise measurements share.

    Made once per image by :func:`sky_residual`, it serves the variance
    correction (:func:`correct_variance`) and the noise-correlation
    measurement of the convolved image
    (:func:`gpudiffim.covariance.measure_noise_correlation`), which would
    otherwise each take the bin medians again.  Both depend on the image
    plane and the mask only, so the sample serves the image after its
    variance is corrected (the measurements take that plane from the image
    they are given).

    Attributes
    ----------
    sample : SkySample
    residual : ndarray of float64, shape (B, H, N)
        The bands less their coarse background.
    exclude : ndarray of bool, shape (B, H, N)
        Pixels with an :data:`EXCLUDED_PLANES` bit.
    bin_size : int
        Background bin size (px).
    shape : tuple of int
        Shape of the image sampled.  The callers pass the residual of the
        image plane they measure (checked: its shape and the bin size).
    n_images : int
        Images stacked (their bands one image after the other; see :meth:`parts`).
    """

    sample: SkySample
    residual: object
    exclude: object
    bin_size: int
    shape: tuple
    n_images: int = 1

    def parts(self):
        """The :class:`SkyResidual` of each image stacked, in order (cut from the stack when first used)."""
        if self.n_images == 1:
            return [self]
        return [_SkyPart(self, image) for image in range(self.n_images)]

    def part(self, image, variance=None):
        """The :class:`SkyResidual` of image ``image`` of the stack (with the variance plane ``variance``)."""
        n_bands = len(self.residual) // self.n_images
        cut = slice(image * n_bands, (image + 1) * n_bands)
        return dataclasses.replace(self, sample=self.sample.part(cut, variance), residual=self.residual[cut],
                                   exclude=self.exclude[cut], n_images=1)

    def check(self, masked_image, bin_size):
        """This residual with the variance plane of ``masked_image`` (the image it was measured on, after
        a variance correction), or ValueError if the shape or bin size differ."""
        self.require(masked_image, bin_size)
        return dataclasses.replace(self, sample=self.sample.with_variance(masked_image.variance))

    def require(self, masked_image, bin_size):
        """ValueError unless ``masked_image`` has the shape sampled and ``bin_size`` is the bin size."""
        if masked_image.shape != self.shape or bin_size != self.bin_size:
            msg = (f"the sky residual was measured on a {self.shape} image with {self.bin_size}-px bins, "
                   f"not on this {masked_image.shape} image with {bin_size}-px bins")
            raise ValueError(msg)


class _SkyPart:
    """One image's :class:`SkyResidual` of a stack, cut from it when first used (the noise correlation
    reads one image's only)."""

    n_images = 1

    def __init__(self, stack, image):
        self._stack, self._image = stack, image
        self.bin_size, self.shape = stack.bin_size, stack.shape

    @functools.cached_property
    def _own(self):
        return self._stack.part(self._image)

    sample = property(lambda self: self._own.sample, doc="As :attr:`SkyResidual.sample`.")
    residual = property(lambda self: self._own.residual, doc="As :attr:`SkyResidual.residual`.")
    exclude = property(lambda self: self._own.exclude, doc="As :attr:`SkyResidual.exclude`.")

    def parts(self):
        """``[self]``."""
        return [self]

    def check(self, masked_image, bin_size):
        """:meth:`SkyResidual.check` of this image's residual (cut from the stack with the new variance)."""
        self._stack.require(masked_image, bin_size)
        return self._stack.part(self._image, masked_image.variance)


def sky_residual(masked_image, bin_size=32, max_pixels=MAX_PIXELS):
    """The :class:`SkyResidual` of ``masked_image``: its :func:`sampled_stack` less the coarse background.

    Parameters
    ----------
    masked_image : MaskedImage or sequence of MaskedImage
        NumPy or CuPy planes (several images: of one shape and mask planes,
        measured together, :meth:`SkyResidual.parts` gives each one's).
    bin_size : int
        Bin size (px) of the background removed.
    max_pixels : int
        Pixels sampled (see :func:`sampled_stack`).

    Returns
    -------
    SkyResidual
    """
    images = list(masked_image) if isinstance(masked_image, (list, tuple)) else [masked_image]
    sample = sampled_stack(images, max_pixels)
    residual, exclude = background_free(sample, bin_size)
    return SkyResidual(sample, residual, exclude, bin_size, tuple(images[0].shape), len(images))


def background_free(masked_image, bin_size):
    """The image less its coarse background (float64), and its pixels with an excluded mask bit.

    The background is :func:`gpudiffim.candidates.coarse_background` over bins
    of ``bin_size`` px, leaving out the :data:`EXCLUDED_PLANES` pixels.
    ``masked_image`` is a MaskedImage or a :class:`SkySample` (each band on
    its own).
    """
    image = masked_image.image.astype(np.float64)
    exclude = (masked_image.mask & masked_image.bits(EXCLUDED_PLANES)) != 0
    return image - coarse_background(image, bin_size, exclude), exclude


def sky_pixels(sample, residual, threshold, grow, exclude=None):
    """Pixels of a :class:`SkySample` (B, H, N) without excluded mask bits and farther than ``grow`` px from a source.

    Sources are pixels beyond ``threshold`` robust sigmas of ``residual`` (and
    negative ones, e.g. artefacts); growing them keeps the faint wings of
    bright stars out of the noise estimate, which would otherwise read them
    as noise (about +15 % in variance on a simulated field with stars of up
    to 5e4 sigma).  Each band has its own sigma and is grown on its own;
    nothing is read back on the GPU.  ``exclude``, if given, holds the
    pixels with an excluded mask bit already (:attr:`SkyResidual.exclude`).
    """
    ops = operations_for(residual)
    if exclude is None:
        exclude = (sample.mask & sample.bits(EXCLUDED_PLANES)) != 0
    good = array_module_of(residual).greater(sample.variance > 0, exclude)    # V > 0 and not excluded
    n_bands = residual.shape[0]
    quartiles = ops.masked_quantiles(residual.reshape(n_bands, -1), good.reshape(n_bands, -1), (0.25, 0.75),
                                     count=None)   # rows 0 and 1 are read
    sources = ops.sources_beyond(residual, quartiles, threshold)
    if grow > 0:
        sources = ops.or_box(sources, grow, grow)
    return array_module_of(good).greater(good, sources)   # good and no (0/1) source


def correct_variance(masked_image, *, mode="scale", limit=10.0, bin_size=32, threshold=3.0, grow=4, sky=None):
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
    sky : SkyResidual, optional
        :func:`sky_residual` of ``masked_image`` with ``bin_size``, when the
        caller measures the image's noise again later (made here if None).

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
    _check_mode(mode)
    sky = sky_residual(masked_image, bin_size) if sky is None else sky.check(masked_image, bin_size)
    return _corrected(masked_image, _SkyStatistics(sky, threshold, grow), 0, mode, limit)


def _check_mode(mode):
    if mode not in MODES:
        msg = f"invalid mode={mode!r}: expected one of {MODES}"
        raise ConfigurationError(msg)


class _SkyStatistics:
    """The quartiles of D/sigma on the sky pixels of each image of a :class:`SkyResidual`, and its count.

    ``numbers`` (host, (3, n_images)): the first and third quartiles and the
    count, read back at once for every image; :meth:`sky_variance` reads the
    rest, only when needed.
    """

    def __init__(self, sky, threshold, grow):
        self.sample, self.residual, self.n_images = sky.sample, sky.residual, sky.n_images
        self.ops = operations_for(self.residual)
        selected = sky_pixels(self.sample, self.residual, threshold, grow, sky.exclude)
        numbers, self.sky = self.ops.sky_quartiles(self.residual, self.sample.variance, selected,
                                                   self.sample.own_rows, self.n_images)
        self.numbers = to_host(numbers)

    def sky_variance(self, image):
        """(variance measured on the sky, the plane's median there) of image ``image``: a second read-back."""
        xp, one = array_module_of(self.residual), slice(image, image + 1)
        residual = self.residual.reshape(self.n_images, -1)[one]
        variance = self.sample.variance.astype(np.float64).reshape(self.n_images, -1)[one]
        rows = xp.concatenate([residual, variance])
        stats = to_host(self.ops.masked_quantiles(rows, xp.broadcast_to(self.sky[one], rows.shape), (0.25, 0.75),
                                                  median=True))
        return _iqr_variance(stats[0, 0], stats[1, 0]), float(stats[2, 1])


def _corrected(masked_image, statistics, image, mode, limit):
    """:func:`correct_variance` of ``masked_image``, image ``image`` of the :class:`_SkyStatistics`."""
    q1, q3, n_sky = statistics.numbers[:, image]
    n_sky = int(n_sky)
    factor = _iqr_variance(q1, q3)
    if n_sky < 100:
        msg = f"only {n_sky} sky pixels to measure the noise on: cannot correct the variance"
        raise InvalidVarianceError(msg)
    if mode == "add":
        return _add_sky_variance(masked_image, *statistics.sky_variance(image), limit, n_sky)
    if mode == "auto" and factor > AUTO_SCALE_MAX:
        log.info("variance plane %.3g x below the sky noise: adding the sky variance instead of scaling",
                 factor)
        return _add_sky_variance(masked_image, *statistics.sky_variance(image), limit, n_sky)
    if mode == "auto" and abs(factor - 1.0) <= AUTO_TOLERANCE:
        log.info("variance plane within %.0f %% of the sky noise (factor %.4g): kept", 100 * AUTO_TOLERANCE,
                 factor)
        return masked_image, VarianceCorrection("none", float(factor), n_sky)
    if mode == "auto" and factor < AUTO_SCALE_MIN:
        log.warning("variance plane %.3g x above the pixel noise on the sky (noise-free, smoothed or "
                    "resampled image?): kept unchanged", 1.0 / factor if factor > 0 else float("inf"))
        return masked_image, VarianceCorrection("none", float(factor), n_sky)
    if not 0 < factor <= limit:
        measured, median = statistics.sky_variance(image)
        factor = measured / median
    if not 0 < factor <= limit:
        msg = f"variance scale factor {factor:.3g} outside (0, {limit}]: the variance plane does not describe the noise"
        raise InvalidVarianceError(msg)
    level = logging.WARNING if not 0.1 <= factor <= 10.0 else logging.INFO
    log.log(level, "variance scaled by %.4g (from %d sky pixels)", factor, n_sky)
    # the read-only image and mask planes are shared, not copied
    scaled = MaskedImage._wrap(masked_image.image, masked_image.mask,
                               masked_image.variance * masked_image.dtype.type(factor),
                               masked_image.xy0, masked_image.mask_planes)
    return scaled, VarianceCorrection("scale", float(factor), n_sky)


def correct_variances(images, *, mode="scale", limit=10.0):
    """:func:`correct_variance` of several images, with their :func:`sky_residual`.

    Host images are corrected on the host threads
    (:func:`gpudiffim._backend.host_map`: they are independent, and about
    half of the work holds the GIL only briefly); device images of one shape
    and mask planes are measured together, as one stack of bands (one pass
    and one read-back for all), others one after the other.

    Parameters
    ----------
    images : dict of str to MaskedImage
    mode, limit
        As :func:`correct_variance`.

    Returns
    -------
    dict of str to (MaskedImage, VarianceCorrection, SkyResidual)
        The corrected image, the record and the image's sky residual (for a
        later noise measurement on the same planes).

    Raises
    ------
    ConfigurationError, InvalidVarianceError
        As :func:`correct_variance`, for the first image that fails.
    """
    names = list(images)

    def correct(name):
        sky = sky_residual(images[name])
        corrected, record = correct_variance(images[name], mode=mode, limit=limit, sky=sky)
        return corrected, record, sky

    if not any(is_device_array(image.image) for image in images.values()):
        return dict(zip(names, host_map(correct, names)))
    if len(names) < 2 or len({_stack_key(image) for image in images.values()}) > 1:
        return {name: correct(name) for name in names}
    _check_mode(mode)
    stacked = sky_residual([images[name] for name in names])
    statistics = _SkyStatistics(stacked, 3.0, 4)
    skies = stacked.parts()
    return {name: (*_corrected(images[name], statistics, i, mode, limit), skies[i]) for i, name in enumerate(names)}


def _stack_key(masked_image):
    """What images measured together share: shape, dtype and the excluded planes' bits."""
    return tuple(masked_image.shape), masked_image.dtype, masked_image.bits(EXCLUDED_PLANES)


def scale_variance(masked_image, *, mode="scale", limit=10.0, bin_size=32, threshold=3.0, grow=4):
    """:func:`correct_variance` returning ``(corrected, factor or added variance)``."""
    corrected, correction = correct_variance(masked_image, mode=mode, limit=limit, bin_size=bin_size,
                                             threshold=threshold, grow=grow)
    return corrected, correction.value


def _iqr_variance(q1, q3):
    """``iqr_sigma(values) ** 2`` from the quartiles of the values."""
    return float(sigma_of_quartiles(q1, q3) ** 2)


def _add_sky_variance(masked_image, measured, median, limit, n_sky):
    """Add the measured sky variance missing from the plane (``measured`` less the plane's ``median`` on the sky)."""
    if not 0 < measured <= limit * median:
        msg = (f"measured sky variance {measured:.4g} is not within (0, {limit} x {median:.4g}]: "
               f"the variance plane does not describe the noise")
        raise InvalidVarianceError(msg)
    added = max(measured - median, 0.0)
    log.info("added %.4g to the variance (sky variance %.4g, plane median %.4g)", added, measured, median)
    variance = masked_image.variance + masked_image.dtype.type(added)
    corrected = MaskedImage._wrap(masked_image.image, masked_image.mask, variance, masked_image.xy0,
                                  masked_image.mask_planes)
    return corrected, VarianceCorrection("add", added, n_sky)
