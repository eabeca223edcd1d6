"""Figures of a kernel fit: ``ip_diffim``'s debug displays, written to files.

``ip_diffim``'s ``ImagePsfMatchTask`` opens image viewers when ``lsstDebug``
variables are set (spec section 12).  Here each variable has a function that
returns a :class:`matplotlib.figure.Figure` (never shown, no pyplot state):

========================  ==========================================================
``displayCandidates``     :func:`display_candidates`: the worst and best fitted
                          candidates (std of D/sigma under the spatial model):
                          science and template stamps and D/sigma under its own
                          kernel and under the spatial model (GOOD green, BAD red
                          with the reason)
``displayKernelBasis``    :func:`display_kernel_basis`: the basis of the spatial kernel
``displayKernelMosaic``   :func:`display_kernel_mosaic`: the spatial kernel on a grid
                          over the field, with centroid and second-moment ellipse
``plotKernelSpatialModel`` :func:`plot_kernel_spatial_model`: each coefficient's spatial
                          function, and local - spatial against x and y
``plotKernelCoefficients`` :func:`plot_kernel_coefficients`: histograms of the local
                          coefficients with the spatial value at the centre
``displayTemplate``       :func:`display_template`: the (registered) template
``displaySciIm``          :func:`display_sci_im`: the science image
``displaySpatialCells``   :func:`display_spatial_cells`: the cells and the candidates'
                          status over the science image
``displayDiffIm``         :func:`display_diff_im`: template, science, matched image and
                          difference
========================  ==========================================================

``display`` selects them all; ``showBadCandidates`` is accepted (rejected
candidates are always drawn, in red; pass ``show_bad=False`` to the functions
to leave them out).  :func:`write_figures` writes the selected figures as PNG
files and one multi-page PDF report, logging one line per figure (logger
``gpudiffim.diagnostics``, INFO).

Image values are labelled with the unit of the exposures' ``BUNIT`` header
card (e.g. MJy/sr for JWST images) when there is one, else
:data:`DEFAULT_UNIT`; every function takes ``unit=`` to override it.

matplotlib is optional (``pip install gpudiffim[plot]``); it is imported on
first use.  Each figure is drawn once, with Agg; the PDF report's pages are
those PNG images (a PDF backend would draw every artist again, at several
times the cost).  Figures with many panels draw them as images in one axes
where axis ticks are not needed: matplotlib's time goes mostly into axes,
ticks and text.
"""

import logging
import math
import os
import struct
import textwrap
import time

import numpy as np

from .errors import ConfigurationError, MissingDependencyError
from .quality import candidate_differences, kernel_moments, normalized_residuals
from .statistics import usable_normalised_residual

__all__ = [
    "DEBUG_NAMES",
    "DEFAULT_UNIT",
    "FIGURE_NAMES",
    "REPORT_NAME",
    "check_debug_names",
    "display_candidates",
    "display_diff_im",
    "display_kernel_basis",
    "display_kernel_mosaic",
    "display_sci_im",
    "display_spatial_cells",
    "display_template",
    "plot_kernel_coefficients",
    "plot_kernel_spatial_model",
    "require_matplotlib",
    "summary_figure",
    "write_figures",
]

#: Figure-producing debug variables of ``ip_diffim`` (spec section 12), in report order.
FIGURE_NAMES = ("displayCandidates", "displayKernelBasis", "displayKernelMosaic",
                "plotKernelSpatialModel", "plotKernelCoefficients", "displayTemplate",
                "displaySciIm", "displaySpatialCells", "displayDiffIm")
#: Every accepted debug name: the figures, the master switch and the modifier.
DEBUG_NAMES = ("display", *FIGURE_NAMES, "showBadCandidates")
#: File name of the multi-page PDF report written by :func:`write_figures`.
REPORT_NAME = "gpudiffim-report.pdf"

log = logging.getLogger(__name__)

_DPI = 100
_SUMMARY_DPI = 150
GOOD_COLOUR, BAD_COLOUR, UNKNOWN_COLOUR = "#1b9e1b", "#d62020", "#e69f00"
_STATUS_STYLE = {"GOOD": (GOOD_COLOUR, "o"), "BAD": (BAD_COLOUR, "x"), "UNKNOWN": (UNKNOWN_COLOUR, "s")}
_RESIDUAL_LIMIT = 5.0
_RANKING_CHUNK = 512
#: Unit of image values when no exposure header gives one (``BUNIT``).
DEFAULT_UNIT = "counts"


def require_matplotlib():
    """Import matplotlib, or raise :class:`~gpudiffim.errors.MissingDependencyError`.

    Returns
    -------
    module
        ``matplotlib``.
    """
    try:
        import matplotlib
    except ImportError as error:
        msg = ("gpudiffim figures need matplotlib, which is not installed: "
               "pip install gpudiffim[plot]")
        raise MissingDependencyError(msg) from error
    return matplotlib


def check_debug_names(debug):
    """Validate debug names; return the figure names they select, in report order.

    Parameters
    ----------
    debug : str or sequence of str or None
        Names of :data:`DEBUG_NAMES`; ``"display"`` selects every figure.

    Returns
    -------
    tuple of str
        Names of :data:`FIGURE_NAMES`.

    Raises
    ------
    ConfigurationError
        For an unknown name or a value that is not a string or sequence of strings.
    """
    if debug is None:
        return ()
    if isinstance(debug, str):
        debug = (debug,)
    try:
        names = tuple(debug)
    except TypeError:
        msg = f"debug must be a sequence of debug names, got {type(debug).__name__}"
        raise ConfigurationError(msg) from None
    unknown = [n for n in names if not isinstance(n, str) or n not in DEBUG_NAMES]
    if unknown:
        msg = f"unknown debug name(s) {unknown}: expected any of {', '.join(DEBUG_NAMES)}"
        raise ConfigurationError(msg)
    if "display" in names:
        return FIGURE_NAMES
    return tuple(n for n in FIGURE_NAMES if n in names)


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------

def _new_figure(width, height):
    """A pyplot-free Figure with an Agg canvas."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=_DPI)
    FigureCanvasAgg(figure)
    return figure


def _header_unit(source):
    """The ``BUNIT`` card of an exposure's header (``Exposure.info.header``), or None."""
    header = getattr(getattr(source, "info", None), "header", None)
    value = header.get("BUNIT") if hasattr(header, "get") else None
    return value.strip() if isinstance(value, str) and value.strip() else None


def _unit(unit, *sources):
    """``unit``, else the ``BUNIT`` of the first source that has one, else :data:`DEFAULT_UNIT`.

    Sources are exposures, masked images (no header) or fit results, whose
    ``matched_exposure`` (science header) and ``warped_exposure`` (template
    header) are looked at.  A blank ``unit`` counts as none given (so that a
    header's empty ``BUNIT`` can be passed as it is).
    """
    if unit is not None and not isinstance(unit, str):
        msg = f"unit must be a string or None, got {type(unit).__name__}"
        raise ConfigurationError(msg)
    if unit is not None and unit.strip():
        return unit.strip()
    for source in sources:
        for exposure in (source, getattr(source, "matched_exposure", None),
                         getattr(source, "warped_exposure", None)):
            found = _header_unit(exposure)
            if found:
                return found
    return DEFAULT_UNIT


def _masked_image(value):
    return getattr(value, "masked_image", value)


def _extent(masked_image):
    """imshow extent in parent pixel coordinates (pixel centres at integers)."""
    x0, y0 = masked_image.xy0
    ny, nx = masked_image.shape
    return (x0 - 0.5, x0 + nx - 0.5, y0 - 0.5, y0 + ny - 0.5)


def _finite(values):
    values = np.asarray(values, dtype=np.float64)
    return values[np.isfinite(values)]


def _norm(data, stretch="zscale", symmetric=False):
    """astropy ImageNormalize: zscale limits with a linear stretch, or asinh over 0.5-99.5 %."""
    from astropy.visualization import (AsinhStretch, ImageNormalize, LinearStretch,
                                       PercentileInterval, ZScaleInterval)

    if stretch not in ("zscale", "asinh"):
        msg = f"stretch must be 'zscale' or 'asinh', got {stretch!r}"
        raise ConfigurationError(msg)
    values = _finite(data)
    if values.size == 0:
        values = np.zeros(1)
    interval = ZScaleInterval() if stretch == "zscale" else PercentileInterval(99.0)
    vmin, vmax = interval.get_limits(values)
    if symmetric:
        vmax = max(abs(vmin), abs(vmax))
        vmin = -vmax
    if not vmax > vmin:
        vmin, vmax = vmin - 1.0, vmax + 1.0
    kind = LinearStretch() if stretch == "zscale" else AsinhStretch(0.1)
    return ImageNormalize(vmin=vmin, vmax=vmax, stretch=kind, clip=False)


def _stamp_norm(stamp):
    """asinh stretch between a stamp's minimum and maximum."""
    from astropy.visualization import AsinhStretch, ImageNormalize

    values = _finite(stamp)
    vmin, vmax = (values.min(), values.max()) if values.size else (0.0, 1.0)
    if not vmax > vmin:
        vmax = vmin + 1.0
    return ImageNormalize(vmin=vmin, vmax=vmax, stretch=AsinhStretch(0.05))


def _cmap(name, bad="#bbbbbb"):
    import matplotlib

    return matplotlib.colormaps[name].with_extremes(bad=bad)


def _status_colour(status):
    return _STATUS_STYLE.get(status, ("black", "."))[0]


def _records(result, show_bad, fitted=True):
    records = result.kernel_cell_set.candidates
    if fitted:
        records = [r for r in records if r.coefficients]
    return [r for r in records if show_bad or r.status != "BAD"]


def _fmt(value, digits=2):
    return f"{value:.{digits}f}" if np.isfinite(value) else "n/a"


def _candidate_label(record, std=None):
    """Id, position and status; D/sigma std (the ranking) and chi-square; the rejection reason."""
    chi_local = record.single_rms ** 2
    chi_spatial = record.spatial_rms ** 2
    head = f"#{record.id} at ({record.x}, {record.y})  {record.status}"
    spatial = _fmt(chi_spatial) if np.isfinite(chi_spatial) else "not assessed"
    chi = f"χ² local {_fmt(chi_local)}, spatial {spatial}"
    lines = [head, chi if std is None else f"std {_fmt(std)};  {chi}"]
    if record.reason:
        lines += textwrap.wrap(record.reason, 88)[:2]
    return "\n".join(lines)


def _basis_label(result, index):
    """What basis kernel ``index`` of the spatial kernel is, in a few words."""
    basis = result.kernel_basis
    kernel = result.psf_matching_kernel
    if kernel.n_basis != basis.n_basis or not np.array_equal(kernel.basis, basis.kernels):
        return f"PCA component {index}"
    if basis.kind == "delta-function":
        h = basis.half_width
        v, u = divmod(index, basis.width)
        return f"δ at (u, v) = ({u - h}, {v - h})"
    if basis.kind == "alard-lupton":
        k = index
        for sigma, degree in zip(basis.sigmas, basis.degrees):
            n_terms = (degree + 1) * (degree + 2) // 2
            if k < n_terms:
                pairs = [(total - py, py) for total in range(degree + 1) for py in range(total + 1)]
                px, py = pairs[k]
                monomial = " ".join(p for p in (_power("x", px), _power("y", py)) if p) or "1"
                return f"σ={sigma:.2f} px, {monomial}"
            k -= n_terms
    return f"basis {index}"


def _power(name, exponent):
    return "" if exponent == 0 else name if exponent == 1 else f"{name}{_SUPERSCRIPT[exponent]}"


_SUPERSCRIPT = {2: "²", 3: "³", 4: "⁴", 5: "⁵", 6: "⁶", 7: "⁷", 8: "⁸", 9: "⁹"}


def _local_coefficients(result, records):
    """Local coefficients of ``records`` on the spatial kernel's basis, and which records have them."""
    kernel = result.psf_matching_kernel
    same = (kernel.n_basis == result.kernel_basis.n_basis
            and np.array_equal(kernel.basis, result.kernel_basis.kernels))
    field = "coefficients" if same else "pca_coefficients"
    kept = [r for r in records if len(getattr(r, field)) == kernel.n_basis]
    values = np.array([getattr(r, field) for r in kept]).reshape(len(kept), kernel.n_basis)
    return kept, values


def _cell_box_centre(result):
    x0, y0, x1, y1 = result.kernel_cell_set.bbox
    return 0.5 * (x0 + x1), 0.5 * (y0 + y1)


# ---------------------------------------------------------------------------
# displayCandidates
# ---------------------------------------------------------------------------

def _spatial_residual_std(result, template, science, records):
    """Standard deviation of D/sigma on each record's fit region under the spatial model.

    NaN where fewer than two pixels are usable.  Computed in chunks so that a
    field of thousands of candidates does not hold all their stamps at once.
    """
    values = []
    for start in range(0, len(records), _RANKING_CHUNK):
        differences = candidate_differences(result, template, science,
                                            records=records[start:start + _RANKING_CHUNK])
        z, usable = (a.reshape(len(differences.records), -1)
                     for a in usable_normalised_residual(*differences.spatial, differences.bad_bits))
        n = usable.sum(axis=1)
        mean = np.where(usable, z, 0.0).sum(axis=1) / np.maximum(n, 1)
        variance = (np.where(usable, z - mean[:, None], 0.0) ** 2).sum(axis=1) / np.maximum(n, 1)
        values.append(np.where(n > 1, np.sqrt(variance), np.nan))
    return np.concatenate(values)


def _worst_and_best(records, scores, n_each):
    """Groups ``[(heading, records), ...]``: the ``n_each`` highest and lowest ``scores``.

    A NaN score (nothing to assess) ranks as the worst.  With ``n_each`` None,
    or no more than ``2 * n_each`` records, one group of all of them, worst first.
    """
    key = np.where(np.isfinite(scores), scores, np.inf)
    order = [int(i) for i in np.argsort(-key, kind="stable")]
    if n_each is None or len(records) <= 2 * n_each:
        return [(f"all {len(records)}, from the largest std of D/σ under the spatial model",
                 [records[i] for i in order])]
    worst = order[:n_each]
    best = order[::-1][:n_each]
    return [(f"the {n_each} worst: largest std of D/σ under the spatial model, largest first",
             [records[i] for i in worst]),
            (f"the {n_each} best: smallest std of D/σ under the spatial model, smallest first",
             [records[i] for i in best])]


def display_candidates(result, template, science, *, show_bad=True, n_each=12, tiles_across=None,
                       unit=None):
    """Mosaic of the worst and best fitted kernel candidates (``displayCandidates``).

    The fitted candidates are ranked by the standard deviation of ``D /
    sigma`` on their fit region under the spatial model (the final kernel
    and background at their centre; 1 for pure noise): the ``n_each`` with
    the largest and the ``n_each`` with the smallest are drawn, and the
    figure says how many are not.  For each: the science and template stamps
    (asinh stretch per stamp) and ``D / sigma`` on the fit region under its
    own kernel and background (local) and under the spatial model (one shared
    colour scale, +-5).  The frame and label are green for GOOD and red for
    BAD candidates, whose label carries the rejection reason; chi-square is
    the squared rms of D/sigma used by the clipping stages.

    Parameters
    ----------
    result : MatchResult
    template, science : MaskedImage or Exposure
        Inputs of the fit (the registered template for exposure fits).
    show_bad : bool
        Include rejected candidates (``showBadCandidates``).
    n_each : int or None
        Candidates drawn from each end of the ranking (None: all, worst first).
    tiles_across : int, optional
        Candidates per row (default 4; 3 up to 12 candidates).
    unit : str, optional
        Unit of the stamps; default the ``BUNIT`` header card of the science
        or template exposure, else :data:`DEFAULT_UNIT`.

    Returns
    -------
    matplotlib.figure.Figure
        Two axes: the mosaic (four images per candidate drawn, in drawing
        order: science, template, local D/sigma, spatial D/sigma) and the
        colour bar.  Each candidate's label is a text of the mosaic axes with
        ``gid`` ``"candidate-<id>"``; the count of candidates not drawn is a
        figure text with ``gid`` ``"not-shown"``.
    """
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.patches import Rectangle

    if n_each is not None and (isinstance(n_each, bool) or not isinstance(n_each, (int, np.integer))
                               or n_each < 1):
        msg = f"n_each must be a positive integer or None, got {n_each!r}"
        raise ConfigurationError(msg)
    unit = _unit(unit, science, template)
    fitted = _records(result, show_bad)
    if not fitted:
        msg = "no fitted candidate to display"
        raise ValueError(msg)
    scores = _spatial_residual_std(result, template, science, fitted)
    score_of = {id(r): float(v) for r, v in zip(fitted, scores)}
    groups = _worst_and_best(fitted, scores, n_each)
    records = [r for _, group in groups for r in group]
    differences = candidate_differences(result, template, science, records=records)
    stamps = (differences.batch.template, differences.batch.science)
    science_stamps, template_stamps = stamps if result.convolved == "science" else stamps[::-1]
    if tiles_across is None:
        tiles_across = 3 if len(records) <= 12 else 4
    across = max(1, min(tiles_across, max(len(g) for _, g in groups)))
    panel, gap, header, title_h, row_gap, col_gap = 1.15, 0.06, 0.62, 0.16, 0.12, 0.35
    group_h, group_gap = 0.32, 0.25
    tile_w, tile_h = 4 * panel + 3 * gap, header + title_h + panel
    side, top, bottom = 0.3, 1.3, 1.0
    group_rows = [math.ceil(len(g) / across) for _, g in groups]
    width = 2 * side + across * tile_w + (across - 1) * col_gap
    height = (top + bottom + sum(group_rows) * tile_h + sum(r - 1 for r in group_rows) * row_gap
              + len(groups) * group_h + (len(groups) - 1) * group_gap)
    figure = _new_figure(width, height)
    mosaic = figure.add_axes((0, 0, 1, 1))
    cmap_z, cmap_s = _cmap("RdBu_r"), _cmap("gray")
    z_norm = Normalize(-_RESIDUAL_LIMIT, _RESIDUAL_LIMIT)
    stamp = differences.batch.science.shape[1]
    fit = differences.local[0].shape[1]
    k = 0
    y_group = height - top
    for (heading, group), n_rows in zip(groups, group_rows):
        mosaic.text(side, y_group, heading[0].upper() + heading[1:], fontsize=10, weight="bold",
                    va="top", ha="left")
        for j, record in enumerate(group):
            row, col = divmod(j, across)
            x_in = side + col * (tile_w + col_gap)
            y_top = y_group - group_h - row * (tile_h + row_gap)
            colour = _status_colour(record.status)
            mosaic.text(x_in, y_top, _candidate_label(record, score_of[id(record)]), color=colour,
                        fontsize=7.5, va="top", ha="left", linespacing=1.25,
                        gid=f"candidate-{record.id}")
            z_local, z_spatial = (usable_normalised_residual(*(p[k] for p in planes), differences.bad_bits,
                                                             fill=np.nan)[0]
                                  for planes in (differences.local, differences.spatial))
            panels = (("science", science_stamps[k], cmap_s, _stamp_norm(science_stamps[k])),
                      ("template", template_stamps[k], cmap_s, _stamp_norm(template_stamps[k])),
                      ("D/σ local", z_local, cmap_z, z_norm), ("D/σ spatial", z_spatial, cmap_z, z_norm))
            y0 = y_top - header - title_h - panel
            for i, (name, data, cmap, norm) in enumerate(panels):
                x0 = x_in + i * (panel + gap)
                mosaic.imshow(data, origin="lower", cmap=cmap, norm=norm, interpolation="nearest",
                              extent=(x0, x0 + panel, y0, y0 + panel))
                mosaic.add_patch(Rectangle((x0, y0), panel, panel, fill=False, edgecolor=colour,
                                           linewidth=1.6))
                if row == 0:   # panel names over the first row of each group only (text is slow)
                    mosaic.text(x0 + 0.5 * panel, y0 + panel + 0.03, name, fontsize=7, ha="center",
                                va="bottom")
            k += 1
        y_group -= group_h + n_rows * tile_h + (n_rows - 1) * row_gap + group_gap
    mosaic.set_xlim(0, width)
    mosaic.set_ylim(0, height)
    mosaic.set_axis_off()
    cells = result.kernel_cell_set
    n_unfitted = len(_records(result, show_bad, fitted=False)) - len(fitted)
    figure.suptitle(f"Kernel candidates: {cells.n_good} GOOD (green), {cells.n_bad} BAD (red)"
                    + ("" if show_bad else ", BAD not shown")
                    + f"; {len(records)} of the {len(fitted)} fitted shown", fontsize=12,
                    y=1 - 0.25 / height)
    n_hidden = len(fitted) - len(records)
    figure.text(0.5, 1 - 0.6 / height,
                f"{n_hidden} fitted candidate{'s' if n_hidden != 1 else ''} not shown; "
                f"{n_unfitted} never fitted (not needed) not shown", ha="center", va="top",
                fontsize=10, gid="not-shown")
    caption = (f"Science and template: {stamp}×{stamp} px stamps in {unit}, asinh stretch per "
               f"stamp, y up.  D/σ = (S − T⋆K − b)/σ on the central {fit}×{fit} px fit region "
               f"(enlarged) under the candidate's own kernel (local) and under the spatial model "
               f"at its centre; grey = masked.  std: standard deviation of D/σ under the spatial "
               f"model (the ranking); χ²: rms² of D/σ as used by the fit's clipping (local, and "
               f"spatial when it was assessed).")
    figure.text(0.5, 1 - 0.88 / height, "\n".join(textwrap.wrap(caption, int(width * 17))),
                ha="center", va="top", fontsize=8)
    bar = figure.add_axes((0.25, 0.55 / height, 0.5, 0.14 / height))
    colourbar = figure.colorbar(ScalarMappable(norm=z_norm, cmap=cmap_z), cax=bar,
                                orientation="horizontal")
    colourbar.set_label("D/σ (difference in units of its noise)", fontsize=8)
    return figure


# ---------------------------------------------------------------------------
# displayKernelBasis
# ---------------------------------------------------------------------------

def _tile_mosaic(n_tiles, across, tile, col_gap, row_gap, *, below=0.0, left=0.35, right=1.25,
                 top=1.05, bottom=0.35):
    """A figure whose one axes spans it in inch coordinates, and each tile's lower-left corner.

    Tiles are ``tile`` inches (a size, or a (width, height) pair), ``across``
    per row from the top left; ``row_gap`` above each row holds its titles
    and ``below`` under it its labels.  Drawing every tile in one axes
    instead of one axes per tile saves most of the figure's time (axes,
    ticks and their layout dominate matplotlib's cost for small panels).
    """
    tile_w, tile_h = (tile, tile) if np.isscalar(tile) else tile
    rows = math.ceil(n_tiles / across)
    step = row_gap + tile_h + below
    width = left + across * tile_w + (across - 1) * col_gap + right
    height = top + rows * step + bottom
    figure = _new_figure(width, height)
    axes = figure.add_axes((0, 0, 1, 1))
    axes.set_xlim(0, width)
    axes.set_ylim(0, height)
    axes.set_axis_off()
    corners = [(left + (k % across) * (tile_w + col_gap),
                height - top - (k // across) * step - row_gap - tile_h) for k in range(n_tiles)]
    return figure, axes, corners


def _tile(axes, data, corner, size, cmap, vmin, vmax, title, fontsize, gid):
    """One image tile with a thin frame and its title above; returns (image, frame)."""
    from matplotlib.patches import Rectangle

    x0, y0 = corner
    image = axes.imshow(data, origin="lower", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest",
                        extent=(x0, x0 + size, y0, y0 + size))
    frame = Rectangle((x0, y0), size, size, fill=False, edgecolor="0.6", linewidth=0.6)
    axes.add_patch(frame)
    axes.text(x0 + 0.5 * size, y0 + size + 0.04, title, fontsize=fontsize, ha="center", va="bottom",
              linespacing=1.15, gid=gid)
    return image, frame


def _side_colour_bar(figure, image, width, height, label):
    bar = figure.add_axes(((width - 1.0) / width, 0.15, 0.16 / width, 0.7))
    figure.colorbar(image, cax=bar).set_label(label, fontsize=9)
    return bar


def display_kernel_basis(result, *, max_panels=64):
    """Basis kernels of the spatial kernel (``displayKernelBasis``).

    Each kernel ``B_i`` is shown divided by its largest absolute value (one
    shared colour scale), titled with its index, its origin (Gaussian width and
    monomial for Alard-Lupton bases) and ``max|B_i|``.

    Returns
    -------
    matplotlib.figure.Figure
        Two axes: the mosaic, with one image per kernel shown
        (``min(n_basis, max_panels)``) whose title is a text with ``gid``
        ``"basis-<i>"``, and the colour bar.
    """
    kernel = result.psf_matching_kernel
    n_shown = min(kernel.n_basis, max_panels)
    across = min(n_shown, 8 if n_shown > 36 else 6)
    tile = 1.5
    figure, axes, corners = _tile_mosaic(n_shown, across, tile, 0.3, 0.42)
    cmap = _cmap("RdBu_r")
    image = None
    for i, corner in enumerate(corners):
        peak = np.max(np.abs(kernel.basis[i]))
        data = kernel.basis[i] / peak if peak > 0 else kernel.basis[i]
        total = kernel.basis[i].sum()
        image, _ = _tile(axes, data, corner, tile, cmap, -1, 1,
                         f"B{i}: {_basis_label(result, i)}\nmax|B| = {peak:.3g}, ΣB = "
                         f"{total if abs(total) > 1e-9 else 0:.3g}", 7.5, f"basis-{i}")
    basis = result.kernel_basis
    what = {"alard-lupton": "Alard–Lupton", "delta-function": "delta-function"}.get(basis.kind, basis.kind)
    if kernel.n_basis != basis.n_basis or not np.array_equal(kernel.basis, basis.kernels):
        what = f"PCA (from a {what} fit)"
    more = f"; first {n_shown} shown" if n_shown < kernel.n_basis else ""
    renormalised = ("; renormalised as in ip_diffim: B0 sums to 1, the others to 0"
                    if basis.kind == "alard-lupton" and "PCA" not in what else "")
    h = kernel.shape[0] // 2
    width, height = figure.get_size_inches()
    figure.suptitle(f"Kernel basis: {kernel.n_basis} {what} kernels of "
                    f"{kernel.shape[1]}×{kernel.shape[0]} px{more}{renormalised}\n"
                    f"titles: index, Gaussian width and polynomial it was built from; each shown as "
                    f"B/max|B| over u, v = −{h}…{h} px (u right, v up; afw correlation layout)",
                    fontsize=10.5 if width > 9 else 8.5, y=1 - 0.12 / height, va="top")
    _side_colour_bar(figure, image, width, height, "B / max|B|")
    return figure


# ---------------------------------------------------------------------------
# displayKernelMosaic
# ---------------------------------------------------------------------------

def _support_radius(images, fraction=0.998):
    """Smallest half-size of a centred box holding ``fraction`` of every image's sum of squares."""
    h = images.shape[1] // 2
    power = images * images
    totals = power.sum(axis=(1, 2))
    for radius in range(2, h + 1):
        inner = power[:, h - radius:h + radius + 1, h - radius:h + radius + 1].sum(axis=(1, 2))
        if np.all(inner >= fraction * totals):
            return radius
    return h


def _grid_positions(bbox, across):
    x0, y0, x1, y1 = bbox
    width, height = x1 - x0 + 1, y1 - y0 + 1
    down = max(1, int(round(across * height / width)))
    xs = x0 - 0.5 + (np.arange(across) + 0.5) * width / across
    ys = y0 - 0.5 + (np.arange(down) + 0.5) * height / down
    return xs, ys


def _moment_ellipse(axes, moments, colour, origin, scale, clip):
    """Centroid cross and the 1-sigma ellipse (sqrt(2) x the K^2 second moments).

    Kernel pixel offsets ``(u, v)`` are drawn at ``origin + scale * (u, v)``
    (inches of the mosaic), clipped to the tile's frame ``clip``.
    """
    from matplotlib.patches import Ellipse

    cx, cy, ixx, iyy, ixy = moments
    if not np.isfinite(cx):
        return
    values, vectors = np.linalg.eigh(np.array([[ixx, ixy], [ixy, iyy]]))
    values = np.maximum(values, 0.0)
    angle = math.degrees(math.atan2(vectors[1, 1], vectors[0, 1]))
    centre = (origin[0] + scale * cx, origin[1] + scale * cy)
    ellipse = Ellipse(centre, 2 * scale * math.sqrt(2 * values[1]), 2 * scale * math.sqrt(2 * values[0]),
                      angle=angle, fill=False, edgecolor=colour, linewidth=1.0)
    axes.add_patch(ellipse)
    ellipse.set_clip_path(clip)
    (cross,) = axes.plot([centre[0]], [centre[1]], marker="+", color=colour, markersize=8,
                         markeredgewidth=1.2)
    cross.set_clip_path(clip)


def display_kernel_mosaic(result, *, across=7):
    """The spatial kernel realised over the field (``displayKernelMosaic``).

    Kernels at the centres of an ``across`` x (aspect-scaled) grid over the
    cell-set box, on one colour scale, each with its centroid (+) and the
    1-sigma ellipse of its second moments (both from the squared kernel image;
    the ellipse is scaled by sqrt(2) so that it is the 1-sigma contour of a
    Gaussian kernel).  Panels are placed as on the image (north, high y, at
    the top).

    Returns
    -------
    matplotlib.figure.Figure
        Two axes: the mosaic, with one image, ellipse (patch) and centroid
        (line, marker "+") per grid position, titled by a text with ``gid``
        ``"kernel-<k>"`` (k: position in the grid, row by row from low y),
        and the colour bar.
    """
    kernel = result.psf_matching_kernel
    xs, ys = _grid_positions(result.kernel_cell_set.bbox, across)
    gx, gy = np.meshgrid(xs, ys)
    images = kernel.images(gx.ravel(), gy.ravel())
    peak = float(np.max(np.abs(images)))
    signed = float(images.min()) < -0.02 * peak
    cmap = _cmap("RdBu_r" if signed else "viridis")
    vmin = -peak if signed else 0.0
    h = kernel.shape[0] // 2
    radius = min(h, _support_radius(images) + 1)
    rows, cols = len(ys), len(xs)
    tile = 1.6
    figure, axes, corners = _tile_mosaic(rows * cols, cols, tile, 0.25, 0.4)
    scale = tile / (2 * radius + 1)
    image = None
    for k, (x, y, data) in enumerate(zip(gx.ravel(), gy.ravel(), images)):
        row, col = divmod(k, cols)
        corner = corners[(rows - 1 - row) * cols + col]        # north (high y) at the top
        moments = kernel_moments(data)
        sx, sy = (math.sqrt(2 * max(m, 0.0)) for m in moments[2:4])
        image, frame = _tile(axes, data[h - radius:h + radius + 1, h - radius:h + radius + 1], corner,
                             tile, cmap, vmin, peak,
                             f"({x:.0f}, {y:.0f}): ΣK={data.sum():.4f}\n"
                             f"σ={sx:.3f}×{sy:.3f} c=({moments[0]:+.2f},{moments[1]:+.2f})", 6.5,
                             f"kernel-{k}")
        origin = (corner[0] + scale * (radius + 0.5), corner[1] + scale * (radius + 0.5))
        _moment_ellipse(axes, moments, "white" if not signed else "black", origin, scale, frame)
    width, height = figure.get_size_inches()
    figure.suptitle(f"Spatial PSF-matching kernel over the field (panels placed as on the image: "
                    f"x to the right, y up; central {2 * radius + 1}×{2 * radius + 1} of "
                    f"{2 * h + 1}×{2 * h + 1} px shown: u, v = −{radius}…{radius} px)\n"
                    "title: parent (x, y) and kernel sum; σ: 1σ widths along u × v (ellipse), "
                    "c: centroid (+), in px, from the moments of K² (widths ×√2)",
                    fontsize=10 if width > 9 else 8, y=1 - 0.12 / height, va="top")
    _side_colour_bar(figure, image, width, height, "kernel value (fraction of flux per px)")
    return figure


# ---------------------------------------------------------------------------
# plotKernelSpatialModel and plotKernelCoefficients
# ---------------------------------------------------------------------------

def _residual_limits(values, statuses):
    """y limits that show the GOOD candidates well (BAD ones beyond are drawn at the edge)."""
    good = _finite([v for v, s in zip(values, statuses) if s == "GOOD"])
    sample = good if good.size >= 3 else _finite(values)
    if sample.size == 0:
        return -1.0, 1.0
    low, high = float(sample.min()), float(sample.max())
    span = max(high - low, 1e-12 + 1e-6 * max(abs(low), abs(high)))
    return low - 0.25 * span, high + 0.25 * span


def _scatter_by_status(axes, x, y, statuses, limits):
    low, high = limits
    for status in ("GOOD", "BAD"):
        pick = np.array([s == status for s in statuses], dtype=bool)
        if not pick.any():
            continue
        colour, marker = _STATUS_STYLE[status]
        inside = pick & (y >= low) & (y <= high)
        axes.scatter(x[inside], y[inside], s=14, color=colour, marker=marker, linewidths=1.0,
                     label=f"{status} ({int(pick.sum())})")
        for beyond, edge, arrow in ((pick & (y > high), high, "^"), (pick & (y < low), low, "v")):
            if beyond.any():
                axes.scatter(x[beyond], np.full(int(beyond.sum()), edge), s=22, color=colour,
                             marker=arrow, clip_on=False)


def _spatial_rows(result, max_coefficients, unit):
    """(title, spatial map callable, local values, spatial values at the candidates) per row."""
    kernel, background = result.psf_matching_kernel, result.background_model
    records, local = _local_coefficients(result, _records(result, True))
    xs = np.array([r.x for r in records], dtype=np.float64)
    ys = np.array([r.y for r in records], dtype=np.float64)
    spatial = (kernel.spatial_function.terms(xs, ys) @ kernel.coefficients.T
               if records else np.zeros((0, kernel.n_basis)))
    rows = []
    for i in range(min(kernel.n_basis, max_coefficients)):
        constant = ", constant" if not np.any(kernel.coefficients[i, 1:]) else ""
        rows.append((f"coefficient {i} ({_basis_label(result, i)}{constant})",
                     lambda gx, gy, i=i: kernel.spatial_function.evaluate_grid(kernel.coefficients[i],
                                                                               gx, gy),
                     local[:, i], spatial[:, i], "coefficient value"))
    local_bg = np.array([r.background for r in records], dtype=np.float64)
    rows.append(("differential background b(x, y)",
                 lambda gx, gy: background.spatial_function.evaluate_grid(background.coefficients, gx, gy),
                 local_bg, np.asarray(background(xs, ys), dtype=np.float64).reshape(-1),
                 f"background ({unit})"))
    return records, xs, ys, rows


def _frame_at(axes, x0, y0, width, height, colour="0.6"):
    from matplotlib.patches import Rectangle

    axes.add_patch(Rectangle((x0, y0), width, height, fill=False, edgecolor=colour, linewidth=0.6))


def _to_tile(values, low, high, start, size):
    """Map ``values`` from [low, high] onto [start, start + size] (inches of a tile mosaic)."""
    return start + (np.asarray(values, dtype=np.float64) - low) / (high - low) * size


def _status_legend(figure, statuses, **where):
    """Figure legend of the GOOD / BAD markers, with their counts."""
    from matplotlib.lines import Line2D

    handles = []
    for status in ("GOOD", "BAD"):
        n = sum(s == status for s in statuses)
        if n:
            colour, marker = _STATUS_STYLE[status]
            handles.append(Line2D([], [], color=colour, marker=marker, linestyle="none",
                                  label=f"{status} ({n})"))
    figure.legend(handles=handles, frameon=False, **where)


def plot_kernel_spatial_model(result, *, show_bad=True, max_coefficients=10, unit=None):
    """Spatial model of each kernel coefficient (``plotKernelSpatialModel``).

    One row per coefficient (the first ``max_coefficients``) and one for the
    differential background: the map of the spatial function over the
    cell-set box with the candidates marked (its colour strip gives the
    range), and the candidates' local (own-fit) value minus the spatial
    model at their centre against x and against y (GOOD green circles, BAD
    red crosses; the y range, labelled on the left, is set by the GOOD
    candidates, and BAD values beyond it are triangles at the edge).

    Parameters
    ----------
    result : MatchResult
    show_bad : bool
        Include rejected candidates.
    max_coefficients : int
        Kernel coefficients shown (the first ones).
    unit : str, optional
        Unit of the background; default the ``BUNIT`` header card of the
        result's exposures, else :data:`DEFAULT_UNIT`.

    Returns
    -------
    matplotlib.figure.Figure
        One axes (inch coordinates) holding, per row, the map and its colour
        strip (two images), the two scatter panels, and the row's title as
        a text with ``gid`` ``"row-<k>"``.
    """
    unit = _unit(unit, result)
    records, xs, ys, rows = _spatial_rows(result, max_coefficients, unit)
    statuses = [r.status for r in records]
    keep = np.array([show_bad or s != "BAD" for s in statuses], dtype=bool)
    statuses = [s for s, k in zip(statuses, keep) if k]
    xs, ys = xs[keep], ys[keep]
    x0, y0, x1, y1 = result.kernel_cell_set.bbox
    box = (x0 - 0.5, x1 + 0.5, y0 - 0.5, y1 + 0.5)
    gx = np.linspace(x0, x1, 96)
    gy = np.linspace(y0, y1, 96)
    tile_h = 1.45
    map_w = float(np.clip(tile_h * (x1 - x0 + 1) / (y1 - y0 + 1), 1.0, 2.6))
    strip_gap, strip_w, strip_room, scatter_w, label_room, gap = 0.08, 0.12, 0.75, 3.6, 0.75, 0.35
    left = 0.35
    scatter_x = [left + map_w + strip_gap + strip_w + strip_room + label_room,
                 left + map_w + strip_gap + strip_w + strip_room + label_room + scatter_w + gap]
    figure, axes, corners = _tile_mosaic(len(rows), 1, (scatter_x[1] + scatter_w - left, tile_h), 0.0,
                                         0.4, below=0.1, left=left, right=0.3, top=1.3, bottom=0.45)
    cmap, colours = _cmap("viridis"), [_status_colour(s) for s in statuses]
    for k, (row, (_, bottom)) in enumerate(zip(rows, corners)):
        title, spatial_map, local, spatial, quantity = row
        top = bottom + tile_h
        values = spatial_map(gx, gy)
        low, high = float(np.min(values)), float(np.max(values))
        constant = not high > low
        if constant:
            low, high = low - 0.5 * max(abs(low), 1e-12), high + 0.5 * max(abs(high), 1e-12)
        axes.imshow(values, origin="lower", cmap=cmap, vmin=low, vmax=high, aspect="auto",
                    extent=(left, left + map_w, bottom, top), interpolation="bilinear")
        axes.scatter(_to_tile(xs, box[0], box[1], left, map_w),
                     _to_tile(ys, box[2], box[3], bottom, tile_h), s=10, c=colours, edgecolors="white",
                     linewidths=0.4)
        _frame_at(axes, left, bottom, map_w, tile_h)
        axes.text(left, top + 0.05, title if quantity == "coefficient value" else f"{title}, {quantity}",
                  fontsize=8.5, ha="left", va="bottom", gid=f"row-{k}")
        strip = left + map_w + strip_gap
        axes.imshow(np.full((1, 1), 0.5) if constant else np.linspace(0.0, 1.0, 64)[:, None],
                    origin="lower", cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto",
                    extent=(strip, strip + strip_w, bottom, top))
        if constant:
            axes.text(strip + strip_w + 0.05, 0.5 * (bottom + top),
                      f"{0.5 * (low + high):.4g}\n(constant)", fontsize=7, ha="left", va="center")
        for value, y, va in () if constant else ((high, top, "top"), (low, bottom, "bottom")):
            axes.text(strip + strip_w + 0.05, y, f"{value:.3g}", fontsize=7, ha="left", va=va)
        residual = (local - spatial)[keep]
        r_low, r_high = _residual_limits(residual, statuses)
        y_tile = _to_tile(residual, r_low, r_high, bottom, tile_h)
        for j, (start, coordinate, (c_low, c_high)) in enumerate(
                zip(scatter_x, (xs, ys), (box[:2], box[2:]))):
            _frame_at(axes, start, bottom, scatter_w, tile_h)
            if r_low < 0 < r_high:
                level = float(_to_tile(0.0, r_low, r_high, bottom, tile_h))
                axes.plot([start, start + scatter_w], [level, level], color="0.5", linewidth=0.8)
            _scatter_by_status(axes, _to_tile(coordinate, c_low, c_high, start, scatter_w), y_tile,
                               statuses, (bottom, top))
        zero = float(_to_tile(0.0, r_low, r_high, bottom, tile_h))
        labels = [(r_high, top, "top"), (r_low, bottom, "bottom")]
        if bottom + 0.2 < zero < top - 0.2:                 # "0" unless it would touch the others
            labels.append((0.0, zero, "center"))
        for value, y, va in labels:
            axes.text(scatter_x[0] - 0.06, y, f"{value:.3g}", fontsize=7, ha="right", va=va)
    first_top, last_bottom = corners[0][1] + tile_h, corners[-1][1]
    for start, name, (c_low, c_high) in zip(scatter_x, "xy", ((x0, x1), (y0, y1))):
        axes.text(start, first_top + 0.3, f"local − spatial against {name}", fontsize=9, ha="left",
                  va="bottom", weight="bold")
        for value, ha, x in ((c_low, "left", start), (c_high, "right", start + scatter_w)):
            axes.text(x, last_bottom - 0.06, f"{value}", fontsize=7, ha=ha, va="top")
        axes.text(start + 0.5 * scatter_w, last_bottom - 0.06, f"{name} (px)", fontsize=8, ha="center",
                  va="top")
    axes.text(left + 0.5 * map_w, last_bottom - 0.06, f"x: {x0}…{x1}, y: {y0}…{y1} px", fontsize=7,
              ha="center", va="top")
    width, height = figure.get_size_inches()
    _status_legend(figure, statuses, loc="upper right", fontsize=8, ncol=2,
                   bbox_to_anchor=(1 - 0.3 / width, 1 - 0.72 / height))
    n_basis = result.psf_matching_kernel.n_basis
    more = f" (first {len(rows) - 1} of {n_basis})" if len(rows) - 1 < n_basis else ""
    figure.suptitle(f"Spatial model of the kernel coefficients{more} and of the background\n"
                    "left: spatial function over the field with the candidates, its range on the colour "
                    "strip; middle, right: each candidate's own fit\nminus the model at its centre, in "
                    "the row's unit; y range set by the GOOD candidates (labels on the left), BAD values "
                    "beyond it as triangles at the edge", fontsize=9, y=1 - 0.08 / height, va="top")
    return figure


def plot_kernel_coefficients(result, *, show_bad=True, max_coefficients=36, bins=15):
    """Histograms of the candidates' local kernel coefficients (``plotKernelCoefficients``).

    One panel per coefficient (the first ``max_coefficients``): GOOD (green)
    and BAD (red) candidates' own-fit values, and the spatial model at the
    centre of the cell-set box (black line).  Under each panel: its x range
    (set by the GOOD candidates; BAD values beyond it are in the edge bins)
    and the count of its highest bin.

    Returns
    -------
    matplotlib.figure.Figure
        One axes (inch coordinates) with a histogram panel per coefficient
        shown, titled by a text with ``gid`` ``"coefficient-<i>"``, and a
        figure legend.
    """
    from matplotlib.lines import Line2D

    kernel = result.psf_matching_kernel
    records, local = _local_coefficients(result, _records(result, show_bad))
    centre = kernel.basis_coefficients(*_cell_box_centre(result))
    n_shown = min(kernel.n_basis, max_coefficients)
    across = min(n_shown, 6)
    tile_w, tile_h = 2.2, 1.2
    figure, axes, corners = _tile_mosaic(n_shown, across, (tile_w, tile_h), 0.3, 0.3, below=0.25,
                                         left=0.3, right=0.3, top=1.3, bottom=0.15)
    statuses = np.array([r.status for r in records])
    for i, (x0, y0) in enumerate(corners):
        values = local[:, i]
        low, high = _residual_limits(np.append(values, centre[i]), [*statuses, "GOOD"])
        edges = np.linspace(low, high, bins + 1)
        counts = {}
        for status in ("GOOD", "BAD"):
            pick = values[(statuses == status) & np.isfinite(values)] if len(values) else values
            counts[status] = np.histogram(np.clip(pick, low, high), bins=edges)[0]
        peak = max(1, *(int(c.max()) for c in counts.values()))
        xs = _to_tile(edges, low, high, x0, tile_w)
        scale = 0.92 * tile_h / peak
        if counts["GOOD"].any():
            axes.stairs(y0 + counts["GOOD"] * scale, xs, baseline=y0, fill=True, color=GOOD_COLOUR,
                        alpha=0.55, linewidth=0)
        if counts["BAD"].any():
            axes.stairs(y0 + counts["BAD"] * scale, xs, baseline=y0, color=BAD_COLOUR, linewidth=1.3)
        if low <= centre[i] <= high:
            x = float(_to_tile(centre[i], low, high, x0, tile_w))
            axes.plot([x, x], [y0, y0 + tile_h], color="black", linewidth=1.2)
        _frame_at(axes, x0, y0, tile_w, tile_h)
        axes.text(x0 + 0.5 * tile_w, y0 + tile_h + 0.04, f"{i}: {_basis_label(result, i)}", fontsize=8,
                  ha="center", va="bottom", gid=f"coefficient-{i}")
        axes.text(x0 + 0.5 * tile_w, y0 - 0.04, f"{low:.3g} … {high:.3g};  highest bin {peak}",
                  fontsize=6.5, ha="center", va="top")
    width, height = figure.get_size_inches()
    n_good, n_bad = (int(np.sum(statuses == s)) for s in ("GOOD", "BAD"))
    handles = [Line2D([], [], color=GOOD_COLOUR, alpha=0.55, linewidth=6, label=f"GOOD ({n_good})"),
               Line2D([], [], color=BAD_COLOUR, linewidth=1.3, label=f"BAD ({n_bad})"),
               Line2D([], [], color="black", linewidth=1.2, label="spatial model at the centre")]
    figure.legend(handles=handles, loc="upper left", bbox_to_anchor=(0.01, 1 - 0.08 / height),
                  fontsize=8.5, frameon=False)
    more = f" (first {n_shown} of {kernel.n_basis})" if n_shown < kernel.n_basis else ""
    x, y = _cell_box_centre(result)
    figure.suptitle(f"Kernel coefficients of each candidate's own fit{more}\n"
                    f"black line: spatial model at the field centre ({x:.0f}, {y:.0f}) px; under each "
                    f"panel: its coefficient range and the count of its highest bin\n"
                    f"x range set by the GOOD candidates; BAD values beyond it are in the edge bins",
                    fontsize=10.5 if width > 9 else 8.5, y=1 - 0.1 / height, va="top")
    return figure


# ---------------------------------------------------------------------------
# Full images
# ---------------------------------------------------------------------------

# Room around an image panel, in inches: y tick labels and label on the left, title above,
# x tick labels and label below, and the colour bar with its tick labels and unit on the right.
_LEFT_ROOM, _BELOW_ROOM, _BAR_PAD, _BAR_WIDTH, _BAR_ROOM = 0.75, 0.6, 0.1, 0.17, 1.0


def _panel_size(masked_image, longest):
    """Width and height (inches) of an image panel whose longer side is ``longest``."""
    ny, nx = masked_image.shape
    return (longest, longest * ny / nx) if nx >= ny else (longest * nx / ny, longest)


def _image_grid(n_rows, n_cols, panel, *, title_room, top, bottom=0.0, n_panels=None):
    """A figure of image panels, each with its colour bar: (figure, [(axes, bar axes), ...]).

    The room around each panel is fixed in inches (``_LEFT_ROOM``,
    ``_BAR_ROOM``, ...) so that tick labels, axis labels and the colour-bar
    label stay inside the figure whatever the image's size and aspect.  The
    first ``n_panels`` (default all) places are used, row by row; the figure's
    axes are the image axes, then the colour bars (labelled ``"<colorbar>"``).
    """
    panel_w, panel_h = panel
    column = _LEFT_ROOM + panel_w + _BAR_PAD + _BAR_WIDTH + _BAR_ROOM
    row = title_room + panel_h + _BELOW_ROOM
    width, height = n_cols * column + 0.1, top + n_rows * row + bottom
    figure = _new_figure(width, height)
    places = [(0.05 + c * column + _LEFT_ROOM, height - top - r * row - title_room - panel_h)
              for r in range(n_rows) for c in range(n_cols)][:n_panels]
    images = [figure.add_axes((x / width, y / height, panel_w / width, panel_h / height))
              for x, y in places]
    bars = [figure.add_axes(((x + panel_w + _BAR_PAD) / width, y / height, _BAR_WIDTH / width,
                             panel_h / height), label="<colorbar>") for x, y in places]
    return figure, list(zip(images, bars))


def _screen_step(figure, axes, shape):
    """Largest k such that every k-th pixel still gives at least one pixel per screen pixel.

    Nearest-neighbour display of a large image samples it anyway; giving
    matplotlib the sample it would draw saves most of its resampling time.
    """
    box = axes.get_position()
    width, height = figure.get_size_inches() * figure.dpi
    return max(1, int(min(shape[1] / (box.width * width), shape[0] / (box.height * height))))


def _show_image(figure, axes, bar, masked_image, title, norm, unit, cmap="gray", blank=None):
    step = _screen_step(figure, axes, masked_image.shape)
    data = masked_image.image[::step, ::step]
    if blank is not None:
        data = np.where(blank[::step, ::step], np.nan, data)
    image = axes.imshow(data, origin="lower", cmap=_cmap(cmap, bad="#b8c4d6"), norm=norm,
                        extent=_extent(masked_image), interpolation="nearest", aspect="auto")
    axes.set_title(title, fontsize=10, y=1.0)
    axes.set_xlabel("x (px)", fontsize=9)
    axes.set_ylabel("y (px)", fontsize=9)
    axes.tick_params(labelsize=8)
    colour_bar = figure.colorbar(image, cax=bar)
    colour_bar.set_label(unit, fontsize=9)
    colour_bar.ax.tick_params(labelsize=8)
    return image


def _stretch_words(stretch):
    return "zscale limits, linear" if stretch == "zscale" else "asinh stretch, 0.5–99.5 % limits"


def _single_image(masked_image, title, stretch, unit):
    masked_image = _masked_image(masked_image)
    figure, [(axes, bar)] = _image_grid(1, 1, _panel_size(masked_image, 5.6), title_room=0.6, top=0.1)
    _show_image(figure, axes, bar, masked_image, f"{title}\n({_stretch_words(stretch)})",
                _norm(masked_image.image, stretch), unit)
    return figure


def display_template(result, template, *, stretch="zscale", unit=None):
    """The template, registered on the science grid (``displayTemplate``).

    Parameters
    ----------
    result : MatchResult
    template : MaskedImage or Exposure
    stretch : {"zscale", "asinh"}
    unit : str, optional
        Colour-bar unit; default the template's ``BUNIT`` header card, else
        :data:`DEFAULT_UNIT`.

    Returns
    -------
    matplotlib.figure.Figure
        One image axes and its colour bar.
    """
    role = "image convolved" if result.convolved == "template" else "reference image"
    return _single_image(template, f"Template ({role})", stretch, _unit(unit, template, result))


def display_sci_im(result, science, *, stretch="zscale", unit=None):
    """The science image (``displaySciIm``).

    Parameters
    ----------
    result : MatchResult
    science : MaskedImage or Exposure
    stretch : {"zscale", "asinh"}
    unit : str, optional
        Colour-bar unit; default the science ``BUNIT`` header card, else
        :data:`DEFAULT_UNIT`.

    Returns
    -------
    matplotlib.figure.Figure
        One image axes and its colour bar.
    """
    role = "reference image" if result.convolved == "template" else "image convolved"
    return _single_image(science, f"Science ({role})", stretch, _unit(unit, science, result))


def display_spatial_cells(result, science, *, stretch="zscale", unit=None):
    """Spatial cells and candidates over the science image (``displaySpatialCells``).

    Cell boxes in blue with their index; candidates GOOD (green circle), BAD
    (red cross) and UNKNOWN (orange square: never needed, its cell had
    enough better candidates).

    Parameters
    ----------
    result : MatchResult
    science : MaskedImage or Exposure
    stretch : {"zscale", "asinh"}
    unit : str, optional
        Colour-bar unit; default the science ``BUNIT`` header card, else
        :data:`DEFAULT_UNIT`.

    Returns
    -------
    matplotlib.figure.Figure
        One image axes and its colour bar.
    """
    from matplotlib.patches import Rectangle

    unit = _unit(unit, science, result)
    science = _masked_image(science)
    cells = result.kernel_cell_set
    ny, nx = science.shape
    x0, y0, x1, y1 = cells.bbox
    n_x = -(-(x1 - x0 + 1) // cells.size_cell_x)
    n_y = -(-(y1 - y0 + 1) // cells.size_cell_y)
    longest = min(17.0, max(6.5, 0.8 * max(n_x, n_y) + 0.5))
    panel = _panel_size(science, longest)
    figure, [(axes, bar)] = _image_grid(1, 1, panel, title_room=0.6, top=0.1, bottom=0.35)
    _show_image(figure, axes, bar, science, "", _norm(science.image, stretch), unit)
    size = float(np.clip(3000.0 / (n_x * n_y), 12.0, 60.0)) * (panel[0] / 7.5)
    label_size = 7.5 if max(n_x, n_y) <= 8 else 6.0
    for j in range(n_y):
        for i in range(n_x):
            left, bottom = x0 + i * cells.size_cell_x - 0.5, y0 + j * cells.size_cell_y - 0.5
            right = x1 + 0.5 if i == n_x - 1 else left + cells.size_cell_x
            top = y1 + 0.5 if j == n_y - 1 else bottom + cells.size_cell_y
            axes.add_patch(Rectangle((left, bottom), right - left, top - bottom, fill=False,
                                     edgecolor="#33ccff", linewidth=1.2))
            if n_x * n_y <= 400:
                axes.text(left + 0.004 * nx, top - 0.004 * ny, str(j * n_x + i), color="black",
                          fontsize=label_size, va="top", ha="left",
                          bbox={"facecolor": "#33ccff", "edgecolor": "none", "pad": 1.0,
                                "alpha": 0.8})
    for status in ("GOOD", "BAD", "UNKNOWN"):
        chosen = [r for r in cells.candidates if r.status == status]
        colour, marker = _STATUS_STYLE[status]
        xs = [r.x for r in chosen]
        ys = [r.y for r in chosen]
        if marker == "x":
            axes.scatter(xs, ys, s=size, marker=marker, color=colour, linewidths=1.5,
                         label=f"{status} ({len(chosen)})")
        else:
            axes.scatter(xs, ys, s=size, marker=marker, facecolors="none", edgecolors=colour,
                         linewidths=1.5, label=f"{status} ({len(chosen)})")
    width, height = figure.get_size_inches()
    axes.legend(fontsize=8, loc="lower left", bbox_to_anchor=(0.05 / width, 0.02), ncol=3,
                frameon=False, bbox_transform=figure.transFigure)
    dropped = "; ".join(f"{k.label}: {v}" for k, v in cells.selection_rejects.items() if v) or "none"
    title = (f"Spatial cells ({cells.size_cell_x}×{cells.size_cell_y} px, cyan, numbered) and kernel "
             f"candidates on the science image ({_stretch_words(stretch)}); dropped before the fit: "
             f"{dropped}")
    axes.set_title("\n".join(textwrap.wrap(title, max(40, int(panel[0] * 13)))), fontsize=9.5, y=1.0)
    return figure


def display_diff_im(result, template, science, *, stretch="zscale", unit=None):
    """Template, science, matched image and difference (``displayDiffIm``).

    Template, science and matched image share the science image's stretch;
    the difference (``result.subtracted_image``) has its own stretch,
    symmetric about zero.  A result without a difference (a match) gets three
    panels.

    Parameters
    ----------
    result : MatchResult
    template, science : MaskedImage or Exposure
    stretch : {"zscale", "asinh"}
    unit : str, optional
        Colour-bar unit; default the science (else template) ``BUNIT`` header
        card, else :data:`DEFAULT_UNIT`.

    Returns
    -------
    matplotlib.figure.Figure
        Four (or three) image axes, then their colour bars in the same order.
    """
    unit = _unit(unit, science, template, result)
    template, science = _masked_image(template), _masked_image(science)
    difference = getattr(result, "subtracted_image", None)
    registered = "\n(registered on the science grid)" if hasattr(result, "warped_exposure") else ""
    panels = [(template, f"Template{registered}"), (science, "Science"),
              (result.matched_image, f"Matched {result.convolved}\n(convolved with the kernel)")]
    if difference is not None:
        panels.append((difference, "Difference"))
    figure, grid = _image_grid(2, 2, _panel_size(science, 4.3), title_room=0.55, top=0.55,
                               n_panels=len(panels))
    norm = _norm(science.image, stretch)
    for (axes, bar), (image, title) in zip(grid, panels):
        blank = (image.mask & image.bits(("EDGE", "NO_DATA"))) != 0
        shown = norm
        if title == "Difference":
            z = normalized_residuals(image.image, image.variance, image.mask, -1)
            if z.size:
                median = float(np.median(z))
                title = (f"Difference\n(D/σ over {z.size} unflagged px: median {median:+.3f}, "
                         f"robust std {1.4826 * float(np.median(np.abs(z - median))):.3f})")
            shown = _norm(image.image[~blank], stretch, symmetric=True)
        _show_image(figure, axes, bar, image, title, shown, unit, blank=blank)
    figure.suptitle(f"Images of the fit ({_stretch_words(stretch)}; template, science and matched "
                    f"share the science limits; grey: EDGE or NO_DATA)", fontsize=11,
                    y=1 - 0.12 / figure.get_size_inches()[1], va="top")
    return figure


# ---------------------------------------------------------------------------
# Summary and writing
# ---------------------------------------------------------------------------

def summary_figure(result):
    """A text page: basis, kernel sum, candidates, warnings, quality and timings.

    Returns
    -------
    matplotlib.figure.Figure
    """
    figure = _new_figure(8.5, 11.0)
    basis, cells, diagnostics = result.kernel_basis, result.kernel_cell_set, result.diagnostics
    lines = [f"convolved image: {result.convolved}",
             f"PSF FWHM template / science: {_fmt(_or_nan(result.template_fwhm_pix))} / "
             f"{_fmt(_or_nan(result.science_fwhm_pix))} px",
             f"basis: {basis.n_basis} {basis.kind} kernels of {basis.width}×{basis.width} px"
             + (f" (σ = {', '.join(f'{s:.2f}' for s in basis.sigmas)} px; degrees "
                f"{', '.join(str(d) for d in basis.degrees)})" if basis.sigmas else ""),
             f"spatial kernel: order {result.psf_matching_kernel.spatial_function.order} "
             f"({result.psf_matching_kernel.spatial_function.model_type}), "
             f"{result.psf_matching_kernel.n_basis} bases",
             f"kernel sum at the centre: {diagnostics.get('kernel_sum_at_centre', math.nan):.5f}",
             f"spatial condition number: {diagnostics.get('spatial_condition_number', math.nan):.3g}",
             f"candidates: {cells.n_good} GOOD, {cells.n_bad} BAD, {cells.count('UNKNOWN')} not needed",
             ""]
    lines += [f"  rejected by {k}: {v}" for k, v in cells.rejection_counts().items()]
    warnings = diagnostics.get("warnings", [])
    lines += ["", f"warnings ({len(warnings)}):"] + [f"  {w}" for w in warnings or ["none"]]
    quality = getattr(result, "quality", None)
    if quality is not None:
        meta = quality.meta
        lines += ["", f"quality over {meta.get('n_aggregated', 0)} GOOD candidates "
                      "(median [mean ± std] over candidates) of D/σ under each candidate's own "
                      "kernel (local) and the spatial model (spatial); ks_p: Kolmogorov–Smirnov "
                      "p-value, ad_a2: Anderson–Darling A² against N(0, 1); N(0, 1) noise gives "
                      "mean 0, std 1, chi2_red 1, ks_p uniform in [0, 1], ad_a2 ≈ 1:"]
        for stage in ("local", "spatial"):
            for name in ("mean", "std", "chi2_red", "ks_p", "ad_a2"):
                column = f"{stage}_{name}"
                lines.append(f"  {column:<18s} {meta.get(column + '_MEDIAN', math.nan):9.4f}  "
                             f"[{meta.get(column + '_MEAN', math.nan):.4f} ± "
                             f"{meta.get(column + '_STDEV', math.nan):.4f}]")
    lines += ["", "time per stage (s): " + ", ".join(f"{k} {v:.3f}" for k, v in result.timings.items())]
    wrapped = []
    for line in lines:
        wrapped += textwrap.wrap(line, 95, subsequent_indent="    ") or [""]
    figure.text(0.06, 0.965, "gpudiffim PSF-matching report", va="top", ha="left", fontsize=15,
                weight="bold")
    figure.text(0.06, 0.93, "\n".join(wrapped), va="top", ha="left", family="monospace", fontsize=8.5)
    return figure


def _or_nan(value):
    return math.nan if value is None else float(value)


_FIGURES = {
    "displayCandidates": lambda r, t, s, o, u: display_candidates(r, t, s, unit=u),
    "displayKernelBasis": lambda r, t, s, o, u: display_kernel_basis(r),
    "displayKernelMosaic": lambda r, t, s, o, u: display_kernel_mosaic(r),
    "plotKernelSpatialModel": lambda r, t, s, o, u: plot_kernel_spatial_model(r, unit=u),
    "plotKernelCoefficients": lambda r, t, s, o, u: plot_kernel_coefficients(r),
    "displayTemplate": lambda r, t, s, o, u: display_template(r, t, stretch=o, unit=u),
    "displaySciIm": lambda r, t, s, o, u: display_sci_im(r, s, stretch=o, unit=u),
    "displaySpatialCells": lambda r, t, s, o, u: display_spatial_cells(r, s, stretch=o, unit=u),
    "displayDiffIm": lambda r, t, s, o, u: display_diff_im(r, t, s, stretch=o, unit=u),
}


def _render(figure):
    """Draw ``figure`` once with Agg at its own dpi; its RGB pixels (uint8, top row first)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = figure.canvas if isinstance(figure.canvas, FigureCanvasAgg) else FigureCanvasAgg(figure)
    canvas.draw()
    return np.ascontiguousarray(np.asarray(canvas.buffer_rgba())[..., :3])


def _png_bytes(pixels, dpi):
    """An 8-bit RGB, non-interlaced PNG of ``pixels`` (zlib level 3: files no larger than
    with Pillow's default level 6, in about half the time)."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="png", compress_level=3, dpi=(dpi, dpi))
    return buffer.getvalue()


def _png_stream(data):
    """Width, height and image data (the IDAT chunks: one zlib stream) of an RGB PNG."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        msg = "not a PNG file"
        raise ValueError(msg)
    position, header, chunks = 8, None, []
    while position < len(data):
        length, kind = struct.unpack(">I4s", data[position:position + 8])
        body = data[position + 8:position + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            chunks.append(body)
        position += 12 + length
    width, height, depth, colour, _, _, interlace = header
    if (depth, colour, interlace) != (8, 2, 0):
        msg = f"PNG must be 8-bit RGB, not interlaced; got depth {depth}, colour type {colour}"
        raise ValueError(msg)
    return width, height, b"".join(chunks)


def _write_pdf(path, pages):
    """A PDF with one page per ``(png bytes, dpi)``: the image filling a page of its size.

    A PNG's image data is a zlib stream of rows each led by a filter byte,
    which is exactly what PDF's FlateDecode with the PNG predictors
    (``/Predictor 15``) reads, so the PNG files' compressed bytes are copied
    in without decoding or compressing anything again.
    """
    objects = {}
    kids = []
    for k, (png, dpi) in enumerate(pages):
        width, height, stream = _png_stream(png)
        page, content, image = 3 + 3 * k, 4 + 3 * k, 5 + 3 * k
        kids.append(page)
        w, h = width * 72.0 / dpi, height * 72.0 / dpi
        drawing = f"q {w:.4f} 0 0 {h:.4f} 0 0 cm /Im0 Do Q".encode()
        objects[page] = (f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 {w:.4f} {h:.4f}] "
                         f"/Resources << /XObject << /Im0 {image} 0 R >> >> /Contents {content} 0 R >>"
                         ).encode()
        objects[content] = b"<< /Length %d >>\nstream\n%s\nendstream" % (len(drawing), drawing)
        objects[image] = (f"<< /Type /XObject /Subtype /Image /Width {width} /Height {height} "
                          f"/ColorSpace /DeviceRGB /BitsPerComponent 8 /Filter /FlateDecode "
                          f"/DecodeParms << /Predictor 15 /Colors 3 /BitsPerComponent 8 "
                          f"/Columns {width} >> /Length {len(stream)} >>\nstream\n").encode() \
            + stream + b"\nendstream"
    info = 3 + 3 * len(pages)
    objects[1] = b"<< /Type /Catalog /Pages 2 0 R >>"
    references = " ".join(f"{page} 0 R" for page in kids)
    objects[2] = f"<< /Type /Pages /Kids [{references}] /Count {len(kids)} >>".encode()
    objects[info] = f"<< /Producer (gpudiffim {_version()}) >>".encode()
    with open(path, "wb") as handle:
        handle.write(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
        offsets = []
        for number in range(1, info + 1):
            offsets.append(handle.tell())
            handle.write(b"%d 0 obj\n%s\nendobj\n" % (number, objects[number]))
        start = handle.tell()
        handle.write(b"xref\n0 %d\n0000000000 65535 f \n" % (info + 1))
        handle.write(b"".join(b"%010d 00000 n \n" % offset for offset in offsets))
        handle.write(b"trailer\n<< /Size %d /Root 1 0 R /Info %d 0 R >>\nstartxref\n%d\n%%%%EOF\n"
                     % (info + 1, info, start))


def _version():
    from . import __version__

    return __version__


def write_figures(result, template, science, folder, names=None, *, stretch="zscale", report=True,
                  unit=None):
    """Write the selected figures as ``<name>.png`` and a multi-page PDF report.

    Each figure is drawn once (Agg, 100 dpi); the PNG file and the report's
    page are that one image.  One progress record per figure, and one for the
    report, goes to the ``gpudiffim.diagnostics`` logger at INFO
    (``"figure 3/9 displayKernelMosaic: 0.42 s"``).

    Parameters
    ----------
    result : MatchResult
        A fit of :class:`~gpudiffim.ImagePsfMatchTask`.
    template, science : MaskedImage or Exposure
        Its inputs (for exposures, the registered template
        ``result.warped_exposure``).
    folder : str or os.PathLike
        Output folder, created if missing; existing files of the same names
        are replaced.
    names : sequence of str, optional
        Debug names (:data:`DEBUG_NAMES`); every figure when omitted.
    stretch : {"zscale", "asinh"}
        Stretch of the full images.
    report : bool
        Also write :data:`REPORT_NAME`: a summary page (text) then every figure.
    unit : str, optional
        Unit of the image values in the labels.  Default: the ``BUNIT``
        header card of ``science`` (else ``template``) when they are
        exposures read from FITS files (:func:`gpudiffim.io.read_exposure`
        keeps the header in ``Exposure.info.header``), else
        :data:`DEFAULT_UNIT`.  None or a blank string: that default.

    Returns
    -------
    list of str
        Paths written (PNG files, then the PDF).

    Raises
    ------
    MissingDependencyError
        If matplotlib is not installed.
    ConfigurationError
        For an unknown name or stretch, or a unit that is not a string.
    """
    require_matplotlib()
    selected = FIGURE_NAMES if names is None else check_debug_names(names)
    if stretch not in ("zscale", "asinh"):
        msg = f"stretch must be 'zscale' or 'asinh', got {stretch!r}"
        raise ConfigurationError(msg)
    unit = _unit(unit, science, template, result)
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    written, pages = [], []
    for k, name in enumerate(selected, 1):
        start = time.perf_counter()
        figure = _FIGURES[name](result, template, science, stretch, unit)
        png = _png_bytes(_render(figure), _DPI)
        path = os.path.join(folder, f"{name}.png")
        with open(path, "wb") as handle:
            handle.write(png)
        written.append(path)
        pages.append((png, _DPI))
        log.info("figure %d/%d %s: %.2f s", k, len(selected), name, time.perf_counter() - start)
    if report and pages:
        start = time.perf_counter()
        path = os.path.join(folder, REPORT_NAME)
        summary = summary_figure(result)
        summary.set_dpi(_SUMMARY_DPI)
        _write_pdf(path, [(_png_bytes(_render(summary), _SUMMARY_DPI), _SUMMARY_DPI), *pages])
        written.append(path)
        log.info("report %s (%d pages): %.2f s", REPORT_NAME, len(pages) + 1,
                 time.perf_counter() - start)
    return written
