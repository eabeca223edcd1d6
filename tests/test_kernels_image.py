"""Full-image application and Lanczos-3 warp kernels against their NumPy references.

``kernels/image_apply.cu`` and ``kernels/warp.cu``, compiled by g++ with
``gpudiffim/_cuda/emulator.h`` and launched through the wrappers of
:mod:`gpudiffim._cuda.image_apply` and :mod:`gpudiffim._cuda.warp` (or :func:`gpudiffim._cuda.launch`
directly, with small grids that exercise the grid-stride loops):

* ``gdi_accumulate_terms`` (one term) equals the accumulation step of
  :func:`gpudiffim.apply._weighted_correlations` bit for bit;
* the OR filters equal :func:`gpudiffim.apply.propagate_mask` (full boxes and
  irregular footprints, several bits) and
  :func:`gpudiffim._ops.NUMPY.dilated_bad_pixels` exactly;
* ``gdi_warp_lanczos3`` equals :func:`gpudiffim.warp.warp_masked_image` (and
  its ``_resample_block``) to 1e-12 relative in float64 and 1e-6 in float32,
  masks exactly;
* with a GPU, the CuPy launches equal NumPy (``@pytest.mark.gpu``).

Seeds are fresh per test and recorded in the report (``rng`` fixture); output
buffers are poisoned (NaN, or the sentinel 0x7fffffff / -1 for int32) so an
unwritten element fails.  The references run under ``use_backend("numpy")``.
"""

import numpy as np
import pytest
import scipy.ndimage as ndi
from astropy.wcs import WCS
from numpy.testing import assert_allclose, assert_array_equal

from gpudiffim import MaskedImage, _resample, apply, use_backend, warp
from gpudiffim._ops import KERNELS, NUMPY
from gpudiffim._cuda import launch
from gpudiffim._cuda.image_apply import (
    accumulate_terms,
    MAX_BLOCKS,
    THREADS,
    accumulate_term,
    copy_edge,
    grid_stride_geometry,
    or_filter_box,
    or_filter_footprint,
    propagate_mask,
    spatial_powers,
    spatial_terms,
)
from gpudiffim._cuda.warp import warp_resample
from gpudiffim.convolve import FourierCorrelator
from gpudiffim.image import DEFAULT_MASK_PLANES
from gpudiffim.spatial import GridFactors, SpatialFunction

PLANES = dict(DEFAULT_MASK_PLANES)
NO_DATA, EDGE, BAD, SAT = (1 << PLANES[name] for name in ("NO_DATA", "EDGE", "BAD", "SAT"))
OUTSIDE = NO_DATA | EDGE
RTOL = {np.float64: 1e-12, np.float32: 1e-6}
SENTINEL = np.int32(0x7FFFFFFF)


def _random_mask(gen, shape, fraction=0.08, bits=(0, 1, 3, 5, 8, 17, 30)):
    """int32 mask: a fraction of pixels carrying one or two of ``bits``."""
    first = np.array([1 << b for b in bits])[gen.integers(0, len(bits), size=shape)]
    second = np.array([1 << b for b in bits])[gen.integers(0, len(bits), size=shape)]
    values = np.where(gen.random(shape) < 0.5, first, first | second)
    return np.where(gen.random(shape) < fraction, values, 0).astype(np.int32)


# ---------------------------------------------------------------------------
# geometry


def test_grid_stride_geometry():
    assert grid_stride_geometry(0, "emulator") == ((1,), (THREADS,))
    assert grid_stride_geometry(THREADS + 1, "cupy") == ((2,), (THREADS,))
    assert grid_stride_geometry(10**9, "emulator") == ((MAX_BLOCKS["emulator"],), (THREADS,))
    assert grid_stride_geometry(10**9, "cupy") == ((MAX_BLOCKS["cupy"],), (THREADS,))
    assert MAX_BLOCKS["emulator"] <= 256 and THREADS <= 256  # emulator budget: a few hundred blocks
    with pytest.raises(ValueError, match="launcher must be"):
        grid_stride_geometry(10, "numba")


# ---------------------------------------------------------------------------
# term accumulation == _ops.NUMPY.accumulate_term, bit for bit


def _numpy_accumulate(out, term, rows, cols, dtype):
    """The three lines of _ops.NUMPY.accumulate_term."""
    out, term = out.copy(), term.copy()
    term *= rows[:, None].astype(dtype)
    term *= cols[None, :].astype(dtype)
    out += term
    return out


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", [(1, 1), (17, 23), (2, 301), (70, 300)])  # 70 x 300 > 64 blocks x 256
def test_emulated_accumulate_term_is_bit_exact(emulator, rng, dtype, shape):
    gen, seed = rng
    out = gen.normal(size=shape).astype(dtype)  # in place: random start, so an unwritten element differs
    term = gen.normal(size=shape).astype(dtype)
    rows, cols = gen.normal(size=shape[0]), gen.normal(size=shape[1])
    want = _numpy_accumulate(out, term, rows, cols, dtype)
    got = accumulate_term(out, term, rows, cols)
    assert got is out
    assert_array_equal(out.view(np.uint8), want.view(np.uint8), err_msg=f"seed={seed}")


def test_emulated_accumulate_term_small_grid(emulator, rng):
    """2 blocks of 32 threads for 17 x 23 pixels: the grid-stride loop covers the rest."""
    gen, seed = rng
    out = gen.normal(size=(17, 23))
    term, rows, cols = gen.normal(size=(17, 23)), gen.normal(size=17), gen.normal(size=23)
    want = _numpy_accumulate(out, term, rows, cols, np.float64)
    launch("gdi_accumulate_terms<double>", 2, 32, (term[None], 1, 17, 23, 0, 0, rows[None], cols[None], 17, 23, out))
    assert_array_equal(out, want, err_msg=f"seed={seed}")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_emulated_weighted_correlations_match_apply(emulator, rng, dtype):
    """FFT correlation (library call) + one-term gdi_accumulate_terms == NUMPY.weighted_correlations_whole, and the
    kernel path's batched transforms + one gdi_accumulate_terms launch give the same sums bit for bit."""
    gen, seed = rng
    image = gen.normal(size=(19, 26)).astype(dtype)
    kernels = gen.normal(size=(4, 5, 5))
    kernels[2] = 0.0  # skipped by both
    factors = [(gen.normal(size=19), gen.normal(size=26)) for _ in range(4)]
    with use_backend("numpy"):
        want = NUMPY.weighted_correlations_whole(image, kernels, factors, dtype)
        correlator = FourierCorrelator(image, kernels.shape[1:], dtype)
        got = np.zeros(image.shape, dtype=dtype)
        for kernel, (rows, cols) in zip(kernels, factors):
            if np.any(kernel):
                accumulate_term(got, correlator.correlate(kernel), rows, cols)
    assert got.dtype == want.dtype
    assert_array_equal(got, want, err_msg=f"seed={seed}")
    batched = KERNELS.weighted_correlations(image, kernels, factors, dtype)
    tolerance = (1e-13 if dtype == np.float64 else 2e-6) * np.abs(want).max()   # batched vs single transforms
    assert batched.dtype == want.dtype
    np.testing.assert_allclose(batched, want, rtol=0, atol=tolerance, err_msg=f"seed={seed}")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("model_type, order", [("chebyshev1", 4), ("chebyshev1", 0), ("polynomial", 2),
                                                ("polynomial", 4)])
def test_emulated_spatial_powers_match_axis_powers(emulator, dtype, model_type, order):
    """gdi_spatial_powers == SpatialFunction.axis_powers rounded to dtype: bit for bit for Chebyshev tables and
    monomials up to t^2, to 1 ulp of float64 for higher monomial powers (pow), along both axes of an
    off-centre box, at coordinates inside and outside it."""
    function = SpatialFunction(model_type, order, (-37, 12, 1990, 4107))
    for axis, first, n in ((0, -5, 300), (1, 2040, 77), (0, 4100, 1)):
        want = function.axis_powers(first + np.arange(n), axis).astype(dtype)
        got = spatial_powers(np, first, n, order, function.axis_scaling(axis), dtype)
        assert got.shape == (order + 1, n) and got.dtype == dtype
        exact = min(order, 2) + 1 if model_type == "polynomial" else order + 1
        assert_array_equal(got[:exact], want[:exact])
        np.testing.assert_allclose(got[exact:], want[exact:], rtol=2 * np.finfo(dtype).eps, atol=0)


@pytest.mark.parametrize("model_type, order", [("chebyshev1", 3), ("chebyshev1", 0), ("polynomial", 2),
                                                ("polynomial", 4)])
def test_emulated_spatial_terms_match_terms(emulator, model_type, order):
    """gdi_spatial_terms == SpatialFunction.terms at parent (x0 + column, y0 + row): bit for bit for Chebyshev
    terms and monomials up to degree 2 per axis, to 2 ulp for higher monomial powers (pow), at centres inside
    and outside an off-centre box; and the NumPy stand-in of the kernel gives the same values."""
    from standin_kernels import FAST

    function = SpatialFunction(model_type, order, (-37, 12, 1990, 4107))
    rng = np.random.default_rng(5)
    centres_rc = np.stack([rng.integers(-20, 4200, 37), rng.integers(-50, 2100, 37)], axis=1).astype(np.int32)
    origin = (-3, 9)
    want = function.terms(origin[0] + centres_rc[:, 1].astype(np.float64),
                          origin[1] + centres_rc[:, 0].astype(np.float64))
    scalings = None if model_type == "polynomial" else (function.axis_scaling(1), function.axis_scaling(0))
    got = spatial_terms(centres_rc, origin, order, scalings)
    assert got.shape == want.shape and got.dtype == np.float64
    if model_type == "polynomial" and order > 2:
        assert_allclose(got, want, rtol=2 * np.finfo(np.float64).eps, atol=0)
    else:
        assert_array_equal(got, want)
    fast = np.empty_like(want)
    (mid_x, width_x), (mid_y, width_y) = scalings or ((0.0, 1.0), (0.0, 1.0))
    FAST["gdi_spatial_terms"](centres_rc, len(centres_rc), *origin, int(scalings is not None), mid_x, width_x,
                              mid_y, width_y, order, fast)
    assert_array_equal(fast, want)
    with pytest.raises(ValueError, match="order"):
        spatial_terms(centres_rc, origin, 16, scalings)


def test_grid_factors_sequence_equals_grid_factors():
    function = SpatialFunction("chebyshev1", 3, (0, 0, 99, 49))
    factors = GridFactors(function, 7, -3, 20, 31)
    want = function.grid_factors(7 + np.arange(31), -3 + np.arange(20))
    assert len(factors) == len(want) == 10
    for (rows, cols), (want_rows, want_cols) in zip(factors, want):
        assert_array_equal(rows, want_rows)
        assert_array_equal(cols, want_cols)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_emulated_weighted_correlations_build_grid_factors_in_place(emulator, rng, dtype):
    """The kernel path given GridFactors (tables built by gdi_spatial_powers) sums exactly what it sums
    given the same factors as host arrays."""
    gen, seed = rng
    image = gen.normal(size=(23, 30)).astype(dtype)
    kernels = gen.normal(size=(10, 5, 5))
    kernels[4] = 0.0
    factors = GridFactors(SpatialFunction("chebyshev1", 3, (0, 0, 59, 44)), 11, 9, 23, 30)
    got = KERNELS.weighted_correlations(image, kernels, factors, dtype)
    want = KERNELS.weighted_correlations(image, kernels, list(factors), dtype)
    assert_array_equal(got, want, err_msg=f"seed={seed}")


@pytest.mark.parametrize("model_type", ["chebyshev1", "polynomial"])
def test_emulated_spatial_image_matches_evaluate(emulator, rng, model_type):
    """The background on a grid from device-built tables equals SpatialFunction.evaluate at every pixel."""
    gen, seed = rng
    function = SpatialFunction(model_type, 2, (0, 0, 63, 47))
    coefficients = gen.normal(size=function.n_terms)
    got = KERNELS.spatial_image(GridFactors(function, 5, 3, 20, 30), coefficients, np)
    y, x = np.mgrid[3:23, 5:35]
    np.testing.assert_allclose(got, function.evaluate(coefficients, x, y), rtol=1e-12, atol=1e-12,
                               err_msg=f"seed={seed}")
    assert_array_equal(got, NUMPY.spatial_image(GridFactors(function, 5, 3, 20, 30), coefficients, np))


def test_emulated_accumulate_terms_is_bit_exact(emulator, rng):
    """One gdi_accumulate_terms launch == one gdi_accumulate_term launch per term, bit for bit, reading
    the terms in place from an uncropped stack."""
    gen, seed = rng
    for dtype in (np.float32, np.float64):
        out = gen.normal(size=(13, 17)).astype(dtype)
        full = gen.normal(size=(3, 20, 24)).astype(dtype)
        rows, cols = gen.normal(size=(3, 13)), gen.normal(size=(3, 17))
        want = out.copy()
        for t in range(3):
            accumulate_term(want, np.ascontiguousarray(full[t, 2:15, 4:21]), rows[t], cols[t])
        accumulate_terms(out, full, 2, 4, rows, cols)
        assert_array_equal(out.view(np.uint8), want.view(np.uint8), err_msg=f"seed={seed} {dtype}")
    with pytest.raises(ValueError, match="do not match"):
        accumulate_terms(out, full, 8, 4, rows, cols)


# ---------------------------------------------------------------------------
# mask propagation == apply.propagate_mask / _ops.NUMPY.dilated_bad_pixels, exactly


def _reference_propagate(mask, footprint):
    with use_backend("numpy"):
        return apply.propagate_mask(mask, footprint)


@pytest.mark.parametrize("image_shape", [(17, 23), (1, 1), (3, 40)])
@pytest.mark.parametrize("box", [(1, 1), (3, 3), (5, 7), (7, 3), (9, 31), (41, 45)])
def test_emulated_propagate_mask_full_box(emulator, rng, image_shape, box):
    gen, seed = rng
    mask = _random_mask(gen, image_shape)
    footprint = np.ones(box, dtype=bool)
    got = propagate_mask(mask, footprint)
    assert got.dtype == np.int32
    assert_array_equal(got, _reference_propagate(mask, footprint), err_msg=f"seed={seed} box={box}")


def _irregular_footprints(gen):
    random = gen.random((5, 7)) < 0.5
    random[2, 3] = False  # centre unset: a pixel does not even propagate onto itself
    random[0, 6] = True
    shift = np.zeros((5, 5), dtype=bool)
    shift[0, 4] = True  # a pure shift: out[y, x] = mask[y - 2, x + 2]
    wide = gen.random((25, 29)) < 0.3  # bigger than a 17 x 23 image
    wide[12, 14] = True
    disk = np.hypot(*np.mgrid[-4:5, -4:5]) <= 4.2
    return {"random": random, "shift": shift, "even_4x6": gen.random((4, 6)) < 0.6, "even_box_4x6":
            np.ones((4, 6), dtype=bool), "single_off_centre": np.eye(1, 3, 2, dtype=bool), "wide": wide,
            "disk": disk}


@pytest.mark.parametrize("name", ["random", "shift", "even_4x6", "even_box_4x6", "single_off_centre", "wide",
                                  "disk"])
@pytest.mark.parametrize("image_shape", [(17, 23), (2, 3)])
def test_emulated_propagate_mask_irregular_footprint(emulator, rng, name, image_shape):
    gen, seed = rng
    footprint = _irregular_footprints(gen)[name]
    mask = _random_mask(gen, image_shape, fraction=0.1)
    if not footprint.any():
        footprint[0, 0] = True
    got = propagate_mask(mask, footprint)
    assert_array_equal(got, _reference_propagate(mask, footprint), err_msg=f"seed={seed} footprint={name}")


def test_propagate_mask_orientation_is_afw_correlation(emulator):
    """footprint[h + v, h + u] set: output (x, y) takes input (x + u, y + v)."""
    mask = np.zeros((7, 9), dtype=np.int32)
    mask[3, 4] = BAD | SAT
    footprint = np.zeros((3, 3), dtype=bool)
    footprint[0, 2] = True  # v = -1, u = +1
    got = propagate_mask(mask, footprint)
    want = np.zeros_like(mask)
    want[3 + 1, 4 - 1] = BAD | SAT  # y + v = 3, x + u = 4
    assert_array_equal(got, want)
    assert_array_equal(got, _reference_propagate(mask, footprint))


@pytest.mark.parametrize("footprint_kind", ["box", "irregular"])
def test_emulated_or_filters_with_poisoned_outputs(emulator, rng, footprint_kind):
    """Direct launches (3 blocks of 32 threads) into sentinel-filled outputs."""
    gen, seed = rng
    mask = _random_mask(gen, (2, 17, 23), bits=(0, 1, 4, 9, 29))  # never all 31 bits: no sentinel value
    if footprint_kind == "box":
        tmp = np.full(mask.shape, SENTINEL, dtype=np.int32)
        out = np.full(mask.shape, SENTINEL, dtype=np.int32)
        launch("gdi_or_filter_1d", 3, 32, (mask, 2, 17, 23, 2, 0, tmp))
        launch("gdi_or_filter_1d", 3, 32, (tmp, 2, 17, 23, 3, 1, out))
        footprint = np.ones((5, 7), dtype=bool)
    else:
        footprint = gen.random((5, 4)) < 0.5
        footprint[0, 0] = True
        out = np.full(mask.shape, SENTINEL, dtype=np.int32)
        launch("gdi_or_filter_footprint", 3, 32,
               (mask, footprint.astype(np.int32), 2, 17, 23, 5, 4, out))
    assert not (out == SENTINEL).any(), seed
    for n in range(2):
        assert_array_equal(out[n], _reference_propagate(mask[n], footprint), err_msg=f"seed={seed} image={n}")


@pytest.mark.parametrize("half_width", [0, 1, 3, 10])
def test_emulated_dilated_bad_pixels_match_stamps(emulator, rng, half_width):
    gen, seed = rng
    size = 2 * half_width + 9
    mask = _random_mask(gen, (5, size, size), fraction=0.03)
    mask[0] = 0  # a stamp with nothing flagged
    bad_bits = BAD | SAT
    want = NUMPY.dilated_bad_pixels(mask, bad_bits, half_width)
    h = half_width
    grown = or_filter_box(mask & bad_bits, h, h)
    assert grown.shape == mask.shape and grown.dtype == np.int32
    assert_array_equal(grown[:, h:size - h, h:size - h] != 0, want, err_msg=f"seed={seed}")


@pytest.mark.parametrize("half", [(0, 0), (1, 2), (4, 0), (30, 30)])
def test_emulated_or_filter_box_matches_scipy_per_bit(emulator, rng, half):
    gen, seed = rng
    mask = _random_mask(gen, (3, 17, 23))
    got = or_filter_box(mask, *half)
    size = (1, 2 * half[0] + 1, 2 * half[1] + 1)
    want = np.zeros_like(mask)
    for bit in range(31):
        plane = (mask >> bit) & 1
        want |= ndi.maximum_filter(plane, size=size, mode="constant") << bit
    assert_array_equal(got, want, err_msg=f"seed={seed} half={half}")


def test_emulated_or_filter_footprint_stack(emulator, rng):
    gen, seed = rng
    mask = _random_mask(gen, (3, 11, 13))
    footprint = gen.random((3, 5)) < 0.5
    footprint[1, 1] = True
    got = or_filter_footprint(mask, footprint)
    for n in range(3):
        assert_array_equal(got[n], _reference_propagate(mask[n], footprint), err_msg=f"seed={seed}")


def test_mask_conversions_and_errors(emulator):
    mask = np.zeros((4, 5), dtype=np.int64)
    mask[1, 2] = 2**31 - 1
    assert or_filter_box(mask, 1, 1)[0, 1] == 2**31 - 1  # int64 that fits: converted
    assert or_filter_box(mask.astype(">i4"), 0, 0)[1, 2] == 2**31 - 1  # big-endian: converted
    assert or_filter_box(mask.astype(np.uint16) != 0, 0, 0).dtype == np.int32  # boolean
    mask[0, 0] = 2**31
    with pytest.raises(ValueError, match="fit in int32"):
        or_filter_box(mask, 1, 1)
    with pytest.raises(ValueError, match="fit in int32"):
        propagate_mask(mask.astype(np.uint32), np.ones((3, 3), dtype=bool))
    with pytest.raises(TypeError, match="integer"):
        or_filter_box(np.zeros((3, 3)), 1, 1)
    with pytest.raises(ValueError, match="all zero"):
        propagate_mask(np.zeros((3, 3), dtype=np.int32), np.zeros((3, 3), dtype=bool))
    with pytest.raises(ValueError, match="non-empty 2-D"):
        propagate_mask(np.zeros((3, 3), dtype=np.int32), np.ones((0, 3), dtype=bool))
    with pytest.raises(ValueError, match="2-D .* or 3-D"):
        or_filter_box(np.zeros(5, dtype=np.int32), 1, 1)
    with pytest.raises(ValueError, match="non-negative"):
        or_filter_box(np.zeros((3, 3), dtype=np.int32), -1, 1)
    with pytest.raises(TypeError, match="C-contiguous"):
        accumulate_term(np.zeros((4, 6)).T, np.zeros((6, 4)), np.zeros(6), np.zeros(4))
    with pytest.raises(ValueError, match="term must have"):
        accumulate_term(np.zeros((4, 6)), np.zeros((4, 6)), np.zeros(6), np.zeros(4))


# ---------------------------------------------------------------------------
# border copy == NumpyOperations.copy_edge


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, half", [((17, 23), (3, 4)), ((9, 9), (4, 4)), ((5, 7), (4, 2)),
                                         ((6, 3), (2, 9)), ((8, 8), (0, 3)), ((4, 4), (0, 0))])
def test_emulated_copy_edge_matches_strips(emulator, rng, dtype, shape, half):
    """Every border pixel (the whole image when the kernel is wider) copied exactly once, the
    interior untouched; outputs start from poisoned values so that a missed pixel shows."""
    gen, seed = rng
    inputs = (gen.normal(size=shape).astype(dtype), gen.random(shape).astype(dtype), _random_mask(gen, shape, 0.3))
    start = (np.full(shape, np.nan, dtype=dtype), np.full(shape, -7.0, dtype=dtype), _random_mask(gen, shape, 0.5))
    expected = NUMPY.copy_edge(inputs, *half, EDGE, tuple(p.copy() for p in start))
    got = copy_edge(inputs, *half, EDGE, tuple(p.copy() for p in start))
    for name, g, e in zip(("image", "variance", "mask"), got, expected):
        assert_array_equal(g, e, err_msg=f"{name} seed={seed}")
    hy, hx = min(half[0], shape[0]), min(half[1], shape[1])
    interior = (slice(hy, shape[0] - hy), slice(hx, shape[1] - hx))
    assert np.isnan(got[0][interior]).all()
    assert (got[2] & EDGE != 0).sum() == shape[0] * shape[1] - got[0][interior].size


def test_copy_edge_errors(emulator):
    planes = (np.zeros((4, 5)), np.zeros((4, 5)), np.zeros((4, 5), dtype=np.int32))
    with pytest.raises(TypeError, match="int32 mask"):
        copy_edge(planes, 1, 1, EDGE, (np.zeros((4, 5)), np.zeros((4, 5)), np.zeros((4, 5))))
    with pytest.raises(ValueError, match="shape"):
        copy_edge(planes, 1, 1, EDGE, (np.zeros((4, 6)), np.zeros((4, 6)), np.zeros((4, 6), dtype=np.int32)))
    with pytest.raises(ValueError, match="non-negative"):
        copy_edge(planes, -1, 1, EDGE, tuple(p.copy() for p in planes))


# ---------------------------------------------------------------------------
# Lanczos-3 warp == warp.py


def _source_planes(gen, shape, dtype):
    """Random image, positive variance, a mask with some BAD/SAT and NO_DATA pixels (image = var = 0)."""
    image = gen.normal(10.0, 3.0, size=shape)
    variance = gen.uniform(0.5, 2.0, size=shape)
    mask = np.where(gen.random(shape) < 0.05, gen.choice([BAD, SAT, BAD | SAT, 1 << 5], size=shape), 0)
    no_data = gen.random(shape) < 0.004
    no_data[shape[0] // 3, shape[1] // 3] = True  # at least one (it spreads over 6 x 6 output pixels)
    mask[no_data] |= NO_DATA
    image[no_data] = 0.0
    variance[no_data] = 0.0
    return image.astype(dtype), variance.astype(dtype), mask.astype(np.int32)


def _mapping(gen, source_shape, target_shape):
    """Random small rotation + shift, plus every special case of _resample.resample_block."""
    theta = gen.uniform(-0.06, 0.06)
    shift = gen.uniform(-2.5, 2.5, size=2)
    yy, xx = np.indices(target_shape, dtype=np.float64)
    cx_t, cy_t = (target_shape[1] - 1) / 2, (target_shape[0] - 1) / 2
    cx_s, cy_s = (source_shape[1] - 1) / 2, (source_shape[0] - 1) / 2
    x = cx_s + np.cos(theta) * (xx - cx_t) - np.sin(theta) * (yy - cy_t) + shift[0]
    y = cy_s + np.sin(theta) * (xx - cx_t) + np.cos(theta) * (yy - cy_t) + shift[1]
    nx = source_shape[1]
    x[0, :2] = np.nan  # unmapped
    y[1, 0] = np.inf
    x[2, 1:6] = np.round(x[2, 1:6])  # integer x: a 6 x 1 window
    y[3, 2:7] = np.round(y[3, 2:7])  # integer y
    x[3, 2:4] = np.round(x[3, 2:4])  # both integer: the pixel itself
    x[4, 1:5] = np.round(x[4, 1:5]) + gen.uniform(-9e-7, 9e-7, size=4)  # snapped onto the integer
    y[5, :6] = np.round(y[5, :6]) + np.array([1.1e-6, -1.1e-6, 0.0, 0.5, -2e-7, 3e-7])  # not snapped / snapped
    x[6, :8] = [-1.0, -1.0 + 1e-9, -1.5, nx - 1 + 0.7, nx - 0.5, nx + 1e-3, -3.2, 1e12]  # padding boundaries
    y[7, :4] = [-1.0, -1.5, 1e-8, -5e-7]
    return x, y


def _numpy_resample(image, variance, mask, x, y, scale=None):
    """_resample.resample_block plus the per-block tail of warp.warp_masked_image."""
    masked = MaskedImage._from_planes(image, mask, variance, (0, 0), PLANES)
    with use_backend("numpy"):
        source = _resample.PaddedSource(masked, OUTSIDE)
        out_image, out_variance, out_mask, off_image = _resample.resample_block(source, x, y)
    out_mask[off_image] = OUTSIDE
    if scale is not None:
        out_image *= scale
        out_variance *= scale * scale
    empty = (out_mask & NO_DATA) != 0
    out_image[empty] = 0.0
    out_variance[empty] = 0.0
    return out_image.astype(image.dtype), out_variance.astype(image.dtype), out_mask


def _assert_warp_close(got, want, dtype, note):
    rtol = RTOL[dtype]
    for name, g, w in zip(("image", "variance"), got[:2], want[:2]):
        assert g.dtype == dtype, (name, note)
        assert np.isfinite(g).all(), f"{name}: unwritten (NaN) element; {note}"
        floor = rtol * float(np.max(np.abs(w), initial=0.0))  # sums of signed terms can cancel
        assert_allclose(g, w, rtol=rtol, atol=floor, err_msg=f"{name}; {note}")
    assert got[2].dtype == np.int32
    assert_array_equal(got[2], want[2], err_msg=f"mask; {note}")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize(("source_shape", "target_shape"), [((17, 23), (19, 21)), ((5, 7), (9, 11)),
                                                            ((1, 1), (9, 9)), ((40, 31), (33, 37))])
@pytest.mark.parametrize("with_scale", [False, True])
def test_emulated_warp_matches_resample_block(emulator, rng, dtype, source_shape, target_shape, with_scale):
    gen, seed = rng
    image, variance, mask = _source_planes(gen, source_shape, dtype)
    x, y = _mapping(gen, source_shape, target_shape)
    scale = gen.uniform(0.9, 1.1, size=target_shape) if with_scale else None
    got = warp_resample(image, variance, mask, x, y, no_data=NO_DATA, outside_bits=OUTSIDE, scale=scale)
    want = _numpy_resample(image, variance, mask, x, y, scale)
    note = f"seed={seed} dtype={np.dtype(dtype).name} source={source_shape} target={target_shape}"
    _assert_warp_close(got, want, dtype, note)
    assert (got[2][0, :2] == OUTSIDE).all() and got[2][1, 0] == OUTSIDE, note


def test_emulated_warp_small_grid_and_poisoned_outputs(emulator, rng):
    """3 blocks of 32 threads for 19 x 21 output pixels, outputs poisoned with NaN / sentinel."""
    gen, seed = rng
    image, variance, mask = _source_planes(gen, (17, 23), np.float64)
    x, y = _mapping(gen, (17, 23), (19, 21))
    out = (np.full(x.shape, np.nan), np.full(x.shape, np.nan), np.full(x.shape, SENTINEL, dtype=np.int32))
    launch("gdi_warp_lanczos3<double>", 3, 32,
           (image, variance, mask, 17, 23, x, y, np.ones(1), 0, x.size, NO_DATA, OUTSIDE, *out))
    assert not (out[2] == SENTINEL).any(), seed
    _assert_warp_close(out, _numpy_resample(image, variance, mask, x, y), np.float64, f"seed={seed}")


def _tan_wcs(crpix, rotation_deg=0.0):
    """TAN WCS at 0.2"/px; ``crpix`` 0-based."""
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [150.0, 2.0]
    wcs.wcs.crpix = [crpix[0] + 1, crpix[1] + 1]
    scale = 0.2 / 3600
    wcs.wcs.cdelt = [-scale, scale]
    t = np.deg2rad(rotation_deg)
    wcs.wcs.pc = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
    return wcs


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("conserve_flux", [False, True])
def test_emulated_warp_matches_warp_masked_image(emulator, rng, dtype, conserve_flux):
    """End to end: pixel mapping from two WCSs (random rotation + shift), kernel == warp_masked_image."""
    gen, seed = rng
    image, variance, mask = _source_planes(gen, (23, 29), dtype)
    masked = MaskedImage(image, mask, variance, xy0=(3, -2))
    source_wcs = _tan_wcs((14.0, 11.0))
    target_wcs = _tan_wcs((14.0 - gen.uniform(-3, 3), 11.0 - gen.uniform(-3, 3)),
                          rotation_deg=gen.uniform(-4, 4))
    target_shape, target_xy0, interp_length = (21, 26), (4, -1), 4
    with use_backend("numpy"):
        want = warp.warp_masked_image(masked, source_wcs, target_wcs, target_shape, target_xy0,
                                      interp_length=interp_length, conserve_flux=conserve_flux)
    coarse = warp._CoarseMapping(source_wcs, target_wcs, target_shape, target_xy0, masked.xy0, interp_length)
    rows = target_shape[0]
    x, y = coarse.interpolate(coarse.x, 0, rows), coarse.interpolate(coarse.y, 0, rows)
    scale = coarse.interpolate(coarse.jacobian_determinant(), 0, rows) if conserve_flux else None
    got = warp_resample(masked.image, masked.variance, masked.mask, x, y, no_data=masked.bits(["NO_DATA"]),
                        outside_bits=masked.bits(["NO_DATA", "EDGE"]), scale=scale)
    note = f"seed={seed} dtype={np.dtype(dtype).name} conserve_flux={conserve_flux}"
    _assert_warp_close(got, (want.image, want.variance, want.mask), dtype, note)
    assert (got[2] & NO_DATA).any() and not (got[2] & NO_DATA).all(), note  # both kinds of pixel occur


def test_warp_resample_errors():
    image = np.ones((4, 5))
    x = y = np.zeros((3, 3))
    with pytest.raises(ValueError, match="include a no_data bit"):
        warp_resample(image, image, np.zeros((4, 5), np.int32), x, y, no_data=NO_DATA, outside_bits=EDGE)
    with pytest.raises(TypeError, match="variance must have the image dtype"):
        warp_resample(image, image.astype(np.float32), np.zeros((4, 5), np.int32), x, y, no_data=NO_DATA,
                      outside_bits=OUTSIDE)
    with pytest.raises(TypeError, match="float32 or float64"):
        warp_resample(image.astype(np.int32), image, np.zeros((4, 5), np.int32), x, y, no_data=NO_DATA,
                      outside_bits=OUTSIDE)
    with pytest.raises(ValueError, match="one shape"):
        warp_resample(image, image, np.zeros((4, 5), np.int32), x, np.zeros((3, 4)), no_data=NO_DATA,
                      outside_bits=OUTSIDE)
    with pytest.raises(ValueError, match="2-D of one shape"):
        warp_resample(image, image, np.zeros((5, 4), np.int32), x, y, no_data=NO_DATA, outside_bits=OUTSIDE)


# ---------------------------------------------------------------------------
# the same kernels on a GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_cupy_accumulate_term_is_bit_exact(rng, dtype):
    import cupy

    gen, seed = rng
    shape = (517, 1031)
    out = gen.normal(size=shape).astype(dtype)
    term = gen.normal(size=shape).astype(dtype)
    rows, cols = gen.normal(size=shape[0]), gen.normal(size=shape[1])
    want = _numpy_accumulate(out, term, rows, cols, dtype)
    got = cupy.asarray(out)
    accumulate_term(got, cupy.asarray(term), cupy.asarray(rows), cupy.asarray(cols))
    assert_array_equal(cupy.asnumpy(got), want, err_msg=f"seed={seed}")


@pytest.mark.gpu
def test_cupy_mask_propagation_matches_numpy(rng):
    import cupy

    gen, seed = rng
    mask = _random_mask(gen, (301, 257))
    for footprint in (np.ones((19, 21), dtype=bool), gen.random((19, 17)) < 0.5, np.ones((4, 6), dtype=bool)):
        got = propagate_mask(cupy.asarray(mask), footprint)
        assert isinstance(got, cupy.ndarray) and got.dtype == np.int32
        assert_array_equal(cupy.asnumpy(got), _reference_propagate(mask, footprint), err_msg=f"seed={seed}")
    stack = _random_mask(gen, (40, 31, 31), fraction=0.03)
    want = NUMPY.dilated_bad_pixels(stack, BAD | SAT, 5)
    grown = cupy.asnumpy(or_filter_box(cupy.asarray(stack) & (BAD | SAT), 5, 5))
    assert_array_equal(grown[:, 5:26, 5:26] != 0, want, err_msg=f"seed={seed}")


@pytest.mark.gpu
@pytest.mark.parametrize("shape, half", [((517, 1031), (10, 11)), ((9, 9), (4, 4)), ((5, 7), (4, 2))])
def test_cupy_copy_edge_matches_numpy(rng, shape, half):
    import cupy

    gen, seed = rng
    inputs = (gen.normal(size=shape), gen.random(shape), _random_mask(gen, shape, 0.3))
    start = (np.full(shape, np.nan), np.full(shape, -7.0), _random_mask(gen, shape, 0.5))
    want = NUMPY.copy_edge(inputs, *half, EDGE, tuple(p.copy() for p in start))
    got = copy_edge(tuple(cupy.asarray(p) for p in inputs), *half, EDGE, tuple(cupy.asarray(p) for p in start))
    for name, g, w in zip(("image", "variance", "mask"), got, want):
        assert_array_equal(cupy.asnumpy(g), w, err_msg=f"{name} seed={seed}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("with_scale", [False, True])
def test_cupy_warp_matches_numpy(rng, dtype, with_scale):
    import cupy

    gen, seed = rng
    source_shape, target_shape = (301, 257), (290, 270)
    image, variance, mask = _source_planes(gen, source_shape, dtype)
    x, y = _mapping(gen, source_shape, target_shape)
    scale = gen.uniform(0.9, 1.1, size=target_shape) if with_scale else None
    got = warp_resample(*(cupy.asarray(a) for a in (image, variance, mask, x, y)), no_data=NO_DATA,
                        outside_bits=OUTSIDE, scale=None if scale is None else cupy.asarray(scale))
    assert all(isinstance(a, cupy.ndarray) for a in got)
    want = _numpy_resample(image, variance, mask, x, y, scale)
    _assert_warp_close(tuple(cupy.asnumpy(a) for a in got), want, dtype, f"seed={seed}")
