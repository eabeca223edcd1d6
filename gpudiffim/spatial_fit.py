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

from ._backend import to_host
from ._ops import operations_for
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


def _structure_of_dense(ops, maps):
    """:class:`LocalParameterMaps` of a dense ``J`` stack (one non-zero row per column)."""
    maps = to_host(maps).astype(np.float64, copy=False)
    owner, weights = ops.spatial_map_structure(maps)
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


def spatial_normal_equations(normal_matrices, normal_vectors, maps, *, ops=None):
    """Accumulate ``M = sum J^T Q J`` and ``b = sum J^T w``.

    Parameters
    ----------
    normal_matrices : ndarray of shape (N, P, P)
    normal_vectors : ndarray of shape (N, P)
    maps : LocalParameterMaps or ndarray of shape (N, P, n_theta)
    ops : object, optional
        The operations chosen once for the solve; from ``normal_matrices`` when omitted.

    Returns
    -------
    matrix : ndarray of shape (n_theta, n_theta)
    vector : ndarray of shape (n_theta,)
        NumPy arrays.  The sums are an operation of :mod:`gpudiffim._ops`:
        on the kernel path (``cupy``, ``cuda-emulator``) the
        ``gdi_spatial_normal_equations`` kernel (``kernels/spatial_assembly.cu``),
        fed with the sparse maps.
    """
    ops = operations_for(normal_matrices) if ops is None else ops
    if not isinstance(maps, LocalParameterMaps):
        maps = _structure_of_dense(ops, maps)
    return ops.spatial_normal_equations(normal_matrices, normal_vectors, maps.owner, maps.weights)


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
