"""Two backends, one answer: the kernel path against the NumPy reference, end to end.

* ``cuda-emulator`` runs the whole subtraction through the CUDA kernels of
  ``kernels/`` compiled by g++ (no GPU): it must equal the NumPy backend to
  1e-6 relative, with the same candidates accepted and rejected;
* ``cupy`` (``@pytest.mark.gpu``, skipped without a GPU): kernel coefficients
  to 1e-8 relative in float64, images to 1e-5 relative in float32; NumPy
  inputs give NumPy outputs and CuPy inputs CuPy outputs.
"""

import numpy as np
import pytest

from gpudiffim import ImagePsfMatchTask, MaskedImage, PsfMatchConfig, use_backend
from gpudiffim._cuda import emulator as emulator_module
from gpudiffim.quality import quality_table
from gpudiffim.testing import make_fake_pair

CONFIG = PsfMatchConfig(fit_for_background=True, spatial_kernel_order=1, spatial_bg_order=1,
                        size_cell_x=64, size_cell_y=64)


@pytest.fixture(scope="module")
def pair():
    return make_fake_pair(shape=(192, 192), n_stars=45, seed=11, n_variables=2, n_cosmic_rays=3)


def _subtract(pair, backend, config=CONFIG, template=None, science=None):
    with use_backend(backend):
        return ImagePsfMatchTask(config).subtract_masked_images(
            template if template is not None else pair.template,
            science if science is not None else pair.science)


def _relative(a, b, where=None):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if where is not None:
        a, b = a[where], b[where]
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _statuses(result):
    return [(c.x, c.y, c.status, c.reason) for c in result.kernel_cell_set.candidates]


@pytest.fixture(scope="module")
def reference(pair):
    return _subtract(pair, "numpy")


def _assert_same_science(result, reference, coefficient_rtol, image_rtol):
    assert _statuses(result) == _statuses(reference)
    kernel, expected = result.psf_matching_kernel, reference.psf_matching_kernel
    assert _relative(kernel.coefficients, expected.coefficients) < coefficient_rtol
    assert _relative(result.background_model.coefficients, reference.background_model.coefficients) \
        < coefficient_rtol
    for name in ("matched_image", "subtracted_image"):
        got, want = getattr(result, name), getattr(reference, name)
        got_host = got.to_module(np)
        assert np.array_equal(got_host.mask, want.mask), name
        valid = (want.mask & want.bits(["EDGE", "NO_DATA"])) == 0
        assert _relative(got_host.image, want.image, valid) < image_rtol, name
        assert _relative(got_host.variance, want.variance, valid) < image_rtol, name


#: Entry points the kernel path must launch in a subtraction (AL basis, background fitted).
PIPELINE_KERNELS = {"gdi_cut_stamps<float>", "gdi_correlate_stamps<double>", "gdi_normal_equations<double>",
                    "gdi_stamp_residuals", "gdi_spatial_normal_equations",
                    "gdi_accumulate_terms<float>", "gdi_or_filter_1d", "gdi_copy_edge<float>",
                    "gdi_spatial_powers<float>", "gdi_spatial_powers<double>", "gdi_spatial_terms",
                    # the noise measurements (variance correction, noise correlation)
                    "gdi_sorted_quantiles", "gdi_bin_medians<double>", "gdi_sky_sources",
                    "gdi_sky_value_planes<float>", "gdi_subtract_mean", "gdi_correlation_near",
                    "gdi_sky_normalised<float>",
                    # detection and candidate selection
                    "gdi_footprint_scan", "gdi_footprint_peak", "gdi_footprint_centres", "gdi_select_rows",
                    "gdi_core_snr<float>", "gdi_star_sigmas<float>",
                    "gdi_stamps_flagged", "gdi_fill_grid", "gdi_detection_residual<float>",
                    "gdi_detection_residual<double>", "gdi_bin_sort_keys", "gdi_sorted_bin_medians"}


@pytest.mark.slow
def _launched_kernels(monkeypatch):
    """The set that every kernel the emulator runs from now on (this test) is added to, by name."""
    launched = set()
    run = emulator_module.run

    def counting_run(unit, defines, name, *args):
        launched.add(name)
        return run(unit, defines, name, *args)

    monkeypatch.setattr(emulator_module, "run", counting_run)
    return launched


def test_cuda_emulator_pipeline_matches_numpy(emulator, pair, reference, monkeypatch):
    launched = _launched_kernels(monkeypatch)
    result = _subtract(pair, "cuda-emulator")
    assert launched == PIPELINE_KERNELS, "every hot operation must go through its kernel"
    assert len([c for c in result.kernel_cell_set.candidates if c.status == "GOOD"]) >= 6
    _assert_same_science(result, reference, 1e-6, 1e-6)
    assert isinstance(result.subtracted_image.image, np.ndarray)


#: What the delta-function basis launches in place of the design and its products (issue 13).
DELTA_FUNCTION_KERNELS = {"gdi_delta_function_normal_equations"}


def test_cuda_emulator_delta_function_basis_matches_numpy(emulator, pair, monkeypatch):
    config = PsfMatchConfig(kernel_basis_set="delta-function", kernel_size=9, fit_for_background=True,
                            spatial_kernel_order=0, spatial_bg_order=0, size_cell_x=64, size_cell_y=64)
    expected = _subtract(pair, "numpy", config)
    launched = _launched_kernels(monkeypatch)
    result = _subtract(pair, "cuda-emulator", config)
    assert DELTA_FUNCTION_KERNELS <= launched, "the stamp systems must come from the stamps, without a design"
    assert not {"gdi_correlate_stamps<double>", "gdi_normal_equations<double>"} & launched
    _assert_same_science(result, expected, 1e-6, 1e-6)


@pytest.mark.gpu
def test_cupy_pipeline_matches_numpy_float32(pair, reference):
    result = _subtract(pair, "cupy")
    _assert_same_science(result, reference, 1e-8, 1e-5)
    assert isinstance(result.subtracted_image.image, np.ndarray), "NumPy in, NumPy out"


@pytest.mark.gpu
def test_cupy_pipeline_matches_numpy_float64(pair):
    template, science = (MaskedImage(m.image.astype(np.float64), m.mask, m.variance.astype(np.float64))
                         for m in (pair.template, pair.science))
    expected = _subtract(pair, "numpy", template=template, science=science)
    result = _subtract(pair, "cupy", template=template, science=science)
    _assert_same_science(result, expected, 1e-8, 1e-8)


@pytest.mark.gpu
def test_cupy_inputs_stay_on_the_device(pair, reference):
    import cupy

    template, science = (MaskedImage(cupy.asarray(m.image), cupy.asarray(m.mask), cupy.asarray(m.variance))
                         for m in (pair.template, pair.science))
    result = _subtract(pair, "cupy", template=template, science=science)
    for name in ("matched_image", "subtracted_image"):
        image = getattr(result, name)
        assert all(isinstance(p, cupy.ndarray) for p in (image.image, image.mask, image.variance))
    _assert_same_science(result, reference, 1e-8, 1e-5)
    # the quality report takes the device planes too (copied to the host for its arithmetic)
    table = quality_table(result, template, science)
    np.testing.assert_allclose(table["local_std"], reference.quality["local_std"], rtol=1e-6)


def _other_size_pair():
    """A pair of another shape with the same PSFs (same basis), for the compile-once tests."""
    return make_fake_pair(shape=(160, 224), n_stars=40, seed=12)


def test_cuda_emulator_compiles_once_for_any_image_size(emulator, pair):
    _subtract(pair, "cuda-emulator")
    compiled = emulator_module.library.cache_info().misses
    other = _other_size_pair()
    result = _subtract(other, "cuda-emulator", template=other.template, science=other.science)
    assert result.subtracted_image.shape == (160, 224)
    assert emulator_module.library.cache_info().misses == compiled, "a new image size must not recompile"


@pytest.mark.gpu
def test_cupy_compiles_once_for_any_image_size(pair, monkeypatch):
    import cupy

    _subtract(pair, "cupy")
    built = []
    raw_module = cupy.RawModule

    def counting_module(*args, **kwargs):
        built.append(kwargs.get("name_expressions"))
        return raw_module(*args, **kwargs)

    monkeypatch.setattr(cupy, "RawModule", counting_module)
    other = _other_size_pair()
    _subtract(other, "cupy", template=other.template, science=other.science)
    assert built == [], "a new image size must not recompile"
