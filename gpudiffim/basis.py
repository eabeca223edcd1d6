"""PSF-matching kernel bases and the delta-function regularisation matrix.

This module builds the fixed sets of basis kernels :math:`B_i` in which the
PSF-matching kernel :math:`K = \\sum_i a_i B_i` is expanded, following LSST
``ip_diffim`` (see ``ipdiffim-reference.md`` sections 2.1-2.5):

* the Alard-Lupton basis: Gaussians times monomials, whose Gaussian widths
  and kernel size can be derived from the two PSF FWHMs;
* the delta-function basis: one kernel per pixel;
* the regularisation matrix :math:`H = B^T B` that penalises rough
  delta-function kernels.

Conventions
-----------
A basis is an array ``kernels`` of shape ``(n_basis, height, width)``, indexed
``kernels[k, row, col]``.  Row ``row`` holds the y offset ``v = row - h_y``
and column ``col`` the x offset ``u = col - h_x`` from the kernel centre, with
``h_x = width // 2`` and ``h_y = height // 2``; all offsets and widths are in
pixels.  A kernel pixel ``(u, v)`` multiplies the input pixel ``(x + u, y + v)``
(the ``afw`` correlation convention, reference section 0).

All arrays are float64 on the host (NumPy); device code copies them over.

References
----------
.. [1] Alard, C. & Lupton, R. H. 1998, ApJ 503, 325,
   :doi:`10.1086/305984`
.. [2] Alard, C. 2000, A&AS 144, 363, :doi:`10.1051/aas:2000214`
.. [3] Becker, A. C. et al. 2012, MNRAS 425, 1341,
   :doi:`10.1111/j.1365-2966.2012.21542.x`
"""

import functools
import logging
import math
from dataclasses import dataclass, field

import numpy as np
from scipy import sparse

from ._validate import check_int, check_real, fail, is_int
from .errors import ConfigurationError, ShapeError
from .gaussian import fwhm_to_sigma

__all__ = [
    "KernelBasis",
    "alard_lupton_form",
    "alard_lupton_sigmas",
    "fwhm_to_sigma",
    "make_alard_lupton_basis",
    "make_delta_function_basis",
    "make_kernel_basis",
    "make_regularization_matrix",
    "regularization_matrix",
    "renormalization_mixing",
    "renormalize_kernel_list",
    "SeparableBasis",
    "separable_form",
]

log = logging.getLogger(__name__)


#: Threshold on a basis kernel's sum below which it is treated as zero-sum
#: during renormalisation.  ``ip_diffim`` deliberately uses the single-precision
#: machine epsilon (FLT_EPSILON) here, so we do too.
_SUM_EPSILON = float(np.finfo(np.float32).eps)

BASIS_KINDS = ("alard-lupton", "delta-function", "pca")
AL_MODES = ("config", "convolution", "deconvolution")
REGULARIZATION_TYPES = ("centralDifference", "forwardDifference")
CENTRAL_STENCILS = (5, 9)
FORWARD_ORDERS = (1, 2, 3)


# --------------------------------------------------------------------------
# Small argument checks
# --------------------------------------------------------------------------

def _as_tuple(values):
    """A scalar or a 1-D sequence/array as a tuple of Python scalars."""
    if isinstance(values, np.ndarray):
        return tuple(values.ravel().tolist())
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        return (values,)
    return tuple(values)


# --------------------------------------------------------------------------
# Alard-Lupton sigmas and kernel size (reference section 2.1)
# --------------------------------------------------------------------------

def _sigma_series(wide, narrow, min_sigma, n_gauss, beta):
    """Geometric series of Gaussian sigmas matching ``narrow`` to ``wide``.

    The matching-kernel width is ``sigma_k = max(sqrt(wide**2 - narrow**2),
    min_sigma)``.  With several Gaussians the series starts at
    ``max(min_sigma, sigma_k / beta)``; each next sigma is ``beta`` times the
    previous one (the DM-54625 rule of ``ip_diffim``).
    """
    sigma_k = max(math.sqrt(wide**2 - narrow**2), min_sigma)
    first = max(min_sigma, sigma_k / beta) if n_gauss > 1 else sigma_k
    return tuple(first * beta**k for k in range(n_gauss))


def _clamped_kernel_width(config, sigma):
    """Odd kernel width ``int(scaling * sigma)`` clamped to the config limits (px)."""
    width = int(config.kernel_size_fwhm_scaling * sigma)
    if width % 2 == 0:
        width += 1
    return min(max(width, config.kernel_size_min), config.kernel_size_max)


def alard_lupton_sigmas(config, target_fwhm_pix=None, reference_fwhm_pix=None):
    """Choose the Alard-Lupton Gaussian sigmas and the kernel width.

    Implements the current ``ip_diffim`` rule (DM-54625, reference section 2.1).
    The image with FWHM ``target_fwhm_pix`` is the one that gets convolved; it
    is matched to the image with FWHM ``reference_fwhm_pix``.  With
    :math:`\\sigma_T, \\sigma_R` their Gaussian sigmas, ``beta =
    config.alard_gauss_beta`` and ``n = config.alard_n_gauss``:

    * either FWHM is None, or ``config.scale_by_fwhm`` is False: mode
      ``"config"``, sigmas ``config.alard_sig_gauss`` and width
      ``config.kernel_size``, *not* clamped;
    * :math:`\\sigma_T = \\sigma_R`: mode ``"config"``, config sigmas, but the
      width is recomputed from the last sigma as below;
    * :math:`\\sigma_R > \\sigma_T`: mode ``"convolution"``,
      :math:`\\sigma_K = \\max(\\sqrt{\\sigma_R^2 - \\sigma_T^2}, m)` with
      ``m = config.alard_min_sig``;
    * :math:`\\sigma_R < \\sigma_T`: mode ``"deconvolution"``, the same with
      the roles swapped and ``m = config.alard_min_sig_deconv``.

    In the last two modes the sigmas are :math:`s_0 = \\max(m, \\sigma_K/\\beta)`
    (or :math:`\\sigma_K` when ``n == 1``) and :math:`s_{k+1} = \\beta s_k`.
    The width is ``int(config.kernel_size_fwhm_scaling * sigmas[-1])``, plus
    one if even, clamped to ``[config.kernel_size_min,
    config.kernel_size_max]``.

    Parameters
    ----------
    config : PsfMatchConfig
        Configuration with ``kernel_basis_set == "alard-lupton"``.
    target_fwhm_pix : float, optional
        PSF FWHM (px) of the image that will be convolved.
    reference_fwhm_pix : float, optional
        PSF FWHM (px) of the image it is matched to.

    Returns
    -------
    sigmas : tuple of float
        Gaussian sigmas (px), one per Gaussian, in basis order.
    kernel_size : int
        Odd kernel width (px); the half width is ``kernel_size // 2``.
    mode : {"config", "convolution", "deconvolution"}
        Which rule chose the sigmas (``ALBasisMode`` in ``ip_diffim``).

    Raises
    ------
    ConfigurationError
        If the config's basis set is not Alard-Lupton, or a given FWHM is not a
        finite positive number.

    Examples
    --------
    >>> from gpudiffim.config import PsfMatchConfig
    >>> sigmas, size, mode = alard_lupton_sigmas(PsfMatchConfig(), 4.0 * 2.3548, 6.0 * 2.3548)
    >>> [round(s, 3) for s in sigmas], size, mode
    ([2.236, 4.472, 8.944], 35, 'convolution')
    """
    if config.kernel_basis_set != "alard-lupton":
        fail("kernel_basis_set", config.kernel_basis_set, "'alard-lupton' for Alard-Lupton sigmas")
    if target_fwhm_pix is None or reference_fwhm_pix is None or not config.scale_by_fwhm:
        return tuple(config.alard_sig_gauss), int(config.kernel_size), "config"
    sigma_t = fwhm_to_sigma(check_real("target_fwhm_pix", target_fwhm_pix, positive=True))
    sigma_r = fwhm_to_sigma(check_real("reference_fwhm_pix", reference_fwhm_pix, positive=True))
    n_gauss, beta = config.alard_n_gauss, config.alard_gauss_beta
    if sigma_t == sigma_r:
        sigmas, mode = tuple(config.alard_sig_gauss), "config"
    elif sigma_r > sigma_t:
        sigmas = _sigma_series(sigma_r, sigma_t, config.alard_min_sig, n_gauss, beta)
        mode = "convolution"
    else:
        sigmas = _sigma_series(sigma_t, sigma_r, config.alard_min_sig_deconv, n_gauss, beta)
        mode = "deconvolution"
    return sigmas, _clamped_kernel_width(config, sigmas[-1]), mode


# --------------------------------------------------------------------------
# Alard-Lupton basis (reference sections 2.2, 2.3)
# --------------------------------------------------------------------------

def _monomial_exponents(degree):
    """Exponents ``(px, py)`` of the afw 2-D polynomial terms up to ``degree``.

    Order: 1, x, y, x^2, xy, y^2, x^3, x^2 y, ... (total degree ascending,
    power of x descending within a degree).
    """
    pairs = [(total - py, py) for total in range(degree + 1) for py in range(total + 1)]
    return np.array(pairs, dtype=np.int64).reshape(-1, 2)


def _check_al_arguments(half_width, sigmas, degrees):
    half_width = check_int("half_width", half_width, 1)
    sigmas = tuple(check_real("sigmas", s, positive=True) for s in _as_tuple(sigmas))
    degrees = _as_tuple(degrees)
    if any(not is_int(d) or d < 0 for d in degrees):
        fail("degrees", degrees, "non-negative integers")
    if not sigmas or len(sigmas) != len(degrees):
        msg = (f"sigmas and degrees must be non-empty and of equal length, got "
               f"{len(sigmas)} sigmas and {len(degrees)} degrees")
        raise ConfigurationError(msg)
    return half_width, sigmas, degrees


def make_alard_lupton_basis(half_width, sigmas, degrees):
    """Build the renormalised Alard-Lupton basis (Gaussians times monomials).

    For each Gaussian ``g`` (width ``sigmas[g]``, degree ``degrees[g]``) and
    each afw monomial :math:`P_n` of total degree at most ``degrees[g]``
    (order 1, x, y, x², xy, y², x³, x²y, xy², y³, ...), the raw kernel is

    .. math::

        k(u, v) = \\frac{G_g(u, v)}{\\sum G_g} P_n(u/h, v/h), \\qquad
        G_g(u, v) = \\exp\\left(-\\frac{u^2 + v^2}{2\\sigma_g^2}\\right),

    sampled at integer offsets :math:`u, v \\in [-h, h]`.  Kernels are listed
    Gaussian by Gaussian and then renormalised as
    :func:`renormalize_kernel_list` does (reference sections 2.2-2.3); they
    are built from their separable form (:func:`alard_lupton_form`), as the
    GPU builds them, so that both hold the same basis bit for bit.

    Parameters
    ----------
    half_width : int
        Kernel half width ``h`` (px, >= 1); kernels are ``2h+1`` square.
    sigmas : sequence of float
        Gaussian standard deviations (px), > 0.
    degrees : sequence of int
        Maximum total polynomial degree for each Gaussian, >= 0.

    Returns
    -------
    kernels : ndarray of shape (n_basis, 2h+1, 2h+1)
        float64 basis, ``kernels[k, row, col]`` with ``row = v + h`` and
        ``col = u + h``; ``n_basis = sum((d+1)(d+2)/2)``.  ``kernels[0]`` sums
        to 1, the others sum to 0 (or are odd) and have unit L2 norm.

    Raises
    ------
    ConfigurationError
        If ``half_width`` is not a positive integer, a sigma is not positive,
        a degree is negative, or ``sigmas`` and ``degrees`` differ in length.

    Examples
    --------
    >>> make_alard_lupton_basis(10, (0.7, 1.5, 3.0), (4, 2, 2)).shape
    (27, 21, 21)
    """
    return alard_lupton_form(half_width, sigmas, degrees).kernels_in(np)


def alard_lupton_form(half_width, sigmas, degrees):
    """The :class:`SeparableBasis` of :func:`make_alard_lupton_basis` (same arguments), read-only.

    The 2-D Gaussian is the product of two 1-D Gaussians, each normalised to
    unit sum, and every monomial ``x^px y^py`` the product of its two powers:
    raw kernel ``m`` is ``outer(G (y/h)^py, G (x/h)^px)``, and the
    renormalisation (:func:`renormalization_mixing` of the raw kernels) mixes
    each with the first only.

    Raises
    ------
    ConfigurationError
        As :func:`make_alard_lupton_basis`.
    """
    half_width, sigmas, degrees = _check_al_arguments(half_width, sigmas, degrees)
    offsets = np.arange(-half_width, half_width + 1, dtype=np.float64)
    profiles, pairs = [], []
    for sigma, degree in zip(sigmas, degrees):
        base = len(profiles)
        gauss = np.exp(-0.5 * (offsets / sigma) ** 2)
        gauss /= gauss.sum()
        profiles.extend(gauss * (offsets / half_width) ** power for power in range(degree + 1))
        pairs.extend((base + py, base + px) for px, py in _monomial_exponents(degree))
    profiles, pairs = np.array(profiles), np.array(pairs, dtype=np.int64).reshape(-1, 2)
    raw = profiles[pairs[:, 0], :, None] * profiles[pairs[:, 1], None, :]
    form = SeparableBasis(profiles, pairs, renormalization_mixing(raw))
    for array in (profiles, pairs, form.mixing):
        array.flags.writeable = False
    return form


def renormalize_kernel_list(kernels):
    """Renormalise a basis as ``ip_diffim`` does (not a Gram-Schmidt step).

    * :math:`B_0 = k_0 / \\sum k_0` (unit sum, not unit norm).
    * For :math:`i \\ge 1`, with :math:`s_i = \\sum k_i`: if
      :math:`|s_i| >` FLT_EPSILON (1.1920929e-07, single-precision epsilon),
      :math:`k_i \\leftarrow k_i / s_i - B_0`, which now sums to zero; odd
      kernels (sum about 0) are left unshifted.  Then
      :math:`B_i = k_i / \\sqrt{\\sum k_i^2}` (unit L2 norm).

    The kernel sum of :math:`\\sum_i a_i B_i` is therefore :math:`a_0`.  The
    result is not orthogonal.  Also used for PCA bases.

    Parameters
    ----------
    kernels : array_like of shape (n, H, W)
        Kernel images; not modified.

    Returns
    -------
    ndarray of shape (n, H, W)
        New float64 array with the renormalised kernels.

    Raises
    ------
    ShapeError
        If ``kernels`` is not a non-empty 3-D array.
    ConfigurationError
        If the first kernel sums to zero or a later kernel is identically zero
        after the shift (it cannot be normalised).  ``ip_diffim`` would produce
        NaN kernels here instead.
    """
    kernels = np.asarray(kernels, dtype=np.float64)
    mixing = renormalization_mixing(kernels)
    return (mixing @ kernels.reshape(len(kernels), -1)).reshape(kernels.shape)


def renormalization_mixing(kernels):
    """Matrix ``L`` with ``renormalize_kernel_list(k) = L @ k`` (kernels flattened).

    Parameters
    ----------
    kernels : array_like of shape (n, H, W)

    Returns
    -------
    ndarray of shape (n, n)

    Raises
    ------
    ShapeError, ConfigurationError
        As :func:`renormalize_kernel_list`.
    """
    kernels = np.asarray(kernels, dtype=np.float64)
    if kernels.ndim != 3 or kernels.shape[0] == 0:
        msg = f"kernels must be a non-empty array of shape (n, H, W), got shape {kernels.shape}"
        raise ShapeError(msg)
    flat = kernels.reshape(len(kernels), -1)
    mixing = np.eye(len(kernels))
    first_sum = flat[0].sum()
    if first_sum == 0 or not np.isfinite(first_sum):
        fail("kernels[0] sum", float(first_sum), "a finite non-zero sum")
    mixing[0] /= first_sum
    sums = flat[1:].sum(axis=1)
    shift = np.abs(sums) > _SUM_EPSILON
    mixing[1:][shift] = mixing[1:][shift] / sums[shift, None] - mixing[0]
    norms = np.sqrt(((mixing[1:] @ flat) ** 2).sum(axis=1))
    bad = np.flatnonzero(~(norms > 0) | ~np.isfinite(norms))
    if bad.size:
        msg = (f"basis kernel(s) {(bad + 1).tolist()} have zero or non-finite L2 norm "
               f"after renormalisation (e.g. a Gaussian too narrow for the pixel grid)")
        raise ConfigurationError(msg)
    mixing[1:] /= norms[:, None]
    return mixing


# --------------------------------------------------------------------------
# Delta-function basis (reference section 2.4)
# --------------------------------------------------------------------------

def make_delta_function_basis(width, height):
    """Build the delta-function basis: one kernel per pixel.

    Parameters
    ----------
    width, height : int
        Kernel size (px), >= 1.

    Returns
    -------
    kernels : ndarray of shape (width * height, height, width)
        float64; kernel ``k = row * width + col`` (row-major) is 1 at
        ``[row, col]`` and 0 elsewhere.

    Raises
    ------
    ConfigurationError
        If ``width`` or ``height`` is not a positive integer.

    Examples
    --------
    >>> basis = make_delta_function_basis(3, 2)
    >>> basis.shape, float(basis[4, 1, 1])
    ((6, 2, 3), 1.0)
    """
    width = check_int("width", width, 1)
    height = check_int("height", height, 1)
    n = width * height
    return np.eye(n, dtype=np.float64).reshape(n, height, width)


# --------------------------------------------------------------------------
# Regularisation matrix (reference section 2.5)
# --------------------------------------------------------------------------

def _f32(value):
    """Round a value to single precision, returned as a float64 (parity with C++ floats)."""
    return float(np.float32(value))


def _central_stencil(stencil):
    """3x3 Laplacian weights ``[dy + 1, dx + 1]``, rounded to float32."""
    if stencil == 5:
        weights = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], dtype=np.float64)
    else:
        weights = np.array([[1, 4, 1], [4, -20, 4], [1, 4, 1]], dtype=np.float64) / 6.0
    return weights.astype(np.float32).astype(np.float64)


def _forward_coefficients(penalty):
    """Forward-difference coefficient rows ``c[order]``, order 0 = border penalty."""
    rows = ([penalty], [-1.0, 1.0], [-1.0, 2.0, -1.0], [-1.0, 3.0, -3.0, 1.0])
    return [np.array(r, dtype=np.float32).astype(np.float64) for r in rows]


def _central_difference_triplets(width, height, stencil, penalty):
    """COO triplets of B for the central-difference (Laplacian) penalty.

    Interior pixels get the 3x3 stencil centred on themselves; pixels on the
    kernel border get only the diagonal ``penalty``.
    """
    n = width * height
    y, x = np.divmod(np.arange(n), width)
    interior = (x > 0) & (x < width - 1) & (y > 0) & (y < height - 1)
    border = np.flatnonzero(~interior)
    inner = np.flatnonzero(interior)
    rows, cols, vals = [border], [border], [np.full(border.size, _f32(penalty))]
    for (iy, ix), weight in np.ndenumerate(_central_stencil(stencil)):
        if weight != 0:
            rows.append(inner)
            cols.append(inner + (iy - 1) * width + (ix - 1))
            vals.append(np.full(inner.size, weight))
    return rows, cols, vals


def _forward_difference_triplets(width, height, orders, penalty):
    """COO triplets of B = sum over orders of (Bx + By) (duplicates add up).

    Row ``i`` of the order-``o`` matrix along one axis holds ``c[o']`` at
    ``i, i + stride, ...`` with ``o' = min(o, distance to the right or top
    edge)``; ``c[0]`` is the border penalty on the diagonal.
    """
    coeffs = _forward_coefficients(penalty)
    pixel = np.arange(width * height)
    y, x = np.divmod(pixel, width)
    axes = ((1, width - 1 - x), (width, height - 1 - y))   # (stride, distance to edge)
    rows, cols, vals = [], [], []
    for order in orders:
        for stride, distance in axes:
            used = np.minimum(distance, order)
            for o_eff in range(order + 1):
                sel = pixel[used == o_eff]
                for j, c in enumerate(coeffs[o_eff]):
                    rows.append(sel)
                    cols.append(sel + j * stride)
                    vals.append(np.full(sel.size, c))
    return rows, cols, vals


def _check_regularization_arguments(width, height, regularization_type, stencil, orders,
                                    border_penalty):
    width = check_int("width", width, 1)
    height = check_int("height", height, 1)
    if regularization_type not in REGULARIZATION_TYPES:
        fail("regularization_type", regularization_type, f"one of {REGULARIZATION_TYPES}")
    if not is_int(stencil) or stencil not in CENTRAL_STENCILS:
        fail("stencil", stencil, f"one of {CENTRAL_STENCILS}")
    if isinstance(orders, (str, bytes)) or not hasattr(orders, "__iter__"):
        fail("orders", orders, "a sequence of integers in 1..3")
    orders = tuple(orders)
    if not orders or any(not is_int(o) or o not in FORWARD_ORDERS for o in orders):
        fail("orders", orders, "a non-empty sequence of integers in 1..3")
    border_penalty = check_real("border_penalty", border_penalty, minimum=0.0)
    return width, height, tuple(int(o) for o in orders), border_penalty


def regularization_matrix(width, height, *, regularization_type, stencil=9, orders=(1, 2),
                          border_penalty=3.0, fit_for_background=False):
    """Regularisation matrix :math:`H = B^T B` of a delta-function kernel.

    ``B`` maps the ``N = width * height`` kernel pixels (row-major, index
    ``i = row * width + col``) to finite differences that the fit penalises
    with :math:`\\lambda a^T H a` (reference section 2.5, [3]_):

    * ``"centralDifference"``: row ``i`` of ``B`` is the 3x3 Laplacian stencil
      centred on pixel ``i``, either the 5-point ``[0 1 0; 1 -4 1; 0 1 0]`` or
      the 9-point ``[1 4 1; 4 -20 4; 1 4 1] / 6``.  Pixels on the kernel
      border get only ``B[i, i] = border_penalty``.
    * ``"forwardDifference"``: ``B = sum over orders of (Bx + By)``.  Row ``i``
      of the order-``o`` matrix along x (stride 1) or y (stride ``width``)
      holds ``c[o']`` at ``i, i + stride, ...`` where ``o'`` is ``o`` reduced
      to the distance to the right (x) or top (y) edge, and ``c[0] =
      [border_penalty]``, ``c[1] = [-1, 1]``, ``c[2] = [-1, 2, -1]``,
      ``c[3] = [-1, 3, -3, 1]``.  Nothing tapers toward the left or bottom.

    As in ``ip_diffim``, stencil weights and the border penalty are rounded to
    single precision (so the 9-point weights are ``float32(1/6)``, ...) before
    ``B`` and ``H`` are formed in double precision.

    Parameters
    ----------
    width, height : int
        Kernel size (px), >= 1.
    regularization_type : {"centralDifference", "forwardDifference"}
        Kind of finite difference.
    stencil : {9, 5}, optional
        Central-difference stencil; checked even when unused.
    orders : sequence of int, optional
        Forward-difference orders, each in 1..3; checked even when unused.
    border_penalty : float, optional
        Diagonal penalty (>= 0) of border pixels (central) or of pixels on the
        right/top edge (forward).
    fit_for_background : bool, optional
        Append a zero last row and column for the background term, which is
        never penalised.

    Returns
    -------
    H : ndarray of shape (N, N) or (N + 1, N + 1)
        Symmetric positive semi-definite float64 matrix.

    Raises
    ------
    ConfigurationError
        On an unknown type, a stencil other than 5 or 9, an order outside
        1..3 (or no order), a negative or non-finite penalty, or a
        non-positive size.

    Examples
    --------
    >>> H = regularization_matrix(3, 3, regularization_type="centralDifference", stencil=5,
    ...                           border_penalty=0.0)
    >>> H.shape, float(H[4, 4]), float(H[1, 4])
    ((9, 9), 16.0, -4.0)
    """
    width, height, orders, border_penalty = _check_regularization_arguments(
        width, height, regularization_type, stencil, orders, border_penalty)
    if regularization_type == "centralDifference":
        rows, cols, vals = _central_difference_triplets(width, height, stencil, border_penalty)
    else:
        rows, cols, vals = _forward_difference_triplets(width, height, orders, border_penalty)
    n = width * height
    b_mat = sparse.coo_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n)
    ).tocsr()
    h_dense = (b_mat.T @ b_mat).toarray()
    if fit_for_background:
        h_dense = np.pad(h_dense, ((0, 1), (0, 1)))
    return h_dense


def make_regularization_matrix(config, width, height):
    """Regularisation matrix for a delta-function kernel, from a config.

    Calls :func:`regularization_matrix` with ``config.regularization_type``,
    ``config.central_regularization_stencil``,
    ``config.forward_regularization_orders``,
    ``config.regularization_border_penalty`` and
    ``config.fit_for_background``.

    Parameters
    ----------
    config : PsfMatchConfig
        Configuration supplying the regularisation fields.
    width, height : int
        Kernel size (px); usually ``config.kernel_size`` both.

    Returns
    -------
    H : ndarray of shape (N, N) or (N + 1, N + 1)
        ``N = width * height``; the extra zero row and column (last) are
        present when ``config.fit_for_background``.

    Raises
    ------
    ConfigurationError
        If a regularisation field or the size is invalid.
    """
    return regularization_matrix(
        width, height,
        regularization_type=config.regularization_type,
        stencil=config.central_regularization_stencil,
        orders=config.forward_regularization_orders,
        border_penalty=config.regularization_border_penalty,
        fit_for_background=config.fit_for_background,
    )


# --------------------------------------------------------------------------
# KernelBasis container and the config-driven factory
# --------------------------------------------------------------------------

def _n_polynomial_terms(degree):
    return (degree + 1) * (degree + 2) // 2


@dataclass(frozen=True, eq=False)
class KernelBasis:
    """An immutable set of basis kernels and how it was chosen.

    Equality is identity (``eq=False``): the kernels are an array.

    Attributes
    ----------
    kernels : ndarray of shape (n_basis, width, width)
        Read-only float64 copy of the kernels, ``kernels[k, row, col]`` with
        ``row = v + half_width`` and ``col = u + half_width``; width odd.
    kind : {"alard-lupton", "delta-function", "pca"}
        Basis family.
    sigmas : tuple of float
        Alard-Lupton Gaussian sigmas (px); empty for other kinds.
    degrees : tuple of int
        Alard-Lupton polynomial degrees; empty for other kinds.
    mode : str
        How the Alard-Lupton sigmas were chosen ("config", "convolution",
        "deconvolution"); "config" for the other kinds by default.
    separable : SeparableBasis or None
        The separable form the kernels were made from (Alard-Lupton, by
        :func:`make_kernel_basis`: the kernels are its ``kernels_in(np)``);
        None where unknown (:func:`separable_form` then rebuilds and checks it).

    Raises
    ------
    ShapeError
        If ``kernels`` is not a non-empty ``(n, w, w)`` array with odd ``w``, an
        Alard-Lupton basis has the wrong number of kernels, or ``separable``
        does not fit the kernels (or the basis is not Alard-Lupton).
    ConfigurationError
        If ``kind`` or an Alard-Lupton ``mode`` is unknown, or ``sigmas`` and
        ``degrees`` differ in length.
    """

    kernels: np.ndarray = field(repr=False)
    kind: str
    sigmas: tuple = ()
    degrees: tuple = ()
    mode: str = "config"
    separable: object = field(default=None, repr=False)

    def __post_init__(self):
        kernels = np.array(self.kernels, dtype=np.float64, copy=True, order="C")
        if kernels.ndim != 3 or kernels.shape[0] == 0 or kernels.shape[1] != kernels.shape[2] \
                or kernels.shape[1] % 2 == 0:
            msg = f"kernels must have shape (n, w, w) with n >= 1 and w odd, got {kernels.shape}"
            raise ShapeError(msg)
        kernels.flags.writeable = False
        object.__setattr__(self, "kernels", kernels)
        object.__setattr__(self, "sigmas", tuple(float(s) for s in self.sigmas))
        object.__setattr__(self, "degrees", tuple(int(d) for d in self.degrees))
        if self.kind not in BASIS_KINDS:
            fail("kind", self.kind, f"one of {BASIS_KINDS}")
        if self.kind == "alard-lupton":
            self._check_alard_lupton()
        if self.separable is not None and (self.kind != "alard-lupton" or len(self.separable.mixing) != len(kernels)
                                           or self.separable.profiles.shape[1] != kernels.shape[2]):
            msg = (f"a separable form of {len(self.separable.mixing)} kernels of width "
                   f"{self.separable.profiles.shape[1]} for a {self.kind} basis of shape {kernels.shape}")
            raise ShapeError(msg)

    def _check_alard_lupton(self):
        if self.mode not in AL_MODES:
            fail("mode", self.mode, f"one of {AL_MODES}")
        if len(self.sigmas) != len(self.degrees):
            fail("sigmas", self.sigmas, f"one sigma per degree in {self.degrees}")
        expected = sum(_n_polynomial_terms(d) for d in self.degrees)
        if expected != self.n_basis:
            msg = f"degrees {self.degrees} imply {expected} kernels, got {self.n_basis}"
            raise ShapeError(msg)

    @property
    def n_basis(self):
        """Number of basis kernels."""
        return self.kernels.shape[0]

    @property
    def width(self):
        """Kernel width = height (px, odd)."""
        return self.kernels.shape[2]

    @property
    def half_width(self):
        """Kernel half width ``width // 2`` (px)."""
        return self.width // 2


def make_kernel_basis(config, target_fwhm_pix=None, reference_fwhm_pix=None):
    """Build the kernel basis that ``config`` asks for.

    * Alard-Lupton: sigmas, width and mode from :func:`alard_lupton_sigmas`,
      degrees ``config.alard_deg_gauss``, kernels from
      :func:`make_alard_lupton_basis`.
    * Delta-function: :func:`make_delta_function_basis` of
      ``config.kernel_size`` square; the FWHMs are ignored.

    Parameters
    ----------
    config : PsfMatchConfig
        Configuration.
    target_fwhm_pix : float, optional
        PSF FWHM (px) of the image that will be convolved.
    reference_fwhm_pix : float, optional
        PSF FWHM (px) of the image it is matched to.

    Returns
    -------
    KernelBasis
        The basis with its provenance (sigmas, degrees, mode).

    Raises
    ------
    ConfigurationError
        If a given FWHM is not a finite positive number (Alard-Lupton only).

    Examples
    --------
    >>> from gpudiffim.config import PsfMatchConfig
    >>> basis = make_kernel_basis(PsfMatchConfig())
    >>> basis.n_basis, basis.width, basis.mode
    (27, 21, 'config')
    """
    if config.kernel_basis_set == "delta-function":
        size = config.kernel_size
        basis = KernelBasis(make_delta_function_basis(size, size), kind="delta-function")
        log.info("Delta-function basis: kernel width %d px (%d kernels)", size, basis.n_basis)
        return basis
    sigmas, size, mode = alard_lupton_sigmas(config, target_fwhm_pix, reference_fwhm_pix)
    degrees = tuple(config.alard_deg_gauss)
    form = alard_lupton_form(size // 2, sigmas, degrees)
    basis = KernelBasis(form.kernels_in(np), kind="alard-lupton", sigmas=sigmas, degrees=degrees, mode=mode,
                        separable=form)
    log.info("Alard-Lupton basis: mode=%s, sigmas=%s px, degrees=%s, kernel width %d px "
             "(%d kernels)", mode, ", ".join(f"{s:.3f}" for s in sigmas), degrees, size,
             basis.n_basis)
    return basis


# --------------------------------------------------------------------------
# Separable form of the Alard-Lupton basis (fast stamp correlations on the host)
# --------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class SeparableBasis:
    """Basis kernels as mixtures of separable products (the form of an Alard-Lupton basis).

    ``kernels[k] = sum_m mixing[k, m] * outer(profiles[pairs[m, 0]], profiles[pairs[m, 1]])``:
    raw kernel ``m`` is a 1-D profile along the rows (y) times one along the
    columns (x), both from ``profiles``, and the renormalisation of
    :func:`renormalize_kernel_list` mixes them (``mixing``, mostly zeros).

    Attributes
    ----------
    profiles : ndarray of shape (P, w)
        1-D factors ``G_sigma(t) (t / h)^p`` sampled at ``t = -h .. h``
        (the Gaussian normalised to unit sum along the axis).
    pairs : ndarray of int, shape (M, 2)
        (row profile, column profile) of every raw kernel.
    mixing : ndarray of shape (K, M)
    """

    profiles: np.ndarray
    pairs: np.ndarray
    mixing: np.ndarray

    def kernels_in(self, xp):
        """The basis kernels (K, w, w), float64, built in array module ``xp`` from the factors.

        Only the profiles (P, w), the pairs (M, 2) and the mixing (K, M) are
        moved there (a few kB where the kernels are ``K w^2`` values): the
        raw kernels are the outer products of the paired profiles and the
        basis their mixture, as :func:`separable_form` rebuilds it (equal to
        the :class:`KernelBasis` kernels to 1e-12 of their largest value;
        summed in another order than :func:`make_alard_lupton_basis`).
        """
        profiles, pairs = xp.asarray(self.profiles), xp.asarray(self.pairs.astype(np.int32))
        raw = xp.take(profiles, pairs[:, 0], axis=0)[:, :, None] * xp.take(profiles, pairs[:, 1], axis=0)[:, None, :]
        width = self.profiles.shape[1]
        flat = raw.reshape(len(self.pairs), width * width)
        shifts = self.shift_form()
        if shifts is None:
            return (xp.asarray(self.mixing) @ flat).reshape(-1, width, width)
        scale, shift = xp.asarray(shifts)
        return (scale * flat + shift * flat[0]).reshape(-1, width, width)

    def shift_form(self):
        """``(2, K, 1)`` float64 ``(scale, shift)`` with ``mixing = diag(scale) + outer(shift, e_0)``, or None
        (found once: the host's and the device's kernels both ask).

        The renormalisation mixes each raw kernel only with the first one
        (:func:`renormalization_mixing`), so the mixing is its diagonal and its
        first column (``shift[0] = 0``): ``2 K`` values to move instead of ``K^2``.
        """
        return self._shift_form

    @functools.cached_property
    def _shift_form(self):
        scale = np.diagonal(self.mixing).copy()
        shift = self.mixing[:, 0].copy()
        shift[0] = 0.0
        rebuilt = np.diag(scale)
        rebuilt[:, 0] += shift
        if self.mixing.shape[0] != self.mixing.shape[1] or not np.array_equal(rebuilt, self.mixing):
            return None
        shifts = np.stack([scale, shift])[:, :, None]
        shifts.flags.writeable = False
        return shifts


def separable_form(basis):
    """The :class:`SeparableBasis` of an Alard-Lupton :class:`KernelBasis`, else None.

    The form the basis was made from (:func:`make_kernel_basis`), or else
    one rebuilt from the basis' sigmas and degrees (:func:`alard_lupton_form`)
    and checked against its kernels (to 1e-12 of their largest value; None,
    logged, if it does not hold).

    Parameters
    ----------
    basis : KernelBasis

    Returns
    -------
    SeparableBasis or None
    """
    if basis.kind != "alard-lupton" or not basis.sigmas:
        return None
    if basis.separable is not None:
        return basis.separable
    form = alard_lupton_form(basis.half_width, basis.sigmas, basis.degrees)
    error = float(np.max(np.abs(form.kernels_in(np) - basis.kernels)))
    if error > 1e-12 * float(np.max(np.abs(basis.kernels))):
        log.debug("separable form of the Alard-Lupton basis off by %.3g: not used", error)
        return None
    return form
