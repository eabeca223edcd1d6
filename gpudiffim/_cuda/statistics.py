"""Launch geometry and host wrappers of ``kernels/statistics.cu``.

``gdi_sorted_quantiles`` reads the quantiles, median and count of rows sorted
once (:func:`sorted_quantiles`: the sort and one launch instead of the glue
of :func:`gpudiffim.statistics.masked_quantiles`); ``gdi_bin_medians`` takes
each bin's median in shared memory (:func:`bin_medians`: one launch instead
of :func:`gpudiffim.statistics.bin_medians_sorted`'s sort of the whole image
and its bin indices built on the host), and bins too large for shared memory
are sorted once by keys built on the device (:func:`bin_medians_by_sort`).  NumPy arrays run on the CPU
emulator, CuPy arrays on the GPU (:func:`~gpudiffim._cuda.launch.launcher_for`).
"""

import numpy as np

from ..statistics import IQR_TO_SIGMA
from ._host import on_launcher, prepare
from .launch import launch
from .image_apply import grid_stride_geometry
from .signatures import ctype_of, float_ctype

__all__ = ["MAX_BIN_PIXELS", "MAX_QUANTILES", "STATISTICS_DEFINES", "STATISTICS_THREADS", "bin_medians",
           "bin_medians_by_sort", "bin_medians_fit", "correlation_near", "gather_rows", "sky_normalised", "sky_sources",
           "sky_value_planes", "sorted_quantiles", "subtract_sky_mean"]

#: Threads per block of both kernels (``GDI_ST_THREADS``; a power of two).
STATISTICS_THREADS = 256
#: Largest bin (pixels) of ``gdi_bin_medians``: its keys in 32 kB of shared memory (``GDI_ST_MAX_BIN``).
MAX_BIN_PIXELS = 4096
#: Quantiles one ``gdi_sorted_quantiles`` launch reads per row (its scalar arguments ``q0 .. q3``).
MAX_QUANTILES = 4
#: The unit's compile-time constants.
STATISTICS_DEFINES = (("GDI_ST_THREADS", STATISTICS_THREADS), ("GDI_ST_MAX_BIN", MAX_BIN_PIXELS))


def sorted_quantiles(values, mask, quantiles, *, median=False, masked=False):
    """Quantiles, median and count of every row's selected values: one sort and one launch.

    Parameters as :func:`gpudiffim.statistics.masked_quantiles` (values (B, n)
    converted to float64; at most :data:`MAX_QUANTILES` quantiles), and
    ``masked``: the values are float64 and ``+inf`` where not taken already.

    Returns
    -------
    ndarray of float64, shape (len(quantiles) [+ 1] + 1, B)
        :func:`gpudiffim.statistics.masked_quantiles` (NaN for a row with no
        value taken or a NaN among them), then the count of each row.
    """
    _, xp = on_launcher(values, mask)
    quantiles = [float(q) for q in quantiles]
    if len(quantiles) > MAX_QUANTILES or values.ndim != 2 or mask.shape != values.shape:
        msg = (f"at most {MAX_QUANTILES} quantiles of (B, n) values and mask, got {len(quantiles)} of "
               f"{values.shape} and {mask.shape}")
        raise ValueError(msg)
    mask = prepare(xp, mask, np.bool_, 2, "mask")
    if not masked:
        values = xp.where(mask, values if values.dtype == np.float64 else values.astype(np.float64), np.inf)
    ordered = xp.sort(values, axis=1)
    n_rows, n = ordered.shape
    out = xp.empty((len(quantiles) + int(bool(median)) + 1, n_rows))
    if n_rows:
        padded = quantiles + [0.0] * (MAX_QUANTILES - len(quantiles))
        launch("gdi_sorted_quantiles", (n_rows,), (STATISTICS_THREADS,),
               (ordered, mask, n_rows, n, len(quantiles), *padded, int(bool(median)), out),
               defines=STATISTICS_DEFINES)
    return out


def bin_medians_fit(edges_y, edges_x):
    """Whether every bin between these edges fits ``gdi_bin_medians`` (at most :data:`MAX_BIN_PIXELS`)."""
    return int(np.diff(edges_y).max(initial=0)) * int(np.diff(edges_x).max(initial=0)) <= MAX_BIN_PIXELS


def _binned(image, keep, edges_y, edges_x, dtype):
    """``(launcher, xp, stack, selection, edges)``: the arrays the bin-median kernels read.

    ``stack`` (B, M, N) of ``dtype``; ``selection`` the keep plane alike, or
    any bool array when there is none (``has_keep = 0``: never read);
    ``edges`` the row then column edges, int32 (a few bytes uploaded).
    """
    launcher, xp = on_launcher(image)
    stack = image if image.ndim == 3 else image.reshape((-1,) + image.shape[-2:])
    stack = prepare(xp, stack, dtype, 3, "image")
    selection = (xp.empty(1, dtype=np.bool_) if keep is None
                 else prepare(xp, keep if keep.ndim == 3 else keep.reshape(stack.shape), np.bool_, 3, "keep"))
    edges = xp.asarray(np.concatenate([edges_y, edges_x]).astype(np.int32))
    return launcher, xp, stack, selection, edges


def bin_medians(image, keep, edges_y, edges_x):
    """Per-bin ``np.median`` of the kept pixels (:func:`gpudiffim.statistics.bin_medians_loop`), one launch.

    Parameters
    ----------
    image : ndarray of shape (M, N) or (B, M, N)
        float32 or float64 (a stack: each image binned alike).
    keep : ndarray of bool, same shape, or None
        The pixels taken (every pixel if None).
    edges_y, edges_x : sequence of int
        Host bin edges (row and column indices); every bin of at most
        :data:`MAX_BIN_PIXELS` pixels (:func:`bin_medians_fit`).

    Returns
    -------
    ndarray of float64, shape (n_y, n_x) or (B, n_y, n_x)
        NaN for an empty bin or one holding a NaN; in the image's module.
    """
    if not bin_medians_fit(edges_y, edges_x):
        msg = f"bins of up to {MAX_BIN_PIXELS} pixels only"
        raise ValueError(msg)
    ctype = float_ctype("image", image.dtype)
    _, xp, stack, selection, edges = _binned(image, keep, edges_y, edges_x, image.dtype.newbyteorder("="))
    n_images, ny, nx = stack.shape
    n_by, n_bx = len(edges_y) - 1, len(edges_x) - 1
    out = xp.empty((n_images, n_by, n_bx))
    if n_images and n_by and n_bx:
        launch(f"gdi_bin_medians<{ctype}>", (n_bx, n_by, n_images), (STATISTICS_THREADS,),
               (stack, selection, int(keep is not None), ny, nx, edges, n_by, n_bx, out),
               defines=STATISTICS_DEFINES)
    return out if image.ndim == 3 else out.reshape(image.shape[:-2] + (n_by, n_bx))


def bin_medians_by_sort(image, keep, edges_y, edges_x):
    """:func:`bin_medians` for float32 bins of any size: two launches around one sort.

    ``gdi_bin_sort_keys`` builds each pixel's (bin, value) key from the edges
    (:func:`gpudiffim.statistics.bin_sort_keys`, no bin labels built on the
    host), CuPy sorts them, and ``gdi_sorted_bin_medians`` reads each bin's
    median (:func:`gpudiffim.statistics.medians_of_sorted_keys`): the values of
    :func:`gpudiffim.statistics.bin_medians_sorted`, in a handful of calls
    instead of its few dozen.  Parameters and result as :func:`bin_medians`
    (``image`` float32, bins of any size; the bins of a stack numbered image
    after image, each pair of (bin, value) keys in 64 bits).
    """
    if image.dtype.newbyteorder("=") != np.float32:
        msg = f"image must be float32, got {image.dtype}"
        raise TypeError(msg)
    launcher, xp, stack, selection, edges = _binned(image, keep, edges_y, edges_x, np.dtype(np.float32))
    n_images, ny, nx = stack.shape
    n_by, n_bx = len(edges_y) - 1, len(edges_x) - 1
    n_bins = n_images * n_by * n_bx
    out = xp.empty(n_bins)
    if n_bins:
        keys = xp.empty(stack.size, dtype=np.uint64)
        grid, block = grid_stride_geometry(stack.size, launcher)
        launch("gdi_bin_sort_keys", grid, block,
               (stack, selection, int(keep is not None), n_images, ny, nx, edges, n_by, n_bx, keys),
               defines=STATISTICS_DEFINES)
        keys = xp.sort(keys)
        grid, block = grid_stride_geometry(n_bins, launcher)
        launch("gdi_sorted_bin_medians", grid, block, (keys, keys.size, n_bins, out), defines=STATISTICS_DEFINES)
    return out.reshape(image.shape[:-2] + (n_by, n_bx))


def sky_sources(residual, quartiles, threshold):
    """:func:`gpudiffim.statistics.beyond_robust_level` in one launch (``gdi_sky_sources``), as int32 0/1.

    Parameters
    ----------
    residual : ndarray of float64, shape (B, ...)
        Bands.
    quartiles : ndarray of float64, shape (k >= 2, B)
        First and third quartiles of each band in rows 0 and 1 (e.g. a
        :func:`sorted_quantiles` result).
    threshold : float
        In robust sigmas.

    Returns
    -------
    ndarray of int32, shape of ``residual``
    """
    launcher, xp = on_launcher(residual, quartiles)
    residual = prepare(xp, residual, np.float64, residual.ndim, "residual")
    quartiles = prepare(xp, quartiles, np.float64, 2, "quartiles")
    n_bands = len(residual)
    if quartiles.shape[0] < 2 or quartiles.shape[1] != n_bands:
        msg = f"quartiles must be (k >= 2, {n_bands}), got {quartiles.shape}"
        raise ValueError(msg)
    out = xp.empty(residual.shape, dtype=np.int32)
    if residual.size:
        grid, block = grid_stride_geometry(residual.size, launcher)
        launch("gdi_sky_sources", grid, block,
               (residual, quartiles, n_bands, residual.size // n_bands, IQR_TO_SIGMA, float(threshold),
                float(np.finfo(float).tiny), out), defines=STATISTICS_DEFINES)
    return out


def _sky_bands(residual, variance, sky):
    """``(launcher, xp, variance C type, residual, variance, sky)``: sky bands (B, H, N) as the kernels read them."""
    launcher, xp = on_launcher(residual, variance, sky)
    ctype = float_ctype("variance", variance.dtype)
    return (launcher, xp, ctype, prepare(xp, residual, np.float64, 3, "residual"),
            prepare(xp, variance, variance.dtype.newbyteorder("="), 3, "variance"),
            prepare(xp, sky, np.bool_, 3, "sky"))


def sky_value_planes(residual, variance, sky, own_rows, gap, clip):
    """:func:`gpudiffim.statistics.sky_value_planes` in one launch (``gdi_sky_value_planes``).

    ``own_rows`` (host (B, R)) gives each band's first own row (a few bytes
    uploaded; none for one band, taken whole).
    """
    launcher, xp, ctype, residual, variance, sky = _sky_bands(residual, variance, sky)
    n_bands, height, columns = residual.shape
    if n_bands > 1:
        shifts, rows_kept = xp.asarray(np.ascontiguousarray(own_rows[:, 0], dtype=np.int32)), own_rows.shape[1]
    else:
        shifts, rows_kept, gap = xp.zeros(1, dtype=np.int32), height, 0
    out = xp.empty((2, n_bands * (rows_kept + gap), columns))
    if out.size:
        grid, block = grid_stride_geometry(out.size // 2, launcher)
        launch(f"gdi_sky_value_planes<{ctype}>", grid, block,
               (residual, variance, sky, shifts, n_bands, height, columns, rows_kept, int(gap), float(clip), out),
               defines=STATISTICS_DEFINES)
    return out


def subtract_sky_mean(planes, sums):
    """:func:`gpudiffim.statistics.subtract_sky_mean` in one launch (``gdi_subtract_mean``), in place."""
    launcher, xp = on_launcher(planes, sums)
    n = planes.size // 2
    if n:
        grid, block = grid_stride_geometry(n, launcher)
        launch("gdi_subtract_mean", grid, block, (planes, n, prepare(xp, sums, np.float64, 1, "sums")),
               defines=STATISTICS_DEFINES)
    return planes


def correlation_near(correlation, far, extra):
    """:func:`gpudiffim.statistics.near_lags` of the correlations (P, rows, columns), raveled, with the
    values ``extra`` (1-D) appended: one launch (``gdi_correlation_near``), ready for one read-back."""
    _, xp = on_launcher(correlation, extra)
    correlation = prepare(xp, correlation, np.float64, 3, "correlation")
    extra = prepare(xp, extra, np.float64, 1, "extra")
    n_planes, rows, columns = correlation.shape
    if not 0 < far < min(rows, columns):
        msg = f"far must be in (0, {min(rows, columns)}), got {far}"
        raise ValueError(msg)
    out = xp.empty(n_planes * (2 * far + 1) ** 2 + extra.size)
    blocks = -(-out.size // STATISTICS_THREADS)
    launch("gdi_correlation_near", (blocks,), (STATISTICS_THREADS,),
           (correlation, n_planes, rows, columns, int(far), extra, extra.size, out), defines=STATISTICS_DEFINES)
    return out


def gather_rows(groups, windows, height):
    """For each group of planes (M, N), the windows of ``height`` rows starting at ``windows`` (host ints),
    stacked plane after plane: (len(group) len(windows), height, N), one launch per plane
    (``gdi_gather_rows``).

    The planes of a group share a shape and a dtype (float32, float64 or
    int32); the window starts are uploaded once (a few bytes).
    """
    launcher, xp = on_launcher(*(plane for planes in groups for plane in planes))
    ny, nx = groups[0][0].shape
    windows = np.asarray(windows, dtype=np.int32)
    if len(windows) and (windows.min() < 0 or windows.max() + height > ny):
        msg = f"windows of {height} rows starting at {windows.tolist()} do not fit in {ny} rows"
        raise ValueError(msg)
    starts = xp.asarray(windows)
    grid, block = grid_stride_geometry(max(len(windows) * height * nx, 1), launcher)
    return [_gather_group(xp, planes, starts, height, grid, block) for planes in groups]


def _gather_group(xp, planes, starts, height, grid, block):
    """One group of :func:`gather_rows`."""
    first = planes[0]
    ny, nx = first.shape
    out = xp.empty((len(planes) * len(starts), height, nx), dtype=first.dtype.newbyteorder("="))
    for index, plane in enumerate(planes):
        if plane.shape != first.shape or plane.dtype != first.dtype:
            msg = (f"planes must share a shape and dtype, got {plane.shape} {plane.dtype} and "
                   f"{first.shape} {first.dtype}")
            raise ValueError(msg)
        if out.size:
            launch(f"gdi_gather_rows<{ctype_of(first.dtype)}>", grid, block,
                   (prepare(xp, plane, out.dtype, 2, "plane"), ny, nx, starts, len(starts), int(height),
                    index * len(starts), out), defines=STATISTICS_DEFINES)
    return out


def sky_normalised(residual, variance, sky, own_rows, n_images):
    """:func:`gpudiffim.statistics.normalised_sky_values` in one launch (``gdi_sky_normalised``), with
    ``+inf`` where not selected: rows (n_images, -1) ready for :func:`sorted_quantiles` (``masked=True``).

    ``own_rows`` (host (B, R), of one image) gives each band's first own row
    (a few bytes uploaded).
    """
    launcher, xp, ctype, residual, variance, sky = _sky_bands(residual, variance, sky)
    n_total, height, columns = residual.shape
    values = xp.empty((n_images, residual.size // n_images))
    selected = xp.empty(values.shape, dtype=np.bool_)
    if residual.size:
        shifts = xp.asarray(np.ascontiguousarray(own_rows[:, 0], dtype=np.int32))
        grid, block = grid_stride_geometry(residual.size, launcher)
        launch(f"gdi_sky_normalised<{ctype}>", grid, block,
               (residual, variance, sky, shifts, len(own_rows), n_total, height, columns, own_rows.shape[1], values,
                selected), defines=STATISTICS_DEFINES)
    return values, selected
