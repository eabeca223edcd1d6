"""Cholesky factor and solve of one symmetric system in place, without holding the GIL.

SciPy's Python wrappers of LAPACK (``scipy.linalg.lapack.dpotrf``) hold the
GIL while LAPACK runs, so host threads factoring different systems take
turns; ``numpy.linalg.cholesky`` releases it but copies its input twice and
ran at half the speed of ``dpotrf`` on the 442^2 delta-function systems.
Here the LAPACK routines SciPy exports to C (``scipy.linalg.cython_lapack``,
public API) are called through :mod:`ctypes`, which releases the GIL for
the duration of a foreign call: the systems factor in parallel on the host
threads, in place.  Where those pointers cannot be had, SciPy's wrappers
serve (same results, GIL held).

Conventions: a C-ordered (row-major) symmetric matrix is its own
transpose, so LAPACK's column-major ``uplo="U"`` reads and writes the
row-major *lower* triangle and ``uplo="L"`` the row-major *upper* one.
Either triangle may hold the matrix (``upper``); the factor is left in that
triangle (``A = L L^T`` with ``L`` in the lower one, or ``A = U^T U`` with
``U = L^T`` in the upper one), the other triangle untouched.  The two are
the same factor, but OpenBLAS (0.3.31, SkylakeX kernels, one thread)
factors the 442^2 delta-function systems in 0.91 ms from the upper
triangle against 1.14 ms from the lower one.
"""

import ctypes

import numpy as np

__all__ = ["cholesky_in_place", "cholesky_solve"]


def _lapack_function(name, *argtypes):
    """The C function ``name`` of ``scipy.linalg.cython_lapack`` as a :mod:`ctypes` function, or None."""
    try:
        from scipy.linalg import cython_lapack

        capsule = cython_lapack.__pyx_capi__[name]
        get_name = ctypes.pythonapi.PyCapsule_GetName
        get_name.restype, get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
        get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
        get_pointer.restype, get_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
        pointer = get_pointer(capsule, get_name(capsule))
    except (ImportError, AttributeError, KeyError, ValueError):    # pragma: no cover - unusual SciPy builds
        return None
    return ctypes.CFUNCTYPE(None, *argtypes)(pointer) if pointer else None


_INT = ctypes.POINTER(ctypes.c_int)
#: dpotrf(uplo, n, a, lda, info)
_DPOTRF = _lapack_function("dpotrf", ctypes.c_char_p, _INT, ctypes.c_void_p, _INT, _INT)
#: dpotrs(uplo, n, nrhs, a, lda, b, ldb, info)
_DPOTRS = _lapack_function("dpotrs", ctypes.c_char_p, _INT, _INT, ctypes.c_void_p, _INT, ctypes.c_void_p, _INT,
                           _INT)


def _check_square(matrix):
    if not (matrix.ndim == 2 and matrix.shape[0] == matrix.shape[1] and matrix.dtype == np.float64
            and matrix.flags.c_contiguous and matrix.flags.writeable):
        raise ValueError(f"expected a writable C-contiguous float64 square matrix, got {matrix.dtype} "
                         f"{matrix.shape}")


def _uplo(upper):
    """LAPACK's ``uplo`` (column-major) of the row-major ``upper`` or lower triangle."""
    return b"L" if upper else b"U"


def cholesky_in_place(matrix, upper=False):
    """Factor a symmetric positive definite matrix ``A = L L^T`` in place (one triangle).

    Parameters
    ----------
    matrix : ndarray of shape (n, n)
        C-contiguous float64; only its lower triangle is read (with
        ``upper``, its upper triangle).  On return that triangle holds
        ``L`` (with ``upper``, ``L^T``); the other triangle is unchanged.
    upper : bool
        Read and factor the upper triangle (row <= column) instead of the
        lower one: the faster of the two (see the module's notes).

    Returns
    -------
    int
        LAPACK's ``info``: 0 on success, ``k > 0`` when the leading minor
        of order ``k`` is not positive definite (the factor is then partial).
    """
    _check_square(matrix)
    n = matrix.shape[0]
    if _DPOTRF is None:     # pragma: no cover - SciPy's wrapper (holds the GIL); its transpose is Fortran-ordered
        from scipy.linalg import lapack

        _, info = lapack.dpotrf(matrix.T, lower=int(upper), clean=0, overwrite_a=1)
        return int(info)
    size, info = ctypes.c_int(n), ctypes.c_int(0)
    _DPOTRF(_uplo(upper), ctypes.byref(size), matrix.ctypes.data, ctypes.byref(size), ctypes.byref(info))
    return info.value


def cholesky_solve(factor, vector, upper=False):
    """Solve ``A x = b`` given the factor of :func:`cholesky_in_place`.

    Parameters
    ----------
    factor : ndarray of shape (n, n)
        The factored matrix (``L`` in its lower triangle, or with ``upper``
        ``L^T`` in its upper one), C-contiguous float64.
    vector : ndarray of shape (n,)
        ``b``; not modified.
    upper : bool
        The factor is in the upper triangle (as :func:`cholesky_in_place` left it with ``upper``).

    Returns
    -------
    ndarray of shape (n,)
        ``x`` (float64).
    """
    _check_square(factor)
    solution = np.array(vector, dtype=np.float64, copy=True)
    if solution.shape != factor.shape[:1]:
        raise ValueError(f"vector of shape {solution.shape} does not match a {factor.shape} factor")
    if _DPOTRS is None:     # pragma: no cover
        from scipy.linalg import lapack

        solution, _ = lapack.dpotrs(factor.T, solution, lower=int(upper))
        return solution
    size, one, info = ctypes.c_int(factor.shape[0]), ctypes.c_int(1), ctypes.c_int(0)
    _DPOTRS(_uplo(upper), ctypes.byref(size), ctypes.byref(one), factor.ctypes.data, ctypes.byref(size),
            solution.ctypes.data, ctypes.byref(size), ctypes.byref(info))
    if info.value != 0:     # pragma: no cover - only for invalid arguments, which the checks exclude
        raise ValueError(f"LAPACK dpotrs rejected its arguments (info {info.value})")
    return solution
