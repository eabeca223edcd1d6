"""Per-candidate (stamp) kernel solutions, batched over candidates.

For a stamp of the image to convolve ``T`` and the image matched to ``S``,
with basis kernels ``B_i``, the design matrix has columns
``C_i = (T * B_i)`` on the fit region (the stamp shrunk by the kernel
half-width ``h``; ``*`` = ``afw`` correlation), plus a column of ones when a
background is fitted.  With weights ``W = 1/V`` (``V`` = one number, the
median of ``V_S + V_T`` over the stamp, by default; or per pixel):

.. math:: M = C^T W C, \\quad b = C^T W S, \\quad M a = b.

All candidates of a batch are processed together: the basis correlations are
one batched FFT product (see :func:`gpudiffim.convolve.correlate_stamps`) and
the normal equations one batched product, so the same structure maps onto one
GPU launch per step.

Backends: the correlations, normal equations, mask dilation and residual
moments are operations of :mod:`gpudiffim._ops`, chosen once per call from
where the stamps live: NumPy/SciPy (the reference), or on the kernel path
(``cupy`` and ``cuda-emulator``, see :mod:`gpudiffim._backend`) the CUDA
kernels of ``kernels/stamp_fit.cu``, ``image_apply.cu`` and
``residual_moments.cu``.  The design columns are the same on every path,
and the background's column of ones is implicit on every path.  The small per-stamp systems (``N x P x P``) are
solved by LU with partial pivoting and the same pivot rank test on every
backend (LAPACK on the host, ``gdi_solve_stamps`` on the GPU, which also
forms the codes, kernel images and sums in the same launch; see
:func:`gpudiffim.linalg.solve_batch_status` and ``gpudiffim._ops``'
``solve_stamps``).  A fit's results stay where the stamps live (no
synchronisation on the GPU); the solve loop reads each batch's decisions
back once, and fits again the rare rank-deficient stamps whose
pseudo-inverse the GPU defers (``defer_rank_deficient``).

Delta-function stamps with one weight per stamp are fitted without the
design matrix: on the host by :mod:`gpudiffim.delta_function` (the normal
matrix from row products and window sums, Cholesky solves), on the kernel
path by ``gdi_delta_function_normal_equations`` (the normal equations from
the stamps, one launch) and the device solve; to rounding the same solutions.
"""

from dataclasses import dataclass

import numpy as np

from ._backend import array_module_of, to_host
from ._ops import operations_for
from .cellset import RejectReason
from .cutouts import stamps_fit
from .delta_function import (
    DeltaFunctionForm,
    delta_function_design,
    delta_function_models,
    fit_delta_function,
)
from .linalg import STATUS_TEXT, condition_number

__all__ = ["stamps_fit", "StampBatch", "StampFit", "fit_stamps", "difference_stamps", "stamp_residual_rows",
           "stamp_residual_sums", "stamp_normal_equations", "candidate_kernels", "failure_texts",
           "fits_delta_functions_directly", "deregularization_steps"]


@dataclass(frozen=True)
class StampBatch:
    """Stamps of a batch of candidates, cut from both images.

    Attributes
    ----------
    template, science : ndarray of shape (N, S, S)
        Image stamps (float64) of the image to convolve and the image matched to.
    template_variance, science_variance : ndarray of shape (N, S, S)
    template_mask, science_mask : ndarray of int32, shape (N, S, S)
    centres : ndarray of int32, shape (N, 2), or None
        ``(row, column)`` of each stamp's centre relative to the images' first
        pixel, as the stamps were cut (None when the stacks were given).

    The arrays are NumPy arrays, or CuPy arrays on the CuPy backend.
    """

    template: np.ndarray
    science: np.ndarray
    template_variance: np.ndarray
    science_variance: np.ndarray
    template_mask: np.ndarray
    science_mask: np.ndarray
    centres: np.ndarray = None

    @classmethod
    def extract(cls, centres, template, science, half_size, *, ops=None, device_centres=None):
        """Cut ``(2 half_size + 1)^2`` stamps centred on each candidate.

        Parameters
        ----------
        centres : array_like of int, shape (N, 2)
            Parent ``(x, y)`` pixel of each stamp centre; every stamp must lie
            inside the images (else ValueError).
        template, science : MaskedImage
            Same grid (shape and ``xy0``) and array module; the stamps are
            cut where the planes live (host or GPU).
        half_size : int
        ops : object, optional
            The operations chosen by the caller for its solve (from the planes when omitted).
        device_centres : ndarray of int32, shape (N, 2), optional
            The same centres as ``(row, column)`` from the images' first pixel,
            already where the planes live (kernel path: no upload).
        """
        x0, y0 = science.xy0
        centres_rc = np.asarray(centres, dtype=np.int64).reshape(-1, 2)[:, ::-1] - np.array([y0, x0])
        ops = operations_for(science.image) if ops is None else ops
        planes, centres_rc = ops.cut_stamp_planes(template, science, centres_rc, half_size,
                                                  device_centres=device_centres)
        return cls(*planes, centres=centres_rc)

    def planes(self):
        """The six stacks in field order (what the operations layer takes)."""
        return (self.template, self.science, self.template_variance, self.science_variance,
                self.template_mask, self.science_mask)

    def __len__(self):
        return self.template.shape[0]

    def fit_region(self, array, half_width):
        """The stamp shrunk by the kernel half-width (the fit region)."""
        h = half_width
        return array[:, h:array.shape[1] - h, h:array.shape[2] - h]


@dataclass
class StampFit:
    """Solutions of a batch of stamps, in the stamps' array module (on the GPU: no synchronisation).

    Attributes
    ----------
    outcome : ndarray of shape (N, 4 + n_basis)
        float64 rows ``(failure code, solve status, kernel sum, background,
        coefficients)``, what the solve loop reads back (the properties below
        are views of it, formed only when asked).
    background : ndarray of shape (N,)
        Fitted constant background (0 when not fitted), C-contiguous.
    kernels : ndarray of shape (N, kh, kw)
        Each stamp's kernel image ``sum_i a_i B_i``.
    normal_matrix : ndarray of shape (N, P, P)
        ``M`` without regularisation (used by the spatial fit).
    normal_vector : ndarray of shape (N, P)
    condition : dict of int to float
        Condition numbers of the stamps rejected by ``check_condition_number`` (host).
    deferred : bool
        Host flag: the rank-deficient systems (``solve_status`` ``EIGENVECTOR``) were left unsolved
        (zero coefficients; see ``defer_rank_deficient`` of :func:`fit_stamps`).
    information : ndarray of shape (N,)
        ``tr(M)`` over the kernel unknowns (``normal_matrix`` may be None, see :func:`fit_stamps`).
    model : ndarray of shape (N, F, F) or None
        ``T * K`` of each stamp's own kernel, the design columns times its
        coefficients (formed where ``ops.uses_fitted_models``: it saves the
        residual pass a correlation).
    deregularized : ndarray of shape (N, n_basis) or None
        The kernel coefficients after :func:`deregularization_steps`
        iterated-Tikhonov steps, for the PCA basis (None without them).
    """

    outcome: np.ndarray
    background: np.ndarray
    kernels: np.ndarray
    normal_matrix: np.ndarray
    normal_vector: np.ndarray
    condition: dict
    information: np.ndarray = None
    model: np.ndarray = None
    deferred: bool = False
    deregularized: np.ndarray = None

    @property
    def coefficients(self):
        """(N, n_basis) basis coefficients of each stamp's kernel."""
        return self.outcome[:, 4:]

    @property
    def kernel_sum(self):
        """(N,) sum of each stamp's kernel image."""
        return self.outcome[:, 2]

    @property
    def failure_code(self):
        """(N,) int8 :class:`~gpudiffim.cellset.RejectReason` codes (``NONE`` for a good solution)."""
        return self.outcome[:, 0].astype(np.int8)

    @property
    def solve_status(self):
        """(N,) int8 :func:`gpudiffim.linalg.solve_batch_status` codes of the last solve."""
        return self.outcome[:, 1].astype(np.int8)

    @property
    def failure(self):
        """Why each stamp failed, "" for a good solution (reads the codes back from the device)."""
        return failure_texts(to_host(self.failure_code), to_host(self.solve_status), self.condition)


def failure_texts(codes, status, condition):
    """Sentences for stamp-fit failure ``codes`` (host arrays of :class:`StampFit`), "" where none."""
    texts = [""] * len(codes)
    for k in np.flatnonzero(codes != RejectReason.NONE).tolist():   # (few: a loop over every stamp is slow)
        code, solved = codes[k], status[k]
        if code == RejectReason.NONPOSITIVE_VARIANCE:
            texts[k] = "non-positive variance in the stamp"
        elif code == RejectReason.CONDITION_NUMBER:
            texts[k] = f"condition number {condition[k]:.3g} > {condition['limit']:.3g}"
        elif code == RejectReason.FIT_FAILED:
            texts[k] = f"stamp fit failed: {STATUS_TEXT[int(solved)]}"
    return texts


def _stamp_weights(ops, batch, half_width, constant):
    """Inverse-variance weights on the fit region, and a failure code per stamp (int32, where the stamps live:
    what ``gdi_solve_stamps`` reads as is).

    With ``constant`` the weights are one number per stamp, shaped (N,): ``1 / median(V_S + V_T)``, 1
    where that median is not positive.
    """
    if constant:
        return ops.constant_weights(batch.science_variance, batch.template_variance)
    xp = array_module_of(batch.science)
    total = batch.science_variance + batch.template_variance
    flat = total.reshape(len(batch), -1)
    codes = xp.where(flat.min(axis=1) <= 0, np.int32(RejectReason.NONPOSITIVE_VARIANCE), np.int32(RejectReason.NONE))
    return _inverse(batch.fit_region(total, half_width)), codes.astype(np.int32)


def _inverse(variance):
    """``1 / variance`` where positive, else 0."""
    xp = array_module_of(variance)
    with np.errstate(divide="ignore"):
        return xp.where(variance > 0, 1.0 / variance, 0.0)


def _design(ops, batch, basis, separable=None):
    """Basis design columns (N, n_basis, F) and target (N, F), the same on every path.

    The background's column of ones, when fitted, is implicit in
    ``ops.stamp_normal_equations`` (never stored).  ``separable``: the basis
    in separable form, if it has one.
    """
    half_width = basis.shape[1] // 2
    if isinstance(separable, DeltaFunctionForm):
        if ops.fits_delta_functions_directly:      # the host: shifted windows of the stamps, copied
            return delta_function_design(batch.template, separable.width), _fit_target(batch, half_width)
        separable = None
    correlated = ops.correlate_stamps(batch.template, basis, separable=separable)
    n, nb, fy, fx = correlated.shape
    columns = correlated.reshape(n, nb, fy * fx)
    if not columns.flags.c_contiguous:     # cropped FFT correlations: products on a strided view miss BLAS
        columns = array_module_of(columns).ascontiguousarray(columns)
    return columns, _fit_target(batch, half_width)


def _regularization_lambdas(config, systems, regularization):
    """``lambda`` of every system (relative: ``lambda_scaling tr(M) / tr(H)``)."""
    xp = array_module_of(systems)
    if config.lambda_type == "relative":
        return config.lambda_scaling * xp.trace(systems, axis1=1, axis2=2) / np.trace(regularization)
    return xp.full(len(systems), config.lambda_value)


def _check_conditions(matrix, config, codes, condition):
    """Mark stamps whose normal matrix is worse conditioned than the limit (host eigenvalues: one sync)."""
    limit = config.condition_number_limit
    host, pending = to_host(matrix), to_host(codes) == RejectReason.NONE
    condition["limit"] = limit
    rejected = []
    for k in np.flatnonzero(pending):
        cond = condition_number(host[k], config.condition_number_type)
        if cond > limit:
            condition[int(k)] = cond
            rejected.append(int(k))
    if not rejected:
        return codes
    xp = array_module_of(codes)
    codes = codes.copy()
    codes[xp.asarray(np.array(rejected))] = np.int8(RejectReason.CONDITION_NUMBER)
    return codes


def _solve_batch(ops, matrix, vector, config, regularization, codes, condition, basis, defer=False, steps=0):
    """Solve every stamp system where it lives; ``ops.solve_stamps``' ``(outcome, kernels, background, deferred)``
    and the kernel coefficients after ``steps`` iterated-Tikhonov steps (None without them).

    Stamps already failed (``codes``) get zero solutions; a failed solve marks
    ``FIT_FAILED``.  Every system of the batch is solved (failed ones too,
    then masked), so that no decision leaves the device.  With ``defer``,
    the rank-deficient systems may be left unsolved (``deferred`` True).
    """
    xp = array_module_of(matrix)
    if config.check_condition_number:
        codes = _check_conditions(matrix, config, codes, condition)
    systems, regularized = matrix, regularization is not None and len(matrix)
    deregularize = None
    if regularized:      # M + lambda H formed in one new stack (no temporary), which the solve may overwrite
        lambdas = _regularization_lambdas(config, matrix, regularization)
        penalty = xp.asarray(regularization)
        systems = lambdas[:, None, None] * penalty
        systems += matrix
        deregularize = (penalty, lambdas, steps) if steps else None
    result = ops.solve_stamps(systems, vector, codes, basis, config.fit_for_background, RejectReason.FIT_FAILED,
                              defer, overwrite=bool(regularized), deregularize=deregularize)
    return result if deregularize is not None else (*result, None)


def deregularization_steps(config, regularization, separable):
    """Iterated-Tikhonov steps for the stamp kernels of the PCA basis (``config.pca_deregularization``):
    only for regularised delta-function fits with one weight per stamp and a PCA spatial kernel, else 0."""
    if regularization is None or not config.pca_spatial_kernel or not fits_delta_functions_directly(separable, config):
        return 0
    return config.pca_deregularization


def _as_float64(xp, array):
    """``array`` as a float64 array of ``xp`` (no call when it is one already)."""
    return array if isinstance(array, xp.ndarray) and array.dtype == np.float64 else xp.asarray(array, np.float64)


def candidate_kernels(coefficients, basis):
    """Kernel images ``sum_i a[n, i] B_i`` (N, kh, kw) of coefficient rows, in their array module."""
    xp = array_module_of(coefficients)
    return xp.tensordot(coefficients, _as_float64(xp, basis), axes=1)


def fit_stamps(batch, basis, config, regularization=None, *, ops=None, separable=None, keep_matrix=True,
               defer_rank_deficient=False):
    """Solve the kernel of every stamp of a batch.

    Parameters
    ----------
    batch : StampBatch
    basis : ndarray of shape (n_basis, kh, kw)
        Basis kernels (in the batch's array module, or copied there).
    config : PsfMatchConfig
        ``fit_for_background``, ``constant_variance_weighting``,
        ``iterate_single_kernel``, condition-number and lambda fields.
    regularization : ndarray of shape (P, P), optional
        ``H``; the system solved is ``(M + lambda H) a = b``.
    ops : object, optional
        The operations (:func:`gpudiffim._ops.operations_for`) chosen by the
        caller once for its whole solve; chosen from the batch when omitted.
    separable : SeparableBasis or DeltaFunctionForm, optional
        ``basis`` in separable form (:func:`gpudiffim.basis.separable_form`),
        which the host correlates faster; or the mark of the delta-function
        basis, whose stamps the host fits without a design matrix
        (:mod:`gpudiffim.delta_function`) when the weights are constant.
    defer_rank_deficient : bool
        Leave the pseudo-inverse solutions of rank-deficient systems to the
        caller where they would cost device calls in every batch (the GPU):
        then :attr:`StampFit.deferred` is set and those stamps (``solve_status``
        ``EIGENVECTOR``, read back with the batch's outcome) hold zero
        coefficients until fitted again without deferral.  Ignored with
        ``iterate_single_kernel`` or ``check_condition_number``.
    keep_matrix : bool
        Return the unregularised normal matrices (else ``normal_matrix`` may be None).

    Returns
    -------
    StampFit
        In the batch's array module: on the GPU nothing is read back
        (``check_condition_number`` excepted: its eigenvalues are taken on the host).
    """
    xp = array_module_of(batch.template)
    basis = _as_float64(xp, basis)
    half_width = basis.shape[1] // 2
    ops = operations_for(batch.template) if ops is None else ops
    steps = deregularization_steps(config, regularization, separable)
    if fits_delta_functions_directly(separable, config) and ops.fits_delta_functions_directly:
        return _fit_delta_functions(ops, batch, basis, config, regularization, keep_matrix, steps)
    columns, target, weights, codes, (matrix, vector) = _normal_equations(ops, batch, basis, config, separable)
    condition = {}
    iterate = config.iterate_single_kernel and not config.constant_variance_weighting
    defer = defer_rank_deficient and not (iterate or config.check_condition_number)
    outcome, kernels, background, deferred, deregularized = _solve_batch(ops, matrix, vector, config, regularization,
                                                                         codes, condition, basis, defer, steps)
    if iterate:
        weights = _inverse(_difference_variance(ops, batch, kernels))
        matrix, vector = ops.stamp_normal_equations(columns, target, weights, config.fit_for_background)
        outcome, kernels, background, _, _ = _solve_batch(ops, matrix, vector, config, regularization,
                                                          outcome[:, 0].astype(np.int32), condition, basis)
    information = None if keep_matrix else xp.trace(matrix[:, :len(basis), :len(basis)], axis1=1, axis2=2)
    fit = StampFit(outcome, background, kernels, matrix if keep_matrix else None, vector, condition,
                   information=information, deferred=deferred, deregularized=deregularized)
    if ops.uses_fitted_models and columns is not None:
        fy = batch.science.shape[1] - 2 * half_width
        fit.model = (xp.matmul(fit.coefficients[:, None, :], columns)[:, 0]).reshape(len(batch), fy, fy)
    return fit


def fits_delta_functions_directly(form, config):
    """Whether a fit forms its normal equations without a design matrix (issue 13): the
    delta-function basis, one weight per stamp, no condition-number check.  On the host it then
    takes :func:`gpudiffim.delta_function.fit_delta_function` whole (``ops.fits_delta_functions_directly``);
    on the kernel path ``ops.delta_function_normal_equations`` forms the systems, solved as every fit's."""
    return (isinstance(form, DeltaFunctionForm) and config.constant_variance_weighting
            and not config.check_condition_number)


def _fit_delta_functions(ops, batch, basis, config, regularization, keep_matrix, steps=0):
    """:func:`fit_stamps` of the delta-function basis without a design matrix (host arrays)."""
    width = basis.shape[1]
    weights, codes = _stamp_weights(ops, batch, width // 2, True)
    fit = fit_delta_function(batch.template, _fit_target(batch, width // 2), weights.reshape(-1), width,
                             config.fit_for_background, regularization,
                             lambda matrix: _regularization_lambdas(config, matrix, regularization), keep_matrix,
                             steps)
    outcome, kernels, background = ops.stamp_outcome(fit.solutions, fit.status, codes, basis,
                                                     config.fit_for_background, RejectReason.FIT_FAILED)
    result = StampFit(outcome, background, kernels, fit.matrix, fit.vector, {}, information=fit.information,
                      deregularized=fit.deregularized)
    result.model = delta_function_models(batch.template, result.coefficients.reshape(-1, width, width))
    return result


def _fit_target(batch, half_width):
    """The science stamps on the fit region, as rows (N, F*F)."""
    return batch.fit_region(batch.science, half_width).reshape(len(batch), -1)


def stamp_normal_equations(batch, basis, config, *, ops=None, separable=None):
    """The unregularised normal equations ``M`` (N, P, P) and ``b`` (N, P) of a batch, unsolved.

    As the first step of :func:`fit_stamps` (same weighting and background
    column, ``separable`` as there), in the batch's array module.
    """
    basis = array_module_of(batch.template).asarray(basis, dtype=np.float64)
    ops = operations_for(batch.template) if ops is None else ops
    return _normal_equations(ops, batch, basis, config, separable)[-1]


def _normal_equations(ops, batch, basis, config, separable=None):
    """Design columns, target, weights, failure codes and ``(M, b)`` of a batch (``basis`` where it lives;
    ``separable``, its separable form if it has one).  Delta-function fits without a design
    (:func:`fits_delta_functions_directly`) have no columns or target (None)."""
    if fits_delta_functions_directly(separable, config):
        width = basis.shape[1]
        weights, codes = _stamp_weights(ops, batch, width // 2, True)
        return None, None, weights, codes, ops.delta_function_normal_equations(
            batch.template, batch.science, weights, width, config.fit_for_background)
    columns, target = _design(ops, batch, basis, separable)
    weights, codes = _stamp_weights(ops, batch, basis.shape[1] // 2, config.constant_variance_weighting)
    return columns, target, weights, codes, ops.stamp_normal_equations(columns, target, weights,
                                                                       config.fit_for_background)


def _difference_variance(ops, batch, kernels):
    half_width = kernels.shape[1] // 2
    convolved = ops.correlate_stamps(batch.template_variance, kernels**2, per_stamp=True)
    return batch.fit_region(batch.science_variance, half_width) + convolved


def difference_stamps(batch, kernels, background, bad_bits, *, ops=None):
    """Difference ``D = S - (T * K + bg)`` of each stamp on its fit region.

    Parameters
    ----------
    batch : StampBatch
    kernels : ndarray of shape (N, kh, kw)
        One kernel image per stamp.
    background : ndarray of shape (N,)
    bad_bits : int
        Mask bits that disqualify a pixel.
    ops : object, optional
        The operations (:func:`gpudiffim._ops.operations_for`) chosen by the
        caller once for its whole solve; chosen from the batch when omitted.

    Returns
    -------
    difference, variance : ndarray of shape (N, F, F)
        ``D`` and its variance ``V_S + sum K^2 V_T``.
    mask : ndarray of int, shape (N, F, F)
        The science mask, plus ``bad_bits`` wherever a ``bad_bits`` pixel of
        the template lies under the kernel box (the part of the ``afw``
        kernel-dilated template mask that matters for the statistics).
    """
    ops = operations_for(batch.science) if ops is None else ops
    return ops.difference_stamps(batch.planes(), kernels, background, bad_bits)


def stamp_residual_sums(batch, kernels, background, bad_bits, core_radius=None, *, rows=False, ops=None,
                        model=None):
    """Per-stamp count, sum(z) and sum(z^2) of ``z = D/sigma``, where the stamps live (no read-back).

    Parameters
    ----------
    batch : StampBatch
    kernels : ndarray of shape (N, kh, kw)
    background : ndarray of shape (N,)
    bad_bits : int
    core_radius : int, optional
        Sums over the central ``(2r+1)^2`` pixels only.
    rows : bool
        Also return every stamp's ``D/sigma`` over its whole fit region.
    ops : object, optional
        The operations (:func:`gpudiffim._ops.operations_for`) chosen by the
        caller once for its whole solve; chosen from the batch when omitted.
    model : ndarray of shape (N, F, F), optional
        ``T * K`` already formed (:attr:`StampFit.model`).

    Returns
    -------
    ndarray of shape (N, 3)
        float64 sums (:func:`~gpudiffim.statistics.statistics_of_sums` finishes
        them), or ``(sums, z)`` with ``rows``: ``z`` of shape (N, F*F), float64,
        NaN at unusable pixels (:func:`~gpudiffim.statistics.usable_normalised_residual`).
    """
    ops = operations_for(batch.science) if ops is None else ops
    return ops.stamp_residuals(batch.planes(), kernels, background, bad_bits, core_radius, rows, model)


def stamp_residual_rows(batch, kernels, background, bad_bits, *, ops=None):
    """Every stamp's ``D/sigma`` over its fit region, as rows.

    Parameters are those of :func:`stamp_residual_sums`.

    Returns
    -------
    ndarray of shape (N, F*F)
        float64, NaN at unusable pixels, in the batch's array module.
    """
    return stamp_residual_sums(batch, kernels, background, bad_bits, rows=True, ops=ops)[1]
