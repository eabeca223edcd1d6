"""The operations layer: the one place that decides where each hot operation runs.

An algorithm module (:mod:`~gpudiffim.stamps`, :mod:`~gpudiffim.apply`,
:mod:`~gpudiffim.spatial_fit`, :mod:`~gpudiffim.warp`,
:mod:`~gpudiffim.candidates`) asks :func:`operations_for` once per solve
(:mod:`~gpudiffim.solve` passes its choice to every stamp fit, residual pass
and spatial system), application, warp or background, from the arrays it
works on, and then calls the returned object's methods.  Both
implementations offer the same methods with the same data contracts (shapes,
dtypes, array module of the results):

* :data:`NUMPY` -- the NumPy/SciPy reference;
* :data:`KERNELS` -- the CUDA kernels of ``kernels/*.cu`` through the
  :mod:`gpudiffim._cuda` host wrappers.  Whether those run on the GPU (CuPy
  arrays) or on the CPU emulator (NumPy arrays under the ``cuda-emulator``
  backend) is decided by :func:`gpudiffim._cuda.launch.launcher_for`, from
  the arrays, not here.

No algorithm module imports :mod:`gpudiffim._cuda` or asks
:func:`~gpudiffim._backend.on_kernel_path` itself; this module is the only
one that does (checked by ``tests/test_layering.py``).

=================================  ==============================================================
method                             contract
=================================  ==============================================================
``correlate_stamps``               valid-region correlation of stamps (N, S, S) with kernels:
                                   (N, K, F, F), or (N, F, F) with ``per_stamp``; kernels may come
                                   in separable form too (used by the host)
``stamp_normal_equations``         ``M = C^T W C`` (N, P, P), ``b = C^T W y`` (N, P) for the basis
                                   columns ``C`` (N, n_basis, n_pix) and, when fitted, the
                                   background's column of ones, implicit on every path
``solve_systems``                  ``(solutions, status)`` of (N, P, P) symmetric systems: LAPACK, or
                                   ``gdi_solve_small`` (one launch) on the GPU with no read-back
``solve_systems_deferred``         the same, but on the GPU the rank-deficient systems are left
                                   unsolved (zeros) for the caller, with a host flag saying so
``delta_function_normal_equations``  ``(M, b)`` of delta-function stamp fits with one weight per stamp, from
                                   the stamps without a design matrix
``constant_weights``               one inverse-variance weight per stamp (the median's) and zero codes
``solve_stamps``                   a batch's stamp systems solved, with the codes, kernel images, sums
                                   and backgrounds the fit makes of them (one launch on the GPU)
``dilated_bad_pixels``             bool (N, F, F): a ``bad_bits`` pixel under the kernel box
``or_box``                         every bit of an integer or boolean plane (or stack) OR-ed over a box
``residual_sums``                  (N, 3) residual sums of stamps where they live (no read-back)
``cut_stamp_planes``               a batch's six stamp stacks (float64 images, int32 masks) and its
                                   int32 centres, where the planes live
``spatial_terms``                  a spatial function's terms at such centres, where they live
``difference_stamps``              ``(D, V, M)`` of stamps under per-stamp kernels and backgrounds
``stamp_residuals``                their (N, 3) sums [and D/sigma rows]; fused into one launch
                                   on the kernel path (``gdi_stamp_residuals``)
``bin_medians``                    per-bin medians of a background (an image or a stack of bands)
``masked_quantiles``               quantiles, median and count of the selected values of each row
``sky_quartiles``                  quartiles and count of D/sigma on each image's sky (the variance correction)
``sources_beyond``                 pixels of bands beyond a number of the bands' robust sigmas
``band_rows``                      row windows of planes, stacked (the sampled bands of the noise measurements)
``sky_value_planes``               the noise-correlation planes of sky bands (values and weights)
``subtract_sky_mean``              their weighted mean removed, in place
``correlation_near``               the near lags of correlations, and a few values, for one read-back
``accumulate_term``                ``out += outer(rows, cols) * term`` in place (image application)
``weighted_correlations``          ``sum_t outer(rows_t, cols_t) * (image * K_t)`` of a band: tiles term by
                                   term (reference), or batched transforms and one fused accumulation
                                   (``weighted_correlations_of``: of several planes at once)
``propagate_mask``                 every mask bit OR-ed over the kernel footprint
``spatial_normal_equations``       host ``(M, b)`` of the spatial system from sparse maps
``warp_resample``                  Lanczos-3 image, variance, mask of a warp's target grid
``detection_residual``             the residual of the bin-median background and the detections, fused
                                   (kernel path; None on the reference: the caller's row-block steps)
``interpolated_background``        the bin-median background of an image or a stack, fused (kernel path;
                                   None on the reference: the caller's steps)
``footprint_stats``                (7, n) uint64 per-footprint reductions of a labelled residual
``rated_sigmas``                   host ratings of every star and adaptive sigmas of the best rated
``stamps_flagged``                 host bool (n,): a bad bit of either mask in each stamp
=================================  ==============================================================
"""

import numpy as np
import scipy.ndimage as ndi

from ._backend import array_module_of, host_map, index_dtype, is_device_array, on_kernel_path, to_host
from ._resample import resample_reference
from .convolve import (
    FourierCorrelator,
    TiledCorrelator,
    correlate_stamps,
    correlate_stamps_each,
    correlate_stamps_separable,
)
from .cutouts import cut_planes, footprint_stats, stamps_flagged
from .delta_function import cholesky_block, delta_function_normal_equations, deregularized_with_factors
from .errors import SingularSystemError
from .fwhm import rated_sigmas
from .linalg import EIGENVECTOR, LU, NOT_FINITE_SOLUTION, deregularized, pseudo_inverse_solve_batch, solve_batch_status
from .spatial import GridFactors
from .statistics import (
    beyond_robust_level,
    bin_medians_loop,
    bin_medians_sorted,
    masked_quantiles,
    near_lags,
    normalised_sky_values,
    residual_sums,
    sky_value_planes,
    subtract_sky_mean,
    usable_normalised_residual,
)

__all__ = ["KERNELS", "NUMPY", "operations_for"]


def operations_for(*arrays):
    """:data:`KERNELS` when any of ``arrays`` takes the kernel path, else :data:`NUMPY`.

    See :func:`gpudiffim._backend.on_kernel_path`: CuPy arrays, and NumPy
    arrays under the ``cuda-emulator`` backend, take the kernel path.
    """
    return KERNELS if any(on_kernel_path(array) for array in arrays) else NUMPY


def _probe(n):
    """Fixed, irregular projection vector of length ``n`` for :func:`_distinct_columns`."""
    return np.cos(np.arange(n) * 0.7548776662466927 + 0.5)


def _distinct_columns(array):
    """``(distinct, index)`` with ``array == distinct[:, index]``, exactly.

    Columns are told apart by a fixed projection (fast), checked exactly; on
    a projection collision, ``np.unique(axis=1)`` (slow: it sorts whole columns).
    """
    # an elementwise product summed down axis 0 adds every column in the same order,
    # so equal columns get bitwise equal keys (a BLAS product does not promise that)
    keys = (_probe(array.shape[0])[:, None] * array).sum(axis=0)
    _, first, index = np.unique(keys, return_index=True, return_inverse=True)
    distinct = array[:, first]
    if not np.array_equal(distinct[:, index], array, equal_nan=True):
        distinct, index = np.unique(array, axis=1, return_inverse=True)
    return distinct, index.reshape(-1)


#: Largest system size whose pseudo-inverse solution the device computes for every system
#: (a batched eigen-decomposition, no branch on the data); above it, only for the rank-deficient
#: ones, which costs a synchronisation.
_DEVICE_EIGEN_ALWAYS = 64


def _solve_device(matrices, vectors, usable):
    """cuBLAS batched LU of every system (unusable ones replaced by the identity); no synchronisation.

    The pseudo-inverse solutions of rank-deficient systems come from one
    batched eigen-decomposition of every system when ``n`` is at most
    :data:`_DEVICE_EIGEN_ALWAYS`, else from one of the rank-deficient ones
    only (after one synchronisation to find them).
    """
    xp = array_module_of(matrices)
    n = matrices.shape[-1]
    safe = xp.where(usable[:, None, None], matrices, xp.eye(n, dtype=np.float64))
    rhs = xp.where(usable[:, None], vectors, 0.0)
    solved, pivots = _lu_batch_cublas(safe, rhs)
    eps = n * np.finfo(np.float64).eps
    full_rank = usable & xp.all(pivots > eps * pivots.max(axis=1, keepdims=True), axis=1)
    if n <= _DEVICE_EIGEN_ALWAYS:
        return xp.where(full_rank[:, None], solved, pseudo_inverse_solve_batch(safe, rhs)), full_rank
    deficient = np.flatnonzero(to_host(usable & ~full_rank))
    if deficient.size:
        where = xp.asarray(deficient)
        solved[where] = pseudo_inverse_solve_batch(safe[where], rhs[where])
    return solved, full_rank


def _pseudo_inverse_fallback(matrices, vectors, solutions, status):
    """``gdi_solve_small``'s ``(solutions, status)`` with the pseudo-inverse solutions of its rank-deficient
    (``EIGENVECTOR``) systems, from one batched eigen-decomposition of the stack (no synchronisation)."""
    xp = array_module_of(matrices)
    deficient = status == EIGENVECTOR
    safe = xp.where(deficient[:, None, None], matrices, xp.eye(matrices.shape[-1]))
    pseudo = pseudo_inverse_solve_batch(safe, xp.where(deficient[:, None], vectors, 0.0))
    solutions = xp.where(deficient[:, None], pseudo, solutions)
    bad = deficient & ~xp.isfinite(solutions).all(axis=1)
    status = xp.where(bad, np.int8(NOT_FINITE_SOLUTION), status)
    return xp.where(bad[:, None], 0.0, solutions), status


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
    a_ptrs, b_ptrs = _batch_pointers(lu), _batch_pointers(rhs)
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


def _batch_pointers(stack):
    """Device array of the addresses of each item of a C-contiguous CuPy stack (a batched routine's
    pointer array)."""
    import cupy

    step = stack.strides[0]
    return cupy.arange(stack.data.ptr, stack.data.ptr + step * len(stack), step, dtype=cupy.uintp)


def _cholesky_device(matrices, vectors, overwrite=False):
    """cuSOLVER batched Cholesky (``potrfBatched``, ``potrsBatched``) of symmetric systems; no synchronisation.

    Reads each matrix's row-major lower triangle (column-major ``uplo = U``),
    as the host's :func:`gpudiffim._lapack.cholesky_in_place`, on a copy
    (with ``overwrite``, in place when C-contiguous float64: the factors are then left in it).
    Returns ``(solutions, passed, factors)``: a system passes when the factorisation
    succeeds (``info = 0``), its pivots (the squared diagonal of the factor)
    pass the rank test of :mod:`gpudiffim.linalg` (``p > n eps p_max``, so a
    NaN fails) and its solution is finite, as on the host
    (:mod:`gpudiffim.delta_function`); the others' solutions are zero.  The
    factors (in each matrix's row-major upper triangle) serve
    :func:`_cholesky_solve_device`.
    """
    import cupy
    from cupy_backends.cuda.libs import cublas, cusolver

    batch, n = matrices.shape[0], matrices.shape[-1]
    if overwrite:
        factor = cupy.ascontiguousarray(matrices, dtype=np.float64)
    else:
        factor = cupy.array(matrices, dtype=np.float64, order="C")
    rhs = cupy.array(vectors, dtype=np.float64, order="C")
    handle = cupy.cuda.device.get_cusolver_handle()
    a_ptrs, b_ptrs = _batch_pointers(factor), _batch_pointers(rhs)
    info, solve_info = cupy.empty(batch, dtype=np.int32), cupy.empty(1, dtype=np.int32)
    upper = cublas.CUBLAS_FILL_MODE_UPPER
    cusolver.dpotrfBatched(handle, upper, n, a_ptrs.data.ptr, n, info.data.ptr, batch)
    cusolver.dpotrsBatched(handle, upper, n, 1, a_ptrs.data.ptr, n, b_ptrs.data.ptr, n, solve_info.data.ptr, batch)
    pivots = cupy.diagonal(factor, axis1=1, axis2=2) ** 2
    ranked = cupy.all(pivots > n * np.finfo(np.float64).eps * pivots.max(axis=1, keepdims=True), axis=1)
    passed = (info == 0) & ranked & cupy.isfinite(rhs).all(axis=1)
    return cupy.where(passed[:, None], rhs, 0.0), passed, factor


def _cholesky_solve_device(factors, rhs):
    """``potrsBatched`` with the factors of :func:`_cholesky_device`: the solutions (N, n) of a stack of
    right-hand sides (N, n), one per system; no synchronisation."""
    import cupy
    from cupy_backends.cuda.libs import cublas, cusolver

    batch, n = factors.shape[0], factors.shape[-1]
    solution = cupy.array(rhs, dtype=np.float64, order="C")
    handle = cupy.cuda.device.get_cusolver_handle()
    solve_info = cupy.empty(1, dtype=np.int32)
    a_ptrs, b_ptrs = _batch_pointers(factors), _batch_pointers(solution)    # held until the solve has read them
    cusolver.dpotrsBatched(handle, cublas.CUBLAS_FILL_MODE_UPPER, n, 1, a_ptrs.data.ptr, n, b_ptrs.data.ptr, n,
                           solve_info.data.ptr, batch)
    return solution


def _deregularized_device(factors, passed, coefficients, regularization, lambdas, steps):
    """:func:`gpudiffim.delta_function.deregularized_with_factors` on the device (batched solves)."""
    xp = array_module_of(factors)
    n, size = coefficients.shape[1], factors.shape[-1]

    def solve(rhs):
        full = xp.zeros((len(rhs), size))
        full[:, :n] = rhs
        return xp.where(passed[:, None], _cholesky_solve_device(factors, full)[:, :n], 0.0)

    return deregularized(solve, coefficients, regularization[:n, :n], lambdas, steps)


#: Terms transformed together on the kernel path, at most.
TERMS_PER_BATCH = 8
#: Device memory of one batch of term transforms (product spectra and inverse transforms), at most:
#: 4 float32 terms of a 4096^2 band (8 took 1.1 GB, and the stage peaked near 2 GB before cuFFT's
#: workspace); a 2048^2 band still takes 8.
TERM_BATCH_BYTES = 600_000_000


def _part(array, rows):
    """``array[rows]`` (a slice along the first axis), or ``array`` itself when the slice covers it
    (a device slice is a CuPy call)."""
    if rows.start == 0 and (rows.stop is None or rows.stop >= len(array)):
        return array
    return array[rows]


def _or_window(array, axis, half):
    """OR of ``array`` over ``[i - half, i + half]`` along ``axis`` (zeros beyond the ends)."""
    width = 2 * half + 1
    padding = [(0, 0)] * array.ndim
    padding[axis] = (half, half)
    window = np.pad(array, padding)
    span = 1
    while 2 * span <= width:       # window[j] = OR over [j, j + span) of the padded array
        length = window.shape[axis] - span
        window = _take(window, axis, 0, length) | _take(window, axis, span, span + length)
        span *= 2
    n = array.shape[axis]
    # [i - half, i + half] is the union of [i - half, i - half + span) and [i + half + 1 - span, i + half + 1)
    return _take(window, axis, 0, n) | _take(window, axis, width - span, width - span + n)


def _take(array, axis, start, stop):
    """``array[..., start:stop, ...]`` along ``axis`` (a view)."""
    index = [slice(None)] * array.ndim
    index[axis] = slice(start, stop)
    return array[tuple(index)]


def _factors_of_terms(xp, factors, used, dtype):
    """``(rows (len(used), M), cols (len(used), N))`` of the terms ``used``, in ``xp`` and ``dtype``.

    :class:`~gpudiffim.spatial.GridFactors` are built where the image lives
    (``gdi_spatial_powers``: two launches and two gathers, nothing uploaded
    but the terms' exponents); other factor sequences (host arrays) are
    stacked on the host and moved.
    """
    from ._cuda import image_apply

    if not used:
        return None, None
    if isinstance(factors, GridFactors):
        function = factors.function
        y_powers = image_apply.spatial_powers(xp, factors.y0, factors.rows, function.order,
                                              function.axis_scaling(0), dtype)
        x_powers = image_apply.spatial_powers(xp, factors.x0, factors.columns, function.order,
                                              function.axis_scaling(1), dtype)
        x_exponents, y_exponents = zip(*(factors.exponents[k] for k in used))
        return y_powers[list(y_exponents)], x_powers[list(x_exponents)]
    rows = xp.asarray(np.stack([factors[k][0] for k in used]).astype(dtype))
    cols = xp.asarray(np.stack([factors[k][1] for k in used]).astype(dtype))
    return rows, cols


#: Most input pixels of one band of the full-image application on the host (bounds the temporaries:
#: about 14 bytes per pixel in float32).
HOST_BAND_PIXELS = 1 << 23
#: The same on the kernel path: a 4096² image (and its halo) in one band, since each band repeats
#: the application's ~50 device calls; the batched transforms then take about 1.1 GB of GPU memory
#: in float32 (8 terms x 2 padded planes of 4 bytes per pixel).
DEVICE_BAND_PIXELS = 1 << 25


class NumpyOperations:
    """The NumPy/SciPy reference of every operation (host arrays in, host arrays out)."""

    name = "numpy"
    #: Band limit of the full-image application (``gpudiffim.apply.convolve_masked_image``).
    max_band_pixels = HOST_BAND_PIXELS

    def correlate_stamps(self, stamps, kernels, per_stamp=False, separable=None):
        """Valid-region correlations: ``per_stamp``, stamp ``n`` with kernel ``n`` (N, F, F);
        else every stamp with every kernel (N, K, F, F).  Batched FFT products, or products of
        1-D correlations when ``separable`` (:class:`~gpudiffim.basis.SeparableBasis`) gives the
        kernels in separable form (twice as fast at the defaults)."""
        if separable is not None and not per_stamp:
            return correlate_stamps_separable(stamps, separable)
        return (correlate_stamps_each if per_stamp else correlate_stamps)(stamps, kernels)

    def stamp_normal_equations(self, columns, target, weights, background):
        """``M = C^T W C`` (N, P, P) and ``b = C^T W y`` (N, P) per stamp.

        ``columns`` (N, n_basis, n_pix) are the basis columns; with
        ``background`` a column of ones follows them (``P = n_basis + 1``),
        implicit on every path (never stored: its products are the weighted
        sums); ``target`` (N, n_pix); ``weights`` (N, n_pix), or (N, 1, 1) for
        one weight per stamp (``constant_variance_weighting``), which then
        multiplies the unweighted products.
        """
        n, n_basis, n_pix = columns.shape
        columns = np.ascontiguousarray(columns)   # (a no-op for the fit's design; a strided view would miss BLAS)
        per_stamp = weights.size == n
        weights = weights.reshape(n, -1)
        weighted = columns if per_stamp else columns * weights[:, None, :]
        p = n_basis + int(bool(background))
        matrix = np.empty((n, p, p))
        vector = np.empty((n, p))
        matrix[:, :n_basis, :n_basis] = weighted @ columns.transpose(0, 2, 1)
        vector[:, :n_basis] = (weighted @ target[:, :, None])[:, :, 0]
        if background:
            matrix[:, :n_basis, n_basis] = matrix[:, n_basis, :n_basis] = weighted.sum(axis=2)
            matrix[:, n_basis, n_basis] = n_pix if per_stamp else weights.sum(axis=1)
            vector[:, n_basis] = target.sum(axis=1) if per_stamp else np.einsum("nk,nk->n", weights, target)
        if per_stamp:
            matrix *= weights[:, :, None]
            vector *= weights
        return matrix, vector

    def delta_function_normal_equations(self, template, science, weights, kernel_width, background):
        """``(M, b)`` of delta-function stamp fits, (N, P, P) and (N, P), ``P = K^2 (+ 1)``, from the
        template and science stamps (N, S, S) and one weight per stamp (N,)
        (:func:`gpudiffim.delta_function.delta_function_normal_equations` on the science fit region)."""
        h = kernel_width // 2
        target = science[:, h:science.shape[1] - h, h:science.shape[2] - h].reshape(len(science), -1)
        return delta_function_normal_equations(template, target, weights.reshape(-1), kernel_width, background)

    def constant_weights(self, science_variance, template_variance):
        """One weight per stamp, ``1 / median(V_S + V_T)`` (1 where that is not positive), and zero int32
        failure codes, of (N, S, S) variance stamps, where they live."""
        xp = array_module_of(science_variance)
        total = science_variance + template_variance
        level = xp.median(total.reshape(len(total), -1), axis=1)
        return 1.0 / xp.where(level > 0, level, 1.0), xp.zeros(len(total), dtype=np.int32)

    def solve_systems(self, matrices, vectors):
        """``(solutions, status)`` of a stack of small symmetric systems (:func:`gpudiffim.linalg.solve_batch_status`):
        LAPACK per system, the pseudo-inverse for rank-deficient ones."""
        return solve_batch_status(matrices, vectors)

    def solve_systems_deferred(self, matrices, vectors):
        """``(solutions, status, deferred)``: :meth:`solve_systems`, every system solved (``deferred`` False)."""
        return (*self.solve_systems(matrices, vectors), False)

    def solve_stamps(self, matrices, vectors, codes, basis, with_background, fit_failed, defer=False,
                     overwrite=False, deregularize=None):
        """The stamp systems of a batch solved, and what the fit makes of the solutions.

        ``codes`` (N,) are the stamps' failure codes on entry (0 for none); a failed solve of a
        stamp without one gets ``fit_failed``.  The solutions of failed stamps are zero.  With
        ``defer``, :meth:`solve_systems_deferred` solves.  Returns ``(outcome, kernels,
        background, deferred)``: float64 rows ``(code, status, kernel sum, background,
        coefficients)`` (N, 4 + n_basis), the kernel images ``sum_i a_i B_i`` of ``basis``
        (n_basis, kh, kw) as (N, kh, kw), the backgrounds (N,) (0 without ``with_background``)
        and the flag of :meth:`solve_systems_deferred`, in the systems' array module.
        ``overwrite``: the caller leaves ``matrices`` to the solve (the device may factor them in
        place, saving a copy of the stack); here they are only read.  ``deregularize``, a tuple
        ``(H, lambdas, steps)`` of the regularised systems ``M + lambda H``: a fifth element, the
        kernel coefficients (N, n_basis) after that many iterated-Tikhonov steps with each
        system's Cholesky factor (:func:`gpudiffim.delta_function.deregularized_with_factors`;
        the systems Cholesky cannot factor keep their coefficients).
        """
        solutions, status, deferred = (self.solve_systems_deferred(matrices, vectors) if defer
                                       else (*self.solve_systems(matrices, vectors), False))
        result = (*self.stamp_outcome(solutions, status, codes, basis, with_background, fit_failed), deferred)
        if deregularize is None:
            return result
        return (*result, self._deregularized(matrices, vectors, result[0][:, 4:], *deregularize))

    @staticmethod
    def _deregularized(matrices, vectors, coefficients, regularization, lambdas, steps):
        """The host reference of ``solve_stamps``' ``deregularize``: each system factored again (a copy)."""
        xp = array_module_of(coefficients)
        factors = np.array(to_host(matrices), dtype=np.float64, order="C")
        _, passed = cholesky_block(factors, to_host(vectors))
        return xp.asarray(deregularized_with_factors(factors, passed, to_host(coefficients),
                                                     to_host(regularization), to_host(lambdas), steps))

    def stamp_outcome(self, solutions, status, codes, basis, with_background, fit_failed):
        """``(outcome, kernels, background)`` of :meth:`solve_stamps` from solved systems (N, P) and
        their ``solve_batch_status`` codes: a failed solve of a stamp without a code gets ``fit_failed``,
        and every failed stamp's solution is zero."""
        xp = array_module_of(solutions)
        pending = codes == 0
        codes = xp.where(pending & (status > EIGENVECTOR), np.int8(fit_failed), codes).astype(np.int8)
        solutions = xp.where((codes == 0)[:, None], solutions, 0.0)
        coefficients = solutions[:, :len(basis)]
        background = solutions[:, len(basis)] if with_background else xp.zeros(len(solutions))
        kernel_sum = coefficients @ basis.sum(axis=(1, 2))
        outcome = xp.concatenate([xp.stack([codes, status, kernel_sum, background], axis=1), coefficients], axis=1)
        return outcome, xp.tensordot(coefficients, basis, axes=1), background

    def dilated_bad_pixels(self, mask, bad_bits, half_width):
        """Pixels of the fit region (N, S - 2h, S - 2h) whose kernel box holds a ``bad_bits`` pixel."""
        h = half_width
        flagged = (mask & bad_bits) != 0
        if not flagged.any():
            return np.zeros((mask.shape[0], mask.shape[1] - 2 * h, mask.shape[2] - 2 * h), dtype=bool)
        return self.or_box(flagged, h, h)[:, h:mask.shape[1] - h, h:mask.shape[2] - h]

    def or_box(self, mask, half_y, half_x):
        """``out[..., y, x]`` = OR of ``mask[..., y + v, x + u]`` over ``|v| <= half_y``, ``|u| <= half_x``
        inside the plane (zeros beyond), for a (..., M, N) integer or boolean array, every bit at once:
        along each axis, ORs of windows doubled in width (``log2`` steps), then two overlapping windows
        (a few times faster than ``scipy.ndimage.maximum_filter`` on 0/1 planes)."""
        out = np.array(mask, copy=True)
        if not out.any():
            return out
        for axis, half in ((-2, half_y), (-1, half_x)):
            if half > 0:
                out = _or_window(out, axis % out.ndim, half)
        return out

    def cut_stamp_planes(self, template, science, centres_rc, half_size, device_centres=None):
        """``(planes, centres)`` of a batch: the six stamp stacks ``(template, science,
        template_variance, science_variance, template_mask, science_mask)``, float64 images and
        variances, int32 masks, (N, S, S), and the int32 (N, 2) centres they were cut at, all where
        the planes live.  ``template`` and ``science`` are MaskedImages of one grid; ``centres_rc``
        host ``(row, column)`` centres, every stamp inside (else ValueError); ``device_centres``, the same
        where the planes live if there already (kernel path)."""
        planes = cut_planes((template.image, science.image, template.variance, science.variance,
                             template.mask, science.mask), centres_rc, half_size)
        dtypes = (np.float64,) * 4 + (np.int32,) * 2
        centres = np.asarray(centres_rc, dtype=np.int32).reshape(-1, 2)
        return tuple(plane.astype(dtype, copy=False) for plane, dtype in zip(planes, dtypes)), centres

    def spatial_terms(self, function, centres_rc, origin):
        """Every term of the :class:`~gpudiffim.spatial.SpatialFunction` ``function`` at integer centres.

        Parameters
        ----------
        function : SpatialFunction
        centres_rc : ndarray of int, shape (N, 2)
            ``(row, column)`` centres relative to the images' first pixel, as
            :meth:`cut_stamp_planes` returns them.
        origin : tuple of int
            Parent ``(x0, y0)`` of that pixel.

        Returns
        -------
        ndarray of float64, shape (N, n_terms)
            ``function.terms`` at parent ``(x0 + column, y0 + row)``, in the
            centres' array module.
        """
        centres_rc = np.asarray(centres_rc).reshape(-1, 2)
        return function.terms((origin[0] + centres_rc[:, 1]).astype(np.float64),
                              (origin[1] + centres_rc[:, 0]).astype(np.float64))

    def difference_stamps(self, stamps, kernels, background, bad_bits, model=None):
        """``(D, V, M)`` (N, F, F) of the six stamp stacks under per-stamp kernels (N, kh, kw) and backgrounds.

        ``D = S - (T * K + bg)`` on the fit region, ``V = V_S + sum K^2 V_T``,
        ``M`` the science mask plus ``bad_bits`` where a ``bad_bits`` template
        pixel lies under the kernel box (see :func:`gpudiffim.stamps.difference_stamps`).
        ``model``, if given, is ``T * K`` (N, F, F) already (the design
        columns times the fitted coefficients), which saves a correlation.
        """
        template, science, template_variance, science_variance, template_mask, science_mask = stamps
        h = kernels.shape[1] // 2
        xp = array_module_of(science)
        kernels = xp.asarray(kernels, dtype=np.float64)
        background = xp.asarray(background, dtype=np.float64)
        inner = (slice(None), slice(h, science.shape[1] - h), slice(h, science.shape[2] - h))
        if model is None:
            model = self.correlate_stamps(template, kernels, per_stamp=True)
        model = model + background[:, None, None]
        difference = science[inner] - model
        variance = science_variance[inner] + self.correlate_stamps(template_variance, kernels**2, per_stamp=True)
        template_bad = self.dilated_bad_pixels(template_mask, bad_bits, h)
        mask = science_mask[inner] | xp.where(template_bad, np.int32(bad_bits), 0)
        return difference, variance, mask.astype(np.int32, copy=False)

    #: Whether :meth:`stamp_residuals` uses a ``model`` given to it (the kernel path's fused kernel
    #: computes its own, so the fit does not form one there).
    uses_fitted_models = True
    #: Whether delta-function stamps with one weight per stamp are fitted whole by
    #: :func:`gpudiffim.delta_function.fit_delta_function` (host blocks, Cholesky), and their design
    #: (per-pixel weights) copied as shifted windows; the kernel path forms their normal equations
    #: by :meth:`delta_function_normal_equations` and solves them as any stamp system.
    fits_delta_functions_directly = True

    def stamp_residuals(self, stamps, kernels, background, bad_bits, core_radius=None, rows=False, model=None):
        """(N, 3) residual sums of :meth:`difference_stamps` (and, with ``rows``, D/sigma rows (N, F*F), NaN
        where unusable), where the stamps live."""
        difference, variance, mask = self.difference_stamps(stamps, kernels, background, bad_bits, model)
        sums = self.residual_sums(difference, variance, mask, bad_bits, core_radius)
        if not rows:
            return sums
        z, _ = usable_normalised_residual(difference, variance, mask, bad_bits, fill=np.nan)
        return sums, z.reshape(len(z), -1)

    def residual_sums(self, difference, variance, mask, bad_bits, core_radius=None):
        """(N, 3) float64 count, sum z, sum z^2 of the stamps, where they live
        (:func:`~gpudiffim.statistics.residual_sums`)."""
        return residual_sums(difference, variance, mask, bad_bits, core_radius)

    def bin_medians(self, image, keep, edges_y, edges_x):
        """Host grid (n_y, n_x) of ``np.median`` of each bin's kept pixels (NaN for empty bins or a NaN),
        or (B, n_y, n_x) for a stack of images (B, M, N) binned alike.

        ``keep`` is a boolean plane (or stack) or None (every pixel); the bin
        edges are row and column indices.  A loop over bins (the fastest on the host).
        """
        return bin_medians_loop(image, keep, edges_y, edges_x)

    def masked_quantiles(self, values, mask, quantiles, median=False, count=False):
        """(len(quantiles) [+ 1] [+ 1], B) float64 of rows (B, n): :func:`~gpudiffim.statistics.masked_quantiles`
        of each row's ``mask``-ed values (NaN for none or a NaN), with ``count`` their number last, where
        the rows live (``count=None``: either, whichever is cheaper; the rows after the quantiles unread)."""
        result = masked_quantiles(values, mask, quantiles, median=median)
        if not count:
            return result
        xp = array_module_of(result)
        return xp.concatenate([result, mask.sum(axis=1).astype(np.float64)[None]])

    def sky_quartiles(self, residual, variance, sky, own_rows, n_images):
        """``(numbers, selected)``: the first and third quartiles and the count (3, n_images) of D/sigma over
        each image's sky pixels on its bands' own rows, and those pixels (n_images, -1)
        (:func:`~gpudiffim.statistics.normalised_sky_values`, then :meth:`masked_quantiles`)."""
        z, selected = normalised_sky_values(residual, variance, sky, own_rows, n_images)
        return self.masked_quantiles(z, selected, (0.25, 0.75), count=True), selected

    def sources_beyond(self, residual, quartiles, threshold):
        """Nonzero where ``|residual|`` of a band (B, ...) is at or beyond ``threshold`` robust sigmas of the
        band's quartiles (rows 0 and 1 of ``quartiles``): bool (:func:`~gpudiffim.statistics.beyond_robust_level`)."""
        return beyond_robust_level(residual, quartiles, threshold)

    def band_rows(self, groups, windows, height):
        """For each group of planes (M, N) of one shape and dtype, their windows of ``height`` rows starting at
        the host rows ``windows``, stacked plane after plane: (len(group) len(windows), height, N) (a gather
        by a host index)."""
        index = np.asarray(windows)[:, None] + np.arange(height)
        stacks = []
        for planes in groups:
            parts = [plane[array_module_of(plane).asarray(index)] for plane in planes]
            stacks.append(parts[0] if len(parts) == 1 else array_module_of(parts[0]).concatenate(parts))
        return stacks

    def sky_value_planes(self, residual, variance, sky, own_rows, gap, clip):
        """(2, rows, N) float64 normalised sky values and weights of bands, their own rows stacked with ``gap``
        zero rows after each (:func:`~gpudiffim.statistics.sky_value_planes`)."""
        return sky_value_planes(residual, variance, sky, own_rows, gap, clip)

    def subtract_sky_mean(self, planes, sums):
        """Plane 0 less its weighted mean ``sums[0] / sums[1]``, in place
        (:func:`~gpudiffim.statistics.subtract_sky_mean`)."""
        return subtract_sky_mean(planes, sums)

    def correlation_near(self, correlation, far, extra):
        """1-D: the lags up to ``far`` of correlations (P, R, C) (:func:`~gpudiffim.statistics.near_lags`),
        raveled, then ``extra``, where they live (one read-back)."""
        xp = array_module_of(correlation)
        return xp.concatenate([near_lags(correlation, far).ravel(), extra])

    def accumulate_term(self, out, term, rows, cols):
        """``out += outer(rows, cols) * term``, in place (``term`` is overwritten); returns ``out``.

        A factor that is all ones (the constant spatial term's, and one of the
        two of every pure-x or pure-y term) is not multiplied: bit for bit the
        same sum, with a third to a half fewer passes over the tile.
        """
        if not np.all(rows == 1):
            term *= rows[:, None]
        if not np.all(cols == 1):
            term *= cols[None, :]
        out += term
        return out

    def weighted_correlations(self, image, kernels, factors, dtype):
        """``sum_t P_t * (image * kernels[t])`` with ``P_t = outer(*factors[t])`` (M, N), in ``dtype``.

        The reference: overlap-save tiles (:class:`~gpudiffim.convolve.TiledCorrelator`),
        the tiles on the host threads (:func:`~gpudiffim._backend.host_map`); the terms
        that share a column factor are summed after their transforms along y and take
        one inverse transform along x
        (:meth:`~gpudiffim.convolve.TiledCorrelator.weighted_tile_sum`); all-zero
        kernels are skipped.  Agrees with
        :meth:`weighted_correlations_whole` to FFT rounding (~1e-7 of the
        largest term value in float32).
        """
        return self.weighted_correlations_of([(image, kernels, factors)], dtype)[0]

    def weighted_correlations_of(self, jobs, dtype):
        """:meth:`weighted_correlations` of several ``(image, kernels, factors[, placed])`` (an image's and
        its variance's; ``placed``, the kernels where the image lives, is the host's here), every tile of
        every job in one map over the host threads (a core is not left idle at the end of each); a list
        of the sums."""
        outs, work = [], []
        for image, kernels, factors, *_ in jobs:
            correlator = TiledCorrelator(image, kernels.shape[1:], dtype)
            groups = {}     # terms by their column factor (the spatial terms share a few x-powers)
            for kernel, (rows, cols) in zip(kernels, factors):
                if np.any(kernel):
                    cols = cols.astype(dtype)
                    groups.setdefault(cols.tobytes(), (cols, []))[1].append(
                        (correlator.kernel_transform(kernel), rows.astype(dtype)))
            outs.append(np.zeros(image.shape, dtype=dtype))
            work += [(correlator, list(groups.values()), outs[-1], index) for index in range(correlator.n_tiles)]

        def tile(item):   # every group of one tile, in a fixed order: the sums do not depend on the threads
            correlator, groups, out, index = item
            ys, xs = correlator.tile_region(index)
            out[ys, xs] = correlator.weighted_tile_sum(
                index, [(cols[xs], [(ft, rows[ys]) for ft, rows in terms]) for cols, terms in groups])

        host_map(tile, work)
        return outs

    def weighted_correlations_whole(self, image, kernels, factors, dtype):
        """:meth:`weighted_correlations` with one transform of the whole padded image per term
        (:class:`~gpudiffim.convolve.FourierCorrelator`), in the image's array module."""
        xp = array_module_of(image)
        correlator = FourierCorrelator(image, kernels.shape[1:], dtype)
        out = xp.zeros(image.shape, dtype=dtype)
        for kernel, (rows, cols) in zip(kernels, factors):
            if not np.any(kernel):
                continue
            term = correlator.correlate(kernel)
            rows, cols = xp.asarray(rows.astype(dtype)), xp.asarray(cols.astype(dtype))
            self.accumulate_term(out, term, rows, cols)
        return out

    def spatial_map_structure(self, maps):
        """``(owner, weights)`` of dense host maps ``J`` (N, P, n_theta) (one host helper on every path)."""
        from ._cuda.spatial_assembly import spatial_map_structure

        return spatial_map_structure(maps)

    def spatial_normal_equations(self, normal_matrices, normal_vectors, owner, weights):
        """Host ``M = sum J^T Q J`` (n_theta, n_theta), exactly symmetric, and ``b = sum J^T w`` (n_theta,).

        ``J`` in sparse form: unknown ``a`` feeds local parameter ``owner[a]``
        with weight ``weights[n, a]`` at stamp ``n``.
        """
        normal_matrices = to_host(normal_matrices).astype(np.float64, copy=False)
        normal_vectors = to_host(normal_vectors)
        n, p = normal_matrices.shape[:2]
        # M[a, b] = sum_n w[n, a] w[n, b] Q_n[owner a, owner b].  The weight columns
        # repeat (every basis shares the kernel's spatial terms), so with the distinct
        # columns u[n, c] one product G[c, d, i, j] = sum_n u_c u_d Q_n[i, j] holds it all.
        distinct, column = _distinct_columns(weights)
        pairs = (distinct[:, :, None] * distinct[:, None, :]).reshape(n, -1)
        gram = (pairs.T @ normal_matrices.reshape(n, p * p)).reshape(distinct.shape[1], distinct.shape[1], p, p)
        matrix = gram[column[:, None], column[None, :], owner[:, None], owner[None, :]]
        vector = np.einsum("na,na->a", weights, np.asarray(normal_vectors, dtype=np.float64)[:, owner])
        return 0.5 * (matrix + matrix.T), vector

    def warp_resample(self, masked_image, coarse, jacobian, no_data, outside_bits, *, launch_pixels):
        """Lanczos-3 image, variance and int32 mask planes of the warp's target grid.

        ``coarse`` is the warp's pixel mapping (``gpudiffim.warp._CoarseMapping``),
        ``jacobian`` its coarse flux scale or None; pixels with ``no_data`` set
        hold 0, pixels off the source ``outside_bits``.  ``launch_pixels``:
        target pixels per kernel launch (kernel path only).  The planes are in
        the source's array module.
        """
        return resample_reference(masked_image, coarse, jacobian, no_data, outside_bits)

    def propagate_mask(self, mask, footprint):
        """OR every bit of ``mask`` (M, N) over the kernel footprint (kh, kw), ``afw`` orientation."""
        kh, kw = footprint.shape
        if np.all(footprint) and kh % 2 and kw % 2:   # a centred box (even sizes lean as scipy's filters do)
            return self.or_box(mask, kh // 2, kw // 2)
        out = np.zeros_like(mask)
        for bit in range(int(mask.max()).bit_length()):
            plane = (mask >> bit) & 1
            if plane.any():
                out |= ndi.maximum_filter(plane, footprint=footprint, mode="constant").astype(mask.dtype) << bit
        return out

    def copy_edge(self, inputs, half_y, half_x, edge_bit, outputs):
        """Within ``half_y`` rows and ``half_x`` columns of the border, in place: the input ``(image,
        variance)`` into the outputs, and ``mask |= input mask | edge_bit``; four strips (slices, no
        boolean mask).  Returns ``outputs``."""
        (image, variance, mask), (in_image, in_variance, in_mask) = outputs, inputs
        rows, columns = image.shape
        hy, hx = min(half_y, rows), min(half_x, columns)
        strips = [(slice(0, hy), slice(None)), (slice(rows - hy, rows), slice(None)),
                  (slice(hy, rows - hy), slice(0, hx)), (slice(hy, rows - hy), slice(columns - hx, columns))]
        for strip in strips:     # (empty when the kernel is 1 px wide; overlapping ones repeat the same values)
            image[strip] = in_image[strip]
            variance[strip] = in_variance[strip]
            mask[strip] |= in_mask[strip] | np.int32(edge_bit)
        return outputs

    def spatial_image(self, factors, coefficients, xp):
        """``sum_t coefficients[t] * outer(*factors[t])`` on :class:`~gpudiffim.spatial.GridFactors`'
        grid, float64 in ``xp``: one matrix product of the separable factors (host tables, moved)."""
        x = factors.x0 + np.arange(factors.columns)
        y = factors.y0 + np.arange(factors.rows)
        return factors.function.evaluate_grid(coefficients, x, y, xp=xp)
    # ---- detection and candidate selection (kernels/detection.cu on the kernel path) ----

    def detection_residual(self, image, variance, mask, no_data, valid, edges_y, edges_x, threshold_kind,
                           threshold):
        """None: on the reference path the caller runs its steps (bin medians, the bilinear background
        and the threshold in host row blocks); see :meth:`KernelOperations.detection_residual`."""
        return None

    def interpolated_background(self, image, keep, edges_y, edges_x):
        """None: on the reference path the caller interpolates its bin medians in host row blocks; see
        :meth:`KernelOperations.interpolated_background`."""
        return None

    def footprint_stats(self, residual, labels, n_labels):
        """(7, n_labels) uint64 reductions of each footprint (:func:`~gpudiffim.cutouts.footprint_stats`),
        where the arrays live."""
        return footprint_stats(residual, labels, n_labels)

    def footprint_centres(self, stats, n_cols, n_pixels, npix_min, npix_max, n_kept):
        """The kept footprints' ``(row, column)`` centres where the stats live, for the kernel path's later
        launches: None here (the host's centres are the ones used)."""
        return None

    def rated_sigmas(self, image, variance, images, centres_rc, star_centres_rc, core_radius, radius, max_stars,
                     device_centres=None):
        """Host float64 buffer of the core S/N ratings of every star, then the adaptive sigmas of the
        ``max_stars`` best rated on each of ``images`` (:func:`~gpudiffim.fwhm.rated_sigmas`).
        ``device_centres``: ``centres_rc`` where the planes live, if there already (kernel path)."""
        return rated_sigmas(image, variance, images, centres_rc, star_centres_rc, core_radius, radius, max_stars)

    def stamps_flagged(self, mask_a, mask_b, centres_rc, half_size, bad_bits, device_centres=None):
        """Host bool (n,): a ``bad_bits`` bit of either mask in each stamp (:func:`~gpudiffim.cutouts.stamps_flagged`).
        ``device_centres``: ``centres_rc`` where the masks live, if there already (kernel path)."""
        return stamps_flagged(mask_a, mask_b, centres_rc, half_size, bad_bits)

    def select_rows(self, rows, index):
        """``rows[index]`` for a host integer ``index``, where ``rows`` live."""
        return rows[index]


class KernelOperations(NumpyOperations):
    """The CUDA kernels (GPU for CuPy arrays, CPU emulator for NumPy arrays).

    Results stay in the inputs' array module.  Methods not overridden here
    have no kernel and run the reference where the arrays live.
    """

    name = "kernels"
    max_band_pixels = DEVICE_BAND_PIXELS

    def correlate_stamps(self, stamps, kernels, per_stamp=False, separable=None):
        """``gdi_correlate_stamps`` (``separable`` unused: a direct sum per output); kernels wider
        than its shared-memory stage use the host FFT."""
        from ._cuda import stamp_fit

        xp = array_module_of(stamps)
        if kernels.shape[-2] * kernels.shape[-1] > stamp_fit.CORRELATE_MAX_TAPS:
            # wider than the kernel stages in shared memory (63^2 taps; the defaults stay below
            # 35^2): the host FFT path, correct but with a round trip
            return xp.asarray(super().correlate_stamps(to_host(stamps), to_host(kernels), per_stamp))
        if not (isinstance(kernels, xp.ndarray) and kernels.dtype == stamps.dtype):
            kernels = xp.asarray(kernels, dtype=stamps.dtype)
        out = stamp_fit.correlate_stamps(stamps, kernels, per_stamp=per_stamp)
        return out[:, 0] if per_stamp else out

    def stamp_normal_equations(self, columns, target, weights, background):
        """``gdi_normal_equations`` with its implicit column of ones for the background (one weight per
        stamp read as is)."""
        from ._cuda import stamp_fit

        if weights.size != len(target):
            weights = weights.reshape(target.shape)
        return stamp_fit.normal_equations(columns, weights, target, int(bool(background)))

    def delta_function_normal_equations(self, template, science, weights, kernel_width, background):
        """``gdi_delta_function_normal_equations``: one launch, no design matrix."""
        from ._cuda import delta_function

        return delta_function.normal_equations(template, science, weights, kernel_width, background)

    def dilated_bad_pixels(self, mask, bad_bits, half_width):
        """``gdi_or_filter_box`` over the kernel box, cut to the fit region."""
        from ._cuda import image_apply

        h = half_width
        grown = image_apply.or_filter_box(mask & bad_bits, h, h) != 0
        return grown[:, h:mask.shape[1] - h, h:mask.shape[2] - h]

    def or_box(self, mask, half_y, half_x):
        """``gdi_or_filter_box`` (two launches); int32 result, booleans for a boolean ``mask``."""
        from ._cuda import image_apply

        out = image_apply.or_filter_box(mask, half_y, half_x)
        return out != 0 if mask.dtype == bool else out

    def constant_weights(self, science_variance, template_variance):
        """On the GPU, ``gdi_constant_weights`` (the median by a sort in shared memory: one launch); stamps
        larger than its shared memory, and NumPy stacks (the emulator), as the reference."""
        from ._cuda import stamp_fit

        n_pix = science_variance.shape[-1] * science_variance.shape[-2]
        if not is_device_array(science_variance) or n_pix > stamp_fit.CONSTANT_WEIGHTS_MAX_PIX:
            return super().constant_weights(science_variance, template_variance)
        return stamp_fit.constant_weights(science_variance, template_variance)

    def solve_systems(self, matrices, vectors):
        """On the GPU, ``gdi_solve_small`` (``kernels/linear_solve.cu``: checks, partial-pivoting LU, the
        pivot rank test and the status in one launch) and the pseudo-inverse solutions of the
        rank-deficient systems by a batched eigen-decomposition, with no synchronisation; systems
        larger than the kernel's shared memory take cuBLAS ``getrfBatched``/``getrsBatched``.  NumPy
        stacks (the emulator) as the reference."""
        solutions, status, deferred = self.solve_systems_deferred(matrices, vectors)
        if not deferred:
            return solutions, status
        return _pseudo_inverse_fallback(matrices, vectors, solutions, status)

    def solve_systems_deferred(self, matrices, vectors):
        """:meth:`solve_systems` with the pseudo-inverse left to the caller where it would cost calls:
        on the GPU (systems the kernel takes) ``gdi_solve_small`` alone, whose ``EIGENVECTOR`` rows hold
        zeros and ``deferred`` is True; elsewhere every system solved and ``deferred`` False."""
        from ._cuda.linear_solve import SOLVE_SMALL_MAX_N, solve_small

        if not is_device_array(matrices):
            return (*NumpyOperations.solve_systems(self, matrices, vectors), False)
        if matrices.shape[-1] > SOLVE_SMALL_MAX_N or matrices.shape[-1] == 0 or len(matrices) == 0:
            return (*solve_batch_status(matrices, vectors, solve=_solve_device), False)
        solutions, _, status = solve_small(matrices, vectors)
        return solutions, status.astype(np.int8), True

    def solve_stamps(self, matrices, vectors, codes, basis, with_background, fit_failed, defer=False,
                     overwrite=False, deregularize=None):
        """With ``defer``, on the GPU: ``gdi_solve_stamps``, the solve and all that follows in one launch,
        the rank-deficient systems deferred (``kernels/linear_solve.cu``); systems larger than its shared
        memory (the delta-function basis's) by cuSOLVER batched Cholesky, those Cholesky cannot take
        deferred (``EIGENVECTOR``, zeros: the caller solves them again without deferral, by LU and the
        pseudo-inverse, as the host does); no synchronisation either way.  Else the reference's steps."""
        from ._cuda.linear_solve import SOLVE_SMALL_MAX_N, solve_stamps

        n = matrices.shape[-1]
        if not (defer and is_device_array(matrices) and len(matrices) and n > 0):
            return super().solve_stamps(matrices, vectors, codes, basis, with_background, fit_failed, defer,
                                        deregularize=deregularize)
        if n <= SOLVE_SMALL_MAX_N:
            if deregularize is not None:    # factors of copies (the launch below reads the systems)
                _, passed, factors = _cholesky_device(matrices, vectors)
            result = (*solve_stamps(matrices, vectors, codes, basis, with_background, fit_failed), True)
        else:
            solutions, passed, factors = _cholesky_device(matrices, vectors, overwrite)
            xp = array_module_of(matrices)
            status = xp.where(passed, np.int8(LU), np.int8(EIGENVECTOR))
            result = (*self.stamp_outcome(solutions, status, codes, basis, with_background, fit_failed), True)
        if deregularize is None:
            return result
        return (*result, _deregularized_device(factors, passed, result[0][:, 4:], *deregularize))

    def cut_stamp_planes(self, template, science, centres_rc, half_size, device_centres=None):
        """``gdi_cut_stamps``: one launch per image (its three planes), the centres uploaded once unless
        ``device_centres`` has them already (and returned: the batch's spatial terms are computed from
        them, :meth:`spatial_terms`)."""
        from ._cuda import stamp_fit
        from ._cuda._host import centres_in

        xp = array_module_of(science.image)
        centres = device_centres
        if centres is None:
            centres = centres_in(xp, centres_rc) if len(centres_rc) else xp.empty((0, 2), np.int32)
        t_image, t_variance, t_mask = stamp_fit.cut_stamps(template.image, template.variance, template.mask,
                                                           centres_rc, half_size, device_centres=centres)
        s_image, s_variance, s_mask = stamp_fit.cut_stamps(science.image, science.variance, science.mask,
                                                           centres_rc, half_size, device_centres=centres)
        return (t_image, s_image, t_variance, s_variance, t_mask, s_mask), centres

    def spatial_terms(self, function, centres_rc, origin):
        """``gdi_spatial_terms`` on centres where they live (one launch, nothing uploaded); the reference's
        host terms, moved, above its highest order."""
        from ._cuda import image_apply

        xp = array_module_of(centres_rc)
        if function.order > image_apply.SPATIAL_TERMS_MAX_ORDER:
            return xp.asarray(super().spatial_terms(function, to_host(centres_rc), origin))
        scalings = None if function.model_type == "polynomial" else (function.axis_scaling(1),
                                                                     function.axis_scaling(0))
        return image_apply.spatial_terms(centres_rc, origin, function.order, scalings)

    uses_fitted_models = False
    fits_delta_functions_directly = False

    def stamp_residuals(self, stamps, kernels, background, bad_bits, core_radius=None, rows=False, model=None):
        """``gdi_stamp_residuals``: the difference stamps and their sums fused, one launch (``model`` unused)."""
        from ._cuda.residual_moments import STAMP_RESIDUALS_MAX_TAPS, stamp_residuals

        if kernels.shape[-1] ** 2 > STAMP_RESIDUALS_MAX_TAPS:
            return super().stamp_residuals(stamps, kernels, background, bad_bits, core_radius, rows, model)
        return stamp_residuals(stamps, kernels, background, bad_bits, core_radius, rows=rows)

    def residual_sums(self, difference, variance, mask, bad_bits, core_radius=None):
        """``gdi_residual_moments``'s (N, 3) sums, left where the stamps live."""
        from ._cuda.residual_moments import residual_sums

        return residual_sums(difference, variance, mask, bad_bits, core_radius)

    def bin_medians(self, image, keep, edges_y, edges_x):
        """``gdi_bin_medians`` (one launch, each bin sorted in shared memory) for float bins of up to
        ``MAX_BIN_PIXELS``; larger float32 bins: keys built on the device, one sort and one launch
        (``bin_medians_by_sort``); else one sort by (bin, value) in the image's array module: the same values."""
        from ._cuda import statistics

        if image.dtype.kind == "f" and statistics.bin_medians_fit(edges_y, edges_x):
            return statistics.bin_medians(image, keep, edges_y, edges_x)
        if image.dtype.newbyteorder("=") == np.float32:
            return statistics.bin_medians_by_sort(image, keep, edges_y, edges_x)
        return bin_medians_sorted(image, keep, edges_y, edges_x)

    def masked_quantiles(self, values, mask, quantiles, median=False, count=False):
        """The rows sorted once and ``gdi_sorted_quantiles`` (one launch: quantiles, median, count)."""
        from ._cuda import statistics

        if len(quantiles) > statistics.MAX_QUANTILES:
            return super().masked_quantiles(values, mask, quantiles, median, count)
        result = statistics.sorted_quantiles(values, mask, quantiles, median=median)
        return result if count or count is None else result[:-1]

    def sky_quartiles(self, residual, variance, sky, own_rows, n_images):
        """``gdi_sky_normalised``, the sort and ``gdi_sorted_quantiles``: two launches."""
        from ._cuda import statistics

        values, selected = statistics.sky_normalised(residual, variance, sky, own_rows, n_images)
        return statistics.sorted_quantiles(values, selected, (0.25, 0.75), masked=True), selected

    def sources_beyond(self, residual, quartiles, threshold):
        """``gdi_sky_sources``: one launch, int32 0/1 (what ``or_box`` takes without a conversion)."""
        from ._cuda import statistics

        return statistics.sky_sources(residual, quartiles, threshold)

    def band_rows(self, groups, windows, height):
        """``gdi_gather_rows``: one launch per plane into its group's stack (the window starts uploaded once)."""
        from ._cuda import statistics

        return statistics.gather_rows(groups, windows, height)

    def sky_value_planes(self, residual, variance, sky, own_rows, gap, clip):
        """``gdi_sky_value_planes``: one launch (and each band's first own row, a few bytes, uploaded)."""
        from ._cuda import statistics

        return statistics.sky_value_planes(residual, variance, sky, own_rows, gap, clip)

    def subtract_sky_mean(self, planes, sums):
        """``gdi_subtract_mean``: one launch."""
        from ._cuda import statistics

        return statistics.subtract_sky_mean(planes, sums)

    def correlation_near(self, correlation, far, extra):
        """``gdi_correlation_near``: one launch."""
        from ._cuda import statistics

        return statistics.correlation_near(correlation, far, extra)

    def weighted_correlations(self, image, kernels, factors, dtype, placed=None):
        """The band transformed once, the kernels' row transforms at once, then its terms in batched
        transforms of at most :data:`TERMS_PER_BATCH` and :data:`TERM_BATCH_BYTES`, each batch weighted
        and summed by one ``gdi_accumulate_terms`` launch (the products and sums of
        :meth:`NumpyOperations.weighted_correlations_whole`, bit for bit, given the same transforms).

        ``placed``: the same kernels already where the image lives (transformed there, nothing moved);
        the host ``kernels`` say which are all zero (skipped)."""
        from ._cuda import image_apply

        xp = array_module_of(image)
        used = np.flatnonzero(np.asarray(kernels).reshape(len(kernels), -1).any(axis=1)).tolist()
        source = kernels if placed is None else placed
        correlator = FourierCorrelator(image, kernels.shape[1:], dtype)
        out = xp.zeros(image.shape, dtype=dtype)
        if not used:
            return out
        rows, cols = _factors_of_terms(xp, factors, used, dtype)
        contiguous = used == list(range(used[0], used[-1] + 1))      # a slice: no index array moved
        kernel_rows = correlator.kernel_rows(source[used[0]:used[-1] + 1] if contiguous else source[used])
        per_batch = max(1, min(TERMS_PER_BATCH, TERM_BATCH_BYTES // correlator.bytes_per_term()))
        for start in range(0, len(used), per_batch):
            part = slice(start, start + per_batch)
            full, row0, col0 = correlator.correlate_rows(_part(kernel_rows, part))
            image_apply.accumulate_terms(out, full, row0, col0, _part(rows, part), _part(cols, part))
        return out

    def weighted_correlations_of(self, jobs, dtype):
        """:meth:`weighted_correlations` of each job ``(image, kernels, factors[, placed])`` in turn."""
        return [self.weighted_correlations(image, kernels, factors, dtype, *placed)
                for image, kernels, factors, *placed in jobs]

    def spatial_image(self, factors, coefficients, xp):
        """The factor tables by ``gdi_spatial_powers`` where the image lives (only the coefficients
        and the terms' exponents are moved), then the same matrix product."""
        rows, cols = _factors_of_terms(xp, factors, range(len(factors)), np.float64)
        return (rows.T * xp.asarray(np.asarray(coefficients, dtype=np.float64))) @ cols

    def copy_edge(self, inputs, half_y, half_x, edge_bit, outputs):
        """``gdi_copy_edge``: one launch over the border pixels."""
        from ._cuda import image_apply

        return image_apply.copy_edge(inputs, half_y, half_x, edge_bit, outputs)

    def accumulate_term(self, out, term, rows, cols):
        """One-term ``gdi_accumulate_terms`` (bit-identical to the reference's three in-place steps)."""
        from ._cuda import image_apply

        xp = array_module_of(out)
        image_apply.accumulate_term(out, xp.ascontiguousarray(term), rows, cols)
        return out

    def propagate_mask(self, mask, footprint):
        """``gdi_or_filter_box`` / ``gdi_or_filter_footprint`` (int32 result)."""
        from ._cuda import image_apply

        xp = array_module_of(mask)
        return image_apply.propagate_mask(xp.asarray(mask, dtype=np.int32), footprint)

    def warp_resample(self, masked_image, coarse, jacobian, no_data, outside_bits, *, launch_pixels):
        """``gdi_warp_lanczos3`` (``kernels/warp.cu``) in row blocks of about ``launch_pixels`` target pixels.

        The pixel mapping (and the Jacobian) is interpolated from the coarse
        grid on the host, as on the reference path, and moved to the planes'
        module one block at a time, one kernel launch each.
        """
        from ._cuda import warp as warp_kernel

        xp, dtype = masked_image.xp, masked_image.dtype
        rows, columns = coarse.shape
        image = xp.empty(coarse.shape, dtype=dtype)
        variance = xp.empty(coarse.shape, dtype=dtype)
        mask = xp.empty(coarse.shape, dtype=np.int32)
        step = max(1, launch_pixels // columns)
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            x = xp.asarray(coarse.interpolate(coarse.x, start, stop))
            y = xp.asarray(coarse.interpolate(coarse.y, start, stop))
            scale = None if jacobian is None else xp.asarray(coarse.interpolate(jacobian, start, stop))
            image[start:stop], variance[start:stop], mask[start:stop] = warp_kernel.warp_resample(
                masked_image.image, masked_image.variance, masked_image.mask, x, y, no_data=no_data,
                outside_bits=outside_bits, scale=scale)
        return image, variance, mask

    def spatial_normal_equations(self, normal_matrices, normal_vectors, owner, weights):
        """``gdi_spatial_normal_equations`` on the sparse maps; host results, read back together.

        Weights already where the matrices live (the solve loop forms them
        there from the stamp centres: nothing crosses) are used as they are;
        of host weights only the distinct columns (the spatial terms at the
        stamps, about 9 of ~170) cross to the device, and the kernel's weights
        are gathered from them there.
        """
        from ._cuda import spatial_assembly

        xp = array_module_of(normal_matrices)
        if xp is np or array_module_of(weights) is xp:
            device_weights = weights
        else:
            weights = np.asarray(weights, dtype=np.float64)
            distinct, column = _distinct_columns(weights)
            device_weights = xp.asarray(distinct)[:, xp.asarray(column)]
        matrix, vector = spatial_assembly.spatial_normal_equations_structured(
            xp.asarray(normal_matrices, dtype=np.float64), xp.asarray(normal_vectors, dtype=np.float64),
            np.asarray(owner), device_weights)
        n_theta = vector.shape[0]
        packed = to_host(xp.concatenate([matrix.reshape(-1), vector]))
        return packed[:n_theta * n_theta].reshape(n_theta, n_theta), packed[n_theta * n_theta:]

    # ---- detection and candidate selection ----

    def detection_residual(self, image, variance, mask, no_data, valid, edges_y, edges_x, threshold_kind,
                           threshold):
        """``(residual, above)`` of detection: :meth:`bin_medians` of the ``valid`` pixels in the bins of
        ``edges_y``/``edges_x`` (``np.linspace(0, n, n_bins + 1).astype(int)``), then ``gdi_fill_grid`` and
        ``gdi_detection_residual`` (the filled grid interpolated as the reference does, the residual
        and, for ``threshold_kind`` "pixel_stdev" or "value", the int32 detections; None for the
        image-wide kinds, set by the caller); no read-back."""
        from ._cuda.detection import THRESHOLD_KINDS, detection_residual

        if image.size >= 2**31 or threshold_kind not in THRESHOLD_KINDS or variance.dtype != image.dtype:
            return None
        grid = self.bin_medians(image, valid, edges_y, edges_x)
        return detection_residual(image, variance, mask, no_data, grid, threshold_kind, threshold)

    def interpolated_background(self, image, keep, edges_y, edges_x):
        """float64 background of an image (M, N) or a stack (B, M, N): :meth:`bin_medians` of the ``keep``
        pixels, then ``gdi_fill_grid`` and ``gdi_detection_residual`` (kind -1, every plane of the stack
        in one launch); no read-back.  None (the reference's steps) for non-float or huge images."""
        from ._cuda.detection import interpolated_background

        if image.size >= 2**31 or image.dtype.kind != "f" or image.ndim not in (2, 3):
            return None
        return interpolated_background(self.bin_medians(image, keep, edges_y, edges_x), image.shape)

    def footprint_stats(self, residual, labels, n_labels):
        """``gdi_footprint_scan`` + ``gdi_footprint_peak``: two pixel scans, no read-back."""
        from ._cuda.detection import footprint_stats

        if residual.size >= 2**31:
            return super().footprint_stats(residual, labels, n_labels)
        return footprint_stats(residual, labels, n_labels)

    def footprint_centres(self, stats, n_cols, n_pixels, npix_min, npix_max, n_kept):
        """``gdi_footprint_centres``, a sort and a gather: int32 (n_kept, 2) where the stats live, nothing
        read back or uploaded (None for images of 2^31 pixels or more, whose stats the reference made)."""
        from ._cuda.detection import footprint_centres

        if n_pixels >= 2**31:
            return None
        return footprint_centres(stats, n_cols, n_pixels, npix_min, npix_max, n_kept)

    def rated_sigmas(self, image, variance, images, centres_rc, star_centres_rc, core_radius, radius, max_stars,
                     device_centres=None):
        """``gdi_core_snr`` + ``gdi_star_sigmas`` and one read-back (one or two images of the rated
        planes' dtype, ``radius`` within the kernel's shared memory; else the reference); the centres
        uploaded unless ``device_centres`` has them."""
        from ._cuda.detection import STAR_MAX_RADIUS, rated_sigmas

        dtypes = {variance.dtype, *(plane.dtype for plane in images)}
        if len(images) > 2 or radius > STAR_MAX_RADIUS or dtypes != {image.dtype}:
            return super().rated_sigmas(image, variance, images, centres_rc, star_centres_rc, core_radius,
                                        radius, max_stars)
        centres = centres_rc if device_centres is None else device_centres
        return to_host(rated_sigmas(image, variance, images, centres, star_centres_rc, core_radius, radius,
                                    max_stars))

    def stamps_flagged(self, mask_a, mask_b, centres_rc, half_size, bad_bits, device_centres=None):
        """``gdi_stamps_flagged`` (one thread per stamp) and one read-back; the centres uploaded unless
        ``device_centres`` has them."""
        from ._cuda.detection import stamps_flagged

        if len(centres_rc) == 0:
            return np.zeros(0, dtype=bool)
        centres = centres_rc if device_centres is None else device_centres
        return to_host(stamps_flagged(mask_a, mask_b, centres, half_size, bad_bits)) != 0

    def select_rows(self, rows, index):
        """``rows[index]`` gathered where ``rows`` live, from the smaller upload: an increasing ``index`` as
        a packed mask over the rows (``gdi_select_rows``, ``len(rows) / 8`` bytes), else the index as the
        narrowest integer that holds ``len(rows)`` (int16 below 2^15 rows: 2 bytes a row)."""
        from ._cuda.detection import select_rows

        index = np.asarray(index, dtype=np.int64)
        dtype = index_dtype(len(rows))
        if 4 * -(-len(rows) // 32) < dtype.itemsize * len(index) and np.all(np.diff(index) > 0):
            selected = np.zeros(len(rows), dtype=bool)
            selected[index] = True
            return select_rows(rows, selected)
        return rows[index.astype(dtype)]


#: The NumPy reference.
NUMPY = NumpyOperations()
#: The CUDA kernels.
KERNELS = KernelOperations()
