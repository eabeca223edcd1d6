"""Stamp geometry: whether a stamp lies inside an image, the one stamp cutter, per-stamp and per-footprint reductions.

A bottom-layer module (it needs only the array-module helpers), shared by
candidate vetting, the PSF-size measurement, the stamp fits and the quality
report; it also holds the NumPy references of the detection kernels'
reductions (:func:`stamps_flagged`, :func:`footprint_stats`).  Centres are
integer pixels relative to the image origin; a stamp of half-size ``r`` is
the ``(2r + 1)^2`` box around its centre.
"""

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ._backend import array_module_of, on_device, row_blocks, scatter_at, to_host

__all__ = ["check_inside", "stamps_fit", "cut_planes", "cut_stamps", "stamps_flagged", "footprint_stats",
           "footprint_centres", "FOOTPRINT_ROWS"]

#: Rows of :func:`footprint_stats`; ``~`` marks a minimum kept as the maximum of complements.
FOOTPRINT_ROWS = ("area", "~first", "last", "~col_min", "col_max", "peak_key", "~peak")


def stamps_fit(centres, shape, half_size):
    """Whether the ``(2 half_size + 1)^2`` stamp around each centre lies inside an image.

    Parameters
    ----------
    centres : ndarray of int, shape (N, 2)
        ``(x, y)`` centres relative to the image origin (column, row).
    shape : tuple of int
        Image ``(rows, columns)``.
    half_size : int

    Returns
    -------
    ndarray of bool, shape (N,)

    Examples
    --------
    >>> stamps_fit(np.array([[2, 2], [1, 5]]), (10, 10), 2).tolist()
    [True, False]
    """
    limits = np.array(shape[::-1]) - half_size
    return np.all((centres >= half_size) & (centres < limits), axis=1)


def cut_stamps(plane, centres_rc, radius, *, clamp=False):
    """Stack of the stamps of ``plane`` around each centre, cut where the plane lives.

    The one stamp cutter: the stamp fits, the quality report, the mask test
    of candidate vetting, the S/N rating and the PSF-size measurement all cut
    with it.  Only the centres cross to the device (NumPy or CuPy plane; see
    :func:`cut_planes`).

    Parameters
    ----------
    plane : ndarray of shape (M, N)
        NumPy or CuPy array.
    centres_rc : array_like of int, shape (n, 2)
        ``(row, column)`` centres relative to the image origin.
    radius : int or (int, int)
        Stamp half-size (px), or the half-sizes ``(rows, columns)`` of a
        rectangular stamp.
    clamp : bool
        If True, pixels beyond an edge repeat the nearest edge pixel, so every
        centre gives a full stamp (detection).  If False, every stamp must lie
        inside the plane.

    Returns
    -------
    ndarray of shape (n, 2 rows + 1, 2 columns + 1)
        In the dtype and the array module of ``plane``.

    Raises
    ------
    ValueError
        If ``clamp`` is False and a stamp does not lie inside the plane.

    Examples
    --------
    >>> plane = np.arange(9.0).reshape(3, 3)
    >>> cut_stamps(plane, [[1, 1]], 1)[0].tolist()
    [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0], [6.0, 7.0, 8.0]]
    >>> cut_stamps(plane, [[0, 0]], 1, clamp=True)[0].tolist()
    [[0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [3.0, 3.0, 4.0]]
    >>> cut_stamps(plane, [[2, 1]], (0, 1))[0].tolist()
    [[6.0, 7.0, 8.0]]
    """
    return cut_planes((plane,), centres_rc, radius, clamp=clamp)[0]


def cut_planes(planes, centres_rc, radius, *, clamp=False):
    """:func:`cut_stamps` of several planes of one shape, sharing one index.

    On the host, stamps lying inside are gathered as whole windows of a
    sliding-window view (about 20 times faster than indexing by rows and
    columns).  Otherwise only the centres cross to the device (``n x 2``
    int32); the row and column indices are built there once and used for
    every plane.

    Returns
    -------
    list of ndarray
        One ``(n, 2 rows + 1, 2 columns + 1)`` stack per plane.
    """
    plane = planes[0]
    xp = array_module_of(plane)
    half_rows, half_cols = (radius, radius) if np.ndim(radius) == 0 else radius
    centres_rc = np.asarray(centres_rc, dtype=np.int64).reshape(-1, 2)
    n_rows, n_cols = plane.shape
    if not clamp:
        check_inside(centres_rc, radius, plane.shape)
        if not on_device(xp):
            window = (2 * half_rows + 1, 2 * half_cols + 1)
            corners = centres_rc - np.array([half_rows, half_cols])
            return [sliding_window_view(p, window)[corners[:, 0], corners[:, 1]] for p in planes]
    centres = xp.asarray(centres_rc.astype(np.int32 if max(n_rows, n_cols) < 2**31 else np.int64))
    rows = centres[:, 0, None] + xp.arange(-half_rows, half_rows + 1, dtype=centres.dtype)
    cols = centres[:, 1, None] + xp.arange(-half_cols, half_cols + 1, dtype=centres.dtype)
    if clamp:
        rows, cols = xp.clip(rows, 0, n_rows - 1), xp.clip(cols, 0, n_cols - 1)
    rows, cols = rows[:, :, None], cols[:, None, :]
    return [p[rows, cols] for p in planes]


def check_inside(centres_rc, radius, shape):
    """Raise ValueError naming the first stamp (``radius`` as :func:`cut_stamps`) not inside an image of ``shape``."""
    half_rows, half_cols = (radius, radius) if np.ndim(radius) == 0 else radius
    n_rows, n_cols = shape
    outside = ((centres_rc[:, 0] - half_rows < 0) | (centres_rc[:, 0] + half_rows >= n_rows)
               | (centres_rc[:, 1] - half_cols < 0) | (centres_rc[:, 1] + half_cols >= n_cols))
    if outside.any():
        k = int(np.flatnonzero(outside)[0])
        msg = (f"{int(outside.sum())} stamp(s) of half-size {radius} do not fit in the image "
               f"of shape {shape}, first centred at (row, column) ({centres_rc[k, 0]}, "
               f"{centres_rc[k, 1]}) from its first pixel")
        raise ValueError(msg)


def stamps_flagged(mask_a, mask_b, centres_rc, half_size, bad_bits):
    """Whether a ``bad_bits`` bit of either mask lies in the ``(2 half_size + 1)^2`` box of each centre.

    Every box must lie inside the masks.  ``column_any[s, c]``: whether a
    pixel of column ``c`` in rows ``s .. s + 2g`` is flagged, by doubling
    (OR of the flags with their shifts by 1, 2, 4, ... rows, then of two
    overlapping power-of-two windows); a box is flagged iff one of its ``2g+1``
    columns is.  Computed where the masks live (host row blocks with a halo
    of ``2g`` rows).

    Parameters
    ----------
    mask_a, mask_b : ndarray of int, shape (M, N)
    centres_rc : ndarray of int, shape (n, 2)
        ``(row, column)`` centres relative to the masks' origin.
    half_size : int
    bad_bits : int

    Returns
    -------
    ndarray of bool, shape (n,)
        A host array.
    """
    if len(centres_rc) == 0:
        return np.zeros(0, dtype=bool)
    xp = array_module_of(mask_a)
    ny, nx = mask_a.shape
    size = 2 * half_size + 1
    power = 1 << (size.bit_length() - 1)
    column_any = xp.empty((ny - size + 1, nx), dtype=bool)
    for rows in row_blocks(xp, column_any.shape, 4 * size):
        halo = slice(rows.start, rows.stop + size - 1)
        window = ((mask_a[halo] | mask_b[halo]) & bad_bits) != 0
        span = 1
        while span < power:
            window = window[:-span] | window[span:]
            span *= 2
        n = rows.stop - rows.start
        xp.logical_or(window[:n], window[size - power:size - power + n], out=column_any[rows])
    # row s of column_any, the box top, across the box's 2g+1 columns: a (1, 2g+1) stamp
    box_tops = np.asarray(centres_rc) - np.array([half_size, 0])
    return to_host(cut_stamps(column_any, box_tops, (0, half_size)).any(axis=(1, 2)))


def _order_key(xp, values):
    """uint64 keys ordered as the float64 ``values`` (-0.0 and 0.0 alike; no NaN).

    Segment maxima are taken on these integer keys: CuPy 14's float64 atomic
    max rounds through float32 (``fmaxf`` in ``cupy/atomics.cuh``), so
    ``cupy.maximum.at`` is not exact for float64.
    """
    bits = (values.astype(np.float64) + 0.0).view(np.uint64)
    negative = (bits >> np.uint64(63)) == np.uint64(1)
    return xp.where(negative, ~bits, bits | np.uint64(1 << 63))


def footprint_stats(residual, labels, n_labels):
    """Per-footprint reductions of a labelled image, where the arrays live.

    Parameters
    ----------
    residual : ndarray of float64, shape (M, N)
    labels : ndarray of int, shape (M, N)
        0 outside the footprints, ``1 .. n_labels`` inside.
    n_labels : int

    Returns
    -------
    ndarray of uint64, shape (7, n_labels)
        Column ``l - 1`` for label ``l``; rows :data:`FOOTPRINT_ROWS`: the
        area, the complement ``~`` of the first flat index, the last one,
        ``~`` the smallest column, the largest column, the largest order key
        of the residual (unsigned, ordered as the float64 values), ``~`` the
        smallest flat index of a pixel holding that key (the peak).
    """
    xp = array_module_of(residual)
    index_type = np.int32 if residual.size < 2**31 else np.int64    # int32 reductions: 2-3x faster on the host
    none = np.iinfo(index_type).max
    index = xp.flatnonzero(labels != 0).astype(index_type)     # of a bool plane: 5x faster on the host
    segment = labels.ravel()[index] - 1
    column = index % index_type(residual.shape[1])
    key = _order_key(xp, residual.ravel()[index])
    peak_key = xp.zeros(n_labels, dtype=np.uint64)
    scatter_at(xp, np.maximum, peak_key, segment, key)
    reduced = []
    for ufunc, values in ((np.minimum, index), (np.maximum, index), (np.minimum, column), (np.maximum, column),
                          (np.minimum, xp.where(key == peak_key[segment], index, none))):
        target = xp.full(n_labels, none if ufunc is np.minimum else 0, dtype=index_type)
        scatter_at(xp, ufunc, target, segment, values)
        reduced.append(target.astype(np.uint64))
    first, last, col_min, col_max, peak = reduced
    area = xp.bincount(segment, minlength=n_labels).astype(np.uint64)
    return xp.stack([area, ~first, last, ~col_min, col_max, peak_key, ~peak])


def footprint_centres(stats, n_cols, n_pixels, npix_min, npix_max):
    """Centre of each footprint and its order key, from host :func:`footprint_stats`.

    Parameters
    ----------
    stats : ndarray of uint64, shape (7, n_labels)
        :func:`footprint_stats` of an image of ``n_pixels`` pixels in rows of
        ``n_cols``.
    n_cols, n_pixels : int
    npix_min, npix_max : int
        Footprints of fewer than ``npix_min`` pixels sort last; those of more
        than ``npix_max`` are centred on their bounding box.

    Returns
    -------
    centres : ndarray of int64, shape (n_labels, 2)
        ``(row, column)`` of each footprint's peak pixel (the first in raster
        order among equal maxima), or the 1-px centre of its bounding box.
    keys : ndarray of uint64, shape (n_labels,)
        The first flat index, plus ``n_pixels`` below ``npix_min`` pixels:
        distinct keys whose sort lists the footprints kept in the raster order
        of their first pixel (``gdi_footprint_centres`` computes the same).
    """
    stats = np.array(stats, dtype=np.uint64)
    stats[[1, 3, 6]] = ~stats[[1, 3, 6]]     # minima kept as maxima of complements
    area, first, last, col_min, col_max, _, peak = stats.astype(np.int64)
    big = area > npix_max
    rows = np.where(big, (first // n_cols + last // n_cols) // 2, peak // n_cols)
    cols = np.where(big, (col_min + col_max) // 2, peak % n_cols)
    keys = (first + np.where(area < npix_min, n_pixels, 0)).astype(np.uint64)
    return np.stack([rows, cols], axis=1), keys
