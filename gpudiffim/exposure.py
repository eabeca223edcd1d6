"""Exposures: a masked image with its WCS, PSF and header metadata."""

from dataclasses import dataclass, field

import numpy as np

from .errors import ConfigurationError, ShapeError
from .fwhm import adaptive_sigma
from .gaussian import SIGMA_TO_FWHM
from .image import MaskedImage

__all__ = ["Exposure", "ExposureInfo"]


@dataclass(frozen=True)
class ExposureInfo:
    """Header metadata of an exposure; ``None`` where unknown.

    Attributes
    ----------
    gain : float or None
        e-/ADU.
    read_noise : float or None
        Read noise in electrons.
    saturation : float or None
        Saturation level in ADU.
    filter : str or None
    date : str or None
        Observation date (ISO string as in the header).
    zero_point : float or None
        Magnitude of one count (ADU).
    header : dict
        Every primary/image header card as a plain dict (for provenance).
    """

    gain: float = None
    read_noise: float = None
    saturation: float = None
    filter: str = None
    date: str = None
    zero_point: float = None
    header: dict = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True, eq=False)
class Exposure:
    """A :class:`MaskedImage` with an astropy WCS, an optional PSF and metadata.

    Parameters
    ----------
    masked_image : MaskedImage
    wcs : astropy.wcs.WCS or None
        Celestial WCS of the pixel grid; pixel ``(x, y)`` of the WCS is array
        element ``[y - y0, x - x0]`` (the WCS is for parent coordinates, 0-based).
    psf_fwhm_pix : float, optional
        PSF FWHM in pixels.
    psf_image : ndarray, optional
        PSF image (odd square, centred); its FWHM is measured when
        ``psf_fwhm_pix`` is not given.
    info : ExposureInfo
    """

    masked_image: MaskedImage
    wcs: object = None
    psf_fwhm_pix: float = None
    psf_image: np.ndarray = field(default=None, repr=False)
    info: ExposureInfo = field(default_factory=ExposureInfo)

    def __post_init__(self):
        if not isinstance(self.masked_image, MaskedImage):
            msg = f"masked_image must be a MaskedImage, got {type(self.masked_image).__name__}"
            raise TypeError(msg)
        if self.psf_fwhm_pix is not None:
            value = self.psf_fwhm_pix
            if isinstance(value, bool) or not np.isfinite(value) or value <= 0:
                msg = f"psf_fwhm_pix must be a positive number of pixels, got {value!r}"
                raise ConfigurationError(msg)
        if self.psf_image is not None:
            psf = np.asarray(self.psf_image, dtype=np.float64)
            if psf.ndim != 2 or psf.shape[0] != psf.shape[1] or psf.shape[0] % 2 == 0:
                msg = f"psf_image must be an odd square 2-D array, got shape {psf.shape}"
                raise ShapeError(msg)
            object.__setattr__(self, "psf_image", psf)

    @property
    def shape(self):
        """(rows, columns)."""
        return self.masked_image.shape

    def fwhm(self):
        """PSF FWHM in pixels from ``psf_fwhm_pix`` or the PSF image; None if neither."""
        if self.psf_fwhm_pix is not None:
            return float(self.psf_fwhm_pix)
        if self.psf_image is None:
            return None
        sigma = adaptive_sigma(self.psf_image[None] / self.psf_image.sum())[0]
        return float(SIGMA_TO_FWHM * sigma) if np.isfinite(sigma) else None
