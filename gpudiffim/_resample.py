"""Lanczos-3 resampling of masked-image planes on the host: the NumPy reference of the warp.

:func:`gpudiffim.warp.warp_masked_image` computes the pixel mapping and asks
the operations layer (:mod:`gpudiffim._ops`) to resample; on the NumPy path
that is :func:`resample_reference` here, on the kernel path the
``gdi_warp_lanczos3`` kernel of ``kernels/warp.cu`` (the same float64
operations in the same order).  See :mod:`gpudiffim.warp` for the weights,
the mask footprints and the accuracy.
"""

import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

__all__ = ["LANCZOS_ORDER", "PaddedSource", "lanczos_taps", "resample_block", "resample_reference"]

#: Lanczos order used for the image and variance (``warpingConfig``: lanczos3).
LANCZOS_ORDER = 3

#: Source coordinates this close (pixels) to an integer are snapped onto it, so
#: that a warp between identical or integer-shifted grids copies pixels exactly.
SNAP_TOLERANCE = 1e-6

#: Most threads used by :func:`resample_reference` (each holds one block).
MAX_THREADS = 8

#: Tap offsets of the Lanczos-3 footprint relative to ``floor(coordinate)``.
_TAPS = tuple(range(1 - LANCZOS_ORDER, LANCZOS_ORDER + 1))
_N_TAPS = len(_TAPS)


def lanczos_taps(fraction):
    """Lanczos weights of the 6 taps at offsets ``fraction - k``, k = -2 .. 3, shape (6, ...).

    Equal to ``gpudiffim.warp.lanczos_kernel(fraction - k)`` for ``0 <= fraction < 1``, with
    three trigonometric evaluations per point instead of twelve:
    ``sin(pi (f - k)) = (-1)^k sin(pi f)`` and ``sin(pi (f - k) / 3)`` by the
    angle-difference formula.  At ``fraction == 0`` the weights are exactly
    ``(0, 0, 1, 0, 0, 0)``.  The tap at offset ``f - 1`` loses relative
    precision as ``f -> 1`` (cancellation, ~1e-16 / (1 - f)); snapping keeps
    ``1 - f >= 1e-6``, so the weights are accurate to ~1e-10.
    """
    a = LANCZOS_ORDER
    # sin(pi f) = sin(pi (1 - f)); the smaller argument keeps it accurate near f = 1.
    sin_f = (a / np.pi**2) * np.sin(np.pi * np.minimum(fraction, 1.0 - fraction))
    sin_part = sin_f * np.sin(np.pi / a * fraction)
    cos_part = sin_f * np.cos(np.pi / a * fraction)
    weights = np.empty((_N_TAPS,) + fraction.shape)
    for i, k in enumerate(_TAPS):
        offset = fraction - k
        offset *= offset
        sign = (-1) ** k
        numerator = (sign * math.cos(math.pi * k / a)) * sin_part
        if k % a:
            numerator -= (sign * math.sin(math.pi * k / a)) * cos_part
        if k == 0:   # the only tap whose offset can be 0 (for 0 <= fraction < 1)
            at_zero = offset == 0.0
            offset[at_zero] = 1.0
            numerator[at_zero] = 1.0
        np.divide(numerator, offset, out=weights[i])
    return weights


def _axis_weights(coordinate):
    """Snapped integer part, fraction, Lanczos weights (6, ...) and their sum along one axis."""
    nearest = np.rint(coordinate)
    coordinate = np.where(np.abs(coordinate - nearest) < SNAP_TOLERANCE, nearest, coordinate)
    floor = np.floor(coordinate)
    fraction = coordinate - floor
    weights = lanczos_taps(fraction)
    return floor, fraction, weights, weights.sum(axis=0)


def _window_or(mask, length, axis):
    """``out[j] = mask[j] | ... | mask[j + length - 1]`` along ``axis`` (shorter at the end)."""
    out = mask.copy()
    for shift in range(1, length):
        head = [slice(None)] * 2
        tail = [slice(None)] * 2
        head[axis], tail[axis] = slice(None, -shift), slice(shift, None)
        out[tuple(head)] |= mask[tuple(tail)]
    return out


def _shifted(array, rows, columns):
    """``out[j, i] = array[j + rows, i + columns]`` (zeros past the end)."""
    out = np.zeros_like(array)
    out[:array.shape[0] - rows, :array.shape[1] - columns] = array[rows:, columns:]
    return out


class PaddedSource:
    """Source planes padded by the Lanczos half-width, flattened for gathering.

    The padding has image and variance 0 and the mask ``NO_DATA | EDGE``, so a
    kernel tap with non-zero weight off the image flags the output pixel.

    The mask OR over a footprint is precomputed (separable running ORs) for
    the four footprint shapes that occur: 6 x 6 when both fractions are
    non-zero (every Lanczos tap is then non-zero), 6 x 1 or 1 x 6 when one
    coordinate is an integer, the pixel itself when both are; each indexed by
    the footprint's first tap, so one gather gives the output mask.
    """

    def __init__(self, masked_image, outside_bits):
        pad = LANCZOS_ORDER
        first = _TAPS.index(0)
        self.pad = pad
        self.rows, self.columns = masked_image.shape
        self.stride = self.columns + 2 * pad
        self.image = np.pad(masked_image.image, pad).ravel()
        self.variance = np.pad(masked_image.variance, pad).ravel()
        mask = np.pad(masked_image.mask, pad, constant_values=outside_bits)
        along_rows = _window_or(mask, _N_TAPS, axis=0)
        along_columns = _window_or(mask, _N_TAPS, axis=1)
        self.mask_variants = np.stack([
            _window_or(along_rows, _N_TAPS, axis=1),   # both fractional
            _shifted(along_rows, 0, first),            # x integer
            _shifted(along_columns, first, 0),         # y integer
            _shifted(mask, first, first),              # both integer
        ]).ravel()
        self.size = mask.size

    def corner_index(self, x_floor, y_floor):
        """Flat index of each footprint's first tap; -1 where a tap falls off the padding."""
        first = _TAPS[0]
        inside = ((x_floor >= -1) & (x_floor <= self.columns - 1)
                  & (y_floor >= -1) & (y_floor <= self.rows - 1))   # NaN compares False
        column = np.where(inside, x_floor, 0).astype(np.intp) + first + self.pad
        row = np.where(inside, y_floor, 0).astype(np.intp) + first + self.pad
        return np.where(inside, row * self.stride + column, -1)


def resample_block(source, x, y):
    """Lanczos-3 resampling of one block: image, variance, OR-ed mask, off-image flag.

    The weights are normalised to unit sum per axis; the normalisation is
    applied to the sums (``sum w I / (S_x S_y)``, ``sum w^2 V / (S_x S_y)^2``).
    """
    unmapped = ~(np.isfinite(x) & np.isfinite(y))
    if unmapped.any():
        x = np.where(unmapped, -2.0 * LANCZOS_ORDER, x)   # any point off the padded source
        y = np.where(unmapped, -2.0 * LANCZOS_ORDER, y)
    x_floor, x_fraction, x_weights, x_sum = _axis_weights(x)
    y_floor, y_fraction, y_weights, y_sum = _axis_weights(y)
    corner = source.corner_index(x_floor, y_floor)
    off_image = corner < 0
    corner[off_image] = 0
    variant = (x_fraction == 0.0).astype(np.intp) + 2 * (y_fraction == 0.0)
    mask = np.take(source.mask_variants, variant * source.size + corner, mode="clip")
    mask[off_image] = 0
    image, variance = _weighted_sums(source, corner, x_weights, y_weights)
    norm = x_sum * y_sum
    image /= norm
    norm *= norm
    variance /= norm
    return image, variance, mask, off_image


def _weighted_sums(source, corner, x_weights, y_weights):
    """``sum w I`` and ``sum w^2 V`` over the 6 x 6 footprints, separably, in float64."""
    shape = corner.shape
    image, variance = np.zeros(shape), np.zeros(shape)
    row_image, row_variance, term = np.empty(shape), np.empty(shape), np.empty(shape)
    values = np.empty(shape, dtype=source.image.dtype)
    x_squared = x_weights * x_weights
    for row_tap in range(_N_TAPS):
        index = corner + row_tap * source.stride
        row_image[...] = 0.0
        row_variance[...] = 0.0
        for column_tap in range(_N_TAPS):
            # Gathering from a view shifted by the column tap spares an index addition.
            np.take(source.image[column_tap:], index, out=values, mode="clip")
            np.multiply(x_weights[column_tap], values, out=term)
            row_image += term
            np.take(source.variance[column_tap:], index, out=values, mode="clip")
            np.multiply(x_squared[column_tap], values, out=term)
            row_variance += term
        row_image *= y_weights[row_tap]
        image += row_image
        row_variance *= y_weights[row_tap] * y_weights[row_tap]
        variance += row_variance
    return image, variance


def resample_reference(masked_image, coarse, jacobian, no_data, outside_bits):
    """The NumPy resampling: image, variance and mask planes of the target, in row blocks on threads.

    ``coarse`` is the pixel mapping (``gpudiffim.warp._CoarseMapping``: its
    ``shape``, ``x``, ``y``, ``interpolate`` and ``block_ranges``);
    ``jacobian`` the coarse flux scale or None.
    """
    target_shape = coarse.shape
    source = PaddedSource(masked_image, outside_bits)
    image = np.empty(target_shape, dtype=masked_image.dtype)
    variance = np.empty(target_shape, dtype=masked_image.dtype)
    mask = np.empty(target_shape, dtype=np.int32)

    def warp_rows(rows):
        start, stop = rows
        x, y = coarse.interpolate(coarse.x, start, stop), coarse.interpolate(coarse.y, start, stop)
        block_image, block_variance, block_mask, off_image = resample_block(source, x, y)
        block_mask[off_image] = outside_bits
        if jacobian is not None:
            scale = coarse.interpolate(jacobian, start, stop)
            block_image *= scale
            block_variance *= scale * scale
        empty = (block_mask & no_data) != 0
        block_image[empty] = 0.0
        block_variance[empty] = 0.0
        image[start:stop], variance[start:stop], mask[start:stop] = block_image, block_variance, block_mask

    # Blocks write disjoint rows, and NumPy releases the GIL in the gathers and
    # arithmetic, so threads scale with the cores.
    ranges = coarse.block_ranges()
    workers = min(len(ranges), MAX_THREADS, os.cpu_count() or 1)
    if workers > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(warp_rows, ranges))
    else:
        for rows in ranges:
            warp_rows(rows)
    return image, variance, mask
