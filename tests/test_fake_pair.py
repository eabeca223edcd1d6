"""The simulation of :mod:`gpudiffim.testing` against the pipeline's kernel application.

``make_fake_pair`` applies the true kernel with
:func:`~gpudiffim.testing.correlate_spatial_kernel` (SciPy FFT correlations of
the basis kernels weighted by their spatial coefficients, on a padded canvas),
not with the pipeline's :func:`~gpudiffim.apply.convolve_masked_image`, so the
recovery tests do not check the pipeline against itself.  Here the two
implementations are compared with each other and with a per-pixel sum.
"""

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from gpudiffim import MaskedImage, PsfMatchConfig, SpatialKernel
from gpudiffim.apply import convolve_masked_image
from gpudiffim.basis import make_kernel_basis
from gpudiffim.image import DEFAULT_MASK_PLANES
from gpudiffim.spatial import SpatialFunction
from gpudiffim.testing import _render, correlate_spatial_kernel, default_true_kernel, make_fake_pair

EDGE = 1 << DEFAULT_MASK_PLANES["EDGE"]
XY0 = (13, -7)
SHAPE = (150, 170)
BBOX = (XY0[0], XY0[1], XY0[0] + SHAPE[1] - 1, XY0[1] + SHAPE[0] - 1)


def per_pixel(image, kernel, xy0):
    """``sum_{u,v} K(u, v; x, y) in(x+u, y+v)`` with the kernel image realised at every pixel."""
    hy, hx = kernel.shape[0] // 2, kernel.shape[1] // 2
    windows = sliding_window_view(image, kernel.shape)
    rows, columns = windows.shape[:2]
    y, x = np.mgrid[xy0[1] + hy:xy0[1] + hy + rows, xy0[0] + hx:xy0[0] + hx + columns]
    kernels = kernel.images(x.ravel(), y.ravel()).reshape(windows.shape)
    return np.einsum("rcij,rcij->rc", kernels, windows)


def random_kernel(rng, n_basis, shape, order, model="chebyshev1"):
    function = SpatialFunction(model, order, BBOX)
    return SpatialKernel(rng.normal(size=(n_basis, *shape)), rng.normal(size=(n_basis, function.n_terms)),
                         function)


def al_kernel(rng):
    """Many basis kernels (more than spatial terms) with spatially varying coefficients."""
    basis = make_kernel_basis(PsfMatchConfig(scale_by_fwhm=False)).kernels
    function = SpatialFunction("chebyshev1", 2, BBOX)
    return SpatialKernel(basis, rng.normal(size=(len(basis), function.n_terms)), function)


@pytest.mark.parametrize("n_basis, shape, order, model", [
    (2, (5, 5), 0, "chebyshev1"),
    (2, (5, 5), 1, "chebyshev1"),   # weighted by basis coefficients (2 basis < 3 terms)
    (5, (3, 7), 1, "chebyshev1"),   # weighted by spatial terms (5 basis > 3 terms), non-square
    (3, (7, 5), 2, "polynomial"),
])
def test_reference_matches_per_pixel_sum(n_basis, shape, order, model):
    rng = np.random.default_rng(7 + order)
    kernel = random_kernel(rng, n_basis, shape, order, model)
    image = rng.normal(size=(23, 31))
    expected = per_pixel(image, kernel, XY0)
    result = correlate_spatial_kernel(image, kernel, XY0)
    assert result.shape == (23 - 2 * (shape[0] // 2), 31 - 2 * (shape[1] // 2))
    np.testing.assert_allclose(result, expected, rtol=0, atol=1e-12 * np.abs(expected).max())


def test_reference_weight_bands_are_invisible(monkeypatch):
    rng = np.random.default_rng(3)
    kernel = random_kernel(rng, 2, (5, 5), 2)
    image = rng.normal(size=(41, 37))
    whole = correlate_spatial_kernel(image, kernel, XY0)
    monkeypatch.setattr("gpudiffim.testing._WEIGHT_BAND_PIXELS", 100)
    np.testing.assert_array_equal(correlate_spatial_kernel(image, kernel, XY0), whole)


@pytest.mark.parametrize("make_kernel", [
    lambda rng: default_true_kernel(BBOX, 1.5, 2.2, gradient=(4e-3, -3e-3)),
    al_kernel,
], ids=["default-kernel", "al-basis-order-2"])
@pytest.mark.parametrize("max_tile_pixels", [None, 40 * SHAPE[1]])
def test_pipeline_matches_independent_correlation(make_kernel, max_tile_pixels):
    """``convolve_masked_image`` agrees with the independent reference to float64 rounding."""
    rng = np.random.default_rng(21)
    kernel = make_kernel(rng)
    assert not kernel.is_spatially_invariant
    image = rng.normal(size=SHAPE) + _render(SHAPE, XY0, rng.uniform(BBOX[0], BBOX[2], 30),
                                             rng.uniform(BBOX[1], BBOX[3], 30), np.full(30, 1e4), 1.5)
    masked = MaskedImage(image, variance=np.ones(SHAPE), xy0=XY0)
    out, _, mask = convolve_masked_image(masked, kernel, max_tile_pixels=max_tile_pixels)
    expected = correlate_spatial_kernel(image, kernel, XY0)
    hy, hx = kernel.shape[0] // 2, kernel.shape[1] // 2
    inner = np.s_[hy:SHAPE[0] - hy, hx:SHAPE[1] - hx]
    np.testing.assert_allclose(out[inner], expected, rtol=0, atol=1e-12 * np.abs(expected).max())
    # the pipeline's border convention: input copied and flagged EDGE
    border = np.ones(SHAPE, dtype=bool)
    border[inner] = False
    np.testing.assert_array_equal(out[border], image[border])
    assert np.all(mask[border] & EDGE) and not np.any(mask[inner] & EDGE)


def test_fake_science_is_the_true_kernel_applied_by_the_pipeline():
    """The noise-free science image is the pipeline's correlation of the science sources
    (template PSF) with the true kernel, plus the true background, to float64 rounding."""
    pair = make_fake_pair(shape=SHAPE, n_stars=40, seed=9, xy0=XY0, template_noise=0.0,
                          science_noise=0.0, n_variables=3, n_transients=2, dtype=np.float64)
    h = pair.kernel.shape[0] // 2
    padded_shape, padded_xy0 = (SHAPE[0] + 2 * h, SHAPE[1] + 2 * h), (XY0[0] - h, XY0[1] - h)
    sources = _render(padded_shape, padded_xy0, pair.stars["x"], pair.stars["y"],
                      pair.stars["science_flux"], 1.5)
    pipeline = convolve_masked_image(MaskedImage(sources, variance=np.ones(padded_shape), xy0=padded_xy0),
                                     pair.kernel)[0][h:h + SHAPE[0], h:h + SHAPE[1]]
    signal = pair.science.image - pair.background.image(SHAPE, XY0)
    np.testing.assert_allclose(signal, pipeline, rtol=0, atol=1e-12 * np.abs(pipeline).max())
    assert np.abs(pipeline).max() > 100.0
