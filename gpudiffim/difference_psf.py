"""The PSF of a difference (or score) image, at any position.

A point source in ``D = S - T * K`` has the science PSF when the template is
convolved, and the template's PSF when the science image is convolved (``S * K``
matches ``T``).  A raw score ``S * P - T * K`` has the science PSF correlated
with ``P``.  Decorrelation multiplies the transform by ``phi(x, y)``
(:mod:`gpudiffim.decorrelation`), so the PSF of the decorrelated image is
that PSF convolved with the decorrelation kernel *at that position*: it
varies over the image as the matching kernel does.  Rubin attaches no PSF to
its decorrelated difference (DM-47461); :class:`DifferencePsf` is that PSF.
"""

import numpy as np
import scipy.fft
import scipy.signal

from .errors import ShapeError
from .gaussian import fwhm_to_sigma

__all__ = ["DifferencePsf", "gaussian_psf", "preconvolved_psf", "difference_psf_table"]


def gaussian_psf(fwhm_pix):
    """Unit-sum circular Gaussian PSF image of a FWHM, ``(2 h + 1)^2`` with ``h = ceil(3 FWHM)``.

    Parameters
    ----------
    fwhm_pix : float
        FWHM in pixels.

    Returns
    -------
    ndarray of shape (2 h + 1, 2 h + 1)
    """
    half = int(np.ceil(3.0 * fwhm_pix))
    profile = np.exp(-0.5 * (np.arange(-half, half + 1) / fwhm_to_sigma(fwhm_pix)) ** 2)
    image = np.outer(profile, profile)
    return image / image.sum()


def preconvolved_psf(psf):
    """PSF of an image whose PSF is ``psf`` after correlation with ``psf`` (score mode).

    Parameters
    ----------
    psf : ndarray of shape (m, m)

    Returns
    -------
    ndarray of shape (2 m - 1, 2 m - 1), unit sum
    """
    out = scipy.signal.fftconvolve(psf, psf[::-1, ::-1], mode="full")
    return out / out.sum()


def _check_psf(psf):
    psf = np.asarray(psf, dtype=np.float64)
    if psf.ndim != 2 or psf.shape[0] != psf.shape[1] or psf.shape[0] % 2 == 0:
        msg = f"psf must be an odd square 2-D array, got shape {psf.shape}"
        raise ShapeError(msg)
    return psf / psf.sum()


class DifferencePsf:
    """The PSF of a difference image: a base PSF, decorrelated where the image was.

    Parameters
    ----------
    psf : ndarray of shape (m, m)
        PSF of the image before decorrelation (odd square; normalised to
        unit sum here).
    decorrelation : DecorrelationModel, optional
        The decorrelation applied to the image, if any.
    source : str
        What the base PSF is (e.g. "science", "template", "preconvolved
        science"); recorded for provenance.

    Raises
    ------
    ShapeError
        If ``psf`` is not an odd square 2-D array.

    Examples
    --------
    >>> psf = DifferencePsf(gaussian_psf(4.0), source="science")
    >>> image = psf.image(100.0, 200.0)
    >>> image.shape, round(float(image.sum()), 6)
    ((25, 25), 1.0)
    """

    def __init__(self, psf, decorrelation=None, *, source="science"):
        self.base = _check_psf(psf)
        self.decorrelation = decorrelation
        self.source = source

    @property
    def shape(self):
        """Shape (rows, columns) of the images :meth:`image` returns."""
        return self.base.shape

    def image(self, x, y):
        """The PSF at parent position ``(x, y)``: unit sum, centred, of shape :attr:`shape`.

        Parameters
        ----------
        x, y : float
            Parent pixel position.

        Returns
        -------
        ndarray of shape (m, m)
        """
        if self.decorrelation is None:
            return self.base.copy()
        half = self.base.shape[0] // 2
        reach = max(half, 2 * max(self.decorrelation.kernel.shape))
        side = scipy.fft.next_fast_len(2 * (half + reach) + 1, real=True)
        padded = np.zeros((side, side))
        padded[:self.base.shape[0], :self.base.shape[1]] = self.base
        padded = np.roll(padded, (-half, -half), axis=(0, 1))
        phi = self.decorrelation.spectrum(x, y, (side, side))
        out = scipy.fft.irfft2(scipy.fft.rfft2(padded) * phi, s=(side, side))
        out = np.roll(out, (half, half), axis=(0, 1))[:2 * half + 1, :2 * half + 1]
        return out / out.sum()

    def __repr__(self):
        state = "decorrelated" if self.decorrelation is not None else "not decorrelated"
        return f"DifferencePsf({self.source} PSF {self.shape[0]}x{self.shape[1]}, {state})"


def difference_psf_table(psf, bbox, n_per_axis=3):
    """The PSF on a grid of positions, as a table for a FITS binary-table HDU.

    Parameters
    ----------
    psf : DifferencePsf
    bbox : tuple of int
        ``(x0, y0, x1, y1)`` parent box (inclusive) of the image.
    n_per_axis : int
        Grid positions per axis (corners included).

    Returns
    -------
    astropy.table.Table
        Columns ``x``, ``y`` (parent px) and ``psf`` (one image per row);
        ``meta`` holds ``SOURCE`` and ``DECORR``.
    """
    from astropy.table import Table

    xs = np.linspace(bbox[0], bbox[2], n_per_axis)
    ys = np.linspace(bbox[1], bbox[3], n_per_axis)
    grid_x, grid_y = (a.ravel() for a in np.meshgrid(xs, ys))
    images = np.array([psf.image(x, y) for x, y in zip(grid_x, grid_y)])
    table = Table({"x": grid_x, "y": grid_y, "psf": images})
    table.meta["SOURCE"] = psf.source
    table.meta["DECORR"] = psf.decorrelation is not None
    return table
