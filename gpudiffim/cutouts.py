"""Stamp geometry: whether a stamp lies inside an image, and edge-clamped cutouts.

A bottom-layer module (it needs only the array-module helpers), shared by
candidate vetting, the PSF-size measurement and the stamp fits.  Centres are
integer pixels relative to the image origin; a stamp of half-size ``r`` is
the ``(2r + 1)^2`` box around its centre.
"""

import numpy as np

from ._backend import array_module_of, to_host

__all__ = ["stamps_fit", "cut_stamps"]


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


def cut_stamps(plane, centres_rc, radius):
    """Host stack of ``(2 radius + 1)^2`` stamps of ``plane``, clamped at the image edges.

    Pixels beyond an edge repeat the nearest edge pixel, so every centre
    gives a full stamp.  The cut is made where the plane lives (NumPy or
    CuPy), so only the stamps cross to the host.

    Parameters
    ----------
    plane : ndarray of shape (M, N)
        NumPy or CuPy array.
    centres_rc : ndarray of int, shape (n, 2)
        ``(row, column)`` centres relative to the image origin.
    radius : int
        Stamp half-size (px).

    Returns
    -------
    ndarray of shape (n, 2 radius + 1, 2 radius + 1)
        In the dtype of ``plane``, on the host.

    Examples
    --------
    >>> cut_stamps(np.arange(9.0).reshape(3, 3), np.array([[0, 0]]), 1)[0].tolist()
    [[0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [3.0, 3.0, 4.0]]
    """
    xp = array_module_of(plane)
    offsets = np.arange(-radius, radius + 1)
    centres_rc = np.asarray(centres_rc)
    rows = np.clip(centres_rc[:, 0, None, None] + offsets[None, :, None], 0, plane.shape[0] - 1)
    cols = np.clip(centres_rc[:, 1, None, None] + offsets[None, None, :], 0, plane.shape[1] - 1)
    return to_host(plane[xp.asarray(rows), xp.asarray(cols)])
