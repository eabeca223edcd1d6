"""Detection and PSF photometry of sources on a difference or score image.

:func:`detect_sources` finds positive and negative sources on a difference
image ``D`` (with its variance ``V``) or on a score image (already a
signal-to-noise image), measures each with a PSF fit, pairs opposite-signed
neighbours into dipoles, and guards against a bad subtraction.
:func:`detect_in_masked_image` does the same for a
:class:`~gpudiffim.MaskedImage` (planes, ``xy0`` and mask-plane names taken
from it).  Both return an :class:`astropy.table.Table`, one row per footprint.

Steps
-----
1. **Detection image.**  For ``kind="difference"``, the matched filter with
   the PSF ``P`` weighted by the inverse variance ``W = 1/V`` (``W = 0`` on
   excluded pixels):

   .. math::

       \\nu(x) = \\frac{\\sum_u P(u) D(x + u) W(x + u)}{\\sqrt{\\sum_u P(u)^2 W(x + u)}},

   the S/N of the maximum-likelihood PSF flux of a point source centred on
   pixel ``x``: two FFT correlations of the whole image, on the device for
   CuPy arrays.  With a constant variance it is ``(D ⋆ P) / sqrt(V ⋆ P^2)``.
   For ``kind="score"`` the image already is the matched-filtered S/N
   (``nu = image / sqrt(variance)``, or the image itself without a variance).
   A PSF given as a function of position is evaluated at the image centre
   for the filter.
2. **Footprints.**  Pixels with ``nu >= threshold`` and with
   ``nu <= -threshold`` (excluded pixels left out) are labelled separately,
   8-connected (``scipy.ndimage.label``, ``cupyx.scipy.ndimage.label`` on the
   GPU); footprints of fewer than ``min_pixels`` pixels are dropped.  Each
   footprint is one source at its pixel of largest ``|nu|``.
3. **Position.**  The peak pixel refined by a parabola through the logarithm
   of ``|nu|`` at the peak and its two neighbours, per axis (exact for a
   Gaussian peak), limited to half a pixel.
4. **PSF flux.**  On a difference, a weighted least-squares fit of the
   PSF, shifted to the refined position (by a Fourier phase ramp) and,
   when ``psf`` is a function of position, evaluated at the nearest node of
   a :data:`PSF_GRID` (16 px) grid:

   .. math::

       F = \\frac{\\sum P D W}{\\sum P^2 W}, \\qquad
       \\sigma_F = \\frac{1}{\\sqrt{\\sum P^2 W}}.

   On a score image, whose pixel ``x`` already holds the S/N of that fit
   centred on ``x``, the flux is the S/N interpolated to the refined
   position (the parabola's height) times ``flux_error`` (the PSF-flux
   error map, e.g. ``result.score.flux_error``) at the peak; without
   ``flux_error``, ``flux`` and ``flux_err`` are NaN and ``snr`` is the
   peak S/N.
5. **Dipoles.**  A positive and a negative source closer than
   ``dipole_separation`` whose flux magnitudes are within a factor
   ``1 / dipole_flux_ratio`` of each other (default 2) are both flagged
   ``dipole``, each pointing at the other in ``partner`` (closest pairs
   first; a source is in one pair at most).  The default separation is
   1.5 times the FWHM of a point source on the detection image (for a
   Gaussian PSF of width ``sigma`` that is ``sqrt(2)`` times the PSF's
   FWHM): the two lobes of a star moved by a fraction of a pixel lie
   ``2 sqrt(2) sigma``, 0.85 of that FWHM, apart, and a move of up to
   1.5 of it still pairs.
6. **Bad-subtraction guard.**  When the footprints cover more than
   ``max_footprint_fraction`` of the usable pixels, a
   :class:`~gpudiffim.errors.BadSubtractionWarning` is issued and
   ``meta["BADSUB"]`` is True.  Rubin's ``DetectAndMeasureTask`` refused a
   difference whose detected (grown) footprints covered more than 20 % of the
   image (``badSubtractionRatioThreshold = 0.2``; its current version applies
   0.2 to a residual-power ratio on the kernel stars instead).  Our
   footprints are not grown, so they cover several times fewer pixels for
   the same residuals; the default 0.05 is measured, not copied: on a
   simulated 1024^2 field with 2000 stars a good subtraction's footprints
   cover 0.5 %, and those of one whose kernel sum is 20 % too large 25 %
   (``tests/test_sources.py``).

Output
------
Columns (one row per footprint, positives first, each group in label
order, i.e. by the row of its first pixel):

============  =====  ==========================================================
``id``               footprint number, 1-based
``x``, ``y``  pix    parent position (pixel centres at integers, ``xy0`` added)
``flux``      ct     PSF flux (signed; image units)
``flux_err``  ct     its 1-sigma error
``snr``              ``flux / flux_err`` (the peak ``nu`` without a flux)
``peak_snr``         ``nu`` at the peak pixel
``sign``             +1 or -1
``dipole``           part of a dipole pair
``partner``          ``id`` of the other lobe (0 if none)
``npix``      pix    footprint area
============  =====  ==========================================================

``meta`` (FITS-style keys, kept as cards by :func:`gpudiffim.io.write_exposure`):
``KIND``, ``THRESH``, ``NPIXMIN``, ``DIPSEP`` (px), ``DIPRATIO``, ``DETFWHM``
(px, FWHM of a point source on the detection image), ``NGOODPIX`` (usable pixels), ``NFPPIX`` (footprint pixels),
``FPFRAC`` (their ratio), ``FPMAXFRC`` (the guard's limit), ``BADSUB``,
``NPOS``, ``NNEG``, ``NDIPOLE``.

Wiring
------
With a :class:`~gpudiffim.task.SubtractResult` ``result``::

    detect_in_masked_image(result.subtracted_image, psf=result.difference_psf,
                           threshold=sigma)                      # difference
    detect_in_masked_image(result.score.snr, psf=result.difference_psf, kind="score",
                           flux_error=result.score.flux_error, threshold=sigma)  # score

and :func:`gpudiffim.io.write_exposure` ``(..., sources=table)`` writes the
``SOURCES`` HDU.

Notes
-----
The filter, thresholding, labelling and footprint statistics run where the
arrays live (NumPy or CuPy, through :mod:`gpudiffim._backend`); the per-source
arithmetic (a few arrays of one value per source) runs on the host after
one copy of the peaks, and the PSF fit on stamps cut where the planes live.
"""

import logging
import math
import warnings

import numpy as np

from . import _validate
from ._backend import array_module_of, fft_functions, moved, ndimage_of, stable_argsort, to_host
from .convolve import FourierCorrelator
from .cutouts import cut_planes
from .errors import BadSubtractionWarning, ConfigurationError, InvalidImageError, InvalidVarianceError, ShapeError
from .gaussian import SIGMA_TO_FWHM
from .image import DEFAULT_MASK_PLANES, MaskedImage, _check_float_array, mask_bits

__all__ = ["DETECTION_BAD_MASK_PLANES", "KINDS", "PSF_GRID", "SOURCE_COLUMNS", "detect_sources",
           "detect_in_masked_image", "matched_filter"]

log = logging.getLogger(__name__)

#: Accepted values of ``kind``.
KINDS = ("difference", "score")

#: Mask planes whose pixels are left out of detection and photometry by default
#: (Rubin excludes EDGE and BAD; saturated and no-data pixels carry no flux either).
DETECTION_BAD_MASK_PLANES = ("BAD", "EDGE", "NO_DATA", "SAT")

#: Output columns: name -> (unit, description).
SOURCE_COLUMNS = {
    "id": (None, "footprint number (1-based)"),
    "x": ("pix", "parent x of the source (pixel centres at integers)"),
    "y": ("pix", "parent y of the source (pixel centres at integers)"),
    "flux": ("ct", "PSF flux (signed, image units)"),
    "flux_err": ("ct", "1-sigma error of the PSF flux"),
    "snr": (None, "flux / flux_err (the peak S/N when no flux is measured)"),
    "peak_snr": (None, "matched-filter S/N at the peak pixel"),
    "sign": (None, "+1 positive, -1 negative source"),
    "dipole": (None, "one lobe of a positive/negative pair"),
    "partner": (None, "id of the other lobe of the dipole (0: none)"),
    "npix": ("pix2", "footprint area"),
}

#: Spacing (px) of the grid of positions where a position-dependent PSF is evaluated for the
#: PSF fits (each source uses the nearest node, shifted to its own sub-pixel position).
PSF_GRID = 16

#: 8-connectivity for footprints.
_STRUCTURE = np.ones((3, 3), dtype=bool)


# ---------------------------------------------------------------------------
# argument checks


def _evaluator(psf):
    """``psf(x, y)`` or ``psf.image(x, y)`` as a callable, or None for a fixed PSF image."""
    if callable(getattr(psf, "image", None)):
        return psf.image
    return psf if callable(psf) else None


def _psf_image(psf, x, y, name="psf"):
    """The PSF at parent ``(x, y)`` as a float64 host array of odd shape, normalised to unit sum."""
    evaluate = _evaluator(psf)
    image = psf if evaluate is None else evaluate(x, y)
    image = np.asarray(to_host(image), dtype=np.float64)
    if image.ndim != 2 or image.shape[0] % 2 == 0 or image.shape[1] % 2 == 0:
        msg = f"{name} must be a 2-D array of odd shape (or a callable returning one), got shape {image.shape}"
        raise ShapeError(msg)
    total = image.sum()
    if not np.all(np.isfinite(image)) or not total > 0:
        msg = f"{name} must be finite with a positive sum, got sum {total!r}"
        raise InvalidImageError(msg)
    return image / total


def _psf_fwhm(psf_image):
    """FWHM (px) of a Gaussian with the PSF's second moments (negative pixels ignored)."""
    weights = np.clip(psf_image, 0.0, None)
    rows, cols = np.indices(psf_image.shape, dtype=np.float64)
    total = weights.sum()
    cy, cx = (weights * rows).sum() / total, (weights * cols).sum() / total
    second = (weights * ((rows - cy) ** 2 + (cols - cx) ** 2)).sum() / total
    return SIGMA_TO_FWHM * math.sqrt(0.5 * second)


def _excluded(mask, shape, mask_planes, bad_mask_planes, xp):
    """Boolean plane of excluded pixels (a boolean mask as given; an integer one through its bits)."""
    if mask is None:
        return xp.zeros(shape, dtype=bool)
    mask = array_module_of(mask).asarray(mask)
    if mask.dtype.kind == "b":
        return moved(_check_float_array("mask", mask.view(np.uint8), shape), xp) != 0
    mask = _check_float_array("mask", mask, shape)
    if mask.dtype.kind not in "iu":
        msg = f"mask must hold integer bits or booleans, got dtype {mask.dtype}"
        raise InvalidImageError(msg)
    bits = mask_bits(DEFAULT_MASK_PLANES if mask_planes is None else mask_planes, bad_mask_planes)
    return (moved(mask, xp) & bits) != 0


def _check_finite(name, plane, good, error):
    """Raise ``error`` when ``plane`` is not finite on a usable pixel."""
    bad = good & ~array_module_of(plane).isfinite(plane)
    count = int(bad.sum())  # synchronizes!
    if count:
        msg = f"{name} holds {count} NaN or infinite value(s) on unmasked pixels; flag them in the mask"
        raise error(msg)


def _check_variance(variance, good, name="variance"):
    _check_finite(name, variance, good, InvalidVarianceError)
    count = int((good & (variance <= 0)).sum())  # synchronizes!
    if count:
        msg = f"{name} holds {count} zero or negative value(s) on unmasked pixels; flag them in the mask"
        raise InvalidVarianceError(msg)


def _options(threshold, kind, min_pixels, dipole_flux_ratio, max_footprint_fraction, dipole_separation):
    if kind not in KINDS:
        msg = f"invalid kind={kind!r}: expected one of {KINDS}"
        raise ConfigurationError(msg)
    threshold = _validate.check_real("threshold", threshold, positive=True)
    min_pixels = _validate.check_int("min_pixels", min_pixels, minimum=1)
    ratio = _validate.check_real("dipole_flux_ratio", dipole_flux_ratio, minimum=0.0)
    if ratio > 1:
        _validate.fail("dipole_flux_ratio", ratio, "a number in [0, 1]")
    fraction = _validate.check_real("max_footprint_fraction", max_footprint_fraction, positive=True)
    if fraction > 1:
        _validate.fail("max_footprint_fraction", fraction, "a number in (0, 1]")
    if dipole_separation is not None:
        dipole_separation = _validate.check_real("dipole_separation", dipole_separation, minimum=0.0)
    return threshold, min_pixels, ratio, fraction, dipole_separation


# ---------------------------------------------------------------------------
# detection image and footprints


def matched_filter(image, weight, psf_image):
    """Inverse-variance weighted matched filter: S/N and weight sum of a PSF fit at every pixel.

    Parameters
    ----------
    image : ndarray of shape (M, N)
        Difference image, zero on excluded pixels (NumPy or CuPy).
    weight : ndarray of shape (M, N)
        ``1 / variance``, zero on excluded pixels.
    psf_image : ndarray of shape (kh, kw)
        Normalised PSF, odd shape (host array).

    Returns
    -------
    snr : ndarray of shape (M, N)
        ``sum P D W / sqrt(sum P^2 W)`` (0 where ``sum P^2 W`` is 0).
    information : ndarray of shape (M, N)
        ``sum P^2 W``, the inverse variance of the PSF flux.

    Examples
    --------
    A unit point source on unit-variance pixels: the S/N at its pixel is
    ``sqrt(sum P^2)``.

    >>> import numpy as np
    >>> psf = np.full((3, 3), 1 / 9)
    >>> image = np.zeros((7, 7)); image[3, 3] = 1.0
    >>> snr, information = matched_filter(image, np.ones((7, 7)), psf)
    >>> round(float(snr[3, 3]), 4), round(float(information[3, 3]), 4)
    (0.3333, 0.1111)
    """
    return _filter(image * weight, weight, psf_image)


def _filter(weighted, weight, psf_image):
    """:func:`matched_filter` of the weighted image ``D W``."""
    xp = array_module_of(weighted)
    psf = moved(psf_image, xp)
    numerator = FourierCorrelator(weighted, psf.shape).correlate(psf)
    information = FourierCorrelator(weight, psf.shape).correlate(psf * psf)
    # FFT round-off leaves ~1e-16 where the true sum is 0 (fully excluded neighbourhoods)
    floor = 1e-9 * float(information.max())  # synchronizes!
    usable = information > floor
    information = xp.where(usable, information, 0.0)
    snr = xp.where(usable, numerator / xp.sqrt(xp.where(usable, information, 1.0)), 0.0)
    return snr, information


def _footprint_peaks(snr, good, threshold, min_pixels):
    """Footprints above ``threshold`` and below ``-threshold``: peaks, signs, areas and the pixel count.

    Returns host arrays ``rows, cols, sign, npix`` (one entry per kept
    footprint, positives first) and the number of pixels in kept footprints.
    """
    xp = array_module_of(snr)
    ndimage = ndimage_of(snr)
    positive, n_positive = ndimage.label(good & (snr >= threshold), structure=_STRUCTURE)
    negative, n_negative = ndimage.label(good & (snr <= -threshold), structure=_STRUCTURE)
    n_positive, n_negative = int(n_positive), int(n_negative)
    labels = positive + xp.where(negative > 0, negative + n_positive, 0)
    empty = np.zeros(0, dtype=np.int64)
    if n_positive + n_negative == 0:
        return empty, empty, empty, empty, 0
    flat = labels.ravel()
    index = xp.flatnonzero(flat)  # synchronizes!
    label = flat[index]
    npix = xp.bincount(label, minlength=n_positive + n_negative + 1)[1:]
    # pixels by label, largest |S/N| first within each label: the first of each label is its peak
    order = stable_argsort(xp, -xp.abs(snr.ravel()[index]))
    order = order[stable_argsort(xp, label[order])]
    sorted_labels = label[order]
    first = xp.concatenate([xp.ones(1, dtype=bool), sorted_labels[1:] != sorted_labels[:-1]])
    peaks = to_host(index[order][first])
    npix = to_host(npix)
    keep = npix >= min_pixels
    sign = np.where(np.arange(1, len(npix) + 1) <= n_positive, 1, -1)
    rows, cols = np.divmod(peaks, snr.shape[1])
    return rows[keep], cols[keep], sign[keep], npix[keep], int(npix[keep].sum())


def _refine(snr, rows, cols):
    """Sub-pixel offsets ``(dy, dx)`` of the peaks and ``log |S/N|`` at the refined position.

    A parabola through ``log |S/N|`` at the peak and its two neighbours, per
    axis: exact for a Gaussian peak, whose interpolated height is then the
    S/N of a source centred there (the pixel's S/N is lower off-centre).
    """
    patch = to_host(cut_planes((snr,), np.stack([rows, cols], axis=1), 1, clamp=True)[0])
    values = np.log(np.maximum(np.abs(patch), 1e-30))
    centre = values[:, 1, 1]
    offsets, log_peak = [], centre.copy()
    for low, high in ((values[:, 0, 1], values[:, 2, 1]), (values[:, 1, 0], values[:, 1, 2])):
        curvature = low - 2 * centre + high
        with np.errstate(divide="ignore", invalid="ignore"):
            offset = np.where(curvature < 0, 0.5 * (low - high) / curvature, 0.0)
        offset = np.clip(np.nan_to_num(offset), -0.5, 0.5)
        log_peak += 0.25 * (high - low) * offset       # the parabola's height at the offset
        offsets.append(offset)
    return offsets[0], offsets[1], log_peak


# ---------------------------------------------------------------------------
# PSF photometry


def _shifted_psfs(psf, rows, cols, dy, dx, xy0, shape):
    """Unit-sum PSF stamps centred ``(dy, dx)`` from each peak pixel (host, ``(n, kh, kw)``)."""
    x0, y0 = xy0
    if _evaluator(psf) is not None:
        # the PSF at the nearest PSF_GRID node, each node evaluated once
        nodes = list(zip(np.round((x0 + cols) / PSF_GRID).astype(int), np.round((y0 + rows) / PSF_GRID).astype(int)))
        images = {node: _psf_image(psf, PSF_GRID * node[0], PSF_GRID * node[1]) for node in set(nodes)}
        stamps = [images[node] for node in nodes]
        if len({s.shape for s in stamps}) > 1:
            msg = f"psf(x, y) must return one shape everywhere, got {sorted({s.shape for s in stamps})}"
            raise ShapeError(msg)
        stamps = np.array(stamps)
    else:
        stamps = np.broadcast_to(psf, (len(rows), *psf.shape))
    kh, kw = shape
    fft = fft_functions(np)
    ky = np.fft.fftfreq(kh)[None, :, None]
    kx = np.fft.rfftfreq(kw)[None, None, :]
    ramp = np.exp(-2j * np.pi * (ky * dy[:, None, None] + kx * dx[:, None, None]))
    shifted = fft["irfft2"](fft["rfft2"](stamps, axes=(1, 2)) * ramp, s=shape, axes=(1, 2))
    return shifted / shifted.sum(axis=(1, 2), keepdims=True)


def _psf_fluxes(weighted, weight, psfs, rows, cols):
    """``(flux, error)`` of a weighted least-squares PSF fit at each peak (host arrays)."""
    xp = array_module_of(weighted)
    kh, kw = psfs.shape[1:]
    half = (kh // 2, kw // 2)
    data, weights = cut_planes((weighted, weight), np.stack([rows, cols], axis=1), half, clamp=True)
    # clamped stamps repeat the edge pixels: give what lies beyond the image no weight
    inside_rows = (rows[:, None] + np.arange(-half[0], half[0] + 1) >= 0) \
        & (rows[:, None] + np.arange(-half[0], half[0] + 1) < weighted.shape[0])
    inside_cols = (cols[:, None] + np.arange(-half[1], half[1] + 1) >= 0) \
        & (cols[:, None] + np.arange(-half[1], half[1] + 1) < weighted.shape[1])
    inside = moved(inside_rows[:, :, None] & inside_cols[:, None, :], xp)
    model = moved(psfs, xp)
    numerator = to_host((model * xp.where(inside, data, 0.0)).sum(axis=(1, 2)))
    information = to_host((model * model * xp.where(inside, weights, 0.0)).sum(axis=(1, 2)))
    with np.errstate(divide="ignore", invalid="ignore"):
        return numerator / information, 1.0 / np.sqrt(information)


# ---------------------------------------------------------------------------
# dipoles and the table


def _pair_dipoles(x, y, flux, sign, separation, ratio):
    """``partner`` index (-1: none) of each source: the nearest opposite-signed one within reach.

    Candidate pairs come from a k-d tree (no all-pairs matrix: a bad
    subtraction can have thousands of sources of each sign); the closest
    eligible pairs are taken first, each source in one pair at most.
    """
    from scipy.spatial import cKDTree

    partner = np.full(len(x), -1)
    positive, negative = np.flatnonzero(sign > 0), np.flatnonzero(sign < 0)
    if len(positive) == 0 or len(negative) == 0:
        return partner
    near = cKDTree(np.c_[x[positive], y[positive]]).sparse_distance_matrix(
        cKDTree(np.c_[x[negative], y[negative]]), separation, output_type="ndarray")
    p, n = positive[near["i"]], negative[near["j"]]
    magnitude = np.abs(flux)
    with np.errstate(divide="ignore", invalid="ignore"):
        balance = np.minimum(magnitude[p], magnitude[n]) / np.maximum(magnitude[p], magnitude[n])
    for k in np.argsort(near["v"], kind="stable"):
        if balance[k] >= ratio and partner[p[k]] < 0 and partner[n[k]] < 0:
            partner[p[k]], partner[n[k]] = n[k], p[k]
    return partner


def _table(columns, meta):
    from astropy.table import Table

    table = Table(meta=meta)
    for name, (unit, description) in SOURCE_COLUMNS.items():
        table[name] = columns[name]
        table[name].unit = unit
        table[name].description = description
    return table


def _score_fluxes(snr, flux_error, rows, cols, log_peak):
    """``(flux, error)`` of a score image's peaks: the interpolated peak S/N times the flux error there."""
    error = to_host(flux_error[moved(rows, array_module_of(flux_error)), moved(cols, array_module_of(flux_error))])
    peak = to_host(snr[moved(rows, array_module_of(snr)), moved(cols, array_module_of(snr))])
    return np.sign(peak) * np.exp(log_peak) * error, error.astype(np.float64)


def _measure(snr, planes, psf, shape, rows, cols, xy0):
    """Refined positions and fluxes of the peaks: ``(dx, dy, flux, flux_err)`` (host arrays).

    ``planes`` is ``("difference", D W, W)``, ``("score", flux_error)`` or
    ``("score", None)``; ``psf`` the normalised PSF image or the callable,
    ``shape`` its shape.
    """
    dy, dx, log_peak = _refine(snr, rows, cols)
    kind, *data = planes
    if len(rows) == 0 or data[0] is None:
        nan = np.full(len(rows), np.nan)
        return dx, dy, nan, nan
    if kind == "score":
        return (dx, dy, *_score_fluxes(snr, data[0], rows, cols, log_peak))
    psfs = _shifted_psfs(psf, rows, cols, dy, dx, xy0, shape)
    return (dx, dy, *_psf_fluxes(*data, psfs, rows, cols))


def _prepare(image, variance, mask, flux_error, kind, mask_planes, bad_mask_planes):
    """Checked planes in one array module: ``(image, variance or None, good, flux_error or None)``."""
    image = _check_float_array("image", image)
    xp = array_module_of(image)
    if kind == "difference" and variance is None:
        msg = "a difference image needs its variance (variance=None is accepted for kind='score' only)"
        raise ConfigurationError(msg)
    if kind == "difference" and flux_error is not None:
        msg = "flux_error is for a score image; a difference's fluxes come from its variance"
        raise ConfigurationError(msg)
    good = ~_excluded(mask, image.shape, mask_planes, bad_mask_planes, xp)
    image = image.astype(np.float64)
    _check_finite("image", image, good, InvalidImageError)
    if variance is not None:
        variance = moved(_check_float_array("variance", variance, image.shape), xp).astype(np.float64)
        _check_variance(variance, good)
    if flux_error is not None:
        flux_error = moved(_check_float_array("flux_error", flux_error, image.shape), xp).astype(np.float64)
        _check_variance(flux_error, good, "flux_error")
    return image, variance, good, flux_error


def _detection_image(image, variance, good, flux_error, kind, psf_image):
    """The S/N image and the planes the fluxes are measured on (see :func:`_measure`)."""
    xp = array_module_of(image)
    if kind == "score":
        snr = image if variance is None else image / xp.sqrt(xp.where(good, variance, 1.0))
        return xp.where(good, snr, 0.0), ("score", flux_error)
    weight = xp.where(good, 1.0 / xp.where(good, variance, 1.0), 0.0)
    weighted = xp.where(good, image, 0.0) * weight
    return _filter(weighted, weight, psf_image)[0], ("difference", weighted, weight)


def _detection_fwhm(psf_image, kind):
    """FWHM (px) of a point source on the detection image: the PSF correlated with itself for a difference."""
    if kind == "score":
        return _psf_fwhm(psf_image)
    fft = fft_functions(np)
    shape = tuple(2 * n - 1 for n in psf_image.shape)
    spectrum = fft["rfft2"](psf_image, s=shape)
    return _psf_fwhm(np.fft.fftshift(fft["irfft2"](spectrum * spectrum.conj(), s=shape)))


def detect_sources(image, variance=None, mask=None, *, psf, threshold=5.0, kind="difference", xy0=(0, 0),
                   mask_planes=None, bad_mask_planes=DETECTION_BAD_MASK_PLANES, min_pixels=1,
                   dipole_separation=None, dipole_flux_ratio=0.5, max_footprint_fraction=0.05,
                   flux_error=None):
    """Detect and measure positive and negative sources on a difference or score image.

    See the module notes for the method and the output.

    Parameters
    ----------
    image : ndarray of shape (M, N)
        The difference image (``kind="difference"``, image units) or the
        score image (``kind="score"``, S/N per pixel).  NumPy or CuPy.
    variance : ndarray of shape (M, N), optional
        Per-pixel variance of ``image``; required for a difference.  For a
        score image, the S/N is ``image / sqrt(variance)`` when given.
    mask : ndarray of shape (M, N), optional
        Integer bit mask (pixels with a ``bad_mask_planes`` bit are left
        out) or boolean (True = left out).
    psf : ndarray of shape (kh, kw), callable or object with ``image(x, y)``
        The PSF of ``image`` (odd shape, normalised here to unit sum): an
        array, ``psf(x, y)`` or ``psf.image(x, y)`` (e.g. a
        :class:`~gpudiffim.difference_psf.DifferencePsf`) returning it at
        parent ``(x, y)``.  A difference's PSF is evaluated at the image
        centre for the matched filter and at each source for its flux.  For
        a score image, the PSF of the score (the difference's PSF
        correlated with the preconvolution PSF): it only sets the dipole
        separation.
    threshold : float
        Detection threshold in units of the noise (S/N), for both signs.
    kind : {"difference", "score"}
        What ``image`` is.
    xy0 : tuple of int
        Parent coordinate ``(x0, y0)`` of ``image[0, 0]``.
    mask_planes : mapping of str to int, optional
        Mask-plane bits (default :data:`~gpudiffim.image.DEFAULT_MASK_PLANES`).
    bad_mask_planes : sequence of str
        Planes whose pixels are excluded (names absent from ``mask_planes``
        are ignored).
    min_pixels : int
        Smallest footprint kept (pixels).
    dipole_separation : float, optional
        Largest distance (px) between the two lobes of a dipole; 1.5 times
        the FWHM of a point source on the detection image when omitted.
    dipole_flux_ratio : float
        Smallest ratio of the smaller to the larger lobe's ``|flux|`` (of
        ``|snr|`` when no flux is measured).
    max_footprint_fraction : float
        Fraction of the usable pixels that footprints may cover before the
        bad-subtraction guard fires.
    flux_error : ndarray of shape (M, N), optional
        For a score image: the PSF-flux error of a point source centred on
        each pixel (``result.score.flux_error``), which gives the fluxes.

    Returns
    -------
    astropy.table.Table
        One row per footprint, columns and ``meta`` as in the module notes.

    Raises
    ------
    ShapeError
        If a plane is not 2-D or the shapes differ, or the PSF is not a 2-D
        array of odd shape.
    InvalidImageError
        If the image holds NaN or infinity on a usable pixel, a plane has a
        non-numeric dtype or non-native byte order, or the PSF is not finite
        with a positive sum.
    InvalidVarianceError
        If the variance (or ``flux_error``) is not finite and positive on
        every usable pixel.
    ConfigurationError
        For an unknown ``kind``, a difference without a variance or with a
        ``flux_error``, or an option out of range.

    Warns
    -----
    BadSubtractionWarning
        When the footprints cover more than ``max_footprint_fraction`` of the
        usable pixels (``meta["BADSUB"]`` is then True).

    Notes
    -----
    A CuPy image (and planes) keeps the filter, labelling and footprint
    statistics on the GPU; the table is built on the host.

    Examples
    --------
    A 10-sigma point source and a negative one 30 px away, on unit noise:

    >>> import numpy as np
    >>> from gpudiffim.testing import gaussian_kernel
    >>> psf = gaussian_kernel(1.5, 7)
    >>> rng = np.random.default_rng(1)
    >>> image = rng.normal(size=(64, 64))
    >>> flux = 10 * np.sqrt(4 * np.pi * 1.5**2)        # S/N 10 on unit variance
    >>> image[13:28, 13:28] += flux * psf; image[33:48, 43:58] -= flux * psf
    >>> sources = detect_sources(image, np.ones_like(image), psf=psf)
    >>> sources["sign"].tolist(), sources["x"].round().tolist(), sources["y"].round().tolist()
    ([1, -1], [20.0, 50.0], [20.0, 40.0])
    >>> bool(np.all(np.abs(sources["flux"] / (sources["sign"] * flux) - 1) < 0.3))
    True
    """
    threshold, min_pixels, ratio, fraction, separation = _options(
        threshold, kind, min_pixels, dipole_flux_ratio, max_footprint_fraction, dipole_separation)
    image, variance, good, flux_error = _prepare(image, variance, mask, flux_error, kind, mask_planes,
                                                 bad_mask_planes)
    xp, shape = array_module_of(image), image.shape
    x0, y0 = (int(v) for v in xy0)
    psf_image = _psf_image(psf, x0 + 0.5 * (shape[1] - 1), y0 + 0.5 * (shape[0] - 1))
    snr, planes = _detection_image(image, variance, good, flux_error, kind, psf_image)
    rows, cols, sign, npix, n_footprint_pixels = _footprint_peaks(snr, good, threshold, min_pixels)
    dx, dy, flux, flux_err = _measure(snr, planes, psf if _evaluator(psf) else psf_image, psf_image.shape,
                                      rows, cols, (x0, y0))
    peak_snr = to_host(snr[moved(rows, xp), moved(cols, xp)]) if len(rows) else np.zeros(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        snr_column = np.where(np.isfinite(flux), flux / flux_err, peak_snr)
    x, y = x0 + cols + dx, y0 + rows + dy
    fwhm = _detection_fwhm(psf_image, kind)
    separation = 1.5 * fwhm if separation is None else separation
    partner = _pair_dipoles(x, y, np.where(np.isfinite(flux), flux, snr_column), sign, separation, ratio)
    n_good = int(good.sum())  # synchronizes!
    meta = {"KIND": kind, "THRESH": threshold, "NPIXMIN": min_pixels, "DIPSEP": float(separation),
            "DIPRATIO": ratio, "DETFWHM": float(fwhm), "NGOODPIX": n_good, "NFPPIX": n_footprint_pixels,
            "FPFRAC": n_footprint_pixels / max(n_good, 1), "FPMAXFRC": fraction,
            "NPOS": int((sign > 0).sum()), "NNEG": int((sign < 0).sum()),
            "NDIPOLE": int((partner >= 0).sum() // 2)}
    meta["BADSUB"] = _guard(meta)
    columns = {"id": np.arange(1, len(x) + 1), "x": x, "y": y, "flux": flux, "flux_err": flux_err,
               "snr": snr_column, "peak_snr": peak_snr, "sign": sign.astype(np.int16), "dipole": partner >= 0,
               "partner": np.where(partner >= 0, partner + 1, 0), "npix": npix}
    return _table(columns, meta)


def _guard(meta):
    """The bad-subtraction guard: warn (and return True) when footprints cover too much of the image."""
    log.info("%d positive and %d negative sources above %.1f sigma, %d dipoles; footprints cover %.3f%%",
             meta["NPOS"], meta["NNEG"], meta["THRESH"], meta["NDIPOLE"], 100 * meta["FPFRAC"])
    if meta["FPFRAC"] <= meta["FPMAXFRC"]:
        return False
    msg = (f"detected footprints cover {meta['FPFRAC']:.1%} of the {meta['NGOODPIX']} usable pixels (limit "
           f"{meta['FPMAXFRC']:.1%}): the subtraction is probably bad (wrong kernel sum, misregistration)")
    warnings.warn(msg, BadSubtractionWarning, stacklevel=3)
    return True


def detect_in_masked_image(masked_image, *, psf, **options):
    """:func:`detect_sources` on a :class:`~gpudiffim.MaskedImage` (a difference or a score).

    Parameters
    ----------
    masked_image : MaskedImage
        Its image, variance and mask planes, ``xy0`` and mask-plane names
        are used.
    psf : ndarray or callable
        As in :func:`detect_sources`.
    **options
        Other keyword arguments of :func:`detect_sources` (``threshold``,
        ``kind``, ``bad_mask_planes``, ...).

    Returns
    -------
    astropy.table.Table

    Raises
    ------
    TypeError
        If ``masked_image`` is not a MaskedImage.
    """
    if not isinstance(masked_image, MaskedImage):
        msg = f"masked_image must be a MaskedImage, got {type(masked_image).__name__}"
        raise TypeError(msg)
    for name in ("xy0", "mask_planes"):
        if name in options:
            msg = f"{name} is taken from the MaskedImage; do not pass it"
            raise ConfigurationError(msg)
    return detect_sources(masked_image.image, masked_image.variance, masked_image.mask, psf=psf,
                          xy0=masked_image.xy0, mask_planes=masked_image.mask_planes, **options)
