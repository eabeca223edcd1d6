"""Simulated image pairs with a known PSF-matching kernel, for tests and demos.

:func:`make_fake_pair` renders a star field with a Gaussian PSF as the
template, and makes the science image by applying a known spatially varying
kernel to the noise-free template and adding a known differential background.
The kernel is applied by :func:`correlate_spatial_kernel`, an implementation
independent of the pipeline's (:mod:`gpudiffim.apply`,
:mod:`gpudiffim.convolve`), so that tests of the fit do not check the
pipeline's convolution against itself; it runs on a canvas padded by the
kernel half-width and keeps only the pixels whose whole kernel footprint lies
on the canvas, so no border convention enters.  Noise, variable stars, transients, cosmic-ray hits and
saturated pixels are optional.  Everything is drawn from one seeded
generator.
"""

from dataclasses import dataclass

import numpy as np
import scipy.signal

from .errors import ConfigurationError
from .gaussian import SIGMA_TO_FWHM
from .image import DEFAULT_MASK_PLANES, MaskedImage
from .kernel import BackgroundModel, SpatialKernel
from .spatial import SpatialFunction

__all__ = ["FakePair", "make_fake_pair", "gaussian_kernel", "default_true_kernel", "correlate_spatial_kernel"]


@dataclass(frozen=True)
class FakePair:
    """A simulated pair and its truth.

    Attributes
    ----------
    template, science : MaskedImage
    kernel : SpatialKernel
        The true PSF-matching kernel (template -> science).
    background : BackgroundModel
        The true differential background of the science image.
    stars : numpy structured array
        Fields ``x``, ``y`` (parent px), ``flux`` (template counts),
        ``science_flux`` and ``kind`` ("star", "variable", "transient").
    cosmic_rays : ndarray of shape (n, 2)
        Parent (x, y) of unmasked cosmic-ray hits added to the science image.
    template_fwhm_pix, science_fwhm_pix : float
        FWHM of the template PSF and of a Gaussian of ``science_sigma`` (the
        science PSF for the default kernel, whose mean width is
        ``sqrt(science_sigma^2 - template_sigma^2)``).
    """

    template: MaskedImage
    science: MaskedImage
    kernel: SpatialKernel
    background: BackgroundModel
    stars: np.ndarray
    cosmic_rays: np.ndarray
    template_fwhm_pix: float
    science_fwhm_pix: float


def gaussian_kernel(sigma, half_width, dx=0.0, dy=0.0):
    """Unit-sum Gaussian kernel image sampled at pixel centres.

    Parameters
    ----------
    sigma : float
        Width (px).
    half_width : int
        The image is ``(2 h + 1)^2``.
    dx, dy : float
        Centre offset (px) along x (columns) and y (rows).
    """
    grid = np.arange(-half_width, half_width + 1, dtype=np.float64)
    gy = np.exp(-0.5 * ((grid - dy) / sigma) ** 2)
    gx = np.exp(-0.5 * ((grid - dx) / sigma) ** 2)
    kernel = np.outer(gy, gx)
    return kernel / kernel.sum()


def default_true_kernel(bbox, template_sigma, science_sigma, kernel_sum=1.0, variation=0.15,
                        gradient=(2.5e-4, 1.5e-4)):
    """A spatially varying, Gaussian-like matching kernel.

    Two unit-sum Gaussians of widths ``sigma_k (1 -/+ variation)`` with
    ``sigma_k = sqrt(science_sigma^2 - template_sigma^2)``, mixed with weights
    ``0.5 +/- (g_x (x - x_c) + g_y (y - y_c))`` that vary linearly across the box
    (``gradient = (g_x, g_y)`` per pixel, so the variation per pixel does not
    depend on the image size); the kernel sum is constant.

    Returns
    -------
    SpatialKernel
    """
    if not science_sigma > template_sigma:
        msg = f"science_sigma ({science_sigma}) must exceed template_sigma ({template_sigma})"
        raise ConfigurationError(msg)
    sigma_k = np.sqrt(science_sigma**2 - template_sigma**2)
    half_width = int(np.ceil(4.5 * sigma_k * (1 + variation)))
    basis = np.array([gaussian_kernel(sigma_k * (1 - variation), half_width),
                      gaussian_kernel(sigma_k * (1 + variation), half_width)])
    half_x, half_y = 0.5 * (bbox[2] - bbox[0] + 1), 0.5 * (bbox[3] - bbox[1] + 1)
    slope_x, slope_y = gradient[0] * half_x, gradient[1] * half_y
    coefficients = kernel_sum * np.array([[0.5, slope_x, slope_y], [0.5, -slope_x, -slope_y]])
    return SpatialKernel(basis, coefficients, SpatialFunction("chebyshev1", 1, bbox))


#: Most output pixels whose spatial weights :func:`correlate_spatial_kernel`
#: evaluates at once (bounds its temporary memory on large images).
_WEIGHT_BAND_PIXELS = 1 << 20


def correlate_spatial_kernel(image, kernel, xy0=(0, 0)):
    """Apply a spatially varying kernel where its whole footprint is on the image.

    A reference implementation, written independently of
    :func:`gpudiffim.apply.convolve_masked_image`: the ``afw`` correlation
    ``out(x, y) = sum_{u,v} K(u, v; x, y) in(x + u, y + v)`` with
    ``K(u, v; x, y) = kernel.image(x, y)[h_y + v, h_x + u]``, written as
    ``sum_i f_i(x, y) (in * B_i)(x, y)`` over the basis kernels ``B_i`` and
    their spatial coefficients ``f_i`` (or, when there are fewer spatial terms
    than basis kernels, over the terms ``P_t`` and the kernels
    ``sum_i a[i, t] B_i``), each fixed-kernel correlation being
    :func:`scipy.signal.fftconvolve` with the flipped kernel in "valid" mode.

    Parameters
    ----------
    image : array_like of shape (M, N)
        Input pixels (computed in float64).
    kernel : SpatialKernel
        Kernel of shape ``(2 h_y + 1, 2 h_x + 1)``, evaluated at each output
        pixel's parent coordinate.
    xy0 : tuple of int
        Parent coordinate ``(x, y)`` of ``image[0, 0]``.

    Returns
    -------
    ndarray of shape (M - 2 h_y, N - 2 h_x)
        The output pixels whose kernel footprint lies on the image; element
        ``[0, 0]`` is at parent ``(xy0[0] + h_x, xy0[1] + h_y)``.  There is no
        border convention: pad the input by the half-widths to get a full
        output.

    Examples
    --------
    A spatially constant kernel is a plain correlation (cross-correlation: the
    kernel pixel at offset ``(u, v)`` = ``(+1, 0)`` picks the right neighbour):

    >>> import numpy as np
    >>> from gpudiffim import SpatialKernel
    >>> from gpudiffim.spatial import SpatialFunction
    >>> shift = np.zeros((1, 3, 3))
    >>> shift[0, 1, 2] = 1.0
    >>> kernel = SpatialKernel(shift, [[1.0]], SpatialFunction("chebyshev1", 0, (0, 0, 4, 2)))
    >>> image = np.arange(15.0).reshape(3, 5)
    >>> correlate_spatial_kernel(image, kernel)
    array([[7., 8., 9.]])
    """
    image = np.asarray(image, dtype=np.float64)
    hy, hx = kernel.shape[0] // 2, kernel.shape[1] // 2
    rows, columns = image.shape[0] - 2 * hy, image.shape[1] - 2 * hx
    if rows <= 0 or columns <= 0:
        return np.zeros((max(rows, 0), max(columns, 0)))
    function = kernel.spatial_function
    if kernel.n_basis <= function.n_terms:
        kernels, weights = kernel.basis, kernel.coefficients  # f_i = sum_t a[i, t] P_t
    else:
        kernels = np.einsum("it,ikl->tkl", kernel.coefficients, kernel.basis)
        weights = np.eye(function.n_terms)  # the maps are the terms P_t themselves
    x = xy0[0] + hx + np.arange(columns)
    y = xy0[1] + hy + np.arange(rows)
    band = max(1, _WEIGHT_BAND_PIXELS // columns)
    out = np.zeros((rows, columns))
    for fixed, coefficients in zip(kernels, weights):
        if not np.any(fixed) or not np.any(coefficients):
            continue
        correlated = scipy.signal.fftconvolve(image, fixed[::-1, ::-1], mode="valid")
        for start in range(0, rows, band):
            stop = min(rows, start + band)
            out[start:stop] += correlated[start:stop] * function.evaluate(coefficients, x[None, :],
                                                                          y[start:stop, None])
    return out


def _render(shape, xy0, x, y, flux, sigma):
    """Sum of unit-sum Gaussian stars (sampled at pixel centres) on a grid."""
    image = np.zeros(shape)
    radius = int(np.ceil(5 * sigma))
    offsets = np.arange(-radius, radius + 1)
    cx = np.floor(x - xy0[0] + 0.5).astype(int)
    cy = np.floor(y - xy0[1] + 0.5).astype(int)
    cols = cx[:, None] + offsets[None, :]
    rows = cy[:, None] + offsets[None, :]
    gx = np.exp(-0.5 * ((cols + xy0[0] - x[:, None]) / sigma) ** 2)
    gy = np.exp(-0.5 * ((rows + xy0[1] - y[:, None]) / sigma) ** 2)
    gx /= gx.sum(axis=1, keepdims=True)
    gy /= gy.sum(axis=1, keepdims=True)
    stamps = flux[:, None, None] * gy[:, :, None] * gx[:, None, :]
    rr = np.broadcast_to(rows[:, :, None], stamps.shape)
    cc = np.broadcast_to(cols[:, None, :], stamps.shape)
    inside = (rr >= 0) & (rr < shape[0]) & (cc >= 0) & (cc < shape[1])
    np.add.at(image, (rr[inside], cc[inside]), stamps[inside])
    return image


def _star_table(rng, n_stars, bbox, margin, flux_range, n_variables, n_transients):
    x0, y0, x1, y1 = bbox
    n_total = n_stars + n_transients
    x = rng.uniform(x0 + margin, x1 - margin, n_total)
    y = rng.uniform(y0 + margin, y1 - margin, n_total)
    flux = np.exp(rng.uniform(np.log(flux_range[0]), np.log(flux_range[1]), n_total))
    kind = np.array(["star"] * n_stars + ["transient"] * n_transients, dtype="U9")
    kind[rng.choice(n_stars, size=min(n_variables, n_stars), replace=False)] = "variable"
    stars = np.zeros(n_total, dtype=[("x", "f8"), ("y", "f8"), ("flux", "f8"),
                                     ("science_flux", "f8"), ("kind", "U9")])
    stars["x"], stars["y"], stars["kind"] = x, y, kind
    stars["flux"] = np.where(kind == "transient", 0.0, flux)
    stars["science_flux"] = flux
    return stars


def _noisy(rng, signal, noise, gain):
    variance = np.full(signal.shape, float(noise) ** 2)
    if gain is not None:
        variance = variance + np.maximum(signal, 0.0) / gain
    return signal + rng.normal(size=signal.shape) * np.sqrt(variance), variance


def make_fake_pair(shape=(512, 512), n_stars=200, *, seed=0, template_sigma=1.5,
                   science_sigma=2.2, kernel=None, kernel_sum=1.0, background=(5.0, 2.0, -1.5),
                   template_noise=5.0, science_noise=5.0, gain=None, flux_range=(1e3, 1e5),
                   n_variables=0, variable_factor=3.0, n_transients=0, n_cosmic_rays=0,
                   cosmic_ray_flux=5e3, saturation=None, xy0=(0, 0), dtype=np.float32):
    """Simulate an aligned template/science pair with a known kernel.

    Parameters
    ----------
    shape : tuple of int
        (rows, columns).
    n_stars : int
        Stars in both images (uniform positions, log-uniform fluxes).
    seed : int
        Seed of the random generator (positions, fluxes, noise).
    template_sigma, science_sigma : float
        Gaussian PSF sigma (px) of the template, and the science sigma that
        sets the width of the default kernel ``sqrt(science^2 - template^2)``.
    kernel : SpatialKernel, optional
        True kernel; :func:`default_true_kernel` when omitted.  Its spatial
        function should span the image box.
    kernel_sum : float
        Photometric scaling of the default kernel.
    background : sequence of float
        First-order Chebyshev coefficients (1, x, y) of the science background.
    template_noise, science_noise : float
        Gaussian read/sky noise sigma (counts); 0 for noise-free images
        (the variance plane is then 1).
    gain : float, optional
        If given, add Poisson-like noise of variance signal/gain.
    flux_range : tuple of float
        Template star fluxes (counts).
    n_variables, variable_factor : int, float
        Stars whose science flux is ``variable_factor`` x the template flux.
    n_transients : int
        Stars present in the science image only.
    n_cosmic_rays, cosmic_ray_flux : int, float
        Unmasked single-pixel hits on the science image.
    saturation : float, optional
        Pixels above it get the SAT bit in each image.
    xy0 : tuple of int
        Parent origin of both images.
    dtype : numpy dtype
        Image and variance dtype.

    Returns
    -------
    FakePair
    """
    rng = np.random.default_rng(seed)
    bbox = (xy0[0], xy0[1], xy0[0] + shape[1] - 1, xy0[1] + shape[0] - 1)
    if kernel is None:
        kernel = default_true_kernel(bbox, template_sigma, science_sigma, kernel_sum)
    hy, hx = kernel.shape[0] // 2, kernel.shape[1] // 2
    stars = _star_table(rng, n_stars, bbox, 3, flux_range, n_variables, n_transients)
    stars["science_flux"] = np.where(stars["kind"] == "variable", variable_factor * stars["flux"],
                                     stars["science_flux"])
    padded_shape, padded_xy0 = (shape[0] + 2 * hy, shape[1] + 2 * hx), (xy0[0] - hx, xy0[1] - hy)
    inner = np.s_[hy:hy + shape[0], hx:hx + shape[1]]
    template_signal = _render(padded_shape, padded_xy0, stars["x"], stars["y"], stars["flux"],
                              template_sigma)[inner]
    # science sources (variables scaled, transients added) seen through the template PSF,
    # then the kernel: every science source has exactly the science PSF.  The padded canvas
    # makes every science pixel a complete kernel sum (no edge convention).
    unconvolved = _render(padded_shape, padded_xy0, stars["x"], stars["y"], stars["science_flux"],
                          template_sigma)
    science_signal = correlate_spatial_kernel(unconvolved, kernel, padded_xy0)
    truth_bg = BackgroundModel(np.asarray(background, dtype=float),
                               SpatialFunction("chebyshev1", 1, bbox))
    science_signal += truth_bg.image(shape, xy0)
    cosmic_rays = np.stack([rng.integers(0, shape[1], n_cosmic_rays) + xy0[0],
                            rng.integers(0, shape[0], n_cosmic_rays) + xy0[1]], axis=1)
    science_signal[cosmic_rays[:, 1] - xy0[1], cosmic_rays[:, 0] - xy0[0]] += cosmic_ray_flux
    images = []
    for signal, noise in ((template_signal, template_noise), (science_signal, science_noise)):
        if noise > 0 or gain is not None:
            pixels, variance = _noisy(rng, signal, noise, gain)
        else:
            pixels, variance = signal, np.ones(shape)
        mask = np.zeros(shape, dtype=np.int32)
        if saturation is not None:
            mask[pixels > saturation] |= 1 << DEFAULT_MASK_PLANES["SAT"]
        images.append(MaskedImage(pixels.astype(dtype), mask, variance.astype(dtype), xy0=xy0))
    return FakePair(images[0], images[1], kernel, truth_bg, stars, cosmic_rays,
                    SIGMA_TO_FWHM * template_sigma, SIGMA_TO_FWHM * science_sigma)

