"""The spatial cell set: kernel candidates and their fit results, as arrays.

Candidates live in a grid of cells of ``size_cell_x`` x ``size_cell_y``
pixels, each keeping its candidates in descending rating order; at most
``n_star_per_cell`` non-BAD candidates per cell take part in a fit, so a
rejected candidate is replaced by the next one of its cell on the next pass
(``ip_diffim``'s ``SpatialCellSet`` and ``KernelCandidate``, spec section 5).

The state is held as a struct of arrays, one entry per candidate in cell
order then rating order: positions, ratings, statuses, stamp solutions and
residual statistics.  A visit, a clipping decision or a gather of stamp
systems is then a handful of array operations whatever the number of
candidates, instead of a Python loop over candidate objects; the per-record
view (:class:`CandidateRecord`) is only built when a user asks for it.

Positions are parent-pixel coordinates (x = column, y = row).
"""

import enum
import functools
import numbers
from dataclasses import dataclass, field

import numpy as np

from .errors import ConfigurationError

__all__ = ["Candidates", "SpatialCellSet", "StampSolutions", "CandidateRecord", "KernelCellSet",
           "RejectReason", "rejection_counts", "UNKNOWN", "GOOD", "BAD"]

UNKNOWN, GOOD, BAD = "UNKNOWN", "GOOD", "BAD"

#: Status names by code (the cell set stores codes).
_STATUS_NAMES = np.array([UNKNOWN, GOOD, BAD])
_CODE = {name: code for code, name in enumerate(_STATUS_NAMES)}


class RejectReason(enum.IntEnum):
    """Why a kernel candidate was rejected: an integer code and its display ``label``.

    The cell set stores one code per candidate (:data:`NONE` while it is not
    rejected) beside the full sentence of its reason, which carries the
    numbers; counts and summaries go by code, and show the label.  The
    labels of the fit stages are the opening words of their sentences
    ("kernel sum 1.12 differs from ..." is a :data:`KERNEL_SUM` rejection).

    The first three are selection rejects: positions dropped before they
    enter the cell set (:attr:`KernelCellSet.selection_rejects`).

    Examples
    --------
    >>> RejectReason.KERNEL_SUM.label
    'kernel sum'
    >>> RejectReason(8) is RejectReason.KERNEL_SUM
    True
    """

    def __new__(cls, code, label):
        member = int.__new__(cls, code)
        member._value_ = code
        member.label = label
        return member

    #: Not rejected.
    NONE = 0, ""
    #: Selection: the stamp does not lie inside the image.
    STAMP_OUTSIDE = 1, "stamp outside the image"
    #: Selection: a bad mask bit in the stamp of either image.
    BAD_MASK = 2, "bad mask bit in the stamp"
    #: Selection: core S/N below ``detection.min_snr``.
    LOW_SNR = 3, "core S/N below detection.min_snr"
    #: Stamp fit: a variance pixel of the stamp is zero or negative.
    NONPOSITIVE_VARIANCE = 4, "non-positive variance"
    #: Stamp fit: the normal matrix is worse conditioned than the limit.
    CONDITION_NUMBER = 5, "condition number"
    #: Stamp fit: the solver failed.
    FIT_FAILED = 6, "stamp fit"
    #: Residual statistics under the candidate's own kernel (clipped or undefined).
    SINGLE_KERNEL_RESIDUAL = 7, "single-kernel residual"
    #: Kernel sum beyond ``max_ksum_sigma`` of the clipped mean.
    KERNEL_SUM = 8, "kernel sum"
    #: Residual statistics under the spatial model (clipped or undefined).
    SPATIAL_KERNEL_RESIDUAL = 9, "spatial-kernel residual"
    #: Visited but never fitted before the final spatial solution.
    NOT_FITTED = 10, "not fitted"


def rejection_counts(codes):
    """Number of rejections per reason, as ``{label: n}`` sorted by label.

    Parameters
    ----------
    codes : array_like of int
        :class:`RejectReason` codes; :data:`RejectReason.NONE` is not counted.

    Returns
    -------
    dict of str to int
        Only the reasons that occur.

    Examples
    --------
    >>> rejection_counts([0, 8, 7, 8])
    {'kernel sum': 2, 'single-kernel residual': 1}
    """
    values, counts = np.unique(np.asarray(codes, dtype=np.int64), return_counts=True)
    labelled = {RejectReason(int(v)).label: int(n) for v, n in zip(values, counts) if v != RejectReason.NONE}
    return dict(sorted(labelled.items()))


@dataclass(frozen=True)
class Candidates:
    """Vetted kernel candidates as parallel arrays.

    Attributes
    ----------
    id : ndarray of int64, shape (n,)
        Identifier, in input (or detection) order.
    x, y : ndarray of int64, shape (n,)
        Parent-pixel centre of the stamp.
    rating : ndarray of float64, shape (n,)
        Sort key within a cell (mean S/sigma over the core of the science
        stamp; higher is better).
    """

    id: np.ndarray
    x: np.ndarray
    y: np.ndarray
    rating: np.ndarray

    @classmethod
    def from_arrays(cls, ids, xs, ys, ratings):
        """Validated copy of four equal-length sequences (ids and centres must be integers)."""
        for name, values in (("id", ids), ("x", xs), ("y", ys)):
            values = np.asarray(values)
            if values.dtype.kind not in "iu" and not (values.dtype.kind == "f" and np.all(values == np.round(values))):
                msg = f"candidate {name} values must be integers (pixel centres), got dtype {values.dtype}"
                raise ConfigurationError(msg)
        arrays = (np.array(ids, dtype=np.int64), np.array(xs, dtype=np.int64),
                  np.array(ys, dtype=np.int64), np.array(ratings, dtype=np.float64))
        if len({a.shape for a in arrays}) != 1 or arrays[0].ndim != 1:
            msg = f"candidate arrays must be 1-d of equal length, got shapes {[a.shape for a in arrays]}"
            raise ConfigurationError(msg)
        return cls(*arrays)

    def __len__(self):
        return len(self.id)


class StampSolutions:
    """Stamp solutions of the candidates on one basis (``ip_diffim``'s ORIG or PCA).

    Attributes
    ----------
    coefficients : ndarray of shape (n, n_basis)
        Basis coefficients; NaN where never fitted.
    background : ndarray of shape (n,)
        Fitted constant background; NaN where never fitted.
    kernel_sum : ndarray of shape (n,)
    batch, row : ndarray of int64, shape (n,)
        Where the candidate's normal equations are kept: row ``row`` of the
        solver's fitted batch ``batch``; -1 where never fitted.
    """

    def __init__(self, n, n_basis):
        self.coefficients = np.full((n, n_basis), np.nan)
        self.background = np.full(n, np.nan)
        self.kernel_sum = np.full(n, np.nan)
        self.batch = np.full(n, -1, dtype=np.int64)
        self.row = np.full(n, -1, dtype=np.int64)

    @property
    def fitted(self):
        """Whether each candidate has a solution (failed fits included)."""
        return self.batch >= 0

    def store(self, index, coefficients, background, kernel_sum, batch, rows=None):
        """Record the fit of batch number ``batch`` for the candidates ``index``: its rows ``rows``
        (default: the candidates are the batch, in order)."""
        self.coefficients[index] = coefficients
        self.background[index] = background
        self.kernel_sum[index] = kernel_sum
        self.batch[index] = batch
        self.row[index] = np.arange(len(index)) if rows is None else rows


def _cell_rating_order(cell, rating, n_cells):
    """The order of candidates by cell, then by decreasing rating, the later first of equal ratings
    (``np.lexsort((-arrival, -rating, cell))``, NaN ratings last, in two stable sorts: the ratings
    once, then the cells as the narrowest integers, which NumPy radix-sorts; lexsort took ~0.8 ms
    for 6400 candidates)."""
    n = len(rating)
    by_rating = (n - 1) - np.argsort(-np.asarray(rating)[::-1], kind="stable")   # reversed: later first on ties
    cells = cell[by_rating].astype(np.int16 if n_cells <= np.iinfo(np.int16).max else np.int64)
    return by_rating[np.argsort(cells, kind="stable")]


class SpatialCellSet:
    """Candidates binned into a grid of spatial cells, each sorted by rating.

    Parameters
    ----------
    bbox : tuple of int
        Parent box ``(x0, y0, x1, y1)``, inclusive.
    size_cell_x, size_cell_y : int
        Cell size in pixels; the last row and column absorb the remainder.
    candidates : Candidates
        Every candidate must lie in ``bbox``.  Within a cell, higher ratings
        come first; of equal ratings, the later candidate comes first (as
        ``afw``'s insertion before equals).

    Attributes
    ----------
    id, x, y, rating, cell : ndarray of shape (n,)
        The candidates in cell order, then rating order.
    status : ndarray of int8, shape (n,)
        Status codes; use :meth:`statuses` for names.
    reason : ndarray of object, shape (n,)
        Why each candidate was rejected ("" if not), as a sentence.
    reason_code : ndarray of int8, shape (n,)
        The :class:`RejectReason` of each (``NONE`` if not rejected).
    solutions : dict of str to StampSolutions
        ``"orig"`` (the original basis) and, with PCA, ``"pca"``.
    stats : dict of str to dict of ndarray
        Per stage (``"single"``, ``"spatial"``): ``mean``, ``rms`` (NaN where
        not measured) and ``n`` of the residual D/sigma.
    """

    def __init__(self, bbox, size_cell_x, size_cell_y, candidates):
        self.bbox = tuple(int(v) for v in bbox)
        x0, y0, x1, y1 = self.bbox
        self.n_cells_x = -(-(x1 - x0 + 1) // size_cell_x)
        self.n_cells_y = -(-(y1 - y0 + 1) // size_cell_y)
        self.size_cell_x, self.size_cell_y = size_cell_x, size_cell_y
        cell = self._cell_indices(candidates.x, candidates.y)
        order = _cell_rating_order(cell, candidates.rating, self.n_cells_x * self.n_cells_y)
        self.id, self.x, self.y = candidates.id[order], candidates.x[order], candidates.y[order]
        self.rating, self.cell = candidates.rating[order], cell[order]
        n = len(order)
        self.status = np.zeros(n, dtype=np.int8)
        self.reason = np.full(n, "", dtype=object)
        self.reason_code = np.zeros(n, dtype=np.int8)
        self.solutions = {}
        self.stats = {}
        # rank of each candidate among the usable ones of its cell: cumulative count minus
        # the count before the cell's first entry
        self._cell_start = np.searchsorted(self.cell, self.cell, side="left")
        #: :meth:`visit`'s answers (by ``n_max``) and :meth:`ranks` (under "ranks") since the statuses last
        #: changed (:meth:`mark_good`, :meth:`reject`).
        self._visits = {}

    def __len__(self):
        return len(self.id)

    def _cell_indices(self, xs, ys):
        x0, y0, x1, y1 = self.bbox
        outside = (xs < x0) | (xs > x1) | (ys < y0) | (ys > y1)
        if outside.any():
            k = int(np.flatnonzero(outside)[0])
            msg = f"candidate at ({xs[k]}, {ys[k]}) is outside the cell-set box {self.bbox}"
            raise ConfigurationError(msg)
        return (ys - y0) // self.size_cell_y * self.n_cells_x + (xs - x0) // self.size_cell_x

    def visit(self, n_max):
        """Indices of the candidates a visitor sees: per cell, the first ``n_max`` non-BAD.

        Parameters
        ----------
        n_max : int
            Per-cell limit; ``<= 0`` means all.

        Returns
        -------
        ndarray of int64
            Increasing indices (cell order, then rating order); read-only
            (kept until a status changes: the solve loop asks again each pass).
        """
        visited = self._visits.get(n_max)
        if visited is None:
            visited = self._visits[n_max] = self._visit(n_max)
            visited.flags.writeable = False
        return visited

    def _visit(self, n_max):
        if n_max <= 0:
            return np.flatnonzero(self.status != _CODE[BAD])
        ranks = self.ranks()
        return np.flatnonzero((ranks > 0) & (ranks <= n_max))

    def ranks(self):
        """Each candidate's rank among the non-BAD ones of its cell, from 1 in rating order; 0 for the
        BAD ones (what :meth:`visit` counts).

        Returns
        -------
        ndarray of int64, shape (n,)
            Read-only (kept, as the visits are, until a status changes).
        """
        ranks = self._visits.get("ranks")
        if ranks is None:
            usable = self.status != _CODE[BAD]
            seen = np.cumsum(usable)
            ranks = (seen - np.concatenate([[0], seen])[self._cell_start]) * usable
            ranks.flags.writeable = False
            self._visits["ranks"] = ranks
        return ranks

    def mark_good(self, index):
        """Mark the candidates ``index`` GOOD (statuses change only here and in :meth:`reject`)."""
        if self._visits and (self.status[index] == _CODE[BAD]).any():     # visits skip BAD candidates only
            self._visits.clear()
        self.status[index] = _CODE[GOOD]

    def reject(self, index, code, reasons):
        """Mark the candidates ``index`` BAD.

        Parameters
        ----------
        index : ndarray of int
            Candidates to reject.
        code : RejectReason or ndarray of int
            Why: one for all, or one each; never :data:`RejectReason.NONE`.
        reasons : str or sequence of str
            The same as sentences (with the numbers): one for all, or one each.
        """
        if not np.size(index):          # most judged batches reject none
            return
        if isinstance(code, numbers.Integral):      # one for all: no array formed (the solve loop's case)
            codes = int(code)
            invalid = codes == RejectReason.NONE
        else:
            codes = np.asarray(code, dtype=np.int8)
            invalid = (codes == int(RejectReason.NONE)).any()
        if invalid:
            msg = "a rejection needs a reason code other than RejectReason.NONE"
            raise ValueError(msg)
        self._visits.clear()
        self.status[index] = _CODE[BAD]
        self.reason[index] = reasons
        self.reason_code[index] = codes

    def rejection_counts(self):
        """Rejected candidates per reason, ``{label: n}`` (see :func:`rejection_counts`)."""
        return rejection_counts(self.reason_code[self.status == _CODE[BAD]])

    def solution(self, key, n_basis):
        """The :class:`StampSolutions` under ``key``, created (empty) on first use."""
        if key not in self.solutions:
            self.solutions[key] = StampSolutions(len(self), n_basis)
        return self.solutions[key]

    def record_stats(self, stage, index, mean, rms, n_pixels):
        """Store residual statistics of the candidates ``index`` for ``stage``."""
        if stage not in self.stats:
            n = len(self)
            self.stats[stage] = {"mean": np.full(n, np.nan), "rms": np.full(n, np.nan),
                                 "n": np.zeros(n, dtype=np.int64)}
        arrays = self.stats[stage]
        arrays["mean"][index], arrays["rms"][index], arrays["n"][index] = mean, rms, n_pixels

    def statuses(self):
        """Status names, shape (n,)."""
        return _STATUS_NAMES[self.status]

    def count(self, status):
        """Number of candidates with the given status."""
        return int(np.count_nonzero(self.status == _CODE[status]))

    def has_usable_cells(self):
        """Whether any cell still holds a non-BAD candidate."""
        return bool(np.any(self.status != _CODE[BAD]))


@dataclass(frozen=True)
class CandidateRecord:
    """Frozen summary of one kernel candidate after the fit.

    Attributes
    ----------
    id : int
    x, y : int
        Parent-pixel centre.
    cell : int
        Index of its spatial cell.
    rating : float
        Core S/N of the science stamp.
    status : {"GOOD", "BAD", "UNKNOWN"}
        UNKNOWN: never visited (its cell had enough better candidates).
    reason : str
        Why it was rejected ("" otherwise), as a sentence with the numbers.
    reason_code : RejectReason
        The same as a code (``RejectReason.NONE`` otherwise).
    kernel_sum : float
        Kernel sum of its own stamp solution (NaN if never fitted).
    background : float
        Background of its own stamp solution (NaN if never fitted).
    single_mean, single_rms : float
        Residual D/sigma statistics under its own kernel.
    spatial_mean, spatial_rms : float
        Residual statistics under the spatial model (NaN if not assessed).
    n_pixels : int
        Pixels in the residual statistics.
    coefficients : tuple of float
        Coefficients of its own stamp solution on the original basis
        (``MatchResult.kernel_basis``); empty if never fitted.  Its kernel is
        ``sum_i coefficients[i] * kernel_basis.kernels[i]``.
    pca_coefficients : tuple of float
        Coefficients of its stamp solution on the PCA basis of the spatial
        kernel (``psf_matching_kernel.basis``) when PCA was used; else empty.
    """

    id: int
    x: int
    y: int
    cell: int
    rating: float
    status: str
    reason: str
    reason_code: RejectReason
    kernel_sum: float
    background: float
    single_mean: float
    single_rms: float
    spatial_mean: float
    spatial_rms: float
    n_pixels: int
    coefficients: tuple = ()
    pca_coefficients: tuple = ()


@dataclass(frozen=True)
class KernelCellSet:
    """Frozen view of the spatial cell set and every candidate's outcome.

    Attributes
    ----------
    bbox : tuple of int
        Parent box ``(x0, y0, x1, y1)``.
    size_cell_x, size_cell_y : int
    candidates : tuple of CandidateRecord
        In cell order, then rating order.
    selection_rejects : dict of RejectReason to int
        Positions dropped before entering the cell set, by reason
        (``STAMP_OUTSIDE``, ``BAD_MASK``, ``LOW_SNR``; ``.label`` to display).
    """

    bbox: tuple
    size_cell_x: int
    size_cell_y: int
    _columns: dict = field(repr=False, compare=False)
    selection_rejects: dict = field(default_factory=dict)

    @classmethod
    def from_cell_set(cls, cell_set, selection_rejects):
        """Freeze a solved cell set (copies of its arrays; records are built on first access)."""
        n = len(cell_set)
        nan, zero = np.full(n, np.nan), np.zeros(n, dtype=np.int64)
        single = cell_set.stats.get("single", {})
        spatial = cell_set.stats.get("spatial", {})
        columns = {"id": cell_set.id, "x": cell_set.x, "y": cell_set.y, "cell": cell_set.cell,
                   "rating": cell_set.rating, "status": cell_set.statuses(),
                   "reason": cell_set.reason, "reason_code": cell_set.reason_code,
                   "single_mean": single.get("mean", nan), "single_rms": single.get("rms", nan),
                   "spatial_mean": spatial.get("mean", nan), "spatial_rms": spatial.get("rms", nan),
                   "n_pixels": single.get("n", zero)}
        columns = {name: np.array(value, copy=True) for name, value in columns.items()}
        for key, prefix in (("orig", ""), ("pca", "pca_")):
            solution = cell_set.solutions.get(key)
            if solution is not None:       # new arrays: no second copy
                columns[prefix + "coefficients"] = np.where(solution.fitted[:, None],
                                                            solution.coefficients, np.nan)
                columns[prefix + "fitted"] = solution.fitted
                if key == "orig":
                    columns["kernel_sum"] = solution.kernel_sum.copy()
                    columns["background"] = solution.background.copy()
        columns.setdefault("kernel_sum", nan.copy())
        columns.setdefault("background", nan.copy())
        return cls(cell_set.bbox, cell_set.size_cell_x, cell_set.size_cell_y, columns,
                   dict(selection_rejects))

    def __len__(self):
        return len(self._columns["id"])

    def column(self, name):
        """One attribute of :class:`CandidateRecord` for every candidate, as an array (a copy).

        Faster than going through :attr:`candidates` for large sets; the
        coefficient columns are not available this way.
        """
        if name in ("coefficients", "pca_coefficients") or name not in CandidateRecord.__dataclass_fields__:
            msg = f"no candidate column {name!r}"
            raise KeyError(msg)
        return self._columns[name].copy()

    @functools.cached_property
    def candidates(self):
        """Tuple of :class:`CandidateRecord`, in cell order, then rating order."""
        c = self._columns
        scalars = [c[name].tolist() for name in ("id", "x", "y", "cell", "rating", "status", "reason")]
        scalars.append([RejectReason(code) for code in c["reason_code"].tolist()])
        scalars += [c[name].tolist() for name in ("kernel_sum", "background", "single_mean", "single_rms",
                                                  "spatial_mean", "spatial_rms", "n_pixels")]
        vectors = [[tuple(row) if done else () for row, done in zip(c[prefix + "coefficients"].tolist(),
                                                                     c[prefix + "fitted"])]
                   if prefix + "fitted" in c else [()] * len(self)
                   for prefix in ("", "pca_")]
        return tuple(CandidateRecord(*fields) for fields in zip(*scalars, *vectors))

    def count(self, status):
        """Number of candidates with the given status."""
        return int(np.count_nonzero(self._columns["status"] == status))

    def rejection_counts(self):
        """Rejected candidates per reason, ``{label: n}`` sorted by label.

        Selection rejects are not included (see :attr:`selection_rejects`).
        """
        return rejection_counts(self._columns["reason_code"][self._columns["status"] == BAD])

    @property
    def n_good(self):
        return self.count(GOOD)

    @property
    def n_bad(self):
        return self.count(BAD)

    def to_table(self):
        """The candidates as an :class:`astropy.table.Table`, one row each.

        The coefficient vectors are left out (see :class:`CandidateRecord`);
        ``reason_code`` holds the :class:`RejectReason` codes as integers.
        """
        from astropy.table import Table

        names = [f for f in CandidateRecord.__dataclass_fields__
                 if f not in ("coefficients", "pca_coefficients")]
        columns = [self._columns[name] for name in names]
        columns[names.index("reason")] = np.array(self._columns["reason"].tolist(), dtype=str).reshape(len(self))
        return Table(columns, names=names)
