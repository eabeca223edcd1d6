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
from gpudiffim._backend import use_backend
from gpudiffim.delta_function import (
    DeltaFunctionForm,
    _PenaltyDiagonals,
    delta_function_design,
    delta_function_form,
    delta_function_models,
    delta_function_normal_equations,
    deregularized_with_factors,
    fit_delta_function,
)
from gpudiffim.linalg import EIGENVECTOR, LU, NOT_FINITE, ZERO_MATRIX, deregularized, solve_batch_status
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


# --------------------------------------------------------------------------
# the PCA basis's kernels with the regularisation's smoothing taken out (pca_deregularization)
# --------------------------------------------------------------------------

def _iterated(matrix, penalty, lam, vector, steps):
    """``x_{j+1} = x_0 + lam (M + lam H)^{-1} H x_j`` by dense solves (the whole unknown vector)."""
    system = matrix + lam * penalty
    first = np.linalg.solve(system, vector)
    result = first
    for _ in range(steps):
        result = first + lam * np.linalg.solve(system, penalty @ result)
    return result


def test_deregularized_steps_tend_to_the_unregularised_solution():
    """Each step is one more term of the series: 0 steps return ``x_0``, the steps equal dense
    iterated solves, and they converge to ``M^{-1} b`` (here ``lambda h / (m + lambda h)`` <= 1/2)."""
    rng = np.random.default_rng(21)
    n = 12
    basis = rng.normal(size=(n, n))
    matrix = basis @ basis.T + n * np.eye(n)
    penalty = make_regularization_matrix(PsfMatchConfig(kernel_basis_set="delta-function", kernel_size=3,
                                                        fit_for_background=True), 3, 3)[:9, :9]
    lam = 0.5 * np.linalg.eigvalsh(matrix).min() / np.linalg.eigvalsh(penalty).max()
    vector = rng.normal(size=n)[:9]
    matrix = matrix[:9, :9]
    system = matrix + lam * penalty
    first = np.linalg.solve(system, vector)
    solve = lambda rhs: np.linalg.solve(system[None], rhs[..., None])[..., 0]      # noqa: E731
    assert np.array_equal(deregularized(solve, first[None], penalty, np.array([lam]), 0)[0], first)
    for steps in (1, 3):
        got = deregularized(solve, first[None], penalty, np.array([lam]), steps)[0]
        assert _relative(got, _iterated(matrix, penalty, lam, vector, steps)) < 1e-12
    converged = deregularized(solve, first[None], penalty, np.array([lam]), 80)[0]
    assert _relative(converged, np.linalg.solve(matrix, vector)) < 1e-12
    assert _relative(first, np.linalg.solve(matrix, vector)) > 1e-3           # the regularisation mattered


@pytest.mark.parametrize("background", [True, False])
def test_fit_delta_function_deregularizes_with_its_cholesky_factors(background):
    """``fit_delta_function(deregularization=k)``: the kernel coefficients of ``k`` iterated-Tikhonov
    steps (dense reference, the background re-fitted at each solve); a stamp Cholesky cannot
    solve (a NaN in its template) keeps its solution; without regularisation there are none."""
    rng = np.random.default_rng(22)
    template, science = _stamps(rng, 5, 15)
    template[4, 7, 7] = np.nan
    target = science[:, 3:12, 3:12].reshape(5, -1)
    weight = rng.uniform(0.5, 2.0, 5)
    config = PsfMatchConfig(kernel_basis_set="delta-function", kernel_size=7, fit_for_background=background)
    penalty = make_regularization_matrix(config, 7, 7)
    lam = 3.0e4
    fit = fit_delta_function(template, target, weight, 7, background, penalty, lambda m: np.full(len(m), lam),
                             keep_matrix=False, deregularization=2)
    matrix, vector = delta_function_normal_equations(template, target, weight, 7, background)
    for k in range(4):
        expected = _iterated(matrix[k], penalty, lam, vector[k], 2)[:49]
        assert _relative(fit.deregularized[k], expected) < 1e-9, k
        assert _relative(fit.deregularized[k], fit.solutions[k, :49]) > 1e-4, k       # the steps did something
    assert fit.status[4] == NOT_FINITE and np.array_equal(fit.deregularized[4], fit.solutions[4, :49])
    assert fit_delta_function(template, target, weight, 7, background, deregularization=2).deregularized is None


def test_deregularized_with_factors_keeps_the_failed_rows():
    rng = np.random.default_rng(23)
    coefficients = rng.normal(size=(2, 4))
    factors = np.zeros((2, 5, 5))
    factors[0] = np.linalg.cholesky(np.eye(5) * 4.0).T
    penalty = np.diag([1.0, 1.0, 1.0, 1.0, 0.0])
    got = deregularized_with_factors(factors, np.array([True, False]), coefficients, penalty, np.array([2.0, 2.0]), 1)
    np.testing.assert_allclose(got[0], coefficients[0] * (1 + 2.0 / 4.0), rtol=1e-14)   # x0 + lam (4 I)^-1 x0
    np.testing.assert_array_equal(got[1], coefficients[1])


def test_operations_deregularize_as_the_direct_fit(emulator):
    """Two backends, one answer: the stamp fits of the kernel path (the emulator under
    ``cuda-emulator``: normal equations by ``gdi_delta_function_normal_equations``, solved by the
    reference, factored again for the steps) give the direct host fit's de-regularised kernels."""
    rng = np.random.default_rng(24)
    batch = _batch(rng, 4, 17, masked=False)
    config = PsfMatchConfig(kernel_basis_set="delta-function", kernel_size=7, lambda_type="absolute",
                            lambda_value=3.0e4, pca_deregularization=3)
    basis = KernelBasis(make_delta_function_basis(7, 7), kind="delta-function")
    regularization = make_regularization_matrix(config, 7, 7)
    form = delta_function_form(basis.kernels)
    host = fit_stamps(batch, basis.kernels, config, regularization, separable=form, keep_matrix=False)
    with use_backend("cuda-emulator"):
        kernel_path = fit_stamps(batch, basis.kernels, config, regularization, separable=form, keep_matrix=False)
    assert host.deregularized is not None and kernel_path.deregularized is not None
    assert _relative(kernel_path.deregularized, host.deregularized) < 1e-8
    assert _relative(host.deregularized, host.coefficients) > 1e-4
    for off in ({"pca_deregularization": 0}, {"use_pca_for_spatial_kernel": False}):
        quiet = dataclasses.replace(config, **off)
        assert fit_stamps(batch, basis.kernels, quiet, regularization, separable=form).deregularized is None


@pytest.mark.gpu
@pytest.mark.parametrize("width", [7, 9])      # 50 unknowns: the small-system launch; 82: batched Cholesky
def test_cupy_deregularized_kernels_match_numpy(width):
    """The device's batched Cholesky factors serve the steps (``potrsBatched``), equal to the host's."""
    import cupy

    rng = np.random.default_rng(25)
    batch = _batch(rng, 4, 10 + width, masked=False)
    config = PsfMatchConfig(kernel_basis_set="delta-function", kernel_size=width, lambda_type="absolute",
                            lambda_value=3.0e4, pca_deregularization=3)
    basis = KernelBasis(make_delta_function_basis(width, width), kind="delta-function")
    regularization = make_regularization_matrix(config, width, width)
    form = delta_function_form(basis.kernels)
    host = fit_stamps(batch, basis.kernels, config, regularization, separable=form, keep_matrix=False)
    planes = (batch.template, batch.science, batch.template_variance, batch.science_variance, batch.template_mask,
              batch.science_mask)
    device_batch = StampBatch(*(cupy.asarray(plane) for plane in planes))
    device = fit_stamps(device_batch, cupy.asarray(basis.kernels), config, cupy.asarray(regularization),
                        separable=form, keep_matrix=False, defer_rank_deficient=True)
    assert _relative(cupy.asnumpy(device.deregularized), host.deregularized) < 1e-8
