"""Stamp-fit and spatial-assembly kernels (issue 4, kernels 1, 2 and 4) against their NumPy references.

* ``gdi_correlate_stamps`` (``kernels/stamp_fit.cu``) equals
  :func:`gpudiffim.convolve.correlate_stamps` / ``correlate_stamps_each``
  (FFT) and a direct float64 sum;
* ``gdi_normal_equations`` (``kernels/stamp_fit.cu``) equals
  ``gpudiffim._ops.NUMPY.stamp_normal_equations`` with a ones column appended for the
  background;
* ``gdi_spatial_normal_equations`` (``kernels/spatial_assembly.cu``) equals
  :func:`gpudiffim.spatial_fit.spatial_normal_equations` on maps from
  :func:`~gpudiffim.spatial_fit.local_parameter_maps`.

Each runs on the CPU emulator (g++ and ``gpudiffim/_cuda/emulator.h``) with
fresh seeds (recorded in the test report) and NaN-poisoned output buffers, on
geometries that leave surplus blocks and threads, partial tiles and several
rounds of work per thread; with a GPU the same comparisons run through CuPy
(``@pytest.mark.gpu``).  Tolerances are relative to the sum of absolute terms
of each output element, the scale of its rounding error.
"""

import warnings

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view
from numpy.testing import assert_array_equal

from gpudiffim._backend import use_backend
from gpudiffim._ops import NUMPY, operations_for
from gpudiffim._cuda import launch
from gpudiffim._cuda.signatures import KERNELS
from gpudiffim._cuda.spatial_assembly import (
    spatial_map_structure,
    spatial_normal_equations,
    spatial_normal_equations_geometry,
)
from gpudiffim._cuda.stamp_fit import (
    CORRELATE_MAX_TAPS,
    NORMAL_EQUATIONS_SHARED_DOUBLES,
    STAMP_FIT_DEFINES,
    correlate_stamps,
    correlate_stamps_geometry,
    normal_equations,
)
from gpudiffim.convolve import correlate_stamps as fft_correlate_stamps
from gpudiffim.convolve import correlate_stamps_each as fft_correlate_stamps_each
from gpudiffim.spatial_fit import local_parameter_maps
from gpudiffim.spatial_fit import (
    spatial_normal_equations as reference_spatial_normal_equations,
)

#: Error allowed, relative to the sum of absolute terms of an element.
TOL = 1e-12
#: float32 outputs are one rounding of the double sum: half an ulp, plus slack for the sum.
FLOAT32_RTOL = 1.2e-7

KERNEL_SHAPES = [(1, 1), (3, 3), (5, 7), (7, 5), (2, 4)]


def _host(array):
    return array.get() if type(array).__module__.split(".")[0] == "cupy" else np.asarray(array)


def _assert_close(got, want, scale, tol, note):
    """``|got - want| <= tol * scale`` element by element (scale: sum of absolute terms)."""
    got, want = _host(got).astype(np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, note
    assert np.isfinite(got).all(), f"unwritten or non-finite output; {note}"
    excess = np.abs(got - want) - tol * scale
    worst = np.unravel_index(np.argmax(excess), excess.shape) if excess.size else ()
    assert not excess.size or excess[worst] <= 0, (
        f"{note}: at {worst} got {got[worst]!r}, want {want[worst]!r}, scale {scale[worst]!r}")


# ---------------------------------------------------------------------------
# references

def _direct_correlation(stamps, kernels):
    """``out[n, k, y, x] = sum_{j,i} K[k, j, i] S[n, y + j, x + i]`` as a float64 einsum."""
    kh, kw = kernels.shape[1:]
    windows = sliding_window_view(np.asarray(stamps, np.float64), (kh, kw), axis=(1, 2))
    return np.einsum("nyxji,kji->nkyx", windows, np.asarray(kernels, np.float64), optimize=True)


def _correlation_case(gen, n, n_kernels, stamp_shape, kernel_shape, dtype):
    stamps = gen.normal(1.0, 2.0, size=(n, *stamp_shape)).astype(dtype)
    kernels = gen.normal(0.0, 1.0, size=(n_kernels, *kernel_shape)).astype(dtype)
    return stamps, kernels


def _check_correlation(got, stamps, kernels, per_stamp, dtype, note):
    s64, k64 = stamps.astype(np.float64), kernels.astype(np.float64)
    with use_backend("numpy"):
        want_fft = fft_correlate_stamps_each(s64, k64)[:, None] if per_stamp else fft_correlate_stamps(s64, k64)
    if per_stamp:
        direct = np.stack([_direct_correlation(s64[i:i + 1], k64[i:i + 1])[0] for i in range(len(s64))])
        scale = np.stack([_direct_correlation(np.abs(s64[i:i + 1]), np.abs(k64[i:i + 1]))[0]
                          for i in range(len(s64))])
    else:
        direct = _direct_correlation(s64, k64)
        scale = _direct_correlation(np.abs(s64), np.abs(k64))
    assert _host(got).dtype == np.dtype(dtype), note
    if dtype is np.float64:
        # FFT rounding is global: allow it relative to the largest term sum of the (stamp, kernel) image
        _assert_close(got, want_fft, np.broadcast_to(scale.max(axis=(-2, -1), keepdims=True), scale.shape),
                      TOL, note + " (vs FFT)")
        _assert_close(got, direct, scale, TOL, note + " (vs direct sum)")
    else:
        _assert_close(got, direct, FLOAT32_RTOL * np.abs(direct) + 1e-12 * scale, 1.0, note + " (vs direct sum)")
        _assert_close(got, want_fft, 1e-6 * np.broadcast_to(scale.max(axis=(-2, -1), keepdims=True), scale.shape),
                      1.0, note + " (vs FFT)")


def _reference_normal_equations(columns, weights, target, with_background):
    """The NumPy stamp normal equations on float64 copies (the background's ones column implicit)."""
    columns = np.asarray(columns, np.float64)
    return NUMPY.stamp_normal_equations(columns, np.asarray(target, np.float64), np.asarray(weights, np.float64),
                                        with_background)


def test_implicit_background_column_equals_a_stored_one(rng):
    """The reference's implicit ones column gives the system of the stored column, to rounding."""
    gen, seed = rng
    columns, weights, target = _normal_case(gen, 9, 5, 77, np.float64)
    stored = np.concatenate([columns, np.ones((9, 1, 77))], axis=1)
    want = NUMPY.stamp_normal_equations(stored, target, weights, False)
    got = NUMPY.stamp_normal_equations(columns, target, weights, True)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-12 * np.abs(b).max(), err_msg=f"seed={seed}")
    assert np.array_equal(got[0][:, -1, :], got[0][:, :, -1])      # the background row and column agree exactly


def _normal_case(gen, n, n_basis, n_pix, dtype):
    columns = gen.normal(0.2, 1.0, size=(n, n_basis, n_pix)).astype(dtype)
    weights = gen.uniform(0.05, 3.0, size=(n, n_pix))
    weights[gen.random((n, n_pix)) < 0.1] = 0.0  # masked pixels
    target = gen.normal(0.5, 2.0, size=(n, n_pix)).astype(dtype)
    return columns, weights.astype(dtype), target


def _check_normal_equations(matrix, vector, columns, weights, target, with_background, note):
    want_m, want_v = _reference_normal_equations(columns, weights, target, with_background)
    scale_m, scale_v = _reference_normal_equations(np.abs(columns.astype(np.float64)), weights, np.abs(
        target.astype(np.float64)), with_background)
    _assert_close(matrix, want_m, scale_m, TOL, note + " (matrix)")
    _assert_close(vector, want_v, scale_v, TOL, note + " (vector)")
    m = _host(matrix)
    assert_array_equal(m, m.transpose(0, 2, 1), err_msg=note + ": matrix not exactly symmetric")


def _spatial_case(gen, n, n_basis, n_k, n_g, constant_first_term):
    """Per-stamp systems (Q deliberately not symmetric) and maps of polynomial terms at random centres."""
    x, y = gen.uniform(-1.0, 1.0, size=(2, n))
    powers = [(i, j) for i in range(4) for j in range(4 - i)]
    kernel_terms = np.stack([x**i * y**j for i, j in powers[:n_k]], axis=1)
    bg_terms = None if n_g is None else np.stack([x**i * y**j for i, j in powers[:n_g]], axis=1)
    maps = local_parameter_maps(kernel_terms, bg_terms, n_basis, constant_first_term)
    p = maps.shape[1]
    a = gen.normal(size=(n, p, p + 3))
    matrices = a @ a.transpose(0, 2, 1) + 0.01 * gen.normal(size=(n, p, p))
    vectors = gen.normal(size=(n, p))
    return matrices, vectors, maps


def _check_spatial(matrix, vector, matrices, vectors, maps, note):
    with use_backend("numpy"):  # the reference, not the kernel path it dispatches to on other backends
        want_m, want_v = reference_spatial_normal_equations(matrices, vectors, maps)
        scale_m, scale_v = reference_spatial_normal_equations(np.abs(matrices), np.abs(vectors), np.abs(maps))
    _assert_close(matrix, want_m, scale_m, TOL, note + " (matrix)")
    _assert_close(vector, want_v, scale_v, TOL, note + " (vector)")
    m = _host(matrix)
    assert_array_equal(m, m.T, err_msg=note + ": matrix not exactly symmetric")


# ---------------------------------------------------------------------------
# gdi_correlate_stamps

@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("kernel_shape", KERNEL_SHAPES)
@pytest.mark.parametrize("per_stamp", [False, True])
def test_emulated_correlate_stamps_match_numpy(emulator, rng, dtype, kernel_shape, per_stamp):
    gen, seed = rng
    n = 3
    stamps, kernels = _correlation_case(gen, n, n if per_stamp else 4, (13, 11), kernel_shape, dtype)
    fy, fx = 13 - kernel_shape[0] + 1, 11 - kernel_shape[1] + 1
    out = np.full((n, 1 if per_stamp else 4, fy, fx), np.nan, dtype)  # poisoned: an unwritten element fails
    got = correlate_stamps(stamps, kernels, per_stamp=per_stamp, out=out)
    assert got is out
    note = f"seed={seed} kernel={kernel_shape} dtype={np.dtype(dtype).name} per_stamp={per_stamp}"
    _check_correlation(got, stamps, kernels, per_stamp, dtype, note)


@pytest.mark.parametrize(("stamp_shape", "kernel_shape"), [((1, 1), (1, 1)), ((5, 9), (5, 9)), ((9, 4), (3, 1)),
                                                           ((31, 29), (5, 7))])
def test_emulated_correlate_stamps_edge_shapes(emulator, rng, stamp_shape, kernel_shape):
    """Kernel as large as the stamp (one output), 1-pixel stamps, more outputs than threads."""
    gen, seed = rng
    stamps, kernels = _correlation_case(gen, 2, 3, stamp_shape, kernel_shape, np.float64)
    got = correlate_stamps(stamps, kernels)  # NumPy in: the emulator by default
    _check_correlation(got, stamps, kernels, False, np.float64, f"seed={seed} {stamp_shape} {kernel_shape}")


def test_emulated_correlate_surplus_blocks_and_small_blocks(emulator, rng):
    """Surplus blocks write nothing; a block smaller than the taps and the outputs still covers both."""
    gen, seed = rng
    n, n_kernels, (sy, sx), (kh, kw) = 2, 3, (12, 10), (5, 7)
    stamps, kernels = _correlation_case(gen, n, n_kernels, (sy, sx), (kh, kw), np.float64)
    fy, fx = sy - kh + 1, sx - kw + 1
    size = n * n_kernels * fy * fx
    buffer = np.full(size + 50, np.nan)
    launch("gdi_correlate_stamps<double>", (n_kernels + 2, n + 1), (32,),
           (stamps, kernels, n, n_kernels, 0, sy, sx, kh, kw, buffer), defines=STAMP_FIT_DEFINES)
    assert np.isnan(buffer[size:]).all(), seed
    _check_correlation(buffer[:size].reshape(n, n_kernels, fy, fx), stamps, kernels, False, np.float64,
                       f"seed={seed} blockDim 32")
    # per_stamp with the grid of all kernels: blocks k >= 1 are surplus
    buffer = np.full(size + 50, np.nan)
    launch("gdi_correlate_stamps<double>", (n_kernels, n), (7,),
           (stamps, kernels[:n], n, n, 1, sy, sx, kh, kw, buffer), defines=STAMP_FIT_DEFINES)
    assert np.isnan(buffer[n * fy * fx:]).all(), seed
    _check_correlation(buffer[:n * fy * fx].reshape(n, 1, fy, fx), stamps, kernels[:n], True, np.float64,
                       f"seed={seed} per_stamp blockDim 7")


def test_emulated_correlate_too_many_taps_writes_nothing(emulator, rng):
    gen, seed = rng
    stamps, kernels = _correlation_case(gen, 2, 2, (9, 9), (5, 5), np.float64)
    out = np.full((2, 2, 5, 5), np.nan)
    launch("gdi_correlate_stamps<double>", *correlate_stamps_geometry(2, 2),
           (stamps, kernels, 2, 2, 0, 9, 9, 5, 5, out), defines=(("GDI_CS_MAX_TAPS", 16),))
    assert np.isnan(out).all(), seed


def test_correlate_wrapper_converts_inputs(emulator, rng):
    """Mixed, big-endian and strided inputs become C-contiguous float64 before the launch."""
    gen, seed = rng
    stamps, kernels = _correlation_case(gen, 2, 2, (9, 8), (3, 3), np.float64)
    strided = np.asfortranarray(stamps).astype(">f8")
    got = correlate_stamps(strided, kernels.astype(np.float32))
    assert got.dtype == np.float64 and got.flags.c_contiguous
    _check_correlation(got, stamps, kernels.astype(np.float32).astype(np.float64), False, np.float64,
                       f"seed={seed}")
    as_list = correlate_stamps(stamps.tolist(), kernels.tolist())
    assert_array_equal(as_list, correlate_stamps(stamps, kernels))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"kernels": np.ones((2, 11, 3))}, r"1 <= kh <= S_y"),
    ({"kernels": np.ones((3, 3, 3)), "per_stamp": True}, r"one kernel per stamp, got 3 kernels for 2 stamps"),
    ({"kernels": np.ones((2, 3))}, r"kernels must be 3-D"),
    ({"out": np.empty((2, 2, 7, 7))}, r"out must have shape \(2, 2, 8, 8\)"),
])
def test_correlate_wrapper_rejects_bad_shapes(kwargs, match):
    args = {"stamps": np.ones((2, 10, 10)), "kernels": np.ones((2, 3, 3)), **kwargs}
    with pytest.raises(ValueError, match=match):
        correlate_stamps(args.pop("stamps"), args.pop("kernels"), **args)


def test_correlate_wrapper_rejects_too_many_taps():
    side = int(np.sqrt(CORRELATE_MAX_TAPS)) + 1
    with pytest.raises(ValueError, match=r"exceed the 4096 taps .* use gpudiffim.convolve.correlate_stamps"):
        correlate_stamps(np.ones((1, side, side)), np.ones((1, side, side)))


@pytest.mark.parametrize("per_stamp", [False, True])
def test_stamp_fit_correlation_of_wide_kernels_falls_back_to_fft(emulator, rng, per_stamp):
    """Kernels wider than the shared-memory stage (65^2 > 4096 taps) still fit on the kernel path."""
    gen, seed = rng
    side = int(np.sqrt(CORRELATE_MAX_TAPS)) + 2
    stamps = gen.standard_normal((3, side + 6, side + 6))
    kernels = gen.standard_normal((3 if per_stamp else 2, side, side))
    expected = (fft_correlate_stamps_each if per_stamp else fft_correlate_stamps)(stamps, kernels)
    with use_backend("cuda-emulator"):
        got = operations_for(stamps).correlate_stamps(stamps, kernels, per_stamp=per_stamp)
    assert got.shape == expected.shape == ((3,) if per_stamp else (3, 2)) + (7, 7)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-10, err_msg=f"seed {seed}")


def test_correlate_wrapper_rejects_wrong_out_dtype(emulator):
    with pytest.raises(TypeError, match=r"argument 9 \(double\* out\): expected dtype float64, got float32"):
        correlate_stamps(np.ones((2, 6, 6)), np.ones((1, 3, 3)), out=np.empty((2, 1, 4, 4), np.float32))


def test_correlate_empty_inputs_launch_nothing():
    assert correlate_stamps(np.ones((0, 6, 6)), np.ones((2, 3, 3))).shape == (0, 2, 4, 4)
    assert correlate_stamps(np.ones((2, 6, 6)), np.ones((0, 3, 3))).shape == (2, 0, 4, 4)


# ---------------------------------------------------------------------------
# gdi_normal_equations

@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("with_background", [False, True])
@pytest.mark.parametrize(("n", "n_basis", "n_pix"), [(1, 1, 1), (3, 4, 37), (5, 9, 121), (2, 23, 300)])
def test_emulated_normal_equations_match_numpy(emulator, rng, dtype, with_background, n, n_basis, n_pix):
    gen, seed = rng
    columns, weights, target = _normal_case(gen, n, n_basis, n_pix, dtype)
    p = n_basis + with_background
    matrix, vector = np.full((n, p, p), np.nan), np.full((n, p), np.nan)
    got = normal_equations(columns, weights, target, with_background, out=(matrix, vector))
    assert got[0] is matrix and got[1] is vector
    note = f"seed={seed} shape={(n, n_basis, n_pix)} dtype={np.dtype(dtype).name} background={with_background}"
    _check_normal_equations(matrix, vector, columns, weights, target, with_background, note)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", [(5,), (5, 1, 1)])
def test_emulated_normal_equations_take_one_weight_per_stamp(emulator, rng, dtype, shape):
    """N weights (any shape; constant_variance_weighting) are read per stamp as is: the system of the
    weights broadcast over each stamp's pixels, and the reference's one-weight-per-stamp products."""
    gen, seed = rng
    columns, _, target = _normal_case(gen, 5, 9, 121, dtype)
    weights = gen.uniform(0.05, 3.0, size=shape).astype(dtype)
    matrix, vector = normal_equations(columns, weights, target, True)
    note = f"seed={seed} per-stamp weights {shape} dtype={np.dtype(dtype).name}"
    _check_normal_equations(matrix, vector, columns, np.broadcast_to(weights.reshape(5, 1), (5, 121)), target,
                            True, note)
    _check_normal_equations(matrix, vector, columns, weights, target, True, note + " (reference per stamp)")


def test_emulated_normal_equations_tiles_rounds_and_surplus_blocks(emulator, rng):
    """A 40-double tile (P + 2 = 10 rows: 3 pixels a tile after the odd rounding, the last of 31 partial),
    32 threads for 36 + 8 tasks (2 rounds), 2 surplus blocks."""
    gen, seed = rng
    n, n_basis, n_pix = 3, 7, 31
    columns, weights, target = _normal_case(gen, n, n_basis, n_pix, np.float64)
    p = n_basis + 1
    matrix, vector = np.full(n * p * p + 40, np.nan), np.full(n * p + 9, np.nan)
    launch("gdi_normal_equations<double>", (n + 2,), (32,),
           (columns, weights, target, n, n_basis, n_pix, 1, 0, matrix, vector),
           defines=(("GDI_NE_SHARED_DOUBLES", 40),))
    assert np.isnan(matrix[n * p * p:]).all() and np.isnan(vector[n * p:]).all(), seed
    _check_normal_equations(matrix[:n * p * p].reshape(n, p, p), vector[:n * p].reshape(n, p), columns, weights,
                            target, True, f"seed={seed} small tile")


def test_emulated_normal_equations_too_many_columns_write_nothing(emulator, rng):
    gen, seed = rng
    columns, weights, target = _normal_case(gen, 2, 8, 10, np.float64)
    matrix, vector = np.full((2, 9, 9), np.nan), np.full((2, 9), np.nan)
    launch("gdi_normal_equations<double>", 2, 32, (columns, weights, target, 2, 8, 10, 1, 0, matrix, vector),
           defines=(("GDI_NE_SHARED_DOUBLES", 10),))
    assert np.isnan(matrix).all() and np.isnan(vector).all(), seed


def test_emulated_normal_equations_without_pixels_are_zero(emulator):
    matrix, vector = np.full((2, 4, 4), np.nan), np.full((2, 4), np.nan)
    normal_equations(np.ones((2, 3, 0)), np.ones((2, 0)), np.ones((2, 0)), True, out=(matrix, vector))
    assert not matrix.any() and not vector.any()


def test_normal_equations_wrapper_broadcasts_weights_and_converts(emulator, rng):
    """Per-stamp constant weights (N, 1), float32 columns with float64 target: float64 launch."""
    gen, seed = rng
    columns, _, target = _normal_case(gen, 3, 5, 40, np.float64)
    weights = gen.uniform(0.5, 2.0, size=(3, 1))
    matrix, vector = normal_equations(columns.astype(np.float32), weights, target, 1)
    _check_normal_equations(matrix, vector, columns.astype(np.float32), np.broadcast_to(weights, target.shape),
                            target, True, f"seed={seed}")


def test_normal_equations_wrapper_rejects_bad_input(emulator):
    columns, weights, target = np.ones((2, 3, 10)), np.ones((2, 10)), np.ones((2, 10))
    with pytest.raises(ValueError, match=r"target must have shape \(2, 10\)"):
        normal_equations(columns, weights, np.ones((2, 9)), False)
    with pytest.raises(ValueError, match=r"weights of shape \(2, 9\) do not broadcast"):
        normal_equations(columns, np.ones((2, 9)), target, False)
    with pytest.raises(ValueError, match=r"out\[0\] \(matrix\) must have shape \(2, 4, 4\)"):
        normal_equations(columns, weights, target, True, out=(np.empty((2, 3, 3)), np.empty((2, 4))))
    with pytest.raises(ValueError, match=r"exceed gdi_normal_equations' shared tile"):
        normal_equations(np.ones((1, NORMAL_EQUATIONS_SHARED_DOUBLES - 1, 1)), np.ones((1, 1)), np.ones((1, 1)),
                         False)
    with pytest.raises(TypeError, match=r"argument 8 \(double\* matrix\): expected dtype float64, got float32"):
        normal_equations(columns, weights, target, False,
                         out=(np.empty((2, 3, 3), np.float32), np.empty((2, 3))))


# ---------------------------------------------------------------------------
# gdi_spatial_normal_equations

@pytest.mark.parametrize("constant_first_term", [True, False])
@pytest.mark.parametrize("n_g", [None, 1, 3])
@pytest.mark.parametrize(("n", "n_basis", "n_k"), [(1, 1, 1), (7, 3, 3), (25, 5, 6)])
def test_emulated_spatial_normal_equations_match_numpy(emulator, rng, constant_first_term, n_g, n, n_basis, n_k):
    gen, seed = rng
    matrices, vectors, maps = _spatial_case(gen, n, n_basis, n_k, n_g, constant_first_term)
    n_theta = maps.shape[2]
    matrix, vector = np.full((n_theta, n_theta), np.nan), np.full(n_theta, np.nan)
    got = spatial_normal_equations(matrices, vectors, maps, out=(matrix, vector))
    assert got[0] is matrix and got[1] is vector
    note = f"seed={seed} n={n} n_basis={n_basis} n_k={n_k} n_g={n_g} constant_first_term={constant_first_term}"
    _check_spatial(matrix, vector, matrices, vectors, maps, note)


def test_emulated_spatial_surplus_threads_write_nothing(emulator, rng):
    """n_theta = 20: the 2 x 2 grid of 16 x 16 blocks has 1024 - 400 surplus threads."""
    gen, seed = rng
    matrices, vectors, maps = _spatial_case(gen, 6, 4, 6, 1, True)
    n_theta = maps.shape[2]
    assert n_theta == 20
    owner, weights = spatial_map_structure(maps)
    matrix, vector = np.full(n_theta * n_theta + 33, np.nan), np.full(n_theta + 5, np.nan)
    grid, block = spatial_normal_equations_geometry(n_theta)
    assert grid == (2, 2)
    launch("gdi_spatial_normal_equations", grid, block,
           (matrices, vectors, owner, weights, 6, maps.shape[1], n_theta, matrix, vector))
    assert np.isnan(matrix[n_theta**2:]).all() and np.isnan(vector[n_theta:]).all(), seed
    _check_spatial(matrix[:n_theta**2].reshape(n_theta, n_theta), vector[:n_theta], matrices, vectors, maps,
                   f"seed={seed}")


def test_spatial_map_structure_of_local_parameter_maps(rng):
    gen, seed = rng
    _, _, maps = _spatial_case(gen, 5, 3, 3, 3, True)
    owner, weights = spatial_map_structure(maps)
    assert owner.dtype == np.int32 and weights.shape == (5, maps.shape[2])
    assert_array_equal(owner, [0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    rebuilt = np.zeros_like(maps)
    rebuilt[:, owner, np.arange(maps.shape[2])] = weights
    assert_array_equal(rebuilt, maps, err_msg=f"seed={seed}")


def test_spatial_wrapper_rejects_columns_with_two_rows(emulator):
    maps = np.zeros((2, 3, 4))
    maps[:, 0, 0] = 1.0
    maps[0, 1, 1], maps[1, 2, 1] = 0.5, 0.25  # column 1: row 1 in stamp 0, row 2 in stamp 1
    maps[:, 1:, 3] = 1.0  # column 3: two rows in each stamp
    with pytest.raises(ValueError, match=r"maps columns \[1, 3\] have non-zero entries in more than one row"):
        spatial_normal_equations(np.ones((2, 3, 3)), np.ones((2, 3)), maps)


def test_spatial_wrapper_rejects_bad_shapes_and_dtypes(emulator):
    maps = local_parameter_maps(np.ones((2, 1)), None, 3, False)
    with pytest.raises(ValueError, match=r"do not match maps \(2, 3, 3\)"):
        spatial_normal_equations(np.ones((2, 4, 4)), np.ones((2, 3)), maps)
    with pytest.raises(TypeError, match=r"argument 2 \(const int\* owner\): expected dtype int32, got int64"):
        launch("gdi_spatial_normal_equations", 1, (16, 16),
               (np.ones((2, 3, 3)), np.ones((2, 3)), np.zeros(3, np.int64), np.ones((2, 3)), 2, 3, 3,
                np.empty((3, 3)), np.empty(3)))


def test_spatial_all_zero_columns_and_no_stamps(emulator, rng):
    gen, seed = rng
    matrices, vectors, maps = _spatial_case(gen, 4, 3, 3, 2, False)
    maps[:, :, 4] = 0.0  # an unknown no stamp constrains
    matrix, vector = spatial_normal_equations(matrices, vectors, maps)
    _check_spatial(matrix, vector, matrices, vectors, maps, f"seed={seed}")
    assert not matrix[4].any() and not matrix[:, 4].any() and vector[4] == 0
    matrix, vector = spatial_normal_equations(matrices[:0], vectors[:0], maps[:0])
    assert not matrix.any() and not vector.any() and matrix.shape == (maps.shape[2],) * 2


# ---------------------------------------------------------------------------
# launch checks

@pytest.mark.parametrize(("name", "args", "match"), [
    ("gdi_correlate_stamps<double>",
     (np.ones((1, 4, 4), np.float32), np.ones((1, 3, 3)), 1, 1, 0, 4, 4, 3, 3, np.empty((1, 1, 2, 2))),
     r"argument 0 \(const double\* stamps\): expected dtype float64, got float32"),
    ("gdi_correlate_stamps<float>",
     (np.ones((1, 4, 4), np.float32), np.ones((1, 3, 3), np.float32), 1, 1, 0, 4, 4, 3, 3, np.empty((1, 1, 2, 2))),
     r"argument 9 \(float\* out\): expected dtype float32, got float64"),
    ("gdi_normal_equations<float>",
     (np.ones((1, 2, 3), np.float32), np.ones((1, 3)), np.ones((1, 3), np.float32), 1, 2, 3, 0, 0,
      np.empty((1, 2, 2)), np.empty((1, 2))),
     r"argument 1 \(const float\* weights\): expected dtype float32, got float64"),
    ("gdi_normal_equations<double>",
     (np.ones((1, 2, 3)), np.ones((1, 3)), np.ones((1, 3)), 1, 2, 3, True, 0, np.empty((1, 2, 2)),
      np.empty((1, 2))),
     r"argument 6 \(int with_background\): expected an int, got bool"),
    ("gdi_spatial_normal_equations",
     (np.ones((1, 2, 2)), np.ones((1, 2), np.float32), np.zeros(2, np.int32), np.ones((1, 2)), 1, 2, 2,
      np.empty((2, 2)), np.empty(2)),
     r"argument 1 \(const double\* normal_vectors\): expected dtype float64, got float32"),
])
def test_launch_rejects_wrong_dtypes(name, args, match):
    with pytest.raises(TypeError, match=match):
        launch(name, 1, 32, args)


def test_signatures_declare_the_new_entry_points():
    for name in ("gdi_correlate_stamps<float>", "gdi_correlate_stamps<double>", "gdi_normal_equations<float>",
                 "gdi_normal_equations<double>"):
        assert KERNELS[name].unit == "stamp_fit"
    assert KERNELS["gdi_spatial_normal_equations"].unit == "spatial_assembly"


# ---------------------------------------------------------------------------
# the same kernels on a GPU

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("per_stamp", [False, True])
def test_cupy_correlate_stamps_match_numpy(rng, dtype, per_stamp):
    import cupy

    gen, seed = rng
    n = 40
    stamps, kernels = _correlation_case(gen, n, n if per_stamp else 27, (43, 41), (21, 19), dtype)
    out = cupy.full((n, 1 if per_stamp else 27, 23, 23), cupy.nan, dtype)
    got = correlate_stamps(cupy.asarray(stamps), cupy.asarray(kernels), per_stamp=per_stamp, out=out)
    assert got is out
    _check_correlation(got, stamps, kernels, per_stamp, dtype,
                       f"seed={seed} dtype={np.dtype(dtype).name} per_stamp={per_stamp}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize(("n_basis", "with_background"), [(27, True), (49, False), (200, True)])
def test_cupy_normal_equations_match_numpy(rng, dtype, n_basis, with_background):
    import cupy

    gen, seed = rng
    n, n_pix = 30, 23 * 23
    columns, weights, target = _normal_case(gen, n, n_basis, n_pix, dtype)
    p = n_basis + with_background
    matrix, vector = cupy.full((n, p, p), cupy.nan), cupy.full((n, p), cupy.nan)
    normal_equations(*(cupy.asarray(a) for a in (columns, weights, target)), with_background,
                     out=(matrix, vector))
    _check_normal_equations(matrix, vector, columns, weights, target, with_background,
                            f"seed={seed} dtype={np.dtype(dtype).name} n_basis={n_basis}")


@pytest.mark.gpu
@pytest.mark.parametrize("constant_first_term", [True, False])
@pytest.mark.parametrize("n_g", [None, 3])
def test_cupy_spatial_normal_equations_match_numpy(rng, constant_first_term, n_g):
    import cupy

    gen, seed = rng
    matrices, vectors, maps = _spatial_case(gen, 300, 27, 6, n_g, constant_first_term)
    n_theta = maps.shape[2]
    matrix, vector = cupy.full((n_theta, n_theta), cupy.nan), cupy.full(n_theta, cupy.nan)
    spatial_normal_equations(*(cupy.asarray(a) for a in (matrices, vectors, maps)), out=(matrix, vector))
    _check_spatial(matrix, vector, matrices, vectors, maps,
                   f"seed={seed} n_g={n_g} constant_first_term={constant_first_term}")


# ---------------------------------------------------------------------------
# gdi_constant_weights

@pytest.mark.parametrize(("n", "size"), [(1, 1), (4, 6), (7, 43), (3, 64)])
def test_emulated_constant_weights_equal_the_reference(emulator, rng, n, size):
    """The median by the kernel's bitonic sort (odd and even counts, the count a power of two or not, ties,
    non-positive and NaN medians) inverts to the reference's weights exactly; the codes are zero."""
    from gpudiffim._cuda.stamp_fit import constant_weights
    from gpudiffim._ops import NUMPY

    gen, seed = rng
    science = gen.uniform(0.5, 4.0, size=(n, size, size)).round(1)          # rounded: ties in the sort
    template = gen.uniform(0.5, 4.0, size=(n, size, size))
    if n > 2:
        science[1] = -template[1]                                           # median 0: weight 1
        science[2, 0, 0] = np.nan                                           # NaN median: weight 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        want, want_codes = NUMPY.constant_weights(science, template)
    weights, codes = constant_weights(science, template)
    assert_array_equal(weights, want, err_msg=f"seed={seed}")
    assert_array_equal(codes, want_codes)
    assert codes.dtype == np.int32 and weights.dtype == np.float64
    if n > 2:
        assert weights[1] == weights[2] == 1.0


def test_constant_weights_refuse_stamps_beyond_the_shared_sort(emulator):
    from gpudiffim._cuda.stamp_fit import CONSTANT_WEIGHTS_MAX_PIX, constant_weights

    side = int(np.sqrt(CONSTANT_WEIGHTS_MAX_PIX)) + 1
    with pytest.raises(ValueError, match="pixels each"):
        constant_weights(np.ones((1, side, side)), np.ones((1, side, side)))
