"""The delta-function stamp fit without a design matrix equals the design product (issue 13).

:mod:`gpudiffim.delta_function` forms the normal equations of delta-function
stamp fits from row products and window sums and solves them by Cholesky;
each piece is checked here against the general path (FFT correlations with
the 441 delta kernels, ``C^T W C``, LU) on random stamps, to 1e-10 of the
largest value unless stated.
"""

import dataclasses

import numpy as np
import pytest

from gpudiffim import PsfMatchConfig
from gpudiffim._ops import NUMPY
from gpudiffim.basis import KernelBasis, make_alard_lupton_basis, make_delta_function_basis, make_regularization_matrix
from gpudiffim.delta_function import (
    DeltaFunctionForm,
    _PenaltyDiagonals,
    delta_function_design,
    delta_function_form,
    delta_function_models,
    delta_function_normal_equations,
    fit_delta_function,
)
from gpudiffim.linalg import EIGENVECTOR, LU, NOT_FINITE, ZERO_MATRIX, solve_batch_status
from gpudiffim.stamps import StampBatch, fit_stamps, stamp_normal_equations

#: (stamps, stamp width S, kernel width K): the defaults' 43 / 21, small ones, K = 1 and F = 1.
SHAPES = [(3, 43, 21), (4, 11, 3), (2, 9, 9), (3, 13, 1), (2, 8, 5)]


def _stamps(rng, n, size):
    """Template stamps with a sky, stars and noise, and unrelated science stamps."""
    return rng.normal(size=(n, size, size)) * 30.0 + 100.0, rng.normal(size=(n, size, size)) * 30.0


def _relative(actual, expected):
    return np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-300)


def _reference(template, science, weight, width, background):
    """Design columns (FFT correlations with the delta kernels) and ``ops.stamp_normal_equations``."""
    n, size, _ = template.shape
    fit, half = size - width + 1, width // 2
    columns = NUMPY.correlate_stamps(template, make_delta_function_basis(width, width)).reshape(n, width**2, -1)
    target = science[:, half:half + fit, half:half + fit].reshape(n, -1)
    return columns, target, NUMPY.stamp_normal_equations(columns, target, weight[:, None, None], background)


@pytest.mark.parametrize("n, size, width", SHAPES)
def test_design_is_the_correlation_with_delta_kernels(n, size, width):
    template, _ = _stamps(np.random.default_rng(1), n, size)
    columns, _, _ = _reference(template, template, np.ones(n), width, False)
    assert _relative(delta_function_design(template, width), columns) < 1e-12    # FFT round-off: 2e-15


@pytest.mark.parametrize("background", [False, True])
@pytest.mark.parametrize("n, size, width", SHAPES)
def test_normal_equations_equal_the_design_product(n, size, width, background):
    rng = np.random.default_rng(2)
    template, science = _stamps(rng, n, size)
    weight = rng.uniform(1e-3, 2.0, n)
    _, target, (matrix, vector) = _reference(template, science, weight, width, background)
    fast_matrix, fast_vector = delta_function_normal_equations(template, target, weight, width, background)
    assert fast_matrix.shape == matrix.shape and fast_vector.shape == vector.shape
    assert _relative(fast_matrix, matrix) < 1e-10                        # 1e-15
    assert _relative(fast_vector, vector) < 1e-10
    assert np.array_equal(fast_matrix, fast_matrix.transpose(0, 2, 1)), "exactly symmetric"
    if background:
        assert np.allclose(fast_matrix[:, -1, -1], weight * (size - width + 1) ** 2, rtol=1e-14, atol=0)


def test_normal_equations_of_edge_values():
    """Zero stamps give zero matrices (the background term aside); a single bright pixel, one
    diagonal entry per kernel pixel whose window holds it."""
    template = np.zeros((2, 9, 9))
    template[1, 4, 4] = 1e6
    target = np.ones((2, 25))
    matrix, vector = delta_function_normal_equations(template, target, np.ones(2), 5, True)
    assert not np.any(matrix[0, :25]) and not np.any(vector[0, :25]) and matrix[0, 25, 25] == 25
    _, _, (expected, _) = _reference(template, np.zeros((2, 9, 9)), np.ones(2), 5, True)
    assert _relative(matrix, expected) < 1e-10           # (the FFT correlations leave round-off at zeros)
    assert np.count_nonzero(np.diagonal(matrix[1], axis1=0, axis2=1)[:25]) == 25


@pytest.mark.parametrize("n, size, width", SHAPES[:3])
def test_models_equal_the_design_times_the_coefficients(n, size, width):
    rng = np.random.default_rng(3)
    template, _ = _stamps(rng, n, size)
    kernels = rng.normal(size=(n, width, width))
    columns, _, _ = _reference(template, template, np.ones(n), width, False)
    fit = size - width + 1
    expected = np.einsum("nk,nkp->np", kernels.reshape(n, -1), columns).reshape(n, fit, fit)
    assert _relative(delta_function_models(template, kernels), expected) < 1e-10


def test_form_marks_only_the_delta_function_basis():
    assert delta_function_form(make_delta_function_basis(5, 5)) == DeltaFunctionForm(5)
    shuffled = make_delta_function_basis(5, 5)[::-1]
    assert delta_function_form(shuffled) is None
    assert delta_function_form(np.ones((1, 3, 3))) is None
    assert delta_function_form(make_alard_lupton_basis(3, (1.0, 2.0), (2, 1))) is None


def test_cholesky_solutions_and_fallback_equal_the_lu_solve():
    """Regularised systems: Cholesky's solutions equal LU's; a zero stamp (no signal) and a
    singular one take the LU path's status (``ZERO_MATRIX`` without a background, the
    pseudo-inverse with it)."""
    rng = np.random.default_rng(4)
    template, science = _stamps(rng, 6, 15)
    template[4] = 0.0
    template[5] = 7.0                                          # rank 1 kernel block (+ background)
    target = science[:, 3:12, 3:12].reshape(6, -1)
    weight = rng.uniform(0.5, 2.0, 6)
    config = PsfMatchConfig(kernel_basis_set="delta-function", kernel_size=7)
    statuses = {}
    for background, penalty in ((True, None), (True, 1e-2), (False, None), (False, 10.0)):
        matrix, vector = delta_function_normal_equations(template, target, weight, 7, background)
        regularization = None
        if penalty is not None:
            regularization = make_regularization_matrix(dataclasses.replace(config, fit_for_background=background),
                                                        7, 7)
            matrix = matrix + penalty * regularization
        expected, status = solve_batch_status(matrix, vector)
        fit = fit_delta_function(template, target, weight, 7, background, regularization,
                                 lambda m: np.full(len(m), penalty), keep_matrix=False)
        assert fit.matrix is None
        assert np.array_equal(fit.status, status)
        assert _relative(fit.solutions, expected) < 1e-8
        statuses[background, penalty] = status.tolist()
    assert statuses[False, None] == [LU] * 4 + [ZERO_MATRIX, EIGENVECTOR]
    assert statuses[True, None][4:] == [EIGENVECTOR] * 2
    assert statuses[False, 10.0] == [LU] * 6


def test_rank_deficient_systems_take_the_pseudo_inverse():
    template = np.full((1, 15, 15), 3.0)
    target = np.ones((1, 81))
    fit = fit_delta_function(template, target, np.ones(1), 7, True)
    _, status = solve_batch_status(*delta_function_normal_equations(template, target, np.ones(1), 7, True))
    assert fit.status.tolist() == status.tolist() == [EIGENVECTOR]


def _batch(rng, n, size, masked):
    template, science = _stamps(rng, n, size)
    variance = rng.uniform(50.0, 150.0, size=(n, size, size))
    mask = np.zeros((n, size, size), dtype=np.int32)
    if masked:
        mask[:, ::5, ::3] = 1          # masked pixels inside the stamps: constant weights ignore them
    return StampBatch(template, science, variance, variance * 0.5, mask, mask)


@pytest.mark.parametrize("config", [
    {"fit_for_background": True},
    {"fit_for_background": False, "lambda_type": "relative"},
    {"fit_for_background": True, "use_regularization": False},
])
def test_fit_stamps_with_the_form_equals_the_design_path(config):
    rng = np.random.default_rng(5)
    batch = _batch(rng, 5, 23, masked=True)
    config = PsfMatchConfig(kernel_basis_set="delta-function", kernel_size=9, lambda_value=30.0,
                            **{"lambda_type": "absolute", **config})
    basis = KernelBasis(make_delta_function_basis(9, 9), kind="delta-function")
    regularization = make_regularization_matrix(config, 9, 9) if config.use_regularization else None
    expected = fit_stamps(batch, basis.kernels, config, regularization)
    fit = fit_stamps(batch, basis.kernels, config, regularization, separable=delta_function_form(basis.kernels))
    for name in ("coefficients", "background", "normal_matrix", "normal_vector", "kernel_sum", "model"):
        assert _relative(getattr(fit, name), getattr(expected, name)) < 1e-8, name
    n_basis = len(basis.kernels)      # the design path leaves tr(M_kk) to be formed from its kept matrices
    assert _relative(fit.information, np.trace(expected.normal_matrix[:, :n_basis, :n_basis], axis1=1, axis2=2)) < 1e-8
    assert np.array_equal(fit.failure_code, expected.failure_code)
    assert np.array_equal(fit.solve_status, expected.solve_status)
    lean = fit_stamps(batch, basis.kernels, config, regularization, separable=delta_function_form(basis.kernels),
                      keep_matrix=False)
    assert lean.normal_matrix is None and np.array_equal(lean.coefficients, fit.coefficients)


def test_stamp_normal_equations_with_the_form():
    rng = np.random.default_rng(6)
    batch = _batch(rng, 3, 19, masked=False)
    config = PsfMatchConfig(kernel_basis_set="delta-function", kernel_size=7)
    basis = KernelBasis(make_delta_function_basis(7, 7), kind="delta-function")
    expected = stamp_normal_equations(batch, basis.kernels, config)
    fast = stamp_normal_equations(batch, basis.kernels, config, separable=delta_function_form(basis.kernels))
    for actual, wanted in zip(fast, expected):
        assert _relative(actual, wanted) < 1e-10


def test_per_pixel_weights_take_the_design_path():
    """Without constant weighting the fit is the design path's (the design copied, not correlated)."""
    rng = np.random.default_rng(7)
    batch = _batch(rng, 3, 19, masked=True)
    config = PsfMatchConfig(kernel_basis_set="delta-function", kernel_size=7, constant_variance_weighting=False,
                            iterate_single_kernel=True, lambda_type="absolute", lambda_value=5.0)
    basis = KernelBasis(make_delta_function_basis(7, 7), kind="delta-function")
    regularization = make_regularization_matrix(config, 7, 7)
    expected = fit_stamps(batch, basis.kernels, config, regularization)
    fit = fit_stamps(batch, basis.kernels, config, regularization, separable=delta_function_form(basis.kernels))
    assert _relative(fit.coefficients, expected.coefficients) < 1e-8
    assert _relative(fit.normal_matrix, expected.normal_matrix) < 1e-10
    assert np.array_equal(fit.solve_status, expected.solve_status)


def test_regularized_fallback_of_a_stamp_with_nan():
    """A non-finite stamp among regularised ones: its system is formed again for the LU path
    (``NOT_FINITE``), the others keep their Cholesky solutions."""
    rng = np.random.default_rng(8)
    template, science = _stamps(rng, 3, 15)
    template[1, 7, 7] = np.nan
    target = science[:, 3:12, 3:12].reshape(3, -1)
    config = PsfMatchConfig(kernel_basis_set="delta-function", kernel_size=7)
    regularization = make_regularization_matrix(config, 7, 7)
    fit = fit_delta_function(template, target, np.ones(3), 7, True, regularization,
                             lambda m: 1e-3 * np.trace(m, axis1=1, axis2=2))
    matrix, vector = delta_function_normal_equations(template, target, np.ones(3), 7, True)
    lambdas = 1e-3 * np.trace(matrix, axis1=1, axis2=2)
    expected, status = solve_batch_status(matrix + lambdas[:, None, None] * regularization, vector)
    assert fit.status.tolist() == status.tolist() == [LU, NOT_FINITE, LU]
    assert _relative(fit.solutions, expected) < 1e-8


def test_upper_triangle_alone_is_the_whole_matrix_upper_triangle():
    """``both_triangles=False`` (what the Cholesky path forms) gives the same upper triangle, bit for bit
    (below it the memory's old values, never read)."""
    rng = np.random.default_rng(11)
    template, science = _stamps(rng, 3, 15)
    target = science[:, 3:12, 3:12].reshape(3, -1)
    whole, vector = delta_function_normal_equations(template, target, np.full(3, 0.5), 7, True)
    upper, upper_vector = delta_function_normal_equations(template, target, np.full(3, 0.5), 7, True,
                                                          both_triangles=False)
    rows, columns = np.triu_indices(50)
    np.testing.assert_array_equal(upper[:, rows, columns], whole[:, rows, columns])
    np.testing.assert_array_equal(upper_vector, vector)


@pytest.mark.parametrize("upper", [False, True])
def test_penalty_added_by_diagonals_is_the_dense_sum(upper):
    """``lambda H`` added one diagonal of ``H`` at a time: the dense ``M + lambda H`` bit for bit (on and
    above the diagonal with ``upper``; below it then ``M`` untouched)."""
    config = PsfMatchConfig(kernel_basis_set="delta-function", kernel_size=7)
    regularization = make_regularization_matrix(config, 7, 7)
    rng = np.random.default_rng(12)
    matrix = rng.normal(size=(3, 50, 50))
    lambdas = np.array([0.5, 3.0, 1e4])
    work = matrix.copy()
    _PenaltyDiagonals(regularization).add(work, lambdas, upper)
    expected = matrix + lambdas[:, None, None] * regularization
    part = np.triu_indices(50) if upper else np.indices((50, 50)).reshape(2, -1)
    np.testing.assert_array_equal(work[:, part[0], part[1]], expected[:, part[0], part[1]])
    if upper:
        below = np.tril_indices(50, -1)
        np.testing.assert_array_equal(work[:, below[0], below[1]], matrix[:, below[0], below[1]])
