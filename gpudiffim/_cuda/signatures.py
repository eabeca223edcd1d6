"""Declared parameter types of every kernel entry point.

CuPy passes kernel arguments without checking them against the C signature
(a float64 array given to a ``float*`` parameter, or a Python int given to an
``int`` parameter, which CuPy sends as 64 bits, silently corrupts the launch).
:func:`gpudiffim._cuda.launch.launch` checks every call against this table,
and the emulator generates its launch shims from it.  Keys are the CuPy
``name_expressions`` (``"gdi_residual_moments<double>"``).
"""

from dataclasses import dataclass

import numpy as np

__all__ = ["C_TYPES", "KernelSpec", "KERNELS", "ctype_of", "float_ctype", "parse_ctype"]

#: The one C type <-> NumPy dtype table of the kernels (scalars and pointees
#: alike).  Everything that needs a dtype's C type (the wrappers' template
#: arguments, the argument checks of :func:`~gpudiffim._cuda.launch.launch`, the
#: emulator's ``ctypes`` holders) reads it through :func:`ctype_of` or
#: :func:`parse_ctype`.
C_TYPES = {"int": np.dtype(np.int32), "float": np.dtype(np.float32), "double": np.dtype(np.float64),
           "unsigned long long": np.dtype(np.uint64)}
_BY_DTYPE = {dtype: ctype for ctype, dtype in C_TYPES.items()}


def ctype_of(dtype):
    """C type of ``dtype`` (any byte order): ``"int"``, ``"float"`` or ``"double"``, else None."""
    ctype = _BY_DTYPE.get(dtype)          # a native NumPy dtype: one lookup (read per launch)
    return ctype if ctype is not None else _BY_DTYPE.get(np.dtype(dtype).newbyteorder("="))


def float_ctype(name, dtype):
    """C type of a floating-point argument's ``dtype``: ``"float"`` or ``"double"``.

    Raises
    ------
    TypeError
        If ``dtype`` is neither float32 nor float64 (``name`` is the argument's name).
    """
    ctype = ctype_of(dtype)
    if ctype not in ("float", "double"):
        msg = f"{name} must be float32 or float64, got {np.dtype(dtype)}"
        raise TypeError(msg)
    return ctype


@dataclass(frozen=True)
class KernelSpec:
    """One entry point: the unit (``.cu`` file) and ``(name, C type)`` parameters.

    C types are ``"int"``, ``"float"``, ``"double"`` or pointers to them,
    ``"const T*"`` (read) or ``"T*"`` (written).
    """

    unit: str
    params: tuple

    def __post_init__(self):
        for _, ctype in self.params:
            parse_ctype(ctype)


def parse_ctype(ctype):
    """``(kind, pointee or scalar dtype, const)`` of a declared C type."""
    text = ctype.strip()
    if text.endswith("*"):
        base = text[:-1].strip()
        const = base.startswith("const ")
        base = base.removeprefix("const ").strip()
        if base not in C_TYPES:
            raise ValueError(f"unsupported pointer type {ctype!r}")
        return "pointer", C_TYPES[base], const
    if text not in C_TYPES:
        raise ValueError(f"unsupported scalar type {ctype!r}")
    return "scalar", C_TYPES[text], True


def _residual_moments(t):
    return KernelSpec("residual_moments", (
        ("diff", f"const {t}*"), ("var", f"const {t}*"), ("mask", "const int*"), ("bad_bits", "int"),
        ("n_stamps", "int"), ("ny", "int"), ("nx", "int"),
        ("row0", "int"), ("row1", "int"), ("col0", "int"), ("col1", "int"),
        ("out", "double*"),
    ))


KERNELS = {f"gdi_residual_moments<{t}>": _residual_moments(t) for t in ("float", "double")}
KERNELS["gdi_stamp_residuals"] = KernelSpec("residual_moments", (
    ("template_image", "const double*"), ("template_variance", "const double*"), ("template_mask", "const int*"),
    ("science_image", "const double*"), ("science_variance", "const double*"), ("science_mask", "const int*"),
    ("kernels", "const double*"), ("background", "const double*"),
    ("n_stamps", "int"), ("s", "int"), ("kw", "int"), ("bad_bits", "int"),
    ("row0", "int"), ("row1", "int"), ("col0", "int"), ("col1", "int"),
    ("write_rows", "int"), ("fill", "double"),
    ("sums", "double*"), ("rows", "double*"),
))


# ---- kernels/stamp_fit.cu and kernels/spatial_assembly.cu (issue 4, kernels 1, 2 and 4)

def _correlate_stamps(t):
    return KernelSpec("stamp_fit", (
        ("stamps", f"const {t}*"), ("kernels", f"const {t}*"),
        ("n_stamps", "int"), ("n_kernels", "int"), ("per_stamp", "int"),
        ("sy", "int"), ("sx", "int"), ("kh", "int"), ("kw", "int"),
        ("out", f"{t}*"),
    ))


def _normal_equations(t):
    return KernelSpec("stamp_fit", (
        ("columns", f"const {t}*"), ("weights", f"const {t}*"), ("target", f"const {t}*"),
        ("n_stamps", "int"), ("n_basis", "int"), ("n_pix", "int"), ("with_background", "int"),
        ("per_stamp_weights", "int"),
        ("matrix", "double*"), ("vector", "double*"),
    ))


KERNELS.update({f"gdi_correlate_stamps<{t}>": _correlate_stamps(t) for t in ("float", "double")})
KERNELS.update({f"gdi_normal_equations<{t}>": _normal_equations(t) for t in ("float", "double")})


def _cut_stamps(t):
    return KernelSpec("stamp_fit", (
        ("image", f"const {t}*"), ("variance", f"const {t}*"), ("mask", "const int*"), ("nx", "int"),
        ("centres", "const int*"), ("n_stamps", "int"), ("half", "int"),
        ("out_image", "double*"), ("out_variance", "double*"), ("out_mask", "int*"),
    ))


KERNELS.update({f"gdi_cut_stamps<{t}>": _cut_stamps(t) for t in ("float", "double")})
KERNELS["gdi_delta_function_normal_equations"] = KernelSpec("delta_function", (
    ("template_stamps", "const double*"), ("science_stamps", "const double*"), ("weights", "const double*"),
    ("n_stamps", "int"), ("s", "int"), ("k", "int"), ("with_background", "int"),
    ("matrix", "double*"), ("vector", "double*"),
))
KERNELS["gdi_spatial_normal_equations"] = KernelSpec("spatial_assembly", (
    ("normal_matrices", "const double*"), ("normal_vectors", "const double*"),
    ("owner", "const int*"), ("weights", "const double*"),
    ("n_stamps", "int"), ("p", "int"), ("n_theta", "int"),
    ("matrix", "double*"), ("vector", "double*"),
))


# ---- kernels/image_apply.cu and kernels/warp.cu (full-image application, Lanczos-3 warp) ----

def _warp_lanczos3(t):
    return KernelSpec("warp", (
        ("image", f"const {t}*"), ("variance", f"const {t}*"), ("mask", "const int*"),
        ("ny", "int"), ("nx", "int"),
        ("x_src", "const double*"), ("y_src", "const double*"), ("scale", "const double*"), ("use_scale", "int"),
        ("n_out", "int"), ("no_data", "int"), ("outside_bits", "int"),
        ("out_image", f"{t}*"), ("out_variance", f"{t}*"), ("out_mask", "int*"),
    ))


def _accumulate_terms(t):
    return KernelSpec("image_apply", (
        ("terms", f"const {t}*"), ("n_terms", "int"), ("term_rows", "int"), ("term_cols", "int"),
        ("row0", "int"), ("col0", "int"), ("rows", f"const {t}*"), ("cols", f"const {t}*"),
        ("ny", "int"), ("nx", "int"), ("out", f"{t}*"),
    ))


KERNELS.update({f"gdi_accumulate_terms<{t}>": _accumulate_terms(t) for t in ("float", "double")})
KERNELS.update({
    "gdi_or_filter_1d": KernelSpec("image_apply", (
        ("mask", "const int*"), ("n_images", "int"), ("ny", "int"), ("nx", "int"),
        ("half", "int"), ("axis", "int"), ("out", "int*"),
    )),
    "gdi_or_filter_footprint": KernelSpec("image_apply", (
        ("mask", "const int*"), ("footprint", "const int*"), ("n_images", "int"), ("ny", "int"), ("nx", "int"),
        ("kh", "int"), ("kw", "int"), ("out", "int*"),
    )),
})
KERNELS.update({f"gdi_warp_lanczos3<{t}>": _warp_lanczos3(t) for t in ("float", "double")})


def _copy_edge(t):
    return KernelSpec("image_apply", (
        ("in_image", f"const {t}*"), ("in_variance", f"const {t}*"), ("in_mask", "const int*"),
        ("ny", "int"), ("nx", "int"), ("hy", "int"), ("hx", "int"), ("edge_bit", "int"),
        ("image", f"{t}*"), ("variance", f"{t}*"), ("mask", "int*"),
    ))


KERNELS.update({f"gdi_copy_edge<{t}>": _copy_edge(t) for t in ("float", "double")})
KERNELS.update({f"gdi_spatial_powers<{t}>": KernelSpec("image_apply", (
    ("n", "int"), ("first", "double"), ("chebyshev", "int"), ("mid", "double"), ("width", "double"),
    ("order", "int"), ("out", f"{t}*"),
)) for t in ("float", "double")})
KERNELS["gdi_spatial_terms"] = KernelSpec("image_apply", (
    ("centres_rc", "const int*"), ("n", "int"), ("x0", "int"), ("y0", "int"), ("chebyshev", "int"),
    ("mid_x", "double"), ("width_x", "double"), ("mid_y", "double"), ("width_y", "double"), ("order", "int"),
    ("out", "double*"),
))


# ---- kernels/linear_solve.cu (issue 17: the stamp systems in one launch) ----

KERNELS["gdi_solve_small"] = KernelSpec("linear_solve", (
    ("matrices", "const double*"), ("vectors", "const double*"), ("n_systems", "int"), ("n", "int"),
    ("solutions", "double*"), ("pivots", "double*"), ("status", "int*"),
))

# ---- kernels/linear_solve.cu: the stamp systems and what the fit makes of them (H3, issue 17) ----

KERNELS["gdi_solve_stamps"] = KernelSpec("linear_solve", (
    ("matrices", "const double*"), ("vectors", "const double*"), ("codes", "const int*"),
    ("basis", "const double*"), ("n_systems", "int"), ("n_basis", "int"), ("with_background", "int"),
    ("n_taps", "int"), ("fit_failed", "int"),
    ("outcome", "double*"), ("kernels", "double*"), ("background", "double*"),
))
KERNELS["gdi_constant_weights"] = KernelSpec("stamp_fit", (
    ("science_variance", "const double*"), ("template_variance", "const double*"), ("n_stamps", "int"),
    ("n_pix", "int"), ("infinity", "double"), ("weights", "double*"), ("codes", "int*"),
))

# ---- kernels/statistics.cu (issue 17: order statistics of the noise measurements in one launch) ----

#: Boolean selections (1 byte, as NumPy's and C++'s ``bool``) are read in place.
C_TYPES["bool"] = np.dtype(bool)
_BY_DTYPE[C_TYPES["bool"]] = "bool"

KERNELS["gdi_sorted_quantiles"] = KernelSpec("statistics", (
    ("ordered", "const double*"), ("mask", "const bool*"), ("n_rows", "int"), ("n", "int"),
    ("n_quantiles", "int"), ("q0", "double"), ("q1", "double"), ("q2", "double"), ("q3", "double"),
    ("median", "int"), ("out", "double*"),
))


def _bin_medians(t):
    return KernelSpec("statistics", (
        ("image", f"const {t}*"), ("keep", "const bool*"), ("has_keep", "int"),
        ("ny", "int"), ("nx", "int"), ("edges", "const int*"), ("n_by", "int"), ("n_bx", "int"),
        ("out", "double*"),
    ))


KERNELS.update({f"gdi_bin_medians<{t}>": _bin_medians(t) for t in ("float", "double")})
KERNELS["gdi_bin_sort_keys"] = KernelSpec("statistics", (
    ("image", "const float*"), ("keep", "const bool*"), ("has_keep", "int"), ("n_images", "int"),
    ("ny", "int"), ("nx", "int"), ("edges", "const int*"), ("n_by", "int"), ("n_bx", "int"),
    ("keys", "unsigned long long*"),
))
KERNELS["gdi_sorted_bin_medians"] = KernelSpec("statistics", (
    ("keys", "const unsigned long long*"), ("n", "int"), ("n_bins", "int"), ("out", "double*"),
))
KERNELS["gdi_sky_sources"] = KernelSpec("statistics", (
    ("residual", "const double*"), ("quartiles", "const double*"), ("n_bands", "int"), ("band_size", "int"),
    ("scale", "double"), ("threshold", "double"), ("tiny", "double"), ("out", "int*"),
))


def _sky_value_planes(t):
    return KernelSpec("statistics", (
        ("residual", "const double*"), ("variance", f"const {t}*"), ("sky", "const bool*"), ("shifts", "const int*"),
        ("n_bands", "int"), ("height", "int"), ("columns", "int"), ("rows_kept", "int"), ("gap", "int"),
        ("clip", "double"), ("out", "double*"),
    ))


KERNELS.update({f"gdi_sky_value_planes<{t}>": _sky_value_planes(t) for t in ("float", "double")})
KERNELS["gdi_subtract_mean"] = KernelSpec("statistics", (
    ("planes", "double*"), ("n", "int"), ("sums", "const double*"),
))
KERNELS["gdi_correlation_near"] = KernelSpec("statistics", (
    ("correlation", "const double*"), ("n_planes", "int"), ("rows", "int"), ("columns", "int"), ("far", "int"),
    ("extra", "const double*"), ("n_extra", "int"), ("out", "double*"),
))


def _gather_rows(t):
    return KernelSpec("statistics", (
        ("plane", f"const {t}*"), ("ny", "int"), ("nx", "int"), ("windows", "const int*"), ("n_windows", "int"),
        ("height", "int"), ("first", "int"), ("out", f"{t}*"),
    ))


KERNELS.update({f"gdi_gather_rows<{t}>": _gather_rows(t) for t in ("float", "double", "int")})


def _sky_normalised(t):
    return KernelSpec("statistics", (
        ("residual", "const double*"), ("variance", f"const {t}*"), ("sky", "const bool*"), ("shifts", "const int*"),
        ("n_bands", "int"), ("n_total", "int"), ("height", "int"), ("columns", "int"), ("rows_kept", "int"),
        ("values", "double*"), ("selected", "bool*"),
    ))


KERNELS.update({f"gdi_sky_normalised<{t}>": _sky_normalised(t) for t in ("float", "double")})

# ---- kernels/detection.cu (issue 17: footprints, ratings, star moments and the stamps' mask test) ----

def _core_snr(t):
    return KernelSpec("detection", (
        ("image", f"const {t}*"), ("variance", f"const {t}*"), ("n_rows", "int"), ("n_cols", "int"),
        ("centres", "const int*"), ("n", "int"), ("radius", "int"), ("ratings", "double*"),
    ))


def _star_sigmas(t):
    return KernelSpec("detection", (
        ("image0", f"const {t}*"), ("image1", f"const {t}*"), ("n_images", "int"), ("n_rows", "int"),
        ("n_cols", "int"), ("centres", "const int*"), ("star_centres", "const int*"), ("n", "int"),
        ("radius", "int"), ("max_stars", "int"), ("n_iter", "int"), ("initial", "double"), ("values", "double*"),
    ))


KERNELS.update({
    "gdi_footprint_scan": KernelSpec("detection", (
        ("residual", "const double*"), ("labels", "const int*"), ("n_pixels", "int"), ("n_cols", "int"),
        ("n_labels", "int"), ("stats", "unsigned long long*"),
    )),
    "gdi_footprint_peak": KernelSpec("detection", (
        ("residual", "const double*"), ("labels", "const int*"), ("n_pixels", "int"), ("n_labels", "int"),
        ("stats", "unsigned long long*"),
    )),
    "gdi_footprint_centres": KernelSpec("detection", (
        ("stats", "const unsigned long long*"), ("n_labels", "int"), ("n_cols", "int"), ("n_pixels", "int"),
        ("npix_min", "int"), ("npix_max", "int"), ("centres", "int*"), ("keys", "unsigned long long*"),
    )),
    "gdi_select_rows": KernelSpec("detection", (
        ("mask", "const int*"), ("n", "int"), ("rows", "const int*"), ("width", "int"), ("out", "int*"),
    )),
    "gdi_stamps_flagged": KernelSpec("detection", (
        ("mask_a", "const int*"), ("mask_b", "const int*"), ("n_cols", "int"), ("centres", "const int*"),
        ("n", "int"), ("half_size", "int"), ("bad_bits", "int"), ("flagged", "int*"),
    )),
})
KERNELS.update({f"gdi_core_snr<{t}>": _core_snr(t) for t in ("float", "double")})
KERNELS.update({f"gdi_star_sigmas<{t}>": _star_sigmas(t) for t in ("float", "double")})


def _detection_residual(t):
    return KernelSpec("detection", (
        ("image", f"const {t}*"), ("variance", f"const {t}*"), ("mask", "const int*"), ("n_images", "int"),
        ("n_rows", "int"), ("n_cols", "int"), ("no_data", "int"), ("grid", "const double*"), ("n_bins_y", "int"),
        ("n_bins_x", "int"), ("kind", "int"), ("value", "double"), ("residual", "double*"), ("above", "int*"),
    ))


KERNELS["gdi_fill_grid"] = KernelSpec("detection", (("grids", "double*"), ("n", "int")))
KERNELS.update({f"gdi_detection_residual<{t}>": _detection_residual(t) for t in ("float", "double")})
