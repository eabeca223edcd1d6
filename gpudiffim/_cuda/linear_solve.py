"""Launch geometry and host wrapper of ``kernels/linear_solve.cu``.

``gdi_solve_small`` solves a stack of small systems in one launch, one block
per system, with the status codes, rank test and pivots of
:func:`gpudiffim.linalg.solve_batch_status` (LAPACK ``getrf``/``getrs`` on
the host, cuBLAS batched LU before); ``gdi_solve_stamps`` does the same for
the stamp fits of a batch and forms, in the same launch, what the fit makes
of the solutions (``gpudiffim._ops.NUMPY.solve_stamps``).  The wrappers take
NumPy arrays (run by the CPU emulator) or CuPy arrays (run on the GPU), as
:func:`~gpudiffim._cuda.launch.launcher_for` says.
"""

import numpy as np

from ._host import on_launcher, prepare
from .launch import launch

__all__ = ["SOLVE_SMALL_DEFINES", "SOLVE_SMALL_MAX_N", "SOLVE_SMALL_THREADS", "solve_small", "solve_stamps"]

#: Threads per block of ``gdi_solve_small`` (``GDI_LS_THREADS``): one warp per system.
SOLVE_SMALL_THREADS = 32
#: Largest system the kernel solves (``GDI_LS_MAX_N``: the augmented matrix in 33 kB of shared memory).
SOLVE_SMALL_MAX_N = 64
#: The unit's compile-time constants.
SOLVE_SMALL_DEFINES = (("GDI_LS_THREADS", SOLVE_SMALL_THREADS), ("GDI_LS_MAX_N", SOLVE_SMALL_MAX_N))


def solve_small(matrices, vectors):
    """Solve every system ``matrices[s] x = vectors[s]`` (``gdi_solve_small``).

    Parameters
    ----------
    matrices : ndarray of shape (N, n, n)
        float64 (converted if needed), ``n <= SOLVE_SMALL_MAX_N``.
    vectors : ndarray of shape (N, n)

    Returns
    -------
    solutions : ndarray of shape (N, n)
        The LU solution where the status is ``LU``, else 0.
    pivots : ndarray of shape (N, n)
        ``|U[k, k]|`` of the partial-pivoting factorisation (0 for systems
        not factored).
    status : ndarray of int32, shape (N,)
        :data:`gpudiffim.linalg.LU`, ``EIGENVECTOR`` (rank-deficient by the
        pivot test; no solution here), ``NOT_FINITE``, ``ZERO_MATRIX`` or
        ``NOT_FINITE_SOLUTION``.

    All three are in the inputs' array module.

    Raises
    ------
    ValueError
        For shapes that do not match or ``n`` above :data:`SOLVE_SMALL_MAX_N`.
    """
    _, xp = on_launcher(matrices, vectors)
    matrices = prepare(xp, matrices, np.float64, 3, "matrices")
    vectors = prepare(xp, vectors, np.float64, 2, "vectors")
    n_systems, n = vectors.shape
    if matrices.shape != (n_systems, n, n) or n > SOLVE_SMALL_MAX_N:
        msg = (f"matrices {matrices.shape} and vectors {vectors.shape} must be (N, n, n) and (N, n) "
               f"with n <= {SOLVE_SMALL_MAX_N}")
        raise ValueError(msg)
    solutions = xp.zeros((n_systems, n))
    pivots = xp.zeros((n_systems, n))
    status = xp.zeros(n_systems, dtype=np.int32)
    if n_systems and n:
        launch("gdi_solve_small", (n_systems,), (SOLVE_SMALL_THREADS,),
               (matrices, vectors, n_systems, n, solutions, pivots, status), defines=SOLVE_SMALL_DEFINES)
    return solutions, pivots, status


def solve_stamps(matrices, vectors, codes, basis, with_background, fit_failed):
    """Solve the stamp systems of a batch and form what the fit makes of them (``gdi_solve_stamps``).

    Parameters
    ----------
    matrices : ndarray of shape (N, P, P)
        float64 (converted if needed); ``P = n_basis + with_background <= SOLVE_SMALL_MAX_N``.
    vectors : ndarray of shape (N, P)
    codes : ndarray of int, shape (N,)
        Failure codes on entry (:class:`~gpudiffim.cellset.RejectReason`, 0 for none).
    basis : ndarray of shape (n_basis, kh, kw)
        Basis kernels (float64).
    with_background : bool
        The last unknown is the background.
    fit_failed : int
        Code of a failed solve of a stamp without a failure on entry.

    Returns
    -------
    outcome : ndarray of shape (N, 4 + n_basis)
        float64 rows ``(code, status, kernel sum, background, coefficients)``: the
        codes after the solve, the :func:`gpudiffim.linalg.solve_batch_status`
        status (``EIGENVECTOR``: rank-deficient, no solution here), and the
        coefficients, zero unless the code is 0 and the status ``LU``.
    kernels : ndarray of shape (N, kh, kw)
        Each stamp's kernel image ``sum_i a_i B_i``.
    background : ndarray of shape (N,)
        The fitted background (0 without one), C-contiguous.

    All three are in the inputs' array module.

    Raises
    ------
    ValueError
        For shapes that do not match or ``P`` above :data:`SOLVE_SMALL_MAX_N`.
    """
    _, xp = on_launcher(matrices, vectors, basis)
    matrices = prepare(xp, matrices, np.float64, 3, "matrices")
    vectors = prepare(xp, vectors, np.float64, 2, "vectors")
    codes = prepare(xp, codes, np.int32, 1, "codes")
    basis = prepare(xp, basis, np.float64, 3, "basis")
    n_systems, n = vectors.shape
    n_basis, kh, kw = basis.shape
    if (matrices.shape != (n_systems, n, n) or n > SOLVE_SMALL_MAX_N or codes.shape != (n_systems,)
            or n != n_basis + int(bool(with_background))):
        msg = (f"matrices {matrices.shape}, vectors {vectors.shape}, codes {codes.shape} and basis {basis.shape} "
               f"must be (N, P, P), (N, P), (N,) and (P - background, kh, kw) with P <= {SOLVE_SMALL_MAX_N}")
        raise ValueError(msg)
    outcome = xp.empty((n_systems, 4 + n_basis))
    kernels = xp.empty((n_systems, kh, kw))
    background = xp.empty(n_systems)
    if n_systems:
        launch("gdi_solve_stamps", (n_systems,), (SOLVE_SMALL_THREADS,),
               (matrices, vectors, codes, basis, n_systems, n_basis, int(bool(with_background)), kh * kw,
                int(fit_failed), outcome, kernels, background), defines=SOLVE_SMALL_DEFINES)
    return outcome, kernels, background
