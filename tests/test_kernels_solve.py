"""``gdi_solve_small`` (``kernels/linear_solve.cu``) against the host reference, LAPACK.

The kernel replaces cuBLAS batched LU and its ~70 CuPy calls of glue per
stamp-fit batch on the GPU with one launch.  On the CPU emulator, for stacks
that hold every failure kind (non-finite, identically zero, rank-deficient,
a non-finite solution) and well- and ill-conditioned systems of the stamp
fits' sizes, it must give :func:`gpudiffim.linalg.solve_batch_status`'s
status codes exactly, its LU solutions to rounding (the elimination sums in
another order than LAPACK's blocked ``getrf``), and ``|diag U|`` of the same
partial pivoting.  Through the operations layer, with the rank-deficient
systems' pseudo-inverse solutions, the CuPy path must give the reference's
solutions and statuses (``@pytest.mark.gpu``; the CuPy stand-in runs it too).
"""

import numpy as np
import pytest
import scipy.linalg
from numpy.testing import assert_allclose, assert_array_equal

from gpudiffim._backend import use_backend
from gpudiffim._cuda.linear_solve import SOLVE_SMALL_MAX_N, solve_small, solve_stamps
from gpudiffim.linalg import EIGENVECTOR, LU, NOT_FINITE, NOT_FINITE_SOLUTION, ZERO_MATRIX, solve_batch_status


def _stack(gen, n_systems, n):
    """Normal-equation-like systems (A A^T), with one of every failure kind at the front."""
    a = gen.normal(size=(n_systems, n, n + 12))
    matrices = a @ a.transpose(0, 2, 1)
    matrices[5:10] *= np.logspace(-6, 6, n)[None, :, None] * np.logspace(-6, 6, n)[None, None, :]  # ill-scaled
    vectors = gen.normal(size=(n_systems, n))
    matrices[0, -1, -1] = np.nan                            # NOT_FINITE (matrix)
    vectors[1, 0] = np.inf                                  # NOT_FINITE (vector)
    matrices[2] = 0.0                                       # ZERO_MATRIX
    if n > 1:
        matrices[3, 1, :] = matrices[3, :, 1] = 0.0         # rank-deficient: EIGENVECTOR
    matrices[4] = 1e-300 * np.eye(n)                        # solution 1e300 * b overflows: NOT_FINITE_SOLUTION
    vectors[4] = 1e300
    return matrices, vectors


def _host_pivots(matrix):
    import warnings

    with warnings.catch_warnings():      # the rank-deficient system is exactly singular
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        lu, _ = scipy.linalg.lu_factor(matrix, check_finite=False)
    return np.abs(np.diagonal(lu))


@pytest.mark.parametrize("n", [1, 7, 28, SOLVE_SMALL_MAX_N])
def test_solve_small_equals_lapack(emulator, rng, n):
    gen, seed = rng
    matrices, vectors = _stack(gen, 14, n)
    with use_backend("cuda-emulator"):
        solutions, pivots, status = solve_small(matrices, vectors)
    expected, expected_status = solve_batch_status(matrices, vectors)
    expected_status = expected_status.astype(np.int32)
    assert status.dtype == np.int32
    assert_array_equal(status, expected_status, err_msg=f"seed={seed}")
    if n > 1:
        assert status[:5].tolist() == [NOT_FINITE, NOT_FINITE, ZERO_MATRIX, EIGENVECTOR, NOT_FINITE_SOLUTION]
    lu = status == LU
    assert lu.sum() >= 9
    assert_allclose(solutions[lu], expected[lu], rtol=1e-8, atol=0, err_msg=f"seed={seed}")
    assert not solutions[~lu].any()                          # no solution where LU did not give one
    for k in np.flatnonzero(status <= EIGENVECTOR):
        assert_allclose(pivots[k], _host_pivots(matrices[k]), rtol=1e-9, err_msg=f"seed={seed}, system {k}")


def test_solve_small_refuses_large_or_mismatched_systems(emulator):
    n = SOLVE_SMALL_MAX_N + 1
    with use_backend("cuda-emulator"), pytest.raises(ValueError, match="n <= 64"):
        solve_small(np.eye(n)[None], np.ones((1, n)))
    with use_backend("cuda-emulator"), pytest.raises(ValueError, match="must be"):
        solve_small(np.eye(3)[None], np.ones((2, 3)))


def test_solve_small_empty_stack(emulator):
    with use_backend("cuda-emulator"):
        solutions, pivots, status = solve_small(np.zeros((0, 4, 4)), np.zeros((0, 4)))
    assert solutions.shape == pivots.shape == (0, 4) and status.shape == (0,)


@pytest.mark.parametrize(("n_basis", "with_background"), [(1, False), (6, True), (27, True), (SOLVE_SMALL_MAX_N, False)])
def test_solve_stamps_equals_the_reference_steps(emulator, rng, n_basis, with_background):
    """``gdi_solve_stamps`` gives ``NUMPY.solve_stamps``' codes, statuses, coefficients, kernel images, sums
    and backgrounds (to rounding), except for the rank-deficient systems, which it leaves at zero (deferred);
    the CuPy stand-in's NumPy version of the kernel agrees with both."""
    from gpudiffim._ops import NUMPY
    from standin_kernels import solve_stamps as standin_solve_stamps

    gen, seed = rng
    p = n_basis + with_background
    matrices, vectors = _stack(gen, 14, p)
    codes = np.zeros(14, dtype=np.int32)
    codes[[2, 6]] = 5                                        # failed before the solve: kept, no solution
    basis = gen.normal(size=(n_basis, 5, 5))
    with use_backend("cuda-emulator"):
        outcome, kernels, background = solve_stamps(matrices, vectors, codes, basis, with_background, 6)
    want, want_kernels, want_background, _ = NUMPY.solve_stamps(matrices, vectors, codes, basis, with_background, 6)
    note = f"seed={seed}"
    assert_array_equal(outcome[:, :2], want[:, :2], err_msg=note)
    assert set(outcome[:, 0].tolist()) <= {0, 5, 6} and outcome[6, 0] == 5 and outcome[7, 0] == 0
    deferred = outcome[:, 1] == EIGENVECTOR
    assert deferred.sum() == (p > 1)
    scale = np.abs(want).max(axis=1, keepdims=True)            # the ill-scaled systems' solutions reach 1e11
    assert (np.abs(outcome - want)[~deferred] <= 1e-9 * scale[~deferred]).all(), note
    assert not outcome[deferred, 2:].any() and not kernels[deferred].any() and not background[deferred].any()
    kernel_error = np.abs(kernels - want_kernels).reshape(14, -1)[~deferred]
    assert (kernel_error <= 1e-9 * 25 * np.abs(basis).max() * scale[~deferred]).all(), note
    assert_array_equal(background, outcome[:, 3])
    standin = [np.full_like(outcome, np.nan), np.full_like(kernels, np.nan), np.full_like(background, np.nan)]
    standin_solve_stamps(matrices, vectors, codes, basis, 14, n_basis, int(with_background), 25, 6, *standin)
    assert (np.abs(standin[0] - outcome) <= 1e-9 * scale).all(), note
    assert (np.abs(standin[1] - kernels).reshape(14, -1) <= 1e-9 * 25 * np.abs(basis).max() * scale).all(), note
    assert_array_equal(standin[2], standin[0][:, 3])


@pytest.mark.gpu
def test_cupy_solve_systems_equals_the_reference(rng):
    """The operations layer's device solve (kernel + pseudo-inverse of the deficient systems) gives the
    host reference's statuses and solutions."""
    import cupy

    from gpudiffim._ops import KERNELS

    gen, seed = rng
    matrices, vectors = _stack(gen, 40, 28)
    expected, expected_status = solve_batch_status(matrices, vectors)
    solutions, status = KERNELS.solve_systems(cupy.asarray(matrices), cupy.asarray(vectors))
    assert_array_equal(cupy.asnumpy(status), expected_status, err_msg=f"seed={seed}")
    assert_allclose(cupy.asnumpy(solutions), expected, rtol=1e-8, atol=1e-12, err_msg=f"seed={seed}")
