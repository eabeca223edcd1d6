"""Launch geometry and host wrapper of ``kernels/warp.cu``: the Lanczos-3 warp.

:func:`warp_resample` is the per-pixel resampling of
:func:`gpudiffim.warp.warp_masked_image` for a given pixel mapping.  It is a
1-D grid-stride launch with the geometry of the ``image_apply`` kernels
(:func:`gpudiffim._cuda.image_apply.grid_stride_geometry`).  NumPy arrays run
through the CPU emulator, CuPy arrays through CuPy
(:func:`~gpudiffim._cuda.launch.launcher_for`); outputs are allocated in the
input's array module.
"""

import numpy as np

from ._host import check_array, int32_bits, int32_mask, native, on_launcher
from .image_apply import grid_stride_geometry
from .launch import launch
from .signatures import float_ctype

__all__ = ["warp_resample"]


def warp_resample(image, variance, mask, x_src, y_src, *, no_data, outside_bits, scale=None):
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
    check_array("image", image)
    launcher, xp = on_launcher(image)
    ctype = float_ctype("image", image.dtype)
    dtype = native(image.dtype)
    if native(variance.dtype) != dtype:
        msg = f"variance must have the image dtype {image.dtype}, got {variance.dtype}"
        raise TypeError(msg)
    if image.ndim != 2 or variance.shape != image.shape or mask.shape != image.shape:
        msg = f"image, variance and mask must be 2-D of one shape, got {image.shape}, {variance.shape}, {mask.shape}"
        raise ValueError(msg)
    if x_src.shape != y_src.shape or (scale is not None and scale.shape != x_src.shape):
        shapes = (x_src.shape, y_src.shape, None if scale is None else scale.shape)
        msg = f"x_src, y_src (and scale) must have one shape, got {shapes}"
        raise ValueError(msg)
    no_data, outside_bits = int32_bits("no_data", no_data), int32_bits("outside_bits", outside_bits)
    if no_data == 0 or (no_data & outside_bits) == 0:
        msg = f"outside_bits ({outside_bits:#x}) must include a no_data bit ({no_data:#x})"
        raise ValueError(msg)
    image, variance = (xp.ascontiguousarray(a, dtype=dtype) for a in (image, variance))
    mask = int32_mask("mask", mask, xp)
    x_src, y_src = (xp.ascontiguousarray(a, dtype=np.float64) for a in (x_src, y_src))
    use_scale = scale is not None
    scale = xp.ascontiguousarray(scale, dtype=np.float64) if use_scale else xp.ones(1)
    shape = x_src.shape
    out_image = xp.full(shape, np.nan, dtype=dtype)
    out_variance = xp.full(shape, np.nan, dtype=dtype)
    out_mask = xp.full(shape, -1, dtype=np.int32)
    n_out = int(np.prod(shape))
    if n_out:
        grid, block = grid_stride_geometry(n_out, launcher)
        ny, nx = image.shape
        launch(f"gdi_warp_lanczos3<{ctype}>", grid, block,
               (image, variance, mask, ny, nx, x_src, y_src, scale, int(use_scale), n_out, no_data, outside_bits,
                out_image, out_variance, out_mask))
    return out_image, out_variance, out_mask
