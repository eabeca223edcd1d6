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

from ._backend import is_device_array
from .errors import SingularSystemError

__all__ = ["solve_symmetric", "solve_symmetric_batch", "condition_number"]


def _pseudo_inverse_solve(matrix, vector):
    eigenvalues, vectors = np.linalg.eigh(matrix)
    limit = matrix.shape[0] * np.finfo(np.float64).eps * np.max(np.abs(eigenvalues))
    inverse = np.zeros_like(eigenvalues)
    keep = np.abs(eigenvalues) > limit
    inverse[keep] = 1.0 / eigenvalues[keep]
    return vectors @ (inverse * (vectors.T @ vector))


def solve_symmetric_batch(matrices, vectors):
    """Solve a stack of symmetric positive semi-definite systems (see module notes).

    Parameters
    ----------
    matrices : ndarray of shape (N, n, n)
        NumPy (LAPACK ``getrf``/``getrs`` per system) or CuPy (cuBLAS
        ``getrfBatched``/``getrsBatched``, one call for the whole stack;
        the rank test is the same, on the pivots of the same partial-pivoting LU).
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
    if is_device_array(matrices):
        return _solve_symmetric_batch_device(matrices, vectors)
    matrices = np.asarray(matrices, dtype=np.float64)
    vectors = np.asarray(vectors, dtype=np.float64)
    n = matrices.shape[-1]
    solutions = np.zeros_like(vectors)
    methods = ["LU"] * len(matrices)
    finite = np.isfinite(matrices).all(axis=(1, 2)) & np.isfinite(vectors).all(axis=1)
    nonzero = np.abs(matrices).max(axis=(1, 2), initial=0.0) > 0
    _classify(finite, nonzero, methods)
    usable = np.flatnonzero(finite & nonzero)
    if usable.size:
        with warnings.catch_warnings():
            # exactly singular matrices are expected here; the rank test below handles them
            warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
            lu, piv = scipy.linalg.lu_factor(matrices[usable], check_finite=False)
        pivots = np.abs(np.diagonal(lu, axis1=1, axis2=2))
        full_rank = np.all(pivots > n * np.finfo(np.float64).eps * pivots.max(axis=1, keepdims=True),
                           axis=1)
        if full_rank.any():
            solutions[usable[full_rank]] = scipy.linalg.lu_solve(
                (lu[full_rank], piv[full_rank]), vectors[usable[full_rank], :, None],
                check_finite=False)[..., 0]
        for k in usable[~full_rank]:
            solutions[k] = _pseudo_inverse_solve(matrices[k], vectors[k])
            methods[k] = "EIGENVECTOR"
    return _finish(solutions, methods, finite, nonzero)


def _classify(finite, nonzero, methods):
    """Record why non-finite or all-zero systems fail."""
    for k in np.flatnonzero(~finite):
        methods[k] = "normal equations contain NaN or inf"
    for k in np.flatnonzero(finite & ~nonzero):
        methods[k] = "normal matrix is identically zero (no signal in the stamp?)"


def _lu_batch_cublas(matrices, vectors):
    """cuBLAS batched LU with partial pivoting and solve of CuPy stacks.

    Returns ``(solutions, |diag U|)``.  cuBLAS is column-major: the stack is
    transposed into a contiguous copy, so any (not only symmetric) matrix is
    factored as given.  ``getrsBatched`` reports argument errors only (host
    ``info``); singular systems are found by the caller's rank test.
    """
    import cupy
    from cupy_backends.cuda.libs import cublas

    batch, n = matrices.shape[0], matrices.shape[-1]
    lu = cupy.ascontiguousarray(matrices.transpose(0, 2, 1), dtype=np.float64)
    rhs = cupy.array(vectors, dtype=np.float64, order="C")
    handle = cupy.cuda.device.get_cublas_handle()
    a_step, b_step = n * n * 8, n * 8
    a_ptrs = cupy.arange(lu.data.ptr, lu.data.ptr + a_step * batch, a_step, dtype=cupy.uintp)
    b_ptrs = cupy.arange(rhs.data.ptr, rhs.data.ptr + b_step * batch, b_step, dtype=cupy.uintp)
    pivots = cupy.empty((batch, n), dtype=np.int32)
    device_info = cupy.empty(batch, dtype=np.int32)
    host_info = np.zeros(1, dtype=np.int32)
    cublas.dgetrfBatched(handle, n, a_ptrs.data.ptr, n, pivots.data.ptr, device_info.data.ptr, batch)
    cublas.dgetrsBatched(handle, cublas.CUBLAS_OP_N, n, 1, a_ptrs.data.ptr, n, pivots.data.ptr,
                         b_ptrs.data.ptr, n, host_info.ctypes.data, batch)
    if host_info[0] != 0:
        msg = f"cuBLAS getrsBatched rejected argument {-host_info[0]}"
        raise SingularSystemError(msg)
    return rhs, cupy.abs(cupy.diagonal(lu, axis1=1, axis2=2))


def _solve_symmetric_batch_device(matrices, vectors):
    """:func:`solve_symmetric_batch` for CuPy stacks: one batched LU on the GPU."""
    import cupy

    n = matrices.shape[-1]
    matrices = cupy.asarray(matrices, dtype=np.float64)
    vectors = cupy.asarray(vectors, dtype=np.float64)
    methods = ["LU"] * len(matrices)
    finite = (cupy.isfinite(matrices).all(axis=(1, 2)) & cupy.isfinite(vectors).all(axis=1)).get()
    nonzero = (cupy.abs(matrices).max(axis=(1, 2)) > 0).get() if len(matrices) else finite
    _classify(finite, nonzero, methods)
    solutions = np.zeros(vectors.shape)
    usable = np.flatnonzero(finite & nonzero)
    if usable.size:
        solved, pivots = _lu_batch_cublas(matrices[cupy.asarray(usable)], vectors[cupy.asarray(usable)])
        eps = n * np.finfo(np.float64).eps
        full_rank = cupy.all(pivots > eps * pivots.max(axis=1, keepdims=True), axis=1).get()
        solutions[usable[full_rank]] = solved[cupy.asarray(np.flatnonzero(full_rank))].get()
        for k in usable[~full_rank]:
            solutions[k] = _pseudo_inverse_solve(matrices[int(k)].get(), vectors[int(k)].get())
            methods[k] = "EIGENVECTOR"
    return _finish(solutions, methods, finite, nonzero)


def _finish(solutions, methods, finite, nonzero):
    """Zero and explain failed systems; the return value of :func:`solve_symmetric_batch`."""
    bad_solution = ~np.isfinite(solutions).all(axis=1)
    for k in np.flatnonzero(bad_solution & finite & nonzero):
        methods[k] = "solution of the normal equations is not finite"
    failed = ~finite | ~nonzero | bad_solution
    solutions[failed] = 0.0
    return solutions, methods, failed


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
    solutions, methods, failed = solve_symmetric_batch(np.asarray(matrix)[None], np.asarray(vector)[None])
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
        values = np.abs(np.linalg.eigvalsh(matrix))
    smallest = values.min()
    return float(values.max() / smallest) if smallest > 0 else float("inf")
