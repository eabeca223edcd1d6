"""Widths of a Gaussian profile: full width at half maximum and standard deviation.

A bottom-layer module (NumPy only), so that the kernel basis, the PSF-size
measurement, the exposure container and the simulator share one constant
without importing one another.
"""

import numpy as np

__all__ = ["SIGMA_TO_FWHM", "fwhm_to_sigma", "sigma_to_fwhm"]

#: FWHM of a Gaussian of unit standard deviation, ``2 sqrt(2 ln 2)`` (about 2.3548).
SIGMA_TO_FWHM = 2.0 * np.sqrt(2.0 * np.log(2.0))


def fwhm_to_sigma(fwhm):
    """Convert a Gaussian full width at half maximum to its standard deviation.

    Parameters
    ----------
    fwhm : float or ndarray
        Full width at half maximum (px).

    Returns
    -------
    sigma : float or ndarray
        Standard deviation (px), ``fwhm / (2 sqrt(2 ln 2))`` (about
        ``fwhm / 2.3548``).

    Examples
    --------
    >>> round(float(fwhm_to_sigma(2.3548200450309493)), 12)
    1.0
    """
    return fwhm / SIGMA_TO_FWHM


def sigma_to_fwhm(sigma):
    """Convert a Gaussian standard deviation to its full width at half maximum.

    Parameters
    ----------
    sigma : float or ndarray
        Standard deviation (px).

    Returns
    -------
    fwhm : float or ndarray
        Full width at half maximum (px), ``2 sqrt(2 ln 2) sigma``.

    Examples
    --------
    >>> round(float(sigma_to_fwhm(1.0)), 6)
    2.35482
    """
    return SIGMA_TO_FWHM * sigma
