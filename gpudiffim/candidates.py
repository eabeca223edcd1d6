"""Kernel candidates: detection, vetting, and the spatial cell set.

A kernel candidate is a star around which a stamp of ``2 g + 1`` pixels
(``g`` = stamp half-size, by default the kernel width) is cut from both
images.  Candidates live in a :class:`SpatialCellSet`: a grid of cells of
``size_cell_x`` x ``size_cell_y`` pixels, each keeping its candidates in
descending rating order; at most ``n_star_per_cell`` non-BAD candidates per
cell take part in a fit, so a rejected candidate is replaced by the next one
of its cell on the next pass.

Positions are parent-pixel coordinates (x = column, y = row).
"""

import bisect
import logging
from dataclasses import dataclass, field

import numpy as np
import scipy.ndimage as ndi

from .errors import ConfigurationError, NoKernelCandidatesError
from .statistics import mad_sigma

__all__ = [
    "KernelCandidate",
    "SpatialCellSet",
    "detect_candidates",
    "coarse_background",
    "vet_candidates",
    "candidate_positions",
    "GOOD",
    "BAD",
    "UNKNOWN",
]

log = logging.getLogger(__name__)

UNKNOWN, GOOD, BAD = "UNKNOWN", "GOOD", "BAD"


@dataclass(eq=False)
class KernelCandidate:
    """One star used to constrain the kernel, with its fit results.

    Attributes
    ----------
    id : int
        Identifier, in input (or detection) order.
    x, y : int
        Parent-pixel centre of the stamp.
    rating : float
        Sort key within the cell (mean S/sigma over the core of the science
        stamp; higher is better).
    status : {"UNKNOWN", "GOOD", "BAD"}
    reason : str
        Why the candidate was rejected ("" if not).
    solution : dict
        Filled by the solver: under ``"orig"`` (the original basis) and, with
        PCA, ``"pca"``, a dict of ``coefficients``, ``background``,
        ``kernel_sum``, ``normal_matrix`` and ``normal_vector``.
    stats : dict
        Residual statistics per stage (``"single"``, ``"spatial"``): mean, rms, n.
    """

    id: int
    x: int
    y: int
    rating: float
    status: str = UNKNOWN
    reason: str = ""
    solution: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)

    def reject(self, reason):
        """Mark BAD with a reason."""
        self.status = BAD
        self.reason = reason


class SpatialCellSet:
    """Candidates binned into a grid of spatial cells, each sorted by rating.

    Parameters
    ----------
    bbox : tuple of int
        Parent box ``(x0, y0, x1, y1)``, inclusive.
    size_cell_x, size_cell_y : int
        Cell size in pixels; the last row and column absorb the remainder.
    """

    def __init__(self, bbox, size_cell_x, size_cell_y):
        self.bbox = tuple(int(v) for v in bbox)
        x0, y0, x1, y1 = self.bbox
        self.n_cells_x = -(-(x1 - x0 + 1) // size_cell_x)
        self.n_cells_y = -(-(y1 - y0 + 1) // size_cell_y)
        self.size_cell_x, self.size_cell_y = size_cell_x, size_cell_y
        self.cells = [[] for _ in range(self.n_cells_x * self.n_cells_y)]
        self._inserted = 0

    def cell_index(self, x, y):
        """Index of the cell containing parent position ``(x, y)``."""
        x0, y0, x1, y1 = self.bbox
        xi, yi = int(np.floor(x + 0.5)), int(np.floor(y + 0.5))
        if not (x0 <= xi <= x1 and y0 <= yi <= y1):
            msg = f"candidate at ({x}, {y}) is outside the cell-set box {self.bbox}"
            raise ConfigurationError(msg)
        ix = (xi - x0) // self.size_cell_x
        iy = (yi - y0) // self.size_cell_y
        return iy * self.n_cells_x + ix

    def insert(self, candidate):
        """Insert before existing candidates of equal or lower rating."""
        cell = self.cells[self.cell_index(candidate.x, candidate.y)]
        self._inserted += 1
        candidate._order = self._inserted
        bisect.insort(cell, candidate, key=lambda c: (-c.rating, -c._order))

    def candidates(self):
        """Every candidate, cell by cell, in rating order."""
        return [c for cell in self.cells for c in cell]

    def visit(self, n_max):
        """The candidates a visitor sees: per cell, the first ``n_max`` non-BAD.

        Parameters
        ----------
        n_max : int
            Per-cell limit; ``<= 0`` means all.
        """
        chosen = []
        for cell in self.cells:
            good = [c for c in cell if c.status != BAD]
            chosen.extend(good if n_max <= 0 else good[:n_max])
        return chosen

    def count(self, status):
        """Number of candidates with the given status."""
        return sum(c.status == status for c in self.candidates())

    def has_usable_cells(self):
        """Whether any cell still holds a non-BAD candidate."""
        return any(c.status != BAD for c in self.candidates())


def _interpolation_matrix(n, centres):
    """Matrix ``W`` (n, len(centres)) of linear interpolation between bin centres, clamped."""
    identity = np.eye(len(centres))
    return np.stack([np.interp(np.arange(n), centres, identity[b]) for b in range(len(centres))],
                    axis=1)


def coarse_background(image, bin_size, exclude=None):
    """Smooth background: bin medians interpolated bilinearly between bin centres.

    Parameters
    ----------
    image : ndarray of shape (M, N)
    bin_size : int
        Bin size in pixels.
    exclude : ndarray of bool, optional
        Pixels left out of the medians.

    Returns
    -------
    ndarray of shape (M, N)
    """
    ny, nx = image.shape
    edges_y = np.linspace(0, ny, max(1, round(ny / bin_size)) + 1).astype(int)
    edges_x = np.linspace(0, nx, max(1, round(nx / bin_size)) + 1).astype(int)
    grid = np.full((len(edges_y) - 1, len(edges_x) - 1), np.nan)
    for j in range(len(edges_y) - 1):
        for i in range(len(edges_x) - 1):
            window = np.s_[edges_y[j]:edges_y[j + 1], edges_x[i]:edges_x[i + 1]]
            block = image[window] if exclude is None else image[window][~exclude[window]]
            if block.size:
                grid[j, i] = np.median(block)
    fill = np.nanmedian(grid) if np.isfinite(grid).any() else 0.0
    grid = np.where(np.isfinite(grid), grid, fill)
    rows = _interpolation_matrix(ny, 0.5 * (edges_y[:-1] + edges_y[1:]) - 0.5)
    cols = _interpolation_matrix(nx, 0.5 * (edges_x[:-1] + edges_x[1:]) - 0.5)
    return rows @ grid @ cols.T


def _threshold(detection, image, variance, valid):
    kind, value = detection.det_threshold_type, detection.det_threshold
    if kind == "pixel_stdev":
        return value * np.sqrt(variance)
    if kind == "variance":
        return value * np.median(variance[valid])
    if kind == "stdev":
        return value * mad_sigma(image[valid])
    return value


def detect_candidates(masked_image, detection):
    """Peaks of above-threshold footprints of a background-subtracted image.

    Parameters
    ----------
    masked_image : MaskedImage
        Image to detect on.
    detection : DetectionConfig
        Threshold and footprint-area limits.

    Returns
    -------
    ndarray of int, shape (n, 2)
        Parent ``(x, y)`` of each footprint's peak pixel; the 1-px centre of
        the bounding box for footprints larger than ``fp_npix_max``.
    """
    no_data = masked_image.bits(["NO_DATA"])
    valid = (masked_image.mask & no_data) == 0
    background = coarse_background(masked_image.image, detection.background_bin_size, ~valid)
    residual = masked_image.image - background
    above = (residual > _threshold(detection, residual, masked_image.variance, valid)) & valid
    labels, n_labels = ndi.label(above, structure=np.ones((3, 3)))
    if n_labels == 0:
        return np.zeros((0, 2), dtype=int)
    area = np.bincount(labels.ravel(), minlength=n_labels + 1)[1:]
    keep = area >= detection.fp_npix_min
    peaks = _footprint_peaks(residual, labels, area > detection.fp_npix_max, keep)
    x0, y0 = masked_image.xy0
    rows, cols = peaks[keep, 0], peaks[keep, 1]
    log.info("detection: %d footprints above threshold, %d with area >= %d px",
             n_labels, int(keep.sum()), detection.fp_npix_min)
    return np.stack([cols + x0, rows + y0], axis=1)


def _footprint_peaks(residual, labels, big, keep):
    """(row, col) of each kept footprint's peak; the box centre for ``big`` ones."""
    peaks = np.zeros((len(keep), 2), dtype=int)
    for k, (sy, sx) in enumerate(ndi.find_objects(labels)):
        if not keep[k]:
            continue
        if big[k]:
            peaks[k] = ((sy.start + sy.stop - 1) // 2, (sx.start + sx.stop - 1) // 2)
            continue
        values = np.where(labels[sy, sx] == k + 1, residual[sy, sx], -np.inf)
        row, col = np.unravel_index(np.argmax(values), values.shape)
        peaks[k] = (sy.start + row, sx.start + col)
    return peaks


def candidate_positions(candidates):
    """Parent (x, y) positions from a list of pairs or an astropy Table.

    A table must have columns ``x``/``y``, ``xcentroid``/``ycentroid`` or
    ``x_image``/``y_image`` (case-insensitive).

    Returns
    -------
    ndarray of float, shape (n, 2)
    """
    names = getattr(candidates, "colnames", None)
    if names is not None:
        lower = {n.lower(): n for n in names}
        for cx, cy in (("x", "y"), ("xcentroid", "ycentroid"), ("x_image", "y_image")):
            if cx in lower and cy in lower:
                positions = np.stack([np.asarray(candidates[lower[cx]], dtype=float),
                                      np.asarray(candidates[lower[cy]], dtype=float)], axis=1)
                break
        else:
            msg = f"candidate table needs x/y or xcentroid/ycentroid columns, has {list(names)}"
            raise ConfigurationError(msg)
    else:
        positions = np.asarray(candidates, dtype=float)
        if positions.size == 0:
            positions = positions.reshape(0, 2)
    if positions.ndim != 2 or positions.shape[1] != 2:
        msg = f"candidates must be (x, y) pairs, got an array of shape {positions.shape}"
        raise ConfigurationError(msg)
    if not np.all(np.isfinite(positions)):
        msg = "candidate positions must be finite"
        raise ConfigurationError(msg)
    return positions


def core_snr(science, centres_rc, radius):
    """Mean of S/sigma over the (2r+1)^2 core around each (row, col) centre."""
    offsets = np.arange(-radius, radius + 1)
    rows = centres_rc[:, 0, None, None] + offsets[None, :, None]
    cols = centres_rc[:, 1, None, None] + offsets[None, None, :]
    rows = np.clip(rows, 0, science.shape[0] - 1)
    cols = np.clip(cols, 0, science.shape[1] - 1)
    sigma = np.sqrt(science.variance[rows, cols])
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = np.where(sigma > 0, science.image[rows, cols] / sigma, 0.0)
    return snr.mean(axis=(1, 2))


def vet_candidates(positions, template, science, half_size, *, bad_mask_planes, core_radius,
                   min_snr):
    """Keep candidates whose stamp fits in the image, is clean and bright enough.

    Parameters
    ----------
    positions : ndarray of shape (n, 2)
        Parent ``(x, y)``; rounded to the nearest pixel.
    template, science : MaskedImage
    half_size : int
        Stamp half-size ``g``; stamps are ``(2g+1)^2``.
    bad_mask_planes : sequence of str
        Any of these bits in the stamp, on either image, rejects the candidate.
    core_radius : int
        Radius of the core over which the S/N rating is computed.
    min_snr : float
        Minimum rating.

    Returns
    -------
    kept : list of KernelCandidate
    rejected : dict of str to int
        Count of candidates dropped for each reason.
    """
    x0, y0 = science.xy0
    centres = np.floor(positions + 0.5).astype(int) - np.array([x0, y0])
    ny, nx = science.shape
    inside = ((centres[:, 0] >= half_size) & (centres[:, 0] < nx - half_size)
              & (centres[:, 1] >= half_size) & (centres[:, 1] < ny - half_size))
    bad_bits = science.bits(bad_mask_planes) | template.bits(bad_mask_planes)
    combined = (science.mask | template.mask) & bad_bits
    flagged = _box_any(combined != 0, half_size)
    centres_rc = centres[:, ::-1]
    clean = inside.copy()
    clean[inside] = ~flagged[centres_rc[inside, 0], centres_rc[inside, 1]]
    rating = np.full(len(positions), -np.inf)
    rating[clean] = core_snr(science, centres_rc[clean], core_radius)
    bright = rating >= min_snr
    rejected = {"stamp outside the image": int((~inside).sum()),
                "bad mask bit in the stamp": int((inside & ~clean).sum()),
                f"core S/N below {min_snr}": int((clean & ~bright).sum())}
    kept = [KernelCandidate(id=int(k), x=int(centres[k, 0] + x0), y=int(centres[k, 1] + y0),
                            rating=float(rating[k]))
            for k in np.flatnonzero(bright)]
    return kept, rejected


def _box_any(flags, half_size):
    """For each pixel, whether any flag is set in the (2g+1)^2 box around it."""
    size = 2 * half_size + 1
    grown = ndi.maximum_filter1d(flags.astype(np.uint8), size, axis=0, mode="constant")
    return ndi.maximum_filter1d(grown, size, axis=1, mode="constant").astype(bool)


def require_candidates(candidates, minimum=1):
    """Raise :class:`NoKernelCandidatesError` if fewer than ``minimum`` are usable."""
    if len(candidates) < minimum:
        msg = (f"only {len(candidates)} usable kernel candidate(s), need at least {minimum}: "
               f"lower detection.det_threshold or detection.min_snr, or pass candidates=")
        raise NoKernelCandidatesError(msg)


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
        Why it was rejected ("" otherwise).
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
    kernel_sum: float
    background: float
    single_mean: float
    single_rms: float
    spatial_mean: float
    spatial_rms: float
    n_pixels: int
    coefficients: tuple = ()
    pca_coefficients: tuple = ()

    @classmethod
    def from_candidate(cls, candidate, cell):
        orig = candidate.solution.get("orig", {})
        single = candidate.stats.get("single", {})
        spatial = candidate.stats.get("spatial", {})
        pca = candidate.solution.get("pca", {})
        return cls(candidate.id, candidate.x, candidate.y, cell, candidate.rating, candidate.status,
                   candidate.reason, orig.get("kernel_sum", np.nan), orig.get("background", np.nan),
                   single.get("mean", np.nan), single.get("rms", np.nan),
                   spatial.get("mean", np.nan), spatial.get("rms", np.nan), single.get("n", 0),
                   tuple(np.asarray(orig.get("coefficients", ()), dtype=np.float64).tolist()),
                   tuple(np.asarray(pca.get("coefficients", ()), dtype=np.float64).tolist()))


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
    selection_rejects : dict of str to int
        Positions dropped before entering the cell set, by reason.
    """

    bbox: tuple
    size_cell_x: int
    size_cell_y: int
    candidates: tuple
    selection_rejects: dict

    @classmethod
    def from_cell_set(cls, cell_set, selection_rejects):
        records = tuple(CandidateRecord.from_candidate(c, k)
                        for k, cell in enumerate(cell_set.cells) for c in cell)
        return cls(cell_set.bbox, cell_set.size_cell_x, cell_set.size_cell_y, records,
                   dict(selection_rejects))

    def count(self, status):
        """Number of candidates with the given status."""
        return sum(r.status == status for r in self.candidates)

    @property
    def n_good(self):
        return self.count(GOOD)

    @property
    def n_bad(self):
        return self.count(BAD)

    def to_table(self):
        """The candidates as an :class:`astropy.table.Table`, one row each.

        The coefficient vectors are left out (see :class:`CandidateRecord`).
        """
        from astropy.table import Table

        names = [f for f in CandidateRecord.__dataclass_fields__
                 if f not in ("coefficients", "pca_coefficients")]
        return Table(rows=[tuple(getattr(r, n) for n in names) for r in self.candidates],
                     names=names)
