"""The GIL-free Cholesky of :mod:`gpudiffim._lapack` against NumPy's (issue 13: delta-function systems)."""

import numpy as np
import pytest

from gpudiffim import _lapack
from gpudiffim._lapack import cholesky_in_place, cholesky_solve


def _spd(n, seed, condition=1e6):
    """A symmetric positive definite matrix of the given condition number."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    return (q * np.geomspace(1.0, 1.0 / condition, n)) @ q.T


def test_the_lapack_pointers_are_found():
    """SciPy exports dpotrf/dpotrs to C here, so the GIL is released (the fallback would hold it)."""
    assert _lapack._DPOTRF is not None and _lapack._DPOTRS is not None


@pytest.mark.parametrize("upper", [False, True])
@pytest.mark.parametrize("n, seed", [(1, 0), (7, 1), (442, 2)])
def test_factor_and_solution_match_numpy(n, seed, upper):
    matrix = _spd(n, seed)
    other = np.tril_indices(n, -1) if upper else np.triu_indices(n, 1)
    work = matrix.copy()
    work[other] = -7.0                      # the other triangle is neither read nor written
    assert cholesky_in_place(work, upper=upper) == 0
    factor = np.triu(work).T if upper else np.tril(work)
    # backward stable: L L^T is the matrix to a few eps; L itself is NumPy's to cond * eps
    assert np.abs(factor @ factor.T - matrix).max() <= 1e-14 * n * np.abs(matrix).max()
    expected = np.linalg.cholesky(matrix)
    np.testing.assert_allclose(factor, expected, rtol=0, atol=1e-9 * np.abs(expected).max())
    assert np.all(work[other] == -7.0)
    vector = np.random.default_rng(seed).normal(size=n)
    before = vector.copy()
    solution = cholesky_solve(work, vector, upper=upper)
    np.testing.assert_array_equal(vector, before)
    reference = np.linalg.solve(matrix, vector)
    # the condition number is 1e6: both solutions within 1e6 * eps of each other, relative
    assert np.abs(solution - reference).max() <= 1e-9 * np.abs(reference).max()


@pytest.mark.parametrize("upper", [False, True])
def test_not_positive_definite_gives_the_failing_minor(upper):
    matrix = np.diag([4.0, 1.0, -1.0, 2.0])
    assert cholesky_in_place(matrix, upper=upper) == 3


@pytest.mark.parametrize("bad", [np.eye(3, dtype=np.float32), np.eye(4)[:, :3], np.eye(6)[::2, ::2],
                                 np.eye(3)[None]])
def test_wrong_arrays_are_refused(bad):
    with pytest.raises(ValueError, match="C-contiguous float64 square"):
        cholesky_in_place(bad)


def test_read_only_and_mismatched_vector_are_refused():
    frozen = np.eye(3)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="writable"):
        cholesky_in_place(frozen)
    factor = np.eye(3)
    with pytest.raises(ValueError, match="does not match"):
        cholesky_solve(factor, np.ones(4))


@pytest.mark.parametrize("seed", range(8))
def test_one_full_rank_system_is_solved_as_in_the_batch_bit_for_bit(seed):
    """``solve_symmetric`` takes one full-rank system straight to LU (the spatial fit's, each pass); its
    solution must be the batch path's to the last bit, and rank-deficient or non-finite systems still
    go to the batch path (pseudo-inverse, or the error)."""
    from gpudiffim.errors import SingularSystemError
    from gpudiffim.linalg import solve_symmetric, solve_symmetric_batch

    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 170))
    design = rng.normal(size=(2 * n, n)) * np.logspace(0, 4, n)
    matrix, vector = design.T @ design, rng.normal(size=n)
    solution, method = solve_symmetric(matrix, vector)
    batch, methods, failed = solve_symmetric_batch(matrix[None], vector[None])
    assert method == methods[0] == "LU" and not failed[0]
    np.testing.assert_array_equal(solution, batch[0])
    deficient = matrix.copy()
    deficient[-1], deficient[:, -1] = deficient[0], deficient[:, 0]
    assert solve_symmetric(deficient, vector)[1] == "EIGENVECTOR"
    with pytest.raises(SingularSystemError):
        solve_symmetric(np.where(np.eye(n) > 0, np.nan, matrix), vector)
