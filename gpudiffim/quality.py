"""Per-candidate quality report of a kernel fit (``KernelCandidateQa``, spec section 4.5).

For every fitted kernel candidate, two difference stamps are formed on the
fit region (the stamp shrunk by the kernel half-width):

* LOCAL: ``D = S - (T * K_c + b_c)`` with the candidate's own kernel ``K_c``
  (its coefficients on the original basis) and background ``b_c``;
* SPATIAL: ``D = S - (T * K(x_c, y_c) + b(x_c, y_c))`` with the spatial
  kernel and background realised at its centre.

Over the usable pixels (no bad mask bit, a positive variance with a finite
inverse and a finite ``D``; :func:`gpudiffim.statistics.usable_normalised_residual`,
the definition the stamp fits use), ``z = D / sqrt(V)``
(``V = V_S + sum K^2 V_T``) gives: mean, median, interquartile range,
maximum-likelihood standard deviation (``ddof=0``), the Kolmogorov-Smirnov
and Anderson-Darling tests of ``z`` against the fully specified N(0, 1), and
the reduced chi-square ``sum z^2 / (n - 1 - dof)`` (``dof`` = parameters of
one stamp fit for LOCAL, 0 for SPATIAL: the spatial model is not fitted to
one stamp).  The kernel centroid and width are the first and second moments
of the *squared* kernel image, in pixels from the kernel centre.

:func:`quality_table` returns one row per fitted candidate as an astropy
Table; its ``meta`` holds the spatial condition number, the warnings of the
fit diagnostics (spec section 5.2) and the mean, median and standard
deviation of every statistic over the GOOD candidates
(``<column>_MEAN``, ``_MEDIAN``, ``_STDEV``).
"""

import math
from dataclasses import dataclass

import numpy as np

from ._backend import to_host
from .stamps import StampBatch, difference_stamps
from .statistics import usable_normalised_residual

__all__ = [
    "RESIDUAL_STATISTICS",
    "CandidateDifferences",
    "CandidateModels",
    "anderson_darling_normal",
    "candidate_differences",
    "kolmogorov_smirnov_normal",
    "sample_statistics",
    "kernel_moments",
    "normalized_residuals",
    "quality_table",
    "quality_summary",
    "residual_quality",
]

#: Per-stamp residual statistics, in column order (prefixed ``local_`` / ``spatial_``).
RESIDUAL_STATISTICS = ("mean", "median", "iqr", "std", "ks_d", "ks_p", "ad_a2", "ad_p", "chi2_red")

_DESCRIPTIONS = {
    "mean": "mean of D/sigma",
    "median": "median of D/sigma",
    "iqr": "interquartile range of D/sigma (1.349 for N(0,1))",
    "std": "maximum-likelihood standard deviation of D/sigma",
    "ks_d": "Kolmogorov-Smirnov statistic of D/sigma against N(0,1)",
    "ks_p": "Kolmogorov-Smirnov p-value against N(0,1)",
    "ad_a2": "Anderson-Darling A^2 of D/sigma against N(0,1)",
    "ad_p": "Anderson-Darling asymptotic p-value against N(0,1)",
    "chi2_red": "sum (D/sigma)^2 / (n - 1 - dof); dof: stamp-fit parameters (LOCAL), 0 (SPATIAL)",
}

#: Candidates whose stamps are processed together (bounds the temporary memory).
_CHUNK = 512

#: Anderson-Darling critical values of A^2 for a fully specified distribution
#: (Stephens 1974, case 0), at these significance levels (per cent).
AD_SIGNIFICANCE_LEVELS = (15.0, 10.0, 5.0, 2.5, 1.0)
AD_CRITICAL_VALUES = (1.610, 1.933, 2.492, 3.070, 3.857)


def normalized_residuals(difference, variance, mask=None, bad_bits=0):
    """``D / sqrt(V)`` over the usable pixels of one stamp, as a flat array.

    Usable pixels are those of
    :func:`~gpudiffim.statistics.usable_normalised_residual`: none of
    ``bad_bits`` in ``mask``, a finite difference and a positive variance
    with a finite inverse.

    Parameters
    ----------
    difference, variance : ndarray
        Difference ``D`` and its variance ``V`` (same shape).
    mask : ndarray of int, optional
        Mask of ``D``.
    bad_bits : int
        Mask bits that disqualify a pixel.

    Returns
    -------
    ndarray of float64, shape (n,)
    """
    z, usable = usable_normalised_residual(np.asarray(difference, dtype=np.float64),
                                           np.asarray(variance, dtype=np.float64),
                                           0 if mask is None else np.asarray(mask), bad_bits)
    return z[usable]


def _anderson_darling_p(a2):
    """Asymptotic P(A^2 > a2) for a fully specified distribution (array or scalar).

    Marsaglia & Marsaglia (2004), J. Stat. Softw. 9(2), "Evaluating the
    Anderson-Darling distribution", function ``ADinf`` (absolute error
    below 2e-6 of the limiting distribution).
    """
    a2 = np.asarray(a2, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        x = np.where(a2 > 0, a2, 1.0)
        low = np.exp(-1.2337141 / x) / np.sqrt(x) * (
            2.00012 + (0.247105 - (0.0649821 - (0.0347962 - (0.011672 - 0.00168691 * x) * x)
                                   * x) * x) * x)
        high = np.exp(-np.exp(1.0776 - (2.30695 - (0.43424 - (0.082433 - (0.008056 - 0.0003146 * x)
                                                                * x) * x) * x) * x))
    p = np.clip(1.0 - np.where(x < 2, low, high), 0.0, 1.0)
    p = np.where(a2 > 0, p, 1.0)
    p = np.where(np.isfinite(a2), p, np.nan)
    return float(p) if p.ndim == 0 else p


def _sorted_sample(z):
    """Rows sorted ascending with non-finite values last, and the count of finite ones."""
    z = np.atleast_2d(np.asarray(z, dtype=np.float64))
    z = np.where(np.isfinite(z), z, np.nan)
    return np.sort(z, axis=1), np.isfinite(z).sum(axis=1)


def _rank_arrays(n, width):
    """1-based ranks (1, width), validity mask (rows, width) and n as float (rows, 1)."""
    rank = np.arange(1, width + 1, dtype=np.float64)[None, :]
    valid = rank <= n[:, None]
    return rank, valid, np.maximum(n, 1).astype(np.float64)[:, None]


def _ks_rows(zs, n):
    """Kolmogorov-Smirnov D and asymptotic p of sorted rows (``kstest(method="asymp")``)."""
    from scipy.special import kolmogorov, ndtr   # kolmogorov = scipy.stats.kstwobign.sf

    rank, valid, count = _rank_arrays(n, zs.shape[1])
    cdf = ndtr(np.where(valid, zs, 0.0))
    above = np.where(valid, rank / count - cdf, -np.inf).max(axis=1, initial=-np.inf)
    below = np.where(valid, cdf - (rank - 1) / count, -np.inf).max(axis=1, initial=-np.inf)
    d = np.where(n > 0, np.maximum(above, below), np.nan)
    with np.errstate(invalid="ignore"):
        p = np.clip(kolmogorov(d * np.sqrt(n)), 0.0, 1.0)
    return d, np.where(n > 0, p, np.nan)


def _ad_rows(zs, n):
    """Anderson-Darling A^2 against N(0, 1) and its asymptotic p of sorted rows."""
    from scipy.special import log_ndtr

    rank, valid, count = _rank_arrays(n, zs.shape[1])
    mirror = np.clip(n[:, None] - rank.astype(np.int64), 0, zs.shape[1] - 1)
    upper = np.take_along_axis(zs, mirror, axis=1)
    terms = (2 * rank - 1) * (log_ndtr(np.where(valid, zs, 0.0)) + log_ndtr(-np.where(valid, upper, 0.0)))
    a2 = -count[:, 0] - np.where(valid, terms, 0.0).sum(axis=1) / count[:, 0]
    a2 = np.where(n > 0, a2, np.nan)
    return a2, np.asarray(_anderson_darling_p(a2)).reshape(a2.shape)


def _quantile_rows(zs, n, q):
    """Quantile ``q`` of sorted rows by linear interpolation at ``q (n - 1)`` (NumPy's default)."""
    position = q * np.maximum(n - 1, 0)
    low = np.floor(position).astype(np.int64)
    high = np.minimum(low + 1, np.maximum(n - 1, 0))
    fraction = position - low
    a = np.take_along_axis(zs, low[:, None], axis=1)[:, 0]
    b = np.take_along_axis(zs, high[:, None], axis=1)[:, 0]
    return np.where(n > 0, a + (b - a) * fraction, np.nan)


def sample_statistics(z, dof=0):
    """Quality statistics of samples of normalised residuals, one sample per row.

    Parameters
    ----------
    z : array_like of shape (N, P) or (P,)
        ``D / sigma``; non-finite values (NaN for unusable pixels) are left out.
    dof : int
        Fitted parameters, for the reduced chi-square ``sum z^2 / (n - 1 - dof)``.

    Returns
    -------
    dict of ndarray of shape (N,)
        ``n`` and every name of :data:`RESIDUAL_STATISTICS`: mean, median,
        interquartile range and maximum-likelihood standard deviation; the
        Kolmogorov-Smirnov statistic and asymptotic p-value against N(0, 1)
        (``scipy.stats.kstest(z, "norm", method="asymp")``); the
        Anderson-Darling A^2 against N(0, 1) and its asymptotic p-value
        (:func:`anderson_darling_normal`).  NaN where a row has no usable value,
        and for ``chi2_red`` where ``n - 1 - dof <= 0``.
    """
    zs, n = _sorted_sample(z)
    _, valid, count = _rank_arrays(n, zs.shape[1])
    values = np.where(valid, zs, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n > 0, values.sum(axis=1) / count[:, 0], np.nan)
        spread = np.where(valid, zs - mean[:, None], 0.0)
        std = np.where(n > 0, np.sqrt((spread * spread).sum(axis=1) / count[:, 0]), np.nan)
        chi2 = np.where(n - 1 - dof > 0, (values * values).sum(axis=1) / (n - 1 - dof), np.nan)
    ks_d, ks_p = _ks_rows(zs, n)
    ad_a2, ad_p = _ad_rows(zs, n)
    return {"n": n, "mean": mean, "median": _quantile_rows(zs, n, 0.5),
            "iqr": _quantile_rows(zs, n, 0.75) - _quantile_rows(zs, n, 0.25), "std": std,
            "ks_d": ks_d, "ks_p": ks_p, "ad_a2": ad_a2, "ad_p": ad_p, "chi2_red": chi2}


def kolmogorov_smirnov_normal(z):
    """Two-sided Kolmogorov-Smirnov test of a sample against N(0, 1).

    ``D = max_i max(i/n - Phi(z_(i)), Phi(z_(i)) - (i-1)/n)`` and its
    asymptotic p-value ``P(K > D sqrt(n))`` (Kolmogorov distribution), as
    ``scipy.stats.kstest(z, "norm", method="asymp")``; for ``n`` of a few
    hundred the exact p-value differs by less than about 0.01.

    Returns
    -------
    d, p : float
        NaN for an empty sample.
    """
    zs, n = _sorted_sample(np.ravel(z))
    d, p = _ks_rows(zs, n)
    return float(d[0]), float(p[0])


def anderson_darling_normal(z):
    """Anderson-Darling test of a sample against the fully specified N(0, 1).

    .. math:: A^2 = -n - \\frac{1}{n} \\sum_{i=1}^{n} (2i - 1)
              \\left[\\ln \\Phi(z_{(i)}) + \\ln\\left(1 - \\Phi(z_{(n+1-i)})\\right)\\right]

    (``scipy.stats.anderson`` estimates the mean and width instead; here
    they are fixed, which is the question for normalised residuals).

    Parameters
    ----------
    z : array_like
        Sample.

    Returns
    -------
    a2 : float
        The statistic (NaN for an empty sample).
    p : float
        Asymptotic p-value (Marsaglia & Marsaglia 2004); compare ``a2`` with
        :data:`AD_CRITICAL_VALUES` for the classical table.
    """
    zs, n = _sorted_sample(np.ravel(z))
    a2, p = _ad_rows(zs, n)
    return float(a2[0]), float(p[0])


def residual_quality(difference, variance, mask=None, bad_bits=0, dof=0):
    """Quality statistics of one difference stamp (see the module notes).

    Parameters
    ----------
    difference, variance : ndarray
        Difference ``D`` and its variance ``V``.
    mask : ndarray of int, optional
    bad_bits : int
        Pixels with any of these bits are left out.
    dof : int
        Parameters of the fit that produced ``D`` (for the reduced chi-square).

    Returns
    -------
    dict
        ``n`` and every name of :data:`RESIDUAL_STATISTICS` (see
        :func:`sample_statistics`), as Python numbers.
    """
    z = normalized_residuals(difference, variance, mask, bad_bits)
    stats = sample_statistics(z[None, :] if z.size else np.full((1, 1), np.nan), dof)
    return {name: (int(value[0]) if name == "n" else float(value[0])) for name, value in stats.items()}


def _moments_batch(kernels):
    """``(cx, cy, ixx, iyy, ixy)`` of each squared kernel image, each of shape (N,)."""
    kernels = np.asarray(kernels, dtype=np.float64)
    weight = kernels * kernels
    total = weight.sum(axis=(1, 2))
    v = np.arange(kernels.shape[1]) - kernels.shape[1] // 2
    u = np.arange(kernels.shape[2]) - kernels.shape[2] // 2
    along_u, along_v = weight.sum(axis=1), weight.sum(axis=2)
    with np.errstate(invalid="ignore", divide="ignore"):
        total = np.where(total > 0, total, np.nan)
        cx, cy = along_u @ u / total, along_v @ v / total
        du, dv = u[None, :] - cx[:, None], v[None, :] - cy[:, None]
        ixx = np.sum(along_u * du * du, axis=1) / total
        iyy = np.sum(along_v * dv * dv, axis=1) / total
        ixy = np.einsum("nr,nrc,nc->n", dv, weight, du) / total
    return cx, cy, ixx, iyy, ixy


def kernel_moments(kernel):
    """Centroid and second moments of the squared kernel image.

    Weights ``w = K^2`` (insensitive to negative wings).  Offsets ``u``
    (columns, x) and ``v`` (rows, y) are in pixels from the kernel centre,
    so a centred kernel has centroid (0, 0); a Gaussian kernel of width
    ``sigma`` has ``sqrt(ixx) = sigma / sqrt(2)``.

    Parameters
    ----------
    kernel : ndarray of shape (kh, kw)
        Kernel image (``afw`` layout, odd sizes).

    Returns
    -------
    cx, cy, ixx, iyy, ixy : float
        ``sum(w u) / sum(w)``, ``sum(w v) / sum(w)`` and the central second
        moments; NaN for an all-zero kernel.
    """
    return tuple(float(m[0]) for m in _moments_batch(np.asarray(kernel)[None]))


@dataclass(frozen=True)
class CandidateDifferences:
    """Stamps and difference stamps of fitted candidates under both models.

    Attributes
    ----------
    records : tuple of CandidateRecord
        The fitted candidates, in cell-set order.
    batch : StampBatch
        Their stamps from the image that was convolved (``batch.template``)
        and the image it was matched to (``batch.science``).
    models : CandidateModels
        Each candidate's own kernel and background, and the spatial ones at its centre.
    local, spatial : tuple of ndarray
        ``(difference, variance, mask)`` on the fit region, each (N, F, F).
    bad_bits : int
        Mask bits that disqualify a pixel.
    dof : int
        Parameters of one stamp fit (the LOCAL reduced chi-square; SPATIAL uses 0).
    """

    records: tuple
    batch: StampBatch
    models: "CandidateModels"
    local: tuple
    spatial: tuple
    bad_bits: int
    dof: int


def _planes(result, template, science):
    """(image that was convolved, image it was matched to), as host MaskedImages.

    The report's per-candidate arithmetic runs on the host: CuPy planes are
    copied (only those of the inputs; the stamps are small).
    """
    template = getattr(template, "masked_image", template).to_module(np)
    science = getattr(science, "masked_image", science).to_module(np)
    return (science, template) if result.convolved == "science" else (template, science)


def _fit_setting(result, key, given):
    if given is not None:
        return given
    value = result.diagnostics.get(key)
    if value is None:
        msg = (f"result.diagnostics has no {key!r} (not made by ImagePsfMatchTask?): "
               f"pass {key}= explicitly")
        raise ValueError(msg)
    return value


def candidate_differences(result, template, science, *, records=None, stamp_half_size=None,
                          bad_mask_planes=None, n_stamp_parameters=None):
    """Difference stamps of the fitted candidates under their own and the spatial kernel.

    Parameters
    ----------
    result : MatchResult
        A fit (any result of :class:`~gpudiffim.ImagePsfMatchTask`).
    template, science : MaskedImage or Exposure
        The inputs of the fit (for an exposure fit, the *registered* template:
        ``result.warped_exposure``).
    records : sequence of CandidateRecord, optional
        Defaults to every candidate with a stamp solution.
    stamp_half_size : int, optional
        Default ``result.diagnostics["stamp_half_size"]``.
    bad_mask_planes : sequence of str, optional
        Default ``result.diagnostics["bad_mask_planes"]`` (the fit's).
    n_stamp_parameters : int, optional
        Default ``result.diagnostics["n_stamp_parameters"]``.

    Returns
    -------
    CandidateDifferences
    """
    half_size = int(_fit_setting(result, "stamp_half_size", stamp_half_size))
    planes = tuple(_fit_setting(result, "bad_mask_planes", bad_mask_planes))
    dof = int(_fit_setting(result, "n_stamp_parameters", n_stamp_parameters))
    to_convolve, reference = _planes(result, template, science)
    records = _fitted_records(result) if records is None else tuple(records)
    if not records:
        msg = "no fitted kernel candidate to assess"
        raise ValueError(msg)
    bad_bits = reference.bits(planes) | to_convolve.bits(planes)
    batch = StampBatch.extract([(r.x, r.y) for r in records], to_convolve, reference, half_size)
    models = _models(result, records)
    return CandidateDifferences(
        records, batch, models,
        difference_stamps(batch, models.local_kernels, models.local_background, bad_bits),
        difference_stamps(batch, models.spatial_kernels, models.spatial_background, bad_bits), bad_bits, dof)


def _fitted_records(result):
    """The candidates with a stamp solution on the original basis, in cell-set order."""
    return tuple(r for r in result.kernel_cell_set.candidates if r.coefficients)


@dataclass(frozen=True)
class CandidateModels:
    """Each candidate's own kernel and background, and the spatial ones at its centre.

    Attributes
    ----------
    local_kernels, spatial_kernels : ndarray of shape (N, kh, kw)
    local_background, spatial_background : ndarray of shape (N,)
    """

    local_kernels: np.ndarray
    spatial_kernels: np.ndarray
    local_background: np.ndarray
    spatial_background: np.ndarray


def _models(result, records):
    xs = np.array([r.x for r in records], dtype=np.float64)
    ys = np.array([r.y for r in records], dtype=np.float64)
    own = np.tensordot(np.array([r.coefficients for r in records]), result.kernel_basis.kernels, axes=1)
    return CandidateModels(own,
                           result.psf_matching_kernel.images(xs, ys),
                           np.array([r.background for r in records], dtype=np.float64),
                           np.asarray(result.background_model(xs, ys), dtype=np.float64))


def _z_rows(difference, variance, mask, bad_bits):
    """D / sigma of each stamp as a row, NaN where unusable."""
    z, _ = usable_normalised_residual(difference, variance, mask, bad_bits, fill=np.nan)
    return z.reshape(len(z), -1)


def _columns(records, rows, models, dof):
    """Table columns of ``records`` from their D/sigma ``rows`` ({"local", "spatial"}: (N, F*F))."""
    columns = {name: [getattr(r, name) for r in records]
               for name in ("id", "x", "y", "cell", "status", "reason")}
    for stage in ("local", "spatial"):
        stats = sample_statistics(rows[stage], dof if stage == "local" else 0)
        if stage == "local":
            columns["n_pixels"] = stats["n"]
        columns.update({f"{stage}_{name}": stats[name] for name in RESIDUAL_STATISTICS})
    for stage in ("local", "spatial"):
        kernels = getattr(models, f"{stage}_kernels")
        cx, cy, ixx, iyy, _ = _moments_batch(kernels)
        columns[f"kernel_sum_{stage}"] = kernels.sum(axis=(1, 2))
        columns[f"kernel_cx_{stage}"], columns[f"kernel_cy_{stage}"] = cx, cy
        columns[f"kernel_sx_{stage}"], columns[f"kernel_sy_{stage}"] = np.sqrt(ixx), np.sqrt(iyy)
        columns[f"background_{stage}"] = getattr(models, f"{stage}_background")
    columns["kernel_mse"] = np.mean((models.spatial_kernels - models.local_kernels) ** 2, axis=(1, 2))
    return columns


def _describe(table):
    units = {"x": "pix", "y": "pix"}
    text = {"id": "candidate id", "x": "parent x of the stamp centre",
            "y": "parent y of the stamp centre", "cell": "spatial cell index",
            "status": "GOOD, BAD or UNKNOWN", "reason": "why it was rejected",
            "n_pixels": "pixels in the LOCAL statistics",
            "kernel_mse": "mean over kernel pixels of (K_spatial - K_local)^2"}
    for stage, what in (("local", "own kernel and background"),
                        ("spatial", "spatial model at the centre")):
        for name, words in _DESCRIPTIONS.items():
            text[f"{stage}_{name}"] = f"{words} ({what})"
        text[f"kernel_sum_{stage}"] = f"kernel sum ({what})"
        for axis in "xy":
            units[f"kernel_c{axis}_{stage}"] = units[f"kernel_s{axis}_{stage}"] = "pix"
            text[f"kernel_c{axis}_{stage}"] = f"{axis} centroid of K^2 from the kernel centre ({what})"
            text[f"kernel_s{axis}_{stage}"] = f"{axis} second-moment width of K^2 ({what})"
        text[f"background_{stage}"] = f"differential background, image units ({what})"
    for name, column in table.columns.items():
        column.description = text.get(name, "")
        if name in units:
            column.unit = units[name]


def _aggregate(table, status="GOOD"):
    """``<column>_MEAN/_MEDIAN/_STDEV`` over the rows of ``status`` (finite values only)."""
    rows = table[table["status"] == status] if len(table) else table
    out = {}
    for name in table.colnames:
        if name in ("id", "x", "y", "cell", "status", "reason"):
            continue
        values = np.asarray(rows[name], dtype=np.float64)
        values = values[np.isfinite(values)]
        stats = (values.mean(), np.median(values), values.std()) if values.size else (math.nan,) * 3
        for suffix, value in zip(("MEAN", "MEDIAN", "STDEV"), stats):
            out[f"{name}_{suffix}"] = float(value)
    return len(rows), out


def quality_table(result, template=None, science=None, *, stamp_half_size=None, bad_mask_planes=None,
                  n_stamp_parameters=None):
    """Quality report of a fit: one row per fitted candidate (spec section 4.5).

    Computed from the ``D/sigma`` the fit kept (``result.residual_rows``, see
    ``config.quality_report``) unless the images are given, in which case
    every stamp is cut and differenced again (for any other settings).

    Parameters
    ----------
    result : MatchResult
        A fit of :class:`~gpudiffim.ImagePsfMatchTask` (or any object with its
        ``psf_matching_kernel``, ``background_model``, ``kernel_cell_set``,
        ``kernel_basis``, ``convolved``, ``diagnostics`` and, without images,
        ``residual_rows``).
    template, science : MaskedImage or Exposure, optional
        The inputs of the fit (registered template for exposure fits); both
        or neither.
    stamp_half_size, bad_mask_planes, n_stamp_parameters
        Override the fit's settings (see :func:`candidate_differences`); the
        first two need the images.

    Returns
    -------
    astropy.table.Table
        Columns ``id``, ``x``, ``y``, ``cell``, ``status``, ``reason``,
        ``n_pixels``; ``local_<s>`` and ``spatial_<s>`` for every ``s`` of
        :data:`RESIDUAL_STATISTICS`; ``kernel_sum_``, ``kernel_cx_``,
        ``kernel_cy_``, ``kernel_sx_``, ``kernel_sy_`` and ``background_``
        ``{local,spatial}``; ``kernel_mse``.  ``meta``: ``spatial_condition_number``,
        ``kernel_sum_at_centre``, ``n_good``, ``n_bad``, ``warnings`` (list of
        str), ``dof_local``, ``dof_spatial`` (0), ``stamp_half_size``, ``bad_mask_planes``,
        ``ad_critical_values``, ``ad_significance_levels``,
        ``n_aggregated`` (GOOD rows) and ``<column>_MEAN/_MEDIAN/_STDEV``.

    Raises
    ------
    ValueError
        If no candidate was fitted, only one image is given, or the fit kept
        no residuals and no images are given.
    """
    from astropy.table import Table, vstack

    fitted = _fitted_records(result)
    if not fitted:
        msg = "no fitted kernel candidate to assess"
        raise ValueError(msg)
    dof = int(_fit_setting(result, "n_stamp_parameters", n_stamp_parameters))
    half_size = int(_fit_setting(result, "stamp_half_size", stamp_half_size))
    chunks = [Table(_columns(part, rows, models, dof))
              for part, rows, models in _row_chunks(result, fitted, template, science, stamp_half_size,
                                            bad_mask_planes, dof)]
    table = chunks[0] if len(chunks) == 1 else vstack(chunks, join_type="exact")
    _describe(table)
    diagnostics = result.diagnostics
    n_aggregated, aggregates = _aggregate(table)
    table.meta.update({
        "spatial_condition_number": float(diagnostics.get("spatial_condition_number", math.nan)),
        "kernel_sum_at_centre": float(diagnostics.get("kernel_sum_at_centre", math.nan)),
        "n_good": int(result.kernel_cell_set.n_good), "n_bad": int(result.kernel_cell_set.n_bad),
        "warnings": list(diagnostics.get("warnings", ())), "dof_local": dof,
        "dof_spatial": 0, "stamp_half_size": half_size,
        "bad_mask_planes": list(_fit_setting(result, "bad_mask_planes", bad_mask_planes)),
        "ad_critical_values": list(AD_CRITICAL_VALUES),
        "ad_significance_levels": list(AD_SIGNIFICANCE_LEVELS),
        "n_aggregated": n_aggregated, **aggregates})
    return table


def _row_chunks(result, fitted, template, science, stamp_half_size, bad_mask_planes, dof):
    """``(records, {"local": z, "spatial": z}, models)`` per chunk of :data:`_CHUNK` candidates, on the host."""
    if (template is None) != (science is None):
        msg = "quality_table needs both the template and the science image, or neither"
        raise ValueError(msg)
    if template is not None:
        for start in range(0, len(fitted), _CHUNK):
            differences = candidate_differences(result, template, science, records=fitted[start:start + _CHUNK],
                                                stamp_half_size=stamp_half_size,
                                                bad_mask_planes=bad_mask_planes, n_stamp_parameters=dof)
            yield differences.records, {stage: _z_rows(*getattr(differences, stage), differences.bad_bits)
                                        for stage in ("local", "spatial")}, differences.models
        return
    residuals = getattr(result, "residual_rows", None)
    if residuals is None:
        msg = ("this fit kept no residuals for the quality report (config.quality_report=False): "
               "pass the fit's template and science images to quality_table")
        raise ValueError(msg)
    if stamp_half_size is not None or bad_mask_planes is not None:
        msg = "stamp_half_size and bad_mask_planes other than the fit's need the images: pass template and science"
        raise ValueError(msg)
    if len(residuals.index) != len(fitted):
        msg = f"result.residual_rows has {len(residuals.index)} rows for {len(fitted)} fitted candidates"
        raise ValueError(msg)
    for start in range(0, len(fitted), _CHUNK):
        part = fitted[start:start + _CHUNK]
        yield part, {stage: to_host(getattr(residuals, stage)[start:start + _CHUNK])
                     for stage in ("local", "spatial")}, _models(result, part)


def quality_summary(table):
    """One line summarising a :func:`quality_table` for the log."""
    meta = table.meta
    good = table[table["status"] == "GOOD"] if len(table) else table
    n = len(good)
    text = [f"quality over {n} GOOD candidate(s) (of {len(table)} fitted):"]
    for stage in ("local", "spatial"):
        low = int(np.sum(np.asarray(good[f"{stage}_ks_p"]) < 0.01)) if n else 0
        text.append(f"{stage} D/sigma std median {meta.get(f'{stage}_std_MEDIAN', math.nan):.3f}, "
                    f"reduced chi2 median {meta.get(f'{stage}_chi2_red_MEDIAN', math.nan):.3f}, "
                    f"KS p < 0.01 for {low};")
    text.append(f"spatial condition number {meta.get('spatial_condition_number', math.nan):.3g}")
    warnings = meta.get("warnings") or []
    if warnings:
        text.append(f"; {len(warnings)} warning(s): " + "; ".join(warnings))
    return " ".join(text)
