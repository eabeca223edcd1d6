"""PSF size estimated from star stamps with adaptive (Gaussian-weighted) moments.

For a Gaussian star of width sigma, weighted by a Gaussian of width ``s``, the
weighted second moment per axis is ``m = sigma^2 s^2 / (sigma^2 + s^2)``;
iterating ``s^2 <- 2 m`` converges to ``s = sigma``.  The FWHM is
``2 sqrt(2 ln 2) sigma``, the median over stars.
"""

import numpy as np

from ._backend import array_module_of, to_host
from .cutouts import cut_planes, cut_stamps
from .errors import NoKernelCandidatesError
from .gaussian import SIGMA_TO_FWHM

__all__ = ["estimate_fwhm", "estimate_fwhms", "core_snr_of", "rated_sigmas", "median_fwhm", "SIGMA_TO_FWHM"]


def _cutouts(images, centres_rc, radius):
    """Host stack of background-free, edge-clamped cutouts of each image (cut where they live: NumPy or CuPy).

    The cutouts of every image are copied to the host together (one read-back).
    """
    stacks = [cut_stamps(image, centres_rc, radius, clamp=True) for image in images]
    xp = array_module_of(stacks[0])
    cut = to_host(xp.concatenate(stacks) if len(stacks) > 1 else stacks[0]).astype(np.float64)
    border = np.concatenate([cut[:, 0, :], cut[:, -1, :], cut[:, :, 0], cut[:, :, -1]], axis=1)
    return cut - np.median(border, axis=1)[:, None, None]


def adaptive_sigma(cutouts, n_iter=30, initial=2.0):
    """Adaptive-moment Gaussian sigma (px) of each background-free cutout.

    Parameters
    ----------
    cutouts : ndarray of shape (N, 2r+1, 2r+1)
        Stars centred on the central pixel (a CuPy stack is copied to the host).
    n_iter : int
    initial : float
        Starting weight sigma (px).

    Returns
    -------
    ndarray of shape (N,)
        NaN where the moments do not converge to a positive value.
    """
    cutouts = to_host(cutouts)
    radius = cutouts.shape[1] // 2
    grid = np.arange(-radius, radius + 1, dtype=np.float64)
    dy, dx = np.meshgrid(grid, grid, indexing="ij")
    n = len(cutouts)
    weight_sigma = np.full(n, initial)
    cx = np.zeros(n)
    cy = np.zeros(n)
    for _ in range(n_iter):
        ddx, ddy = dx[None] - cx[:, None, None], dy[None] - cy[:, None, None]
        r2 = ddx**2 + ddy**2
        weighted = cutouts * np.exp(-0.5 * r2 / weight_sigma[:, None, None] ** 2)
        flux = weighted.sum(axis=(1, 2))
        with np.errstate(divide="ignore", invalid="ignore"):
            cx = cx + (weighted * ddx).sum(axis=(1, 2)) / flux
            cy = cy + (weighted * ddy).sum(axis=(1, 2)) / flux
            moment = 0.5 * (weighted * r2).sum(axis=(1, 2)) / flux
        cx = np.clip(np.nan_to_num(cx), -2.0, 2.0)
        cy = np.clip(np.nan_to_num(cy), -2.0, 2.0)
        weight_sigma = np.sqrt(np.clip(2.0 * np.nan_to_num(moment, nan=-1.0), 0.04, radius**2))
    valid = (flux > 0) & (weight_sigma < radius / 2.0) & (weight_sigma > 0.25)
    return np.where(valid, weight_sigma, np.nan)


def estimate_fwhm(masked_image, positions, *, radius=12, max_stars=50):
    """Median adaptive-moment FWHM (px) of stars at given positions.

    Parameters
    ----------
    masked_image : MaskedImage
        NumPy or CuPy planes (only the cutouts are copied to the host).
    positions : ndarray of int, shape (n, 2)
        Parent (x, y) of the stars, best first; the first ``max_stars`` are used.
    radius : int
        Half-size of the cutouts (px).
    max_stars : int

    Returns
    -------
    float
        FWHM in pixels.

    Raises
    ------
    NoKernelCandidatesError
        If no star gives a valid measurement.
    """
    return estimate_fwhms([masked_image], positions, radius=radius, max_stars=max_stars)[0]


def estimate_fwhms(masked_images, positions, *, radius=12, max_stars=50):
    """:func:`estimate_fwhm` of several images on the same grid, with one read-back of all cutouts.

    Returns
    -------
    tuple of float
        One FWHM (px) per image.
    """
    positions = np.asarray(positions)[:max_stars]
    centres_rc = (positions - np.array(masked_images[0].xy0))[:, ::-1].astype(int)
    sigmas = adaptive_sigma(_cutouts([m.image for m in masked_images], centres_rc, radius))
    return tuple(median_fwhm(part) for part in np.split(sigmas, len(masked_images)))


def core_snr_of(image, variance, centres_rc, radius):
    """Mean of S/sigma over the clamped ``(2 radius + 1)^2`` core of each centre, where the planes live.

    Parameters
    ----------
    image, variance : ndarray of shape (M, N)
        NumPy or CuPy planes of one float dtype.
    centres_rc : ndarray of int, shape (n, 2)
        ``(row, column)`` centres relative to the image origin.
    radius : int

    Returns
    -------
    ndarray of shape (n,)
        In the planes' dtype and array module (no read-back); pixels of
        non-positive variance count as 0.
    """
    xp = array_module_of(image)
    cut_image, cut_variance = cut_planes((image, variance), centres_rc, radius, clamp=True)
    sigma = xp.sqrt(cut_variance)
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = xp.where(sigma > 0, cut_image / sigma, 0.0)
    return snr.mean(axis=(1, 2))


def rated_sigmas(image, variance, images, centres_rc, star_centres_rc, core_radius, radius, max_stars):
    """Core S/N ratings of every star and adaptive sigmas of the best-rated ones, in one host buffer.

    The reference of the kernel path's ``gdi_core_snr`` + ``gdi_star_sigmas``
    (:func:`gpudiffim._cuda.detection.rated_sigmas`, same layout).

    Parameters
    ----------
    image, variance : ndarray of shape (M, N)
        The rated planes (:func:`core_snr_of`), NumPy or CuPy.
    images : sequence of ndarray (M, N)
        The planes measured (:func:`adaptive_sigma` of background-free,
        edge-clamped cutouts of half-size ``radius``).
    centres_rc : ndarray of int, shape (n, 2)
        ``(row, column)`` centres of the ratings.
    star_centres_rc : ndarray of int, shape (n, 2), or None
        Centres of the cutouts of the same stars (None: ``centres_rc``).
    core_radius, radius, max_stars : int

    Returns
    -------
    ndarray of float64, shape (n + len(images) * max_stars,)
        The ratings, then per image the sigmas (px) of the stars in
        descending order of rating (a stable argsort of ``-ratings``); NaN
        where invalid or beyond the ``n`` stars.
    """
    ratings = to_host(core_snr_of(image, variance, centres_rc, core_radius))
    star_centres_rc = centres_rc if star_centres_rc is None else star_centres_rc
    best = np.argsort(-ratings, kind="stable")[:max_stars]
    sigmas = np.full((len(images), max_stars), np.nan)
    if len(best):
        measured = adaptive_sigma(_cutouts(images, np.asarray(star_centres_rc)[best], radius))
        sigmas[:, :len(best)] = measured.reshape(len(images), len(best))
    return np.concatenate([ratings.astype(np.float64), sigmas.ravel()])


def median_fwhm(sigmas):
    """FWHM (px) of the median of the finite adaptive sigmas (px).

    Raises
    ------
    NoKernelCandidatesError
        If none is finite.
    """
    sigmas = sigmas[np.isfinite(sigmas)]
    if sigmas.size == 0:
        msg = ("could not measure a PSF size on any candidate; pass template_fwhm_pix/science_fwhm_pix "
               "(command line: --template-fwhm/--science-fwhm, or --template-psf/--science-psf)")
        raise NoKernelCandidatesError(msg)
    return float(SIGMA_TO_FWHM * np.median(sigmas))
