"""The host (NumPy) speed-ups of issue 17 against the exact computations they replace.

* :class:`gpudiffim.convolve.TiledCorrelator` (overlap-save tiles) against
  the direct correlation sum and :class:`~gpudiffim.convolve.FourierCorrelator`;
* the NumPy full-image application by tiles against the whole-image
  transforms of the kernel path's routine.
"""

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view
from numpy.testing import assert_allclose

from gpudiffim import apply
from gpudiffim._ops import NUMPY
from gpudiffim.convolve import FourierCorrelator, TiledCorrelator


def _direct(image, kernel):
    """Same-size ``afw`` correlation with zeros outside the image, as a direct sum (float64)."""
    hy, hx = kernel.shape[0] // 2, kernel.shape[1] // 2
    padded = np.pad(np.asarray(image, dtype=np.float64), ((hy, hy), (hx, hx)))
    return np.einsum("yxji,ji->yx", sliding_window_view(padded, kernel.shape), kernel)


def _assemble(correlator, kernel):
    out = np.full(correlator.shape, np.nan, dtype=correlator.dtype)
    for (rows, cols), values in correlator.correlate_tiles(kernel):
        out[rows, cols] = values
    return out


@pytest.mark.parametrize(("shape", "kernel_shape", "tile_side"), [
    ((64, 64), (5, 5), 24),         # many tiles, last ones clipped
    ((97, 53), (7, 3), 32),         # odd, non-square image and kernel
    ((40, 30), (11, 11), 768),      # one tile larger than the image
    ((131, 70), (21, 21), 40),      # tiles barely larger than the kernel
])
def test_tiled_correlator_equals_direct_sum(shape, kernel_shape, tile_side):
    rng = np.random.default_rng(sum(shape) + tile_side)
    image = rng.normal(size=shape) * 10 + 100
    image[shape[0] // 2, shape[1] // 3] += 1e4
    kernel = rng.normal(size=kernel_shape)
    got = _assemble(TiledCorrelator(image, kernel_shape, np.float64, tile_side), kernel)
    expected = _direct(image, kernel)
    assert np.isfinite(got).all()                      # every output pixel covered once
    assert_allclose(got, expected, rtol=0, atol=1e-12 * np.abs(expected).max())


def test_tiled_correlator_float32_at_fft_rounding():
    """float32 tiles are as close to the exact sum as the whole-image float32 transform."""
    rng = np.random.default_rng(3)
    image = (rng.normal(size=(300, 260)) * 5 + 50).astype(np.float32)
    image[150, 100] = 5e4
    kernel = rng.normal(size=(21, 21))
    expected = _direct(image, kernel)
    scale = np.abs(expected).max()
    tiled = _assemble(TiledCorrelator(image, kernel.shape, np.float32, 96), kernel)
    whole = FourierCorrelator(image, kernel.shape, np.float32).correlate(kernel)
    assert tiled.dtype == np.float32
    assert np.abs(tiled - expected).max() < 1e-6 * scale
    assert np.abs(tiled - expected).max() < 4 * max(np.abs(whole - expected).max(), 1e-7 * scale)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_tiled_application_equals_whole_image_application(dtype):
    """The NumPy routine (tiles) and the kernel path's routine (whole image) give the same weighted sum."""
    rng = np.random.default_rng(11)
    image = (rng.normal(size=(150, 120)) * 5 + 40).astype(dtype)
    kernels = rng.normal(size=(4, 9, 9))
    kernels[2] = 0.0                                   # an all-zero term is skipped by both
    factors = [(rng.normal(size=150), rng.normal(size=120)) for _ in kernels]
    tiled = NUMPY.weighted_correlations(image, kernels, factors, dtype)
    whole = NUMPY.weighted_correlations_whole(image, kernels, factors, dtype)
    rtol = 1e-12 if dtype == np.float64 else 1e-6
    assert tiled.dtype == dtype
    assert_allclose(tiled, whole, rtol=0, atol=rtol * np.abs(whole).max())


@pytest.mark.parametrize(("shape", "half_y", "half_x"), [
    ((3, 40, 50), 4, 4),        # a stack of bands, the sky masks' growth
    ((30, 25), 10, 10),         # the kernel box of the default 21 x 21 kernel
    ((6, 9), 7, 2),             # box larger than the plane along y
    ((12, 12), 0, 3),           # one axis left alone
])
@pytest.mark.parametrize("dtype", [bool, np.int32])
def test_or_box_equals_maximum_filter_per_bit(shape, half_y, half_x, dtype):
    """The shifted-OR box of the host path is every bit's maximum filter (zeros outside), on both paths."""
    from scipy import ndimage

    from gpudiffim._ops import KERNELS

    rng = np.random.default_rng(len(shape) + half_y)
    if dtype is bool:
        mask = rng.random(shape) > 0.97
    else:
        mask = np.where(rng.random(shape) > 0.95, rng.integers(1, 1 << 12, shape), 0).astype(np.int32)
    size = (1,) * (mask.ndim - 2) + (2 * half_y + 1, 2 * half_x + 1)
    expected = np.zeros(shape, dtype=np.int64)
    for bit in range(12 if dtype is not bool else 1):
        plane = ((mask.astype(np.int64) >> bit) & 1).astype(np.uint8)
        expected |= ndimage.maximum_filter(plane, size=size, mode="constant").astype(np.int64) << bit
    before = mask.copy()
    for ops in (NUMPY, KERNELS):
        out = ops.or_box(mask, half_y, half_x)
        assert out.dtype == (bool if dtype is bool else np.int32)
        np.testing.assert_array_equal(out.astype(np.int64), expected)
    np.testing.assert_array_equal(mask, before)     # the input is not modified


def test_host_threads_do_not_change_the_result(monkeypatch):
    """Stamp correlations and the tiled application split into blocks with disjoint outputs: one and
    three host threads give bit-identical fits and images."""
    from gpudiffim import ImagePsfMatchTask, PsfMatchConfig
    from gpudiffim.testing import make_fake_pair

    pair = make_fake_pair(shape=(384, 384), n_stars=150, seed=3)
    results = []
    for threads in ("1", "3"):
        monkeypatch.setenv("GPUDIFFIM_HOST_THREADS", threads)
        results.append(ImagePsfMatchTask(PsfMatchConfig()).subtract_masked_images(pair.template, pair.science))
    one, three = results
    np.testing.assert_array_equal(one.psf_matching_kernel.coefficients, three.psf_matching_kernel.coefficients)
    for plane in ("image", "variance", "mask"):
        np.testing.assert_array_equal(getattr(one.subtracted_image, plane), getattr(three.subtracted_image, plane))


@pytest.mark.parametrize("value", ["0", "two", "-1"])
def test_host_threads_variable_is_checked(monkeypatch, value):
    from gpudiffim import ConfigurationError
    from gpudiffim._backend import host_threads

    monkeypatch.setenv("GPUDIFFIM_HOST_THREADS", value)
    with pytest.raises(ConfigurationError, match="GPUDIFFIM_HOST_THREADS"):
        host_threads()


def test_tiled_application_is_the_same_on_any_number_of_threads(monkeypatch):
    """Tiles of the full-image application run on the host threads, each with every term in order."""
    import gpudiffim.convolve as convolve

    monkeypatch.setattr(convolve, "TILE_SIDE", 64)          # 6 x 5 tiles of a 300 x 230 image
    rng = np.random.default_rng(12)
    image = (rng.normal(size=(300, 230)) * 5 + 40).astype(np.float32)
    kernels = rng.normal(size=(5, 9, 9))
    factors = [(rng.normal(size=300), rng.normal(size=230)) for _ in kernels]
    sums = []
    for threads in ("1", "2", "7"):
        monkeypatch.setenv("GPUDIFFIM_HOST_THREADS", threads)
        sums.append(NUMPY.weighted_correlations(image, kernels, factors, np.float32))
    assert TiledCorrelator(image, (9, 9), np.float32).n_tiles == 30
    np.testing.assert_array_equal(sums[0], sums[1])
    np.testing.assert_array_equal(sums[0], sums[2])
    whole = NUMPY.weighted_correlations_whole(image, kernels, factors, np.float32)
    assert_allclose(sums[0], whole, rtol=0, atol=1e-6 * np.abs(whole).max())


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="glibc's mallopt only")
def test_tuned_allocator_reuses_freed_memory():
    """After tune_host_allocator, large temporaries made and freed in a loop are not faulted in anew:
    a fresh process counts its minor page faults over 10 rounds of a 40 MB array (a 2048^2 float64
    plane is 33.5 MB, above the largest threshold glibc adapts to by itself), before and after."""
    import subprocess
    import sys

    code = """
import resource, numpy as np
from gpudiffim._backend import tune_host_allocator
def faults():
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        a = np.ones(5 << 20); del a
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start
before = faults()
assert tune_host_allocator() is True
faults()                        # the first round grows the heap once
print(before, faults())
"""
    before, after = map(int, subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                            text=True).stdout.split())
    # by default every round maps 40 MB afresh: 20 faults per round with 2 MB transparent huge
    # pages, ~10,000 with 4 kB pages (which one depends on the kernel's state); tuned, none
    assert before >= 10 * 15
    assert after <= before / 20


@pytest.mark.parametrize(("sigmas", "degrees", "half_width"), [
    ((0.7, 1.5, 3.0), (4, 2, 2), 10),    # the defaults
    ((1.2,), (0,), 3),                   # one Gaussian, no polynomial
    ((0.5, 2.0), (6, 1), 7),
])
def test_separable_form_rebuilds_the_alard_lupton_basis(sigmas, degrees, half_width):
    from gpudiffim.basis import KernelBasis, make_alard_lupton_basis, separable_form

    kernels = make_alard_lupton_basis(half_width, sigmas, degrees)
    form = separable_form(KernelBasis(kernels, kind="alard-lupton", sigmas=sigmas, degrees=degrees))
    raw = form.profiles[form.pairs[:, 0], :, None] * form.profiles[form.pairs[:, 1], None, :]
    rebuilt = np.einsum("km,mij->kij", form.mixing, raw)
    assert_allclose(rebuilt, kernels, rtol=0, atol=1e-13 * np.abs(kernels).max())
    assert form.profiles.shape == (sum(d + 1 for d in degrees), 2 * half_width + 1)
    assert np.count_nonzero(form.mixing) <= 2 * len(kernels)     # raw_k / s_k - B_0: two terms at most


def test_separable_form_only_for_alard_lupton():
    from gpudiffim.basis import KernelBasis, make_delta_function_basis, separable_form

    assert separable_form(KernelBasis(make_delta_function_basis(5, 5), kind="delta-function")) is None


@pytest.mark.parametrize(("n", "shape"), [(1, (43, 43)), (37, (31, 45)), (300, (25, 25))])
def test_separable_stamp_correlations_equal_the_fft_ones(monkeypatch, n, shape):
    """Products of 1-D correlations give the FFT products' design columns, on any number of threads."""
    from gpudiffim.basis import KernelBasis, make_alard_lupton_basis, separable_form
    from gpudiffim.convolve import correlate_stamps, correlate_stamps_separable

    kernels = make_alard_lupton_basis(7, (0.8, 2.0), (3, 2))
    form = separable_form(KernelBasis(kernels, kind="alard-lupton", sigmas=(0.8, 2.0), degrees=(3, 2)))
    stamps = np.random.default_rng(n).normal(size=(n,) + shape) * 30 + 100
    expected = correlate_stamps(stamps, kernels)
    results = []
    for threads in ("1", "3"):
        monkeypatch.setenv("GPUDIFFIM_HOST_THREADS", threads)
        results.append(correlate_stamps_separable(stamps, form))
    assert results[0].shape == expected.shape
    assert_allclose(results[0], expected, rtol=0, atol=1e-13 * np.abs(expected).max())
    np.testing.assert_array_equal(results[0], results[1])


def test_fit_with_the_separable_form_equals_the_fit_without():
    """The solve uses the separable design for the original basis: the same decisions, and the same
    coefficients to 1e-8 of the largest (design roundings of 1e-15 through condition numbers ~1e6)."""
    from gpudiffim import ImagePsfMatchTask, PsfMatchConfig
    from gpudiffim import solve as solve_module
    from gpudiffim.testing import make_fake_pair

    pair = make_fake_pair(shape=(384, 384), n_stars=150, seed=5)
    fast = ImagePsfMatchTask(PsfMatchConfig()).subtract_masked_images(pair.template, pair.science)
    original = solve_module.separable_form
    solve_module.separable_form = lambda basis: None
    try:
        slow = ImagePsfMatchTask(PsfMatchConfig()).subtract_masked_images(pair.template, pair.science)
    finally:
        solve_module.separable_form = original
    a, b = fast.psf_matching_kernel.coefficients, slow.psf_matching_kernel.coefficients
    assert_allclose(a, b, rtol=0, atol=1e-8 * np.abs(b).max())
    np.testing.assert_array_equal(fast.kernel_cell_set.column("status"), slow.kernel_cell_set.column("status"))


@pytest.mark.parametrize("model_type", ["chebyshev1", "polynomial"])
def test_grouped_tile_sums_equal_the_whole_image_sum(monkeypatch, model_type):
    """Spatial terms share column factors (x^i of order 4: 5 groups of 15 terms); summing each group
    after its transforms along y and transforming it once along x gives the term-by-term sum."""
    import gpudiffim.convolve as convolve
    from gpudiffim.spatial import SpatialFunction

    monkeypatch.setattr(convolve, "TILE_SIDE", 96)
    rng = np.random.default_rng(21)
    image = (rng.normal(size=(260, 190)) * 5 + 40).astype(np.float32)
    function = SpatialFunction(model_type, 4, (0, 0, 189, 259))
    factors = function.grid_factors(np.arange(190), np.arange(260))
    kernels = rng.normal(size=(function.n_terms, 11, 11))
    assert len({cols.tobytes() for _, cols in factors}) == 5
    tiled = NUMPY.weighted_correlations(image, kernels, factors, np.float32)
    whole = NUMPY.weighted_correlations_whole(image, kernels, factors, np.float32)
    assert_allclose(tiled, whole, rtol=0, atol=2e-6 * np.abs(whole).max())


def test_nested_host_map_runs_inline(monkeypatch):
    """A host_map inside a pool thread runs in that thread instead of waiting for a busy pool."""
    import threading

    from gpudiffim._backend import host_map

    monkeypatch.setenv("GPUDIFFIM_HOST_THREADS", "2")

    def outer(i):
        return host_map(lambda j: (i, j, threading.current_thread().name), range(3))

    results = host_map(outer, range(2))
    assert [[(i, j) for i, j, _ in inner] for inner in results] == [[(0, 0), (0, 1), (0, 2)], [(1, 0), (1, 1), (1, 2)]]
    for inner in results:
        assert len({name for _, _, name in inner}) == 1           # each inner map ran in one thread


def test_host_map_keeps_the_callers_backend(monkeypatch):
    from gpudiffim._backend import compute_backend, host_map, use_backend

    monkeypatch.setenv("GPUDIFFIM_HOST_THREADS", "2")
    with use_backend("cuda-emulator"):
        assert host_map(lambda _: compute_backend(), range(4)) == ["cuda-emulator"] * 4
    assert host_map(lambda _: compute_backend(), range(2)) == [compute_backend()] * 2


def test_host_background_overlaps_and_reports(monkeypatch):
    """The call runs on its own thread while the caller goes on; its value and its exception come
    back through result(); with one host thread it runs at result() time, on the caller's thread."""
    import threading

    from gpudiffim._backend import host_background

    monkeypatch.setenv("GPUDIFFIM_HOST_THREADS", "2")
    started = threading.Event()

    def call():
        started.set()
        return threading.current_thread().name

    pending = host_background(call)
    assert started.wait(5)                      # started before result() is asked for
    assert pending.result().startswith("gpudiffim-background")

    def fails():
        raise ValueError("inside")

    with pytest.raises(ValueError, match="inside"):
        host_background(fails).result()
    monkeypatch.setenv("GPUDIFFIM_HOST_THREADS", "1")
    later = host_background(call)
    assert later.result() == threading.current_thread().name
