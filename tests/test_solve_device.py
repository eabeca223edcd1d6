"""The solve loop's device-only shortcuts, on the CuPy stand-in, against the NumPy backend.

On the GPU a stamp fit leaves the pseudo-inverse of rank-deficient systems
to the solve loop (``gpudiffim.stamps.fit_stamps(defer_rank_deficient=True)``),
which fits those stamps again after the batch's read-back; the decisions and
the stamp solutions must be the NumPy backend's.
"""

import dataclasses

import numpy as np
from cupy_standin import cupy_standin, to_device

from gpudiffim import ImagePsfMatchTask, PsfMatchConfig, solve
from gpudiffim._backend import array_module_of
from gpudiffim.linalg import EIGENVECTOR
from gpudiffim.testing import make_fake_pair


def _blank_some_templates(monkeypatch, value=0.0):
    """Every 5th candidate's template stamp set to ``value``: with zero its normal matrix is the
    background's alone (rank-deficient, solved by the pseudo-inverse), with NaN not finite."""
    original = solve._Solver.batch

    def batch(self, index):
        stamps = original(self, index)
        rows = np.flatnonzero(np.asarray(index) % 5 == 0)
        if not rows.size:
            return stamps
        template = stamps.template.copy()
        template[array_module_of(template).asarray(rows)] = value
        return dataclasses.replace(stamps, template=template)

    monkeypatch.setattr(solve._Solver, "batch", batch)


def _deferrals(monkeypatch):
    """The ``defer_rank_deficient`` of every stamp fit, and whether it deferred."""
    calls, original = [], solve.fit_stamps

    def fit_stamps(*args, defer_rank_deficient=False, **kwargs):
        fit = original(*args, defer_rank_deficient=defer_rank_deficient, **kwargs)
        calls.append((defer_rank_deficient, fit.deferred, len(fit.coefficients)))
        return fit

    monkeypatch.setattr(solve, "fit_stamps", fit_stamps)
    return calls


def test_deferred_rank_deficient_stamps_get_the_numpy_solutions(monkeypatch):
    _blank_some_templates(monkeypatch)
    calls = _deferrals(monkeypatch)
    pair = make_fake_pair(shape=(256, 256), n_stars=80, seed=4)
    config = PsfMatchConfig()
    reference = ImagePsfMatchTask(config).subtract_masked_images(pair.template, pair.science)
    assert all(not deferred for _, deferred, _ in calls)       # the host solves every system at once
    calls.clear()
    with cupy_standin(kernels="numpy"):
        result = ImagePsfMatchTask(config).subtract_masked_images(to_device(pair.template),
                                                                  to_device(pair.science))
        local = result.residual_rows.local.get()          # the refitted stamps' D/sigma rows patched in
    np.testing.assert_array_equal(result.residual_rows.index, reference.residual_rows.index)
    np.testing.assert_allclose(local, reference.residual_rows.local, rtol=0, atol=1e-6, equal_nan=True)
    assert any(deferred for _, deferred, _ in calls)
    assert any(not defer for defer, _, _ in calls)              # a batch had deficient stamps: fitted again
    cells, expected = result.kernel_cell_set, reference.kernel_cell_set
    np.testing.assert_array_equal(cells.column("status"), expected.column("status"))
    np.testing.assert_array_equal(cells.column("reason"), expected.column("reason"))
    np.testing.assert_allclose(cells.column("kernel_sum"), expected.column("kernel_sum"), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(result.psf_matching_kernel.coefficients, reference.psf_matching_kernel.coefficients,
                               rtol=0, atol=1e-7)


def test_the_host_backend_never_defers():
    from gpudiffim._ops import NUMPY

    matrices = np.zeros((2, 3, 3))
    matrices[:, 0, 0] = 1.0
    solutions, status, deferred = NUMPY.solve_systems_deferred(matrices, np.ones((2, 3)))
    assert not deferred
    np.testing.assert_array_equal(status, [EIGENVECTOR, EIGENVECTOR])
    np.testing.assert_allclose(solutions, [[1, 0, 0], [1, 0, 0]])


def test_spatial_kernel_images_on_the_device_equal_the_host_ones():
    """Built from the term kernels on the GPU (summed in another order): the host images to rounding,
    the term kernels copied once per kernel."""
    from gpudiffim.kernel import SpatialKernel
    from gpudiffim.spatial import SpatialFunction

    gen = np.random.default_rng(5)
    function = SpatialFunction("chebyshev1", 2, (0, 0, 511, 511))
    kernel = SpatialKernel(gen.normal(size=(7, 9, 9)), gen.normal(size=(7, function.n_terms)), function)
    x, y = gen.uniform(0, 511, 40), gen.uniform(0, 511, 40)
    want = kernel.images(x, y)
    with cupy_standin(kernels="numpy") as recorder:
        import cupy

        got = kernel.images(x, y, xp=cupy)
        first = recorder.uploads
        again = kernel.images(x[:3], y[:3], xp=cupy)
        assert recorder.uploads == first + 1               # the spatial terms only
        got, again = got.get(), again.get()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12 * np.abs(want).max())
    np.testing.assert_allclose(again, want[:3], rtol=0, atol=1e-12 * np.abs(want).max())


def _cholesky_cases(gen, n):
    """Symmetric positive definite systems (n > the small-system kernel's limit), then one zero, one
    indefinite, one NaN and one rank-deficient matrix: what Cholesky cannot take."""
    square = gen.normal(size=(6, n, n))
    matrices = square @ square.transpose(0, 2, 1) + n * np.eye(n)
    matrices[6 - 4] = 0.0
    matrices[6 - 3] -= 3 * n * np.eye(n)
    matrices[6 - 2, 1, 1] = np.nan
    column = gen.normal(size=n)
    matrices[6 - 1] = np.outer(column, column)
    return matrices, gen.normal(size=(6, n))


def test_device_cholesky_defers_what_it_cannot_take(rng):
    """Large stamp systems on the device (with deferral): batched Cholesky gives the host's Cholesky
    solutions (``LU`` status); the systems it cannot take come back ``EIGENVECTOR`` with zeros, deferred,
    and solved again without deferral they get :func:`~gpudiffim.linalg.solve_batch_status`'s answers."""
    from gpudiffim._lapack import cholesky_in_place, cholesky_solve
    from gpudiffim._ops import KERNELS
    from gpudiffim.linalg import LU, solve_batch_status

    gen, seed = rng
    n = 70
    matrices, vectors = _cholesky_cases(gen, n)
    basis = np.eye(n - 1).reshape(n - 1, 1, n - 1)
    codes = np.zeros(6, dtype=np.int32)
    with cupy_standin(kernels="numpy") as recorder:
        import cupy

        device = cupy.asarray(matrices), cupy.asarray(vectors), cupy.asarray(codes), cupy.asarray(basis)
        syncs = recorder.syncs
        outcome, _, _, deferred = KERNELS.solve_stamps(*device, True, 7, defer=True)
        assert recorder.syncs == syncs, "no read-back in the solve"
        outcome = outcome.get()
        again, _, _, _ = KERNELS.solve_stamps(*device, True, 7, defer=False)
        again = again.get()
    assert deferred
    np.testing.assert_array_equal(outcome[:, 1], [LU, LU, EIGENVECTOR, EIGENVECTOR, EIGENVECTOR, EIGENVECTOR])
    np.testing.assert_array_equal(outcome[:, 0], 0)                  # deferred: not failed (yet)
    assert not outcome[2:, 4:].any()
    for k in range(2):
        factor = np.ascontiguousarray(matrices[k])
        cholesky_in_place(factor)
        np.testing.assert_allclose(outcome[k, 4:], cholesky_solve(factor, vectors[k])[:n - 1], rtol=1e-10,
                                   err_msg=f"seed={seed}")
    _, status = solve_batch_status(matrices, vectors)
    np.testing.assert_array_equal(again[:, 1], status, err_msg=f"seed={seed}")


def test_delta_function_stamps_cholesky_cannot_take_get_the_numpy_decisions(monkeypatch):
    """The delta-function basis on the device: every 5th template NaN (its system is not finite), those
    stamps deferred by the device Cholesky and fitted again (failed); the decisions and kernel are the
    NumPy backend's."""
    _blank_some_templates(monkeypatch, np.nan)
    calls = _deferrals(monkeypatch)
    pair = make_fake_pair(shape=(256, 256), n_stars=80, seed=4)
    config = PsfMatchConfig(kernel_basis_set="delta-function", kernel_size=9, spatial_kernel_order=1,
                            lambda_type="absolute")      # (the automatic choice needs finite stamps)
    reference = ImagePsfMatchTask(config).subtract_masked_images(pair.template, pair.science)
    calls.clear()
    with cupy_standin(kernels="numpy"):
        result = ImagePsfMatchTask(config).subtract_masked_images(to_device(pair.template),
                                                                  to_device(pair.science))
    assert any(deferred for _, deferred, _ in calls)
    assert any(not defer for defer, _, _ in calls)              # the blanked stamps: fitted again
    cells, expected = result.kernel_cell_set, reference.kernel_cell_set
    np.testing.assert_array_equal(cells.column("status"), expected.column("status"))
    np.testing.assert_array_equal(cells.column("reason"), expected.column("reason"))
    np.testing.assert_allclose(result.psf_matching_kernel.coefficients, reference.psf_matching_kernel.coefficients,
                               rtol=0, atol=1e-7)


def _batch_sizes(monkeypatch):
    """The number of stamps of every batch the solve loop fits."""
    sizes, original = [], solve._Solver._build_batch

    def build_batch(self, index, *args):
        sizes.append(len(index))
        return original(self, index, *args)

    monkeypatch.setattr(solve._Solver, "_build_batch", build_batch)
    return sizes


def test_spares_fitted_ahead_give_the_numpy_decisions_in_fewer_passes(monkeypatch):
    """On the GPU the first pass also fits, per cell, the next candidates a visit would reach after
    rejections (``solve._SPARES_PER_CELL``): the kernel-sum restarts of this pair (seven passes of
    10, 5, 3, 2, 1, 1, 1 replacements) then find most replacements fitted.  Every decision, reason
    and stamp solution is the NumPy backend's, and a spare never visited is not reported as fitted."""
    sizes = _batch_sizes(monkeypatch)
    pair = make_fake_pair(shape=(768, 768), n_stars=800, seed=3)
    config = PsfMatchConfig()
    reference = ImagePsfMatchTask(config).subtract_masked_images(pair.template, pair.science)
    assert sizes == [180, 10, 5, 3, 2, 1, 1, 1]                 # the host fits each pass's replacements
    results, ahead = {}, solve._SPARES_PER_CELL
    assert ahead > 0
    for spares in (0, ahead):
        monkeypatch.setattr(solve, "_SPARES_PER_CELL", spares)
        sizes.clear()
        with cupy_standin(kernels="numpy"):
            result = ImagePsfMatchTask(config).subtract_masked_images(to_device(pair.template),
                                                                      to_device(pair.science))
        results[spares] = (list(sizes), result)
    assert results[0][0] == [180, 10, 5, 3, 2, 1, 1, 1]
    assert len(results[ahead][0]) == 2 and results[ahead][0][0] > 180      # spares in the first batch's room
    result = results[ahead][1]
    cells, expected = result.kernel_cell_set, reference.kernel_cell_set
    for column in ("status", "reason"):
        np.testing.assert_array_equal(cells.column(column), expected.column(column))
    np.testing.assert_allclose(cells.column("kernel_sum"), expected.column("kernel_sum"), rtol=1e-9, atol=1e-12,
                               equal_nan=True)
    np.testing.assert_array_equal(result.residual_rows.index, reference.residual_rows.index)
    np.testing.assert_allclose(result.psf_matching_kernel.coefficients, reference.psf_matching_kernel.coefficients,
                               rtol=0, atol=1e-7)
