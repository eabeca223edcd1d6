"""Launch geometry and host wrappers of ``kernels/image_apply.cu``.

Full-image application (issue 4, kernel 5):

* :func:`accumulate_term`: ``out += (term * rows[:, None]) * cols[None, :]``,
  the accumulation step of :func:`gpudiffim.apply._weighted_correlations`
  (the correlations themselves are FFT library calls);
* :func:`spatial_powers`: the 1-D factor tables of the spatial terms, built
  where the image lives (no upload);
* :func:`spatial_terms`: every spatial term at stamp centres already where
  the stamps were cut (no upload);
* :func:`copy_edge`: the input planes and the EDGE bit within the kernel
  half-width of the border (:func:`gpudiffim.apply.convolve_masked_image`);
* :func:`or_filter_box`, :func:`or_filter_footprint` and
  :func:`propagate_mask`: the mask propagation of
  :func:`gpudiffim.apply.propagate_mask` and the box dilation of
  ``gpudiffim._ops.NUMPY.dilated_bad_pixels``.

The Lanczos-3 warp of ``kernels/warp.cu`` (:mod:`gpudiffim._cuda.warp`) shares
the grid-stride geometry of this module (:func:`grid_stride_geometry`).

NumPy arrays run through the CPU emulator, CuPy arrays through CuPy
(:func:`~gpudiffim._cuda.launch.launcher_for`); outputs are allocated in the
input's array module.  Index conventions: images are C-contiguous ``(ny, nx)``
(row ``y``, column ``x``) or stacks ``(n, ny, nx)``.
"""

import numpy as np

from .._backend import is_device_array
from ._host import check_array, int32_mask, native, on_launcher, prepare
from .launch import launch, launcher_for
from .signatures import float_ctype

__all__ = [
    "THREADS",
    "MAX_BLOCKS",
    "grid_stride_geometry",
    "accumulate_term",
    "accumulate_terms",
    "or_filter_box",
    "or_filter_footprint",
    "propagate_mask",
    "copy_edge",
    "spatial_powers",
    "spatial_terms",
    "SPATIAL_TERMS_MAX_ORDER",
]

#: Threads per block of every kernel of ``image_apply.cu`` and ``warp.cu``.
THREADS = 256

#: Most blocks of one launch per launcher.  The kernels are grid-stride
#: loops, so any grid covers the image; the emulator runs blocks one after the
#: other with one host thread per CUDA thread, so it gets few.
MAX_BLOCKS = {"cupy": 8192, "emulator": 64}


def grid_stride_geometry(n_elements, launcher):
    """``(grid, block)`` of a 1-D grid-stride launch over ``n_elements`` outputs.

    Parameters
    ----------
    n_elements : int
        Number of output elements (one loop iteration each).
    launcher : {"cupy", "emulator"}
        :func:`~gpudiffim._cuda.launch.launcher_for` of the data; fixes the
        cap on the grid (:data:`MAX_BLOCKS`).

    Returns
    -------
    grid, block : tuple of int
        ``(min(ceil(n / THREADS), MAX_BLOCKS[launcher]),)`` blocks (at least 1)
        of ``(THREADS,)`` threads.
    """
    try:
        cap = MAX_BLOCKS[launcher]
    except KeyError:
        msg = f"launcher must be 'cupy' or 'emulator', got {launcher!r}"
        raise ValueError(msg) from None
    blocks = -(-int(n_elements) // THREADS)
    return (max(1, min(blocks, cap)),), (THREADS,)


# ---------------------------------------------------------------------------
# helpers


def _stack(mask):
    """``(n, ny, nx)`` of a 2-D image or a 3-D stack."""
    if mask.ndim == 2:
        return (1, *mask.shape)
    if mask.ndim == 3:
        return mask.shape
    msg = f"mask must be 2-D (ny, nx) or 3-D (n, ny, nx), got shape {mask.shape}"
    raise ValueError(msg)


# ---------------------------------------------------------------------------
# term accumulation


def accumulate_term(out, term, rows, cols):
    """``out += (term * rows[:, None]) * cols[None, :]`` in place: :func:`accumulate_terms` of one term.

    The products and the sum are in ``out``'s dtype and in this order, so the
    result equals NumPy's ``term *= rows[:, None]; term *= cols[None, :];
    out += term`` bit for bit (:func:`gpudiffim.apply._weighted_correlations`).
    On the GPU, float32 subnormals are flushed to zero (CuPy compiles with
    ``-ftz=true``); everything else is still bit for bit.

    Parameters
    ----------
    out : ndarray of shape (ny, nx), float32 or float64
        C-contiguous accumulator, updated in place.
    term : ndarray of shape (ny, nx)
        One correlation ``image * K_t``; converted to ``out``'s dtype.
    rows : ndarray of shape (ny,)
        Spatial factor of each row (``P_t = outer(rows, cols)``); converted
        to ``out``'s dtype (as ``rows.astype(dtype)``).
    cols : ndarray of shape (nx,)
        Spatial factor of each column; converted likewise.

    Returns
    -------
    ndarray
        ``out``.

    Raises
    ------
    TypeError
        If ``out`` is not a C-contiguous float32 or float64 array.
    ValueError
        If the shapes do not match.
    """
    check_array("out", out)
    launcher, xp = on_launcher(out)
    float_ctype("out", out.dtype)        # raises the TypeError on a non-float dtype
    if out.dtype != native(out.dtype) or not out.flags.c_contiguous:
        msg = f"out must be C-contiguous and in native byte order, got dtype {out.dtype}"
        raise TypeError(msg)
    if out.ndim != 2:
        msg = f"out must be 2-D (ny, nx), got shape {out.shape}"
        raise ValueError(msg)
    ny, nx = out.shape
    if term.shape != out.shape or rows.shape != (ny,) or cols.shape != (nx,):
        msg = (f"term must have out's shape {out.shape}, rows ({ny},) and cols ({nx},); "
               f"got {term.shape}, {rows.shape} and {cols.shape}")
        raise ValueError(msg)
    return accumulate_terms(out, term[None], 0, 0, rows[None], cols[None])


def accumulate_terms(out, terms, row0, col0, rows, cols):
    """``out += sum_t (terms[t, row0:row0+ny, col0:col0+nx] * rows[t, :, None]) * cols[t, None, :]``, in place.

    One launch of ``gdi_accumulate_terms``: the same products and sums as
    ``len(terms)`` calls of :func:`accumulate_term`, in term order, bit for bit,
    reading each term in place from the uncropped stack of inverse transforms.

    Parameters
    ----------
    out : ndarray of shape (ny, nx), float32 or float64
        C-contiguous accumulator, updated in place.
    terms : ndarray of shape (n, term_rows, term_cols)
        C-contiguous stack in ``out``'s dtype (converted if not).
    row0, col0 : int
        Offset of ``out``'s pixel (0, 0) in each term.
    rows : ndarray of shape (n, ny)
    cols : ndarray of shape (n, nx)

    Returns
    -------
    ndarray
        ``out``.
    """
    check_array("out", out)
    launcher, xp = on_launcher(out)
    ctype = float_ctype("out", out.dtype)
    if out.dtype != native(out.dtype) or not out.flags.c_contiguous or out.ndim != 2:
        msg = f"out must be a 2-D C-contiguous array in native byte order, got {out.shape} {out.dtype}"
        raise TypeError(msg)
    ny, nx = out.shape
    terms = prepare(xp, terms, out.dtype, 3, "terms")
    n, term_rows, term_cols = terms.shape
    rows, cols = prepare(xp, rows, out.dtype, 2, "rows"), prepare(xp, cols, out.dtype, 2, "cols")
    if (rows.shape != (n, ny) or cols.shape != (n, nx) or not 0 <= row0 <= term_rows - ny
            or not 0 <= col0 <= term_cols - nx):
        msg = (f"terms {terms.shape} at ({row0}, {col0}), rows {rows.shape} and cols {cols.shape} do not match "
               f"out {out.shape}")
        raise ValueError(msg)
    if n:
        grid, block = grid_stride_geometry(ny * nx, launcher)
        launch(f"gdi_accumulate_terms<{ctype}>", grid, block,
               (terms, n, term_rows, term_cols, int(row0), int(col0), rows, cols, ny, nx, out))
    return out


# ---------------------------------------------------------------------------
# mask propagation


def _or_filter_1d(mask, half, axis):
    n, ny, nx = _stack(mask)
    launcher, xp = on_launcher(mask)
    out = xp.full(mask.shape, -1, dtype=np.int32)  # poisoned: every element is written by the kernel
    grid, block = grid_stride_geometry(n * ny * nx, launcher)
    launch("gdi_or_filter_1d", grid, block, (mask, n, ny, nx, int(half), int(axis), out))
    return out


def _check_half(name, value):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 0:
        msg = f"{name} must be a non-negative int, got {value!r}"
        raise ValueError(msg)
    return int(value)


def or_filter_box(mask, half_y, half_x):
    """OR every bit of ``mask`` over a ``(2 half_y + 1) x (2 half_x + 1)`` box, zeros outside.

    Two launches of ``gdi_or_filter_1d`` (along y, then along x).  Equal to
    ``scipy.ndimage.maximum_filter`` of each bit plane with ``size=(2 half_y
    + 1, 2 half_x + 1)`` and ``mode="constant"`` (per image of a stack).

    Parameters
    ----------
    mask : ndarray of int, shape (ny, nx) or (n, ny, nx)
        Bit mask (any integer or boolean dtype whose values fit in int32).
    half_y, half_x : int
        Half-widths of the box along rows (y) and columns (x); 0 leaves that
        axis alone.

    Returns
    -------
    ndarray of int32, the shape of ``mask``
        ``out[..., y, x]`` = OR of ``mask[..., y + v, x + u]`` over
        ``|v| <= half_y``, ``|u| <= half_x`` inside the image.

    Raises
    ------
    TypeError
        If ``mask`` is not an integer or boolean array.
    ValueError
        If ``mask`` is not 2-D or 3-D, a value does not fit in int32, or a
        half-width is negative.
    """
    check_array("mask", mask)
    _, xp = on_launcher(mask)
    mask = int32_mask("mask", mask, xp)
    _stack(mask)
    half_y, half_x = _check_half("half_y", half_y), _check_half("half_x", half_x)
    along_y = _or_filter_1d(mask, half_y, 0)
    return _or_filter_1d(along_y, half_x, 1)


def or_filter_footprint(mask, footprint):
    """OR every bit of ``mask`` over a footprint, through ``gdi_or_filter_footprint``.

    Parameters
    ----------
    mask : ndarray of int, shape (ny, nx) or (n, ny, nx)
        Bit mask (any integer or boolean dtype whose values fit in int32).
    footprint : array_like of bool, shape (kh, kw)
        Footprint pixels (non-zero); NumPy or in ``mask``'s array module.

    Returns
    -------
    ndarray of int32, the shape of ``mask``
        ``out[..., y, x]`` = OR of ``mask[..., y + v, x + u]`` (inside the
        image) over ``footprint[kh // 2 + v, kw // 2 + u] != 0``: the ``afw``
        correlation orientation, that of ``scipy.ndimage.maximum_filter``
        with ``origin=0``.

    Raises
    ------
    TypeError
        If ``mask`` is not an integer or boolean array.
    ValueError
        If ``mask`` is not 2-D or 3-D, a value does not fit in int32, or
        ``footprint`` is not a non-empty 2-D array.
    """
    check_array("mask", mask)
    launcher, xp = on_launcher(mask)
    mask = int32_mask("mask", mask, xp)
    n, ny, nx = _stack(mask)
    footprint = _footprint(footprint, xp)
    kh, kw = footprint.shape
    out = xp.full(mask.shape, -1, dtype=np.int32)  # poisoned: every element is written by the kernel
    grid, block = grid_stride_geometry(n * ny * nx, launcher)
    launch("gdi_or_filter_footprint", grid, block, (mask, footprint, n, ny, nx, kh, kw, out))
    return out


def _footprint(footprint, xp):
    """``footprint != 0`` as a C-contiguous int32 array of ``xp``."""
    if is_device_array(footprint) and xp is np:
        footprint = footprint.get()
    footprint = xp.asarray(footprint)
    if footprint.ndim != 2 or 0 in footprint.shape:
        msg = f"footprint must be a non-empty 2-D array, got shape {footprint.shape}"
        raise ValueError(msg)
    return xp.ascontiguousarray(footprint != 0, dtype=np.int32)


def propagate_mask(mask, footprint):
    """:func:`gpudiffim.apply.propagate_mask` through the ``image_apply`` kernels.

    A footprint that is a full box of odd sides ``(2 hy + 1, 2 hx + 1)`` takes
    two 1-D passes (:func:`or_filter_box`); any other footprint (irregular,
    or a full box with an even side) takes :func:`or_filter_footprint`.

    Parameters
    ----------
    mask : ndarray of int, shape (M, N)
        Bit mask (any integer or boolean dtype whose values fit in int32); a
        stack (n, M, N) is filtered image by image.
    footprint : array_like of bool, shape (kh, kw)
        Kernel pixels that are non-zero (NumPy or ``mask``'s array module).

    Returns
    -------
    ndarray of int32, shape (M, N)
        A new array: output pixel ``(x, y)`` carries bit ``b`` when some input
        pixel ``(x + u, y + v)`` with ``footprint[kh // 2 + v, kw // 2 + u]``
        carries it.  All 32 bits are propagated; for non-negative masks this
        equals :func:`gpudiffim.apply.propagate_mask`.

    Raises
    ------
    TypeError
        If ``mask`` is not an integer or boolean array.
    ValueError
        If ``mask`` is not 2-D or 3-D, a value does not fit in int32, or the
        footprint is empty or all zero (``scipy.ndimage`` rejects an all-zero
        footprint too).
    """
    check_array("mask", mask)
    footprint_host = np.asarray(footprint.get() if is_device_array(footprint) else footprint)
    if footprint_host.ndim != 2 or 0 in footprint_host.shape:
        msg = f"footprint must be a non-empty 2-D array, got shape {footprint_host.shape}"
        raise ValueError(msg)
    if not footprint_host.any():
        msg = "footprint is all zero: no pixel would propagate"
        raise ValueError(msg)
    kh, kw = footprint_host.shape
    if footprint_host.all() and kh % 2 == 1 and kw % 2 == 1:
        return or_filter_box(mask, kh // 2, kw // 2)
    return or_filter_footprint(mask, footprint_host)


# ---------------------------------------------------------------------------
# border


def copy_edge(inputs, half_y, half_x, edge_bit, outputs):
    """Within ``half_y`` rows and ``half_x`` columns of the border: input image and variance, mask | input | EDGE.

    One launch of ``gdi_copy_edge`` over the border pixels only (the four
    strips of ``gpudiffim._ops.NumpyOperations.copy_edge``), in place.

    Parameters
    ----------
    inputs : tuple of ndarray
        ``(image, variance, mask)`` of the input, shape (ny, nx); image and
        variance are converted to the outputs' dtype, the mask to int32.
    half_y, half_x : int
        Border widths (the kernel's half-height and half-width); wider than
        the image, the whole image is border.
    edge_bit : int
        Bit value ORed into the output mask on the border.
    outputs : tuple of ndarray
        ``(image, variance, mask)``: C-contiguous float32 or float64 planes
        of one dtype and an int32 mask, shape (ny, nx), updated in place.

    Returns
    -------
    tuple of ndarray
        ``outputs``.

    Raises
    ------
    TypeError
        If an output plane is not C-contiguous of the stated dtypes.
    ValueError
        If the shapes differ or a width is negative.
    """
    image, variance, mask = outputs
    for name, plane in (("image", image), ("variance", variance), ("mask", mask)):
        check_array(name, plane)
    launcher, xp = on_launcher(image)
    ctype = float_ctype("image", image.dtype)
    if (variance.dtype != image.dtype or mask.dtype != np.int32
            or not all(p.flags.c_contiguous for p in outputs)):
        msg = (f"outputs must be C-contiguous image and variance of one float dtype and an int32 mask, got "
               f"{image.dtype}, {variance.dtype}, {mask.dtype}")
        raise TypeError(msg)
    if image.ndim != 2 or any(p.shape != image.shape for p in (*inputs, *outputs)):
        msg = f"every plane must have the shape {image.shape} (2-D), got {[p.shape for p in (*inputs, *outputs)]}"
        raise ValueError(msg)
    ny, nx = image.shape
    hy, hx = min(_check_half("half_y", half_y), ny), min(_check_half("half_x", half_x), nx)
    in_image = prepare(xp, inputs[0], image.dtype, 2, "input image")
    in_variance = prepare(xp, inputs[1], image.dtype, 2, "input variance")
    in_mask = int32_mask("input mask", inputs[2], xp)
    bottom, right = min(hy, ny - hy), min(hx, nx - hx)      # rows and columns not already in a strip
    n_border = (hy + bottom) * nx + (ny - hy - bottom) * (hx + right)
    if n_border:
        grid, block = grid_stride_geometry(n_border, launcher)
        launch(f"gdi_copy_edge<{ctype}>", grid, block,
               (in_image, in_variance, in_mask, ny, nx, hy, hx, int(edge_bit), image, variance, mask))
    return outputs


# ---------------------------------------------------------------------------
# spatial factors


def spatial_powers(xp, first, n, order, scaling, dtype):
    """Powers ``0..order`` of a spatial function's 1-D factor at ``first + arange(n)``: ``gdi_spatial_powers``.

    Parameters
    ----------
    xp : module
        Array module of the output (CuPy: built on the GPU; NumPy: the emulator).
    first : int
        Parent coordinate of the first sample (pixel centres, one per pixel).
    n : int
        Number of samples.
    order : int
        Highest power.
    scaling : tuple of float or None
        ``(mid, width)`` of the Chebyshev scaling ``t' = 2 (t - mid) / width``
        (:meth:`gpudiffim.spatial.SpatialFunction.axis_scaling`), or None for
        monomials of the raw coordinate.
    dtype : {numpy.float32, numpy.float64}
        Output dtype (each value computed in float64, then rounded).

    Returns
    -------
    ndarray of shape (order + 1, n)
        :meth:`~gpudiffim.spatial.SpatialFunction.axis_powers` rounded to
        ``dtype``: equal bit for bit for Chebyshev tables and powers up to 2;
        higher monomial powers go through ``pow``.
    """
    dtype = np.dtype(dtype)
    ctype = float_ctype("dtype", dtype)
    out = xp.empty((int(order) + 1, int(n)), dtype=dtype)
    if n:
        mid, width = (0.0, 1.0) if scaling is None else scaling
        grid, block = grid_stride_geometry(n, launcher_for(out))
        launch(f"gdi_spatial_powers<{ctype}>", grid, block,
               (int(n), float(first), int(scaling is not None), float(mid), float(width), int(order), out))
    return out


#: Highest order of :func:`spatial_terms` (``GDI_SPATIAL_TERMS_MAX_ORDER`` of ``image_apply.cu``).
SPATIAL_TERMS_MAX_ORDER = 15


def spatial_terms(centres_rc, origin, order, scalings):
    """Every spatial term at integer stamp centres: ``gdi_spatial_terms`` (one launch, nothing uploaded).

    Parameters
    ----------
    centres_rc : ndarray of int32, shape (n, 2)
        ``(row, column)`` centres relative to the image's first pixel, in the
        output's array module (CuPy: on the GPU; NumPy: the emulator).
    origin : tuple of int
        Parent ``(x0, y0)`` of the image's first pixel: the terms are taken
        at ``x = x0 + column``, ``y = y0 + row``.
    order : int
        Total degree, ``0 <= order <=`` :data:`SPATIAL_TERMS_MAX_ORDER`.
    scalings : tuple or None
        ``((mid_x, width_x), (mid_y, width_y))`` of the Chebyshev scaling
        ``t' = 2 (t - mid) / width`` along x and y
        (:meth:`gpudiffim.spatial.SpatialFunction.axis_scaling`), or None for
        monomials of the raw coordinates.

    Returns
    -------
    ndarray of float64, shape (n, (order + 1)(order + 2) / 2)
        :meth:`~gpudiffim.spatial.SpatialFunction.terms` at those positions,
        in afw's term order: bit for bit for Chebyshev terms and monomials up
        to degree 2 per axis; higher monomial powers go through ``pow``.
    """
    _, xp = on_launcher(centres_rc)
    centres_rc = prepare(xp, centres_rc, np.int32, 2, "centres_rc")
    if centres_rc.shape[1:] != (2,) or not 0 <= order <= SPATIAL_TERMS_MAX_ORDER:
        msg = (f"spatial_terms takes (n, 2) centres and 0 <= order <= {SPATIAL_TERMS_MAX_ORDER}, "
               f"got {centres_rc.shape} and {order}")
        raise ValueError(msg)
    n = len(centres_rc)
    out = xp.empty((n, (order + 1) * (order + 2) // 2))
    if n:
        (mid_x, width_x), (mid_y, width_y) = ((0.0, 1.0), (0.0, 1.0)) if scalings is None else scalings
        grid, block = grid_stride_geometry(n, launcher_for(out))
        launch("gdi_spatial_terms", grid, block,
               (centres_rc, n, int(origin[0]), int(origin[1]), int(scalings is not None), float(mid_x),
                float(width_x), float(mid_y), float(width_y), int(order), out))
    return out
