"""Correlation of images and stamps with kernel images (``afw`` convention).

Convention
----------
``afw``'s "convolve" is a cross-correlation with the stored kernel image.  A
kernel array ``K`` of shape ``(2h+1, 2h+1)`` holds at ``K[h + v, h + u]`` the
weight of offset ``(u, v)`` (u along columns = x, v along rows = y), and

.. math:: out(x, y) = \\sum_{u,v} K(u, v)\\, in(x + u, y + v).

A true convolution would use ``K[h - v, h - u]``; kernel images and the sign of
odd basis coefficients are therefore directly comparable with ``ip_diffim``
(HOTPANTS convolves, so its odd coefficients have the opposite sign).

The stamp routines return the *valid* region only (the input shrunk by ``h``
on every side), which is exactly the region ``afw`` does not flag as edge.
The full-image routine returns the same shape as its input; pixels within ``h``
of the border are computed with zero padding and must be treated as edge by
the caller.
"""

import threading

import numpy as np
import scipy.fft

from ._backend import array_module_of, fft_functions, host_map, host_threads, is_device_array, single_threaded_blas

__all__ = [
    "correlate_stamps",
    "correlate_stamps_each",
    "correlate_stamps_separable",
    "FourierCorrelator",
    "TiledCorrelator",
]

#: Number of stamps processed per chunk, to bound temporary memory.  16 keeps
#: a chunk's product (16 x 27 x 45 x 23 complex128 at the defaults, 7 MB) in
#: the caches: 0.14 s instead of 0.25-0.34 s with 128 for 1383 stamps.
_STAMP_CHUNK = 16


def _stamp_period(stamps):
    """FFT period of the stamps' circular correlations: the next fast length of each side.

    A circular correlation of period ``n >= S`` equals the linear one on the
    valid region (outputs ``0 .. S - kh``), where no kernel tap wraps; so the
    stamps need no padding.
    """
    return (scipy.fft.next_fast_len(stamps.shape[1], real=True),
            scipy.fft.next_fast_len(stamps.shape[2], real=True))


def _kernel_transforms(kernels, period):
    """Conjugate transforms of kernels (..., kh, kw) at the stamps' period."""
    return np.conj(scipy.fft.rfft2(np.asarray(kernels, dtype=np.float64), s=period, workers=host_threads()))


_buffers = threading.local()


def _work_buffer(shape, dtype):
    """A scratch array of ``shape`` (uninitialised), one per thread and reused from chunk to chunk.

    The products of the stamp chunks are the largest temporaries of the stamp
    fit (7 MB at the defaults), those of the full-image tiles 2 MB; made
    afresh, each is a new mapping whose pages the kernel faults in and zeroes,
    which cost as much as the transforms (0.3 s of 2 s CPU at 2048^2).
    """
    size, key = int(np.prod(shape)), np.dtype(dtype).str      # one buffer per dtype and thread
    buffer = _buffers.__dict__.get(key)
    if buffer is None or buffer.size < size:
        buffer = _buffers.__dict__[key] = np.empty(size, dtype=dtype)
    return buffer[:size].reshape(shape)


def _valid_correlations(stamps, kernels, per_stamp):
    """The chunked correlations of :func:`correlate_stamps` (``per_stamp``: of :func:`correlate_stamps_each`).

    Chunks of :data:`_STAMP_CHUNK` stamps (transform, product, inverse) run on
    the host threads (:func:`gpudiffim._backend.host_map`), each on one core
    and on its own rows of the output, so the result does not depend on the
    number of threads.
    """
    period = _stamp_period(stamps)
    kernels_ft = _kernel_transforms(kernels, period)
    fy = stamps.shape[1] - kernels.shape[-2] + 1
    fx = stamps.shape[2] - kernels.shape[-1] + 1
    out = np.empty((len(stamps),) + (() if per_stamp else (len(kernels),)) + (fy, fx))

    def chunk(start):
        stop = min(start + _STAMP_CHUNK, len(stamps))
        stamps_ft = scipy.fft.rfft2(np.asarray(stamps[start:stop], dtype=np.float64), s=period, workers=1)
        if per_stamp:
            factors = stamps_ft, kernels_ft[start:stop]
        else:
            factors = stamps_ft[:, None], kernels_ft[None]
        shape = np.broadcast_shapes(factors[0].shape, factors[1].shape)
        product = np.multiply(*factors, out=_work_buffer(shape, kernels_ft.dtype))
        out[start:stop] = _valid_inverse(product, period, fy, fx)

    host_map(chunk, range(0, len(stamps), _STAMP_CHUNK))
    return out


def correlate_stamps(stamps, kernels):
    """Correlate every stamp with every kernel, valid region only.

    Parameters
    ----------
    stamps : ndarray of shape (N, S_y, S_x)
        Image stamps.
    kernels : ndarray of shape (K, kh, kw)
        Kernel images, odd sizes, ``afw`` layout (see module notes).

    Returns
    -------
    ndarray of shape (N, K, S_y - kh + 1, S_x - kw + 1), float64
        ``out[n, k, y, x] = sum_{j,i} kernels[k, j, i] * stamps[n, y + j, x + i]``.

    Notes
    -----
    Computed by FFT as circular correlations of the stamp period (exact on the
    valid region), in chunks of stamps on the host threads.  For 43^2 stamps
    and 27 kernels of 21^2 this is ~4x faster than the direct matrix product
    over sliding windows, whose 441-fold copy of the stamps is memory bound.
    """
    return _valid_correlations(stamps, kernels, per_stamp=False)


#: Stamps per block of :func:`correlate_stamps_separable` (one host thread's work, about 8 MB of
#: temporaries at the defaults).  Fixed: the blocks' matrix products, and so their roundings, do
#: not depend on the number of threads.
_SEPARABLE_BLOCK = 64


def _banded(profiles, length):
    """``band[p, i, i + t] = profiles[p, t]``: (P, length - w + 1, length), the 1-D correlations as matrices."""
    n_profiles, width = profiles.shape
    valid = length - width + 1
    band = np.zeros((n_profiles, valid, length))
    index = np.arange(valid)
    for tap in range(width):
        band[:, index, index + tap] = profiles[:, tap, None]
    return band


def correlate_stamps_separable(stamps, separable):
    """:func:`correlate_stamps` with kernels given in separable form (:class:`~gpudiffim.basis.SeparableBasis`).

    Parameters
    ----------
    stamps : ndarray of shape (N, S_y, S_x)
    separable : SeparableBasis
        The kernels ``sum_m mixing[k, m] outer(profiles[a_m], profiles[b_m])`` (w x w).

    Returns
    -------
    ndarray of shape (N, K, S_y - w + 1, S_x - w + 1), float64
        As :func:`correlate_stamps` of the kernels (to ~1e-15 of the largest
        value: the sums are taken in another order).

    Notes
    -----
    Every stamp row is correlated with every profile at once, one matrix
    product with the banded matrices of the profiles; then, for each raw
    kernel, its row profile is applied down the columns of all the stamps'
    results of its column profile, one matrix product again; the mixing
    adds the raw correlations up (two terms per kernel for an Alard-Lupton
    basis).  At the defaults (43^2 stamps, 27 kernels from 11 profiles)
    this is about 2.5 times faster than the FFT products on two cores,
    being BLAS products throughout; blocks of stamps run on the host threads
    (:func:`~gpudiffim._backend.host_map`), each with single-threaded BLAS.
    """
    stamps = np.asarray(stamps, dtype=np.float64)
    profiles, pairs, mixing = separable.profiles, separable.pairs, separable.mixing
    n, size_y, size_x = stamps.shape
    n_profiles, width = profiles.shape
    fy, fx = size_y - width + 1, size_x - width + 1
    along_x = _banded(profiles, size_x).transpose(2, 0, 1).reshape(size_x, n_profiles * fx)
    along_y = _banded(profiles, size_y)
    terms = [np.flatnonzero(row) for row in mixing]
    out = np.empty((n, len(mixing), fy, fx))

    def block(start):
        stamp_block = stamps[start:start + _SEPARABLE_BLOCK]
        m = len(stamp_block)
        rows = (stamp_block.reshape(m * size_y, size_x) @ along_x).reshape(m, size_y, n_profiles, fx)
        rows = np.ascontiguousarray(rows.transpose(2, 1, 0, 3)).reshape(n_profiles, size_y, m * fx)
        raw = [(along_y[a] @ rows[b]).reshape(fy, m, fx) for a, b in pairs]
        for k, used in enumerate(terms):
            total = mixing[k, used[0]] * raw[used[0]]
            for term in used[1:]:
                total += mixing[k, term] * raw[term]
            out[start:start + m, k] = total.transpose(1, 0, 2)

    with single_threaded_blas():
        host_map(block, range(0, n, _SEPARABLE_BLOCK))
    return out


def _valid_inverse(spectrum, n, fy, fx):
    """``irfft2(spectrum, s=n)[..., :fy, :fx]``, transforming only the rows kept (one thread)."""
    rows = scipy.fft.ifft(spectrum, n=n[0], axis=-2, workers=1, overwrite_x=True)[..., :fy, :]
    return scipy.fft.irfft(rows, n=n[1], axis=-1, workers=1)[..., :fx]


def correlate_stamps_each(stamps, kernels):
    """Correlate stamp ``n`` with its own kernel ``n``, valid region only.

    Parameters
    ----------
    stamps : ndarray of shape (N, S_y, S_x)
    kernels : ndarray of shape (N, kh, kw)

    Returns
    -------
    ndarray of shape (N, S_y - kh + 1, S_x - kw + 1), float64
    """
    return _valid_correlations(stamps, kernels, per_stamp=True)


def _fft_functions(xp):
    """FFT functions for arrays of module ``xp`` (:func:`gpudiffim._backend.fft_functions`).

    The full-image correlation stays a library FFT on the GPU because it
    beats any direct kernel by far: a 4096^2 image with a 23^2 kernel is 8.9
    GFLOP per term as a direct sum, against ~0.3 GFLOP and two memory passes
    for the FFT product.
    """
    return fft_functions(xp)


class FourierCorrelator:
    """Correlate one image with many kernels by FFT, reusing the image transform.

    Parameters
    ----------
    image : ndarray of shape (M, N)
        Image: a NumPy array (transforms by ``scipy.fft``) or a CuPy array
        (transforms by cuFFT; the results are CuPy arrays).
    kernel_shape : tuple of int
        Odd kernel shape ``(kh, kw)`` shared by every kernel to be applied.
    dtype : {numpy.float64, numpy.float32}
        Precision of the transforms.  float32 transforms are twice as fast;
        their error is ~1e-7 of the image's rms, far below the noise of
        float32 astronomical data (the task uses the image's own precision).

    Notes
    -----
    Output pixel ``[y, x]`` equals the direct sum of the module notes with
    zero outside the image.  The transform is padded to a fast length
    covering the full linear correlation, so there is no wrap-around.
    """

    def __init__(self, image, kernel_shape, dtype=np.float64):
        self.dtype = np.dtype(dtype)
        self.xp = array_module_of(image)
        self._fft = _fft_functions(self.xp)
        image = self.xp.asarray(image, dtype=self.dtype)
        self.shape = image.shape
        self.kernel_shape = tuple(kernel_shape)
        kh, kw = self.kernel_shape
        self._fft_shape = (scipy.fft.next_fast_len(self.shape[0] + kh - 1, real=True),
                           scipy.fft.next_fast_len(self.shape[1] + kw - 1, real=True))
        rows = self._fft["rfft"](image, n=self._fft_shape[1], axis=1)
        self._image_ft = self._fft["fft"](rows, n=self._fft_shape[0], axis=0)

    def kernel_rows(self, kernel):
        """Row transforms of the flipped kernel (kh, kw), or of each of a stack (n, kh, kw).

        The first half of a kernel's ``rfft2``: the ``kh`` kernel rows
        transformed along x (zero-padded to the transform's width), shape
        ``(..., kh, width // 2 + 1)``; small, so a whole stack is taken at
        once and :meth:`correlate_rows` finishes it a batch at a time.
        """
        if is_device_array(kernel):
            flipped = self.xp.ascontiguousarray(kernel.astype(self.dtype, copy=False)[..., ::-1, ::-1])
        else:                   # flipped and converted on the host: one move
            flipped = self.xp.asarray(np.ascontiguousarray(np.asarray(kernel)[..., ::-1, ::-1], dtype=self.dtype))
        return self._fft["rfft"](flipped, n=self._fft_shape[1], axis=-1)

    def _kernel_transform(self, kernel):
        """``rfft2`` of the flipped, zero-padded kernel (kh, kw), or of each of a stack (n, kh, kw).

        The row transform is taken on the ``kh`` kernel rows only, and the
        column transform on the zero-padded result: half the work of a full
        2-D transform of the padded kernel.
        """
        return self._fft["fft"](self.kernel_rows(kernel), n=self._fft_shape[0], axis=-2)

    def bytes_per_term(self):
        """Device bytes one kernel of a batch takes in :meth:`correlate_rows`: its product spectrum and
        its inverse transform (padded planes; cuFFT's workspace not counted)."""
        height, width = self._fft_shape
        real = self.dtype.itemsize
        return height * (width // 2 + 1) * 2 * real + height * width * real

    def correlate_batch(self, kernels):
        """Correlations with a stack of kernels at once: batched transforms, nothing cropped.

        Parameters
        ----------
        kernels : ndarray of shape (n, kh, kw)

        Returns
        -------
        full : ndarray of shape (n, *padded shape)
            The inverse transforms; correlation ``k`` is
            ``full[k, row0:row0 + M, col0:col0 + N]``.
        row0, col0 : int
        """
        return self.correlate_rows(self.kernel_rows(kernels))

    def correlate_rows(self, rows):
        """:meth:`correlate_batch` of kernels given by their :meth:`kernel_rows` (n, kh, width // 2 + 1).

        Returns
        -------
        full : ndarray of shape (n, *padded shape)
        row0, col0 : int
            As :meth:`correlate_batch`.
        """
        kh, kw = self.kernel_shape
        product = self._fft["fft"](rows, n=self._fft_shape[0], axis=-2)
        product *= self._image_ft
        full = self._fft["irfft2"](product, s=self._fft_shape, axes=(1, 2), overwrite_x=True)
        return full, kh // 2, kw // 2

    def correlate(self, kernel):
        """Same-size correlation of the image with one kernel image.

        Parameters
        ----------
        kernel : ndarray of shape ``kernel_shape``

        Returns
        -------
        ndarray of shape (M, N), in the correlator's dtype
        """
        kh, kw = self.kernel_shape
        product = self._image_ft * self._kernel_transform(kernel)
        full = self._fft["irfft2"](product, s=self._fft_shape, overwrite_x=True)
        cy, cx = kh // 2, kw // 2
        return full[cy:cy + self.shape[0], cx:cx + self.shape[1]]


#: Target FFT tile side (px) of :class:`TiledCorrelator`: large enough that
#: the kernel overlap costs little (about 10 % of the pixels at 21^2
#: kernels), small enough that a tile's transforms stay in the caches
#: (2048^2 images are 9 tiles of 720^2; 256 to 1024 run within 20 % of it).
TILE_SIDE = 768


def _tile_grid(length, kernel_length, target):
    """``(starts, valid, period)`` of the tiles along one axis.

    ``n`` tiles of ``valid`` output pixels each (the last one clipped) cover
    ``length``; each is correlated as a circular correlation of ``period =
    next_fast_len(valid + kernel_length - 1)`` input pixels, which is exact
    on its ``valid`` outputs.
    """
    n_tiles = max(1, -(-length // max(1, target - kernel_length + 1)))
    valid = -(-length // n_tiles)
    period = scipy.fft.next_fast_len(valid + kernel_length - 1, real=True)
    return list(range(0, length, valid)), valid, period


class TiledCorrelator:
    """Correlate one host image with many kernels by overlap-save FFTs of tiles.

    Same result as :class:`FourierCorrelator` (zero outside the image,
    output pixel ``[y, x]`` the direct sum of the module notes), up to FFT
    rounding, but the image is cut into tiles of about :data:`TILE_SIDE`
    px, each with the kernel's halo, transformed all at once.  A kernel's
    transform is then that of a tile (not of the whole padded image), and
    the inverse transforms are small and batched: about twice as fast as one
    whole-image transform per kernel with pocketfft.

    Parameters
    ----------
    image : ndarray of shape (M, N)
        Host (NumPy) image.
    kernel_shape : tuple of int
        Odd kernel shape ``(kh, kw)`` shared by every kernel to be applied.
    dtype : {numpy.float64, numpy.float32}
        Precision of the transforms (see :class:`FourierCorrelator`).
    tile_side : int, optional
        Target tile side including the halo (px); default :data:`TILE_SIDE`.

    Notes
    -----
    A tile with outputs at rows ``y0 .. y0 + valid`` holds input rows ``y0 -
    h .. y0 - h + period`` (``h = kh // 2``; zeros beyond the image), and its
    circular correlation of that period equals the linear one on its first
    ``valid`` rows (likewise for the columns).
    """

    def __init__(self, image, kernel_shape, dtype=np.float64, tile_side=None):
        self.dtype = np.dtype(dtype)
        image = np.asarray(image, dtype=self.dtype)
        self.shape = image.shape
        self.kernel_shape = tuple(kernel_shape)
        side = TILE_SIDE if tile_side is None else tile_side
        grid = [_tile_grid(n, k, side) for n, k in zip(self.shape, self.kernel_shape)]
        (self._y0, self._valid_y, py), (self._x0, self._valid_x, px) = grid
        self.period = (py, px)
        hy, hx = self.kernel_shape[0] // 2, self.kernel_shape[1] // 2
        padded = np.zeros((self.shape[0] + py, self.shape[1] + px), dtype=self.dtype)
        padded[hy:hy + self.shape[0], hx:hx + self.shape[1]] = image
        tiles = np.stack([padded[y:y + py, x:x + px] for y in self._y0 for x in self._x0])
        self._tiles_ft = scipy.fft.rfft2(tiles, workers=host_threads())

    @property
    def n_tiles(self):
        """Number of tiles."""
        return len(self._y0) * len(self._x0)

    def tile_region(self, index):
        """``(rows, cols)`` slices of the output image that tile ``index`` computes."""
        y, x = self._y0[index // len(self._x0)], self._x0[index % len(self._x0)]
        return (slice(y, min(y + self._valid_y, self.shape[0])),
                slice(x, min(x + self._valid_x, self.shape[1])))

    def kernel_transform(self, kernel):
        """The conjugate transform of a kernel (``kernel_shape``) at the tiles' period."""
        return np.conj(scipy.fft.rfft2(np.asarray(kernel, dtype=self.dtype), s=self.period, workers=host_threads()))

    def correlate_tile(self, index, kernel_ft):
        """Correlation of tile ``index`` with the kernel of :meth:`kernel_transform` ``kernel_ft``,
        on its :meth:`tile_region` (a writable array); one thread's transform."""
        rows, cols = self.tile_region(index)
        product = np.multiply(self._tiles_ft[index], kernel_ft, out=_work_buffer(kernel_ft.shape, kernel_ft.dtype))
        tile = scipy.fft.irfft2(product, s=self.period, workers=1, overwrite_x=True)
        return tile[:rows.stop - rows.start, :cols.stop - cols.start]

    def weighted_tile_sum(self, index, groups):
        """``sum_t outer(rows_t, cols_t) * (tile * K_t)`` on tile ``index``'s :meth:`tile_region`.

        Parameters
        ----------
        index : int
        groups : sequence of (cols, terms)
            Terms that share one column factor: ``cols`` (this tile's valid
            columns, length ``valid_x``) and ``terms``, pairs ``(kernel_ft,
            rows)`` of :meth:`kernel_transform` and the row factor on this
            tile's valid rows.

        Returns
        -------
        ndarray
            The tile's sum over its region, in the correlator's dtype.

        Notes
        -----
        A row factor commutes with the transform along x, so every term is
        transformed back along y only, weighted by its row factor there
        (rows beyond the tile's valid ones, which wrap, get 0), and summed
        with the other terms of its group; each group then takes one real
        inverse transform along x and its column factor.  At spatial order 2
        that is 3 inverse x-transforms instead of 6 for the image and 5
        instead of 15 for the variance.
        """
        rows, cols = self.tile_region(index)
        n_rows, n_cols = rows.stop - rows.start, cols.stop - cols.start
        spectrum = self._tiles_ft[index]
        out = np.zeros((n_rows, n_cols), dtype=self.dtype)
        weights = np.zeros((self.period[0], 1), dtype=self.dtype)
        for column_factor, terms in groups:
            summed = None
            for kernel_ft, row_factor in terms:
                product = np.multiply(spectrum, kernel_ft, out=_work_buffer(kernel_ft.shape, kernel_ft.dtype))
                along_y = scipy.fft.ifft(product, axis=0, workers=1, overwrite_x=True)
                weights[:n_rows, 0] = row_factor
                along_y *= weights
                if summed is None:
                    summed = along_y.copy()
                else:
                    summed += along_y
            tile = scipy.fft.irfft(summed[:n_rows], n=self.period[1], axis=1, workers=1)[:, :n_cols]
            if not np.all(column_factor == 1):
                tile *= column_factor
            out += tile
        return out

    def correlate_tiles(self, kernel):
        """Correlations of every tile with one kernel.

        Parameters
        ----------
        kernel : ndarray of shape ``kernel_shape``

        Returns
        -------
        list of (tuple of slice, ndarray)
            ``(rows, cols)`` of the output image and the tile's correlation
            there (writable).
        """
        kernel_ft = self.kernel_transform(kernel)
        return [(self.tile_region(index), self.correlate_tile(index, kernel_ft)) for index in range(self.n_tiles)]
