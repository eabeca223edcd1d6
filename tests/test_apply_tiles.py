"""Band tiling of :func:`gpudiffim.apply.convolve_masked_image` (issue 4).

The image is processed in horizontal bands, each computed from its rows plus
a halo of the kernel half-height with its own ``xy0``.  The tiled result must
be the whole-image result: image and variance to 1e-12 relative in float64
(the FFTs of differently sized bands round differently), masks exactly, EDGE
only at the true image border.  Band heights cover bands shorter than the
kernel, a band count that does not divide the rows, and one band; NO_DATA and
mask bits sit next to every band boundary.
"""

import itertools

import numpy as np
import pytest

from gpudiffim import MaskedImage, SpatialKernel, apply, use_backend
from gpudiffim.apply import MAX_TILE_PIXELS, convolve_masked_image
from gpudiffim.errors import ConfigurationError, NoDataWarning
from gpudiffim.image import DEFAULT_MASK_PLANES
from gpudiffim.spatial import SpatialFunction, term_exponents

EDGE, BAD, SAT, CR, NO_DATA = (1 << DEFAULT_MASK_PLANES[name] for name in ("EDGE", "BAD", "SAT", "CR", "NO_DATA"))
UNTILED = 10**12  # max_tile_pixels that keeps every test image in one band
RTOL = {np.float64: 1e-12, np.float32: 2e-6}


def make_kernel(rng, half_width, order, bbox, model):
    """Random 4-term spatial kernel; polynomial terms of degree d scaled by 1e-3^d (coordinates ~1000)."""
    size = 2 * half_width + 1
    basis = rng.normal(size=(4, size, size))
    basis[1, :, :2] = 0.0  # an irregular footprint edge on one term does not change the union
    function = SpatialFunction(model, order, bbox)
    coefficients = rng.normal(size=(4, function.n_terms))
    if model == "polynomial":
        degrees = np.array([i + j for i, j in term_exponents(order)])
        coefficients = coefficients * 1e-3**degrees
    return SpatialKernel(basis, coefficients, function)


def make_image(rng, shape, xy0, bands, halo, dtype=np.float64):
    """Masked image with NaN (NO_DATA) pixels and mask bits next to every band boundary and the border."""
    image = rng.normal(size=shape) * 10 + 50
    variance = rng.uniform(1, 4, size=shape)
    mask = np.zeros(shape, dtype=np.int32)
    boundaries = sorted({start for start, _ in bands[1:]})
    for row in boundaries:
        for offset, bit in ((-1, BAD), (0, SAT), (halo - 1, CR), (-halo, BAD | SAT)):
            r = min(max(row + offset, 0), shape[0] - 1)
            mask[r, rng.integers(0, shape[1])] |= bit
        image[min(row + 1, shape[0] - 1), rng.integers(0, shape[1])] = np.nan
    mask[0, 3] |= SAT  # true border
    mask[shape[0] - 1, shape[1] // 2] |= BAD
    image[shape[0] // 2, 0] = np.nan
    with pytest.warns(NoDataWarning):
        return MaskedImage(image.astype(dtype), mask, variance.astype(dtype), xy0=xy0)


def band_spy(monkeypatch):
    """Record the ``(start, stop)`` of every band that convolve_masked_image computes."""
    calls = []
    original = apply._convolve_band

    def spy(masked_image, parts, start, stop, halo):
        calls.append((start, stop))
        return original(masked_image, parts, start, stop, halo)

    monkeypatch.setattr(apply, "_convolve_band", spy)
    return calls


def assert_same(tiled, whole, dtype, shape, halo):
    rtol = RTOL[dtype]
    for name, got, want in zip(("image", "variance"), tiled[:2], whole[:2]):
        assert got.dtype == dtype, name
        assert np.isfinite(got).all(), name
        np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max(), err_msg=name)
    assert tiled[2].dtype == np.int32
    np.testing.assert_array_equal(tiled[2], whole[2])
    border = np.ones(shape, dtype=bool)
    border[halo:-halo, halo:-halo] = False
    np.testing.assert_array_equal((tiled[2] & EDGE) != 0, border)


# --------------------------------------------------------------------------
# band geometry


@pytest.mark.parametrize(("rows", "columns", "halo", "max_tile_pixels"),
                         [(37, 45, 3, 10**9), (37, 45, 3, 7 * 45), (37, 45, 3, 11 * 45), (37, 45, 3, 11 * 45 + 44),
                          (37, 45, 3, 1), (1, 5, 0, 1), (4096, 4096, 11, 1 << 23), (4096, 4096, 11, 1 << 24),
                          (100, 10, 2, 14 * 10)])
def test_band_ranges_cover_the_rows_within_the_limit(rows, columns, halo, max_tile_pixels):
    bands = apply._band_ranges(rows, columns, halo, max_tile_pixels)
    assert bands[0][0] == 0 and bands[-1][1] == rows
    assert all(stop == next_start for (_, stop), (next_start, _) in itertools.pairwise(bands))
    heights = [stop - start for start, stop in bands]
    assert min(heights) >= 1 and max(heights) - min(heights) <= 1
    limit = max(1, max_tile_pixels // columns - 2 * halo)   # rows allowed by (n + 2h) * columns <= max
    assert max(heights) <= limit
    assert len(bands) == -(-rows // limit)   # as few bands as the limit allows


def test_band_ranges_examples():
    assert apply._band_ranges(37, 45, 3, 10**9) == [(0, 37)]
    assert apply._band_ranges(37, 45, 3, 1) == [(i, i + 1) for i in range(37)]   # at least one row
    # (n + 2) * 4 <= 20 allows 3 rows: 4 bands, balanced as 2 + 3 + 2 + 3
    assert apply._band_ranges(10, 4, 1, 5 * 4) == [(0, 2), (2, 5), (5, 7), (7, 10)]


# --------------------------------------------------------------------------
# tiled == whole image, NumPy reference


SHAPE, XY0, HALF = (37, 45), (1000, -20), 3


@pytest.mark.parametrize(("order", "model"), [(0, "chebyshev1"), (1, "chebyshev1"), (2, "chebyshev1"),
                                              (1, "polynomial"), (2, "polynomial")])
@pytest.mark.parametrize("band_rows", [1, 2, 5, 8, 13, 36])   # < kernel (7), 37 not a multiple, 2 bands
def test_tiled_equals_whole_image(monkeypatch, order, model, band_rows):
    rng = np.random.default_rng(1000 * order + band_rows + (model == "polynomial"))
    bbox = (XY0[0], XY0[1], XY0[0] + SHAPE[1] - 1, XY0[1] + SHAPE[0] - 1)
    kernel = make_kernel(rng, HALF, order, bbox, model)
    max_tile_pixels = (band_rows + 2 * HALF) * SHAPE[1]
    bands = apply._band_ranges(*SHAPE, HALF, max_tile_pixels)
    masked = make_image(rng, SHAPE, XY0, bands, HALF)
    with use_backend("numpy"):
        whole = convolve_masked_image(masked, kernel, max_tile_pixels=UNTILED)
        calls = band_spy(monkeypatch)
        tiled = convolve_masked_image(masked, kernel, max_tile_pixels=max_tile_pixels)
    assert calls == bands and len(bands) == -(-SHAPE[0] // band_rows) > 1
    assert max(stop - start for start, stop in bands) <= band_rows
    assert_same(tiled, whole, np.float64, SHAPE, HALF)
    # NO_DATA spread over the footprint of each NaN, also across band boundaries
    assert ((tiled[2] & NO_DATA) != 0).sum() >= 2 * (2 * HALF + 1)


def test_one_band_is_the_whole_image_exactly(monkeypatch):
    rng = np.random.default_rng(5)
    kernel = make_kernel(rng, HALF, 1, (0, 0, 44, 36), "chebyshev1")
    masked = make_image(rng, SHAPE, (0, 0), [(0, 37)], HALF)
    with use_backend("numpy"):
        calls = band_spy(monkeypatch)
        exact = convolve_masked_image(masked, kernel, max_tile_pixels=(SHAPE[0] + 2 * HALF) * SHAPE[1])
        whole = convolve_masked_image(masked, kernel, max_tile_pixels=UNTILED)
    assert calls == [(0, SHAPE[0])] * 2
    for got, want in zip(exact, whole):
        np.testing.assert_array_equal(got, want)


def test_default_tile_size_is_the_operations_band_limit(monkeypatch):
    """The default band limit is the operations': MAX_TILE_PIXELS on the host, a 4096² image with its
    halo in one band on the kernel path (each band repeats the application's device calls)."""
    from gpudiffim._ops import KERNELS, NUMPY

    rng = np.random.default_rng(6)
    kernel = make_kernel(rng, HALF, 2, (0, 0, 44, 36), "chebyshev1")
    masked = make_image(rng, SHAPE, (0, 0), apply._band_ranges(*SHAPE, HALF, 10 * SHAPE[1]), HALF)
    assert MAX_TILE_PIXELS == apply.MAX_TILE_PIXELS == NUMPY.max_band_pixels >= 1 << 20
    assert len(apply._band_ranges(4096, 4096, 11, KERNELS.max_band_pixels)) == 1
    assert len(apply._band_ranges(4096, 4096, 11, NUMPY.max_band_pixels)) == 3
    with use_backend("numpy"):
        whole = convolve_masked_image(masked, kernel)
        monkeypatch.setattr(type(NUMPY), "max_band_pixels", 10 * SHAPE[1])   # 4 rows per band
        calls = band_spy(monkeypatch)
        tiled = convolve_masked_image(masked, kernel)
    assert calls == apply._band_ranges(*SHAPE, HALF, 10 * SHAPE[1]) and len(calls) == 10
    assert_same(tiled, whole, np.float64, SHAPE, HALF)


def test_tiled_float32_keeps_dtype():
    rng = np.random.default_rng(7)
    shape = (40, 33)
    kernel = make_kernel(rng, 2, 1, (0, 0, 32, 39), "chebyshev1")
    max_tile_pixels = (3 + 4) * shape[1]
    masked = make_image(rng, shape, (0, 0), apply._band_ranges(*shape, 2, max_tile_pixels), 2, np.float32)
    with use_backend("numpy"):
        whole = convolve_masked_image(masked, kernel, max_tile_pixels=UNTILED)
        tiled = convolve_masked_image(masked, kernel, max_tile_pixels=max_tile_pixels)
    assert_same(tiled, whole, np.float32, shape, 2)


def test_non_square_kernel_halo_uses_the_rows():
    """A kernel taller than wide: the halo is the half-height, EDGE the half-height/half-width ring."""
    rng = np.random.default_rng(8)
    shape = (30, 26)
    function = SpatialFunction("chebyshev1", 1, (0, 0, 25, 29))
    kernel = SpatialKernel(rng.normal(size=(3, 9, 5)), rng.normal(size=(3, function.n_terms)), function)
    masked = make_image(rng, shape, (0, 0), apply._band_ranges(*shape, 4, 10 * shape[1]), 4)
    with use_backend("numpy"):
        whole = convolve_masked_image(masked, kernel, max_tile_pixels=UNTILED)
        tiled = convolve_masked_image(masked, kernel, max_tile_pixels=10 * shape[1])   # 2 rows per band
    for got, want in zip(tiled[:2], whole[:2]):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12 * np.abs(want).max())
    np.testing.assert_array_equal(tiled[2], whole[2])
    border = np.ones(shape, dtype=bool)
    border[4:-4, 2:-2] = False
    np.testing.assert_array_equal((tiled[2] & EDGE) != 0, border)


@pytest.mark.parametrize("value", [0, -5, 2.5, True, "big"])
def test_invalid_max_tile_pixels(value):
    masked = MaskedImage(np.ones((10, 10)), variance=np.ones((10, 10)))
    function = SpatialFunction("chebyshev1", 0, (0, 0, 9, 9))
    kernel = SpatialKernel(np.ones((1, 3, 3)), np.ones((1, 1)), function)
    with pytest.raises(ConfigurationError, match="max_tile_pixels"):
        convolve_masked_image(masked, kernel, max_tile_pixels=value)


# --------------------------------------------------------------------------
# kernel path: the same tiling through the accumulation and mask kernels


@pytest.mark.parametrize(("order", "model"), [(2, "chebyshev1"), (1, "polynomial")])
def test_emulated_tiled_equals_numpy_whole_image(emulator, monkeypatch, order, model):
    rng = np.random.default_rng(20 + order)
    shape, xy0, half = (64, 80), (500, 300), 3
    bbox = (xy0[0], xy0[1], xy0[0] + shape[1] - 1, xy0[1] + shape[0] - 1)
    kernel = make_kernel(rng, half, order, bbox, model)
    max_tile_pixels = (9 + 2 * half) * shape[1]   # 9 rows allowed: 8 bands of 8 rows
    bands = apply._band_ranges(*shape, half, max_tile_pixels)
    masked = make_image(rng, shape, xy0, bands, half)
    with use_backend("numpy"):
        whole = convolve_masked_image(masked, kernel, max_tile_pixels=UNTILED)
    with use_backend("cuda-emulator"):
        calls = band_spy(monkeypatch)
        tiled = convolve_masked_image(masked, kernel, max_tile_pixels=max_tile_pixels)
    assert calls == bands and len(bands) == 8
    assert all(isinstance(plane, np.ndarray) for plane in tiled)
    assert_same(tiled, whole, np.float64, shape, half)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_cupy_tiled_equals_numpy_whole_image(monkeypatch, dtype):
    import cupy

    rng = np.random.default_rng(30)
    shape, xy0, half = (301, 257), (40, 70), 5
    bbox = (xy0[0], xy0[1], xy0[0] + shape[1] - 1, xy0[1] + shape[0] - 1)
    kernel = make_kernel(rng, half, 2, bbox, "chebyshev1")
    max_tile_pixels = (40 + 2 * half) * shape[1]
    bands = apply._band_ranges(*shape, half, max_tile_pixels)
    masked = make_image(rng, shape, xy0, bands, half, dtype)
    with use_backend("numpy"):
        whole = convolve_masked_image(masked, kernel, max_tile_pixels=UNTILED)
    calls = band_spy(monkeypatch)
    tiled = convolve_masked_image(masked.to_module(cupy), kernel, max_tile_pixels=max_tile_pixels)
    assert calls == bands and len(bands) > 1
    assert all(isinstance(plane, cupy.ndarray) for plane in tiled)
    rtol = {np.float64: 1e-12, np.float32: 1e-5}[dtype]   # cuFFT vs pocketfft rounding
    for got, want in zip(tiled[:2], whole[:2]):
        got = cupy.asnumpy(got)
        np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max())
    np.testing.assert_array_equal(cupy.asnumpy(tiled[2]), whole[2])
