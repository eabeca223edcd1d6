"""Spatial functions for the kernel coefficients and the differential background.

Terms follow ``afw``'s 2-D ordering by total degree, x power descending
within a degree: ``1, x, y, x^2, xy, y^2, x^3, x^2 y, ...``.  For the
"chebyshev1" model, term ``x^i y^j`` stands for ``T_i(x') T_j(y')`` with
``x' = 2 (x - (x_min + x_max)/2) / (x_max - x_min)`` where the box spans pixel
*edges* (``x_min = bbox_x0 - 0.5``, ``x_max = bbox_x1 + 0.5``), no clamping.
The "polynomial" model uses monomials of raw parent-pixel coordinates.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np

from .config import SPATIAL_MODEL_TYPES
from .errors import ConfigurationError

__all__ = ["GridFactors", "SpatialFunction", "term_exponents"]


def term_exponents(order):
    """Exponents ``(i, j)`` of ``x^i y^j`` for every term, in ``afw`` order.

    Parameters
    ----------
    order : int
        Total degree (>= 0).

    Returns
    -------
    list of tuple of int
        ``(order + 1)(order + 2)/2`` pairs.
    """
    return [(degree - j, j) for degree in range(order + 1) for j in range(degree + 1)]


def _chebyshev_powers(t, order):
    """T_0..T_order evaluated at ``t``, stacked on a new last axis."""
    values = [np.ones_like(t), t]
    for _ in range(2, order + 1):
        values.append(2.0 * t * values[-1] - values[-2])
    return np.stack(values[: order + 1], axis=-1)


def _monomial_powers(t, order):
    return np.stack([t**k for k in range(order + 1)], axis=-1)


@dataclass(frozen=True)
class SpatialFunction:
    """Basis of 2-D spatial functions of a given total order over a box.

    Parameters
    ----------
    model_type : {"chebyshev1", "polynomial"}
        Function family.
    order : int
        Total degree.
    bbox : tuple of int
        Parent pixel box ``(x0, y0, x1, y1)``, inclusive; used by "chebyshev1".
    """

    model_type: str
    order: int
    bbox: tuple

    def __post_init__(self):
        if self.model_type not in SPATIAL_MODEL_TYPES:
            msg = f"invalid spatial model type {self.model_type!r}: expected one of {SPATIAL_MODEL_TYPES}"
            raise ConfigurationError(msg)
        if isinstance(self.order, bool) or not isinstance(self.order, int) or self.order < 0:
            msg = f"invalid spatial order {self.order!r}: expected an integer >= 0"
            raise ConfigurationError(msg)
        x0, y0, x1, y1 = self.bbox
        if x1 < x0 or y1 < y0:
            msg = f"invalid bbox {self.bbox!r}: expected (x0, y0, x1, y1) with x1 >= x0 and y1 >= y0"
            raise ConfigurationError(msg)

    @property
    def n_terms(self):
        """Number of terms, ``(order + 1)(order + 2)/2``."""
        return (self.order + 1) * (self.order + 2) // 2

    def axis_scaling(self, axis):
        """``(mid, width)`` of the Chebyshev scaling ``t' = 2 (t - mid) / width`` along ``axis`` (0: y,
        1: x), from the box's pixel edges; None for the "polynomial" model (raw coordinates)."""
        if self.model_type == "polynomial":
            return None
        x0, y0, x1, y1 = self.bbox
        low, high = (y0 - 0.5, y1 + 0.5) if axis == 0 else (x0 - 0.5, x1 + 0.5)
        return 0.5 * (low + high), high - low

    def _axis_coordinate(self, t, axis):
        """Coordinates ``t`` along ``axis`` (0: y, 1: x) as the functions use them (float64)."""
        t = np.asarray(t, dtype=np.float64)
        scaling = self.axis_scaling(axis)
        if scaling is None:
            return t
        mid, width = scaling
        return 2.0 * (t - mid) / width

    def normalized(self, x, y):
        """Coordinates as used by the functions: Chebyshev-scaled or raw."""
        return self._axis_coordinate(x, 1), self._axis_coordinate(y, 0)

    def terms(self, x, y):
        """Every term evaluated at parent coordinates ``(x, y)``.

        Parameters
        ----------
        x, y : float or array_like
            Parent-pixel coordinates (x = column, y = row), broadcastable.

        Returns
        -------
        ndarray of shape (..., n_terms)
        """
        xn, yn = np.broadcast_arrays(*self.normalized(x, y))
        powers = _chebyshev_powers if self.model_type == "chebyshev1" else _monomial_powers
        px, py = powers(xn, self.order), powers(yn, self.order)
        return np.stack([px[..., i] * py[..., j] for i, j in term_exponents(self.order)], axis=-1)

    def evaluate(self, coefficients, x, y):
        """Sum of ``coefficients[t] * term_t(x, y)``.

        Parameters
        ----------
        coefficients : array_like of shape (n_terms,)
        x, y : float or array_like
            Parent coordinates.

        Returns
        -------
        ndarray or float
        """
        coefficients = np.asarray(coefficients, dtype=np.float64)
        return self.terms(x, y) @ coefficients

    def axis_powers(self, t, axis):
        """Powers ``0..order`` of the 1-D factor along ``axis`` (0: y, 1: x) at parent coordinates ``t``.

        Returns
        -------
        ndarray of shape (order + 1, len(t))
            Row ``k``: ``T_k(t')`` (Chebyshev, ``t'`` from :meth:`axis_scaling`) or ``t^k``.
        """
        powers = _chebyshev_powers if self.model_type == "chebyshev1" else _monomial_powers
        return powers(self._axis_coordinate(t, axis), self.order).T

    def grid_factors(self, x, y):
        """Separable factors of every term on the outer grid of 1-D ``x`` and ``y``.

        Term ``t`` on the grid is ``outer(rows[t], cols[t])``.

        Parameters
        ----------
        x : array_like of shape (N,)
            Parent x (column) coordinates.
        y : array_like of shape (M,)
            Parent y (row) coordinates.

        Returns
        -------
        list of tuple of ndarray
            ``(rows[t] of shape (M,), cols[t] of shape (N,))`` per term.
        """
        px, py = self.axis_powers(x, 1), self.axis_powers(y, 0)
        return [(py[j], px[i]) for i, j in term_exponents(self.order)]

    def evaluate_grid(self, coefficients, x, y, xp=np):
        """Evaluate on the outer grid of 1-D ``x`` (columns) and ``y`` (rows).

        Returns an array of shape ``(len(y), len(x))`` in array module ``xp``
        (``numpy``, or ``cupy`` to build it on the GPU) without forming the
        full term cube: ``(rows * c) @ cols^T``, one matrix product of the
        separable 1-D factors.
        """
        factors = self.grid_factors(x, y)
        rows = np.stack([r for r, _ in factors], axis=1) * np.asarray(coefficients, dtype=np.float64)
        cols = np.stack([c for _, c in factors], axis=1)
        return xp.asarray(rows) @ xp.asarray(cols).T


@dataclass(frozen=True)
class GridFactors(Sequence):
    """Separable factors of every term of ``function`` on a pixel grid, as a sequence.

    Item ``t`` is ``(rows[t] of shape (rows,), cols[t] of shape (columns,))``
    (float64, host), term ``t`` on the grid being ``outer(rows[t], cols[t])``,
    as :meth:`SpatialFunction.grid_factors` of the grid's parent coordinates
    ``x = x0 + arange(columns)``, ``y = y0 + arange(rows)``.  The grid is kept
    as its origin and shape, so that a device path can build the 1-D tables
    where the image lives instead of uploading them.

    Parameters
    ----------
    function : SpatialFunction
    x0, y0 : int
        Parent coordinates of grid pixel ``[0, 0]`` (column, row).
    rows, columns : int
        Grid shape.
    """

    function: SpatialFunction
    x0: int
    y0: int
    rows: int
    columns: int

    @cached_property
    def exponents(self):
        """``(i, j)`` of term ``t``: its row factor is power ``j`` in y, its column factor power ``i`` in x."""
        return term_exponents(self.function.order)

    @cached_property
    def tables(self):
        """``(y_powers (order + 1, rows), x_powers (order + 1, columns))`` on the host, float64."""
        f = self.function
        return (f.axis_powers(self.y0 + np.arange(self.rows), 0), f.axis_powers(self.x0 + np.arange(self.columns), 1))

    def __len__(self):
        return self.function.n_terms

    def __getitem__(self, term):
        i, j = self.exponents[term]
        y_powers, x_powers = self.tables
        return y_powers[j], x_powers[i]


def product_expansion(model_type, order):
    """Express products of two spatial terms in the terms of order ``2 order``.

    For monomials ``x^i x^k = x^(i+k)``; for Chebyshev polynomials
    ``T_i T_k = (T_(i+k) + T_|i-k|) / 2`` (per axis).  Used to apply
    ``K(x, y)^2`` (variance propagation) with ``(2o+1)(2o+2)/2`` fixed-kernel
    correlations instead of one per pair of terms.

    Parameters
    ----------
    model_type : {"chebyshev1", "polynomial"}
    order : int

    Returns
    -------
    ndarray of shape (n_terms, n_terms, n_product_terms)
        ``E[t, u, s]``: ``P_t P_u = sum_s E[t, u, s] R_s`` with ``R_s`` the
        terms of order ``2 order`` (same model, same box).  Read-only: one
        array per ``(model_type, order)``, made once (every application of a
        kernel asks for it).
    """
    return _product_expansion(model_type, order)


@lru_cache(maxsize=None)
def _product_expansion(model_type, order):
    SpatialFunction(model_type, order, (0, 0, 0, 0))  # validates both arguments
    terms = term_exponents(order)
    index = {pair: s for s, pair in enumerate(term_exponents(2 * order))}
    expansion = np.zeros((len(terms), len(terms), len(index)))

    def axis_products(i, k):
        if model_type == "polynomial":
            return [(i + k, 1.0)]
        return [(i + k, 0.5), (abs(i - k), 0.5)]

    for t, (ix, iy) in enumerate(terms):
        for u, (kx, ky) in enumerate(terms):
            for px, cx in axis_products(ix, kx):
                for py, cy in axis_products(iy, ky):
                    expansion[t, u, index[(px, py)]] += cx * cy
    expansion.flags.writeable = False
    return expansion
