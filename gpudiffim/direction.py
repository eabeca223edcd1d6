"""Which image to convolve: the one with the narrower PSF (``convolve="auto"``).

Convolving the sharper image to match the broader one keeps the kernel a
smoothing kernel; the other direction needs a deconvolution, which the
Alard-Lupton basis fits poorly and which amplifies noise.  Rubin's
``subtractImages.py`` (``_shapeTest``) convolves the template when it is no
wider than the science image in *either* axis.  Here both axes count:

* template no wider than science in both axes: convolve the template;
* template wider in both axes: convolve the science image;
* mixed (narrower along one axis, wider along the other): compare each
  image's larger axis and convolve the image whose larger axis is smaller
  (the template on a tie), so that the axis that needs the most smoothing
  decides.

The widths are FWHMs per axis, from the second moments of a PSF image when
one is known (:func:`psf_axis_fwhms`), else the one measured (or given) FWHM
of each image for both axes.
"""

import numpy as np

from .errors import ConfigurationError
from .gaussian import SIGMA_TO_FWHM

__all__ = ["choose_convolution", "psf_axis_fwhms"]


def psf_axis_fwhms(psf_image):
    """FWHM along x and y of a PSF image, from its second moments.

    Parameters
    ----------
    psf_image : ndarray of shape (M, N)
        PSF image, centred; its sum need not be 1.

    Returns
    -------
    tuple of float
        ``(fwhm_x, fwhm_y)`` in pixels: ``2.3548 sqrt(Ixx)`` and ``2.3548
        sqrt(Iyy)`` (exact for a Gaussian) about the centroid.

    Raises
    ------
    ConfigurationError
        If the image has no positive flux.

    Examples
    --------
    >>> from gpudiffim.testing import gaussian_kernel
    >>> [round(f, 2) for f in psf_axis_fwhms(gaussian_kernel(2.0, 12))]
    [4.71, 4.71]
    """
    psf = np.clip(np.asarray(psf_image, dtype=np.float64), 0.0, None)
    total = psf.sum()
    if not total > 0:
        msg = "psf_image has no positive flux"
        raise ConfigurationError(msg)
    rows, columns = np.indices(psf.shape)
    cx, cy = (psf * columns).sum() / total, (psf * rows).sum() / total
    ixx = (psf * (columns - cx) ** 2).sum() / total
    iyy = (psf * (rows - cy) ** 2).sum() / total
    return float(SIGMA_TO_FWHM * np.sqrt(ixx)), float(SIGMA_TO_FWHM * np.sqrt(iyy))


def _axes(name, value):
    widths = np.broadcast_to(np.asarray(value, dtype=np.float64), (2,))
    if not np.all(np.isfinite(widths)) or np.any(widths <= 0):
        msg = f"{name} must be a positive FWHM or a pair (x, y) of them, got {value!r}"
        raise ConfigurationError(msg)
    return widths


def choose_convolution(template_fwhm, science_fwhm):
    """The image to convolve, by the rule of the module notes.

    Parameters
    ----------
    template_fwhm, science_fwhm : float or tuple of float
        PSF FWHM (px) of each image: one value for both axes, or ``(x, y)``.

    Returns
    -------
    {"template", "science"}

    Raises
    ------
    ConfigurationError
        If a width is not positive and finite.

    Examples
    --------
    >>> choose_convolution(3.0, 4.5)
    'template'
    >>> choose_convolution((5.0, 5.2), (4.0, 4.1))
    'science'
    >>> choose_convolution((3.0, 6.0), (4.0, 5.0))    # mixed: 6 > 5
    'science'
    """
    template, science = _axes("template_fwhm", template_fwhm), _axes("science_fwhm", science_fwhm)
    if np.all(template <= science):
        return "template"
    if np.all(template > science):
        return "science"
    return "template" if template.max() <= science.max() else "science"
