"""Tests of gpudiffim.basis: kernel bases and the regularisation matrix.

Acceptance criteria are those of ``ip_diffim``'s ``test_basisLists`` and the
sigma/width table of ``ipdiffim-reference.md`` section 2.1; regularisation
matrices are checked against small cases written out by hand.
"""

import dataclasses
import logging
import math

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_almost_equal, assert_array_equal

from gpudiffim.basis import (
    KernelBasis,
    alard_lupton_sigmas,
    fwhm_to_sigma,
    make_alard_lupton_basis,
    make_delta_function_basis,
    make_kernel_basis,
    make_regularization_matrix,
    regularization_matrix,
    renormalize_kernel_list,
    separable_form,
)
from gpudiffim.config import PsfMatchConfig
from gpudiffim.errors import ConfigurationError, ShapeError

FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
FLT_EPS = 1.1920929e-07

#: afw PolynomialFunction2 term order up to degree 4, as (x power, y power).
AFW_MONOMIALS = [(0, 0),
                 (1, 0), (0, 1),
                 (2, 0), (1, 1), (0, 2),
                 (3, 0), (2, 1), (1, 2), (0, 3),
                 (4, 0), (3, 1), (2, 2), (1, 3), (0, 4)]

AL_CONFIG = PsfMatchConfig()
DF_CONFIG = PsfMatchConfig(kernel_basis_set="delta-function", fit_for_background=False)  # ip_diffim defaults


def fwhm(sigma):
    return sigma * FWHM_PER_SIGMA


def assert_renormalized(kernels):
    """ip_diffim's test_basisLists criteria, 7 decimal places."""
    sums = kernels.sum(axis=(1, 2))
    assert_almost_equal(sums[0], 1.0, decimal=7)
    assert_almost_equal(sums[1:], 0.0, decimal=7)
    assert_almost_equal((kernels[1:] ** 2).sum(axis=(1, 2)), 1.0, decimal=7)


# ---------------------------------------------------------------------------
# Delta-function basis
# ---------------------------------------------------------------------------

def test_delta_function_basis_21x21_exact():
    basis = make_delta_function_basis(21, 21)
    assert basis.shape == (441, 21, 21)
    assert basis.dtype == np.float64
    expected = np.zeros((441, 21, 21))
    for k in range(441):
        expected[k, k // 21, k % 21] = 1.0
    assert_array_equal(basis, expected)


def test_delta_function_basis_non_square_is_row_major():
    basis = make_delta_function_basis(3, 2)          # width 3, height 2
    assert basis.shape == (6, 2, 3)
    for k in range(6):
        row, col = divmod(k, 3)
        assert basis[k, row, col] == 1.0
        assert basis[k].sum() == 1.0


def test_make_kernel_basis_delta_function_ignores_fwhm():
    basis = make_kernel_basis(DF_CONFIG, 3.0, 8.0)
    assert basis.kind == "delta-function"
    assert basis.n_basis == 441 and basis.width == 21 and basis.half_width == 10
    assert basis.sigmas == () and basis.degrees == ()
    assert_array_equal(basis.kernels, make_delta_function_basis(21, 21))


@pytest.mark.parametrize("width, height", [(0, 3), (3, 0), (2.0, 3), (True, 3)])
def test_delta_function_basis_bad_size(width, height):
    with pytest.raises(ConfigurationError):
        make_delta_function_basis(width, height)


# ---------------------------------------------------------------------------
# Alard-Lupton sigmas and width (reference section 2.1)
# ---------------------------------------------------------------------------

def test_fwhm_to_sigma():
    assert fwhm_to_sigma(2.3548200450309493) == pytest.approx(1.0, rel=1e-15)
    assert fwhm_to_sigma(1.0) == pytest.approx(1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0))))
    assert_allclose(fwhm_to_sigma(np.array([FWHM_PER_SIGMA, 2 * FWHM_PER_SIGMA])), [1.0, 2.0])


# (sigma of the convolved image, sigma of the reference, mode, sigmas, width)
SECTION_2_1_TABLE = [
    (2.0, 2.4, "convolution", (0.700, 1.400, 2.800), 21),
    (2.0, 2.8, "convolution", (0.980, 1.960, 3.919), 23),
    (2.0, 2.0, "config", (0.7, 1.5, 3.0), 21),
    (2.4, 2.0, "deconvolution", (0.663, 1.327, 2.653), 21),
    (1.0, 3.0, "convolution", (1.414, 2.828, 5.657), 33),
    (2.0, 4.0, "convolution", (1.732, 3.464, 6.928), 35),
]


@pytest.mark.parametrize("sigma_t, sigma_r, mode, sigmas, width", SECTION_2_1_TABLE)
def test_alard_lupton_sigmas_reference_table(sigma_t, sigma_r, mode, sigmas, width):
    got_sigmas, got_width, got_mode = alard_lupton_sigmas(AL_CONFIG, fwhm(sigma_t), fwhm(sigma_r))
    assert got_mode == mode
    assert got_width == width
    assert isinstance(got_width, int)
    assert isinstance(got_sigmas, tuple) and len(got_sigmas) == 3
    assert tuple(np.round(got_sigmas, 3)) == sigmas


def test_alard_lupton_sigmas_formula_unrounded():
    sigmas, _, _ = alard_lupton_sigmas(AL_CONFIG, fwhm(2.0), fwhm(2.8))
    sigma_k = math.sqrt(2.8**2 - 2.0**2)
    assert_allclose(sigmas, [sigma_k / 2, sigma_k, 2 * sigma_k], rtol=1e-12)


@pytest.mark.parametrize("sigma_t, sigma_r, mode, sigmas", [
    (2.0, 2.05, "convolution", (0.7, 1.4, 2.8)),           # sigma_K 0.45 -> alard_min_sig 0.7
    (2.05, 2.0, "deconvolution", (0.4, 0.8, 1.6)),         # sigma_K 0.45, first -> min 0.4
])
def test_alard_lupton_sigmas_minimum_sigma(sigma_t, sigma_r, mode, sigmas):
    got, width, got_mode = alard_lupton_sigmas(AL_CONFIG, fwhm(sigma_t), fwhm(sigma_r))
    assert got_mode == mode
    assert_allclose(got, sigmas, rtol=1e-12)
    assert width == 21


def test_alard_lupton_sigmas_beta_and_width_without_clamp():
    config = dataclasses.replace(AL_CONFIG, alard_gauss_beta=3.0, kernel_size_min=3,
                                 kernel_size_max=99)
    sigmas, width, _ = alard_lupton_sigmas(config, fwhm(1.0), fwhm(3.0))
    sigma_k = math.sqrt(8.0)
    assert_allclose(sigmas, [sigma_k / 3, sigma_k, 3 * sigma_k], rtol=1e-12)
    assert width == 51                                 # int(6 * 8.485) = 50 -> odd 51


@pytest.mark.parametrize("sigma_r, width", [(2.4, 17), (2.8, 23)])
def test_alard_lupton_width_even_is_bumped(sigma_r, width):
    config = dataclasses.replace(AL_CONFIG, kernel_size_min=3)
    # 6 * 2.8 = 16.8 -> 16 (even) -> 17; 6 * 3.919 = 23.5 -> 23 (odd) kept
    assert alard_lupton_sigmas(config, fwhm(2.0), fwhm(sigma_r))[1] == width


@pytest.mark.parametrize("sigma_t, sigma_r, expected", [(2.0, 2.8, math.sqrt(3.84)),
                                                        (3.0, 1.0, math.sqrt(8.0))])
def test_alard_lupton_single_gaussian(sigma_t, sigma_r, expected):
    config = dataclasses.replace(AL_CONFIG, alard_n_gauss=1, alard_deg_gauss=(3,),
                                 alard_sig_gauss=(3.0,), kernel_size_min=3)
    sigmas, width, _ = alard_lupton_sigmas(config, fwhm(sigma_t), fwhm(sigma_r))
    assert len(sigmas) == 1
    assert sigmas[0] == pytest.approx(expected, rel=1e-12)
    assert width == (int(6 * expected) | 1)


@pytest.mark.parametrize("kernel_size", [11, 41])
def test_alard_lupton_config_branch_has_no_clamp(kernel_size):
    config = dataclasses.replace(AL_CONFIG, kernel_size=kernel_size)
    for args in [(), (None, fwhm(3.0)), (fwhm(3.0), None)]:
        assert alard_lupton_sigmas(config, *args) == ((0.7, 1.5, 3.0), kernel_size, "config")
    unscaled = dataclasses.replace(config, scale_by_fwhm=False)
    assert alard_lupton_sigmas(unscaled, fwhm(1.0), fwhm(3.0)) == ((0.7, 1.5, 3.0), kernel_size,
                                                                     "config")
    # Equal FWHMs: config sigmas, but the width is recomputed and clamped.
    assert alard_lupton_sigmas(config, fwhm(2.0), fwhm(2.0))[1] == 21
    assert make_kernel_basis(config).width == kernel_size


def test_alard_lupton_sigmas_requires_al_config():
    with pytest.raises(ConfigurationError, match="kernel_basis_set"):
        alard_lupton_sigmas(DF_CONFIG, 3.0, 4.0)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), "3", True])
def test_alard_lupton_sigmas_bad_fwhm(bad):
    with pytest.raises(ConfigurationError):
        alard_lupton_sigmas(AL_CONFIG, bad, 4.0)
    with pytest.raises(ConfigurationError):
        alard_lupton_sigmas(AL_CONFIG, 4.0, bad)


# ---------------------------------------------------------------------------
# Alard-Lupton basis (reference sections 2.2, 2.3)
# ---------------------------------------------------------------------------

def reference_al_basis(h, sigmas, degrees):
    """Plain-loop version of the Alard-Lupton basis, renormalised by hand."""
    size = 2 * h + 1
    raw = []
    for sigma, degree in zip(sigmas, degrees):
        gauss = np.zeros((size, size))
        for row in range(size):
            for col in range(size):
                u, v = col - h, row - h
                gauss[row, col] = math.exp(-(u * u + v * v) / (2 * sigma * sigma))
        gauss /= gauss.sum()
        for px, py in AFW_MONOMIALS[:(degree + 1) * (degree + 2) // 2]:
            kernel = np.zeros((size, size))
            for row in range(size):
                for col in range(size):
                    x, y = (col - h) / h, (row - h) / h
                    kernel[row, col] = gauss[row, col] * x**px * y**py
            raw.append(kernel)
    out = [raw[0] / raw[0].sum()]
    for kernel in raw[1:]:
        total = kernel.sum()
        if abs(total) > FLT_EPS:
            kernel = kernel / total - out[0]
        out.append(kernel / math.sqrt((kernel**2).sum()))
    return np.array(out)


def test_default_alard_lupton_basis():
    basis = make_kernel_basis(AL_CONFIG)
    assert basis.kind == "alard-lupton"
    assert basis.kernels.shape == (27, 21, 21)
    assert basis.n_basis == 27 and basis.width == 21 and basis.half_width == 10
    assert basis.sigmas == (0.7, 1.5, 3.0)
    assert basis.degrees == (4, 2, 2)
    assert basis.mode == "config"
    assert basis.kernels.dtype == np.float64
    assert_renormalized(basis.kernels)


def test_alard_lupton_basis_matches_loop_reference():
    got = make_alard_lupton_basis(10, (0.7, 1.5, 3.0), (4, 2, 2))
    assert_allclose(got, reference_al_basis(10, (0.7, 1.5, 3.0), (4, 2, 2)),
                    rtol=1e-12, atol=1e-15)


def test_alard_lupton_basis_fwhm_3_to_4():
    basis = make_kernel_basis(AL_CONFIG, 3.0, 4.0)
    assert basis.mode == "convolution"
    assert basis.n_basis == 27 and basis.width == 21
    assert_allclose(basis.sigmas, [0.7, 1.4, 2.8], rtol=1e-12)   # sigma_K = 1.12 < 1.4
    assert_renormalized(basis.kernels)
    assert_allclose(basis.kernels, make_alard_lupton_basis(10, basis.sigmas, (4, 2, 2)), rtol=0)


def test_alard_lupton_basis_keeps_the_separable_form_it_is_made_from():
    """The solve and the GPU take the form the basis was made from (no rebuild and check per pair): the
    kernels are the form's, bit for bit, which the device builds too; a form that does not fit is refused."""
    basis = make_kernel_basis(AL_CONFIG, 3.0, 4.0)
    assert separable_form(basis) is basis.separable
    assert_array_equal(basis.kernels, basis.separable.kernels_in(np))
    with pytest.raises(ShapeError, match="separable form"):
        KernelBasis(make_alard_lupton_basis(7, basis.sigmas, (4, 2, 2)), kind="alard-lupton",    # 15 px wide
                    sigmas=basis.sigmas, degrees=(4, 2, 2), separable=basis.separable)
    with pytest.raises(ShapeError, match="separable form"):
        KernelBasis(make_delta_function_basis(21, 21), kind="delta-function", separable=basis.separable)


@pytest.mark.parametrize("sigma_t, sigma_r", [(1.0, 3.0), (2.4, 2.0), (2.0, 4.0)])
def test_alard_lupton_basis_fwhm_modes_renormalized(sigma_t, sigma_r):
    basis = make_kernel_basis(AL_CONFIG, fwhm(sigma_t), fwhm(sigma_r))
    expected_width = alard_lupton_sigmas(AL_CONFIG, fwhm(sigma_t), fwhm(sigma_r))[1]
    assert basis.kernels.shape == (27, expected_width, expected_width)
    assert_renormalized(basis.kernels)


@pytest.mark.parametrize("degrees, count", [((0,), 1), ((1,), 3), ((4, 2, 2), 27),
                                            ((3, 5), 31), ((0, 0, 0), 3)])
def test_alard_lupton_basis_count(degrees, count):
    sigmas = tuple(1.0 + k for k in range(len(degrees)))
    kernels = make_alard_lupton_basis(6, sigmas, degrees)
    assert kernels.shape == (count, 13, 13)
    assert_renormalized(kernels)


def test_alard_lupton_first_kernel_is_normalised_gaussian():
    kernels = make_alard_lupton_basis(10, (0.7, 1.5, 3.0), (4, 2, 2))
    offsets = np.arange(-10, 11)
    gauss = np.exp(-(offsets[None, :] ** 2 + offsets[:, None] ** 2) / (2 * 0.7**2))
    assert_allclose(kernels[0], gauss / gauss.sum(), rtol=1e-13, atol=0)


def test_alard_lupton_odd_monomials_not_shifted_and_oriented():
    h = 10
    kernels = make_alard_lupton_basis(h, (1.5,), (2,))          # 1, x, y, x^2, xy, y^2
    b0, bx, by, bxy = kernels[0], kernels[1], kernels[2], kernels[4]
    # x * G: antisymmetric in x (columns), symmetric in y (rows).
    assert_allclose(bx[:, ::-1], -bx, atol=1e-17)
    assert_allclose(bx[::-1, :], bx, atol=1e-17)
    # Not shifted by B0: the u = 0 column is exactly zero and B1 = x G / |x G|.
    assert np.all(bx[:, h] == 0.0)
    u = np.arange(-h, h + 1) / h
    xg = b0 * u[None, :]
    assert_allclose(bx, xg / np.sqrt((xg**2).sum()), rtol=1e-13, atol=1e-17)
    assert bx[h, h + 1] > 0 and bx[h, h - 1] < 0                 # x grows with column
    # y * G varies along rows (row = v + h) and is zero on the v = 0 row.
    assert np.all(by[h, :] == 0.0)
    assert by[h + 1, h] > 0 and by[h - 1, h] < 0
    assert_allclose(by, bx.T, rtol=1e-13, atol=1e-17)
    # x y G: odd in both, not shifted.
    assert np.all(bxy[h, :] == 0.0) and np.all(bxy[:, h] == 0.0)
    assert bxy[h + 1, h + 1] > 0 and bxy[h + 1, h - 1] < 0


def test_alard_lupton_even_monomial_is_shifted():
    h = 10
    kernels = make_alard_lupton_basis(h, (1.5,), (2,))
    b0 = kernels[0]
    u = np.arange(-h, h + 1) / h
    raw = b0 * u[None, :] ** 2                                  # x^2 G
    expected = raw / raw.sum() - b0
    expected /= np.sqrt((expected**2).sum())
    assert_allclose(kernels[3], expected, rtol=1e-12, atol=1e-16)
    assert kernels[3][h, h] < 0                                 # the -B0 shift shows at centre


@pytest.mark.parametrize("half_width, sigmas, degrees", [
    (0, (1.0,), (2,)), (2.5, (1.0,), (2,)),
    (5, (0.0,), (2,)), (5, (-1.0,), (2,)), (5, (float("nan"),), (2,)),
    (5, (1.0,), (-1,)), (5, (1.0,), (1.5,)),
    (5, (1.0, 2.0), (2,)), (5, (), ()),
])
def test_alard_lupton_basis_bad_arguments(half_width, sigmas, degrees):
    with pytest.raises(ConfigurationError):
        make_alard_lupton_basis(half_width, sigmas, degrees)


# ---------------------------------------------------------------------------
# Renormalisation (reference section 2.3; test_basisLists Renormalize)
# ---------------------------------------------------------------------------

def elliptical_gaussian(sigma_x, sigma_y, half_width=10):
    """Unnormalised-by-sum analytic Gaussian image, like an afw GaussianFunction2D."""
    offsets = np.arange(-half_width, half_width + 1, dtype=float)
    u, v = offsets[None, :], offsets[:, None]
    norm = 1.0 / (2 * math.pi * sigma_x * sigma_y)
    return norm * np.exp(-(u**2 / (2 * sigma_x**2) + v**2 / (2 * sigma_y**2)))


def test_renormalize_gaussians_from_test_basis_lists():
    kernels = np.array([elliptical_gaussian(2, 2), elliptical_gaussian(3, 4),
                        elliptical_gaussian(0.2, 0.25)])
    before = kernels.copy()
    out = renormalize_kernel_list(kernels)
    assert_array_equal(kernels, before)                         # input untouched
    assert not np.shares_memory(out, kernels)
    assert_almost_equal(out.sum(axis=(1, 2)), [1.0, 0.0, 0.0], decimal=7)
    assert_almost_equal((out[1:] ** 2).sum(axis=(1, 2)), [1.0, 1.0], decimal=7)
    b0 = kernels[0] / kernels[0].sum()
    assert_allclose(out[0], b0, rtol=1e-14)
    for i in (1, 2):
        shifted = kernels[i] / kernels[i].sum() - b0
        assert_allclose(out[i], shifted / np.sqrt((shifted**2).sum()), rtol=1e-12, atol=1e-16)


@pytest.mark.parametrize("kernel_sum, shifted", [(1.0e-7, False), (2.0e-7, True),
                                                 (-2.0e-7, True), (0.0, False)])
def test_renormalize_uses_float32_epsilon(kernel_sum, shifted):
    k0 = np.zeros((3, 3))
    k0[1, 1] = 2.0
    k1 = np.zeros((3, 3))
    k1[0, 0] = 1.0
    k1[2, 2] = -1.0 + kernel_sum
    out = renormalize_kernel_list(np.array([k0, k1]))
    expected = k1 / k1.sum() - k0 / 2.0 if shifted else k1.copy()
    assert_allclose(out[1], expected / np.sqrt((expected**2).sum()), rtol=1e-12)
    assert (out[1][1, 1] != 0.0) == shifted


def test_renormalize_errors():
    with pytest.raises(ShapeError):
        renormalize_kernel_list(np.ones((3, 3)))
    with pytest.raises(ShapeError):
        renormalize_kernel_list(np.ones((0, 3, 3)))
    odd = np.zeros((1, 3, 3))
    odd[0, 1, 0], odd[0, 1, 2] = -1.0, 1.0
    with pytest.raises(ConfigurationError, match="kernels\\[0\\]"):
        renormalize_kernel_list(odd)
    with pytest.raises(ConfigurationError, match="norm"):
        renormalize_kernel_list(np.array([np.ones((3, 3)), np.zeros((3, 3))]))


# ---------------------------------------------------------------------------
# Regularisation matrix (reference section 2.5)
# ---------------------------------------------------------------------------

def reference_central_b(width, height, weights, penalty):
    """Loop-built central-difference B; ``weights[dy + 1][dx + 1]``."""
    n = width * height
    b = np.zeros((n, n))
    for i in range(n):
        y0, x0 = divmod(i, width)
        if x0 in (0, width - 1) or y0 in (0, height - 1):
            b[i, i] = penalty
            continue
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                b[i, (y0 + dy) * width + x0 + dx] = weights[dy + 1][dx + 1]
    return b


FORWARD_COEFFS = [None, [-1.0, 1.0], [-1.0, 2.0, -1.0], [-1.0, 3.0, -3.0, 1.0]]


def reference_forward_b(width, height, orders, penalty):
    """Loop-built forward-difference B = sum over orders of (Bx + By)."""
    n = width * height
    coeffs = [[penalty]] + FORWARD_COEFFS[1:]
    b = np.zeros((n, n))
    for order in orders:
        for i in range(n):
            y0, x0 = divmod(i, width)
            ox = min(order, width - 1 - x0)
            for j, c in enumerate(coeffs[ox]):
                b[i, i + j] += c
            oy = min(order, height - 1 - y0)
            for j, c in enumerate(coeffs[oy]):
                b[i, i + j * width] += c
    return b


def central(width, height, stencil, penalty, **kw):
    return regularization_matrix(width, height, regularization_type="centralDifference",
                                 stencil=stencil, border_penalty=penalty, **kw)


def forward(width, height, orders, penalty, **kw):
    return regularization_matrix(width, height, regularization_type="forwardDifference",
                                 orders=orders, border_penalty=penalty, **kw)


FIVE_POINT = [[0, 1, 0], [1, -4, 1], [0, 1, 0]]


def test_forward_order1_literal_3x2():
    p = 3.0
    # width 3, height 2; pixel i = y * 3 + x.  Bx: [-1, 1] unless on the right
    # edge (p); By: [-1 at i, +1 at i + 3] unless on the top row (p).
    b = np.array([
        [-2, 1, 0, 1, 0, 0],
        [0, -2, 1, 0, 1, 0],
        [0, 0, p - 1, 0, 0, 1],
        [0, 0, 0, p - 1, 1, 0],
        [0, 0, 0, 0, p - 1, 1],
        [0, 0, 0, 0, 0, 2 * p],
    ], dtype=float)
    assert_array_equal(forward(3, 2, (1,), p), b.T @ b)


def test_forward_orders_1_2_literal_3x2():
    p = 3.0
    # Order 2 tapers to order 1 one pixel from the right/top edge and to p on it;
    # the two orders' matrices are summed.
    b = np.array([
        [-4, 3, -1, 2, 0, 0],
        [0, -4, 2, 0, 2, 0],
        [0, 0, 2 * p - 2, 0, 0, 2],
        [0, 0, 0, 2 * p - 2, 3, -1],
        [0, 0, 0, 0, 2 * p - 2, 2],
        [0, 0, 0, 0, 0, 4 * p],
    ], dtype=float)
    assert_array_equal(forward(3, 2, [1, 2], p), b.T @ b)


def test_central_5_point_literal_4x3():
    p = 0.5
    # width 4, height 3: only pixels 5 = (1, 1) and 6 = (2, 1) are interior.
    b = p * np.eye(12)
    b[5] = 0.0
    b[5, [1, 4, 6, 9]] = 1.0
    b[5, 5] = -4.0
    b[6] = 0.0
    b[6, [2, 5, 7, 10]] = 1.0
    b[6, 6] = -4.0
    assert_array_equal(central(4, 3, 5, p), b.T @ b)


@pytest.mark.parametrize("width, height", [(5, 5), (4, 6), (6, 4), (1, 3), (2, 2)])
@pytest.mark.parametrize("penalty", [3.0, 0.0])
def test_central_5_point_matches_loop_reference(width, height, penalty):
    b = reference_central_b(width, height, FIVE_POINT, penalty)
    assert_array_equal(central(width, height, 5, penalty), b.T @ b)


@pytest.mark.parametrize("width, height", [(5, 5), (4, 6)])
def test_central_9_point_matches_loop_reference(width, height):
    weights = np.float32(np.array([[1, 4, 1], [4, -20, 4], [1, 4, 1]]) / 6.0).astype(float)
    b = reference_central_b(width, height, weights, 3.0)
    assert_allclose(central(width, height, 9, 3.0), b.T @ b, rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("orders", [(1,), (2,), (3,), (1, 2), (1, 2, 3), (3, 3)])
@pytest.mark.parametrize("width, height", [(4, 4), (5, 5), (4, 6), (6, 3)])
def test_forward_matches_loop_reference(orders, width, height):
    b = reference_forward_b(width, height, orders, 3.0)
    assert_array_equal(forward(width, height, orders, 3.0), b.T @ b)


def test_central_9_point_uses_float32_weights():
    # 3x3 kernel: only the centre row of B holds the stencil, so
    # H = diag(p^2 on the border) + outer(w, w) with w the float32 weights.
    p = 3.0
    w = np.array([1, 4, 1, 4, -20, 4, 1, 4, 1], dtype=float) / 6.0
    w32 = w.astype(np.float32).astype(float)
    expected = np.outer(w32, w32) + np.diag(np.where(np.arange(9) == 4, 0.0, p * p))
    h = central(3, 3, 9, p)
    assert_array_equal(h, expected)
    assert h[4, 4] == float(np.float32(-20 / 6)) ** 2
    assert h[4, 4] != (20 / 6) ** 2
    assert h[0, 4] == float(np.float32(1 / 6)) * float(np.float32(-20 / 6))


@pytest.mark.parametrize("kind", ["central", "forward"])
def test_border_penalty_is_float32(kind):
    h = central(3, 3, 5, 0.1) if kind == "central" else forward(1, 1, (1,), 0.1)
    p32 = float(np.float32(0.1))
    expected = p32**2 if kind == "central" else (2 * p32) ** 2
    assert h[0, 0] == expected
    assert h[0, 0] != (0.01 if kind == "central" else 0.04)


def test_fit_for_background_adds_zero_row_and_column():
    config = dataclasses.replace(DF_CONFIG, fit_for_background=True)
    h_bg = make_regularization_matrix(config, 5, 5)
    h = make_regularization_matrix(DF_CONFIG, 5, 5)
    assert h.shape == (25, 25) and h_bg.shape == (26, 26)
    assert_array_equal(h_bg[:25, :25], h)
    assert np.all(h_bg[25] == 0.0) and np.all(h_bg[:, 25] == 0.0)
    assert forward(3, 2, (1,), 3.0, fit_for_background=True).shape == (7, 7)


def test_make_regularization_matrix_uses_config_fields():
    config = dataclasses.replace(DF_CONFIG, regularization_type="forwardDifference",
                                 forward_regularization_orders=[2, 3],
                                 regularization_border_penalty=1.5)
    assert_array_equal(make_regularization_matrix(config, 6, 4), forward(6, 4, (2, 3), 1.5))
    config = dataclasses.replace(DF_CONFIG, central_regularization_stencil=5,
                                 regularization_border_penalty=0.0)
    assert_array_equal(make_regularization_matrix(config, 7, 7), central(7, 7, 5, 0.0))


@pytest.mark.parametrize("kwargs", [
    dict(regularization_type="centralDifference", stencil=9),
    dict(regularization_type="centralDifference", stencil=5),
    dict(regularization_type="forwardDifference", orders=(1, 2)),
    dict(regularization_type="forwardDifference", orders=(3,)),
])
def test_regularization_matrix_symmetric_psd(kwargs):
    h = regularization_matrix(21, 21, **kwargs)
    assert h.shape == (441, 441) and h.dtype == np.float64
    assert_array_equal(h, h.T)
    eigenvalues = np.linalg.eigvalsh(h)
    assert eigenvalues.min() >= -1e-10 * eigenvalues.max()


def test_default_df_regularization_matrix():
    h = make_regularization_matrix(DF_CONFIG, 21, 21)
    b = reference_central_b(21, 21, np.float32(np.array(
        [[1, 4, 1], [4, -20, 4], [1, 4, 1]]) / 6.0).astype(float), 3.0)
    assert_allclose(h, b.T @ b, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("kwargs, name", [
    (dict(regularization_type="centralDifference", stencil=1), "stencil"),
    (dict(regularization_type="centralDifference", stencil=7), "stencil"),
    (dict(regularization_type="centralDifference", border_penalty=-1.0), "border_penalty"),
    (dict(regularization_type="forwardDifference", border_penalty=-1.0), "border_penalty"),
    (dict(regularization_type="forwardDifference", orders=(0,)), "orders"),
    (dict(regularization_type="forwardDifference", orders=(4,)), "orders"),
    (dict(regularization_type="forwardDifference", orders=[1, 4]), "orders"),
    (dict(regularization_type="forwardDifference", orders=()), "orders"),
    (dict(regularization_type="forwardDifference", orders=2), "orders"),
    (dict(regularization_type="foo"), "regularization_type"),
])
def test_bad_regularization_raises(kwargs, name):
    with pytest.raises(ConfigurationError, match=name):
        regularization_matrix(5, 5, **kwargs)


@pytest.mark.parametrize("fields", [
    dict(central_regularization_stencil=1), dict(central_regularization_stencil=7),
    dict(regularization_border_penalty=-1.0), dict(forward_regularization_orders=(0,)),
    dict(forward_regularization_orders=(4,)), dict(regularization_type="foo"),
])
def test_bad_regularization_config_rejected(fields):
    with pytest.raises(ConfigurationError):
        dataclasses.replace(DF_CONFIG, **fields)


@pytest.mark.parametrize("kwargs", [
    dict(regularization_type="centralDifference", stencil=5, border_penalty=0.0),
    dict(regularization_type="centralDifference", stencil=9, border_penalty=0),
    dict(regularization_type="forwardDifference", orders=[1, 2], border_penalty=0.0),
    dict(regularization_type="forwardDifference", orders=[1]),
    dict(regularization_type="forwardDifference", orders=(3,)),
])
def test_valid_regularization_accepted(kwargs):
    h = regularization_matrix(5, 5, **kwargs)
    assert h.shape == (25, 25)
    assert np.all(np.isfinite(h))


def test_zero_penalty_leaves_border_unpenalised():
    h = central(5, 5, 5, 0.0)
    # Pixel 0 is a corner: not in any interior stencil, and its own penalty is 0.
    assert np.all(h[0] == 0.0) and np.all(h[:, 0] == 0.0)


# ---------------------------------------------------------------------------
# KernelBasis container
# ---------------------------------------------------------------------------

def test_kernel_basis_is_read_only_and_copies_input():
    kernels = make_delta_function_basis(3, 3)
    basis = KernelBasis(kernels, kind="delta-function")
    kernels[0, 0, 0] = 5.0
    assert basis.kernels[0, 0, 0] == 1.0                        # a copy was taken
    assert not basis.kernels.flags.writeable
    with pytest.raises(ValueError):
        basis.kernels[0, 0, 0] = 2.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        basis.kind = "pca"


def test_make_kernel_basis_arrays_read_only():
    basis = make_kernel_basis(AL_CONFIG, 3.0, 4.0)
    assert not basis.kernels.flags.writeable
    with pytest.raises(ValueError):
        basis.kernels[:] = 0.0


def test_kernel_basis_properties_and_pca_kind():
    basis = KernelBasis(np.ones((4, 7, 7)), kind="pca")
    assert (basis.n_basis, basis.width, basis.half_width) == (4, 7, 3)
    assert basis.mode == "config" and basis.sigmas == () and basis.degrees == ()
    assert "pca" in repr(basis)


@pytest.mark.parametrize("kernels, kwargs, error", [
    (np.ones((2, 4, 4)), dict(kind="pca"), ShapeError),            # even width
    (np.ones((2, 5, 7)), dict(kind="pca"), ShapeError),            # not square
    (np.ones((5, 5)), dict(kind="pca"), ShapeError),               # not 3-D
    (np.ones((2, 5, 5)), dict(kind="foo"), ConfigurationError),
    (np.ones((2, 5, 5)), dict(kind="alard-lupton", sigmas=(1.0,), degrees=(1,)), ShapeError),
    (np.ones((3, 5, 5)), dict(kind="alard-lupton", sigmas=(1.0,), degrees=(1,), mode="x"),
     ConfigurationError),
    (np.ones((3, 5, 5)), dict(kind="alard-lupton", sigmas=(1.0, 2.0), degrees=(1,)),
     ConfigurationError),
])
def test_kernel_basis_validation(kernels, kwargs, error):
    with pytest.raises(error):
        KernelBasis(kernels, **kwargs)


def test_make_kernel_basis_logs_choice(caplog):
    with caplog.at_level(logging.INFO, logger="gpudiffim.basis"):
        make_kernel_basis(AL_CONFIG, fwhm(1.0), fwhm(3.0))
    message = caplog.records[-1].getMessage()
    assert "convolution" in message and "33" in message and "5.657" in message
