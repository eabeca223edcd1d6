"""Launch geometry and host wrappers of ``kernels/detection.cu``.

Footprint reductions of detection, the core S/N ratings and the stars'
adaptive moments of the PSF-size measurement, and the mask test of candidate
vetting, each in one or two launches.  The wrappers take NumPy arrays (run by
the CPU emulator) or CuPy arrays (run on the GPU), as
:func:`~gpudiffim._cuda.launch.launcher_for` says; nothing is read back here.
"""

import numpy as np

from ..cutouts import FOOTPRINT_ROWS
from ._host import centres_in, on_launcher, prepare
from .launch import launch
from .signatures import float_ctype

__all__ = ["DETECTION_DEFINES", "DETECTION_THREADS", "STAR_MAX_RADIUS", "footprint_stats", "footprint_centres",
           "rated_sigmas", "select_rows", "packed_mask",
           "stamps_flagged", "detection_residual", "interpolated_background", "THRESHOLD_KINDS"]

#: Threads per block of the per-centre block kernels (``GDI_DET_THREADS``; a power of two).
DETECTION_THREADS = 64
#: Largest cutout half-size of ``gdi_star_sigmas`` (``GDI_DET_MAX_SIDE = 2 r + 1`` in shared memory).
STAR_MAX_RADIUS = 24
#: The unit's compile-time constants.
DETECTION_DEFINES = (("GDI_DET_THREADS", DETECTION_THREADS), ("GDI_DET_MAX_SIDE", 2 * STAR_MAX_RADIUS + 1))
#: Blocks of the grid-stride pixel scans.
_SCAN_BLOCKS = 1024


def _per_centre(n):
    """``(grid, block)``: one thread per centre."""
    return (max(-(-int(n) // DETECTION_THREADS), 1),), (DETECTION_THREADS,)


def _pixel_blocks(n_pixels):
    """Grid of a grid-stride pass over ``n_pixels`` pixels (at most :data:`_SCAN_BLOCKS` blocks)."""
    return (min(_SCAN_BLOCKS, max(-(-int(n_pixels) // DETECTION_THREADS), 1)),)


def footprint_stats(residual, labels, n_labels):
    """:func:`gpudiffim.cutouts.footprint_stats` (same arguments and result) by ``gdi_footprint_scan``
    and ``gdi_footprint_peak``: two grid-stride pixel scans with atomic maxima, no read-back."""
    _, xp = on_launcher(residual, labels)
    residual = prepare(xp, residual, np.float64, 2, "residual")
    labels = prepare(xp, labels, np.int32, 2, "labels")
    if residual.size >= 2**31 or residual.shape != labels.shape:
        msg = f"residual {residual.shape} and labels {labels.shape} must match, below 2^31 pixels"
        raise ValueError(msg)
    stats = xp.zeros((len(FOOTPRINT_ROWS), n_labels), dtype=np.uint64)
    if n_labels:
        blocks = _pixel_blocks(residual.size)
        launch("gdi_footprint_scan", blocks, (DETECTION_THREADS,),
               (residual, labels, residual.size, residual.shape[1], n_labels, stats), defines=DETECTION_DEFINES)
        launch("gdi_footprint_peak", blocks, (DETECTION_THREADS,),
               (residual, labels, residual.size, n_labels, stats), defines=DETECTION_DEFINES)
    return stats


def footprint_centres(stats, n_cols, n_pixels, npix_min, npix_max, n_kept):
    """The ``n_kept`` kept footprints' centres from :func:`footprint_stats`, where the stats live.

    ``gdi_footprint_centres`` (each footprint's ``(row, column)`` centre and
    order key, as :func:`gpudiffim.cutouts.footprint_centres`), a sort of the
    keys (distinct: any sort is stable) and one gather: int32 ``(n_kept, 2)``,
    the footprints of ``npix_min`` pixels or more in the raster order of their
    first pixel.  ``n_kept`` is the host's count of those (from its copy of
    the stats), so nothing is read back.
    """
    _, xp = on_launcher(stats)
    stats = prepare(xp, stats, np.uint64, 2, "stats")
    n_labels = stats.shape[1]
    centres = xp.empty((n_labels, 2), dtype=np.int32)
    keys = xp.empty(n_labels, dtype=np.uint64)
    if n_labels:
        launch("gdi_footprint_centres", *_per_centre(n_labels),
               (stats, n_labels, int(n_cols), int(n_pixels), int(npix_min), int(npix_max), centres, keys),
               defines=DETECTION_DEFINES)
    return centres[keys.argsort()[:n_kept]]


def packed_mask(selected):
    """Host bool ``selected`` (n,) as the int32 words of ``gdi_select_rows`` (bit k % 32 of word k / 32)."""
    selected = np.asarray(selected, dtype=bool).ravel()
    packed = np.packbits(selected, bitorder="little")
    words = np.zeros(-(-len(packed) // 4) * 4, dtype=np.uint8)
    words[:len(packed)] = packed
    return words.view("<u4").astype(np.uint32).view(np.int32)


def select_rows(rows, selected):
    """``rows[selected]`` by ``gdi_select_rows``: the host's bool ``selected`` goes as a packed mask (n / 8
    bytes) and the count is the host's, so nothing is read back.

    Parameters
    ----------
    rows : ndarray of int32, shape (n, width)
    selected : ndarray of bool, shape (n,)
        Host decisions.

    Returns
    -------
    ndarray of int32, shape (selected.sum(), width)
        In the rows' array module.
    """
    _, xp = on_launcher(rows)
    rows = prepare(xp, rows, np.int32, 2, "rows")
    selected = np.asarray(selected, dtype=bool)
    if selected.shape != rows.shape[:1]:
        msg = f"selection of shape {selected.shape} for {rows.shape[0]} rows"
        raise ValueError(msg)
    out = xp.empty((int(np.count_nonzero(selected)), rows.shape[1]), dtype=np.int32)
    if len(out):
        launch("gdi_select_rows", (1,), (DETECTION_THREADS,),
               (xp.asarray(packed_mask(selected)), len(selected), rows, rows.shape[1], out), defines=DETECTION_DEFINES)
    return out


def rated_sigmas(image, variance, images, centres_rc, star_centres_rc, core_radius, radius, max_stars, *,
                 n_iter=30, initial=2.0):
    """Core S/N ratings of every centre and the adaptive sigmas of the best-rated stars, in one buffer.

    ``gdi_core_snr`` (the mean S/sigma of ``image`` over the clamped core of
    each centre), then ``gdi_star_sigmas`` (the adaptive-moment sigma, px,
    of the ``max_stars`` best-rated stars on each of ``images``).

    Parameters
    ----------
    image, variance : ndarray of shape (M, N)
        The rated planes (one float dtype).
    images : sequence of 1 or 2 ndarray (M, N)
        The planes measured (one float dtype).
    centres_rc : ndarray of int, shape (n, 2)
        ``(row, column)`` centres of the ratings, relative to the image origin.
    star_centres_rc : ndarray of int, shape (n, 2), or None
        Centres of the cutouts of the same stars (None: ``centres_rc``).
    core_radius : int
    radius : int
        Cutout half-size, at most :data:`STAR_MAX_RADIUS`.
    max_stars : int
    n_iter : int
    initial : float
        Starting weight sigma (px).

    Returns
    -------
    ndarray of float64, shape (n + len(images) * max_stars,)
        The ratings (rounded to the planes' dtype), then per image the sigmas
        in descending order of rating (NaN last, ties by index); NaN where
        the moments are invalid or beyond the ``n`` stars.
    """
    if not 1 <= len(images) <= 2 or radius > STAR_MAX_RADIUS:
        msg = f"rated_sigmas takes 1 or 2 images and radius <= {STAR_MAX_RADIUS}, got {len(images)}, {radius}"
        raise ValueError(msg)
    _, xp = on_launcher(image, variance, *images)
    image, variance = (prepare(xp, plane, image.dtype, 2, "planes") for plane in (image, variance))
    images = [prepare(xp, plane, images[0].dtype, 2, "images") for plane in images]
    centres = centres_in(xp, centres_rc)
    star_centres = centres if star_centres_rc is None else centres_in(xp, star_centres_rc)
    n = len(centres)
    values = xp.full(n + len(images) * max_stars, np.nan)
    if n:
        grid, block = _per_centre(n)
        launch(f"gdi_core_snr<{float_ctype('image', image.dtype)}>", grid, block,
               (image, variance, *image.shape, centres, n, int(core_radius), values), defines=DETECTION_DEFINES)
        launch(f"gdi_star_sigmas<{float_ctype('images', images[0].dtype)}>", (n,), (DETECTION_THREADS,),
               (images[0], images[-1], len(images), *images[0].shape, centres, star_centres, n, int(radius),
                int(max_stars), int(n_iter), float(initial), values), defines=DETECTION_DEFINES)
    return values


def stamps_flagged(mask_a, mask_b, centres_rc, half_size, bad_bits):
    """``gdi_stamps_flagged``: int32 (n,), 1 where a ``bad_bits`` bit of either mask lies in the stamp.

    Every ``(2 half_size + 1)^2`` stamp must lie inside the (M, N) int32 masks.
    """
    _, xp = on_launcher(mask_a, mask_b)
    mask_a, mask_b = (prepare(xp, m, np.int32, 2, "masks") for m in (mask_a, mask_b))
    centres = centres_in(xp, centres_rc)
    n = len(centres)
    flagged = xp.empty(n, dtype=np.int32)
    if n:
        grid, block = _per_centre(n)
        launch("gdi_stamps_flagged", grid, block,
               (mask_a, mask_b, mask_a.shape[1], centres, n, int(half_size), int(bad_bits), flagged),
               defines=DETECTION_DEFINES)
    return flagged


#: Threshold kinds of ``gdi_detection_residual`` (``None``: the residual only, the threshold set after).
THRESHOLD_KINDS = {None: 0, "pixel_stdev": 1, "value": 2}


def _fill_and_interpolate(image, variance, mask, no_data, grid, kind, threshold, residual, above):
    """``gdi_fill_grid`` (one block per plane's grid, in place) then ``gdi_detection_residual``."""
    n_images = grid.size // (grid.shape[-2] * grid.shape[-1]) if grid.size else 0
    if residual.size >= 2**31 or grid.shape[-2:] == (0, 0) or not n_images:
        msg = f"a background of {residual.shape} below 2^31 pixels needs a grid per plane, got {grid.shape}"
        raise ValueError(msg)
    n_rows, n_cols = residual.shape[-2:]
    launch("gdi_fill_grid", (n_images,), (DETECTION_THREADS,), (grid, grid.shape[-2] * grid.shape[-1]),
           defines=DETECTION_DEFINES)
    launch(f"gdi_detection_residual<{float_ctype('image', image.dtype)}>", _pixel_blocks(residual.size),
           (DETECTION_THREADS,), (image, variance, mask, n_images, n_rows, n_cols, int(no_data), grid,
                                  *grid.shape[-2:], kind, float(threshold), residual, above),
           defines=DETECTION_DEFINES)


def detection_residual(image, variance, mask, no_data, grid, threshold_kind, threshold):
    """``gdi_fill_grid`` then ``gdi_detection_residual``: the residual of the background and the detections.

    Parameters
    ----------
    image, variance : ndarray of shape (M, N)
        One float dtype.
    mask : ndarray of int32, shape (M, N)
    no_data : int
        Bits of pixels never detected.
    grid : ndarray of float64, shape (n_bins_y, n_bins_x)
        Bin medians (NaN where empty; filled in place); the bins are those
        of ``np.linspace(0, n, n_bins + 1).astype(int)`` edges.
    threshold_kind : {None, "pixel_stdev", "value"}
    threshold : float

    Returns
    -------
    residual : ndarray of float64, shape (M, N)
    above : ndarray of int32, shape (M, N), or None
        1 where a valid pixel's residual exceeds the threshold (None for
        ``threshold_kind=None``).
    """
    _, xp = on_launcher(image, variance, mask, grid)
    image, variance = (prepare(xp, plane, image.dtype, 2, "planes") for plane in (image, variance))
    mask = prepare(xp, mask, np.int32, 2, "mask")
    grid = prepare(xp, grid, np.float64, 2, "grid")
    kind = THRESHOLD_KINDS[threshold_kind]
    residual = xp.empty(image.shape, dtype=np.float64)
    above = xp.empty(image.shape if kind else 0, dtype=np.int32)
    _fill_and_interpolate(image, variance, mask, no_data, grid, kind, threshold, residual, above)
    return residual, above if kind else None


def interpolated_background(grid, shape):
    """``gdi_fill_grid`` then ``gdi_detection_residual`` (kind -1): the background of each plane.

    Parameters
    ----------
    grid : ndarray of float64, shape (n_bins_y, n_bins_x) or (B, n_bins_y, n_bins_x)
        Bin medians of each plane (NaN where empty; filled in place), bins as
        in :func:`detection_residual`.
    shape : tuple of int
        ``(M, N)``, or ``(B, M, N)`` for a stack.

    Returns
    -------
    ndarray of float64, shape ``shape``
    """
    _, xp = on_launcher(grid)
    grid = prepare(xp, grid, np.float64, grid.ndim, "grid")
    out = xp.empty(shape, dtype=np.float64)
    unused = xp.empty(0, dtype=np.int32)
    _fill_and_interpolate(out, out, unused, 0, grid, -1, 0.0, out, unused)
    return out
