"""Stamp geometry: whether a stamp lies inside an image, and the one stamp cutter.

A bottom-layer module (it needs only the array-module helpers), shared by
candidate vetting, the PSF-size measurement, the stamp fits and the quality
report.  Centres are integer pixels relative to the image origin; a stamp of
half-size ``r`` is the ``(2r + 1)^2`` box around its centre.
"""

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ._backend import array_module_of, on_device

__all__ = ["check_inside", "stamps_fit", "cut_planes", "cut_stamps"]


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
