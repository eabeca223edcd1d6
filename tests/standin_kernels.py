"""NumPy versions of the ``kernels/*.cu`` launches, for the fast mode of the CuPy stand-in.

The CUDA emulator runs each kernel thread by thread: faithful, but at
4096² the full-image kernels alone would take many minutes.  The stand-in's
``kernels="numpy"`` mode runs these instead: the same argument list as the
kernel (the declared order of ``gpudiffim._cuda.signatures.KERNELS``), the same
outputs written in place, by whole-array NumPy.  ``tests/test_cupy_standin.py``
checks each against the emulator on random inputs (to 1e-12 relative: sums in
another order).  The warp kernel has no fast version (the budget runs do not
warp); it always runs on the emulator.
"""

import warnings

import numpy as np

from gpudiffim.convolve import correlate_stamps, correlate_stamps_each
from gpudiffim.delta_function import delta_function_normal_equations


def residual_moments(diff, var, mask, bad_bits, n_stamps, ny, nx, row0, row1, col0, col1, out):
    shape = (n_stamps, ny, nx)
    window = (slice(None), slice(row0, row1), slice(col0, col1))
    d, v = diff.reshape(shape)[window], var.reshape(shape)[window]
    m = mask.reshape(shape)[window]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        inverse = v.dtype.type(1) / v
        usable = ((m & bad_bits) == 0) & (v > 0) & np.isfinite(inverse) & np.isfinite(d)
        z = np.where(usable, d.astype(np.float64) * np.sqrt(np.where(usable, inverse, 0).astype(np.float64)), 0.0)
    moments = out.reshape(n_stamps, 3)
    moments[:, 0] = usable.sum(axis=(1, 2))
    moments[:, 1] = z.sum(axis=(1, 2))
    moments[:, 2] = (z * z).sum(axis=(1, 2))


def correlate_stamps_kernel(stamps, kernels, n_stamps, n_kernels, per_stamp, sy, sx, kh, kw, out):
    stamps = stamps.reshape(n_stamps, sy, sx).astype(np.float64)
    kernels = kernels.reshape(n_kernels, kh, kw).astype(np.float64)
    if per_stamp:
        result = correlate_stamps_each(stamps, kernels)[:, None]
    else:
        result = correlate_stamps(stamps, kernels)
    out.reshape(result.shape)[...] = result


def normal_equations(columns, weights, target, n_stamps, n_basis, n_pix, with_background, per_stamp_weights,
                     matrix, vector):
    c = columns.reshape(n_stamps, n_basis, n_pix).astype(np.float64)
    if with_background:
        c = np.concatenate([c, np.ones((n_stamps, 1, n_pix))], axis=1)
    w = np.broadcast_to(weights.reshape(n_stamps, -1), (n_stamps, n_pix)).astype(np.float64)
    y = target.reshape(n_stamps, n_pix).astype(np.float64)
    weighted = c * w[:, None, :]
    p = c.shape[1]
    m = np.matmul(weighted, c.transpose(0, 2, 1))
    matrix.reshape(n_stamps, p, p)[...] = np.triu(m) + np.triu(m, 1).transpose(0, 2, 1)
    vector.reshape(n_stamps, p)[...] = np.matmul(weighted, y[:, :, None])[:, :, 0]


def spatial_normal_equations(normal_matrices, normal_vectors, owner, weights, n_stamps, p, n_theta, matrix,
                             vector):
    q = normal_matrices.reshape(n_stamps, p, p)
    w = weights.reshape(n_stamps, n_theta)
    total = np.zeros((n_theta, n_theta))
    for start in range(0, n_stamps, 256):
        part = slice(start, start + 256)
        symmetric = 0.5 * (q[part] + q[part].transpose(0, 2, 1))
        gathered = symmetric[:, owner][:, :, owner]
        total += np.einsum("na,nb,nab->ab", w[part], w[part], gathered)
    matrix.reshape(n_theta, n_theta)[...] = total
    vector.reshape(n_theta)[...] = np.einsum("na,na->a", w, normal_vectors.reshape(n_stamps, p)[:, owner])


def accumulate_terms(terms, n_terms, term_rows, term_cols, row0, col0, rows, cols, ny, nx, out):
    image = out.reshape(ny, nx)
    stack = terms.reshape(n_terms, term_rows, term_cols)
    for t in range(n_terms):
        image += (stack[t, row0:row0 + ny, col0:col0 + nx] * rows.reshape(n_terms, ny)[t][:, None]) \
            * cols.reshape(n_terms, nx)[t][None, :]


def copy_edge(in_image, in_variance, in_mask, ny, nx, hy, hx, edge_bit, image, variance, mask):
    border = np.ones((ny, nx), dtype=bool)
    border[hy:ny - hy, hx:nx - hx] = False
    image.reshape(ny, nx)[border] = in_image.reshape(ny, nx)[border]
    variance.reshape(ny, nx)[border] = in_variance.reshape(ny, nx)[border]
    mask.reshape(ny, nx)[border] |= in_mask.reshape(ny, nx)[border] | edge_bit


def or_filter_1d(mask, n_images, ny, nx, half, axis, out):
    m = mask.reshape(n_images, ny, nx)
    result = m.copy()
    length = ny if axis == 0 else nx
    for shift in range(1, min(half, length - 1) + 1):
        if axis == 0:
            result[:, shift:, :] |= m[:, :-shift, :]
            result[:, :-shift, :] |= m[:, shift:, :]
        else:
            result[:, :, shift:] |= m[:, :, :-shift]
            result[:, :, :-shift] |= m[:, :, shift:]
    out.reshape(n_images, ny, nx)[...] = result


def or_filter_footprint(mask, footprint, n_images, ny, nx, kh, kw, out):
    m = mask.reshape(n_images, ny, nx)
    result = np.zeros_like(m)
    cy, cx = kh // 2, kw // 2
    for i, j in zip(*np.nonzero(footprint.reshape(kh, kw))):
        v, u = int(i) - cy, int(j) - cx
        # out[y, x] |= mask[y + v, x + u] where inside
        ys, yd = (slice(v, ny), slice(0, ny - v)) if v >= 0 else (slice(0, ny + v), slice(-v, ny))
        xs, xd = (slice(u, nx), slice(0, nx - u)) if u >= 0 else (slice(0, nx + u), slice(-u, nx))
        result[:, yd, xd] |= m[:, ys, xs]
    out.reshape(n_images, ny, nx)[...] = result


def cut_stamps(image, variance, mask, nx, centres, n_stamps, half, out_image, out_variance, out_mask):
    size = 2 * half + 1
    rows = centres.reshape(n_stamps, 2)[:, 0, None] - half + np.arange(size)
    cols = centres.reshape(n_stamps, 2)[:, 1, None] - half + np.arange(size)
    index = (rows[:, :, None] * nx + cols[:, None, :]).reshape(n_stamps, size, size)
    out_image.reshape(n_stamps, size, size)[...] = image.reshape(-1)[index]
    out_variance.reshape(n_stamps, size, size)[...] = variance.reshape(-1)[index]
    out_mask.reshape(n_stamps, size, size)[...] = mask.reshape(-1)[index]


def stamp_residuals(template_image, template_variance, template_mask, science_image, science_variance,
                    science_mask, kernels, background, n_stamps, s, kw, bad_bits, row0, row1, col0, col1,
                    write_rows, fill, sums, rows):
    shape = (n_stamps, s, s)
    h, f = kw // 2, s - kw + 1
    k = kernels.reshape(n_stamps, kw, kw)
    t, tv = template_image.reshape(shape), template_variance.reshape(shape)
    inner = (slice(None), slice(h, h + f), slice(h, h + f))
    model = correlate_stamps_each(t, k) + background[:, None, None]
    difference = science_image.reshape(shape)[inner] - model
    variance = science_variance.reshape(shape)[inner] + correlate_stamps_each(tv, k * k)
    flagged = (template_mask.reshape(shape) & bad_bits) != 0
    windows = np.lib.stride_tricks.sliding_window_view(flagged, (kw, kw), axis=(1, 2))
    template_bad = windows.any(axis=(3, 4))
    mask = science_mask.reshape(shape)[inner] | np.where(template_bad, bad_bits, 0)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        inverse = 1.0 / variance
        usable = ((mask & bad_bits) == 0) & (variance > 0) & np.isfinite(inverse) & np.isfinite(difference)
        z = np.where(usable, difference * np.sqrt(np.where(usable, inverse, 0.0)), fill)
    if write_rows:
        rows.reshape(n_stamps, f * f)[...] = z.reshape(n_stamps, -1)
    window = (slice(None), slice(row0, row1), slice(col0, col1))
    zw, uw = np.where(usable, z, 0.0)[window], usable[window]
    moments = sums.reshape(n_stamps, 3)
    moments[:, 0] = uw.sum(axis=(1, 2))
    moments[:, 1] = zw.sum(axis=(1, 2))
    moments[:, 2] = (zw * zw).sum(axis=(1, 2))


def solve_small(matrices, vectors, n_systems, n, solutions, pivots, status):
    """``gdi_solve_small`` by LAPACK (``getrf`` pivots, the same rank test and status codes)."""
    import scipy.linalg

    m = matrices.reshape(n_systems, n, n)
    b = vectors.reshape(n_systems, n)
    x, piv, st = solutions.reshape(n_systems, n), pivots.reshape(n_systems, n), status.reshape(n_systems)
    x[...] = 0.0
    piv[...] = 0.0
    for k in range(n_systems):
        if not (np.isfinite(m[k]).all() and np.isfinite(b[k]).all()):
            st[k] = 2
        elif not m[k].any():
            st[k] = 3
        else:
            with warnings.catch_warnings():      # exactly singular: the rank test below says so
                warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
                lu, order = scipy.linalg.lu_factor(m[k], check_finite=False)
            piv[k] = np.abs(np.diagonal(lu))
            if not np.all(piv[k] > n * np.finfo(np.float64).eps * piv[k].max()):
                st[k] = 1
                continue
            solved = scipy.linalg.lu_solve((lu, order), b[k], check_finite=False)
            finite = np.isfinite(solved).all()
            st[k] = 0 if finite else 4
            x[k] = solved if finite else 0.0


#: Kernel name -> NumPy version (both template instantiations share one).
FAST = {}
for _name, _function in (("gdi_residual_moments", residual_moments),
                         ("gdi_correlate_stamps", correlate_stamps_kernel),
                         ("gdi_normal_equations", normal_equations),
                         ("gdi_accumulate_terms", accumulate_terms),
                         ("gdi_cut_stamps", cut_stamps)):
    for _type in ("float", "double"):
        FAST[f"{_name}<{_type}>"] = _function
FAST["gdi_spatial_normal_equations"] = spatial_normal_equations
FAST["gdi_or_filter_1d"] = or_filter_1d
FAST["gdi_or_filter_footprint"] = or_filter_footprint
FAST["gdi_stamp_residuals"] = stamp_residuals
FAST["gdi_solve_small"] = solve_small
FAST.update({f"gdi_copy_edge<{_type}>": copy_edge for _type in ("float", "double")})


# ---- kernels/image_apply.cu: gdi_spatial_terms ----

def spatial_terms(centres_rc, n, x0, y0, chebyshev, mid_x, width_x, mid_y, width_y, order, out):
    """``gdi_spatial_terms``: the 1-D powers of both axes at ``(x0 + column, y0 + row)`` (NumPy's operations
    of ``gpudiffim.spatial``), multiplied in afw's term order."""
    rc = centres_rc.reshape(n, 2)

    def powers(t, mid, width):
        t = t.astype(np.float64)
        if chebyshev:
            t = 2.0 * (t - mid) / width
        values = [np.ones_like(t), t]
        for k in range(2, order + 1):
            values.append(2.0 * t * values[-1] - values[-2] if chebyshev else t * t if k == 2 else t**k)
        return values

    px, py = powers(x0 + rc[:, 1], mid_x, width_x), powers(y0 + rc[:, 0], mid_y, width_y)
    terms = [px[degree - j] * py[j] for degree in range(order + 1) for j in range(degree + 1)]
    out.reshape(n, len(terms))[...] = np.stack(terms, axis=1)


FAST["gdi_spatial_terms"] = spatial_terms


# ---- kernels/linear_solve.cu: gdi_solve_stamps (H3) ----

def solve_stamps(matrices, vectors, codes, basis, n_systems, n_basis, with_background, n_taps, fit_failed,
                 outcome, kernels, background):
    """``gdi_solve_stamps``: :func:`solve_small`, then the fit's codes, kernel images and sums as the
    reference forms them (``gpudiffim._ops.NUMPY.solve_stamps``)."""
    n = n_basis + int(bool(with_background))
    solutions, status = np.zeros((n_systems, n)), np.zeros(n_systems, dtype=np.int32)
    solve_small(matrices, vectors, n_systems, n, solutions, np.zeros((n_systems, n)), status)
    entry = codes.reshape(n_systems)
    failure = np.where((entry == 0) & (status > 1), fit_failed, entry)
    x = np.where(((failure == 0) & (status == 0))[:, None], solutions, 0.0)
    taps = basis.reshape(n_basis, n_taps)
    rows = outcome.reshape(n_systems, 4 + n_basis)
    rows[:, 0], rows[:, 1] = failure, status
    rows[:, 2] = x[:, :n_basis] @ taps.sum(axis=1)
    rows[:, 3] = x[:, n_basis] if with_background else 0.0
    rows[:, 4:] = x[:, :n_basis]
    kernels.reshape(n_systems, n_taps)[...] = x[:, :n_basis] @ taps
    background.reshape(n_systems)[...] = rows[:, 3]


FAST["gdi_solve_stamps"] = solve_stamps


def constant_weights(science_variance, template_variance, n_stamps, n_pix, infinity, weights, codes):
    """``gdi_constant_weights`` as the reference forms them (``gpudiffim._ops.NUMPY.constant_weights``)."""
    level = np.median((science_variance + template_variance).reshape(n_stamps, n_pix), axis=1)
    weights[...] = 1.0 / np.where(level > 0, level, 1.0)
    codes[...] = 0


FAST["gdi_constant_weights"] = constant_weights


# ---- kernels/delta_function.cu (issue 13: delta-function normal equations without a design) ----

def delta_function_normal_equations_kernel(template_stamps, science_stamps, weights, n_stamps, s, k,
                                           with_background, matrix, vector):
    """``gdi_delta_function_normal_equations`` as the host forms them
    (:func:`gpudiffim.delta_function.delta_function_normal_equations`)."""
    h, fit = k // 2, s - k + 1
    template = template_stamps.reshape(n_stamps, s, s)
    target = science_stamps.reshape(n_stamps, s, s)[:, h:h + fit, h:h + fit].reshape(n_stamps, -1)
    m, v = delta_function_normal_equations(template, target, weights.reshape(n_stamps), k, with_background)
    matrix.reshape(m.shape)[...] = m
    vector.reshape(v.shape)[...] = v


FAST["gdi_delta_function_normal_equations"] = delta_function_normal_equations_kernel


# ---- kernels/statistics.cu (H1: order statistics of the noise measurements) ----

def sorted_quantiles(ordered, mask, n_rows, n, n_quantiles, q0, q1, q2, q3, median, out):
    from gpudiffim.statistics import masked_quantiles

    rows = ordered.reshape(n_rows, n)
    count = mask.reshape(n_rows, n).sum(axis=1)
    leading = np.arange(n)[None, :] < count[:, None]     # the rows are sorted: the selected values lead
    result = out.reshape(-1, n_rows)
    with np.errstate(invalid="ignore"):
        result[:-1] = masked_quantiles(rows, leading, (q0, q1, q2, q3)[:n_quantiles], median=bool(median))
    result[:-1, np.isnan(rows[:, -1])] = np.nan          # a NaN selected sorts last
    result[-1] = count


def bin_medians(image, keep, has_keep, ny, nx, edges, n_by, n_bx, out):
    from gpudiffim.statistics import bin_medians_loop

    stack = image.reshape(-1, ny, nx)
    selection = keep.reshape(stack.shape) if has_keep else None
    out.reshape(-1, n_by, n_bx)[...] = bin_medians_loop(stack, selection, edges[:n_by + 1], edges[n_by + 1:])


FAST["gdi_sorted_quantiles"] = sorted_quantiles


def bin_sort_keys(image, keep, has_keep, n_images, ny, nx, edges, n_by, n_bx, keys):
    from gpudiffim.statistics import bin_sort_keys as reference

    stack = image.reshape(n_images, ny, nx)
    selection = keep.reshape(stack.shape) if has_keep else None
    keys[...] = reference(stack, selection, edges[:n_by + 1], edges[n_by + 1:])


def sorted_bin_medians(keys, n, n_bins, out):
    from gpudiffim.statistics import medians_of_sorted_keys

    out[...] = medians_of_sorted_keys(keys[:n], n_bins)


FAST.update({f"gdi_bin_medians<{t}>": bin_medians for t in ("float", "double")})
FAST["gdi_bin_sort_keys"] = bin_sort_keys
FAST["gdi_sorted_bin_medians"] = sorted_bin_medians


def sky_sources(residual, quartiles, n_bands, band_size, scale, threshold, tiny, out):
    from gpudiffim.statistics import beyond_robust_level

    rows = quartiles.reshape(-1, n_bands)
    beyond = beyond_robust_level(residual.reshape(n_bands, band_size), rows, threshold)
    out.reshape(n_bands, band_size)[...] = beyond


FAST["gdi_sky_sources"] = sky_sources


def _value_planes(t):
    def run(residual, variance, sky, shifts, n_bands, height, columns, rows_kept, gap, clip, out):
        from gpudiffim.statistics import sky_value_planes

        own_rows = shifts[:n_bands, None] + np.arange(rows_kept)
        shape = (n_bands, height, columns)
        planes = sky_value_planes(residual.reshape(shape), variance.reshape(shape), sky.reshape(shape), own_rows,
                                  gap, clip)
        out[...] = planes.reshape(out.shape)
    return run


def subtract_mean(planes, n, sums):
    from gpudiffim.statistics import subtract_sky_mean

    subtract_sky_mean(planes.reshape(2, n), sums)


def correlation_near(correlation, n_planes, rows, columns, far, extra, n_extra, out):
    from gpudiffim.statistics import near_lags

    out[...] = np.concatenate([near_lags(correlation.reshape(n_planes, rows, columns), far).ravel(), extra])


FAST.update({f"gdi_sky_value_planes<{t}>": _value_planes(t) for t in ("float", "double")})
FAST["gdi_subtract_mean"] = subtract_mean
FAST["gdi_correlation_near"] = correlation_near


def gather_rows(plane, ny, nx, windows, n_windows, height, first, out):
    index = windows[:n_windows, None] + np.arange(height)
    out.reshape(-1, height, nx)[first:first + n_windows] = plane.reshape(ny, nx)[index]


FAST.update({f"gdi_gather_rows<{t}>": gather_rows for t in ("float", "double", "int")})


def _sky_normalised(t):
    def run(residual, variance, sky, shifts, n_bands, n_total, height, columns, rows_kept, values, selected):
        from gpudiffim.statistics import normalised_sky_values

        shape = (n_total, height, columns)
        own_rows = shifts[:n_bands, None] + np.arange(rows_kept)
        n_images = values.shape[0]
        z, chosen = normalised_sky_values(residual.reshape(shape), variance.reshape(shape), sky.reshape(shape),
                                          own_rows, n_images)
        values[...] = np.where(chosen, z, np.inf)
        selected[...] = chosen
    return run


FAST.update({f"gdi_sky_normalised<{t}>": _sky_normalised(t) for t in ("float", "double")})


# ---- kernels/detection.cu (issue 17: footprints, ratings, star moments, the stamps' mask test) ----

def footprint_scan(residual, labels, n_pixels, n_cols, n_labels, stats):
    """``gdi_footprint_scan``: rows 0-5 of :func:`gpudiffim.cutouts.footprint_stats`."""
    from gpudiffim.cutouts import footprint_stats

    shape = (n_pixels // n_cols, n_cols)
    stats.reshape(7, n_labels)[:6] = footprint_stats(residual.reshape(shape), labels.reshape(shape), n_labels)[:6]


def footprint_peak(residual, labels, n_pixels, n_labels, stats):
    """``gdi_footprint_peak``: row 6 (``~`` the first pixel holding the largest key) from row 5."""
    from gpudiffim.cutouts import _order_key

    stats = stats.reshape(7, n_labels)
    labels = labels.reshape(-1)[:n_pixels]
    pixels = np.flatnonzero(labels > 0)
    segment = labels[pixels] - 1
    key = _order_key(np, residual.reshape(-1)[pixels])
    index = pixels.astype(np.uint64)
    np.maximum.at(stats[6], segment, np.where(key == stats[5][segment], ~index, np.uint64(0)))


def footprint_centres(stats, n_labels, n_cols, n_pixels, npix_min, npix_max, centres, keys):
    """``gdi_footprint_centres`` by :func:`gpudiffim.cutouts.footprint_centres`."""
    from gpudiffim.cutouts import footprint_centres as reference

    got_centres, got_keys = reference(stats.reshape(7, n_labels), int(n_cols), int(n_pixels), int(npix_min),
                                      int(npix_max))
    centres.reshape(-1)[:2 * n_labels] = got_centres.reshape(-1)
    keys[:n_labels] = got_keys


def select_rows(mask, n, rows, width, out):
    """``gdi_select_rows``: the rows whose bit is set in the packed mask, in order."""
    selected = np.unpackbits(mask.view(np.uint8), bitorder="little")[:n].astype(bool)
    picked = rows.reshape(-1, width)[:n][selected]
    out.reshape(-1)[:picked.size] = picked.reshape(-1)


def core_snr(image, variance, n_rows, n_cols, centres, n, radius, values):
    """``gdi_core_snr``: :func:`gpudiffim.fwhm.core_snr_of` into ``values[:n]``."""
    from gpudiffim.fwhm import core_snr_of

    shape = (n_rows, n_cols)
    values[:n] = core_snr_of(image.reshape(shape), variance.reshape(shape), centres.reshape(n, 2), int(radius))


def star_sigmas(image0, image1, n_images, n_rows, n_cols, centres, star_centres, n, radius, max_stars, n_iter,
                initial, values):
    """``gdi_star_sigmas``: the stars of :func:`gpudiffim.fwhm.rated_sigmas` by rating, their adaptive sigmas."""
    from gpudiffim.fwhm import _cutouts, adaptive_sigma

    best = np.argsort(-values[:n], kind="stable")[:max_stars]
    images = [image.reshape(n_rows, n_cols) for image in (image0, image1)[:n_images]]
    sigmas = adaptive_sigma(_cutouts(images, star_centres.reshape(n, 2)[best], int(radius)), int(n_iter),
                            float(initial))
    values[n:].reshape(n_images, max_stars)[:, :len(best)] = sigmas.reshape(n_images, len(best))


def stamps_flagged(mask_a, mask_b, n_cols, centres, n, half_size, bad_bits, flagged):
    """``gdi_stamps_flagged`` by :func:`gpudiffim.cutouts.stamps_flagged`."""
    from gpudiffim.cutouts import stamps_flagged as reference

    shape = (mask_a.size // n_cols, n_cols)
    flagged[:n] = reference(mask_a.reshape(shape), mask_b.reshape(shape), centres.reshape(n, 2), int(half_size),
                            int(bad_bits))


FAST["gdi_footprint_scan"] = footprint_scan
FAST["gdi_footprint_peak"] = footprint_peak
FAST["gdi_footprint_centres"] = footprint_centres
FAST["gdi_select_rows"] = select_rows
FAST["gdi_stamps_flagged"] = stamps_flagged
for _type in ("float", "double"):
    FAST[f"gdi_core_snr<{_type}>"] = core_snr
    FAST[f"gdi_star_sigmas<{_type}>"] = star_sigmas


def fill_grid(grids, n):
    """``gdi_fill_grid``: in each grid of ``n`` values, non-finite values -> median of the non-NaN ones
    (0 if none is finite)."""
    for values in grids.reshape(-1, n):
        finite = np.isfinite(values)
        fill = np.median(values[~np.isnan(values)]) if finite.any() else 0.0
        values[~finite] = fill


def detection_residual(image, variance, mask, n_images, n_rows, n_cols, no_data, grid, n_bins_y, n_bins_x, kind,
                       value, residual, above):
    """``gdi_detection_residual`` by the reference's two-point weights and products."""
    from gpudiffim.candidates import _two_point_weights

    shape = (n_images, n_rows, n_cols)
    grid = grid.reshape(n_images, n_bins_y, n_bins_x)
    weights = [_two_point_weights(n, np.linspace(0, n, bins + 1).astype(int))
               for n, bins in ((n_rows, n_bins_y), (n_cols, n_bins_x))]
    (first_y, second_y, w1_y, w2_y), (first_x, second_x, w1_x, w2_x) = weights
    along_x = grid[:, :, first_x] * w1_x + grid[:, :, second_x] * w2_x
    background = along_x[:, first_y] * w1_y[:, None]
    background += along_x[:, second_y] * w2_y[:, None]
    out = residual.reshape(shape)
    if kind < 0:
        out[...] = background
        return
    image, variance, mask = image.reshape(shape), variance.reshape(shape), mask.reshape(shape)
    np.subtract(image, background, out=out)
    if kind == 1:
        level = float(value) * np.sqrt(np.maximum(variance, 0))
    elif kind == 2:
        level = float(value)
    else:
        return
    above.reshape(shape)[...] = ((mask & no_data) == 0) & (out > level)


FAST["gdi_fill_grid"] = fill_grid
for _type in ("float", "double"):
    FAST[f"gdi_detection_residual<{_type}>"] = detection_residual
