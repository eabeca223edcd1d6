"""Figures of a kernel fit: ``ip_diffim``'s debug displays, written to files.

``ip_diffim``'s ``ImagePsfMatchTask`` opens image viewers when ``lsstDebug``
variables are set (spec section 12).  Here each variable has a function that
returns a :class:`matplotlib.figure.Figure` (never shown, no pyplot state):

========================  ==========================================================
``displayCandidates``     :func:`display_candidates`: every fitted candidate's
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
files and one multi-page PDF report.

matplotlib is optional (``pip install gpudiffim[plot]``); it is imported on
first use, and files are rendered with the Agg (PNG) and PDF backends.
"""

import math
import os
import textwrap

import numpy as np

from .errors import ConfigurationError, MissingDependencyError
from .quality import candidate_differences, kernel_moments, normalized_residuals

__all__ = [
    "DEBUG_NAMES",
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

GOOD_COLOUR, BAD_COLOUR, UNKNOWN_COLOUR = "#1b9e1b", "#d62020", "#e69f00"
_STATUS_STYLE = {"GOOD": (GOOD_COLOUR, "o"), "BAD": (BAD_COLOUR, "x"), "UNKNOWN": (UNKNOWN_COLOUR, "s")}
_RESIDUAL_LIMIT = 5.0


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

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


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


def _bare(axes):
    axes.set_xticks([])
    axes.set_yticks([])


def _frame(axes, colour, width=1.6):
    for spine in axes.spines.values():
        spine.set_edgecolor(colour)
        spine.set_linewidth(width)


def _records(result, show_bad, fitted=True):
    records = result.kernel_cell_set.candidates
    if fitted:
        records = [r for r in records if r.coefficients]
    return [r for r in records if show_bad or r.status != "BAD"]


def _z_stamp(difference, variance, mask, bad_bits):
    """D / sigma with unusable pixels set to NaN."""
    with np.errstate(divide="ignore", invalid="ignore"):
        z = difference / np.sqrt(variance)
    usable = np.isfinite(z) & (variance > 0) & ((mask & bad_bits) == 0)
    return np.where(usable, z, np.nan)


def _fmt(value, digits=2):
    return f"{value:.{digits}f}" if np.isfinite(value) else "n/a"


def _candidate_label(record):
    chi_local = record.single_rms ** 2
    chi_spatial = record.spatial_rms ** 2
    head = f"#{record.id} at ({record.x}, {record.y})  {record.status}"
    spatial = _fmt(chi_spatial) if np.isfinite(chi_spatial) else "not assessed"
    chi = f"χ² = rms² of D/σ: local {_fmt(chi_local)}, spatial {spatial}"
    lines = [head, chi]
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

def _sample_candidates(records, limit):
    """At most ``limit`` records: up to half BAD, the rest GOOD, each spread evenly over the cells."""
    if limit is None or len(records) <= limit:
        return list(records)
    bad = [r for r in records if r.status == "BAD"]
    good = [r for r in records if r.status != "BAD"]
    n_bad = min(len(bad), max(limit // 2, limit - len(good)))
    n_good = min(len(good), limit - n_bad)
    chosen = set()
    for group, n in ((bad, n_bad), (good, n_good)):
        if n:
            chosen |= {id(group[k]) for k in np.linspace(0, len(group) - 1, n).round().astype(int)}
    return [r for r in records if id(r) in chosen]


def display_candidates(result, template, science, *, show_bad=True, max_candidates=60,
                       tiles_across=None):
    """Mosaic of the fitted kernel candidates (``displayCandidates``).

    For each candidate: the science and template stamps (asinh stretch per
    stamp) and ``D / sigma`` on the fit region under its own kernel and
    background (local) and under the spatial model at its centre (one shared
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
    max_candidates : int or None
        At most this many candidates are drawn (None: all): up to half of
        them BAD, the rest GOOD, each group spread evenly over the cells.
    tiles_across : int, optional
        Candidates per row (3 up to 30 candidates, more beyond).

    Returns
    -------
    matplotlib.figure.Figure
        Two axes: the mosaic (four images per candidate, in candidate order:
        science, template, local D/sigma, spatial D/sigma) and the colour bar.
        Each candidate's label is a text of the mosaic axes with ``gid``
        ``"candidate-<id>"``.
    """
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.patches import Rectangle

    fitted = _records(result, show_bad)
    if not fitted:
        msg = "no fitted candidate to display"
        raise ValueError(msg)
    records = _sample_candidates(fitted, max_candidates)
    differences = candidate_differences(result, template, science, records=records)
    stamps = (differences.batch.template, differences.batch.science)
    science_stamps, template_stamps = stamps if result.convolved == "science" else stamps[::-1]
    if tiles_across is None:
        tiles_across = 3 if len(records) <= 30 else math.ceil(math.sqrt(len(records) / 3))
    across = max(1, min(tiles_across, len(records)))
    rows = math.ceil(len(records) / across)
    panel, gap, header, title_h, row_gap, col_gap = 1.15, 0.06, 0.62, 0.16, 0.12, 0.35
    tile_w, tile_h = 4 * panel + 3 * gap, header + title_h + panel
    side, top, bottom = 0.3, 1.15, 1.0
    width = 2 * side + across * tile_w + (across - 1) * col_gap
    height = top + bottom + rows * tile_h + (rows - 1) * row_gap
    figure = _new_figure(width, height)
    mosaic = figure.add_axes((0, 0, 1, 1))
    cmap_z, cmap_s = _cmap("RdBu_r"), _cmap("gray")
    z_norm = Normalize(-_RESIDUAL_LIMIT, _RESIDUAL_LIMIT)
    stamp = differences.batch.science.shape[1]
    fit = differences.local[0].shape[1]
    for k, record in enumerate(records):
        row, col = divmod(k, across)
        x_in = side + col * (tile_w + col_gap)
        y_top = height - top - row * (tile_h + row_gap)
        colour = _status_colour(record.status)
        mosaic.text(x_in, y_top, _candidate_label(record), color=colour, fontsize=7.5, va="top",
                    ha="left", linespacing=1.25, gid=f"candidate-{record.id}")
        z_local = _z_stamp(*(p[k] for p in differences.local), differences.bad_bits)
        z_spatial = _z_stamp(*(p[k] for p in differences.spatial), differences.bad_bits)
        panels = (("science", science_stamps[k], cmap_s, _stamp_norm(science_stamps[k])),
                  ("template", template_stamps[k], cmap_s, _stamp_norm(template_stamps[k])),
                  ("D/σ local", z_local, cmap_z, z_norm), ("D/σ spatial", z_spatial, cmap_z, z_norm))
        y0 = y_top - header - title_h - panel
        for j, (name, data, cmap, norm) in enumerate(panels):
            x0 = x_in + j * (panel + gap)
            mosaic.imshow(data, origin="lower", cmap=cmap, norm=norm, interpolation="nearest",
                          extent=(x0, x0 + panel, y0, y0 + panel))
            mosaic.add_patch(Rectangle((x0, y0), panel, panel, fill=False, edgecolor=colour,
                                       linewidth=1.6))
            mosaic.text(x0 + 0.5 * panel, y0 + panel + 0.03, name, fontsize=7, ha="center",
                        va="bottom")
    mosaic.set_xlim(0, width)
    mosaic.set_ylim(0, height)
    mosaic.set_axis_off()
    n_unfitted = len(_records(result, show_bad, fitted=False)) - len(fitted)
    shown = "" if len(records) == len(fitted) else (
        f" ({sum(r.status == 'GOOD' for r in records)} GOOD and "
        f"{sum(r.status == 'BAD' for r in records)} BAD of them shown)")
    figure.suptitle(f"Kernel candidates: {result.kernel_cell_set.n_good} GOOD (green), "
                    f"{result.kernel_cell_set.n_bad} BAD (red){shown}"
                    + ("" if show_bad else ", BAD not shown")
                    + f"; {n_unfitted} never fitted not shown", fontsize=12,
                    y=1 - 0.3 / height)
    figure.text(0.5, 1 - 0.62 / height,
                f"Science and template: {stamp}×{stamp} px stamps in counts, asinh stretch per "
                f"stamp, y up.  D/σ = (S − T⋆K − b)/σ on the central {fit}×{fit} px fit region "
                f"(enlarged) under the candidate's own kernel (local) and under the spatial model "
                f"at its centre; grey = masked.", ha="center", va="top", fontsize=8, wrap=True)
    bar = figure.add_axes((0.25, 0.55 / height, 0.5, 0.14 / height))
    colourbar = figure.colorbar(ScalarMappable(norm=z_norm, cmap=cmap_z), cax=bar,
                                orientation="horizontal")
    colourbar.set_label("D/σ (difference in units of its noise)", fontsize=8)
    return figure


# ---------------------------------------------------------------------------
# displayKernelBasis
# ---------------------------------------------------------------------------

def display_kernel_basis(result, *, max_panels=64):
    """Basis kernels of the spatial kernel (``displayKernelBasis``).

    Each kernel ``B_i`` is shown divided by its largest absolute value (one
    shared colour scale), titled with its index, its origin (Gaussian width and
    monomial for Alard-Lupton bases) and ``max|B_i|``.

    Returns
    -------
    matplotlib.figure.Figure
        ``min(n_basis, max_panels)`` image axes, then one colour-bar axes.
    """
    kernel = result.psf_matching_kernel
    n_shown = min(kernel.n_basis, max_panels)
    across = min(n_shown, 8 if n_shown > 36 else 6)
    rows = math.ceil(n_shown / across)
    figure = _new_figure(2.0 * across + 1.0, 2.0 * rows + 1.4)
    grid = figure.add_gridspec(rows, across, left=0.05, right=0.9, top=1 - 1.0 / (2.0 * rows + 1.4),
                               bottom=0.4 / (2.0 * rows + 1.4), hspace=0.45, wspace=0.25)
    h = kernel.shape[0] // 2
    extent = (-h - 0.5, h + 0.5, -h - 0.5, h + 0.5)
    cmap = _cmap("RdBu_r")
    image = None
    for i in range(n_shown):
        axes = figure.add_subplot(grid[i // across, i % across])
        peak = np.max(np.abs(kernel.basis[i]))
        data = kernel.basis[i] / peak if peak > 0 else kernel.basis[i]
        image = axes.imshow(data, origin="lower", cmap=cmap, vmin=-1, vmax=1, extent=extent,
                            interpolation="nearest")
        total = kernel.basis[i].sum()
        axes.set_title(f"B{i}: {_basis_label(result, i)}\nmax|B| = {peak:.3g}, ΣB = "
                       f"{total if abs(total) > 1e-9 else 0:.3g}", fontsize=7.5)
        _outer_ticks(axes, i % across == 0, i + across >= n_shown)
    basis = result.kernel_basis
    what = {"alard-lupton": "Alard–Lupton", "delta-function": "delta-function"}.get(basis.kind, basis.kind)
    if kernel.n_basis != basis.n_basis or not np.array_equal(kernel.basis, basis.kernels):
        what = f"PCA (from a {what} fit)"
    more = f"; first {n_shown} shown" if n_shown < kernel.n_basis else ""
    renormalised = ("; renormalised as in ip_diffim: B0 sums to 1, the others to 0"
                    if basis.kind == "alard-lupton" and "PCA" not in what else "")
    figure.suptitle(f"Kernel basis: {kernel.n_basis} {what} kernels of "
                    f"{kernel.shape[1]}×{kernel.shape[0]} px{more}{renormalised}\n"
                    f"titles: index, Gaussian width and polynomial it was built from; each shown as "
                    f"B/max|B|; u, v = pixel offsets (afw correlation layout)", fontsize=10.5)
    bar = figure.add_axes((0.92, 0.15, 0.015, 0.7))
    figure.colorbar(image, cax=bar).set_label("B / max|B|", fontsize=9)
    return figure


# ---------------------------------------------------------------------------
# displayKernelMosaic
# ---------------------------------------------------------------------------

def _outer_ticks(axes, left, bottom, unit="px"):
    """Tick labels and axis labels only on the left column and the bottom row."""
    axes.tick_params(labelsize=7)
    axes.locator_params(nbins=4)
    if left:
        axes.set_ylabel(f"v ({unit})", fontsize=8)
    else:
        axes.tick_params(labelleft=False)
    if bottom:
        axes.set_xlabel(f"u ({unit})", fontsize=8)
    else:
        axes.tick_params(labelbottom=False)


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


def _moment_ellipse(axes, moments, colour):
    """Centroid cross and the 1-sigma ellipse (sqrt(2) x the K^2 second moments)."""
    from matplotlib.patches import Ellipse

    cx, cy, ixx, iyy, ixy = moments
    if not np.isfinite(cx):
        return
    values, vectors = np.linalg.eigh(np.array([[ixx, ixy], [ixy, iyy]]))
    values = np.maximum(values, 0.0)
    angle = math.degrees(math.atan2(vectors[1, 1], vectors[0, 1]))
    axes.add_patch(Ellipse((cx, cy), 2 * math.sqrt(2 * values[1]), 2 * math.sqrt(2 * values[0]),
                           angle=angle, fill=False, edgecolor=colour, linewidth=1.0))
    axes.plot([cx], [cy], marker="+", color=colour, markersize=8, markeredgewidth=1.2)


def display_kernel_mosaic(result, *, across=7):
    """The spatial kernel realised over the field (``displayKernelMosaic``).

    Kernels at the centres of an ``across`` x (aspect-scaled) grid over the
    cell-set box, on one colour scale, each with its centroid (+) and the
    1-sigma ellipse of its second moments (both from the squared kernel image;
    the ellipse is scaled by sqrt(2) so that it is the 1-sigma contour of a
    Gaussian kernel).

    Returns
    -------
    matplotlib.figure.Figure
        One image axes per grid position, then one colour-bar axes.
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
    extent = (-h - 0.5, h + 0.5, -h - 0.5, h + 0.5)
    radius = min(h, _support_radius(images) + 1)
    rows, cols = len(ys), len(xs)
    height = 2.0 * rows + 1.5
    figure = _new_figure(2.05 * cols + 1.4, height)
    grid = figure.add_gridspec(rows, cols, left=0.06, right=0.89, top=1 - 1.05 / height,
                               bottom=0.45 / height, hspace=0.6, wspace=0.22)
    image = None
    for k, (x, y, data) in enumerate(zip(gx.ravel(), gy.ravel(), images)):
        row, col = divmod(k, cols)
        axes = figure.add_subplot(grid[rows - 1 - row, col])   # north (high y) at the top
        image = axes.imshow(data, origin="lower", cmap=cmap, vmin=vmin, vmax=peak, extent=extent,
                            interpolation="nearest")
        moments = kernel_moments(data)
        _moment_ellipse(axes, moments, "white" if not signed else "black")
        axes.set_xlim(-radius - 0.5, radius + 0.5)
        axes.set_ylim(-radius - 0.5, radius + 0.5)
        sx, sy = (math.sqrt(2 * max(m, 0.0)) for m in moments[2:4])
        axes.set_title(f"({x:.0f}, {y:.0f}): ΣK={data.sum():.4f}\n"
                       f"σ={sx:.3f}×{sy:.3f} c=({moments[0]:+.2f},{moments[1]:+.2f})", fontsize=6.5)
        _outer_ticks(axes, col == 0, row == 0)
    figure.suptitle(f"Spatial PSF-matching kernel over the field (panels placed as on the image: "
                    f"x to the right, y up; central {2 * radius + 1}×{2 * radius + 1} of "
                    f"{2 * h + 1}×{2 * h + 1} px shown)\n"
                    "title: parent (x, y) and kernel sum; σ: 1σ widths along u × v (ellipse), "
                    "c: centroid (+), in px, from the moments of K² (widths ×√2)", fontsize=10)
    bar = figure.add_axes((0.905, 0.15, 0.015, 0.7))
    figure.colorbar(image, cax=bar).set_label("kernel value (fraction of flux per px)", fontsize=9)
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


def _spatial_rows(result, max_coefficients):
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
                 "background (counts)"))
    return records, xs, ys, rows


def plot_kernel_spatial_model(result, *, show_bad=True, max_coefficients=10):
    """Spatial model of each kernel coefficient (``plotKernelSpatialModel``).

    One row per coefficient (the first ``max_coefficients``) and one for the
    differential background: the map of the spatial function over the
    cell-set box with the candidates marked, and the candidates' local
    (own-fit) value minus the spatial model at their centre against x and
    against y (GOOD green circles, BAD red crosses).

    Returns
    -------
    matplotlib.figure.Figure
        Three axes per row (map, against x, against y), then one colour-bar
        axes per row.
    """
    records, xs, ys, rows = _spatial_rows(result, max_coefficients)
    statuses = [r.status for r in records]
    keep = np.array([show_bad or s != "BAD" for s in statuses], dtype=bool)
    statuses = [s for s, k in zip(statuses, keep) if k]
    x0, y0, x1, y1 = result.kernel_cell_set.bbox
    gx = np.linspace(x0, x1, 96)
    gy = np.linspace(y0, y1, 96)
    height = 2.5 * len(rows) + 1.5
    figure = _new_figure(14.0, height)
    grid = figure.add_gridspec(len(rows), 3, left=0.06, right=0.98, top=1 - 1.5 / height,
                               bottom=0.5 / height, hspace=0.6, wspace=0.45,
                               width_ratios=(1.0, 1.25, 1.25))
    map_axes = []
    for k, (title, spatial_map, local, spatial, unit) in enumerate(rows):
        axes = figure.add_subplot(grid[k, 0])
        image = axes.imshow(spatial_map(gx, gy), origin="lower", cmap="viridis",
                            extent=(x0 - 0.5, x1 + 0.5, y0 - 0.5, y1 + 0.5), aspect="auto")
        axes.scatter(xs[keep], ys[keep], s=10, c=[_status_colour(s) for s in statuses],
                     edgecolors="white", linewidths=0.4)
        axes.set_title(title, fontsize=9, loc="left")
        axes.set_xlabel("x (px)", fontsize=8)
        axes.set_ylabel("y (px)", fontsize=8)
        axes.tick_params(labelsize=7)
        map_axes.append((axes, image, unit))
        residual = (local - spatial)[keep]
        limits = _residual_limits(residual, statuses)
        for j, (coordinate, name) in enumerate(((xs[keep], "x"), (ys[keep], "y"))):
            axes = figure.add_subplot(grid[k, 1 + j])
            axes.axhline(0.0, color="0.5", linewidth=0.8)
            _scatter_by_status(axes, coordinate, residual, statuses, limits)
            axes.set_xlabel(f"{name} (px)", fontsize=8)
            axes.set_ylabel(f"local − spatial{' (counts)' if k == len(rows) - 1 else ''}", fontsize=8)
            axes.set_xlim((x0, x1) if name == "x" else (y0, y1))
            axes.set_ylim(*limits)
            axes.locator_params(nbins=5)
            axes.tick_params(labelsize=7)
            axes.set_title(f"{title.split(' (')[0]}: local − spatial vs {name}", fontsize=9, loc="left")
            if k == 0 and j == 1:
                axes.legend(fontsize=7, loc="upper right")
    for axes, image, unit in map_axes:
        figure.colorbar(image, ax=axes, fraction=0.05, pad=0.02).set_label(unit, fontsize=7)
    n_basis = result.psf_matching_kernel.n_basis
    more = f" (first {len(rows) - 1} of {n_basis})" if len(rows) - 1 < n_basis else ""
    figure.suptitle(f"Spatial model of the kernel coefficients{more} and of the background\n"
                    "left: spatial function over the field with the candidates (green GOOD, red BAD); "
                    "middle, right: each candidate's own fit minus the model at its centre\n"
                    "(y range set by the GOOD candidates; triangles: BAD values beyond it)",
                    fontsize=10.5, y=1 - 0.12 / height)
    return figure


def plot_kernel_coefficients(result, *, show_bad=True, max_coefficients=36, bins=15):
    """Histograms of the candidates' local kernel coefficients (``plotKernelCoefficients``).

    One panel per coefficient (the first ``max_coefficients``): GOOD (green)
    and BAD (red) candidates' own-fit values, and the spatial model at the
    centre of the cell-set box (black line).

    Returns
    -------
    matplotlib.figure.Figure
        One axes per coefficient shown.
    """
    kernel = result.psf_matching_kernel
    records, local = _local_coefficients(result, _records(result, show_bad))
    centre = kernel.basis_coefficients(*_cell_box_centre(result))
    n_shown = min(kernel.n_basis, max_coefficients)
    across = min(n_shown, 6)
    rows = math.ceil(n_shown / across)
    height = 2.2 * rows + 1.4
    figure = _new_figure(2.6 * across + 0.6, height)
    grid = figure.add_gridspec(rows, across, left=0.06, right=0.98, top=1 - 1.25 / height,
                               bottom=0.5 / height, hspace=0.75, wspace=0.35)
    statuses = np.array([r.status for r in records])
    for i in range(n_shown):
        axes = figure.add_subplot(grid[i // across, i % across])
        values = local[:, i]
        low, high = _residual_limits(np.append(values, centre[i]), [*statuses, "GOOD"])
        edges = np.linspace(low, high, bins + 1)
        for status in ("GOOD", "BAD"):
            pick = values[(statuses == status) & np.isfinite(values)] if len(values) else values
            if pick.size:
                axes.hist(np.clip(pick, low, high), bins=edges,
                          histtype="step" if status == "BAD" else "stepfilled",
                          color=_status_colour(status), alpha=1.0 if status == "BAD" else 0.55,
                          linewidth=1.3, label=f"{status} ({pick.size})")
        axes.axvline(centre[i], color="black", linewidth=1.2, label="spatial model at the centre")
        axes.set_xlim(low, high)
        axes.set_title(f"{i}: {_basis_label(result, i)}", fontsize=8)
        axes.set_xlabel("coefficient value", fontsize=7)
        axes.set_ylabel("candidates", fontsize=7)
        axes.locator_params(axis="x", nbins=5)
        axes.tick_params(labelsize=6.5)
        axes.xaxis.get_offset_text().set_fontsize(6.5)
    handles, labels = figure.axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="upper left", bbox_to_anchor=(0.01, 1 - 0.08 / height),
                  fontsize=8.5, frameon=False)
    more = f" (first {n_shown} of {kernel.n_basis})" if n_shown < kernel.n_basis else ""
    x, y = _cell_box_centre(result)
    figure.suptitle(f"Kernel coefficients of each candidate's own fit{more}\n"
                    f"black line: spatial model at the field centre ({x:.0f}, {y:.0f}) px\n"
                    f"x range set by the GOOD candidates; BAD values beyond it are in the edge bins",
                    fontsize=10.5)
    return figure


# ---------------------------------------------------------------------------
# Full images
# ---------------------------------------------------------------------------

def _show_image(figure, axes, masked_image, title, norm, cmap="gray", unit="counts", blank=None):
    data = masked_image.image if blank is None else np.where(blank, np.nan, masked_image.image)
    image = axes.imshow(data, origin="lower", cmap=_cmap(cmap, bad="#b8c4d6"), norm=norm,
                        extent=_extent(masked_image), interpolation="nearest")
    axes.set_title(title, fontsize=10)
    axes.set_xlabel("x (px)", fontsize=9)
    axes.set_ylabel("y (px)", fontsize=9)
    axes.tick_params(labelsize=8)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.03).set_label(unit, fontsize=9)
    return image


def _stretch_words(stretch):
    return "zscale limits, linear" if stretch == "zscale" else "asinh stretch, 0.5–99.5 % limits"


def _single_image(result, masked_image, title, stretch):
    masked_image = _masked_image(masked_image)
    ny, nx = masked_image.shape
    figure = _new_figure(7.5, max(3.5, 7.5 * ny / nx * 0.92))
    axes = figure.add_subplot()
    _show_image(figure, axes, masked_image, f"{title}\n({_stretch_words(stretch)})",
                _norm(masked_image.image, stretch))
    return figure


def display_template(result, template, *, stretch="zscale"):
    """The template, registered on the science grid (``displayTemplate``).

    Returns
    -------
    matplotlib.figure.Figure
        One image axes and its colour bar.
    """
    role = "image convolved" if result.convolved == "template" else "reference image"
    return _single_image(result, template, f"Template ({role})", stretch)


def display_sci_im(result, science, *, stretch="zscale"):
    """The science image (``displaySciIm``).

    Returns
    -------
    matplotlib.figure.Figure
        One image axes and its colour bar.
    """
    role = "reference image" if result.convolved == "template" else "image convolved"
    return _single_image(result, science, f"Science ({role})", stretch)


def display_spatial_cells(result, science, *, stretch="zscale"):
    """Spatial cells and candidates over the science image (``displaySpatialCells``).

    Cell boxes in blue with their index; candidates GOOD (green circle), BAD
    (red cross) and UNKNOWN (orange square: never needed, its cell had
    enough better candidates).

    Returns
    -------
    matplotlib.figure.Figure
        One image axes and its colour bar.
    """
    from matplotlib.patches import Rectangle

    science = _masked_image(science)
    cells = result.kernel_cell_set
    ny, nx = science.shape
    x0, y0, x1, y1 = cells.bbox
    n_x = -(-(x1 - x0 + 1) // cells.size_cell_x)
    n_y = -(-(y1 - y0 + 1) // cells.size_cell_y)
    width = min(20.0, max(9.0, 0.8 * max(n_x, n_y * nx / ny) + 3.0))
    figure = _new_figure(width, max(4.0, (width - 0.8) * ny / nx))
    axes = figure.add_subplot()
    _show_image(figure, axes, science, "", _norm(science.image, stretch))
    size = float(np.clip(3000.0 / (n_x * n_y), 12.0, 60.0)) * (width / 9.0)
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
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(0.0, -0.1), ncol=3, frameon=False)
    dropped = "; ".join(f"{k}: {v}" for k, v in cells.selection_rejects.items() if v) or "none"
    axes.set_title(f"Spatial cells ({cells.size_cell_x}×{cells.size_cell_y} px, cyan, numbered) and kernel "
                   f"candidates "
                   f"on the science image\n({_stretch_words(stretch)}); dropped before the fit: "
                   f"{dropped}", fontsize=9.5)
    return figure


def display_diff_im(result, template, science, *, stretch="zscale"):
    """Template, science, matched image and difference (``displayDiffIm``).

    Template, science and matched image share the science image's stretch;
    the difference (``result.subtracted_image``) has its own stretch,
    symmetric about zero.  A result without a difference (a match) gets three
    panels.

    Returns
    -------
    matplotlib.figure.Figure
        Four (or three) image axes, each with its colour bar.
    """
    template, science = _masked_image(template), _masked_image(science)
    difference = getattr(result, "subtracted_image", None)
    registered = " (registered on the science grid)" if hasattr(result, "warped_exposure") else ""
    panels = [(template, f"Template{registered}"), (science, "Science"),
              (result.matched_image, f"Matched {result.convolved} (convolved with the kernel)")]
    if difference is not None:
        panels.append((difference, "Difference"))
    ny, nx = science.shape
    figure = _new_figure(12.0, 2 * 5.0 * ny / nx + 1.2)
    norm = _norm(science.image, stretch)
    for k, (image, title) in enumerate(panels):
        axes = figure.add_subplot(2, 2, k + 1)
        blank = (image.mask & image.bits(("EDGE", "NO_DATA"))) != 0
        shown = norm
        if title == "Difference":
            z = normalized_residuals(image.image, image.variance, image.mask, -1)
            if z.size:
                median = float(np.median(z))
                title = (f"Difference (D/σ over {z.size} unflagged px: median {median:+.3f}, "
                         f"robust std {1.4826 * float(np.median(np.abs(z - median))):.3f})")
            shown = _norm(image.image[~blank], stretch, symmetric=True)
        _show_image(figure, axes, image, title, shown, blank=blank)
    figure.suptitle(f"Images of the fit ({_stretch_words(stretch)}; template, science and matched "
                    f"share the science limits; grey: EDGE or NO_DATA)", fontsize=11)
    figure.subplots_adjust(left=0.07, right=0.95, bottom=0.06, top=0.9, wspace=0.3, hspace=0.3)
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
    reasons = {}
    for record in cells.candidates:
        if record.status == "BAD":
            key = " ".join(record.reason.split(" ")[:2])
            reasons[key] = reasons.get(key, 0) + 1
    lines += [f"  rejected by {k}: {v}" for k, v in reasons.items()]
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
    "displayCandidates": lambda r, t, s, o: display_candidates(r, t, s),
    "displayKernelBasis": lambda r, t, s, o: display_kernel_basis(r),
    "displayKernelMosaic": lambda r, t, s, o: display_kernel_mosaic(r),
    "plotKernelSpatialModel": lambda r, t, s, o: plot_kernel_spatial_model(r),
    "plotKernelCoefficients": lambda r, t, s, o: plot_kernel_coefficients(r),
    "displayTemplate": lambda r, t, s, o: display_template(r, t, stretch=o),
    "displaySciIm": lambda r, t, s, o: display_sci_im(r, s, stretch=o),
    "displaySpatialCells": lambda r, t, s, o: display_spatial_cells(r, s, stretch=o),
    "displayDiffIm": lambda r, t, s, o: display_diff_im(r, t, s, stretch=o),
}


def write_figures(result, template, science, folder, names=None, *, stretch="zscale", report=True):
    """Write the selected figures as ``<name>.png`` and a multi-page PDF report.

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
        Also write :data:`REPORT_NAME`: a summary page then every figure.

    Returns
    -------
    list of str
        Paths written (PNG files, then the PDF).

    Raises
    ------
    MissingDependencyError
        If matplotlib is not installed.
    ConfigurationError
        For an unknown name or stretch.
    """
    require_matplotlib()
    from matplotlib.backends.backend_pdf import PdfPages

    selected = FIGURE_NAMES if names is None else check_debug_names(names)
    if stretch not in ("zscale", "asinh"):
        msg = f"stretch must be 'zscale' or 'asinh', got {stretch!r}"
        raise ConfigurationError(msg)
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    written = []
    figures = []
    for name in selected:
        figure = _FIGURES[name](result, template, science, stretch)
        path = os.path.join(folder, f"{name}.png")
        figure.savefig(path, dpi=100)
        written.append(path)
        figures.append(figure)
    if report and figures:
        path = os.path.join(folder, REPORT_NAME)
        with PdfPages(path) as pdf:
            for figure in (summary_figure(result), *figures):
                pdf.savefig(figure)
        written.append(path)
    return written
