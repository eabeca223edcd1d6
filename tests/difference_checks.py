"""Measurements on difference images shared by the decorrelation, direction and score tests."""

import numpy as np
import scipy.ndimage


def sky_pixels(shape, positions, radius=12, border=40):
    """Boolean map of the pixels farther than ``radius`` (box) from every position and ``border`` from the edge.

    ``positions`` are array (x, y) coordinates.
    """
    keep = np.ones(shape, dtype=bool)
    for x, y in np.asarray(positions):
        x, y = int(round(x)), int(round(y))
        keep[max(y - radius, 0):y + radius + 1, max(x - radius, 0):x + radius + 1] = False
    keep[:border], keep[-border:], keep[:, :border], keep[:, -border:] = False, False, False, False
    return keep


def lag1_correlation(image, keep):
    """Correlation coefficient of horizontally adjacent pixels that are both in ``keep``."""
    values = np.asarray(image, dtype=np.float64) - np.median(image[keep])
    both = keep[:, :-1] & keep[:, 1:]
    left, right = values[:, :-1][both], values[:, 1:][both]
    return float(np.sum(left * right) / np.sqrt(np.sum(left**2) * np.sum(right**2)))


def psf_flux(image, psf, x, y):
    """Least-squares PSF flux of a source at array position ``(x, y)``, or NaN off the image.

    The PSF is moved to the source's sub-pixel position (Fourier shift) first.
    """
    h = psf.shape[0] // 2
    ix, iy = int(round(x)), int(round(y))
    psf = np.fft.ifft2(scipy.ndimage.fourier_shift(np.fft.fft2(psf), (y - iy, x - ix))).real
    x, y = ix, iy
    cut = np.asarray(image[y - h:y + h + 1, x - h:x + h + 1], dtype=np.float64)
    if y < h or x < h or cut.shape != psf.shape:
        return np.nan
    return float(np.sum(cut * psf) / np.sum(psf**2))


def transient_fluxes(result, stars, minimum_flux=0.0, border=40):
    """PSF fluxes of the simulated transients on ``result.subtracted_image``, with ``result.difference_psf``.

    Transients within ``border`` px of an edge are left out (near the EDGE pixels, which are
    not decorrelated, a decorrelated pixel misses part of its neighbourhood).
    """
    image = result.subtracted_image.image
    rows, columns = image.shape
    inside = ((stars["x"] >= border) & (stars["x"] < columns - border) & (stars["y"] >= border)
              & (stars["y"] < rows - border))
    transients = stars[(stars["kind"] == "transient") & (stars["science_flux"] >= minimum_flux) & inside]
    return np.array([psf_flux(image, result.difference_psf.image(s["x"], s["y"]), s["x"], s["y"])
                     for s in transients])
