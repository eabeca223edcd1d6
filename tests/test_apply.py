"""Full-image application of a spatially varying kernel against a per-pixel brute force."""

import numpy as np
import pytest

from gpudiffim import MaskedImage, SpatialKernel
from gpudiffim.apply import convolve_masked_image, propagate_mask
from gpudiffim.image import DEFAULT_MASK_PLANES
from gpudiffim.spatial import SpatialFunction, term_exponents

EDGE = 1 << DEFAULT_MASK_PLANES["EDGE"]
BAD = 1 << DEFAULT_MASK_PLANES["BAD"]
SAT = 1 << DEFAULT_MASK_PLANES["SAT"]


def random_kernel(rng, half_width, order, bbox, model="chebyshev1"):
    basis = rng.normal(size=(4, 2 * half_width + 1, 2 * half_width + 1))
    function = SpatialFunction(model, order, bbox)
    coefficients = rng.normal(size=(4, function.n_terms))
    return SpatialKernel(basis, coefficients, function)


def brute_force(image, variance, kernel, xy0):
    """``afw`` correlation with the kernel realised at every output pixel."""
    h = kernel.shape[0] // 2
    out_image = np.full(image.shape, np.nan)
    out_variance = np.full(image.shape, np.nan)
    for row in range(h, image.shape[0] - h):
        for col in range(h, image.shape[1] - h):
            k = kernel.image(xy0[0] + col, xy0[1] + row)
            window = np.s_[row - h:row + h + 1, col - h:col + h + 1]
            out_image[row, col] = np.sum(k * image[window])
            out_variance[row, col] = np.sum(k**2 * variance[window])
    return out_image, out_variance


@pytest.mark.parametrize("order, model", [(0, "chebyshev1"), (1, "chebyshev1"), (2, "chebyshev1"),
                                          (2, "polynomial")])
def test_matches_brute_force(order, model):
    rng = np.random.default_rng(100 + order)
    shape, xy0 = (37, 45), (1000, -20)
    bbox = (xy0[0], xy0[1], xy0[0] + shape[1] - 1, xy0[1] + shape[0] - 1)
    kernel = random_kernel(rng, 3, order, bbox, model)
    if model == "polynomial":  # raw parent coordinates ~1000: scale terms of degree d by 1e-3^d
        degrees = np.array([i + j for i, j in term_exponents(order)])
        kernel = SpatialKernel(kernel.basis, kernel.coefficients * 1e-3**degrees, kernel.spatial_function)
    image = rng.normal(size=shape) * 10 + 50
    variance = rng.uniform(1, 4, size=shape)
    masked = MaskedImage(image, variance=variance, xy0=xy0)
    got_image, got_variance, got_mask = convolve_masked_image(masked, kernel)
    want_image, want_variance = brute_force(image, variance, kernel, xy0)
    inner = np.s_[3:-3, 3:-3]
    scale = np.abs(want_image[inner]).max()
    np.testing.assert_allclose(got_image[inner], want_image[inner], rtol=0, atol=1e-11 * scale)
    np.testing.assert_allclose(got_variance[inner], want_variance[inner], rtol=1e-10)
    edge = np.ones(shape, dtype=bool)
    edge[inner] = False
    assert np.all(got_mask[edge] & EDGE) and not np.any(got_mask[inner] & EDGE)
    np.testing.assert_array_equal(got_image[edge], image[edge])
    np.testing.assert_array_equal(got_variance[edge], variance[edge])


def test_float32_input_keeps_dtype_and_accuracy():
    rng = np.random.default_rng(7)
    shape = (40, 40)
    kernel = random_kernel(rng, 3, 1, (0, 0, 39, 39))
    image = (rng.normal(size=shape) * 10 + 50).astype(np.float32)
    masked = MaskedImage(image, variance=np.ones(shape, np.float32))
    got, variance, _ = convolve_masked_image(masked, kernel)
    want, _ = brute_force(image.astype(np.float64), np.ones(shape), kernel, (0, 0))
    assert got.dtype == np.float32 and variance.dtype == np.float32
    inner = np.s_[3:-3, 3:-3]
    np.testing.assert_allclose(got[inner], want[inner], rtol=0, atol=2e-5 * np.abs(want[inner]).max())


def test_mask_bits_spread_over_kernel_support():
    shape = (30, 30)
    mask = np.zeros(shape, dtype=np.int32)
    mask[15, 10] = BAD
    mask[5, 20] = SAT
    footprint = np.zeros((5, 5), dtype=bool)
    footprint[2, 2] = footprint[2, 4] = True  # offsets (u, v) = (0, 0) and (+2, 0)
    out = propagate_mask(mask, footprint)
    # output (x, y) sees input (x + u, y + v): BAD at x=10 reaches outputs x=10 and x=8
    assert set(zip(*np.nonzero(out & BAD))) == {(15, 10), (15, 8)}
    assert set(zip(*np.nonzero(out & SAT))) == {(5, 20), (5, 18)}
    full = propagate_mask(mask, np.ones((5, 5), dtype=bool))
    assert np.count_nonzero(full & BAD) == 25 and np.count_nonzero(full & SAT) == 25


@pytest.mark.gpu
def test_mask_propagation_with_device_mask_and_footprint():
    import cupy

    rng = np.random.default_rng(np.random.SeedSequence().entropy)
    mask = np.where(rng.random((60, 70)) < 0.02, BAD, 0).astype(np.int32)
    footprint = rng.random((5, 7)) < 0.6
    footprint[2, 3] = True
    got = propagate_mask(cupy.asarray(mask), cupy.asarray(footprint))
    assert isinstance(got, cupy.ndarray)
    np.testing.assert_array_equal(cupy.asnumpy(got), propagate_mask(mask, footprint))


def test_no_data_pixels_flag_their_neighbourhood():
    rng = np.random.default_rng(3)
    image = rng.normal(size=(30, 30)) + 10
    image[12, 14] = np.nan
    with pytest.warns(Warning, match="NO_DATA"):
        masked = MaskedImage(image, variance=np.ones((30, 30)))
    kernel = random_kernel(rng, 2, 0, (0, 0, 29, 29))
    out_image, out_variance, out_mask = convolve_masked_image(masked, kernel)
    no_data = 1 << DEFAULT_MASK_PLANES["NO_DATA"]
    flagged = (out_mask & no_data) != 0
    assert flagged[10:15, 12:17].all() and flagged.sum() == 25
    assert np.isfinite(out_image).all() and np.isfinite(out_variance).all()
