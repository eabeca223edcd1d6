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

from ._backend import array_module_of, to_host
from .errors import SingularSystemError

__all__ = ["STATUS_TEXT", "pseudo_inverse_solve_batch", "solve_batch_status", "solve_host", "solve_symmetric",
           "solve_symmetric_batch", "condition_number", "deregularized"]


#: Status codes of :func:`solve_batch_status`, and what each means for a stamp fit.
LU, EIGENVECTOR, NOT_FINITE, ZERO_MATRIX, NOT_FINITE_SOLUTION = range(5)
STATUS_TEXT = {LU: "LU", EIGENVECTOR: "EIGENVECTOR",
               NOT_FINITE: "normal equations contain NaN or inf",
               ZERO_MATRIX: "normal matrix is identically zero (no signal in the stamp?)",
               NOT_FINITE_SOLUTION: "solution of the normal equations is not finite"}

def solve_batch_status(matrices, vectors, *, solve=None):
    """Solve a stack of symmetric positive semi-definite systems; status codes instead of text.

    Parameters
    ----------
    matrices : ndarray of shape (N, n, n)
        In the array module of ``solve``: NumPy for the default (LAPACK
        ``getrf``/``getrs`` per system); the operations layer passes the
        cuBLAS ``getrfBatched``/``getrsBatched`` routine for CuPy stacks
        (``gpudiffim._ops.KERNELS.solve_systems``: no synchronisation).  The
        rank test is the same on both, on the pivots of the same
        partial-pivoting LU.
    vectors : ndarray of shape (N, n)
    solve : callable, optional
        ``solve(matrices, vectors, usable) -> (solutions, full_rank)`` of the
        usable systems; default the host routine.

    Returns
    -------
    solutions : ndarray of shape (N, n)
        Zero where the system failed; in the module of ``matrices``.
    status : ndarray of int8, shape (N,)
        :data:`LU`, :data:`EIGENVECTOR` (rank-deficient: pseudo-inverse), or
        why it failed (:data:`NOT_FINITE`, :data:`ZERO_MATRIX`,
        :data:`NOT_FINITE_SOLUTION`); :data:`STATUS_TEXT` says it in words.
    """
    xp = array_module_of(matrices)
    matrices = xp.asarray(matrices, dtype=np.float64)
    vectors = xp.asarray(vectors, dtype=np.float64)
    n_systems = len(matrices)
    finite = xp.isfinite(matrices).all(axis=(1, 2)) & xp.isfinite(vectors).all(axis=1)
    if n_systems == 0 or matrices.shape[-1] == 0:
        return xp.zeros(vectors.shape), xp.full(n_systems, np.int8(ZERO_MATRIX))
    nonzero = xp.abs(matrices).reshape(n_systems, -1).max(axis=1) > 0
    usable = finite & nonzero
    solutions, full_rank = (solve or solve_host)(matrices, vectors, usable)
    status = xp.where(full_rank, np.int8(LU), np.int8(EIGENVECTOR))
    status = xp.where(finite, xp.where(nonzero, status, np.int8(ZERO_MATRIX)), np.int8(NOT_FINITE))
    bad_solution = usable & ~xp.isfinite(solutions).all(axis=1)
    status = xp.where(bad_solution, np.int8(NOT_FINITE_SOLUTION), status).astype(np.int8)
    solutions = xp.where((status <= EIGENVECTOR)[:, None], solutions, 0.0)
    return solutions, status


def _ranked_lu(matrices):
    """``(lu, piv, full rank)`` of LAPACK's LU of a matrix (n, n) or a stack (N, n, n): full rank where
    every pivot exceeds ``n eps`` times the largest (module notes, step 1)."""
    with warnings.catch_warnings():
        # exactly singular matrices are expected here; the rank test handles them
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        lu, piv = scipy.linalg.lu_factor(matrices, check_finite=False)
    pivots = np.abs(np.diagonal(lu, axis1=-2, axis2=-1))
    n = matrices.shape[-1]
    return lu, piv, np.all(pivots > n * np.finfo(np.float64).eps * pivots.max(axis=-1, keepdims=True), axis=-1)


def solve_host(matrices, vectors, usable):
    """LAPACK LU of the usable systems, the pseudo-inverse of the rank-deficient ones; (solutions, full rank)."""
    solutions = np.zeros_like(vectors)
    full_rank = np.zeros(len(matrices), dtype=bool)
    index = np.flatnonzero(usable)
    if index.size:
        lu, piv, ranked = _ranked_lu(matrices[index])
        full_rank[index] = ranked
        if ranked.any():
            solutions[index[ranked]] = scipy.linalg.lu_solve(
                (lu[ranked], piv[ranked]), vectors[index[ranked], :, None], check_finite=False)[..., 0]
        deficient = index[~ranked]
        if deficient.size:
            solutions[deficient] = pseudo_inverse_solve_batch(matrices[deficient], vectors[deficient])
    return solutions, full_rank


def pseudo_inverse_solve_batch(matrices, vectors):
    """Pseudo-inverse solutions of a stack of symmetric systems (module notes, step 2), one batched ``eigh``.

    Eigenvalues with ``|lambda| <= n eps |lambda|_max`` are not inverted.  In
    the stack's array module.
    """
    xp = array_module_of(matrices)
    eigenvalues, rotation = xp.linalg.eigh(matrices)
    magnitude = xp.abs(eigenvalues)
    keep = magnitude > matrices.shape[-1] * np.finfo(np.float64).eps * magnitude.max(axis=1, keepdims=True)
    inverse = xp.where(keep, 1.0 / xp.where(keep, eigenvalues, 1.0), 0.0)
    projected = xp.matmul(rotation.transpose(0, 2, 1), vectors[:, :, None])[:, :, 0]
    return xp.matmul(rotation, (inverse * projected)[:, :, None])[:, :, 0]


def solve_symmetric_batch(matrices, vectors):
    """Solve a stack of symmetric positive semi-definite systems (see module notes).

    :func:`solve_batch_status` with host results and the status in words.

    Parameters
    ----------
    matrices : ndarray of shape (N, n, n)
        NumPy (CuPy stacks: ``gpudiffim._ops.KERNELS.solve_systems``).
    vectors : ndarray of shape (N, n)

    Returns
    -------
    solutions : ndarray of shape (N, n)
        Zero where the system failed; a NumPy array in both cases.
    methods : list of str
        "LU", "EIGENVECTOR", or why the system failed ("" never).
    failed : ndarray of bool, shape (N,)
        Systems holding NaN/inf, identically zero, or with a non-finite solution.
    """
    solutions, status = solve_batch_status(matrices, vectors)
    status = to_host(status)
    return to_host(solutions), [STATUS_TEXT[int(code)] for code in status], status > EIGENVECTOR


def _full_rank_solution(matrix, vector):
    """The LU solution of one finite float64 system of full rank, as :func:`solve_host` finds it (bit for
    bit, without the batch's bookkeeping: the spatial fit solves one system a pass); None for any other."""
    if matrix.dtype != np.float64 or vector.dtype != np.float64 or matrix.ndim != 2 or not matrix.size:
        return None
    if not (np.isfinite(matrix).all() and np.isfinite(vector).all()):
        return None
    lu, piv, ranked = _ranked_lu(matrix)
    if not ranked:
        return None
    solution = scipy.linalg.lu_solve((lu, piv), vector[:, None], check_finite=False)[:, 0]
    return solution if np.isfinite(solution).all() else None


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
    matrix, vector = np.asarray(matrix), np.asarray(vector)
    solution = _full_rank_solution(matrix, vector)
    if solution is not None:
        return solution, STATUS_TEXT[LU]
    solutions, methods, failed = solve_symmetric_batch(matrix[None], vector[None])
    if failed[0]:
        raise SingularSystemError(methods[0])
    return solutions[0], methods[0]


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
        values = _extreme_eigenvalues(matrix)
        values = np.abs(np.linalg.eigvalsh(matrix) if values is None else values)
    smallest = values.min()
    return float(values.max() / smallest) if smallest > 0 else float("inf")


#: Workspace of ``sytrd`` per matrix row: its blocked form (a few times faster than the default workspace's
#: unblocked one at n ~ 160).
_SYTRD_BLOCK = 64


def _extreme_eigenvalues(matrix):
    """``(lambda_min, lambda_max)`` of a finite symmetric positive semi-definite matrix (read from its lower
    triangle), or None for any other (an indefinite one: its smallest ``|lambda|`` may lie inside).

    The matrix is reduced to tridiagonal form (LAPACK ``sytrd``, what ``numpy.linalg.eigvalsh`` spends
    most of its time on) and only the two extreme eigenvalues are found, by bisection to full
    accuracy (``stebz``) instead of all of them: ~0.5 ms against ~0.8 ms for the ~160^2 spatial matrix,
    values equal to ``eigvalsh``'s to the rounding of the tridiagonal form.
    """
    n = matrix.shape[0] if matrix.ndim == 2 else 0
    if n < 2 or matrix.shape != (n, n) or not np.isfinite(matrix).all():
        return None
    lapack = scipy.linalg.lapack
    _, diagonal, off_diagonal, _, info = lapack.dsytrd(matrix, lower=1, lwork=_SYTRD_BLOCK * n)
    if info != 0:
        return None
    accuracy = 2 * np.finfo(np.float64).tiny      # stebz's most accurate setting: 2 x the safe minimum
    extremes = []
    for index in (1, n):
        found, values, _, _, info = lapack.dstebz(diagonal, off_diagonal, 2, 0.0, 0.0, index, index, accuracy, "E")
        if info != 0 or found != 1:
            return None
        extremes.append(values[0])
    return np.array(extremes) if extremes[0] >= 0 else None


def deregularized(solve, solutions, regularization, lambdas, steps):
    """Iterated-Tikhonov steps from regularised solutions: ``x_{j+1} = x_0 + lambda (M + lambda H)^{-1} H x_j``.

    ``x_0`` solves ``(M + lambda H) x = b``; each step removes more of the
    regularisation's smoothing (``x_j`` tends to ``M^{-1} b`` where ``M`` is
    well determined and stays near ``x_0`` where it is not: the filter
    factor of an eigen-direction of ``M`` relative to ``H`` with ratio
    ``r = lambda h / (m + lambda h)`` is ``1 - r^{j+1}``).

    Parameters
    ----------
    solve : callable
        ``solve(rhs)`` -> ``(M + lambda H)^{-1} rhs`` for a stack (N, P) of
        right-hand sides, one per system, with the factors already made.
    solutions : ndarray of shape (N, P)
        ``x_0``, NumPy or CuPy.
    regularization : ndarray of shape (P, P)
        ``H`` (symmetric), in the module of ``solutions``.
    lambdas : ndarray of shape (N,)
        Each system's ``lambda``, in the same module.
    steps : int
        ``j`` (0 returns ``solutions``).

    Returns
    -------
    ndarray of shape (N, P)
    """
    result = solutions
    for _ in range(steps):
        result = solutions + lambdas[:, None] * solve(result @ regularization)     # (H x_n)^T = x_n^T H
    return result
