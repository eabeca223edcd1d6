"""The fitted spatially varying PSF-matching kernel and differential background.

The kernel is a linear combination of fixed basis kernels whose coefficients
are spatial functions of the parent coordinate:

.. math:: K(u, v; x, y) = \\sum_i f_i(x, y)\\, B_i(u, v),
          \\qquad f_i(x, y) = \\sum_t a_{i,t} P_t(x, y).

Kernel images use the ``afw`` correlation layout of :mod:`gpudiffim.convolve`
(``K[h + v, h + u]`` weights the input pixel at offset ``(u, v)``), so they
compare pixel for pixel with ``ip_diffim`` kernel images.
"""

import weakref
from dataclasses import dataclass

import numpy as np

from ._backend import array_module_of, moved, on_device
from .spatial import SpatialFunction

__all__ = ["SpatialKernel", "BackgroundModel"]


#: Per kernel, its term kernels already in an array module (by the module's name).
_TERM_KERNEL_COPIES = weakref.WeakKeyDictionary()
#: Per kernel, its basis already where the images live (:meth:`SpatialKernel.place_basis`).
_PLACED_BASES = weakref.WeakKeyDictionary()


def _read_only(array):
    array = np.array(array, dtype=np.float64)
    array.flags.writeable = False
    return array


@dataclass(frozen=True, eq=False)
class SpatialKernel:
    """A spatially varying linear-combination kernel.

    Parameters
    ----------
    basis : ndarray of shape (n_basis, kh, kw)
        Basis kernel images.
    coefficients : ndarray of shape (n_basis, n_terms)
        ``a[i, t]``: weight of spatial term ``t`` in the coefficient of basis ``i``.
    spatial_function : SpatialFunction
        The spatial terms ``P_t``.
    """

    basis: np.ndarray
    coefficients: np.ndarray
    spatial_function: SpatialFunction

    def __post_init__(self):
        object.__setattr__(self, "basis", _read_only(self.basis))
        object.__setattr__(self, "coefficients", _read_only(self.coefficients))
        expected = (self.basis.shape[0], self.spatial_function.n_terms)
        if self.coefficients.shape != expected:
            msg = f"coefficients have shape {self.coefficients.shape}, expected {expected}"
            raise ValueError(msg)

    @property
    def shape(self):
        """Kernel image shape (rows, columns)."""
        return self.basis.shape[1:]

    @property
    def n_basis(self):
        """Number of basis kernels."""
        return self.basis.shape[0]

    @property
    def is_spatially_invariant(self):
        """True when no coefficient varies over the image."""
        return not np.any(self.coefficients[:, 1:])

    def basis_coefficients(self, x, y):
        """Coefficients ``f_i(x, y)`` of the basis kernels at a parent position.

        Returns
        -------
        ndarray of shape (n_basis,)
        """
        return self.coefficients @ self.spatial_function.terms(float(x), float(y))

    def image(self, x, y):
        """Kernel image realised at parent position ``(x, y)``.

        Returns
        -------
        ndarray of shape (kh, kw)
        """
        return np.tensordot(self.basis_coefficients(x, y), self.basis, axes=1)

    def images(self, x, y, xp=np):
        """Kernel images realised at many parent positions at once.

        Parameters
        ----------
        x, y : array_like of shape (N,)
            Host coordinates.
        xp : module
            Where to build the images: ``numpy`` (the basis coefficients at
            each position, then their basis sums), or on the GPU ``cupy``: the
            spatial terms (N, n_terms) are copied there and multiplied with
            the :meth:`term_kernels` there (formed from the placed basis):
            the same images, summed in another order.

        Returns
        -------
        ndarray of shape (N, kh, kw)
        """
        terms = self.spatial_function.terms(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64))
        return self.images_of_terms(moved(terms, xp) if on_device(xp) else terms)

    def images_of_terms(self, terms):
        """Kernel images at positions whose spatial terms are given, where the terms live.

        Parameters
        ----------
        terms : ndarray of shape (N, n_terms)
            ``P_t`` at each position (float64), NumPy or CuPy.

        Returns
        -------
        ndarray of shape (N, kh, kw)
            In the terms' array module: on the host the basis coefficients at
            each position, then their basis sums; on the GPU the terms times
            the :meth:`term_kernels` formed there (the same images, summed in
            another order).
        """
        xp = array_module_of(terms)
        if on_device(xp):
            return (terms @ self._term_kernel_rows(xp)).reshape(len(terms), *self.shape)
        return np.tensordot(terms @ self.coefficients.T, self.basis, axes=1)

    def _term_kernel_rows(self, xp):
        """:meth:`term_kernels` as rows (n_terms, kh kw) in ``xp``."""
        return self.term_kernels(xp).reshape(self.spatial_function.n_terms, -1)

    def place_basis(self, basis):
        """Record this kernel's basis as it already lives on the device (``basis``, (n_basis, kh, kw)).

        :meth:`term_kernels` then forms the term kernels there from the
        coefficients (``n_basis x n_terms`` values moved) instead of copying
        the host's images.  For this kernel object only (the basis of one
        subtraction, as its fit built it there).
        """
        _PLACED_BASES[self] = basis

    def kernel_sum(self, x, y):
        """Sum of the kernel image at ``(x, y)`` (the photometric scaling)."""
        return float(self.basis_coefficients(x, y) @ self.basis.sum(axis=(1, 2)))

    def term_kernels(self, xp=np):
        """Kernel image of each spatial term: ``K_t = sum_i a[i, t] B_i``.

        ``K(x, y) = sum_t P_t(x, y) K_t``; applying the kernel to an image is
        therefore a handful of fixed-kernel correlations weighted by the
        spatial terms (exact at every pixel).

        Parameters
        ----------
        xp : module
            Where to form them: ``numpy``, or ``cupy`` (once per kernel):
            from the basis placed there (:meth:`place_basis`; only the
            coefficients are moved, the same sums in another order), else the
            host's images copied.

        Returns
        -------
        ndarray of shape (n_terms, kh, kw)
        """
        if not on_device(xp):
            return np.tensordot(self.coefficients.T, self.basis, axes=1)
        copies = _TERM_KERNEL_COPIES.setdefault(self, {})
        if xp.__name__ not in copies:
            basis = _PLACED_BASES.get(self)
            copies[xp.__name__] = (moved(self.term_kernels(), xp) if basis is None else
                                   (xp.asarray(self.coefficients.T) @ basis.reshape(self.n_basis, -1))
                                   .reshape((-1,) + self.shape))
        return copies[xp.__name__]


@dataclass(frozen=True, eq=False)
class BackgroundModel:
    """Differential background ``b(x, y) = sum_t c_t Q_t(x, y)``.

    Parameters
    ----------
    coefficients : ndarray of shape (n_terms,)
    spatial_function : SpatialFunction
    """

    coefficients: np.ndarray
    spatial_function: SpatialFunction

    def __post_init__(self):
        object.__setattr__(self, "coefficients", _read_only(self.coefficients))

    def __call__(self, x, y, xp=np):
        """Background at parent coordinates ``(x, y)`` (host scalars or arrays), copied to ``xp`` if given."""
        values = self.spatial_function.evaluate(self.coefficients, x, y)
        return moved(values, xp) if on_device(xp) else values

    def of_terms(self, terms):
        """Background at positions whose spatial terms ``Q_t`` (N, n_terms) are given, float64 (N,), where
        the terms live (on the GPU only the coefficients are moved)."""
        xp = array_module_of(terms)
        return terms @ (xp.asarray(self.coefficients) if on_device(xp) else self.coefficients)

    def image(self, shape, xy0=(0, 0), xp=np):
        """Background on a pixel grid of ``shape`` whose element [0, 0] is ``xy0``.

        Built in array module ``xp`` (``numpy``, or ``cupy`` on the GPU).
        """
        x = xy0[0] + np.arange(shape[1])
        y = xy0[1] + np.arange(shape[0])
        return self.spatial_function.evaluate_grid(self.coefficients, x, y, xp=xp)
