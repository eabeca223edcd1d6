"""Solution of the small symmetric normal-equation systems.

Method (as ``ip_diffim``, with one safeguard added):

1. LU factorisation with partial pivoting (LAPACK ``getrf``).  The system is
   taken as invertible when every pivot satisfies ``|p| > n eps |p_max|``
   (``n`` = size, ``eps`` = float64 machine epsilon), the rank test Eigen's
   full-pivot LU applies in ``ip_diffim``.
2. Otherwise the symmetric eigen-decomposition gives the pseudo-inverse
   solution ``a = R diag(1/lambda) R^T b``, inverting only eigenvalues with
   ``|lambda| > n eps |lambda_max|`` (``ip_diffim`` inverts every non-zero
   eigenvalue, which amplifies round-off; this is the safeguard).
3. A non-finite system or solution raises :class:`SingularSystemError`.
"""

import warnings

import numpy as np
import scipy.linalg

from .errors import SingularSystemError

__all__ = ["solve_symmetric", "condition_number"]


def _pseudo_inverse_solve(matrix, vector):
    eigenvalues, vectors = np.linalg.eigh(matrix)
    limit = matrix.shape[0] * np.finfo(np.float64).eps * np.max(np.abs(eigenvalues))
    inverse = np.zeros_like(eigenvalues)
    keep = np.abs(eigenvalues) > limit
    inverse[keep] = 1.0 / eigenvalues[keep]
    return vectors @ (inverse * (vectors.T @ vector))


def solve_symmetric(matrix, vector):
    """Solve ``matrix @ x = vector`` for a symmetric positive semi-definite matrix.

    Parameters
    ----------
    matrix : ndarray of shape (n, n)
    vector : ndarray of shape (n,)

    Returns
    -------
    solution : ndarray of shape (n,)
    method : {"LU", "EIGENVECTOR"}
        Which path solved the system.

    Raises
    ------
    SingularSystemError
        If the system holds NaN/inf, is entirely zero, or the solution is not finite.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    vector = np.asarray(vector, dtype=np.float64)
    if not (np.all(np.isfinite(matrix)) and np.all(np.isfinite(vector))):
        msg = "normal equations contain NaN or inf"
        raise SingularSystemError(msg)
    if not np.any(matrix):
        msg = "normal matrix is identically zero (no signal in the stamp?)"
        raise SingularSystemError(msg)
    with warnings.catch_warnings():
        # an exactly singular matrix is expected here; the rank test below handles it
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        lu, piv = scipy.linalg.lu_factor(matrix, check_finite=False)
    pivots = np.abs(np.diag(lu))
    if np.all(pivots > matrix.shape[0] * np.finfo(np.float64).eps * pivots.max()):
        solution, method = scipy.linalg.lu_solve((lu, piv), vector, check_finite=False), "LU"
    else:
        solution, method = _pseudo_inverse_solve(matrix, vector), "EIGENVECTOR"
    if not np.all(np.isfinite(solution)):
        msg = "solution of the normal equations is not finite"
        raise SingularSystemError(msg)
    return solution, method


def condition_number(matrix, kind="EIGENVALUE"):
    """Condition number of a symmetric matrix.

    Parameters
    ----------
    matrix : ndarray of shape (n, n)
    kind : {"EIGENVALUE", "SVD"}
        ``|lambda|_max / |lambda|_min`` of the eigenvalues, or
        ``sigma_max / sigma_min`` of the singular values.

    Returns
    -------
    float
        ``inf`` for a singular matrix.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    if kind == "SVD":
        values = scipy.linalg.svdvals(matrix)
    else:
        values = np.abs(np.linalg.eigvalsh(matrix))
    smallest = values.min()
    return float(values.max() / smallest) if smallest > 0 else float("inf")
