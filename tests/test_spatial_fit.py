"""Spatial normal equations from the sparse maps equal the dense ``sum J^T Q J``."""

import numpy as np
import pytest
from numpy.testing import assert_allclose

from gpudiffim._ops import _distinct_columns
from gpudiffim.spatial_fit import local_parameter_structure, spatial_normal_equations


def _dense_reference(matrices, vectors, maps):
    n, p, n_theta = maps.shape
    matrix = np.einsum("npa,npq,nqb->ab", maps, 0.5 * (matrices + matrices.transpose(0, 2, 1)), maps)
    return matrix, np.einsum("npa,np->a", maps, vectors)


@pytest.mark.parametrize("constant_first_term", [True, False])
@pytest.mark.parametrize("n_bg", [0, 1, 3])
def test_sparse_equals_dense(constant_first_term, n_bg):
    rng = np.random.default_rng(np.random.SeedSequence().entropy)
    n, n_basis, n_k = 40, 5, 3
    matrices = rng.normal(size=(n, n_basis + (n_bg > 0), n_basis + (n_bg > 0)))
    vectors = rng.normal(size=(n, n_basis + (n_bg > 0)))
    structure = local_parameter_structure(rng.normal(size=(n, n_k)), rng.normal(size=(n, n_bg)) if n_bg else None,
                                          n_basis, constant_first_term)
    expected = _dense_reference(matrices, vectors, structure.dense())
    for maps in (structure, structure.dense()):
        matrix, vector = spatial_normal_equations(matrices, vectors, maps)
        assert_allclose(matrix, expected[0], rtol=1e-12, atol=1e-12)
        assert_allclose(vector, expected[1], rtol=1e-12, atol=1e-12)
        assert np.array_equal(matrix, matrix.T)


def test_distinct_columns_deduplicate_exactly():
    rng = np.random.default_rng(5)
    base = rng.normal(size=(50, 3))
    array = np.concatenate([base, base[:, ::-1], base[:, :1]], axis=1)
    distinct, index = _distinct_columns(array)
    assert distinct.shape[1] == 3
    assert np.array_equal(distinct[:, index], array)


def test_distinct_columns_survive_projection_collisions(monkeypatch):
    import gpudiffim._ops as ops

    monkeypatch.setattr(ops, "_probe", np.zeros)   # every column collides
    rng = np.random.default_rng(6)
    base = rng.normal(size=(8, 4))
    array = np.concatenate([base, base[:, :2]], axis=1)
    distinct, index = _distinct_columns(array)
    assert distinct.shape[1] == 4
    assert np.array_equal(distinct[:, index], array)


@pytest.mark.gpu
def test_dense_device_maps_equal_the_host_result():
    import cupy

    rng = np.random.default_rng(np.random.SeedSequence().entropy)
    n, n_basis, n_k = 30, 4, 3
    matrices, vectors = rng.normal(size=(n, n_basis + 1, n_basis + 1)), rng.normal(size=(n, n_basis + 1))
    dense = local_parameter_structure(rng.normal(size=(n, n_k)), rng.normal(size=(n, 1)), n_basis, True).dense()
    expected = spatial_normal_equations(matrices, vectors, dense)
    got = spatial_normal_equations(cupy.asarray(matrices), cupy.asarray(vectors), cupy.asarray(dense))
    for g, e in zip(got, expected):
        assert_allclose(cupy.asnumpy(g), e, rtol=1e-12, atol=1e-12)

