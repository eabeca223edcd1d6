"""Spatial normal equations: from per-stamp systems to a spatially varying kernel.

Unknowns ``theta`` (``ip_diffim`` ``SpatialKernelSolution``):

* with a constant first term (Alard-Lupton or PCA bases): the scalar ``a_0``,
  then ``a_{i,t}`` for bases ``i = 1 .. n_b - 1`` and spatial terms
  ``t = 0 .. n_k - 1``, then background terms ``c_g``;
* otherwise ``a_{i,t}`` for every basis, then ``c_g``.

Those bases carry the kernel sum in basis 0 alone (the others sum to zero),
so ``a_0`` constant means a constant kernel sum.  The kernel sum may instead
follow the first ``n_s`` spatial terms (a lower order than the shape,
``PsfMatchConfig.spatial_kernel_sum_order``): basis 0 then has ``n_s``
unknowns ``a_{0,0..n_s-1}``.  A basis whose kernels all carry a sum (the
delta functions) gets the same model from the linear constraints
``sum_i s_i a_{i,t} = 0`` for ``t >= n_s`` (``s_i`` the sum of basis ``i``),
which :class:`KernelSumConstraint` eliminates from the system.

For candidate ``c`` at ``(x_c, y_c)`` with stamp normal matrix ``Q_c`` and
vector ``w_c`` (no regularisation), the map ``J_c`` takes ``theta`` to the
local parameters (local ``a_i = sum_t a_{i,t} P_t(x_c, y_c)``, local
background ``sum_g c_g Q_g(x_c, y_c)``), and

.. math:: M = \\sum_c J_c^T Q_c J_c, \\qquad b = \\sum_c J_c^T w_c.

This assumes each stamp's coefficients are constant over the stamp.
"""

from dataclasses import dataclass

import numpy as np

from ._backend import array_module_of, to_host
from ._ops import operations_for
from .linalg import condition_number, solve_symmetric

__all__ = ["KernelSumConstraint", "LocalParameterMaps", "kernel_sum_constraint", "local_parameter_maps",
           "local_parameter_structure", "spatial_normal_equations", "solve_spatial", "unpack_spatial"]


@dataclass(frozen=True)
class LocalParameterMaps:
    """The maps ``J_c`` in their sparse form: each unknown feeds one local parameter.

    Attributes
    ----------
    owner : ndarray of int, shape (n_theta,)
        Local parameter (row of ``J``) of each unknown.
    weights : ndarray of shape (N, n_theta)
        ``J_c[owner[a], a]``: the spatial term of unknown ``a`` at candidate ``c``
        (in the terms' array module: on the GPU, formed there).
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


def local_parameter_structure(kernel_terms, bg_terms, n_basis, constant_first_term, n_first_terms=1):
    """The maps ``J_c`` of every candidate, in sparse form.

    Parameters
    ----------
    kernel_terms : ndarray of shape (N, n_k)
        Kernel spatial terms ``P_t`` at each candidate centre, NumPy or CuPy.
    bg_terms : ndarray of shape (N, n_g) or None
        Background terms at each centre, in the same array module (None when
        no background is fitted).
    n_basis : int
    constant_first_term : bool
        Basis 0 (the kernel sum) has its own, lower-order spatial model.
    n_first_terms : int
        With ``constant_first_term``, basis 0 varies with the first
        ``n_first_terms`` spatial terms (1: constant, as ``ip_diffim``).

    Returns
    -------
    LocalParameterMaps
        ``owner`` on the host, ``weights`` where the terms live.
    """
    xp = array_module_of(kernel_terms)
    n, n_k = kernel_terms.shape
    n_g = 0 if bg_terms is None else bg_terms.shape[1]
    owner, columns = [], []
    if constant_first_term:
        owner.extend([0] * n_first_terms)
        columns.append(kernel_terms[:, :n_first_terms] if n_first_terms > 1 else xp.ones((n, 1)))
    for i in range(1 if constant_first_term else 0, n_basis):
        owner.extend([i] * n_k)
        columns.append(kernel_terms)
    if bg_terms is not None:
        owner.extend([n_basis] * n_g)
        columns.append(bg_terms)
    weights = xp.concatenate(columns, axis=1) if columns else xp.zeros((n, 0))
    n_local = n_basis + (1 if bg_terms is not None else 0)
    return LocalParameterMaps(np.array(owner, dtype=np.int32), weights, n_local)


def local_parameter_maps(kernel_terms, bg_terms, n_basis, constant_first_term, n_first_terms=1):
    """The dense matrices ``J_c`` for every candidate (see :func:`local_parameter_structure`).

    Returns
    -------
    ndarray of shape (N, n_b + [1], n_theta)
    """
    return local_parameter_structure(kernel_terms, bg_terms, n_basis, constant_first_term, n_first_terms).dense()


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


@dataclass(frozen=True)
class KernelSumConstraint:
    """Unknowns eliminated by the kernel-sum constraints: ``theta[eliminated] = R theta[kept]``.

    Attributes
    ----------
    kept, eliminated : ndarray of int
        Indices into ``theta``.
    reduction : ndarray of shape (n_eliminated, n_kept)
        ``R``.
    """

    kept: np.ndarray
    eliminated: np.ndarray
    reduction: np.ndarray

    def reduce(self, matrix, vector):
        """The system in the kept unknowns: ``Z^T M Z``, ``Z^T b`` with ``Z = [I; R]`` (rows reordered)."""
        kept, gone, r = self.kept, self.eliminated, self.reduction
        cross = matrix[np.ix_(kept, gone)] @ r
        reduced = matrix[np.ix_(kept, kept)] + cross + cross.T + r.T @ matrix[np.ix_(gone, gone)] @ r
        return reduced, vector[kept] + r.T @ vector[gone]

    def expand(self, solution):
        """``theta`` from the kept unknowns."""
        theta = np.empty(len(self.kept) + len(self.eliminated))
        theta[self.kept] = solution
        theta[self.eliminated] = self.reduction @ solution
        return theta


def kernel_sum_constraint(basis_sums, n_kernel_terms, n_sum_terms, n_theta):
    """Constraints holding the kernel sum of a basis without a constant first term to ``n_sum_terms`` terms.

    The kernel sum at ``(x, y)`` is ``sum_t P_t(x, y) sum_i s_i a_{i,t}``;
    for every term ``t >= n_sum_terms`` the constraint ``sum_i s_i a_{i,t} =
    0`` eliminates the unknown of the basis with the largest ``|s_i|``.

    Parameters
    ----------
    basis_sums : ndarray of shape (n_b,)
        Sum of each basis kernel.
    n_kernel_terms, n_sum_terms : int
        Spatial terms of the kernel shape and of its sum (``n_sum_terms <=
        n_kernel_terms``).
    n_theta : int
        Unknowns of the spatial system (background terms last).

    Returns
    -------
    KernelSumConstraint or None
        None when nothing is constrained (``n_sum_terms == n_kernel_terms``).
    """
    sums = np.asarray(basis_sums, dtype=np.float64)
    if n_sum_terms >= n_kernel_terms:
        return None
    pivot = int(np.argmax(np.abs(sums)))
    others = np.flatnonzero(np.arange(len(sums)) != pivot)
    terms = np.arange(n_sum_terms, n_kernel_terms)
    eliminated = pivot * n_kernel_terms + terms
    kept = np.setdiff1d(np.arange(n_theta), eliminated)
    where = np.searchsorted(kept, others[None, :] * n_kernel_terms + terms[:, None])
    reduction = np.zeros((len(terms), len(kept)))
    np.put_along_axis(reduction, where, np.broadcast_to(-sums[others] / sums[pivot], where.shape), axis=1)
    return KernelSumConstraint(kept, eliminated, reduction)


def solve_spatial(matrix, vector, condition_type="EIGENVALUE", constraint=None):
    """Solve the spatial system; also return its condition number and method.

    With a :class:`KernelSumConstraint` the system is solved in the kept
    unknowns (its condition number is that of the reduced matrix) and
    ``theta`` is expanded to every unknown.
    """
    if constraint is None:
        solution, method = solve_symmetric(matrix, vector)
        return solution, condition_number(matrix, condition_type), method
    matrix, vector = constraint.reduce(np.asarray(matrix), np.asarray(vector))
    solution, method = solve_symmetric(matrix, vector)
    return constraint.expand(solution), condition_number(matrix, condition_type), method


def unpack_spatial(theta, n_basis, n_kernel_terms, n_bg_terms, constant_first_term, n_first_terms=1):
    """Split ``theta`` into kernel coefficients ``(n_b, n_k)`` and background terms.

    The constant first term becomes row 0 ``[a_0, 0, ..., 0]`` (with
    ``n_first_terms``, its first ``n_first_terms`` entries).
    """
    kernel = np.zeros((n_basis, n_kernel_terms))
    start = 0
    if constant_first_term:
        kernel[0, :n_first_terms] = theta[:n_first_terms]
        start = n_first_terms
    for i in range(1 if constant_first_term else 0, n_basis):
        kernel[i] = theta[start:start + n_kernel_terms]
        start += n_kernel_terms
    background = theta[start:start + n_bg_terms]
    return kernel, background
