"""Delta-function stamp fits without the design matrix (issue 13).

A delta-function basis kernel ``k = (r, c)`` (row-major, ``K x K`` kernel)
is 1 at ``[r, c]``, so its design column is a shifted window of the
template stamp, ``C_k(y, x) = T(y + r, x + c)`` for ``y, x`` in the fit
region (``F x F``; the stamp is ``S = F + K - 1`` wide).  With one weight
``w`` per stamp (``constant_variance_weighting``) the normal matrix

.. math:: M_{(r,c),(r',c')} = w \\sum_{y,x<F} T(y+r, x+c)\\, T(y+r', x+c')

needs no design product (``K^2 x F^2`` columns, ``2 K^4 F^2`` flop): with
the row products ``G_{p,p'} = R_p R_{p'}^T`` (``R_p[c, x] = T(p, c + x)``,
``K x F``) a block of ``M`` is a sum of ``F`` consecutive ``G`` along a
block diagonal, ``M_{(r,.),(r+d,.)} = w \\sum_{y<F} G_{y+r, y+r+d}``, a
product with a 0/1 window matrix.  Only the band ``0 <= d < K`` is formed
(``M`` is symmetric): 2.1e7 flop per stamp at the defaults (``K = 21``, ``F = 23``)
against 2.1e8 for the design product.
The background's column is a box sum of ``T``, the right-hand side a
cross-correlation of ``T`` with the science stamp.

The regularised systems ``(M + lambda H) a = b`` are symmetric positive
definite: each is solved by Cholesky, a few stamps at a time on the host
threads (BLAS on one thread each), with the regularised matrix never kept;
a system Cholesky cannot take (not finite, zero, not positive definite, or
a pivot below the rank test of :mod:`gpudiffim.linalg`) goes to
:func:`gpudiffim.linalg.solve_batch_status` as before.

Masked pixels: the stamp fit never looks at the masks (with constant
weighting every pixel of the fit region has the stamp's weight), so this
path computes exactly what the design product computes.  Per-pixel weights
(``constant_variance_weighting=False``) take the design path.
"""

from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import as_strided

from ._backend import host_map, single_threaded_blas
from ._lapack import cholesky_in_place, cholesky_solve
from .linalg import LU, deregularized, solve_batch_status

__all__ = ["DeltaFunctionForm", "delta_function_form", "delta_function_design", "delta_function_normal_equations",
           "delta_function_models", "DeltaFunctionFit", "fit_delta_function", "cholesky_block",
           "deregularized_with_factors"]

#: Stamps per block of host work (a block's systems, ~1.6 MB each at 21 x 21, stay in cache).
_BLOCK_STAMPS = 4


@dataclass(frozen=True)
class DeltaFunctionForm:
    """Marks a basis as the delta-function basis of ``width x width`` kernels (``k = row * width + col``).

    Attributes
    ----------
    width : int
        Kernel width (px, odd).
    """

    width: int


def delta_function_form(kernels):
    """:class:`DeltaFunctionForm` of a stack of kernels if it is the delta-function basis, else None.

    Parameters
    ----------
    kernels : ndarray of shape (n, kh, kw)
        Host kernels.

    Returns
    -------
    DeltaFunctionForm or None
        Only for ``n = kh * kw`` kernels equal to the identity, in row-major order.
    """
    kernels = np.asarray(kernels)
    n, height, width = kernels.shape
    if n != height * width or height != width:
        return None
    if not np.array_equal(kernels.reshape(n, n), np.eye(n)):
        return None
    return DeltaFunctionForm(width)


def _rows(template, kernel_width):
    """``R[n, p, c, x] = T[n, p, c + x]`` (N, S, K, F), contiguous: every row's ``K`` windows of width ``F``."""
    n, size, _ = template.shape
    fit = size - kernel_width + 1
    s0, s1, s2 = template.strides
    return np.ascontiguousarray(as_strided(template, (n, size, kernel_width, fit), (s0, s1, s2, s2)))


def _diagonal_sum(array, length, axis_p, axis_r):
    """``out[..., y, ...] = sum_r array[..., y + r, ..., r, ...]`` for ``y < length`` (a strided view summed).

    ``axis_p`` is the axis of ``y + r``, ``axis_r`` that of ``r``; the result
    has ``axis_p`` shortened to ``length`` and ``axis_r`` summed out.
    """
    shape, strides = list(array.shape), list(array.strides)
    shape[axis_p] = length
    strides[axis_r] += strides[axis_p]
    return as_strided(array, tuple(shape), tuple(strides)).sum(axis=axis_r)


def delta_function_design(template, kernel_width):
    """Design columns (N, K*K, F*F) of the delta-function basis: shifted windows of the template stamps.

    Equal to the valid correlations of the stamps with the delta-function
    kernels (the design of :mod:`gpudiffim.stamps`), copied without arithmetic.

    Parameters
    ----------
    template : ndarray of shape (N, S, S)
        Host template stamps.
    kernel_width : int
        ``K`` (odd); ``F = S - K + 1``.

    Returns
    -------
    ndarray of shape (N, K*K, F*F)
    """
    n, size, _ = template.shape
    k, fit = kernel_width, size - kernel_width + 1
    s0, s1, s2 = template.strides
    windows = as_strided(template, (n, k, k, fit, fit), (s0, s1, s2, s1, s2))
    return np.ascontiguousarray(windows).reshape(n, k * k, fit * fit)


def _box_sums(template, fit):
    """``out[n, r, c] = sum_{y, x < fit} T[n, y + r, x + c]`` (the background column), by cumulative sums."""
    n, size, _ = template.shape
    table = np.zeros((n, size + 1, size + 1))
    table[:, 1:, 1:] = template.cumsum(axis=1).cumsum(axis=2)
    return table[:, fit:, fit:] - table[:, :-fit, fit:] - table[:, fit:, :-fit] + table[:, :-fit, :-fit]


def _block_view(matrix, kernel_width, lag, lower):
    """View (N, K - lag, K, K) of the kernel blocks ``(r, r + lag)`` of ``matrix`` (N, P, P), or with
    ``lower`` their mirror ``(r + lag, r)`` transposed, so that both take the upper blocks' values."""
    k = kernel_width
    s0, s1, s2 = matrix.strides
    if lower:
        base, strides = matrix[:, lag * k:, :], (s0, k * (s1 + s2), s2, s1)
    else:
        base, strides = matrix[:, :, lag * k:], (s0, k * (s1 + s2), s1, s2)
    return as_strided(base, (matrix.shape[0], k - lag, k, k), strides)


def _kernel_blocks(rows, kernel_width, weight, out, both_triangles=True):
    """Write ``w sum_{y<F} G_{y+r, y+r+lag}`` into the kernel part of ``out`` (N, P, P).

    ``rows``: :func:`_rows` of the stamps; ``weight``: their weights ``w`` (N,).
    For each lag the band of row products ``G_{p, p+lag}`` (one batched
    product), then its window sums over ``F`` consecutive ``p`` (one product
    with a window matrix of 0 and ``w``, so that the weight costs no pass
    over the matrices).
    Without ``both_triangles`` only the upper triangle is written (the
    blocks on and above the block diagonal; the lower one is left as it was).
    """
    n, size, k, fit = rows.shape
    offsets = np.arange(size)[None, :] - np.arange(k)[:, None]
    windows = ((offsets >= 0) & (offsets < fit)) * weight[:, None, None]    # [n, r, p] = w_n for r <= p < r + F
    for lag in range(k):
        band = np.matmul(rows[:, :size - lag], rows[:, lag:].transpose(0, 1, 3, 2))   # (N, S - lag, K, K)
        blocks = np.matmul(windows[:, :k - lag, :size - lag], band.reshape(n, size - lag, k * k))
        blocks = blocks.reshape(n, k - lag, k, k)
        _block_view(out, k, lag, lower=False)[...] = blocks
        if both_triangles and lag:
            _block_view(out, k, lag, lower=True)[...] = blocks


def delta_function_normal_equations(template, target, weight, kernel_width, background, both_triangles=True):
    """Unregularised normal equations ``(M, b)`` of delta-function stamp fits with one weight per stamp.

    Equal (to rounding) to ``ops.stamp_normal_equations`` of
    :func:`delta_function_design`'s columns.

    Parameters
    ----------
    template : ndarray of shape (N, S, S)
        Host template stamps (float64).
    target : ndarray of shape (N, F*F)
        Science stamps on the fit region (float64).
    weight : ndarray of shape (N,)
        One weight per stamp (``1 / variance``).
    kernel_width : int
        ``K``; ``F = S - K + 1``.
    background : bool
        Add the background's column of ones (last unknown).
    both_triangles : bool
        Fill the whole matrix; else only its upper triangle (row <= column)
        is defined (the lower one holds whatever the memory held), which is
        all a Cholesky factorisation reads (the kernel band then costs ~20 % less).

    Returns
    -------
    matrix : ndarray of shape (N, P, P)
        Exactly symmetric; ``P = K^2 (+ 1)``.
    vector : ndarray of shape (N, P)
    """
    n, size, _ = template.shape
    k = kernel_width
    fit = size - k + 1
    p = k * k + int(bool(background))
    rows = _rows(template, k)
    matrix = np.empty((n, p, p))
    vector = np.empty((n, p))
    _kernel_blocks(rows, k, weight, matrix, both_triangles)
    science = target.reshape(n, fit, fit)
    products = np.matmul(rows.reshape(n, size * k, fit), science.transpose(0, 2, 1)).reshape(n, size, k, fit)
    vector[:, :k * k] = _diagonal_sum(products, k, axis_p=1, axis_r=3).reshape(n, k * k)
    if background:
        box = _box_sums(template, fit).reshape(n, k * k) * weight[:, None]
        matrix[:, :k * k, k * k] = matrix[:, k * k, :k * k] = box
        matrix[:, k * k, k * k] = fit * fit * weight
        vector[:, k * k] = target.sum(axis=1)
    vector *= weight[:, None]
    return matrix, vector


def delta_function_models(template, kernels):
    """``T * K`` (N, F, F) of each stamp under its own kernel image (N, K, K), without a design.

    ``out[y, x] = sum_{r, c} T[y + r, x + c] K[r, c]``, as the design columns times the coefficients.
    """
    k = kernels.shape[-1]
    rows = _rows(template, k)
    fit = rows.shape[-1]
    mixed = np.matmul(kernels[:, None], rows)                 # [n, p, r, x] = sum_c K[r, c] T[p, c + x]
    return _diagonal_sum(mixed, fit, axis_p=1, axis_r=2)


def cholesky_block(systems, vectors):
    """Cholesky solutions of a few systems (factored in place, upper triangles), and whether each passed.

    A system passes when its factorisation succeeds (positive definite),
    its pivots (the squared diagonal of the factor) are finite and pass the
    rank test of :mod:`gpudiffim.linalg` (``p > n eps p_max``), and its
    solution is finite; the others get zeros.  A NaN or inf in the upper
    triangle reaches the pivots, one in the vector the solution.
    """
    n = systems.shape[-1]
    solutions = np.zeros_like(vectors)
    passed = np.zeros(len(systems), dtype=bool)
    for index, (system, vector) in enumerate(zip(systems, vectors)):
        if cholesky_in_place(system, upper=True) != 0:
            continue
        pivots = np.diagonal(system) ** 2
        if not np.all(pivots > n * np.finfo(np.float64).eps * pivots.max()):
            continue
        solution = cholesky_solve(system, vector, upper=True)
        passed[index] = np.isfinite(solution).all()
        solutions[index] = solution
    return solutions, passed


class _PenaltyDiagonals:
    """``lambda H`` added to a stack of systems one non-zero diagonal of ``H`` at a time.

    ``H`` is a difference stencil: at the defaults 25 diagonals (13 on and
    above the main one) hold all of its non-zero values (5 % of ``H``).
    Adding along strided diagonal views costs ~0.01 ms per 442^2 system,
    against 0.13 ms for the same additions through a fancy index; each
    element gets ``m + lambda * h`` either way, the same value.

    Parameters
    ----------
    regularization : ndarray of shape (P, P)
        ``H``.
    """

    def __init__(self, regularization):
        penalty = np.asarray(regularization, dtype=np.float64)
        rows, columns = np.nonzero(penalty)
        self.diagonals = [(int(offset), np.diagonal(penalty, offset).copy())
                          for offset in np.unique(columns - rows)]

    def add(self, matrix, lambdas, upper=False):
        """``matrix += lambdas[:, None, None] * H`` in place (N, P, P); with ``upper``, only on and above
        the diagonal (what a Cholesky factorisation of the upper triangle reads)."""
        s0, s1, s2 = matrix.strides
        for offset, values in self.diagonals:
            if upper and offset < 0:
                continue
            base = matrix[:, :, offset:] if offset >= 0 else matrix[:, -offset:, :]
            diagonal = as_strided(base, (len(matrix), len(values)), (s0, s1 + s2))
            diagonal += lambdas[:, None] * values


@dataclass
class DeltaFunctionFit:
    """Solutions of a batch of delta-function stamp fits (host arrays).

    Attributes
    ----------
    matrix : ndarray of shape (N, P, P) or None
        Unregularised normal matrices (None unless asked for).
    vector : ndarray of shape (N, P)
    solutions : ndarray of shape (N, P)
        Zero where the solve failed.
    status : ndarray of int8, shape (N,)
        :func:`gpudiffim.linalg.solve_batch_status` codes (``LU`` where
        Cholesky solved the system).
    information : ndarray of shape (N,)
        ``tr(M)`` over the kernel unknowns.
    deregularized : ndarray of shape (N, K^2) or None
        The kernel coefficients after ``deregularization`` iterated-Tikhonov
        steps (:func:`deregularized_with_factors`; None without them).
    """

    matrix: np.ndarray
    vector: np.ndarray
    solutions: np.ndarray
    status: np.ndarray
    information: np.ndarray
    deregularized: np.ndarray = None


def deregularized_with_factors(factors, passed, coefficients, regularization, lambdas, steps):
    """Kernel coefficients after ``steps`` iterated-Tikhonov steps (:func:`gpudiffim.linalg.deregularized`), host.

    Parameters
    ----------
    factors : ndarray of shape (N, P, P)
        Cholesky factors of ``M + lambda H`` in their upper triangles
        (:func:`gpudiffim._lapack.cholesky_in_place` with ``upper``);
        ``P`` is the kernel unknowns ``n`` plus any background.
    passed : ndarray of bool, shape (N,)
        Whose factor is valid; the others keep ``coefficients``.
    coefficients : ndarray of shape (N, n)
        The regularised kernel coefficients ``x_0``.
    regularization : ndarray of shape (P, P)
        ``H`` (zero on the background's row and column).
    lambdas : ndarray of shape (N,)
    steps : int

    Returns
    -------
    ndarray of shape (N, n)
    """
    n, size = coefficients.shape[1], factors.shape[-1]
    valid = np.flatnonzero(passed)

    def solve(rhs):
        out = np.zeros_like(rhs)
        full = np.zeros(size)
        for k in valid:
            full[:n] = rhs[k]
            out[k] = cholesky_solve(factors[k], full, upper=True)[:n]
        return out

    return deregularized(solve, np.asarray(coefficients, dtype=np.float64),
                         np.asarray(regularization, dtype=np.float64)[:n, :n], np.asarray(lambdas), steps)


def fit_delta_function(template, target, weight, kernel_width, background, regularization=None, lambdas=None,
                       keep_matrix=True, deregularization=0):
    """Normal equations and regularised solutions of delta-function stamp fits, a few stamps at a time.

    Each block of :data:`_BLOCK_STAMPS` stamps is formed
    (:func:`delta_function_normal_equations`), regularised and solved on a
    host thread (BLAS on one thread), so that its systems stay in cache; the
    regularised matrices are not kept.

    Parameters
    ----------
    template, target, weight, kernel_width, background
        As :func:`delta_function_normal_equations` (host arrays).
    regularization : ndarray of shape (P, P), optional
        ``H``; the systems solved are ``(M + lambda H) a = b``.
    lambdas : callable, optional
        ``lambdas(M) -> lambda`` (one per system) of a block's unregularised matrices; with ``regularization``.
    keep_matrix : bool
        Return the unregularised matrices (the spatial fit of this basis needs them).
    deregularization : int
        With ``regularization``, also return the kernel coefficients after
        this many iterated-Tikhonov steps, made with each stamp's Cholesky
        factor (:attr:`DeltaFunctionFit.deregularized`; the stamps Cholesky
        cannot solve keep their solution).

    Returns
    -------
    DeltaFunctionFit
    """
    n = len(template)
    n_kernel = kernel_width**2
    p = n_kernel + int(bool(background))
    steps = deregularization if regularization is not None else 0
    fit = DeltaFunctionFit(np.empty((n, p, p)) if keep_matrix else None, np.empty((n, p)), np.empty((n, p)),
                           np.empty(n, dtype=np.int8), np.empty(n), np.empty((n, n_kernel)) if steps else None)

    penalty_diagonals = None if regularization is None else _PenaltyDiagonals(regularization)

    def systems(rows, both_triangles=True):
        """The unregularised systems of the stamps ``rows`` (a slice or indices), and their ``lambda``."""
        matrix, vector = delta_function_normal_equations(template[rows], target[rows], weight[rows], kernel_width,
                                                         background, both_triangles)
        penalty = lambdas(matrix) if regularization is not None else None
        return matrix, vector, penalty

    def regularize(matrix, penalty, upper=False):
        if penalty is not None:
            penalty_diagonals.add(matrix, penalty, upper)
        return matrix

    def block(start):
        rows = slice(start, min(start + _BLOCK_STAMPS, n))
        matrix, vector, penalty = systems(rows, both_triangles=keep_matrix)    # Cholesky reads the upper one
        fit.vector[rows] = vector
        fit.information[rows] = np.trace(matrix[:, :n_kernel, :n_kernel], axis1=1, axis2=2)
        if keep_matrix:
            fit.matrix[rows] = matrix
        solutions, passed = cholesky_block(regularize(matrix, penalty, upper=True), vector)
        status = np.full(len(matrix), np.int8(LU))
        failed = np.flatnonzero(~passed)
        if failed.size:     # as every other stamp fit: LU with the rank test, else the pseudo-inverse (formed again)
            again, _, _ = systems(start + failed)       # whole matrices
            again_penalty = None if penalty is None else penalty[failed]
            solutions[failed], status[failed] = solve_batch_status(regularize(again, again_penalty), vector[failed])
        fit.solutions[rows], fit.status[rows] = solutions, status
        if steps:       # the factors are in ``matrix``'s upper triangles
            fit.deregularized[rows] = deregularized_with_factors(matrix, passed, solutions[:, :n_kernel],
                                                                 regularization, penalty, steps)

    with single_threaded_blas():
        host_map(block, range(0, n, _BLOCK_STAMPS))
    return fit
