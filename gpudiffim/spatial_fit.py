"""Spatial normal equations: from per-stamp systems to a spatially varying kernel.

Unknowns ``theta`` (``ip_diffim`` ``SpatialKernelSolution``):

* with a constant first term (Alard-Lupton or PCA bases): the scalar ``a_0``,
  then ``a_{i,t}`` for bases ``i = 1 .. n_b - 1`` and spatial terms
  ``t = 0 .. n_k - 1``, then background terms ``c_g``;
* otherwise ``a_{i,t}`` for every basis, then ``c_g``.

For candidate ``c`` at ``(x_c, y_c)`` with stamp normal matrix ``Q_c`` and
vector ``w_c`` (no regularisation), the map ``J_c`` takes ``theta`` to the
local parameters (local ``a_i = sum_t a_{i,t} P_t(x_c, y_c)``, local
background ``sum_g c_g Q_g(x_c, y_c)``), and

.. math:: M = \\sum_c J_c^T Q_c J_c, \\qquad b = \\sum_c J_c^T w_c.

This assumes each stamp's coefficients are constant over the stamp.
"""

from dataclasses import dataclass

import numpy as np

from ._backend import array_module_of, on_kernel_path, to_host
from .linalg import condition_number, solve_symmetric

__all__ = ["LocalParameterMaps", "local_parameter_maps", "local_parameter_structure", "spatial_normal_equations",
           "solve_spatial", "unpack_spatial"]


@dataclass(frozen=True)
class LocalParameterMaps:
    """The maps ``J_c`` in their sparse form: each unknown feeds one local parameter.

    Attributes
    ----------
    owner : ndarray of int, shape (n_theta,)
        Local parameter (row of ``J``) of each unknown.
    weights : ndarray of shape (N, n_theta)
        ``J_c[owner[a], a]``: the spatial term of unknown ``a`` at candidate ``c``.
    n_local : int
        Local parameters per stamp (``n_b`` + 1 with a background).
    """

    owner: np.ndarray
    weights: np.ndarray
    n_local: int

    def dense(self):
        """The dense stack ``J`` of shape (N, n_local, n_theta)."""
        n, n_theta = self.weights.shape
        maps = np.zeros((n, self.n_local, n_theta))
        maps[:, self.owner, np.arange(n_theta)] = self.weights
        return maps


def _probe(n):
    """Fixed, irregular projection vector of length ``n`` for :func:`_distinct_columns`."""
    return np.cos(np.arange(n) * 0.7548776662466927 + 0.5)


def _distinct_columns(array):
    """``(distinct, index)`` with ``array == distinct[:, index]``, exactly.

    Columns are told apart by a fixed projection (fast), checked exactly; on
    a projection collision, ``np.unique(axis=1)`` (slow: it sorts whole columns).
    """
    # an elementwise product summed down axis 0 adds every column in the same order,
    # so equal columns get bitwise equal keys (a BLAS product does not promise that)
    keys = (_probe(array.shape[0])[:, None] * array).sum(axis=0)
    _, first, index = np.unique(keys, return_index=True, return_inverse=True)
    distinct = array[:, first]
    if not np.array_equal(distinct[:, index], array, equal_nan=True):
        distinct, index = np.unique(array, axis=1, return_inverse=True)
    return distinct, index.reshape(-1)


def _structure_of_dense(maps):
    """:class:`LocalParameterMaps` of a dense ``J`` stack (one non-zero row per column)."""
    from ._cuda.spatial_assembly import spatial_map_structure

    maps = to_host(maps).astype(np.float64, copy=False)
    owner, weights = spatial_map_structure(maps)
    return LocalParameterMaps(owner, weights, maps.shape[1])


def local_parameter_structure(kernel_terms, bg_terms, n_basis, constant_first_term):
    """The maps ``J_c`` of every candidate, in sparse form.

    Parameters
    ----------
    kernel_terms : ndarray of shape (N, n_k)
        Kernel spatial terms ``P_t`` at each candidate centre.
    bg_terms : ndarray of shape (N, n_g) or None
        Background terms at each centre (None when no background is fitted).
    n_basis : int
    constant_first_term : bool

    Returns
    -------
    LocalParameterMaps
    """
    n, n_k = kernel_terms.shape
    n_g = 0 if bg_terms is None else bg_terms.shape[1]
    owner, columns = [], []
    if constant_first_term:
        owner.append(0)
        columns.append(np.ones((n, 1)))
    for i in range(1 if constant_first_term else 0, n_basis):
        owner.extend([i] * n_k)
        columns.append(kernel_terms)
    if bg_terms is not None:
        owner.extend([n_basis] * n_g)
        columns.append(bg_terms)
    weights = np.concatenate(columns, axis=1) if columns else np.zeros((n, 0))
    n_local = n_basis + (1 if bg_terms is not None else 0)
    return LocalParameterMaps(np.array(owner, dtype=np.int32), weights, n_local)


def local_parameter_maps(kernel_terms, bg_terms, n_basis, constant_first_term):
    """The dense matrices ``J_c`` for every candidate (see :func:`local_parameter_structure`).

    Returns
    -------
    ndarray of shape (N, n_b + [1], n_theta)
    """
    return local_parameter_structure(kernel_terms, bg_terms, n_basis, constant_first_term).dense()


def spatial_normal_equations(normal_matrices, normal_vectors, maps):
    """Accumulate ``M = sum J^T Q J`` and ``b = sum J^T w``.

    Parameters
    ----------
    normal_matrices : ndarray of shape (N, P, P)
    normal_vectors : ndarray of shape (N, P)
    maps : LocalParameterMaps or ndarray of shape (N, P, n_theta)

    Returns
    -------
    matrix : ndarray of shape (n_theta, n_theta)
    vector : ndarray of shape (n_theta,)
        NumPy arrays.  On the kernel path (``cupy``, ``cuda-emulator``) the
        sums are the ``gdi_spatial_normal_equations`` kernel
        (``kernels/spatial_assembly.cu``), fed with the sparse maps.
    """
    if not isinstance(maps, LocalParameterMaps):
        maps = _structure_of_dense(maps)
    if on_kernel_path(normal_matrices):
        from ._cuda import spatial_assembly

        xp = array_module_of(normal_matrices)
        matrix, vector = spatial_assembly.spatial_normal_equations_structured(
            xp.asarray(normal_matrices, dtype=np.float64), xp.asarray(normal_vectors, dtype=np.float64),
            xp.asarray(maps.owner), xp.asarray(maps.weights))
        return to_host(matrix), to_host(vector)
    normal_matrices = to_host(normal_matrices).astype(np.float64, copy=False)
    normal_vectors = to_host(normal_vectors)
    n, p = normal_matrices.shape[:2]
    owner, weights = maps.owner, maps.weights
    # M[a, b] = sum_n w[n, a] w[n, b] Q_n[owner a, owner b].  The weight columns
    # repeat (every basis shares the kernel's spatial terms), so with the distinct
    # columns u[n, c] one product G[c, d, i, j] = sum_n u_c u_d Q_n[i, j] holds it all.
    distinct, column = _distinct_columns(weights)
    pairs = (distinct[:, :, None] * distinct[:, None, :]).reshape(n, -1)
    gram = (pairs.T @ normal_matrices.reshape(n, p * p)).reshape(distinct.shape[1], distinct.shape[1], p, p)
    matrix = gram[column[:, None], column[None, :], owner[:, None], owner[None, :]]
    vector = np.einsum("na,na->a", weights, np.asarray(normal_vectors, dtype=np.float64)[:, owner])
    return 0.5 * (matrix + matrix.T), vector


def solve_spatial(matrix, vector, condition_type="EIGENVALUE"):
    """Solve the spatial system; also return its condition number and method."""
    solution, method = solve_symmetric(matrix, vector)
    return solution, condition_number(matrix, condition_type), method


def unpack_spatial(theta, n_basis, n_kernel_terms, n_bg_terms, constant_first_term):
    """Split ``theta`` into kernel coefficients ``(n_b, n_k)`` and background terms.

    The constant first term becomes row 0 ``[a_0, 0, ..., 0]``.
    """
    kernel = np.zeros((n_basis, n_kernel_terms))
    start = 0
    if constant_first_term:
        kernel[0, 0] = theta[0]
        start = 1
    for i in range(1 if constant_first_term else 0, n_basis):
        kernel[i] = theta[start:start + n_kernel_terms]
        start += n_kernel_terms
    background = theta[start:start + n_bg_terms]
    return kernel, background
