"""Numerical building blocks checked against independent NumPy computations.

* :mod:`gpudiffim.statistics`: ``ImageStatistics`` residual moments and afw
  MEANCLIP/STDEVCLIP (``ipdiffim-reference.md`` sections 4.1 and 4.3).
* :mod:`gpudiffim.spatial`: afw term order, Chebyshev normalisation over pixel
  edges, grid evaluation and the product expansion used for variance propagation.
* :mod:`gpudiffim.linalg`: LU / eigenvector solution of the normal equations.
* :mod:`gpudiffim.convolve`: afw correlation convention, by brute force.
"""

import itertools
import warnings

import numpy as np
import pytest
from numpy.polynomial import chebyshev
from numpy.testing import assert_allclose, assert_array_equal

from gpudiffim.convolve import FourierCorrelator, correlate_stamps, correlate_stamps_each
from gpudiffim.errors import ConfigurationError, SingularSystemError
from gpudiffim.linalg import condition_number, solve_symmetric
from gpudiffim.spatial import SpatialFunction, product_expansion, term_exponents
from gpudiffim.statistics import clipped_mean_std, residual_statistics, usable_normalised_residual

IQR_TO_SIGMA = 0.741301109
BAD, SAT, EDGE, DETECTED = 1 << 0, 1 << 1, 1 << 4, 1 << 5


# ---------------------------------------------------------------------------
# residual_statistics
# ---------------------------------------------------------------------------


def _random_stamps(seed=1, n=6, size=(15, 13)):
    rng = np.random.default_rng(seed)
    shape = (n, *size)
    variance = rng.uniform(0.5, 4.0, shape)
    difference = 0.3 + rng.normal(size=shape) * np.sqrt(variance)
    mask = np.zeros(shape, dtype=np.int32)
    mask[rng.random(shape) < 0.08] |= BAD
    mask[rng.random(shape) < 0.05] |= SAT
    mask[rng.random(shape) < 0.10] |= DETECTED       # not a bad bit
    variance[rng.random(shape) < 0.05] = 0.0
    return difference, variance, mask


def _reference_statistics(difference, variance, mask, bad_bits):
    """Loop over stamps; plain NumPy moments of D/sigma over the usable pixels."""
    means, rmss, counts = [], [], []
    for d, v, m in zip(difference, variance, mask):
        good = ((m & bad_bits) == 0) & (v > 0)
        z = d[good] / np.sqrt(v[good])
        counts.append(z.size)
        means.append(z.mean() if z.size else np.nan)
        rmss.append(z.std(ddof=1) if z.size > 1 else np.nan)
    return np.array(means), np.array(rmss), np.array(counts)


def _edge_stamps():
    """Stamps whose pixels cover every case of the usable selection."""
    difference, variance, mask = _random_stamps(seed=7)
    variance[0, 0, :6] = [np.inf, -1.0, np.nan, 1e-320, 0.0, 2.0]  # 1e-320: 1/V overflows
    difference[0, 1, :3] = [np.nan, np.inf, -np.inf]
    difference[0, 2, 0], variance[0, 2, 0] = np.inf, np.inf
    return difference, variance, mask


class TestUsableNormalisedResidual:
    """The one definition of usable D/sigma, shared by the stamp fits, the quality report and the figures."""

    def test_selection(self):
        difference, variance, mask = _edge_stamps()
        z, usable = usable_normalised_residual(difference, variance, mask, BAD | SAT, fill=np.nan)
        with np.errstate(divide="ignore", invalid="ignore"):
            want = (((mask & (BAD | SAT)) == 0) & (variance > 0) & np.isfinite(variance) & (variance > 1e-300)
                    & np.isfinite(difference))
        want[0, 0, 0] = (mask[0, 0, 0] & (BAD | SAT)) == 0   # V = inf: usable, z = 0
        assert_array_equal(usable, want)
        assert_array_equal(np.isnan(z), ~usable)
        if usable[0, 0, 0]:
            assert z[0, 0, 0] == 0.0
        assert_allclose(z[usable], difference[usable] / np.sqrt(variance[usable]), rtol=1e-15)

    def test_fill_and_scalar_mask(self):
        difference, variance, _ = _edge_stamps()
        z, usable = usable_normalised_residual(difference, variance, 0, BAD)
        assert usable.shape == difference.shape and (z[~usable] == 0).all()

    def test_every_user_selects_the_same_pixels(self):
        from gpudiffim.quality import _z_rows, normalized_residuals

        difference, variance, mask = _edge_stamps()
        z, usable = usable_normalised_residual(difference, variance, mask, BAD | SAT, fill=np.nan)
        assert_array_equal(residual_statistics(difference, variance, mask, BAD | SAT).n_pixels,
                           usable.sum(axis=(1, 2)))
        assert_array_equal(_z_rows(difference, variance, mask, BAD | SAT), z.reshape(len(z), -1))
        assert_array_equal(normalized_residuals(difference[0], variance[0], mask[0], BAD | SAT), z[0][usable[0]])


class TestResidualStatistics:
    def test_infinite_difference_is_skipped_without_a_warning(self):
        # inf D at a pixel also excluded for other reasons used to warn ("invalid value in multiply")
        difference, variance, mask = _random_stamps()
        difference[0, 0, :3] = np.inf
        variance[0, 0, 0] = 0.0
        mask[0, 0, 1] = BAD
        stats = residual_statistics(difference, variance, mask, BAD | SAT)
        assert np.isfinite(stats.mean).all()

    def test_against_numpy(self):
        difference, variance, mask = _random_stamps()
        stats = residual_statistics(difference, variance, mask, BAD | SAT)
        mean, rms, count = _reference_statistics(difference, variance, mask, BAD | SAT)
        np.testing.assert_array_equal(stats.n_pixels, count)
        assert_allclose(stats.mean, mean, rtol=1e-12, atol=1e-12)
        assert_allclose(stats.rms, rms, rtol=1e-12, atol=1e-12)
        # the test data must actually exercise every exclusion
        assert np.all(count < difference[0].size)

    def test_core_radius(self):
        difference, variance, mask = _random_stamps(seed=2)
        radius = 3
        # a clean core: (2r+1)^2 usable pixels
        clean = residual_statistics(difference, np.ones_like(variance), np.zeros_like(mask), BAD,
                                    core_radius=radius)
        np.testing.assert_array_equal(clean.n_pixels, (2 * radius + 1) ** 2)
        # with masked pixels: the same as the full computation on the core cut by hand
        stats = residual_statistics(difference, variance, mask, BAD | SAT, core_radius=radius)
        rows = slice(15 // 2 - radius, 15 // 2 + radius + 1)
        cols = slice(13 // 2 - radius, 13 // 2 + radius + 1)
        mean, rms, count = _reference_statistics(difference[:, rows, cols], variance[:, rows, cols],
                                                 mask[:, rows, cols], BAD | SAT)
        np.testing.assert_array_equal(stats.n_pixels, count)
        assert_allclose(stats.mean, mean, rtol=1e-12, atol=1e-12)
        assert_allclose(stats.rms, rms, rtol=1e-12, atol=1e-12)

    def test_other_bits_not_excluded(self):
        difference, variance, _ = _random_stamps(seed=3)
        variance = np.ones_like(variance)
        mask = np.zeros(difference.shape, dtype=np.int32)
        mask[:, ::2, :] = DETECTED | EDGE
        stats = residual_statistics(difference, variance, mask, BAD | SAT)
        np.testing.assert_array_equal(stats.n_pixels, difference[0].size)
        excluded = residual_statistics(difference, variance, mask, EDGE)
        np.testing.assert_array_equal(excluded.n_pixels, difference[0, 1::2].size)

    def test_zero_bad_bits(self):
        difference, variance, mask = _random_stamps(seed=4)
        stats = residual_statistics(difference, variance, mask, 0)
        np.testing.assert_array_equal(stats.n_pixels, (variance > 0).sum(axis=(1, 2)))

    def test_too_few_pixels(self):
        difference = np.arange(2 * 5 * 5, dtype=float).reshape(2, 5, 5)
        variance = np.ones_like(difference)
        mask = np.full(difference.shape, BAD, dtype=np.int32)
        mask[1, 2, 3] = 0                         # stamp 1 keeps one pixel
        stats = residual_statistics(difference, variance, mask, BAD)
        np.testing.assert_array_equal(stats.n_pixels, [0, 1])
        assert np.isnan(stats.mean[0]) and np.isnan(stats.rms[0])
        assert stats.mean[1] == difference[1, 2, 3]
        assert np.isnan(stats.rms[1])

    def test_normalisation_by_sigma(self):
        # D = 2 sigma everywhere except one pixel: mean and rms by hand
        variance = np.full((1, 3, 3), 4.0)
        difference = np.full((1, 3, 3), 4.0)
        difference[0, 0, 0] = -14.0                # z = -7
        stats = residual_statistics(difference, variance, np.zeros((1, 3, 3), np.int32), BAD)
        z = np.array([2.0] * 8 + [-7.0])
        assert_allclose(stats.mean, [z.mean()], rtol=1e-14)
        assert_allclose(stats.rms, [z.std(ddof=1)], rtol=1e-14)


# ---------------------------------------------------------------------------
# clipped_mean_std
# ---------------------------------------------------------------------------


def _linear_quantile(sorted_values, p):
    index = p * (len(sorted_values) - 1)
    lower = int(np.floor(index))
    upper = min(lower + 1, len(sorted_values) - 1)
    return sorted_values[lower] + (index - lower) * (sorted_values[upper] - sorted_values[lower])


def _afw_clip(values, n_sigma=3.0, n_iter=3):
    """afw MEANCLIP/STDEVCLIP, written out from the spec (section 4.3)."""
    x = np.sort(np.asarray([v for v in values if np.isfinite(v)], dtype=float))
    median = _linear_quantile(x, 0.5)
    iqr = _linear_quantile(x, 0.75) - _linear_quantile(x, 0.25)
    centre, half_width = median, n_sigma * IQR_TO_SIGMA * iqr
    for _ in range(n_iter):
        kept = [v for v in x if abs(v - centre) <= half_width]
        n = len(kept)
        mean = sum(kept) / n
        std = (sum((v - mean) ** 2 for v in kept) / (n - 1)) ** 0.5
        centre, half_width = mean, n_sigma * std
    return mean, std


class TestClippedMeanStd:
    def test_kernel_sum_visitor_no_outlier(self):
        values = [1, 1, 1, 1, 2, 3, 4]
        mean, std = clipped_mean_std(values)
        ref_mean, ref_std = _afw_clip(values)
        assert_allclose([mean, std], [ref_mean, ref_std], rtol=1e-12)
        # nothing is clipped: plain mean and unbiased std
        assert_allclose([mean, std], [np.mean(values), np.std(values, ddof=1)], rtol=1e-12)
        assert all(abs(v - mean) <= 3 * std for v in values)

    def test_kernel_sum_visitor_outlier(self):
        values = [1, 1, 1, 1, 2, 3, 4, 50]
        mean, std = clipped_mean_std(values)
        ref_mean, ref_std = _afw_clip(values)
        assert_allclose([mean, std], [ref_mean, ref_std], rtol=1e-12)
        # the 50 is clipped, and it is the only value outside dkSumMax = 3 std
        assert_allclose([mean, std], [np.mean(values[:-1]), np.std(values[:-1], ddof=1)], rtol=1e-12)
        assert abs(50 - mean) > 3 * std
        assert all(abs(v - mean) <= 3 * std for v in values[:-1])

    def test_gaussian_with_outliers(self):
        rng = np.random.default_rng(7)
        values = np.concatenate([10.0 + rng.normal(size=300), [60.0, -40.0, 25.0, 18.0]])
        rng.shuffle(values)
        mean, std = clipped_mean_std(values)
        ref_mean, ref_std = _afw_clip(values)
        assert_allclose([mean, std], [ref_mean, ref_std], rtol=1e-12)
        assert abs(mean - 10.0) < 0.2
        assert 0.8 < std < 1.2

    def test_later_passes_reclip_full_sample(self):
        # pass 1 (median 4, IQR 1.5) drops the 0, which pass 2 (mean +- 3 std) brings back
        values = [0.0, 2.0, 4.0, 4.0, 4.0, 5.0, 7.0]
        x = np.sort(values)
        iqr = _linear_quantile(x, 0.75) - _linear_quantile(x, 0.25)
        assert (_linear_quantile(x, 0.5), iqr) == (4.0, 1.5)
        assert abs(0.0 - 4.0) > 3 * IQR_TO_SIGMA * iqr
        mean, std = clipped_mean_std(values)
        assert_allclose([mean, std], _afw_clip(values), rtol=1e-12)
        assert_allclose([mean, std], [np.mean(values), np.std(values, ddof=1)], rtol=1e-12)

    def test_non_finite_ignored(self):
        values = [1, 1, 1, 1, 2, 3, 4, 50]
        with_nan = [np.nan, *values, np.inf, -np.inf]
        assert clipped_mean_std(with_nan) == clipped_mean_std(values)

    @pytest.mark.parametrize("value", [0.0, -3.5, 1.25])
    def test_single_value(self, value):
        assert clipped_mean_std([value]) == (value, 0.0)
        assert clipped_mean_std([np.nan, value]) == (value, 0.0)

    @pytest.mark.parametrize("values", [[], [np.nan], [np.nan, np.inf]])
    def test_no_value(self, values):
        mean, std = clipped_mean_std(values)
        assert np.isnan(mean) and np.isnan(std)

    def test_identical_values(self):
        assert clipped_mean_std([2.5] * 6) == (2.5, 0.0)

    @pytest.mark.parametrize("seed", range(40))
    def test_numpy_quantile_mean_and_std_bit_for_bit(self, seed):
        """The solve loop's clipping decides which kernels are rejected: its sorted-sample quartiles
        and dispatch-free mean and std must be NumPy's (``np.quantile`` linear, ``mean``, ``std(ddof=1)``)
        to the last bit, on kernel-sum-like samples with ties, outliers and sizes from 2 to 3000."""
        rng = np.random.default_rng(seed)
        n = int(rng.choice([2, 3, 4, 5, 7, 8, 16, 101, 1278, 3001]))
        values = 1.0 + 0.0075 * rng.standard_normal(n)
        values[rng.random(n) < 0.05] += rng.normal(0.0, 0.2, size=1)
        if seed % 4 == 0:
            values = np.round(values, 3)          # ties
        expected = _numpy_clip(values)
        assert clipped_mean_std(values) == expected


def _numpy_clip(values, n_sigma=3.0, n_iter=3):
    """The clipping as first written, through NumPy's own functions (the reference for bit equality)."""
    q1, median, q3 = np.quantile(values, [0.25, 0.5, 0.75], method="linear")
    centre, half_width = median, n_sigma * IQR_TO_SIGMA * (q3 - q1)
    mean = std = np.nan
    for _ in range(n_iter):
        kept = values[np.abs(values - centre) <= half_width]
        if kept.size == 0:
            break
        mean = float(kept.mean())
        std = float(kept.std(ddof=1)) if kept.size > 1 else 0.0
        centre, half_width = mean, n_sigma * std
    return mean, std


# ---------------------------------------------------------------------------
# spatial
# ---------------------------------------------------------------------------

BBOX_2K = (0, 0, 2047, 2047)
MODEL_TYPES = ["chebyshev1", "polynomial"]


def _function(model_type, order):
    """Chebyshev over a 2k box; polynomial over a small box (raw coordinates)."""
    bbox = BBOX_2K if model_type == "chebyshev1" else (-3, -2, 4, 3)
    return SpatialFunction(model_type, order, bbox)


def _random_points(function, n, seed):
    rng = np.random.default_rng(seed)
    x0, y0, x1, y1 = function.bbox
    return rng.uniform(x0 - 0.5, x1 + 0.5, n), rng.uniform(y0 - 0.5, y1 + 0.5, n)


class TestSpatialFunction:
    @pytest.mark.parametrize("model_type", MODEL_TYPES)
    @pytest.mark.parametrize("order", range(6))
    def test_term_count(self, model_type, order):
        function = SpatialFunction(model_type, order, BBOX_2K)
        expected = (order + 1) * (order + 2) // 2
        assert function.n_terms == expected
        assert len(term_exponents(order)) == expected
        assert function.terms(100.0, 200.0).shape == (expected,)
        assert function.terms(np.zeros((4, 3)), 1.0).shape == (4, 3, expected)

    def test_afw_term_order(self):
        assert term_exponents(3) == [(0, 0), (1, 0), (0, 1), (2, 0), (1, 1), (0, 2),
                                     (3, 0), (2, 1), (1, 2), (0, 3)]

    def test_polynomial_values_by_hand(self):
        x, y = 3.0, -2.0
        function = SpatialFunction("polynomial", 3, (0, 0, 10, 10))
        expected = [1, x, y, x * x, x * y, y * y, x**3, x * x * y, x * y * y, y**3]
        assert_allclose(function.terms(x, y), expected, rtol=0, atol=0)
        coefficients = np.arange(1.0, 11.0)
        assert function.evaluate(coefficients, x, y) == pytest.approx(np.dot(coefficients, expected))

    def test_polynomial_uses_raw_coordinates(self):
        function = SpatialFunction("polynomial", 1, (1000, 1000, 1100, 1100))
        assert_allclose(function.terms(1050.0, 1020.0), [1.0, 1050.0, 1020.0])

    def test_chebyshev_normalisation_over_pixel_edges(self):
        function = SpatialFunction("chebyshev1", 2, BBOX_2K)
        xn, yn = function.normalized([-0.5, 2047.5, 1023.5], [2047.5, -0.5, 1023.5])
        assert_allclose(xn, [-1.0, 1.0, 0.0], rtol=0, atol=1e-15)
        assert_allclose(yn, [1.0, -1.0, 0.0], rtol=0, atol=1e-15)
        # pixel centres 0 and 2047 are inside (-1, 1)
        assert_allclose(function.normalized(0.0, 2047.0), [-1 + 1 / 2048, 1 - 1 / 2048], rtol=1e-15)

    def test_chebyshev_normalisation_offset_box(self):
        function = SpatialFunction("chebyshev1", 1, (100, 50, 299, 149))
        xn, yn = function.normalized([99.5, 299.5, 199.5], [49.5, 149.5, 99.5])
        assert_allclose(xn, [-1, 1, 0], atol=1e-15)
        assert_allclose(yn, [-1, 1, 0], atol=1e-15)

    def test_chebyshev_terms(self):
        function = SpatialFunction("chebyshev1", 3, BBOX_2K)
        x, y = 300.25, 1900.0
        xn = 2 * (x - 1023.5) / 2048
        yn = 2 * (y - 1023.5) / 2048
        terms = function.terms(x, y)
        assert terms[3] == pytest.approx(2 * xn**2 - 1, rel=1e-14)       # T2(x')
        assert terms[4] == pytest.approx(xn * yn, rel=1e-14)             # T1(x') T1(y')
        assert terms[5] == pytest.approx(2 * yn**2 - 1, rel=1e-14)       # T2(y')
        assert terms[6] == pytest.approx(4 * xn**3 - 3 * xn, rel=1e-14)  # T3(x')
        for t, (i, j) in enumerate(term_exponents(3)):
            expected = chebyshev.chebval(xn, [0] * i + [1]) * chebyshev.chebval(yn, [0] * j + [1])
            assert terms[t] == pytest.approx(expected, rel=1e-13, abs=1e-15)

    @pytest.mark.parametrize("model_type", MODEL_TYPES)
    @pytest.mark.parametrize("order", [0, 1, 3])
    def test_evaluate_grid(self, model_type, order):
        bbox = (10, -5, 57, 30) if model_type == "chebyshev1" else (-4, -3, 5, 6)
        function = SpatialFunction(model_type, order, bbox)
        coefficients = np.random.default_rng(order).normal(size=function.n_terms)
        coefficients[min(1, function.n_terms - 1)] = 0.0     # a zero coefficient is skipped
        x = np.arange(bbox[0], bbox[2] + 1, dtype=float)
        y = np.arange(bbox[1], bbox[3] + 1, dtype=float)
        grid = function.evaluate_grid(coefficients, x, y)
        xx, yy = np.meshgrid(x, y)
        direct = function.evaluate(coefficients, xx, yy)
        assert grid.shape == (len(y), len(x))
        assert_allclose(grid, direct, rtol=1e-12, atol=1e-12 * np.abs(direct).max())

    @pytest.mark.parametrize("model_type", MODEL_TYPES)
    @pytest.mark.parametrize("order", [0, 1, 2, 3])
    def test_product_expansion(self, model_type, order):
        function = _function(model_type, order)
        double = SpatialFunction(model_type, 2 * order, function.bbox)
        expansion = product_expansion(model_type, order)
        n = function.n_terms
        assert expansion.shape == (n, n, double.n_terms)
        x, y = _random_points(function, 50, seed=order)
        p = function.terms(x, y)
        r = double.terms(x, y)
        products = p[:, :, None] * p[:, None, :]
        expanded = np.einsum("tus,ps->ptu", expansion, r)
        assert_allclose(expanded, products, rtol=1e-12, atol=1e-12 * np.abs(products).max())

    @pytest.mark.parametrize("model_type", ["chebyshev", "Chebyshev1", "legendre", ""])
    def test_invalid_model_type(self, model_type):
        with pytest.raises(ConfigurationError, match="model type"):
            SpatialFunction(model_type, 1, BBOX_2K)

    @pytest.mark.parametrize("order", [-1, 1.0, True, "2", None])
    def test_invalid_order(self, order):
        with pytest.raises(ConfigurationError, match="order"):
            SpatialFunction("chebyshev1", order, BBOX_2K)

    def test_invalid_bbox(self):
        with pytest.raises(ConfigurationError, match="bbox"):
            SpatialFunction("chebyshev1", 1, (10, 0, 9, 5))


# ---------------------------------------------------------------------------
# linalg
# ---------------------------------------------------------------------------


class TestSolveSymmetric:
    def test_well_conditioned_lu(self):
        rng = np.random.default_rng(3)
        a = rng.normal(size=(12, 12))
        matrix = a @ a.T + 12 * np.eye(12)
        expected = rng.normal(size=12)
        solution, method = solve_symmetric(matrix, matrix @ expected)
        assert method == "LU"
        assert_allclose(solution, expected, rtol=1e-12, atol=1e-12)
        assert_allclose(solution, np.linalg.solve(matrix, matrix @ expected), rtol=1e-12, atol=1e-12)

    @pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")   # see the next test
    @pytest.mark.parametrize("case", ["zero-row", "duplicate-rows", "duplicate-permuted"])
    def test_singular_goes_to_eigenvector_path(self, case):
        rng = np.random.default_rng(4)
        if case == "zero-row":
            a = rng.normal(size=(4, 4))
            matrix = np.zeros((5, 5))
            matrix[:4, :4] = a @ a.T + np.eye(4)
        else:
            # two identical rows/columns: exactly singular, exactly representable
            matrix = np.array([[4.0, 4.0, 1.0, 0.5],
                               [4.0, 4.0, 1.0, 0.5],
                               [1.0, 1.0, 3.0, 0.25],
                               [0.5, 0.5, 0.25, 2.0]])
            if case == "duplicate-permuted":
                perm = [2, 0, 3, 1]
                matrix = matrix[np.ix_(perm, perm)]
        vector = rng.normal(size=matrix.shape[0])       # not in the range: least squares
        solution, method = solve_symmetric(matrix, vector)
        assert method == "EIGENVECTOR"
        assert_allclose(solution, np.linalg.pinv(matrix) @ vector, rtol=1e-12, atol=1e-12)
        # minimum norm: no component along the null space
        eigenvalues, vectors = np.linalg.eigh(matrix)
        null = vectors[:, np.abs(eigenvalues) < 1e-12 * np.abs(eigenvalues).max()]
        assert null.shape[1] == 1
        assert_allclose(null.T @ solution, 0.0, atol=1e-12)

    def test_singular_emits_no_warning(self):
        matrix = np.diag([2.0, 1.0, 0.0])
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            solution, method = solve_symmetric(matrix, np.ones(3))
        assert method == "EIGENVECTOR"
        assert_allclose(solution, [0.5, 1.0, 0.0], rtol=1e-14)

    @pytest.mark.parametrize("where", ["matrix-nan", "matrix-inf", "vector-nan"])
    def test_non_finite(self, where):
        matrix, vector = np.eye(3) * 2.0, np.ones(3)
        if where == "matrix-nan":
            matrix[1, 2] = matrix[2, 1] = np.nan
        elif where == "matrix-inf":
            matrix[0, 0] = np.inf
        else:
            vector[1] = np.nan
        with pytest.raises(SingularSystemError, match="NaN"):
            solve_symmetric(matrix, vector)

    def test_zero_matrix(self):
        with pytest.raises(SingularSystemError, match="zero"):
            solve_symmetric(np.zeros((4, 4)), np.ones(4))

    def test_singular_system_error_is_linalg_error(self):
        with pytest.raises(np.linalg.LinAlgError):
            solve_symmetric(np.zeros((2, 2)), np.ones(2))

    @pytest.mark.gpu
    def test_batched_gpu_solve_matches_lapack(self):
        """cuBLAS getrfBatched/getrsBatched against LAPACK on a stack with every failure kind."""
        import cupy

        from gpudiffim._ops import KERNELS
        from gpudiffim.linalg import STATUS_TEXT, solve_symmetric_batch

        rng = np.random.default_rng(np.random.SeedSequence().entropy)
        a = rng.normal(size=(300, 28, 40))
        matrices = a @ a.transpose(0, 2, 1)
        vectors = rng.normal(size=(300, 28))
        matrices[3, 5, :] = matrices[3, :, 5] = 0.0          # singular: eigenvector path
        matrices[7] = 0.0                                    # identically zero
        matrices[11, 2, 2] = np.nan                          # non-finite
        expected = solve_symmetric_batch(matrices, vectors)
        solutions, status = KERNELS.solve_systems(cupy.asarray(matrices), cupy.asarray(vectors))
        got = (solutions.get(), [STATUS_TEXT[int(c)] for c in status.get()], status.get() > 1)
        assert isinstance(got[0], np.ndarray)
        assert got[1] == expected[1]
        assert_array_equal(got[2], expected[2])
        assert_allclose(got[0], expected[0], rtol=1e-9, atol=1e-12)

    @pytest.mark.parametrize("kind", ["EIGENVALUE", "SVD"])
    def test_condition_number(self, kind):
        assert condition_number(np.diag([1.0, 1e-3]), kind) == pytest.approx(1e3, rel=1e-12)
        assert condition_number(np.diag([-4.0, 2.0]), kind) == pytest.approx(2.0, rel=1e-12)
        assert condition_number(np.diag([1.0, 0.0]), kind) == np.inf

    @pytest.mark.parametrize("n", [2, 7, 28, 163])
    def test_eigenvalue_condition_number_from_the_extremes_equals_all_eigenvalues(self, n):
        """The two extreme eigenvalues by bisection give eigvalsh's condition number to its own rounding
        (relative ~ cond x eps); an indefinite matrix, whose smallest |lambda| lies inside, too."""
        rng = np.random.default_rng(n)
        for spread in (0.0, 2.0, 5.0):                   # condition numbers ~1e2 to ~1e9
            a = rng.normal(size=(n, 2 * n))
            scale = np.exp(spread * rng.normal(size=n))
            matrix = (a @ a.T) * scale[:, None] * scale[None, :]
            values = np.abs(np.linalg.eigvalsh(matrix))
            expected = values.max() / values.min()
            assert condition_number(matrix) == pytest.approx(expected, rel=50 * expected * np.finfo(float).eps)
        indefinite = np.diag(np.arange(-n // 2, n - n // 2) + 0.5)       # |lambda| smallest in the middle
        values = np.abs(np.diag(indefinite))
        assert condition_number(indefinite) == pytest.approx(values.max() / values.min(), rel=1e-12)


# ---------------------------------------------------------------------------
# convolve
# ---------------------------------------------------------------------------


def _brute_correlate(image, kernel):
    """out(x, y) = sum_{u,v} K[h_y + v, h_x + u] in(x + u, y + v), zero outside the image."""
    kh, kw = kernel.shape
    hy, hx = kh // 2, kw // 2
    ny, nx = image.shape
    out = np.zeros((ny, nx))
    for y, x in itertools.product(range(ny), range(nx)):
        total = 0.0
        for v in range(-hy, hy + 1):
            for u in range(-hx, hx + 1):
                if 0 <= y + v < ny and 0 <= x + u < nx:
                    total += kernel[hy + v, hx + u] * image[y + v, x + u]
        out[y, x] = total
    return out


def _brute_valid(stamp, kernel):
    """The brute-force correlation on the region not affected by the edge."""
    hy, hx = kernel.shape[0] // 2, kernel.shape[1] // 2
    return _brute_correlate(stamp, kernel)[hy:stamp.shape[0] - hy, hx:stamp.shape[1] - hx]


@pytest.fixture(scope="module")
def conv_data():
    rng = np.random.default_rng(9)
    stamps = rng.normal(size=(3, 11, 12))
    kernels = rng.normal(size=(2, 5, 5))                       # asymmetric
    rect = rng.normal(size=(3, 7))                             # rectangular, asymmetric
    image = rng.normal(size=(16, 19))
    return stamps, kernels, rect, image


class TestCorrelation:
    def test_brute_force_convention(self):
        # a kernel with a single 1 at offset (u, v) = (+1, 0) picks in(x + 1, y)
        kernel = np.zeros((3, 3))
        kernel[1, 2] = 1.0
        image = np.arange(20.0).reshape(4, 5)
        out = _brute_correlate(image, kernel)
        np.testing.assert_array_equal(out[:, :-1], image[:, 1:])
        np.testing.assert_array_equal(out[:, -1], 0.0)

    def test_correlate_stamps(self, conv_data):
        stamps, kernels, _, _ = conv_data
        out = correlate_stamps(stamps, kernels)
        assert out.shape == (3, 2, 7, 8)
        for n, k in itertools.product(range(3), range(2)):
            assert_allclose(out[n, k], _brute_valid(stamps[n], kernels[k]), rtol=0, atol=1e-10)

    def test_correlate_stamps_rectangular(self, conv_data):
        stamps, _, rect, _ = conv_data
        out = correlate_stamps(stamps, rect[None])
        assert out.shape == (3, 1, 9, 6)
        for n in range(3):
            assert_allclose(out[n, 0], _brute_valid(stamps[n], rect), rtol=0, atol=1e-10)

    def test_correlate_stamps_each(self, conv_data):
        stamps, kernels, _, _ = conv_data
        own = np.concatenate([kernels, kernels[:1][:, ::-1]])      # three different kernels
        out = correlate_stamps_each(stamps, own)
        assert out.shape == (3, 7, 8)
        for n in range(3):
            assert_allclose(out[n], _brute_valid(stamps[n], own[n]), rtol=0, atol=1e-10)

    def test_fourier_correlator(self, conv_data):
        _, kernels, rect, image = conv_data
        for kernel in (kernels[0], kernels[1], rect):
            correlator = FourierCorrelator(image, kernel.shape)
            out = correlator.correlate(kernel)
            assert out.shape == image.shape
            assert out.dtype == np.float64
            assert_allclose(out, _brute_correlate(image, kernel), rtol=0, atol=1e-10)

    def test_fourier_correlator_float32(self, conv_data):
        _, kernels, rect, image = conv_data
        rms = np.sqrt(np.mean(image**2))
        for kernel in (kernels[0], rect):
            correlator = FourierCorrelator(image.astype(np.float32), kernel.shape, dtype=np.float32)
            out = correlator.correlate(kernel)
            assert out.dtype == np.float32
            assert np.max(np.abs(out - _brute_correlate(image, kernel))) <= 1e-5 * rms

    def test_fourier_zero_padding(self):
        # all-ones image and kernel: each output counts the kernel pixels inside the image
        image = np.ones((6, 8))
        kernel = np.ones((3, 5))
        out = FourierCorrelator(image, kernel.shape).correlate(kernel)
        rows = np.array([2, 3, 3, 3, 3, 2])[:, None]
        cols = np.array([3, 4, 5, 5, 5, 5, 4, 3])[None, :]
        assert_allclose(out, rows * cols, rtol=0, atol=1e-12)

    def test_fourier_no_wrap_around(self):
        # a bright pixel at one edge must not leak to the opposite edge
        image = np.zeros((9, 10))
        image[4, 0] = 1.0
        kernel = np.random.default_rng(2).normal(size=(5, 5))
        out = FourierCorrelator(image, kernel.shape).correlate(kernel)
        assert_allclose(out[:, 3:], 0.0, atol=1e-12)
        assert_allclose(out, _brute_correlate(image, kernel), atol=1e-12)

    def test_fourier_reuses_image_transform(self, conv_data):
        _, kernels, _, image = conv_data
        correlator = FourierCorrelator(image, (5, 5))
        first = correlator.correlate(kernels[0])
        correlator.correlate(kernels[1])
        assert_allclose(correlator.correlate(kernels[0]), first, rtol=0, atol=1e-14)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_masked_quantiles_are_numpy_quantiles_bit_for_bit(seed):
    """Every row's np.quantile / np.median of its selected values, exactly: rows with few, many, one,
    none, and a NaN among the selected values, with ties; on the host (partitions) and as the
    kernel path's sorted rows would give them."""
    from gpudiffim.statistics import masked_quantiles

    rng = np.random.default_rng(seed)
    values = np.round(rng.normal(size=(7, 5001)) * 10, 1)     # rounded: many ties
    mask = rng.random(values.shape) < np.array([0.9, 0.5, 0.01, 0.0, 0.7, 1.0, 0.3])[:, None]
    mask[2, :] = False
    mask[2, 17] = True                                          # one value
    values[4, np.flatnonzero(mask[4])[3]] = np.nan              # a NaN among the taken values
    values[6, ~mask[6]] = np.nan                                # NaN only where not taken
    qs = (0.25, 0.5, 0.75, 0.1)
    got = masked_quantiles(values, mask, qs, median=True)
    for row in range(len(values)):
        taken = values[row][mask[row]]
        if taken.size == 0 or np.isnan(taken).any():
            assert np.isnan(got[:, row]).all()
            continue
        expected = np.append(np.quantile(taken, qs), np.median(taken))
        np.testing.assert_array_equal(got[:, row], expected)
