"""The CuPy stand-in itself: it refuses what CuPy refuses, and its runs give the NumPy backend's answers.

The budget tests that use it are in ``tests/test_gpu_budget.py``.
"""

import numpy as np
import pytest

from cupy_standin import StandinError, Tape, cupy_standin, to_device
from gpudiffim import ImagePsfMatchTask, PsfMatchConfig
from gpudiffim._ops import KERNELS
from gpudiffim.testing import make_fake_pair


@pytest.fixture(scope="module")
def small_pair():
    return make_fake_pair(shape=(160, 160), n_stars=40, seed=5)


def _host(array):
    return array.get() if hasattr(array, "get") else np.asarray(array)


def test_what_cupy_refuses_is_refused():
    with cupy_standin() as recorder:
        import cupy

        device = cupy.arange(6.0)
        with pytest.raises(StandinError, match="__array__"):
            np.asarray(device)
        with pytest.raises(StandinError, match="numpy.mean"):
            np.mean(device)
        with pytest.raises(StandinError, match="host numpy.ndarray"):
            _ = device + np.ones(6)
        with pytest.raises(StandinError, match="cupy.concatenate"):
            cupy.concatenate([device, np.ones(2)])
        assert isinstance(np.float64(2.0) * device, cupy.ndarray)  # a NumPy scalar is fine, as in CuPy
        before = recorder.syncs
        assert float(device.sum()) == 15.0 and device.get().tolist() == [0, 1, 2, 3, 4, 5]
        assert recorder.syncs == before + 2
        upload = cupy.asarray(np.ones(4))
        assert recorder.bytes("h2d") == 32 and upload.shape == (4,)
    import gpudiffim._backend

    assert gpudiffim._backend.compute_backend() == "numpy"   # uninstalled afterwards


def test_argsort_is_stable_as_in_cupy():
    values = np.array([1.0, 0.0, 1.0, 0.0] * 50)
    with cupy_standin():
        import cupy

        order = cupy.argsort(cupy.asarray(values)).get()
    np.testing.assert_array_equal(order, np.argsort(values, kind="stable"))


def test_fast_kernels_equal_the_emulator(small_pair):
    """The NumPy versions of the kernels (fast mode) give what the emulated .cu gives, through the pipeline."""
    config = PsfMatchConfig(spatial_kernel_order=1)
    results = {}
    for mode in ("emulator", "numpy"):
        with cupy_standin(kernels=mode) as recorder:
            result = ImagePsfMatchTask(config).subtract_masked_images(to_device(small_pair.template),
                                                                      to_device(small_pair.science))
            results[mode] = (result.kernel_cell_set.column("status"), result.psf_matching_kernel.coefficients,
                             _host(result.subtracted_image.image), _host(result.subtracted_image.variance),
                             _host(result.subtracted_image.mask), recorder.launches)
    emulated, fast = results["emulator"], results["numpy"]
    np.testing.assert_array_equal(emulated[0], fast[0])
    np.testing.assert_allclose(emulated[1], fast[1], rtol=1e-6, atol=1e-12)   # sums in another order
    np.testing.assert_allclose(emulated[2], fast[2], rtol=1e-5, atol=1e-3)   # float32 images
    np.testing.assert_allclose(emulated[3], fast[3], rtol=1e-5)
    np.testing.assert_array_equal(emulated[4], fast[4])
    assert emulated[5] == fast[5] > 10


@pytest.mark.parametrize("footprint", [np.ones((3, 5), dtype=np.int32),
                                       np.array([[0, 1, 0], [1, 1, 0], [0, 1, 1]], dtype=np.int32)])
def test_fast_mask_filters_equal_the_emulator(footprint):
    mask = (np.random.default_rng(3).random((2, 17, 23)) < 0.05).astype(np.int32) * 4
    outputs = []
    for mode in ("emulator", "numpy"):
        with cupy_standin(kernels=mode):
            import cupy

            outputs.append(_host(KERNELS.propagate_mask(cupy.asarray(mask), footprint)))
    np.testing.assert_array_equal(outputs[0], outputs[1])
    assert outputs[0].sum() > mask.sum()


def test_standin_run_gives_the_numpy_backends_answer():
    pair = make_fake_pair(shape=(256, 256), n_stars=80, seed=9, n_variables=3)
    config = PsfMatchConfig()
    reference = ImagePsfMatchTask(config).subtract_masked_images(pair.template, pair.science)
    with cupy_standin(kernels="numpy"):
        result = ImagePsfMatchTask(config).subtract_masked_images(to_device(pair.template),
                                                                  to_device(pair.science))
        quality = result.quality
    np.testing.assert_array_equal(result.kernel_cell_set.column("status"),
                                  reference.kernel_cell_set.column("status"))
    np.testing.assert_allclose(result.psf_matching_kernel.coefficients,
                               reference.psf_matching_kernel.coefficients, rtol=1e-7, atol=1e-10)
    sigma = np.sqrt(reference.subtracted_image.variance)
    difference = (_host(result.subtracted_image.image) - reference.subtracted_image.image) / sigma
    assert np.nanmax(np.abs(difference)) < 1e-3       # float32 rounding at bright stars (sigma ~ 5 ADU)
    np.testing.assert_array_equal(_host(result.subtracted_image.mask), reference.subtracted_image.mask)
    np.testing.assert_allclose(quality["spatial_std"], reference.quality["spatial_std"], rtol=1e-6)


@pytest.mark.parametrize("config", [
    {"kernel_basis_set": "delta-function", "kernel_size": 9, "spatial_kernel_order": 1},
    {"kernel_basis_set": "delta-function", "kernel_size": 9, "spatial_kernel_order": 1, "pca_method": "spatial",
     "pca_deregularization": 3},
    {"use_pca_for_spatial_kernel": True, "spatial_kernel_order": 1},
    {"iterate_single_kernel": True, "constant_variance_weighting": False, "check_condition_number": True},
], ids=["delta-function", "delta-function-pca-options", "pca", "iterated-weights"])
def test_other_configurations_on_the_cupy_branches(config):
    """The device-resident solve in the other fitting modes: the NumPy backend's decisions and coefficients."""
    pair = make_fake_pair(shape=(256, 256), n_stars=80, seed=4)
    config = PsfMatchConfig(**config)
    reference = ImagePsfMatchTask(config).subtract_masked_images(pair.template, pair.science)
    with cupy_standin(kernels="numpy"):
        result = ImagePsfMatchTask(config).subtract_masked_images(to_device(pair.template),
                                                                  to_device(pair.science))
    np.testing.assert_array_equal(result.kernel_cell_set.column("status"),
                                  reference.kernel_cell_set.column("status"))
    np.testing.assert_allclose(result.psf_matching_kernel.coefficients, reference.psf_matching_kernel.coefficients,
                               rtol=0, atol=1e-7)


def _subtract(pair, config, **standin):
    with cupy_standin(kernels="numpy", **standin) as recorder:
        template, science = to_device(pair.template), to_device(pair.science)
        result = ImagePsfMatchTask(config).subtract_masked_images(template, science)
        return recorder, result.kernel_cell_set.column("status"), result.kernel_cell_set.column("reason")


def test_a_replayed_tape_takes_the_same_path_without_device_work():
    """A replay (``cupy_standin(tape=..., replay=True)``) makes every call, launch, sync and upload of the
    recorded run, at the same sites, and reaches the same decisions from the recorded read-backs, with
    no emulated device work; a run that asks for other operations raises."""
    pair = make_fake_pair(shape=(256, 256), n_stars=80, seed=4)
    tape = Tape()
    recorded, status, reasons = _subtract(pair, PsfMatchConfig(), tape=tape)
    replayed, replayed_status, replayed_reasons = _subtract(pair, PsfMatchConfig(), tape=tape, replay=True)
    assert len(tape) > 100 and tape.position == len(tape)
    assert [(e.kind, e.name, e.site, e.nbytes) for e in replayed.events] == \
        [(e.kind, e.name, e.site, e.nbytes) for e in recorded.events]
    np.testing.assert_array_equal(replayed_status, status)
    np.testing.assert_array_equal(replayed_reasons, reasons)
    assert replayed.device_seconds < 0.2 * recorded.device_seconds     # bookkeeping only
    with pytest.raises(StandinError, match="replay diverged"):
        _subtract(pair, PsfMatchConfig(variance_correction="none"), tape=tape, replay=True)
