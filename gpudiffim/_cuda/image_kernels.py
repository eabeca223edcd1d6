"""Launch geometry and host wrappers of ``kernels/image_apply.cu`` and ``kernels/warp.cu``.

Full-image application (issue 4, kernel 5) and the Lanczos-3 warp:

* :func:`accumulate_term`: ``out += (term * rows[:, None]) * cols[None, :]``,
  the accumulation step of :func:`gpudiffim.apply._weighted_correlations`
  (the correlations themselves are FFT library calls);
* :func:`or_filter_box`, :func:`or_filter_footprint` and
  :func:`propagate_mask`: the mask propagation of
  :func:`gpudiffim.apply.propagate_mask` and the box dilation of
  :func:`gpudiffim.stamps._dilated_bad_pixels`;
* :func:`warp_resample`: the per-pixel resampling of
  :func:`gpudiffim.warp.warp_masked_image` for a given pixel mapping.

NumPy arrays run through the CPU emulator (launch backend ``"emulator"``),
CuPy arrays through CuPy (``"cupy"``); outputs are allocated in the input's
array module.  Index conventions: images are C-contiguous ``(ny, nx)`` (row
``y``, column ``x``) or stacks ``(n, ny, nx)``.
"""

import numpy as np

from .._backend import is_device_array
from .launch import launch

__all__ = [
    "THREADS",
    "MAX_BLOCKS",
    "grid_stride_geometry",
    "accumulate_term",
    "or_filter_box",
    "or_filter_footprint",
    "propagate_mask",
    "warp_resample",
]

#: Threads per block of every kernel of ``image_apply.cu`` and ``warp.cu``.
THREADS = 256

#: Most blocks of one launch per launch backend.  The kernels are grid-stride
#: loops, so any grid covers the image; the emulator runs blocks one after the
#: other with one host thread per CUDA thread, so it gets few.
MAX_BLOCKS = {"cupy": 8192, "emulator": 64}

_FLOAT_TYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}
_INT32 = np.iinfo(np.int32)


def grid_stride_geometry(n_elements, backend):
    """``(grid, block)`` of a 1-D grid-stride launch over ``n_elements`` outputs.

    Parameters
    ----------
    n_elements : int
        Number of output elements (one loop iteration each).
    backend : {"cupy", "emulator"}
        Launch backend; fixes the cap on the grid (:data:`MAX_BLOCKS`).

    Returns
    -------
    grid, block : tuple of int
        ``(min(ceil(n / THREADS), MAX_BLOCKS[backend]),)`` blocks (at least 1)
        of ``(THREADS,)`` threads.
    """
    try:
        cap = MAX_BLOCKS[backend]
    except KeyError:
        msg = f"backend must be 'cupy' or 'emulator', got {backend!r}"
        raise ValueError(msg) from None
    blocks = -(-int(n_elements) // THREADS)
    return (max(1, min(blocks, cap)),), (THREADS,)


# ---------------------------------------------------------------------------
# array-module helpers


def _module(array):
    """``(xp, default launch backend)`` of an input array: NumPy -> emulator, CuPy -> CuPy."""
    if isinstance(array, np.ndarray):
        return np, "emulator"
    if is_device_array(array):
        import cupy

        return cupy, "cupy"
    msg = f"expected a numpy.ndarray or a cupy.ndarray, got {type(array).__name__}"
    raise TypeError(msg)


def _native(dtype):
    """``dtype`` in native byte order (FITS data are big-endian)."""
    return np.dtype(dtype).newbyteorder("=")


def _float_ctype(name, array):
    ctype = _FLOAT_TYPES.get(_native(array.dtype))
    if ctype is None:
        msg = f"{name} must be float32 or float64, got {array.dtype}"
        raise TypeError(msg)
    return ctype


def _int32_mask(name, mask, xp):
    """``mask`` as a C-contiguous int32 array of ``xp``.

    Raises
    ------
    TypeError
        If ``mask`` is not boolean or integer.
    ValueError
        If a value does not fit in int32.
    """
    mask = xp.asarray(mask)
    dtype = _native(mask.dtype)
    if dtype.kind not in "biu":
        msg = f"{name} must be an integer (or boolean) array, got dtype {dtype}"
        raise TypeError(msg)
    if dtype.kind != "b" and mask.size and not np.can_cast(dtype, np.int32):
        low, high = int(mask.min()), int(mask.max())  # synchronizes! (CuPy input)
        if low < _INT32.min or high > _INT32.max:
            msg = f"{name} values must fit in int32, got the range [{low}, {high}] ({dtype})"
            raise ValueError(msg)
    return xp.ascontiguousarray(mask, dtype=np.int32)


def _int32_bits(name, value):
    value = int(value)
    if not _INT32.min <= value <= _INT32.max:
        msg = f"{name} must fit in int32, got {value}"
        raise ValueError(msg)
    return value


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


def accumulate_term(out, term, rows, cols, *, backend=None):
    """``out += (term * rows[:, None]) * cols[None, :]`` in place, through ``gdi_accumulate_term``.

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
    backend : {"cupy", "emulator"}, optional
        Default: ``"emulator"`` for NumPy arrays, ``"cupy"`` for CuPy arrays.

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
    xp, default = _module(out)
    ctype = _float_ctype("out", out)
    if out.dtype != _native(out.dtype) or not out.flags.c_contiguous:
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
    term, rows, cols = (xp.ascontiguousarray(xp.asarray(a).astype(out.dtype, copy=False))
                        for a in (term, rows, cols))
    backend = default if backend is None else backend
    grid, block = grid_stride_geometry(ny * nx, backend)
    launch(f"gdi_accumulate_term<{ctype}>", grid, block, (term, rows, cols, ny, nx, out), backend=backend)
    return out


# ---------------------------------------------------------------------------
# mask propagation


def _or_filter_1d(mask, half, axis, backend):
    n, ny, nx = _stack(mask)
    out = _alloc_int(mask.shape, mask)
    grid, block = grid_stride_geometry(n * ny * nx, backend)
    launch("gdi_or_filter_1d", grid, block, (mask, n, ny, nx, int(half), int(axis), out), backend=backend)
    return out


def _alloc_int(shape, like):
    """int32 output poisoned with -1 (every element is written by the kernel)."""
    xp, _ = _module(like)
    return xp.full(shape, -1, dtype=np.int32)


def _check_half(name, value):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 0:
        msg = f"{name} must be a non-negative int, got {value!r}"
        raise ValueError(msg)
    return int(value)


def or_filter_box(mask, half_y, half_x, *, backend=None):
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
    backend : {"cupy", "emulator"}, optional
        Default: ``"emulator"`` for NumPy arrays, ``"cupy"`` for CuPy arrays.

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
    xp, default = _module(mask)
    mask = _int32_mask("mask", mask, xp)
    _stack(mask)
    half_y, half_x = _check_half("half_y", half_y), _check_half("half_x", half_x)
    backend = default if backend is None else backend
    along_y = _or_filter_1d(mask, half_y, 0, backend)
    return _or_filter_1d(along_y, half_x, 1, backend)


def or_filter_footprint(mask, footprint, *, backend=None):
    """OR every bit of ``mask`` over a footprint, through ``gdi_or_filter_footprint``.

    Parameters
    ----------
    mask : ndarray of int, shape (ny, nx) or (n, ny, nx)
        Bit mask (any integer or boolean dtype whose values fit in int32).
    footprint : array_like of bool, shape (kh, kw)
        Footprint pixels (non-zero); NumPy or in ``mask``'s array module.
    backend : {"cupy", "emulator"}, optional
        Default: ``"emulator"`` for NumPy arrays, ``"cupy"`` for CuPy arrays.

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
    xp, default = _module(mask)
    mask = _int32_mask("mask", mask, xp)
    n, ny, nx = _stack(mask)
    footprint = _footprint(footprint, xp)
    kh, kw = footprint.shape
    backend = default if backend is None else backend
    out = _alloc_int(mask.shape, mask)
    grid, block = grid_stride_geometry(n * ny * nx, backend)
    launch("gdi_or_filter_footprint", grid, block, (mask, footprint, n, ny, nx, kh, kw, out), backend=backend)
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


def propagate_mask(mask, footprint, *, backend=None):
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
    backend : {"cupy", "emulator"}, optional
        Default: ``"emulator"`` for NumPy arrays, ``"cupy"`` for CuPy arrays.

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
    xp, _ = _module(mask)
    footprint_host = np.asarray(footprint.get() if is_device_array(footprint) else footprint)
    if footprint_host.ndim != 2 or 0 in footprint_host.shape:
        msg = f"footprint must be a non-empty 2-D array, got shape {footprint_host.shape}"
        raise ValueError(msg)
    if not footprint_host.any():
        msg = "footprint is all zero: no pixel would propagate"
        raise ValueError(msg)
    kh, kw = footprint_host.shape
    if footprint_host.all() and kh % 2 == 1 and kw % 2 == 1:
        return or_filter_box(mask, kh // 2, kw // 2, backend=backend)
    return or_filter_footprint(mask, footprint_host, backend=backend)


# ---------------------------------------------------------------------------
# Lanczos-3 warp


def warp_resample(image, variance, mask, x_src, y_src, *, no_data, outside_bits, scale=None, backend=None):
    """Lanczos-3 resampling of a masked image at given source coordinates (``gdi_warp_lanczos3``).

    Per output pixel, what :func:`gpudiffim.warp.warp_masked_image` does
    with its pixel mapping (see ``kernels/warp.cu``): normalised Lanczos-3
    weights ``w`` over the 6 x 6 source window, image ``sum w I``, variance
    ``sum w^2 V`` (float64 sums, rounded to the image dtype once), mask the
    OR of the window's bits (pixels off the source count ``outside_bits``);
    windows that do not fit in the source padded by 3 pixels, and non-finite
    coordinates, give ``outside_bits``; where the mask has a ``no_data`` bit,
    image and variance are 0.

    Parameters
    ----------
    image, variance : ndarray of shape (ny, nx), float32 or float64
        Source planes, one dtype.
    mask : ndarray of int, shape (ny, nx)
        Source mask (values must fit in int32).
    x_src, y_src : ndarray of float64, any shape (the output's)
        Source coordinates of every output pixel in the source *array*
        frame: ``(x, y)`` points at ``image[y, x]`` (as
        :func:`gpudiffim.warp.pixel_mapping` returns); NaN where unmapped.
    no_data : int
        The NO_DATA bit(s) of the mask planes (non-zero).
    outside_bits : int
        Mask value of source pixels off the image (``NO_DATA | EDGE`` in
        ``warp_masked_image``); must share a bit with ``no_data``.
    scale : ndarray of float64, the shape of ``x_src``, optional
        Per-pixel flux factor (the interpolated Jacobian determinant of
        ``conserve_flux=True``): the image is multiplied by it and the
        variance by its square, before the NO_DATA zeroing.
    backend : {"cupy", "emulator"}, optional
        Default: ``"emulator"`` for NumPy arrays, ``"cupy"`` for CuPy arrays.

    Returns
    -------
    image, variance : ndarray of the shape of ``x_src``, the source dtype
    mask : ndarray of int32, the shape of ``x_src``

    Raises
    ------
    TypeError
        If the planes are not float32/float64 of one dtype or the mask is not
        an integer array.
    ValueError
        If shapes disagree, a mask value or bit does not fit in int32, or
        ``no_data`` and ``outside_bits`` share no bit.
    """
    xp, default = _module(image)
    ctype = _float_ctype("image", image)
    dtype = _native(image.dtype)
    if _native(variance.dtype) != dtype:
        msg = f"variance must have the image dtype {image.dtype}, got {variance.dtype}"
        raise TypeError(msg)
    if image.ndim != 2 or variance.shape != image.shape or mask.shape != image.shape:
        msg = f"image, variance and mask must be 2-D of one shape, got {image.shape}, {variance.shape}, {mask.shape}"
        raise ValueError(msg)
    if x_src.shape != y_src.shape or (scale is not None and scale.shape != x_src.shape):
        shapes = (x_src.shape, y_src.shape, None if scale is None else scale.shape)
        msg = f"x_src, y_src (and scale) must have one shape, got {shapes}"
        raise ValueError(msg)
    no_data, outside_bits = _int32_bits("no_data", no_data), _int32_bits("outside_bits", outside_bits)
    if no_data == 0 or (no_data & outside_bits) == 0:
        msg = f"outside_bits ({outside_bits:#x}) must include a no_data bit ({no_data:#x})"
        raise ValueError(msg)
    image, variance = (xp.ascontiguousarray(a, dtype=dtype) for a in (image, variance))
    mask = _int32_mask("mask", mask, xp)
    x_src, y_src = (xp.ascontiguousarray(a, dtype=np.float64) for a in (x_src, y_src))
    use_scale = scale is not None
    scale = xp.ascontiguousarray(scale, dtype=np.float64) if use_scale else xp.ones(1)
    shape = x_src.shape
    out_image = xp.full(shape, np.nan, dtype=dtype)
    out_variance = xp.full(shape, np.nan, dtype=dtype)
    out_mask = xp.full(shape, -1, dtype=np.int32)
    n_out = int(np.prod(shape))
    if n_out:
        backend = default if backend is None else backend
        grid, block = grid_stride_geometry(n_out, backend)
        ny, nx = image.shape
        launch(f"gdi_warp_lanczos3<{ctype}>", grid, block,
               (image, variance, mask, ny, nx, x_src, y_src, scale, int(use_scale), n_out, no_data, outside_bits,
                out_image, out_variance, out_mask), backend=backend)
    return out_image, out_variance, out_mask
