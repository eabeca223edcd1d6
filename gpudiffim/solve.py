"""The kernel solve loop: stamp fits, three clipping stages, spatial fit.

This is ``ip_diffim``'s ``PsfMatchTask._solve`` (spec section 5.2):

1. *Single-kernel stage*: visit up to ``n_star_per_cell`` non-BAD candidates
   per cell, fit every unbuilt one, reject on residual statistics; repeat
   until a pass rejects none (replacements from the same cell come in).
2. *Kernel-sum stage*: 3-sigma-clipped mean and scatter of the visited
   kernel sums; reject outliers beyond ``max_ksum_sigma``; restart on any
   rejection.
3. Optional PCA basis from the visited kernels, re-fit; restart on rejections.
4. *Spatial fit* of the visited candidates, then *spatial-kernel stage*:
   residual statistics under the spatial model; on rejections iterate (at
   most ``max_spatial_iterations`` times).

Unlike ``ip_diffim``, the kernel-sum and PCA restarts are bounded by
``max_solve_restarts``.  Candidates of one pass are fitted as one batch.
"""

import dataclasses
import logging
import warnings
from dataclasses import dataclass

import numpy as np
import scipy.linalg

from ._backend import array_module_of, index_dtype, on_device, single_threaded_blas, to_host
from ._ops import operations_for
from .basis import SeparableBasis, renormalize_kernel_list, separable_form
from .cellset import BAD, GOOD, RejectReason
from .delta_function import DeltaFunctionForm, delta_function_form
from .errors import FitQualityWarning, NoKernelCandidatesError, SingularSystemError
from .kernel import BackgroundModel, SpatialKernel
from .linalg import EIGENVECTOR
from .regularization import choose_lambda, regularization_record
from .spatial import SpatialFunction
from .spatial_fit import (
    kernel_sum_constraint,
    local_parameter_structure,
    solve_spatial,
    spatial_normal_equations,
    unpack_spatial,
)
from .stamps import (
    StampBatch,
    deregularization_steps,
    failure_texts,
    fits_delta_functions_directly,
    fit_stamps,
    stamp_normal_equations,
    stamp_residual_rows,
    stamp_residual_sums,
)
from .statistics import ResidualStatistics, clipped_mean_std, statistics_of_sums

__all__ = ["KernelSolution", "ResidualRows", "SpatialFit", "kernel_precision", "solve_kernel"]

log = logging.getLogger(__name__)

#: Design-matrix values (float64) per batch of stamp fits: ~200 MB.
_DESIGN_BATCH_VALUES = 25_000_000
#: Stamps of the first visit whose held-out residuals choose ``lambda`` (``lambda_type="auto"``).
_AUTO_LAMBDA_STAMPS = 16
#: On the GPU a batch may be this many times larger (~400 MB of design): fewer launches and read-backs.
_DEVICE_BATCH_FACTOR = 2
#: On the GPU, per cell, the candidates after the visited ones fitted ahead in the room a pass's batches
#: leave (:meth:`_Solver.spares`): the replacements of later passes are then mostly fitted already.
#: Six (more than the five a cell visits): on simulated 1024^2 to 4096^2 pairs (three seeds) the
#: kernel-sum restarts then find every replacement fitted but for a few tens of stamps at most, one
#: fitting pass fewer than with three (a batch's launches, read-back and ~0.5 ms of host work) for
#: ~25 % more stamp fits on the device (~0.1 ms of H100 time at 2048^2 at the rates measured).
_SPARES_PER_CELL = 6


@dataclass(frozen=True)
class _Outcome:
    """What the host needs of one fitted batch, read back in one transfer."""

    statistics: object
    failure_code: np.ndarray
    solve_status: np.ndarray
    kernel_sum: np.ndarray
    background: np.ndarray
    coefficients: np.ndarray

    @classmethod
    def unpack(cls, packed):
        """The outcome of the host rows of :func:`_read_back` (once per batch: :meth:`rows` then selects)."""
        return cls(statistics_of_sums(packed[:, :3]), packed[:, _FAILURE_COLUMN].astype(np.int8),
                   packed[:, _STATUS_COLUMN].astype(np.int8), packed[:, 5], packed[:, 6], packed[:, 7:])

    def rows(self, rows):
        """The outcome of the stamps ``rows`` (integer indices) of the batch."""
        stats = self.statistics
        return _Outcome(ResidualStatistics(stats.mean[rows], stats.rms[rows], stats.n_pixels[rows]),
                        self.failure_code[rows], self.solve_status[rows], self.kernel_sum[rows],
                        self.background[rows], self.coefficients[rows])


#: Columns of the failure code and of the solve status in the rows of :func:`_read_back`.
_FAILURE_COLUMN, _STATUS_COLUMN = 3, 4


def _read_back(xp, sums, fit):
    """The batch's residual sums and stamp-fit results, packed in one array and copied to the host once
    (host rows: 3 sums, failure code, solve status, kernel sum, background, coefficients)."""
    return to_host(xp.concatenate([sums, fit.outcome], axis=1))


#: Dimensions of the per-batch arrays the solver keeps (:meth:`_Solver.gather`).
_STORED_NDIM = {"matrix": 3, "vector": 2, "rows": 2, "information": 1, "centres": 2, "deregularized": 2}

#: Reason code of the residual clipping at each stage of :meth:`_Solver._judge`.
_RESIDUAL_REASON = {"single": int(RejectReason.SINGLE_KERNEL_RESIDUAL),
                    "spatial": int(RejectReason.SPATIAL_KERNEL_RESIDUAL)}
#: The failure code of a stamp fit that did not fail (a plain int: faster in array comparisons than the enum).
_NO_FAILURE = int(RejectReason.NONE)


@dataclass(frozen=True)
class SpatialFit:
    """Outcome of one spatial fit (:meth:`_Solver.spatial_stage`).

    Attributes
    ----------
    kernel : SpatialKernel
    background : BackgroundModel
        Zero (one zero coefficient) when no background is fitted.
    condition_number : float
        Condition number of the spatial normal matrix.
    n_candidates : int
        Candidates in the fit.
    """

    kernel: SpatialKernel
    background: BackgroundModel
    condition_number: float
    n_candidates: int


@dataclass(frozen=True)
class ResidualRows:
    """``D/sigma`` of every fitted candidate's stamp, kept for the quality report.

    Attributes
    ----------
    index : ndarray of int
        Cell-set index of each candidate with a stamp solution on the
        original basis, ascending (the order of the result's candidates).
    local, spatial : ndarray of shape (N, F*F)
        ``D/sigma`` over the fit region (``F = 2 half_size + 2 - kernel
        width``, row-major) under the candidate's own kernel and background,
        and under the final spatial model; float64, NaN at unusable pixels;
        in the fit's array module (CuPy arrays on the GPU).
    """

    index: np.ndarray
    local: object
    spatial: object


@dataclass(frozen=True)
class KernelSolution:
    """Outcome of the solve loop.

    Attributes
    ----------
    kernel : SpatialKernel
    background : BackgroundModel
    condition_number : float
        Condition number of the spatial normal matrix.
    n_spatial_candidates : int
        Candidates in the final spatial fit.
    diagnostics : dict
        Kernel sum at the centre, counts, warnings issued.
    residuals : ResidualRows or None
        None unless ``config.quality_report``.
    """

    kernel: SpatialKernel
    background: BackgroundModel
    condition_number: float
    n_spatial_candidates: int
    diagnostics: dict
    residuals: ResidualRows = None


class _Solver:
    """State of one solve: images, basis, cell set and the spatial functions.

    Candidates are referred to by their index in the cell set's arrays.
    """

    def __init__(self, config, basis, template, science, cell_set, half_size, regularization, device_centres=None):
        self.config = config
        self.basis = basis
        #: The original basis in separable form (Alard-Lupton), for the host's stamp correlations,
        #: or the mark of the delta-function basis (fitted without a design on the host).
        self.separable = separable_form(basis) or delta_function_form(basis.kernels)
        self.template, self.science = template, science
        self.cell_set = cell_set
        self.half_size = half_size
        self.regularization = regularization
        #: Stamp centres of the positions ``cell_set.id`` numbers, where the images live (or None).
        self.device_centres = device_centres
        self.bad_bits = science.bits(config.bad_mask_planes) | template.bits(config.bad_mask_planes)
        #: Where the hot operations of the whole solve run, chosen once from where the images live.
        self.ops = operations_for(template.image, science.image)
        self.xp = template.xp
        self._on_device = {}
        self.kernel_function = self.spatial_function(config.spatial_kernel_order)
        self.bg_function = self.spatial_function(config.spatial_bg_order if config.fit_for_background else 0)
        self.pca_basis = None
        #: Per fitted batch, where they were computed (device arrays on the GPU): "matrix" and
        #: "vector" of the stamp normal equations, their "n_basis" kernel unknowns, their
        #: "information" (trace over those, formed when first gathered), the stamps' int32
        #: "centres" (row, column from the images' first pixel, as cut) and, with
        #: ``quality_report``, the "rows" of D/sigma of original-basis fits; the solutions refer
        #: to them by (batch, row).
        self.batches = []
        #: (kernel, candidates, D/sigma rows) of the last spatial assessment, with ``quality_report``.
        self.assessed = None
        #: Spares fitted ahead on the original basis (:meth:`spares`), not yet visited: the batch
        #: and row of each candidate's outcome (-1: none), and per batch number its
        #: :class:`_Outcome` (unpacked once from the rows of :func:`_read_back`) and failure sentences.
        self.spare_batch = np.full(len(cell_set), -1, dtype=np.int64)
        self.spare_row = np.full(len(cell_set), -1, dtype=np.int64)
        self.outcomes = {}

    def spatial_function(self, order):
        return SpatialFunction(self.config.spatial_model_type, order, self.cell_set.bbox)

    def supported_function(self, what, order, n_candidates):
        """Spatial function of ``order``, or of the highest lower order ``n_candidates`` support.

        With ``reduce_spatial_order``, an order needs at least two candidates
        per spatial term; a reduction in the final fit is reported by
        :func:`_diagnose`.
        """
        function = self.spatial_function(order)
        if not self.config.reduce_spatial_order:
            return function
        while function.order > 0 and n_candidates < 2 * function.n_terms:
            function = self.spatial_function(function.order - 1)
        if function.order < order:
            log.debug("spatial %s order %d -> %d for %d candidates", what, order, function.order, n_candidates)
        return function

    def visit(self):
        return self.cell_set.visit(self.config.n_star_per_cell)

    def visit_built(self, key="orig"):
        """Visited candidates with a ``key`` solution; unbuilt ones become BAD."""
        visited = self.visit()
        solution = self.cell_set.solutions.get(key)
        built = solution.fitted[visited] if solution is not None else np.zeros(len(visited), dtype=bool)
        self.cell_set.reject(visited[~built], RejectReason.NOT_FITTED,
                             "not fitted before the final spatial solution")
        return visited[built]

    def in_batch_order(self, index):
        """The candidates ``index`` in the order their stamps are cut: with device centres, that of the
        positions (``cell_set.id``), so that a batch's selection goes as a mask over them
        (:meth:`~gpudiffim._ops.NumpyOperations.select_rows`); else ``index`` as given."""
        if self.device_centres is None:
            return index
        return index[np.argsort(self.cell_set.id[index], kind="stable")]

    def batch(self, index):
        """The stamps of the candidates ``index``; with device centres, only their selection goes to the device."""
        centres = np.stack([self.cell_set.x[index], self.cell_set.y[index]], axis=1)
        device_centres = None
        if self.device_centres is not None and len(index):
            device_centres = self.ops.select_rows(self.device_centres, self.cell_set.id[index])
        return StampBatch.extract(centres, self.template, self.science, self.half_size, ops=self.ops,
                                  device_centres=device_centres)

    def spatial_terms(self, function, centres_rc):
        """``function``'s terms (N, n_terms) at stamp centres ``centres_rc`` (:attr:`StampBatch.centres`),
        where the centres live: on the GPU computed there, nothing uploaded."""
        return self.ops.spatial_terms(function, centres_rc, self.science.xy0)

    def spatial_models(self, batch, kernel, background):
        """The spatial kernel images and background at the stamps of ``batch``, where the images live."""
        return (kernel.images_of_terms(self.spatial_terms(kernel.spatial_function, batch.centres)),
                background.of_terms(self.spatial_terms(background.spatial_function, batch.centres)))

    def where_images_live(self, array):
        """A host array (basis, regularisation) in the images' module, there once per solve.

        The original Alard-Lupton basis is built there from its separable form
        (its 1-D factors and mixing moved, a few kB: :meth:`SeparableBasis.kernels_in`),
        the delta-function basis as the identity (nothing moved, where 1.6 MB were at 21 x 21);
        other arrays are copied.
        """
        if array is None or not on_device(self.xp):
            return array
        key = id(array)
        if key not in self._on_device:
            self._on_device[key] = (array, self._built_on_device(array))
        return self._on_device[key][1]

    def _built_on_device(self, array):
        """``array`` in the images' module: the original basis from its form where it has one, else copied."""
        if array is self.basis.kernels and isinstance(self.separable, SeparableBasis):
            return self.separable.kernels_in(self.xp)
        if array is self.basis.kernels and isinstance(self.separable, DeltaFunctionForm):
            n = len(array)
            return self.xp.eye(n, dtype=np.float64).reshape(array.shape)
        return self.xp.asarray(array, dtype=np.float64)

    def batch_size(self, basis):
        """Candidates per stamp-fit batch: design matrices near ``_DESIGN_BATCH_VALUES`` values
        (``_DEVICE_BATCH_FACTOR`` times that on the GPU, where a batch costs launches and a read-back).

        On the GPU the delta-function fits that form their normal equations without a design
        (:func:`~gpudiffim.stamps.fits_delta_functions_directly`) hold their systems instead,
        ``(n_basis + 1)^2`` values a stamp: 2.4 times more stamps a batch at 21 x 21, so fewer
        read-backs.  The host fits them in blocks of a few stamps whatever the batch (unchanged)."""
        n_basis = len(basis)
        per_stamp = n_basis * (2 * self.half_size + 2 - self.basis.width) ** 2
        if on_device(self.xp) and basis is self.basis.kernels and fits_delta_functions_directly(self.separable,
                                                                                               self.config):
            per_stamp = (n_basis + 1) ** 2
        values = _DESIGN_BATCH_VALUES * (_DEVICE_BATCH_FACTOR if on_device(self.xp) else 1)
        return max(1, values // per_stamp)

    def core_radius(self):
        return self.config.candidate_core_radius if self.config.use_core_stats else None

    def build(self, index, basis, key, regularization):
        """Fit the candidates ``index`` with ``basis``, store under ``key``, clip; return #rejected.

        Candidates are fitted in batches sized so that the design matrices of
        a batch stay near ``_DESIGN_BATCH_VALUES`` float64 values.  On the
        original basis, those already fitted as spares take their outcome as
        it was read back (no device work), and the batches' room takes new
        spares (:meth:`spares`).
        """
        size = self.batch_size(basis)
        solution = self.cell_set.solution(key, len(basis))
        keep_rows = key == "orig" and self.config.quality_report
        keep_matrix = key == self.spatial_key()
        n_rejected = 0
        if key == "orig":
            ready = self.spare_batch[index] >= 0
            n_rejected += self._take_spares(index[ready], solution)
            index = index[~ready]
        spares = self.spares(index, size) if key == "orig" else index[:0]
        index = np.concatenate([index, spares])
        return n_rejected + sum(self._build_batch(index[start:start + size], basis, solution, regularization,
                                                  keep_rows, keep_matrix, spares)
                                for start in range(0, len(index), size))

    def spares(self, index, size):
        """Candidates to fit with ``index`` ahead of their visit: on the GPU, per cell, up to
        ``_SPARES_PER_CELL`` of those after the visited ones (the nearest first), in the room the
        batches of ``size`` that ``index`` needs leave, so that they cost neither a launch nor a
        read-back.  Their outcomes wait until a pass visits them (:meth:`build`); decisions are
        those of fitting them then.  None on the host (each fit costs CPU time there)."""
        n_visit = self.config.n_star_per_cell
        room = -len(index) % size
        if not on_device(self.xp) or not len(index) or not room or n_visit <= 0:
            return index[:0]
        solution = self.cell_set.solutions.get("orig")
        taken = self.spare_batch >= 0
        if solution is not None:
            taken |= solution.fitted
        taken[index] = True
        ranks = self.cell_set.ranks()        # the nearest first: rank n_visit + 1 of every cell, then + 2, ...
        ahead = np.flatnonzero((ranks > n_visit) & (ranks <= n_visit + _SPARES_PER_CELL) & ~taken)
        return ahead[np.argsort(ranks[ahead], kind="stable")][:room].astype(index.dtype, copy=False)

    def _take_spares(self, index, solution):
        """Store and judge the spares ``index`` from their outcomes read back before; return #rejected."""
        n_rejected = 0
        batches = self.spare_batch[index]
        for batch_id in np.unique(batches).tolist():
            mine = index[batches == batch_id]
            n_rejected += self._commit(mine, self.spare_row[mine], batch_id, solution)
            self.spare_batch[mine] = self.spare_row[mine] = -1
        return n_rejected

    def _commit(self, index, rows, batch_id, solution):
        """Store rows ``rows`` of fitted batch ``batch_id`` as the solutions of ``index`` and judge them."""
        batch_outcome, failures = self.outcomes[batch_id]
        outcome = batch_outcome.rows(rows)
        solution.store(index, outcome.coefficients, outcome.background, outcome.kernel_sum, batch_id, rows)
        return self._judge(index, outcome.statistics, "single", self.config.single_kernel_clipping,
                           outcome.failure_code, _RowsOf(failures, rows))[1]

    def spatial_key(self):
        """The solutions the spatial fit uses ("pca" or "orig"): only theirs keep their normal matrices."""
        return "pca" if self.config.pca_spatial_kernel else "orig"

    def _build_batch(self, index, basis, solution, regularization, keep_rows, keep_matrix, spares):
        """Fit one batch where the images live, read its outcome back once, store and judge it
        (the ``spares`` among ``index``: keep their outcome for their visit).

        The stamps whose rank-deficient systems the device left unsolved
        (:attr:`~gpudiffim.stamps.StampFit.deferred`; rare) are fitted again
        with the pseudo-inverse: one more read-back, in the batches that have some.
        """
        separable = self.separable if basis is self.basis.kernels else None
        index = self.in_batch_order(index)
        basis = self.where_images_live(basis)
        regularization = self.where_images_live(regularization)
        centres, fit, packed, rows = self._fit_batch(index, basis, separable, regularization, keep_rows,
                                                     keep_matrix, defer=True)
        redo = np.flatnonzero(packed[:, _STATUS_COLUMN] == EIGENVECTOR) if fit.deferred else []
        if len(redo):
            _, _, packed[redo], redo_rows = self._fit_batch(index[redo], basis, separable, regularization,
                                                            keep_rows, keep_matrix, defer=False)
            if keep_rows:
                rows[self.xp.asarray(redo)] = redo_rows
        stored = {"matrix": fit.normal_matrix, "vector": fit.normal_vector, "rows": rows, "n_basis": len(basis),
                  "centres": centres}
        if fit.information is not None:         # formed by the fit where the matrices are not kept
            stored["information"] = fit.information
        outcome = _Outcome.unpack(packed)
        if fit.deregularized is not None:       # the PCA basis's kernels; redone stamps keep their solution
            stored["deregularized"] = fit.deregularized
            if len(redo):
                stored["deregularized"][self.xp.asarray(redo)] = self.xp.asarray(outcome.coefficients[redo])
        batch_id = len(self.batches)
        self.batches.append(stored)
        self.outcomes[batch_id] = (outcome, failure_texts(outcome.failure_code, outcome.solve_status,
                                                          fit.condition))
        ahead = _members(spares, len(self.cell_set))[index]
        self.spare_batch[index[ahead]], self.spare_row[index[ahead]] = batch_id, np.flatnonzero(ahead)
        return self._commit(index[~ahead], np.flatnonzero(~ahead), batch_id, solution)

    def _fit_batch(self, index, basis, separable, regularization, keep_rows, keep_matrix, defer):
        """``(stamp centres, fit, host outcome rows of _read_back, D/sigma rows or None)`` of the stamps
        ``index`` (the centres as :attr:`StampBatch.centres`)."""
        batch = self.batch(index)
        fit = fit_stamps(batch, basis, self.config, regularization, ops=self.ops, separable=separable,
                         keep_matrix=keep_matrix, defer_rank_deficient=defer)
        sums = stamp_residual_sums(batch, fit.kernels, fit.background,
                                   self.bad_bits, self.core_radius(), rows=keep_rows, ops=self.ops, model=fit.model)
        sums, rows = sums if keep_rows else (sums, None)
        return batch.centres, fit, _read_back(self.xp, sums, fit), rows

    def _judge(self, index, stats, stage, clipping, failure_code=None, failures=None):
        """Record residual statistics (host), mark GOOD or BAD; return (#good, #rejected).

        ``failure_code`` and ``failures`` (codes and sentences of the stamp
        fits) take precedence over the residual statistics.
        """
        config = self.config
        means, rmses, counts = stats.mean, stats.rms, stats.n_pixels
        self.cell_set.record_stats(stage, index, means, rmses, counts)
        mean_max, std_max = config.candidate_residual_mean_max, config.candidate_residual_std_max
        if clipping:        # NaN compares false: a non-finite statistic fails a finite limit
            acceptable = (np.abs(means) <= mean_max) & (rmses <= std_max)
            if not (np.isfinite(mean_max) and np.isfinite(std_max)):
                acceptable &= np.isfinite(means) & np.isfinite(rmses)
        else:
            acceptable = np.isfinite(means) & np.isfinite(rmses)
        if failure_code is None:
            failed, rejected = None, np.flatnonzero(~acceptable)
        else:
            failed = failure_code != _NO_FAILURE
            rejected = np.flatnonzero(failed | ~acceptable)
        self.cell_set.mark_good(index)
        if len(rejected):
            stage_code = _RESIDUAL_REASON[stage]
            codes = stage_code if failed is None else np.where(failed[rejected], failure_code[rejected], stage_code)
            reasons = [failures[k] if failed is not None and failed[k] else
                       _clip_reason(config, means[k], rmses[k], f"{stage}-kernel", clipping) for k in rejected]
            self.cell_set.reject(index[rejected], codes, reasons)
        return len(index) - len(rejected), len(rejected)

    def choose_regularization(self):
        """With ``lambda_type="auto"``, choose ``lambda`` on held-out stamps of the first visit.

        Up to ``_AUTO_LAMBDA_STAMPS`` visited candidates, spread over the
        visit order (so over the cells); every later stamp fit uses the
        chosen ``lambda`` as an absolute one.  Returns the
        :class:`~gpudiffim.regularization.LambdaChoice`, or None when no
        choice is made (no regularisation, another ``lambda_type``, fewer
        than two candidates: then ``lambda_value`` is used).
        """
        if self.regularization is None or self.config.lambda_type != "auto":
            return None
        visited = self.visit()
        if len(visited) < 2:
            log.warning("regularisation lambda: %d candidate(s), too few to choose; lambda_value %.3g used",
                        len(visited), self.config.lambda_value)
            self.config = dataclasses.replace(self.config, lambda_type="absolute")
            return None
        picks = np.unique(np.linspace(0, len(visited) - 1, min(len(visited), _AUTO_LAMBDA_STAMPS)).astype(int))
        subset = visited[picks]
        matrix, vector = stamp_normal_equations(self.batch(subset), self.where_images_live(self.basis.kernels),
                                                self.config, ops=self.ops, separable=self.separable)
        choice = choose_lambda(matrix, vector, self.cell_set.x[subset], self.cell_set.y[subset],
                               self.regularization, self.basis.n_basis,
                               placed=self.where_images_live(self.regularization))
        self.config = dataclasses.replace(self.config, lambda_type="absolute", lambda_value=choice.value)
        return choice

    def single_kernel_stage(self):
        """Build unbuilt visited candidates until a pass rejects none."""
        passes = 0
        while True:
            visited = self.visit()
            solution = self.cell_set.solutions.get("orig")
            unbuilt = visited if solution is None else visited[~solution.fitted[visited]]
            n_rejected = self.build(unbuilt, self.basis.kernels, "orig", self.regularization)
            passes += 1
            log.debug("single-kernel pass %d: built %d, rejected %d", passes, len(unbuilt), n_rejected)
            if n_rejected == 0:
                return

    def kernel_sum_stage(self):
        """Reject kernel-sum outliers among the visited candidates; return #rejected."""
        visited = self.visit()
        sums = self.cell_set.solutions["orig"].kernel_sum[visited]
        if sums.size == 0:
            msg = "no kernel candidate left for the kernel-sum statistics"
            raise NoKernelCandidatesError(msg)
        mean, std = clipped_mean_std(sums)
        if not (np.isfinite(mean) and np.isfinite(std)):
            msg = "kernel-sum statistics are not finite"
            raise NoKernelCandidatesError(msg)
        limit = self.config.max_ksum_sigma * std
        log.info("kernel sum: clipped mean %.6g, std %.3g over %d candidates", mean, std, sums.size)
        if not self.config.kernel_sum_clipping:
            return 0
        outliers = np.flatnonzero(np.abs(sums - mean) > limit)
        why = f" differs from the clipped mean {mean:.4g} by more than {self.config.max_ksum_sigma} sigma ({std:.3g})"
        self.cell_set.reject(visited[outliers], RejectReason.KERNEL_SUM,
                             [f"kernel sum {value:.4g}{why}" for value in sums[outliers].tolist()])
        return len(outliers)

    def pca_stage(self):
        """Build the PCA basis from the visited kernels and re-fit; return #rejected.

        The PCA solutions of an earlier basis are dropped: they do not apply
        to the new one.
        """
        visited = self.visit_built()
        orig = self.cell_set.solutions["orig"]
        # the original fits kept their kernels with the regularisation's smoothing taken out
        deregularized = deregularization_steps(self.config, self.regularization, self.separable) > 0
        if deregularized:
            (coefficients,) = self.gather(visited, "orig", "deregularized")
            coefficients = to_host(coefficients)
        else:
            coefficients = orig.coefficients[visited]
        if isinstance(self.separable, DeltaFunctionForm):   # identity basis: the images are the coefficients
            images = coefficients.reshape((len(visited),) + self.basis.kernels.shape[1:])
        else:
            images = np.tensordot(coefficients, self.basis.kernels, axes=1)
        sums = images.sum(axis=(1, 2)) if deregularized else orig.kernel_sum[visited]
        images = images / sums[:, None, None]
        weights = None
        if self.config.pca_weights == "precision":
            (information,) = self.gather(visited, "orig", "information")
            weights = kernel_precision(to_host(information), self.basis.n_basis, orig.kernel_sum[visited])
        terms = None
        if self.config.pca_method == "spatial":       # the spatial stage's function (same reduction)
            function = self.supported_function("kernel", self.config.spatial_kernel_order, len(visited))
            terms = function.terms(self.cell_set.x[visited], self.cell_set.y[visited])
        self.pca_basis = pca_kernel_basis(images, self.config.pca_components,
                                          self.config.subtract_mean_for_pca, weights, terms)
        self.cell_set.solutions.pop("pca", None)
        return self.build(visited, self.pca_basis, "pca", None)

    def spatial_stage(self):
        """Fit the spatial model to the visited candidates; return a :class:`SpatialFit`."""
        config = self.config
        basis = self.pca_basis if config.pca_spatial_kernel else self.basis.kernels
        key = self.spatial_key()
        used = self.visit_built(key)
        if not len(used):
            msg = "no kernel candidate available for the spatial fit"
            raise NoKernelCandidatesError(msg)
        self.kernel_function = self.supported_function("kernel", config.spatial_kernel_order, len(used))
        if config.fit_for_background:
            self.bg_function = self.supported_function("background", config.spatial_bg_order, len(used))
        matrices, vectors, centres = self.gather(used, key, "matrix", "vector", "centres")
        bg_terms = self.spatial_terms(self.bg_function, centres) if config.fit_for_background else None
        n_sum = self.spatial_function(config.kernel_sum_order(self.kernel_function.order)).n_terms
        maps = local_parameter_structure(self.spatial_terms(self.kernel_function, centres), bg_terms, len(basis),
                                         config.constant_first_term, n_sum)
        matrix, vector = spatial_normal_equations(matrices, vectors, maps, ops=self.ops)
        constraint = None if config.constant_first_term else kernel_sum_constraint(
            basis.sum(axis=(1, 2)), self.kernel_function.n_terms, n_sum, len(vector))
        theta, cond, method = solve_spatial(matrix, vector, config.condition_number_type, constraint)
        n_bg = self.bg_function.n_terms if config.fit_for_background else 0
        coefficients, bg = unpack_spatial(theta, len(basis), self.kernel_function.n_terms, n_bg,
                                          config.constant_first_term, n_sum)
        if not config.fit_for_background:
            bg = np.zeros(1)
        log.info("spatial fit: %d candidates, %d unknowns, condition number %.3g (%s)",
                 len(used), len(theta), cond, method)
        kernel = SpatialKernel(basis, coefficients, self.kernel_function)
        if on_device(self.xp):
            kernel.place_basis(self.where_images_live(basis))
        return SpatialFit(kernel, BackgroundModel(bg, self.bg_function), cond, len(used))

    def gather(self, index, key, *names):
        """Rows of the per-batch arrays ``names`` for the candidates ``index`` (solution ``key``).

        The batches' arrays are concatenated and indexed once per name, in the
        batches' array module: on the GPU the stamp normal equations never
        leave the device, and the only upload is the row index.  Returns one
        stacked array per name, in the order of ``index``.
        """
        solution = self.cell_set.solutions[key]
        batches, rows = solution.batch[index], solution.row[index]
        used = np.unique(batches)
        if not len(used):
            return tuple(np.zeros((0,) * _STORED_NDIM[name]) for name in names)
        sizes = np.array([len(self.batches[batch_id]["vector"]) for batch_id in used])
        starts = np.cumsum(sizes) - sizes
        stored = [[self._stored(batch_id, name) for batch_id in used] for name in names]
        xp = array_module_of(stored[0][0])
        where = xp.asarray((starts[np.searchsorted(used, batches)] + rows).astype(index_dtype(sizes.sum())))
        return tuple((parts[0] if len(parts) == 1 else xp.concatenate(parts))[where] for parts in stored)

    def _stored(self, batch_id, name):
        """Array ``name`` of fitted batch ``batch_id``; its "information", ``tr(M_kk)``, formed when first asked."""
        stored = self.batches[batch_id]
        if name == "information" and name not in stored:
            n_basis, matrix = stored["n_basis"], stored["matrix"]
            stored[name] = array_module_of(matrix).trace(matrix[:, :n_basis, :n_basis], axis1=1, axis2=2)
        return stored[name]

    def residual_rows(self, kernel, background):
        """:class:`ResidualRows` of every original-basis fit under its own and the final spatial model.

        The local rows were kept as the candidates were fitted, and the
        spatial ones of the candidates the last assessment judged under this
        same ``kernel``; the others (candidates rejected before, or every one
        when the spatial fit was redone after the assessment) take one more
        pass over their stamps, in batches of about ``_DESIGN_BATCH_VALUES / 16``
        stamp pixels.
        """
        index = np.flatnonzero(self.cell_set.solutions["orig"].fitted)
        (local,) = self.gather(index, "orig", "rows")
        xp = array_module_of(local)
        assessed_kernel, assessed, assessed_rows = self.assessed or (None, index[:0], local[:0])
        if assessed_kernel is not kernel:
            assessed, assessed_rows = index[:0], local[:0]
        missing = index[~_members(assessed, len(self.cell_set))[index]]
        size = max(1, _DESIGN_BATCH_VALUES // (16 * (2 * self.half_size + 1) ** 2))
        parts, candidates = [assessed_rows], [assessed]
        for start in range(0, len(missing), size):
            part = self.in_batch_order(missing[start:start + size])
            batch = self.batch(part)
            parts.append(stamp_residual_rows(batch, *self.spatial_models(batch, kernel, background),
                                             self.bad_bits, ops=self.ops))
            candidates.append(part)
        order = np.argsort(np.concatenate(candidates), kind="stable")
        order = xp.asarray(order.astype(index_dtype(len(order))))
        spatial = xp.concatenate(parts)[order]
        return ResidualRows(index, local, spatial)

    def reduced_orders(self):
        """``(what, function, configured order)`` of each model the last spatial fit used at a lower order."""
        config = self.config
        models = [("kernel", self.kernel_function, config.spatial_kernel_order)]
        if config.fit_for_background:
            models.append(("background", self.bg_function, config.spatial_bg_order))
        return [(what, function, order) for what, function, order in models if function.order < order]

    def assess_stage(self, kernel, background):
        """Residual statistics under the spatial model; return (#good, #rejected).

        A model of reduced order (too few candidates for the configured one)
        is a fallback: its statistics are recorded but do not reject, or the
        candidates that forced the reduction would be clipped against it.

        With ``quality_report`` the stamps of the other fitted candidates
        (rejected before) go in the same batch, their rows kept and their
        statistics not judged: :meth:`residual_rows` then needs no pass of its
        own when this model is the final one (the usual case).
        """
        visited = self.visit_built()
        if not len(visited):
            return 0, 0
        keep_rows = self.config.quality_report
        in_visit = _members(visited, len(self.cell_set))
        others = (np.flatnonzero(self.cell_set.solutions["orig"].fitted & ~in_visit) if keep_rows
                  else visited[:0])
        stamps = self.in_batch_order(np.concatenate([visited, others]))
        batch = self.batch(stamps)
        kernels, bg = self.spatial_models(batch, kernel, background)
        sums = stamp_residual_sums(batch, kernels, bg, self.bad_bits,
                                   self.core_radius(), rows=keep_rows, ops=self.ops)
        if keep_rows:
            sums, rows = sums
            self.assessed = (kernel, stamps, rows)
        judged = in_visit[stamps] if len(others) else slice(None)
        stats = statistics_of_sums(to_host(sums)[judged])
        clipping = self.config.spatial_kernel_clipping and not self.reduced_orders()
        if self.config.spatial_kernel_clipping and not clipping:
            log.info("spatial-kernel clipping skipped: the spatial order was reduced for %d candidates",
                     len(visited))
        return self._judge(stamps[judged], stats, "spatial", clipping)


def _members(index, n):
    """Boolean mask of length ``n``, True at the candidates ``index``: membership tests of candidate
    indices by lookup (``np.isin`` and ``np.setdiff1d`` sort, ~10-200 us a call on the solve's sizes)."""
    mask = np.zeros(n, dtype=bool)
    mask[index] = True
    return mask


class _RowsOf:
    """``items[rows[k]]`` for ``k``: a batch's failure sentences for some of its rows, read only for
    the few rejected (no list of thousands of empty sentences)."""

    __slots__ = ("items", "rows")

    def __init__(self, items, rows):
        self.items, self.rows = items, rows

    def __getitem__(self, k):
        return self.items[self.rows[k]]


def _clip_reason(config, mean, rms, stage, clipping):
    """Why residual statistics (mean, rms) reject a candidate at ``stage`` ("" if they do not)."""
    if not (np.isfinite(mean) and np.isfinite(rms)):
        return f"{stage} residual statistics undefined (no usable pixel)"
    if not clipping:
        return ""
    if abs(mean) > config.candidate_residual_mean_max:
        return f"{stage} residual |mean| {abs(mean):.3g} > {config.candidate_residual_mean_max}"
    if rms > config.candidate_residual_std_max:
        return f"{stage} residual rms {rms:.3g} > {config.candidate_residual_std_max}"
    return ""


def pca_kernel_basis(images, n_components, subtract_mean, weights=None, terms=None):
    """PCA basis of kernel images (``ip_diffim`` ``_createPcaBasis``), optionally led by their spatial fit.

    Parameters
    ----------
    images : ndarray of shape (N, kh, kw)
        Kernel images, each divided by its kernel sum.
    n_components : int
        Kernels kept, the mean included when ``subtract_mean``.
    subtract_mean : bool
        Subtract the mean image first and prepend it to the basis.
    weights : ndarray of shape (N,), optional
        Weight of each image in the mean and the scatter matrix (e.g.
        :func:`kernel_precision`); equal weights (``ip_diffim``) when omitted.
    terms : ndarray of shape (N, T), optional
        The spatial kernel function's terms at the images' positions
        (``pca_method="spatial"``).  The basis then takes, after the mean,
        the directions of the images' weighted least-squares fit by the
        terms (:func:`_spatial_directions`: at most ``T``, largest first),
        and the eigen-images of what the fit leaves after them.  With one
        term (a constant) it is the PCA above.

    Returns
    -------
    ndarray of shape (n, kh, kw)
        Renormalised basis (sum 1 for the first, 0 for the others).
    """
    images = np.asarray(images, dtype=np.float64)
    weights = np.full(len(images), 1.0 / len(images)) if weights is None else weights / np.sum(weights)
    kernels = []
    if subtract_mean:
        mean = np.tensordot(weights, images, axes=1)
        images = images - mean
        kernels.append(mean)
    floor = None
    if terms is not None and np.shape(terms)[1] > 1:
        # what the fit leaves may be round-off alone: its eigenvalues are judged against all the images'
        floor = np.sum(images**2 * weights[:, None, None]) * len(images) / images[0].size
        directions, images = _spatial_directions(images, weights, np.asarray(terms, dtype=np.float64))
        kernels += _peak_scaled(directions, images.shape[1:])
    flat = images.reshape(len(images), -1) * np.sqrt(weights * len(images))[:, None]
    n_images, n_pixels = flat.shape
    if n_images == 1:
        kernels += _peak_scaled(flat, images.shape[1:])
    else:
        # the eigen-images of the images' Gram matrix are the eigenvectors of their pixel scatter
        # matrix (same non-zero eigenvalues), up to scale and sign, which the peak scaling removes:
        # the smaller of the two is decomposed (N x N up to N = 441 delta-function kernels)
        by_images = n_images <= n_pixels
        with single_threaded_blas():   # a multi-threaded eigh of 441^2 stalled for ~1 s on a busy machine
            scatter = scipy.linalg.blas.dsyrk(1.0 / n_pixels, flat if by_images else flat.T, lower=1)
        wanted = max(1, n_components - len(kernels))      # the mean, when subtracted, is the first kernel
        for n_largest in (min(len(scatter), wanted + _PCA_SPARE_COMPONENTS), len(scatter)):
            eigen_images = _leading_eigen_images(scatter, flat, by_images, n_images, n_largest, floor)
            found = _peak_scaled(eigen_images, images.shape[1:])
            if len(found) >= wanted or n_largest == len(scatter):
                break
        kernels += found
    kept = [k for k in kernels[:n_components] if np.all(np.isfinite(k))]
    return renormalize_kernel_list(np.array(kept))


def _spatial_directions(images, weights, terms):
    """Directions (r, P) of the weighted least-squares fit of ``images`` (N, kh, kw) by ``terms`` (N, T),
    largest first, and the images less the fit.

    The fit ``T_n B`` is the kernel field a spatial model of these terms
    can follow, with each kernel pixel's noise averaged over all N images;
    its directions are the right singular vectors of ``R B`` (``R`` from the
    QR factorisation of the weighted terms: the fitted field has rank at
    most ``T``).  Directions whose singular value is below ``sqrt(eps)`` of
    the largest, or of the images' weighted norm, are dropped: a
    mean-subtracted constant term fits nothing, and the direction of its
    round-off (3e-17 of a norm of 0.02 on a 256^2 pair) is arbitrary; kept,
    it made the host's and the GPU's bases differ.
    """
    flat = images.reshape(len(images), -1)
    root = np.sqrt(weights)[:, None]
    orthonormal, triangular = np.linalg.qr(terms * root)
    coefficients = orthonormal.T @ (flat * root)                       # R B: the fit in the terms' frame
    fit = np.linalg.lstsq(triangular, coefficients, rcond=None)[0]      # B
    _, values, directions = np.linalg.svd(coefficients, full_matrices=False)
    scale = max(values.max(initial=0.0), np.linalg.norm(flat * root))
    kept = directions[values > np.sqrt(np.finfo(np.float64).eps) * scale]
    return kept, (flat - terms @ fit).reshape(images.shape)


#: Eigen-images found beyond those a PCA basis keeps (in case some are dropped: all zero); the full
#: decomposition only if they do not suffice.
_PCA_SPARE_COMPONENTS = 5


def _leading_eigen_images(scatter, flat, by_images, n_images, n_largest, floor=None):
    """The eigen-images of the ``n_largest`` largest eigenvalues of ``scatter`` (its lower triangle),
    largest first, those at round-off dropped: only they are decomposed (LAPACK ``syevr`` on a subset:
    ~8 ms against ~19 ms for every eigenvector of a 441^2 matrix).  Round-off is ``n_images eps`` of the
    largest eigenvalue, or of ``floor`` when larger (the total scatter, of which ``scatter`` is a part)."""
    size = len(scatter)
    with single_threaded_blas():
        values, vectors = scipy.linalg.eigh(scatter, lower=True, subset_by_index=[size - n_largest, size - 1],
                                            driver="evr", check_finite=False)
    order = np.argsort(values)[::-1][:100]
    if not values.max() > 0:
        if floor:       # after the spatial fit: it left nothing
            return np.zeros((0, flat.shape[1]))
        msg = "kernel PCA failed: every eigenvalue is zero"
        raise SingularSystemError(msg)
    # eigenvalues at round-off (N images less their mean span N - 1 dimensions) have
    # arbitrary eigen-images; ip_diffim keeps them, scaled up to a peak of 1
    largest = values.max() if floor is None else max(values.max(), floor)
    order = order[values[order] > n_images * np.finfo(np.float64).eps * largest]
    return vectors[:, order].T @ flat if by_images else vectors[:, order].T


def _peak_scaled(eigen_images, shape):
    """Each eigen-image divided by its value of largest magnitude, as a kernel of ``shape`` (all-zero ones
    dropped)."""
    kernels = []
    for image in eigen_images:
        extreme = image[np.argmax(np.abs(image))]
        if extreme != 0:
            kernels.append((image / extreme).reshape(shape))
    return kernels


def kernel_precision(information, n_basis, kernel_sums):
    """Precision of each stamp's kernel-sum-normalised kernel: ``K^2 tr(M_kk) / n_basis``.

    A stamp's kernel pixels have variances about ``1 / diag(M)``, so a
    normalised kernel ``k / K`` is known to about ``K^2 diag(M)``: a bright
    star's kernel is known far better than a faint one's, and the PCA of
    delta-function kernels weighted equally (``ip_diffim``) is led by the
    noise of the faint ones.

    Parameters
    ----------
    information : ndarray of shape (N,)
        ``tr(M_kk)``, the trace of each stamp's normal matrix over the
        kernel unknowns (host).
    n_basis : int
        Kernel unknowns.
    kernel_sums : ndarray of shape (N,)
        Host kernel sums.

    Returns
    -------
    ndarray of shape (N,)
        Host weights.
    """
    return np.asarray(kernel_sums, dtype=np.float64) ** 2 * np.asarray(information, dtype=np.float64) / n_basis


def _all_rejected_message(cell_set):
    summary = ", ".join(f"{n} by {label}" for label, n in cell_set.rejection_counts().items())
    return f"every kernel candidate was rejected ({summary}); see the candidates' reasons"


def _diagnose(solver, solution, n_kernel_terms, n_bg_terms):
    """Warn about poorly constrained fits (``_diagnostic`` of ``ip_diffim``); ``solution`` is a :class:`SpatialFit`."""
    config, cell_set = solver.config, solver.cell_set
    n_good, n_bad = cell_set.count(GOOD), cell_set.count(BAD)
    kernel, cond = solution.kernel, solution.condition_number
    x0, y0, x1, y1 = cell_set.bbox
    diagnostics = {"kernel_sum_at_centre": kernel.kernel_sum(0.5 * (x0 + x1), 0.5 * (y0 + y1)),
                   "spatial_condition_number": cond, "n_good": n_good, "n_bad": n_bad,
                   "spatial_kernel_order": solver.kernel_function.order,
                   "spatial_bg_order": solver.bg_function.order, "warnings": []}

    def complain(message, warn=True):
        diagnostics["warnings"].append(message)
        if warn:
            warnings.warn(message, FitQualityWarning, stacklevel=4)
        else:
            log.warning(message)

    for what, function, order in solver.reduced_orders():
        wanted = solver.spatial_function(order).n_terms
        complain(f"spatial {what} order lowered from {order} to {function.order}: {solution.n_candidates} "
                 f"candidate(s) in the spatial fit, and order {order} ({wanted} terms) needs two per "
                 f"term; no spatial-kernel clipping under the lowered model "
                 f"(reduce_spatial_order=False keeps the order)", warn=False)
    if cond > config.max_spatial_condition_number:
        complain(f"spatial condition number {cond:.3g} exceeds {config.max_spatial_condition_number:.3g}: "
                 f"the spatial model or the basis has more freedom than the candidates constrain")
    if n_bad > 2 * n_good:
        complain(f"many rejected candidates: {n_bad} BAD for {n_good} GOOD", warn=False)
    for what, n_terms in (("kernel", n_kernel_terms), ("background", n_bg_terms)):
        if n_terms and n_good < n_terms:
            option = "spatial_kernel_order" if what == "kernel" else "spatial_bg_order"
            complain(f"spatial {what} model underconstrained: {n_good} GOOD candidates "
                     f"for {n_terms} spatial terms; lower {option}, give more candidates, or let "
                     f"reduce_spatial_order=True lower it")
        elif n_terms and n_good <= 2 * n_terms:
            complain(f"spatial {what} model poorly constrained: {n_good} GOOD candidates "
                     f"for {n_terms} spatial terms", warn=False)
    return diagnostics


def solve_kernel(config, basis, template, science, cell_set, half_size, regularization=None, *,
                 device_centres=None):
    """Run the solve loop and return the spatial kernel and background.

    Parameters
    ----------
    config : PsfMatchConfig
    basis : KernelBasis
        Basis of the kernel (``.kernels`` of shape (n, kh, kw)).
    template, science : MaskedImage
        Image to convolve and image matched to.
    cell_set : SpatialCellSet
        Candidates; their status, reasons and statistics are updated.
    half_size : int
        Stamp half-size.
    regularization : ndarray, optional
        Regularisation matrix ``H`` for the stamp fits (delta-function basis).
    device_centres : ndarray of int32, shape (n, 2), optional
        Where the images live, the ``(row, column)`` stamp centre (from the
        images' first pixel) of every position that ``cell_set.id`` numbers
        (:func:`~gpudiffim.candidates.detected_centres`): a batch then
        uploads the index of its candidates instead of their centres.

    Returns
    -------
    KernelSolution

    Raises
    ------
    NoKernelCandidatesError
        When clipping leaves no candidate, or restarts exceed ``max_solve_restarts``.
    """
    # BLAS on one thread for the whole loop: the host parallelism is host_map's.  After a
    # multi-threaded BLAS call on the main thread (a small product between batches) OpenBLAS's idle
    # worker keeps spinning on the other core, where the next batch's host threads run: at 2048^2
    # with the delta-function basis the stamp fits took 3.9 s of CPU instead of 3.3 (wall 2.0 -> 1.8 s).
    with single_threaded_blas():
        return _solve_kernel(config, basis, template, science, cell_set, half_size, regularization,
                             device_centres)


def _solve_kernel(config, basis, template, science, cell_set, half_size, regularization, device_centres):
    """:func:`solve_kernel`'s loop (BLAS limited by the caller)."""
    solver = _Solver(config, basis, template, science, cell_set, half_size, regularization, device_centres)
    lambda_choice = solver.choose_regularization()
    iteration = restarts = 0
    n_rejected = 0
    while iteration < config.max_spatial_iterations:
        solver.single_kernel_stage()
        if not cell_set.has_usable_cells():
            raise NoKernelCandidatesError(_all_rejected_message(cell_set))
        if solver.kernel_sum_stage() > 0 or (config.pca_spatial_kernel
                                             and solver.pca_stage() > 0):
            restarts += 1
            if restarts > config.max_solve_restarts:
                msg = f"kernel-sum/PCA clipping still rejecting after {config.max_solve_restarts} restarts"
                raise NoKernelCandidatesError(msg)
            continue
        solution = solver.spatial_stage()
        n_good, n_rejected = solver.assess_stage(solution.kernel, solution.background)
        log.info("spatial iteration %d: %d GOOD, %d rejected", iteration + 1, n_good, n_rejected)
        if n_good == 0 and n_rejected == 0:
            msg = "no kernel candidate could be assessed against the spatial model"
            raise NoKernelCandidatesError(msg)
        if n_rejected == 0:
            break
        iteration += 1
    if n_rejected > 0 and iteration == config.max_spatial_iterations:
        if config.pca_spatial_kernel:
            solver.pca_stage()
        solution = solver.spatial_stage()
    n_bg_terms = solver.bg_function.n_terms if config.fit_for_background else 0
    diagnostics = _diagnose(solver, solution, solver.kernel_function.n_terms, n_bg_terms)
    diagnostics["regularization"] = regularization_record(config, regularization, lambda_choice)
    residuals = solver.residual_rows(solution.kernel, solution.background) if config.quality_report else None
    return KernelSolution(solution.kernel, solution.background, solution.condition_number,
                          solution.n_candidates, diagnostics, residuals)
