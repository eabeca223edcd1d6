"""Masked images: image, mask and variance planes on one pixel grid.

Conventions
-----------
Arrays are indexed ``[row, column]`` = ``[y, x]``, 0-based.  ``xy0 = (x0, y0)``
is the parent-pixel coordinate of array element ``[0, 0]``, so array element
``[j, i]`` is parent pixel ``(x0 + i, y0 + j)``.  Pixel centres are at integer
coordinates (LSST convention).  Spatial models (kernel, background) are
evaluated in parent coordinates.
"""

import logging
import warnings

import numpy as np

from ._backend import array_module_of as _module_of
from ._backend import is_device_array, moved, on_device, read_only_view
from .errors import InvalidImageError, InvalidVarianceError, NoDataWarning, ShapeError
from .statistics import mad_sigma

__all__ = ["DEFAULT_MASK_PLANES", "MaskedImage", "mask_bits"]

log = logging.getLogger(__name__)

#: LSST ``afw`` default mask planes and their bit numbers.
DEFAULT_MASK_PLANES = {
    "BAD": 0,
    "SAT": 1,
    "INTRP": 2,
    "CR": 3,
    "EDGE": 4,
    "DETECTED": 5,
    "DETECTED_NEGATIVE": 6,
    "SUSPECT": 7,
    "NO_DATA": 8,
}


def mask_bits(planes, names):
    """OR of the bits of the named planes; names not in ``planes`` are ignored.

    Parameters
    ----------
    planes : mapping of str to int
        Mask-plane name to bit number.
    names : iterable of str
        Plane names.

    Returns
    -------
    int
        Bit mask (0 if no name is known), as ``afw`` does for ``badMaskPlanes``.
    """
    value = 0
    for name in names:
        if name in planes:
            value |= 1 << planes[name]
    return value


def _freeze(array):
    """Make a NumPy plane read-only (CuPy arrays have no such flag)."""
    if isinstance(array, np.ndarray):
        array.flags.writeable = False
    return array


def _check_float_array(name, array, shape=None):
    array = _module_of(array).asarray(array)
    if array.ndim != 2:
        msg = f"{name} must be a 2-D array (rows, columns), got shape {array.shape}"
        raise ShapeError(msg)
    if shape is not None and array.shape != shape:
        msg = f"{name} has shape {array.shape} but the image has shape {shape}"
        raise ShapeError(msg)
    if array.size == 0:
        msg = f"{name} is empty (shape {array.shape})"
        raise ShapeError(msg)
    if array.dtype.kind not in "fiu" or array.dtype.kind == "b":
        msg = f"{name} must hold real numbers (float or integer), got dtype {array.dtype}"
        raise InvalidImageError(msg)
    if not array.dtype.isnative:
        msg = (f"{name} has non-native byte order ({array.dtype.str}), typical of FITS data; "
               f"convert it with a.astype(a.dtype.newbyteorder('='))")
        raise InvalidImageError(msg)
    return array


class MaskedImage:
    """An image with mask and variance planes and a parent-pixel origin.

    The planes are copied on construction and stored read-only, so the
    caller's arrays are never modified and a ``MaskedImage`` is immutable.

    Parameters
    ----------
    image : array_like of shape (M, N)
        Pixel values (counts).  float32 and float64 are kept; integer images
        become float64.
    mask : array_like of int, shape (M, N), optional
        Bit mask; planes named by ``mask_planes``.  Zeros if omitted.
    variance : array_like of shape (M, N), optional
        Per-pixel variance (counts^2).  If omitted, a constant variance equal to
        the square of the robust (MAD) standard deviation of the image is used.
    xy0 : tuple of int, optional
        Parent coordinate ``(x0, y0)`` of array element ``[0, 0]``.
    mask_planes : mapping of str to int, optional
        Plane name -> bit number; defaults to :data:`DEFAULT_MASK_PLANES`.

    Notes
    -----
    CuPy arrays are accepted as well: the planes then stay on the GPU (copied
    there, not read-only), :attr:`xp` is ``cupy``, and the task's results are
    CuPy arrays too.  All planes must live in the same module.

    Raises
    ------
    ShapeError
        If a plane is not 2-D or the shapes differ.
    InvalidImageError
        For a non-real dtype, non-native byte order, or no pixel with data.
    InvalidVarianceError
        If the variance is zero or negative on a pixel that is not NO_DATA.

    Warns
    -----
    NoDataWarning
        If image or variance pixels are NaN or infinite: they are flagged
        NO_DATA, their image and variance set to 0 and kept out of every fit.
    """

    def __init__(self, image, mask=None, variance=None, *, xy0=(0, 0), mask_planes=None):
        xp = _module_of(image)
        for name, plane in (("mask", mask), ("variance", variance)):
            if plane is not None and is_device_array(plane) != on_device(xp):
                msg = f"image and {name} must both be NumPy or both be CuPy arrays"
                raise InvalidImageError(msg)
        image = _check_float_array("image", image)
        dtype = image.dtype if image.dtype in (np.float32, np.float64) else np.dtype(np.float64)
        shape = image.shape
        planes = dict(DEFAULT_MASK_PLANES if mask_planes is None else mask_planes)
        for name in ("NO_DATA", "EDGE"):
            if name not in planes:
                planes[name] = max(planes.values(), default=-1) + 1
        if mask is None:
            mask = xp.zeros(shape, dtype=np.int32)
        else:
            mask = xp.asarray(mask)
            if mask.ndim != 2 or mask.shape != shape:
                msg = f"mask has shape {mask.shape} but the image has shape {shape}"
                raise ShapeError(msg)
            if mask.dtype.kind not in "iu":
                msg = f"mask must be an integer array, got dtype {mask.dtype}"
                raise InvalidImageError(msg)
            low, high = int(mask.min()), int(mask.max())
            if low < np.iinfo(np.int32).min or high > np.iinfo(np.int32).max:
                msg = f"mask values must fit in 32 bits, got range [{low}, {high}]"
                raise InvalidImageError(msg)
            mask = mask.astype(np.int32)
        image = xp.array(image, dtype=dtype)
        if variance is None:
            variance = xp.full(shape, _robust_variance(image), dtype=dtype)
        else:
            variance = xp.array(_check_float_array("variance", variance, shape), dtype=dtype)
        no_data = 1 << planes["NO_DATA"]
        _flag_non_finite(image, variance, mask, no_data)
        _check_variance(variance, mask, no_data)
        self._xy0 = check_xy0(xy0)
        self._planes = planes
        self._image, self._mask, self._variance = (_freeze(a) for a in (image, mask, variance))

    @classmethod
    def _from_planes(cls, image, mask, variance, xy0, mask_planes):
        """Wrap planes computed by gpudiffim itself, without re-validation.

        The planes are copied in their own module (NumPy or CuPy).
        """
        xp = _module_of(image)
        return cls._wrap(xp.array(image), xp.array(mask, dtype=np.int32), xp.array(variance), xy0,
                         mask_planes)

    @classmethod
    def _wrap(cls, image, mask, variance, xy0, mask_planes):
        """Take ownership of freshly made planes (no copy, no validation)."""
        self = cls.__new__(cls)
        self._xy0 = (int(xy0[0]), int(xy0[1]))
        self._planes = dict(mask_planes)
        self._image, self._mask, self._variance = (_freeze(a) for a in (image, mask, variance))
        return self

    @property
    def xp(self):
        """Array module of the planes: ``numpy``, or ``cupy`` for planes on the GPU."""
        return _module_of(self._image)

    def to_module(self, xp):
        """This image with its planes in array module ``xp`` (``numpy`` or ``cupy``).

        Returns ``self`` when the planes are already there; otherwise the
        planes are copied between host and device.
        """
        if xp is self.xp:
            return self
        return MaskedImage._wrap(*(moved(a, xp) for a in (self._image, self._mask, self._variance)), self._xy0,
                                 self._planes)

    @property
    def image(self):
        """Read-only image plane, shape (M, N)."""
        return read_only_view(self._image)

    @property
    def mask(self):
        """Read-only int32 mask plane, shape (M, N)."""
        return read_only_view(self._mask)

    @property
    def variance(self):
        """Read-only variance plane, shape (M, N)."""
        return read_only_view(self._variance)

    @property
    def xy0(self):
        """Parent coordinate (x0, y0) of element [0, 0]."""
        return self._xy0

    @property
    def shape(self):
        """(rows, columns)."""
        return self._image.shape

    @property
    def dtype(self):
        """Floating dtype of the image and variance planes."""
        return self._image.dtype

    @property
    def mask_planes(self):
        """Copy of the plane name -> bit number mapping."""
        return dict(self._planes)

    def bits(self, names):
        """Bit mask of the named planes (unknown names ignored)."""
        return mask_bits(self._planes, names)

    def bbox(self):
        """Parent bounding box ``(x_min, y_min, x_max, y_max)``, inclusive."""
        x0, y0 = self._xy0
        return (x0, y0, x0 + self.shape[1] - 1, y0 + self.shape[0] - 1)

    def subimage(self, bbox):
        """The part of this image inside a parent bounding box (contiguous copies of the planes).

        Parameters
        ----------
        bbox : tuple of int
            ``(x_min, y_min, x_max, y_max)`` in parent pixels, inclusive, inside
            :meth:`bbox`.

        Raises
        ------
        ShapeError
            If ``bbox`` is empty or reaches outside the image.
        """
        x_min, y_min, x_max, y_max = (int(v) for v in bbox)
        own = self.bbox()
        if not (own[0] <= x_min <= x_max <= own[2] and own[1] <= y_min <= y_max <= own[3]):
            msg = f"sub-image box {tuple(bbox)} is empty or not inside the image box {own}"
            raise ShapeError(msg)
        x0, y0 = self._xy0
        rows, cols = slice(y_min - y0, y_max - y0 + 1), slice(x_min - x0, x_max - x0 + 1)
        xp = self.xp
        return MaskedImage._wrap(*(xp.ascontiguousarray(a[rows, cols]) for a in
                                   (self._image, self._mask, self._variance)), (x_min, y_min), self._planes)

    def __repr__(self):
        return (f"MaskedImage(shape={self.shape}, dtype={self.dtype}, xy0={self.xy0}, "
                f"planes={sorted(self._planes)})")


def check_xy0(xy0, name="xy0"):
    """``(x0, y0)`` as Python ints; :class:`InvalidImageError` unless a pair of integers."""
    try:
        x0, y0 = xy0
    except (TypeError, ValueError):
        x0 = y0 = None
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))
               for v in (x0, y0)):
        msg = f"{name} must be a pair of integers (x0, y0), got {xy0!r}"
        raise InvalidImageError(msg)
    return (int(x0), int(y0))


def _robust_variance(image):
    xp = _module_of(image)
    finite = image[xp.isfinite(image)]
    if finite.size == 0:
        msg = "image has no finite pixel"
        raise InvalidImageError(msg)
    sigma = mad_sigma(finite)
    if not sigma > 0:
        msg = "cannot estimate a variance from a constant image; pass variance="
        raise InvalidVarianceError(msg)
    log.info("no variance plane given: using a constant variance %.6g from the image MAD", sigma**2)
    return sigma**2


def _flag_non_finite(image, variance, mask, no_data):
    xp = _module_of(image)
    bad = ~(xp.isfinite(image) & xp.isfinite(variance))
    n_bad = int(xp.count_nonzero(bad))
    if bool(xp.all(bad | ((mask & no_data) != 0))):
        msg = "every pixel is NO_DATA or non-finite: the image holds no data"
        raise InvalidImageError(msg)
    if n_bad:
        mask[bad] |= no_data
        image[bad] = 0.0
        variance[bad] = 0.0
        msg = f"{n_bad} NaN/inf image or variance pixel(s) flagged NO_DATA and excluded"
        warnings.warn(msg, NoDataWarning, stacklevel=3)


def _check_variance(variance, mask, no_data):
    xp = _module_of(variance)
    bad = (variance <= 0) & ((mask & no_data) == 0)
    n_bad = int(xp.count_nonzero(bad))
    if n_bad:
        row, col = (int(v) for v in xp.argwhere(bad)[0])
        msg = (f"variance must be > 0 on pixels with data: {n_bad} pixel(s) are <= 0, "
               f"first at row {row}, column {col} (value {float(variance[row, col])!r}); "
               f"flag such pixels NO_DATA in the mask if they hold no data")
        raise InvalidVarianceError(msg)
