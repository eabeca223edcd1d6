"""Launch geometry and host wrappers of ``kernels/stamp_fit.cu``.

Issue 4's kernels 1 and 2 and issue 17's stamp glue, each the kernel-path twin of a NumPy reference:

=====================================  ===========================================================
wrapper                                NumPy reference
=====================================  ===========================================================
:func:`correlate_stamps`               :func:`gpudiffim.convolve.correlate_stamps` (and
                                       ``correlate_stamps_each`` with ``per_stamp=True``)
:func:`normal_equations`               ``gpudiffim._ops.NUMPY.stamp_normal_equations``
                                       (ones column appended when ``with_background``)
:func:`cut_stamps`                     ``gpudiffim.cutouts.cut_planes`` of one image's planes
                                       (image and variance as float64, mask as int32)
:func:`constant_weights`               ``gpudiffim._ops.NUMPY.constant_weights`` (one weight
                                       per stamp from the median variance)
=====================================  ===========================================================

Every wrapper takes NumPy arrays (run by the CPU emulator) or CuPy arrays
(run on the GPU), as :func:`~gpudiffim._cuda.launch.launcher_for` says; the
outputs are allocated in the inputs' array module, with ``empty`` (every
element is written by the kernel).  Inputs are converted to C-contiguous
arrays of the kernel's dtype (float32 stays float32, anything else becomes
float64; native byte order) before the launch.
"""

import numpy as np

from ._host import centres_in, float_dtype, on_launcher, output, prepare
from .launch import launch
from .signatures import ctype_of

__all__ = [
    "CORRELATE_MAX_TAPS",
    "CORRELATE_THREADS",
    "NORMAL_EQUATIONS_SHARED_DOUBLES",
    "NORMAL_EQUATIONS_THREADS",
    "STAMP_FIT_DEFINES",
    "CUT_THREADS",
    "CONSTANT_WEIGHTS_MAX_PIX",
    "constant_weights",
    "correlate_stamps",
    "correlate_stamps_geometry",
    "cut_stamps",
    "normal_equations",
    "normal_equations_geometry",
]

#: Threads per block of ``gdi_correlate_stamps`` (any count works).
CORRELATE_THREADS = 128
#: Kernels per block and outputs per thread of ``gdi_correlate_stamps`` (``GDI_CS_KB``, ``GDI_CS_RX``).
CORRELATE_KERNELS_PER_BLOCK = 4
CORRELATE_OUTPUTS_PER_THREAD = 4
#: Most kernel taps ``kh * kw`` staged in shared memory (``GDI_CS_MAX_TAPS`` in the source).
CORRELATE_MAX_TAPS = 4096
#: Threads per block of ``gdi_normal_equations``.
NORMAL_EQUATIONS_THREADS = 256
#: Doubles of the pixel tile of ``gdi_normal_equations`` (``GDI_NE_SHARED_DOUBLES``): 32 KiB.
NORMAL_EQUATIONS_SHARED_DOUBLES = 4096
#: Most pixels per stamp of ``gdi_constant_weights`` (``GDI_CW_MAX_PIX``: its sort in 32 KiB of shared memory).
CONSTANT_WEIGHTS_MAX_PIX = 4096
#: Threads per block of ``gdi_constant_weights``.
CONSTANT_WEIGHTS_THREADS = 256
#: Compile-time constants of ``kernels/stamp_fit.cu``: one tuple for its
#: kernels, so that the unit is compiled once (the module cache is keyed on it).
STAMP_FIT_DEFINES = (("GDI_CS_MAX_TAPS", CORRELATE_MAX_TAPS),
                     ("GDI_CS_KB", CORRELATE_KERNELS_PER_BLOCK),
                     ("GDI_CS_RX", CORRELATE_OUTPUTS_PER_THREAD),
                     ("GDI_NE_SHARED_DOUBLES", NORMAL_EQUATIONS_SHARED_DOUBLES),
                     ("GDI_CW_MAX_PIX", CONSTANT_WEIGHTS_MAX_PIX))

_MAX_GRID_Y = 65535


# ---------------------------------------------------------------------------
# geometry

def correlate_stamps_geometry(n_stamps, k_out, n_taps=1):
    """``(grid, block)`` of ``gdi_correlate_stamps``: block ``(c, n)`` for kernels chunk ``c`` of stamp ``n``.

    A chunk holds ``min(GDI_CS_KB, GDI_CS_MAX_TAPS // n_taps)`` kernels (the
    kernel's ``gdi_cs_kernels_per_block``); ``n_taps = kh * kw``.

    Raises
    ------
    ValueError
        If ``n_stamps`` exceeds the grid's y limit (65535).
    """
    if n_stamps > _MAX_GRID_Y:
        msg = f"gdi_correlate_stamps takes at most {_MAX_GRID_Y} stamps per launch, got {n_stamps}"
        raise ValueError(msg)
    per_block = max(1, min(CORRELATE_KERNELS_PER_BLOCK, CORRELATE_MAX_TAPS // max(int(n_taps), 1)))
    chunks = -(-max(int(k_out), 1) // per_block)
    return (chunks, max(int(n_stamps), 1)), (CORRELATE_THREADS,)


def normal_equations_geometry(n_stamps):
    """``(grid, block)`` of ``gdi_normal_equations``: one block per stamp."""
    return (max(int(n_stamps), 1),), (NORMAL_EQUATIONS_THREADS,)


# ---------------------------------------------------------------------------
# kernel 1: basis correlation of the stamps

def correlate_stamps(stamps, kernels, *, per_stamp=False, out=None):
    """Correlate stamps with kernel images, valid region only (``gdi_correlate_stamps``).

    Parameters
    ----------
    stamps : ndarray of shape (N, S_y, S_x)
        Image stamps; NumPy or CuPy.
    kernels : ndarray of shape (K, kh, kw)
        Kernel images in ``afw`` layout (:mod:`gpudiffim.convolve`); with
        ``per_stamp``, ``K == N``.
    per_stamp : bool
        Correlate stamp ``n`` with kernel ``n`` only (``correlate_stamps_each``)
        instead of every stamp with every kernel.
    out : ndarray of shape (N, K_out, S_y - kh + 1, S_x - kw + 1), optional
        Output buffer, C-contiguous, of the computation dtype.

    Returns
    -------
    ndarray of shape (N, K_out, S_y - kh + 1, S_x - kw + 1)
        ``K_out = 1`` with ``per_stamp``, else ``K``; float32 when both inputs
        are float32, else float64 (sums are accumulated in double)::

            out[n, k, y, x] = sum_{j,i} kernels[k', j, i] * stamps[n, y + j, x + i]

        with ``k' = n`` when ``per_stamp``, else ``k' = k``.

    Raises
    ------
    ValueError
        On inconsistent shapes, a kernel larger than the stamps, more than
        :data:`CORRELATE_MAX_TAPS` taps (use the FFT path of
        :mod:`gpudiffim.convolve` then) or a wrong ``out`` shape.
    TypeError
        From :func:`~gpudiffim._cuda.launch.launch` on a wrong ``out`` dtype or array type.
    """
    _, xp = on_launcher(stamps, kernels)
    dtype = float_dtype(stamps, kernels)
    stamps = prepare(xp, stamps, dtype, 3, "stamps")
    kernels = prepare(xp, kernels, dtype, 3, "kernels")
    n, sy, sx = stamps.shape
    n_kernels, kh, kw = kernels.shape
    if kh < 1 or kw < 1 or kh > sy or kw > sx:
        msg = f"kernels of shape ({kh}, {kw}) need 1 <= kh <= S_y and 1 <= kw <= S_x for stamps ({sy}, {sx})"
        raise ValueError(msg)
    if per_stamp and n_kernels != n:
        msg = f"per_stamp needs one kernel per stamp, got {n_kernels} kernels for {n} stamps"
        raise ValueError(msg)
    if kh * kw > CORRELATE_MAX_TAPS:
        msg = (f"kernels of {kh} x {kw} = {kh * kw} taps exceed the {CORRELATE_MAX_TAPS} taps of "
               f"gdi_correlate_stamps' shared memory; use gpudiffim.convolve.correlate_stamps (FFT)")
        raise ValueError(msg)
    k_out = 1 if per_stamp else n_kernels
    out = output(xp, out, (n, k_out, sy - kh + 1, sx - kw + 1), dtype, "out")
    if out.size:
        grid, block = correlate_stamps_geometry(n, k_out, kh * kw)
        launch(f"gdi_correlate_stamps<{ctype_of(dtype)}>", grid, block,
               (stamps, kernels, n, n_kernels, int(bool(per_stamp)), sy, sx, kh, kw, out),
               defines=STAMP_FIT_DEFINES)
    return out


# ---------------------------------------------------------------------------
# kernel 2: per-stamp normal equations

def normal_equations(columns, weights, target, with_background, *, out=None):
    """Weighted normal equations of every stamp (``gdi_normal_equations``).

    Parameters
    ----------
    columns : ndarray of shape (N, n_basis, n_pix)
        Design columns ``c_a`` of each stamp (basis correlations, flattened);
        NumPy or CuPy.
    weights : ndarray of shape (N, n_pix), or of N elements
        Pixel weights ``w`` (inverse variances), broadcast to ``target``'s
        shape; or one weight per stamp (any shape of N elements: read as is,
        no copy when C-contiguous of the computation dtype).
    target : ndarray of shape (N, n_pix)
        Pixels ``y`` fitted.
    with_background : bool or int
        Add the implicit background column ``c_{n_basis} = 1`` (never stored).
    out : tuple of two ndarrays, optional
        Buffers ``(matrix, vector)`` of shapes (N, P, P) and (N, P), float64.

    Returns
    -------
    matrix : ndarray of shape (N, P, P), float64
        ``M[n, a, b] = sum_q w[n, q] c_a[n, q] c_b[n, q]``, exactly symmetric;
        ``P = n_basis + with_background``.
    vector : ndarray of shape (N, P), float64
        ``b[n, a] = sum_q w[n, q] c_a[n, q] y[n, q]``.

    Raises
    ------
    ValueError
        On inconsistent shapes, ``P + 2`` above :data:`NORMAL_EQUATIONS_SHARED_DOUBLES`
        or wrong ``out`` shapes.

    Notes
    -----
    Sums are accumulated in double whatever the input dtype; they equal the
    NumPy products to ~1e-15 of ``|C|^T |W| |C|``.
    """
    _, xp = on_launcher(columns, weights, target)
    dtype = float_dtype(columns, weights, target)
    columns = prepare(xp, columns, dtype, 3, "columns")
    target = prepare(xp, target, dtype, 2, "target")
    n, n_basis, n_pix = columns.shape
    if target.shape != (n, n_pix):
        msg = f"target must have shape {(n, n_pix)} for columns of shape {columns.shape}, got {target.shape}"
        raise ValueError(msg)
    per_stamp = int(weights.size == n)
    weights = prepare(xp, weights, dtype, weights.ndim, "weights") if per_stamp else _pixel_weights(
        xp, weights, dtype, target.shape)
    background = int(bool(with_background))
    p = n_basis + background
    if p + 2 > NORMAL_EQUATIONS_SHARED_DOUBLES:
        msg = (f"{p} normal-equation columns exceed gdi_normal_equations' shared tile "
               f"({NORMAL_EQUATIONS_SHARED_DOUBLES} doubles hold at most {NORMAL_EQUATIONS_SHARED_DOUBLES - 2})")
        raise ValueError(msg)
    matrix, vector = (None, None) if out is None else out
    matrix = output(xp, matrix, (n, p, p), np.float64, "out[0] (matrix)")
    vector = output(xp, vector, (n, p), np.float64, "out[1] (vector)")
    if n and p:
        grid, block = normal_equations_geometry(n)
        launch(f"gdi_normal_equations<{ctype_of(dtype)}>", grid, block,
               (columns, weights, target, n, n_basis, n_pix, background, per_stamp, matrix, vector),
               defines=STAMP_FIT_DEFINES)
    return matrix, vector


def _pixel_weights(xp, weights, dtype, shape):
    """Per-pixel ``weights`` broadcast to ``shape`` (N, n_pix), C-contiguous, of ``dtype``."""
    try:
        weights = xp.broadcast_to(xp.asarray(weights, dtype=dtype), shape)
    except ValueError:
        msg = f"weights of shape {np.shape(weights)} do not broadcast to the target's {shape}"
        raise ValueError(msg) from None
    return xp.ascontiguousarray(weights)


# ---------------------------------------------------------------------------
# the stamps of a batch, cut from one image

#: Threads per block of ``gdi_cut_stamps`` (a grid-stride loop: any count works).
CUT_THREADS = 256


def cut_stamps(image, variance, mask, centres_rc, half, *, device_centres=None):
    """The ``(2 half + 1)^2`` stamps of one image's planes around each centre (``gdi_cut_stamps``).

    Parameters
    ----------
    image, variance : ndarray of shape (M, N)
        float32 or float64 (one dtype), C-contiguous.
    mask : ndarray of int32, shape (M, N)
    centres_rc : ndarray of int, shape (n, 2)
        Host ``(row, column)`` centres relative to the first pixel; every
        stamp must lie inside (checked here, on the host).
    half : int
    device_centres : ndarray of int32, shape (n, 2), optional
        ``centres_rc`` already in the planes' array module (:func:`~gpudiffim._cuda._host.centres_in`), so that the
        planes of several images are cut with one upload.

    Returns
    -------
    image, variance : ndarray of float64, shape (n, 2 half + 1, 2 half + 1)
    mask : ndarray of int32, same shape
        In the planes' array module.
    """
    _, xp = on_launcher(image, variance, mask)
    dtype = float_dtype(image, variance)
    image = prepare(xp, image, dtype, 2, "image")
    variance = prepare(xp, variance, dtype, 2, "variance")
    mask = prepare(xp, mask, np.int32, 2, "mask")
    rows, nx = image.shape
    centres_rc = np.asarray(centres_rc, dtype=np.int64).reshape(-1, 2)
    if len(centres_rc) and (centres_rc.min() < half or centres_rc[:, 0].max() >= rows - half
                            or centres_rc[:, 1].max() >= nx - half):   # the extremes first: the sizes are small
        inside = ((centres_rc >= half) & (centres_rc < np.array([rows, nx]) - half)).all(axis=1)
        msg = f"{int((~inside).sum())} stamp(s) of half-size {half} do not lie inside the {image.shape} image"
        raise ValueError(msg)
    n, size = len(centres_rc), 2 * int(half) + 1
    outputs = (xp.empty((n, size, size)), xp.empty((n, size, size)), xp.empty((n, size, size), dtype=np.int32))
    if n:
        centres = centres_in(xp, centres_rc) if device_centres is None else device_centres
        grid = (min(-(-n * size * size // CUT_THREADS), 65535),)
        launch(f"gdi_cut_stamps<{ctype_of(dtype)}>", grid, (CUT_THREADS,),
               (image, variance, mask, nx, centres, n, int(half), *outputs))
    return outputs


# ---------------------------------------------------------------------------
# one weight per stamp (constant_variance_weighting)

def constant_weights(science_variance, template_variance):
    """``1 / median(V_S + V_T)`` of every stamp, 1 where not positive, and zero codes (``gdi_constant_weights``).

    Parameters
    ----------
    science_variance, template_variance : ndarray of shape (N, S, S)
        Variance stamps (float64; converted if needed), at most
        :data:`CONSTANT_WEIGHTS_MAX_PIX` pixels each.

    Returns
    -------
    weights : ndarray of shape (N,), float64
        ``numpy.median``'s value of each stamp's sums, inverted (a NaN median gives 1).
    codes : ndarray of int32, shape (N,)
        Zeros (no stamp fails here), as ``gpudiffim.stamps`` wants them.

    Both in the inputs' array module.

    Raises
    ------
    ValueError
        On shapes that differ, no pixel, or more than :data:`CONSTANT_WEIGHTS_MAX_PIX` pixels.
    """
    _, xp = on_launcher(science_variance, template_variance)
    science_variance = prepare(xp, science_variance, np.float64, 3, "science_variance")
    template_variance = prepare(xp, template_variance, np.float64, 3, "template_variance")
    n, sy, sx = science_variance.shape
    if template_variance.shape != science_variance.shape or not 0 < sy * sx <= CONSTANT_WEIGHTS_MAX_PIX:
        msg = (f"variance stamps {science_variance.shape} and {template_variance.shape} must match and hold "
               f"1 to {CONSTANT_WEIGHTS_MAX_PIX} pixels each")
        raise ValueError(msg)
    weights, codes = xp.empty(n), xp.empty(n, dtype=np.int32)
    if n:
        launch("gdi_constant_weights", (n,), (CONSTANT_WEIGHTS_THREADS,),
               (science_variance, template_variance, n, sy * sx, np.inf, weights, codes), defines=STAMP_FIT_DEFINES)
    return weights, codes
