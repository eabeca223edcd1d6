"""Kernel candidates: detection and vetting.

A kernel candidate is a star around which a stamp of ``2 g + 1`` pixels
(``g`` = stamp half-size, by default the kernel width) is cut from both
images.  The vetted candidates go into the spatial cell set
(:mod:`gpudiffim.cellset`).

Positions are parent-pixel coordinates (x = column, y = row).

On the kernel path (:mod:`gpudiffim._ops`; ``kernels/detection.cu``) the
background and threshold pass, the footprint reductions, the core S/N
ratings with the PSF-size moments, and the stamps' mask test are each one or
two launches with at most one read-back; the NumPy reference runs the same
steps in host row blocks.
"""

import functools
import logging
import warnings

import numpy as np

from ._backend import array_module_of, ndimage_of, row_blocks, to_host
from ._ops import operations_for
from .cellset import Candidates, RejectReason
from .cutouts import footprint_centres, stamps_fit
from .errors import ConfigurationError, NoKernelCandidatesError
from .fwhm import core_snr_of, median_fwhm
from .statistics import mad_sigma

__all__ = [
    "detect_candidates",
    "detected_centres",
    "coarse_background",
    "vet_candidates",
    "candidate_positions",
    "rated_fwhms",
]

log = logging.getLogger(__name__)

def _for_row_blocks(xp, shape, func, min_rows=1):
    """Call ``func(rows)`` for the row slices of :func:`~gpudiffim._backend.row_blocks`."""
    for rows in row_blocks(xp, shape, min_rows):
        func(rows)


def _interpolation_matrix(n, centres):
    """Matrix ``W`` (n, len(centres)) of linear interpolation between bin centres, clamped."""
    identity = np.eye(len(centres))
    return np.stack([np.interp(np.arange(n), centres, identity[b]) for b in range(len(centres))],
                    axis=1)


def _bin_edges(n, bin_size):
    return np.linspace(0, n, max(1, round(n / bin_size)) + 1).astype(int)


def _two_point_weights(n, edges):
    """Bilinear weights along one axis as (first bin, second bin, first weight, second weight).

    Pixel ``t`` takes ``w1[t] * v[b1[t]] + w2[t] * v[b2[t]]`` of the bin values ``v``;
    the weights are the two non-zero entries of the row ``t`` of
    :func:`_interpolation_matrix` (``w2 = 0`` beyond the outer bin centres).
    Computed once per axis length and bin edges (read-only arrays).
    """
    return _two_point_weights_cached(int(n), tuple(int(e) for e in edges))


@functools.lru_cache(maxsize=64)
def _two_point_weights_cached(n, edges):
    edges = np.asarray(edges)
    centres = 0.5 * (edges[:-1] + edges[1:]) - 0.5
    weights = _interpolation_matrix(n, centres)
    t = np.arange(n)
    first = np.clip(np.searchsorted(centres, t, side="right") - 1, 0, len(centres) - 1)
    second = np.minimum(first + 1, len(centres) - 1)
    parts = (first, second, weights[t, first], np.where(second != first, weights[t, second], 0.0))
    for part in parts:
        part.flags.writeable = False
    return parts


class _Background:
    """Bin medians of an image (or of each image of a stack), interpolated bilinearly between bin centres.

    The medians are an operation of :mod:`gpudiffim._ops` (a loop over bins
    for the NumPy reference, one sort on the kernel path: the same values);
    the grid's gaps are filled and the interpolation runs along x on the
    grid, then along y over the image, as separate element-wise products and
    a sum, all in the image's array module (nothing is read back on the GPU),
    so NumPy and CuPy round alike.  The reference path only: the kernel path
    interpolates in ``gdi_detection_residual`` with the same products and sums.
    """

    def __init__(self, image, bin_size, keep=None):
        xp = self.xp = array_module_of(image)
        if image.dtype.kind != "f":
            image = image.astype(np.float64)  # np.median averages integers in float64
        self.stacked = image.ndim == 3
        ny, nx = image.shape[-2:]
        edges_y, edges_x = _bin_edges(ny, bin_size), _bin_edges(nx, bin_size)
        grid = operations_for(image).bin_medians(image, keep, edges_y, edges_x)
        grid = xp.asarray(grid).reshape((-1,) + grid.shape[-2:])
        finite = xp.isfinite(grid)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN grid: filled with 0 below
            fill = xp.nanmedian(grid.reshape(len(grid), -1), axis=1)[:, None, None]
        fill = xp.where(finite.reshape(len(grid), -1).any(axis=1)[:, None, None], fill, 0.0)
        grid = xp.where(finite, grid, fill)
        first_x, second_x, weight1_x, weight2_x = (xp.asarray(a) for a in _two_point_weights(nx, edges_x))
        self.grid = grid if self.stacked else grid[0]
        self._along_x = grid[:, :, first_x] * weight1_x + grid[:, :, second_x] * weight2_x
        self._y_host = _two_point_weights(ny, edges_y)
        self._y = tuple(xp.asarray(a) for a in self._y_host)

    def rows(self, rows):
        """Background of the image rows ``rows`` (a slice), float64: (R, N), or (B, R, N) for a stack."""
        first, second, weight1, weight2 = (a[rows] for a in self._y)
        host_first, host_second = self._y_host[0][rows], self._y_host[1][rows]
        if host_first[0] == host_first[-1] and host_second[0] == host_second[-1]:
            first, second = first[:1], second[:1]  # one pair of bin rows: broadcast, no gather
        out = self._along_x[:, first] * weight1[:, None]
        out += self._along_x[:, second] * weight2[:, None]
        return out if self.stacked else out[0]


def coarse_background(image, bin_size, exclude=None):
    """Smooth background: bin medians interpolated bilinearly between bin centres.

    Parameters
    ----------
    image : ndarray of shape (M, N) or (B, M, N)
        NumPy or CuPy array (a stack: each image on its own); the result
        lives in the same module.
    bin_size : int
        Bin size in pixels.
    exclude : ndarray of bool, optional
        Pixels left out of the medians.

    Returns
    -------
    ndarray of float64, shape of ``image``

    Notes
    -----
    Each bin's value is ``np.median`` of its pixels (NaN and empty bins take
    the median of the others); NumPy and CuPy give identical backgrounds.
    """
    xp = array_module_of(image)
    keep = None if exclude is None else ~exclude
    edges = [_bin_edges(n, bin_size) for n in image.shape[-2:]]
    fused = operations_for(image).interpolated_background(image, keep, *edges)
    if fused is not None:             # kernel path: one launch for every plane
        return fused
    background = _Background(image, bin_size, keep)
    out = xp.empty(image.shape, dtype=np.float64)

    def fill(rows):
        out[..., rows, :] = background.rows(rows)

    _for_row_blocks(xp, image.shape[-2:], fill)
    return out


#: Threshold kinds set pixel by pixel; the others are image-wide levels of the residual.
_LOCAL_THRESHOLDS = ("pixel_stdev", "value")


def _threshold(detection, variance, residual=None, valid=None):
    """Detection threshold as a function of a row slice (an array or a scalar).

    ``residual`` and ``valid`` (complete) are needed for the image-wide kinds
    ("stdev", "variance"), not for :data:`_LOCAL_THRESHOLDS`.
    """
    xp = array_module_of(variance)
    kind, value = detection.det_threshold_type, detection.det_threshold
    if kind == "pixel_stdev":
        # NO_DATA pixels may carry a negative variance; they are not ``valid`` and never detected
        return lambda rows: value * xp.sqrt(xp.maximum(variance[rows], 0))
    if kind == "variance":
        level = value * xp.median(variance[valid])
    elif kind == "stdev":
        level = value * mad_sigma(residual[valid])
    else:
        level = value
    return lambda rows: level


_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def _footprints(above):
    """8-connected footprints of ``above`` as (labels, count), in the array's module.

    ``labels``: 0 outside, ``1 .. count`` on the footprints; only the
    partition into footprints is defined, not their numbering.  SciPy labels
    on the host, ``cupyx.scipy.ndimage.label`` on the GPU.
    """
    labels, n_labels = ndimage_of(above).label(above, structure=_EIGHT_CONNECTED)
    return labels, int(n_labels)


def detect_candidates(masked_image, detection):
    """Peaks of above-threshold footprints of a background-subtracted image.

    Parameters
    ----------
    masked_image : MaskedImage
        Image to detect on; NumPy or CuPy planes (detection then runs on the GPU).
    detection : DetectionConfig
        Threshold and footprint-area limits.

    Returns
    -------
    ndarray of int, shape (n, 2)
        Parent ``(x, y)`` of each footprint's peak pixel (the first in raster
        order among equal maxima); the 1-px centre of the bounding box for
        footprints larger than ``fp_npix_max``.  Footprints are in the raster
        order of their first pixel; NumPy and CuPy planes give the same array.
    """
    return detected_centres(masked_image, detection)[0]


def detected_centres(masked_image, detection):
    """:func:`detect_candidates`, and the same centres where the planes live.

    Returns
    -------
    positions : ndarray of int, shape (n, 2)
        As :func:`detect_candidates`.
    device_centres : ndarray of int32, shape (n, 2), or None
        On the kernel path, the ``(row, column)`` of the same peaks relative
        to the image's first pixel, computed where the planes live from the
        footprint reductions (nothing uploaded), for the ratings, the vetting
        and the stamps; None on the NumPy reference.
    """
    residual, above = _residual_and_detections(masked_image, detection)
    labels, n_labels = _footprints(above)
    if n_labels == 0:
        return np.zeros((0, 2), dtype=int), None
    peaks, device_centres = _footprint_peaks(residual, labels, n_labels, detection.fp_npix_min,
                                             detection.fp_npix_max)
    x0, y0 = masked_image.xy0
    log.info("detection: %d footprints above threshold, %d with area >= %d px",
             n_labels, len(peaks), detection.fp_npix_min)
    return np.stack([peaks[:, 1] + x0, peaks[:, 0] + y0], axis=1), device_centres


def _without_bits(xp, mask, bits):
    """bool plane: where ``mask`` has none of ``bits`` (host row blocks; one expression where one block covers all)."""
    blocks = list(row_blocks(xp, mask.shape))
    if len(blocks) == 1:
        return (mask & bits) == 0
    out = xp.empty(mask.shape, dtype=bool)
    for rows in blocks:
        xp.equal(mask[rows] & bits, 0, out=out[rows])
    return out


def _residual_and_detections(masked_image, detection):
    """``(residual, above)``: the image less its background, and the pixels detected (where the planes live).

    The background is :class:`_Background` of the valid pixels (no
    ``NO_DATA`` bit); ``above`` (bool, or int32 0/1 on the kernel path) marks
    the valid pixels above :func:`_threshold`.  On the kernel path the
    background, the residual and a local threshold are one fused pass
    (:meth:`~gpudiffim._ops.KernelOperations.detection_residual`); else host
    row blocks.
    """
    xp = masked_image.xp
    image, variance, mask = masked_image.image, masked_image.variance, masked_image.mask
    shape = masked_image.shape
    no_data = masked_image.bits(["NO_DATA"])
    valid = _without_bits(xp, mask, no_data)
    local = detection.det_threshold_type in _LOCAL_THRESHOLDS
    edges = [_bin_edges(n, detection.background_bin_size) for n in shape]
    fused = operations_for(image).detection_residual(image, variance, mask, no_data, valid, *edges,
                                                     detection.det_threshold_type if local else None,
                                                     detection.det_threshold)
    if fused is None:
        background = _Background(image, detection.background_bin_size, valid)
        threshold = _threshold(detection, variance) if local else None
        residual = xp.empty(shape, dtype=np.float64)
        above = xp.empty(shape, dtype=bool) if local else None

        def subtract(rows):
            xp.subtract(image[rows], background.rows(rows), out=residual[rows])
            if local:
                xp.logical_and(residual[rows] > threshold(rows), valid[rows], out=above[rows])

        _for_row_blocks(xp, shape, subtract)
    else:
        residual, above = fused
    if not local:
        threshold = _threshold(detection, variance, residual, valid)
        above = xp.empty(shape, dtype=bool)

        def find_above(rows):
            xp.logical_and(residual[rows] > threshold(rows), valid[rows], out=above[rows])

        _for_row_blocks(xp, shape, find_above)
    return residual, above


def _footprint_peaks(residual, labels, n_labels, npix_min, npix_max):
    """(row, col) of the peaks of the footprints of ``npix_min`` pixels or more, in the raster order of
    their first pixels, on the host and where the arrays live.

    The peak is the pixel of largest residual (the smallest flat index among
    equal ones); for footprints of more than ``npix_max`` pixels, the centre
    of the bounding box.  The reductions run where the arrays live
    (:meth:`~gpudiffim._ops.NumpyOperations.footprint_stats`: two launches on
    the kernel path); one read-back, the host's centres from it
    (:func:`~gpudiffim.cutouts.footprint_centres`), and on the kernel path
    the same centres from the same reductions on the device.

    Parameters
    ----------
    residual : ndarray of shape (M, N)
    labels : ndarray of int, shape (M, N)
        Footprint labels ``1 .. n_labels`` (0 outside), any numbering.
    n_labels : int
    npix_min, npix_max : int

    Returns
    -------
    peaks : ndarray of int, shape (n, 2)
    device_centres : ndarray of int32, shape (n, 2), or None
        ``peaks`` where ``residual`` lives (None on the NumPy reference).
    """
    ops = operations_for(residual)
    stats = ops.footprint_stats(residual, labels, n_labels)
    host_stats = to_host(stats)
    centres, keys = footprint_centres(host_stats, residual.shape[1], residual.size, npix_min, npix_max)
    n_kept = int(np.count_nonzero(host_stats[0] >= npix_min))
    peaks = centres[np.argsort(keys, kind="stable")[:n_kept]]
    return peaks, ops.footprint_centres(stats, residual.shape[1], residual.size, npix_min, npix_max, n_kept)


def candidate_positions(candidates):
    """Parent (x, y) positions from a list of pairs or an astropy Table.

    A table must have columns ``x``/``y``, ``xcentroid``/``ycentroid`` or
    ``x_image``/``y_image`` (case-insensitive).

    Returns
    -------
    ndarray of float, shape (n, 2)
    """
    names = getattr(candidates, "colnames", None)
    if names is not None:
        lower = {n.lower(): n for n in names}
        for cx, cy in (("x", "y"), ("xcentroid", "ycentroid"), ("x_image", "y_image")):
            if cx in lower and cy in lower:
                positions = np.stack([np.asarray(candidates[lower[cx]], dtype=float),
                                      np.asarray(candidates[lower[cy]], dtype=float)], axis=1)
                break
        else:
            msg = (f"candidate table needs columns x and y (parent pixels; or xcentroid/ycentroid, "
                   f"x_image/y_image), has {list(names)}")
            raise ConfigurationError(msg)
    else:
        positions = np.asarray(candidates, dtype=float)
        if positions.size == 0:
            positions = positions.reshape(0, 2)
    if positions.ndim != 2 or positions.shape[1] != 2:
        msg = f"candidates must be (x, y) pairs, got an array of shape {positions.shape}"
        raise ConfigurationError(msg)
    if not np.all(np.isfinite(positions)):
        msg = "candidate positions must be finite"
        raise ConfigurationError(msg)
    return positions


def core_snr(science, centres_rc, radius):
    """Mean of S/sigma over the (2r+1)^2 core around each (row, col) centre.

    ``science`` may have NumPy or CuPy planes (computed there); the result is
    a host array (one read-back).
    """
    if len(centres_rc) == 0:
        return np.zeros(0)
    return to_host(core_snr_of(science.image, science.variance, centres_rc, radius))


def rated_fwhms(masked_images, reference, positions, core_radius, *, radius=12, max_stars=50,
                device_centres=None):
    """Core S/N ratings of the stars on ``reference`` and the FWHMs of ``masked_images``, with one read-back.

    The stars are ranked by :func:`core_snr` of ``reference`` at the rounded
    positions (descending, ties in order); the first ``max_stars`` give each
    image's :func:`~gpudiffim.fwhm.estimate_fwhm` (cutouts at the truncated
    positions).  On the kernel path the ranking and the adaptive moments
    run on the device (:meth:`~gpudiffim._ops.NumpyOperations.rated_sigmas`).

    Parameters
    ----------
    masked_images : sequence of MaskedImage
        One or two images on the grid of ``reference`` (NumPy or CuPy planes).
    reference : MaskedImage
    positions : ndarray of shape (n, 2)
        Parent ``(x, y)`` of the stars.
    core_radius : int
        Radius of the core of the ratings (px).
    radius : int
        Half-size of the cutouts (px).
    max_stars : int
    device_centres : ndarray of int32, shape (n, 2), optional
        The integer ``positions`` as ``(row, column)`` from ``reference``'s
        first pixel where its planes live (:func:`detected_centres`), used
        on the kernel path instead of an upload.

    Returns
    -------
    fwhms : tuple of float
        FWHM (px) of each of ``masked_images``.
    ratings : ndarray of float64, shape (n,)

    Raises
    ------
    NoKernelCandidatesError
        If no star gives a valid measurement on an image.
    """
    positions = np.asarray(positions)
    centres_rc = (np.floor(positions + 0.5).astype(int) - np.array(reference.xy0))[:, ::-1]
    star_centres_rc = (positions - np.array(masked_images[0].xy0))[:, ::-1].astype(int)
    values = operations_for(reference.image).rated_sigmas(
        reference.image, reference.variance, [m.image for m in masked_images], centres_rc,
        None if np.array_equal(star_centres_rc, centres_rc) else star_centres_rc, core_radius, radius, max_stars,
        device_centres=device_centres)
    n = len(positions)
    fwhms = tuple(median_fwhm(sigmas) for sigmas in values[n:].reshape(len(masked_images), max_stars))
    return fwhms, values[:n]


def vet_candidates(positions, template, science, half_size, *, bad_mask_planes, core_radius,
                   min_snr, ratings=None, device_centres=None):
    """Keep candidates whose stamp fits in the image, is clean and bright enough.

    Parameters
    ----------
    positions : ndarray of shape (n, 2)
        Parent ``(x, y)``; rounded to the nearest pixel.
    template, science : MaskedImage
        NumPy or CuPy planes (the mask test and the S/N then run on the GPU;
        only per-candidate results come to the host).
    half_size : int
        Stamp half-size ``g``; stamps are ``(2g+1)^2``.
    bad_mask_planes : sequence of str
        Any of these bits in the stamp, on either image, rejects the candidate.
    core_radius : int
        Radius of the core over which the S/N rating is computed.
    min_snr : float
        Minimum rating.
    ratings : ndarray of shape (n,), optional
        :func:`core_snr` of ``science`` at the rounded positions, if already
        computed (the task ranks the stars for the PSF size with them).
    device_centres : ndarray of int32, shape (n, 2), optional
        The integer ``positions`` as ``(row, column)`` from ``science``'s
        first pixel where its planes live (:func:`detected_centres`): the
        mask test then uploads at most an index of the stamps inside.

    Returns
    -------
    kept : Candidates
    rejected : dict of RejectReason to int
        Count of candidates dropped for each reason: ``STAMP_OUTSIDE``,
        ``BAD_MASK`` and ``LOW_SNR``, in that order (zeros included).
    """
    x0, y0 = science.xy0
    centres = np.floor(positions + 0.5).astype(int) - np.array([x0, y0])
    inside = stamps_fit(centres, science.shape, half_size)
    bad_bits = science.bits(bad_mask_planes) | template.bits(bad_mask_planes)
    centres_rc = centres[:, ::-1]
    clean = inside.copy()
    ops = operations_for(science.mask)
    if device_centres is not None and not inside.all():
        device_centres = ops.select_rows(device_centres, np.flatnonzero(inside))
    clean[inside] = ~ops.stamps_flagged(science.mask, template.mask, centres_rc[inside], half_size, bad_bits,
                                        device_centres=device_centres)
    rating = np.full(len(positions), -np.inf)
    rating[clean] = (core_snr(science, centres_rc[clean], core_radius) if ratings is None
                     else np.asarray(ratings, dtype=np.float64)[clean])
    bright = rating >= min_snr
    rejected = {RejectReason.STAMP_OUTSIDE: int((~inside).sum()),
                RejectReason.BAD_MASK: int((inside & ~clean).sum()),
                RejectReason.LOW_SNR: int((clean & ~bright).sum())}
    ids = np.flatnonzero(bright)
    kept = Candidates.from_arrays(ids, centres[ids, 0] + x0, centres[ids, 1] + y0, rating[ids])
    return kept, rejected


def require_candidates(candidates, minimum=1):
    """Raise :class:`NoKernelCandidatesError` if fewer than ``minimum`` are usable."""
    if len(candidates) < minimum:
        msg = (f"only {len(candidates)} usable kernel candidate(s), need at least {minimum}: "
               f"lower detection.det_threshold or detection.min_snr, or pass candidates= "
               f"(command line: --candidates FILE)")
        raise NoKernelCandidatesError(msg)
