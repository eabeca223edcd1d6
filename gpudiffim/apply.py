"""Application of the spatially varying kernel to a whole masked image.

The kernel is ``K(x, y) = sum_t P_t(x, y) K_t`` (see
:meth:`SpatialKernel.term_kernels`), so with ``*`` the ``afw`` correlation

.. math::

   (T \\star K)(x, y) = \\sum_t P_t(x, y)\\, (T \\star K_t)(x, y),

   \\sum_{u,v} K(u, v; x, y)^2 V(x+u, y+v)
       = \\sum_{t,t'} P_t P_{t'}\\, (V \\star K_t K_{t'})(x, y)
       = \\sum_s R_s(x, y)\\, (V \\star L_s)(x, y),

where the products ``P_t P_t'`` are re-expanded in the terms ``R_s`` of twice
the order (:func:`~gpudiffim.spatial.product_expansion`).  Each fixed-kernel
correlation is one FFT product, so the result is exact at every pixel
(``afw`` instead interpolates kernel images over 10-px regions).

Edges: output pixels within the kernel half-width of the border have no
complete input; as in ``ip_diffim``'s current subtraction (``doCopyEdge``)
they hold the *input* image and variance and get the EDGE mask bit.

Masks: every bit of an input pixel is OR-ed into every output pixel whose
kernel footprint (pixels where some ``K_t`` is non-zero) covers it.  Input
NO_DATA pixels enter the sums as 0 and their NO_DATA bit spreads the same way,
so an affected output pixel is flagged, never silently wrong.

Backends: the weighted sums of correlations and the mask propagation are
operations of :mod:`gpudiffim._ops` (``weighted_correlations``,
``propagate_mask``), chosen once per application from where the planes live.
The correlations are FFT products.  The NumPy reference computes them by
overlap-save tiles of about 720^2 (:class:`~gpudiffim.convolve.TiledCorrelator`:
a kernel's transform is a tile's, and the batched small transforms are about
twice as fast in pocketfft as one whole-image transform), term by term.  The
kernel path (``cupy``, ``cuda-emulator``) transforms the band once and all
its terms in one batched transform (cuFFT on the GPU), and weights and sums
them in one launch of ``gdi_accumulate_terms`` (``kernels/image_apply.cu``);
the planes stay in their array module throughout.

Tiling: the image is processed in horizontal bands of at most
``max_tile_pixels`` input pixels (:data:`MAX_TILE_PIXELS` by default), each
computed from its rows plus a halo of the kernel half-height, so the
temporary memory is bounded whatever the image size and the result is the
whole-image result (up to FFT rounding).
"""

import itertools
import logging

import numpy as np

from . import _validate
from ._backend import array_module_of, on_device
from ._ops import HOST_BAND_PIXELS, operations_for
from .spatial import GridFactors, SpatialFunction, product_expansion

__all__ = ["MAX_TILE_PIXELS", "convolve_masked_image", "propagate_mask", "spatial_image"]

log = logging.getLogger(__name__)

#: Default ``max_tile_pixels`` of :func:`convolve_masked_image` on the host: the
#: most input pixels (band rows plus the kernel halo, times the columns)
#: correlated at once; a 4096 x 4096 image with a 23 x 23 kernel takes 3 bands
#: there, one on the kernel path (``gpudiffim._ops.DEVICE_BAND_PIXELS``).
MAX_TILE_PIXELS = HOST_BAND_PIXELS


def _grid_factors(function, shape, xy0):
    """Separable factors of the spatial terms on the pixel grid (built where the image lives on the kernel path)."""
    return GridFactors(function, int(xy0[0]), int(xy0[1]), int(shape[0]), int(shape[1]))


def spatial_image(function, coefficients, shape, xy0, like):
    """A spatial model (the differential background) on a pixel grid, where ``like`` lives.

    Parameters
    ----------
    function : SpatialFunction
    coefficients : array_like of shape (n_terms,)
    shape : tuple of int
        Grid shape (rows, columns).
    xy0 : tuple of int
        Parent (x, y) of grid pixel ``[0, 0]``.
    like : ndarray
        An array of the module to build in (NumPy, or CuPy: built on the GPU
        from the coefficients, no table uploaded).

    Returns
    -------
    ndarray of shape ``shape``, float64
    """
    return operations_for(like).spatial_image(_grid_factors(function, shape, xy0), coefficients,
                                              array_module_of(like))


def _squared_kernel_terms(kernel, xp=np):
    """Kernels ``L_s`` and terms ``R_s`` with ``K(x,y)^2 = sum_s R_s(x,y) L_s``.

    The kernels are formed in ``xp`` from :meth:`SpatialKernel.term_kernels`
    there (on the device: only the product expansion, a few kB, is moved).
    """
    function = kernel.spatial_function
    terms = kernel.term_kernels(xp)
    if kernel.is_spatially_invariant:
        return terms[:1] ** 2, SpatialFunction(function.model_type, 0, function.bbox)
    expansion = product_expansion(function.model_type, function.order)
    n_terms = len(terms)
    flat = terms.reshape(n_terms, -1)
    pairs = (flat[:, None, :] * flat[None, :, :]).reshape(n_terms * n_terms, -1)   # P_t P_u, pixel by pixel
    squared = (xp.asarray(expansion.reshape(n_terms * n_terms, -1)).T @ pairs).reshape((-1,) + terms.shape[1:])
    return squared, SpatialFunction(function.model_type, 2 * function.order, function.bbox)


def propagate_mask(mask, footprint):
    """OR every bit of ``mask`` over the kernel footprint (``afw`` convention).

    Parameters
    ----------
    mask : ndarray of int, shape (M, N)
    footprint : ndarray of bool, shape (kh, kw)
        Kernel pixels that are non-zero.

    Returns
    -------
    ndarray of int, shape (M, N)
        Output pixel ``(x, y)`` carries bit ``b`` when some input pixel
        ``(x + u, y + v)`` with ``footprint[h + v, h + u]`` carries it.
    """
    return operations_for(mask).propagate_mask(mask, footprint)


def _band_ranges(rows, columns, halo, max_tile_pixels):
    """Output row ranges ``[(r0, r1), ...]`` of the horizontal bands.

    Parameters
    ----------
    rows, columns : int
        Image shape.
    halo : int
        Input rows needed on each side of a band (the kernel half-height).
    max_tile_pixels : int
        Most input pixels per band: ``(r1 - r0 + 2 halo) * columns`` stays
        within it, except that a band has at least one row.

    Returns
    -------
    list of tuple of int
        Consecutive ``(r0, r1)`` covering ``0 .. rows``: as few bands as the
        limit allows, of heights differing by at most one row.
    """
    height = max(1, max_tile_pixels // columns - 2 * halo)
    n_bands = -(-rows // height)
    bounds = [rows * i // n_bands for i in range(n_bands + 1)]
    return list(itertools.pairwise(bounds))


def _convolve_band(masked_image, parts, start, stop, halo):
    """Image, variance and mask of output rows ``start:stop`` (before the EDGE copy).

    Computed from the input rows ``start - halo .. stop + halo`` clipped to
    the image, with the band's own ``xy0`` so that the spatial terms are
    evaluated at the parent coordinates of its rows; the rows that a clipped
    halo would need lie off the image, where the whole-image correlation has
    zeros too.  ``parts`` is ``(ops, (terms, function, placed), (squared,
    square_function, placed), footprint)``: the operations of the application
    (:func:`gpudiffim._ops.operations_for`) and the kernel's parts (host
    kernels, and the same formed where the image lives).
    """
    rows, columns = masked_image.shape
    low, high = max(0, start - halo), min(rows, stop + halo)
    shape, dtype = (high - low, columns), masked_image.dtype
    xy0 = (masked_image.xy0[0], masked_image.xy0[1] + low)
    ops, (terms, function, placed), (squared, square_function, placed_squared), footprint = parts
    image, variance = ops.weighted_correlations_of(
        [(masked_image.image[low:high], terms, _grid_factors(function, shape, xy0), placed),
         (masked_image.variance[low:high], squared, _grid_factors(square_function, shape, xy0), placed_squared)],
        dtype)
    mask = ops.propagate_mask(masked_image.mask[low:high], footprint)
    keep = slice(start - low, stop - low)
    return image[keep], variance[keep], mask[keep]


def convolve_masked_image(masked_image, kernel, *, max_tile_pixels=None):
    """Correlate a masked image with a spatially varying kernel, exactly.

    Parameters
    ----------
    masked_image : MaskedImage
        Image to convolve (its ``xy0`` places it in parent coordinates).
    kernel : SpatialKernel
        Kernel, evaluated at each output pixel's parent coordinate.
    max_tile_pixels : int, optional
        Most input pixels correlated at once; default the operations'
        ``max_band_pixels``: :data:`MAX_TILE_PIXELS` on the host, a 4096²
        image in one band on the kernel path (each band repeats the
        application's ~50 device calls).
        The image is processed in horizontal bands of ``n`` rows with
        ``(n + 2 h) * columns <= max_tile_pixels`` (``h`` the kernel
        half-height; at least one row per band), which bounds the temporary
        memory (see Notes).

    Returns
    -------
    image, variance : ndarray of shape (M, N)
        ``T * K`` and ``sum K^2 V`` in the input's dtype (transforms and
        accumulation run in that precision).
    mask : ndarray of int32, shape (M, N)
        Propagated mask, EDGE set within the kernel half-width of the border.

    All three are in the planes' array module (NumPy, or CuPy on the GPU).

    Raises
    ------
    ConfigurationError
        If ``max_tile_pixels`` is not a positive integer.

    Notes
    -----
    Band rows ``[r0, r1)`` are computed from the input rows ``[r0 - h, r1 +
    h)`` clipped to the image, with the band's own ``xy0``, and only rows
    ``[r0, r1)`` are kept; the mask is propagated per band with the same
    halo.  The result is therefore the whole-image result, up to the rounding
    of the differently sized FFTs (~1e-16 relative in float64): the tiling is
    invisible, and EDGE is set only at the true image border.

    Memory: a band's temporaries (the padded transforms of the band and of
    one kernel term, their product and inverse, the accumulator) are about
    32 bytes per input pixel in float64 and 14 in float32 on the host
    (``tracemalloc``, 1024 x 1024, 23 x 23 kernel), up to about 60 in
    float64 on the GPU (cuFFT work areas, the contiguous copy of each term);
    the outputs add 20 (float64) or 12 (float32) bytes per image pixel.
    """
    ops = operations_for(masked_image.image)
    if max_tile_pixels is None:
        max_tile_pixels = ops.max_band_pixels
    max_tile_pixels = _validate.check_int("max_tile_pixels", max_tile_pixels, minimum=1)
    (rows, columns), dtype, xp = masked_image.shape, masked_image.dtype, masked_image.xp
    halo = kernel.shape[0] // 2
    terms, (squared, square_function) = kernel.term_kernels(), _squared_kernel_terms(kernel)
    placed, placed_squared = terms, squared
    if on_device(xp):   # formed there from the placed basis (the host's kernels say which are zero)
        placed, (placed_squared, _) = kernel.term_kernels(xp), _squared_kernel_terms(kernel, xp)
    parts = (ops, (terms, kernel.spatial_function, placed), (squared, square_function, placed_squared),
             np.any(terms != 0, axis=0))
    bands = _band_ranges(rows, columns, halo, max_tile_pixels)
    if len(bands) == 1:
        image, variance, mask = _convolve_band(masked_image, parts, 0, rows, halo)
    else:
        image, variance = xp.empty((rows, columns), dtype=dtype), xp.empty((rows, columns), dtype=dtype)
        mask = xp.empty((rows, columns), dtype=np.int32)
        for start, stop in bands:
            image[start:stop], variance[start:stop], mask[start:stop] = _convolve_band(
                masked_image, parts, start, stop, halo)
    log.debug("convolved %s in %d band(s) of at most %d input pixels", masked_image.shape, len(bands),
              max_tile_pixels)
    mask = mask.astype(np.int32, copy=False)
    parts[0].copy_edge((masked_image.image, masked_image.variance, masked_image.mask), kernel.shape[0] // 2,
                       kernel.shape[1] // 2, masked_image.bits(["EDGE"]), (image, variance, mask))
    return image, variance, mask
