"""Launch geometry and host wrapper of ``kernels/spatial_assembly.cu``.

Issue 4's kernel 4, the kernel-path twin of
:func:`gpudiffim.spatial_fit.spatial_normal_equations`: the spatial normal
equations ``M = sum J^T Q J``, ``b = sum J^T w`` from the per-stamp normal
equations and the local-parameter maps ``J`` (at most one non-zero row per
column, :func:`spatial_map_structure`).

The wrappers take NumPy arrays (run by the CPU emulator) or CuPy arrays (run
on the GPU), as :func:`~gpudiffim._cuda.launch.launcher_for` says; outputs are
allocated in the inputs' array module.
"""

import numpy as np

from .._backend import to_host
from ._host import on_launcher, output, prepare
from .launch import launch

__all__ = [
    "SPATIAL_BLOCK",
    "spatial_map_structure",
    "spatial_normal_equations",
    "spatial_normal_equations_geometry",
    "spatial_normal_equations_structured",
]

#: Block of ``gdi_spatial_normal_equations``: (columns b, rows a) of the output.
SPATIAL_BLOCK = (16, 16)


def spatial_normal_equations_geometry(n_theta):
    """``(grid, block)`` of ``gdi_spatial_normal_equations``: one thread per matrix element.

    ``grid.x`` covers the columns ``b`` and ``grid.y`` the rows ``a`` of the
    ``(n_theta, n_theta)`` output in :data:`SPATIAL_BLOCK` tiles.
    """
    bx, by = SPATIAL_BLOCK
    n = max(int(n_theta), 1)
    return (-(-n // bx), -(-n // by)), SPATIAL_BLOCK


def spatial_map_structure(maps):
    """Owner rows and values of the local-parameter maps ``J``.

    Parameters
    ----------
    maps : ndarray of shape (N, P, n_theta)
        :func:`gpudiffim.spatial_fit.local_parameter_maps`; NumPy or CuPy.

    Returns
    -------
    owner : ndarray of shape (n_theta,), int32
        The one row of column ``a`` that is non-zero in some stamp (0 for an
        all-zero column).
    weights : ndarray of shape (N, n_theta), float64
        ``maps[n, owner[a], a]``.

    Raises
    ------
    ValueError
        If a column has non-zero entries in more than one row (in one stamp
        or across stamps): the kernel's sparse product would be wrong.
    """
    _, xp = on_launcher(maps)
    maps = xp.asarray(maps, dtype=np.float64)
    if maps.ndim != 3:
        msg = f"maps must be 3-D (N, P, n_theta), got shape {maps.shape}"
        raise ValueError(msg)
    n, p, n_theta = maps.shape
    used = (maps != 0).any(axis=0)  # (P, n_theta); NaN counts as non-zero
    rows = used.sum(axis=0)
    shared = xp.flatnonzero(rows > 1)
    if shared.size:  # synchronizes! (CuPy: the size of a data-dependent result)
        columns = [int(a) for a in shared[:10].tolist()]
        msg = (f"maps columns {columns} have non-zero entries in more than one row; the spatial kernel "
               f"needs at most one local parameter per unknown (spatial_fit.local_parameter_maps)")
        raise ValueError(msg)
    if p == 0:
        return xp.zeros(n_theta, dtype=np.int32), xp.zeros((n, n_theta))
    owner = used.argmax(axis=0).astype(np.int32)
    weights = xp.ascontiguousarray(maps[:, owner, xp.arange(n_theta)])
    return owner, weights


def spatial_normal_equations(normal_matrices, normal_vectors, maps, *, out=None):
    """Spatial normal equations ``M = sum J^T Q J``, ``b = sum J^T w`` (``gdi_spatial_normal_equations``).

    Parameters
    ----------
    normal_matrices : ndarray of shape (N, P, P)
        Per-stamp normal matrices ``Q_n``; NumPy or CuPy.
    normal_vectors : ndarray of shape (N, P)
        Per-stamp normal vectors ``w_n``.
    maps : ndarray of shape (N, P, n_theta)
        Local-parameter maps ``J_n`` (:func:`gpudiffim.spatial_fit.local_parameter_maps`),
        at most one non-zero row per column (:func:`spatial_map_structure`).
    out : tuple of two ndarrays, optional
        Buffers ``(matrix, vector)`` of shapes (n_theta, n_theta) and (n_theta,), float64.

    Returns
    -------
    matrix : ndarray of shape (n_theta, n_theta), float64
        ``sum_n J_n^T (Q_n + Q_n^T) / 2 J_n``, exactly symmetric.
    vector : ndarray of shape (n_theta,), float64
        ``sum_n J_n^T w_n``.

    Raises
    ------
    ValueError
        On inconsistent shapes, maps that are not one-row-per-column, or wrong
        ``out`` shapes.
    """
    _, xp = on_launcher(normal_matrices, normal_vectors, maps)
    maps = xp.asarray(maps, dtype=np.float64)
    if maps.ndim != 3:
        msg = f"maps must be 3-D (N, P, n_theta), got shape {maps.shape}"
        raise ValueError(msg)
    n, p, n_theta = maps.shape
    if normal_matrices.shape != (n, p, p) or normal_vectors.shape != (n, p):
        msg = (f"normal_matrices {normal_matrices.shape} and normal_vectors {normal_vectors.shape} do not "
               f"match maps {maps.shape}: expected {(n, p, p)} and {(n, p)}")
        raise ValueError(msg)
    owner, weights = spatial_map_structure(maps)
    return spatial_normal_equations_structured(normal_matrices, normal_vectors, owner, weights, out=out)


def spatial_normal_equations_structured(normal_matrices, normal_vectors, owner, weights, *, out=None):
    """:func:`spatial_normal_equations` from the map structure (no dense ``J``).

    Parameters
    ----------
    normal_matrices : ndarray of shape (N, P, P)
    normal_vectors : ndarray of shape (N, P)
    owner : ndarray of int, shape (n_theta,)
        Local parameter (row of ``J``) of each unknown.
    weights : ndarray of shape (N, n_theta)
        ``J_n[owner[a], a]``.
    out
        As :func:`spatial_normal_equations`.
    """
    _, xp = on_launcher(normal_matrices, normal_vectors, weights)
    normal_matrices = prepare(xp, normal_matrices, np.float64, 3, "normal_matrices")
    normal_vectors = prepare(xp, normal_vectors, np.float64, 2, "normal_vectors")
    n, p = normal_vectors.shape
    host_owner = to_host(owner).astype(np.int64)   # checked on the host (a host array needs no read-back)
    owner = xp.ascontiguousarray(xp.asarray(host_owner), dtype=np.int32)
    weights = prepare(xp, weights, np.float64, 2, "weights")
    n_theta = owner.shape[0]
    if normal_matrices.shape != (n, p, p) or weights.shape != (n, n_theta):
        msg = (f"normal_matrices {normal_matrices.shape}, normal_vectors {normal_vectors.shape} and weights "
               f"{weights.shape} do not match: expected {(n, p, p)} and {(n, n_theta)}")
        raise ValueError(msg)
    if n_theta and p and not (0 <= host_owner.min() and host_owner.max() < p):
        msg = f"owner rows must lie in [0, {p}), got [{host_owner.min()}, {host_owner.max()}]"
        raise ValueError(msg)
    matrix, vector = (None, None) if out is None else out
    matrix = output(xp, matrix, (n_theta, n_theta), np.float64, "out[0] (matrix)")
    vector = output(xp, vector, (n_theta,), np.float64, "out[1] (vector)")
    if n_theta and p == 0:
        matrix[...] = 0.0  # no local parameter: every column of J is zero
        vector[...] = 0.0
    elif n_theta:
        grid, block = spatial_normal_equations_geometry(n_theta)
        launch("gdi_spatial_normal_equations", grid, block,
               (normal_matrices, normal_vectors, owner, weights, n, p, n_theta, matrix, vector))
    return matrix, vector
