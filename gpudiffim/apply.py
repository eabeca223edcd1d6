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

Backends: the correlations are FFT products (``scipy.fft`` on the host, cuFFT
for CuPy arrays).  On the kernel path (``cupy``, ``cuda-emulator``) the
weighting and accumulation of each term and the mask propagation are the
kernels of ``kernels/image_apply.cu``; the planes stay in the backend's array
module throughout.
"""

import numpy as np
import scipy.ndimage as ndi

from ._backend import array_module_of, kernel_path_for
from .convolve import FourierCorrelator
from .spatial import SpatialFunction, product_expansion

__all__ = ["convolve_masked_image", "propagate_mask"]


def _grid_factors(function, shape, xy0):
    """Separable factors of the spatial terms on the pixel grid."""
    return function.grid_factors(xy0[0] + np.arange(shape[1]), xy0[1] + np.arange(shape[0]))


def _weighted_correlations(image, kernels, factors, dtype):
    """``sum_t P_t * (image * kernels[t])`` with ``P_t = outer(*factors[t])``.

    All-zero kernels are skipped; the weighting is done in place on each
    correlation, so no term image is ever formed.
    """
    xp = array_module_of(image)
    path = kernel_path_for(image)
    correlator = FourierCorrelator(image, kernels.shape[1:], dtype)
    out = xp.zeros(image.shape, dtype=dtype)
    for kernel, (rows, cols) in zip(kernels, factors):
        if not np.any(kernel):
            continue
        term = correlator.correlate(kernel)
        rows, cols = xp.asarray(rows.astype(dtype)), xp.asarray(cols.astype(dtype))
        if path is None:
            term *= rows[:, None]
            term *= cols[None, :]
            out += term
        else:
            from ._cuda import image_kernels

            image_kernels.accumulate_term(out, xp.ascontiguousarray(term), rows, cols, backend=path)
    return out


def _squared_kernel_terms(kernel):
    """Kernels ``L_s`` and terms ``R_s`` with ``K(x,y)^2 = sum_s R_s(x,y) L_s``."""
    function = kernel.spatial_function
    terms = kernel.term_kernels()
    if kernel.is_spatially_invariant:
        return terms[:1] ** 2, SpatialFunction(function.model_type, 0, function.bbox)
    expansion = product_expansion(function.model_type, function.order)
    squared = np.einsum("tus,tij,uij->sij", expansion, terms, terms)
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
    path = kernel_path_for(mask)
    if path is not None:
        from ._cuda import image_kernels

        xp = array_module_of(mask)
        return image_kernels.propagate_mask(xp.asarray(mask, dtype=np.int32), np.asarray(footprint),
                                            backend=path)
    out = np.zeros_like(mask)
    full_box = bool(np.all(footprint))
    kh, kw = footprint.shape
    for bit in range(int(mask.max()).bit_length()):
        plane = (mask >> bit) & 1
        if not plane.any():
            continue
        if full_box:
            grown = ndi.maximum_filter1d(ndi.maximum_filter1d(plane, kh, axis=0, mode="constant"),
                                         kw, axis=1, mode="constant")
        else:
            grown = ndi.maximum_filter(plane, footprint=footprint, mode="constant")
        out |= grown.astype(mask.dtype) << bit
    return out


def convolve_masked_image(masked_image, kernel):
    """Correlate a masked image with a spatially varying kernel, exactly.

    Parameters
    ----------
    masked_image : MaskedImage
        Image to convolve (its ``xy0`` places it in parent coordinates).
    kernel : SpatialKernel
        Kernel, evaluated at each output pixel's parent coordinate.

    Returns
    -------
    image, variance : ndarray of shape (M, N)
        ``T * K`` and ``sum K^2 V`` in the input's dtype (transforms and
        accumulation run in that precision).
    mask : ndarray of int32, shape (M, N)
        Propagated mask, EDGE set within the kernel half-width of the border.

    All three are in the planes' array module (NumPy, or CuPy on the GPU).
    """
    shape, xy0, dtype = masked_image.shape, masked_image.xy0, masked_image.dtype
    xp = masked_image.xp
    image = _weighted_correlations(masked_image.image, kernel.term_kernels(),
                                   _grid_factors(kernel.spatial_function, shape, xy0), dtype)
    squared, square_function = _squared_kernel_terms(kernel)
    variance = _weighted_correlations(masked_image.variance, squared,
                                      _grid_factors(square_function, shape, xy0), dtype)
    footprint = np.any(kernel.term_kernels() != 0, axis=0)
    mask = propagate_mask(masked_image.mask, footprint)
    hy, hx = kernel.shape[0] // 2, kernel.shape[1] // 2
    edge = xp.ones(shape, dtype=bool)
    edge[hy:shape[0] - hy, hx:shape[1] - hx] = False
    image[edge] = masked_image.image[edge]
    variance[edge] = masked_image.variance[edge]
    mask[edge] |= masked_image.mask[edge] | np.int32(masked_image.bits(["EDGE"]))
    return image, variance, mask.astype(np.int32)
