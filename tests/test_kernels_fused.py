"""The fused stamp kernels of the device-resident solve against their NumPy references.

* ``gdi_cut_stamps`` (``kernels/stamp_fit.cu``): the six stamp stacks of a
  batch equal ``gpudiffim._ops.NUMPY.cut_stamp_planes`` exactly (a gather and
  a conversion to float64);
* ``gdi_stamp_residuals`` (``kernels/residual_moments.cu``): the residual sums
  and D/sigma rows equal ``NUMPY.stamp_residuals`` (FFT correlations, then
  :func:`gpudiffim.statistics.residual_sums`) to 1e-10 relative, with masked
  template pixels under the kernel box, non-positive and infinite variances,
  NaN pixels, a core window and stamps of several sizes.

Each runs on the CPU emulator; with a GPU the same comparisons run through
CuPy (``@pytest.mark.gpu``).
"""

import numpy as np
import pytest

from gpudiffim import MaskedImage
from gpudiffim._cuda.residual_moments import STAMP_RESIDUALS_MAX_TAPS, stamp_residuals
from gpudiffim._cuda.stamp_fit import cut_stamps
from gpudiffim._ops import KERNELS, NUMPY

BAD = 1 | 4


def _host(array):
    return array.get() if type(array).__module__.split(".")[0] == "cupy" else np.asarray(array)


def _image(gen, shape, dtype):
    image = gen.normal(100.0, 10.0, shape).astype(dtype)
    variance = gen.uniform(50.0, 150.0, shape).astype(dtype)
    mask = (gen.random(shape) < 0.02).astype(np.int32) * 4 | (gen.random(shape) < 0.02).astype(np.int32) * 2
    return MaskedImage(image, mask, variance)


def _batch(gen, n, size, kw):
    """Six stamp stacks with awkward pixels, kernels and backgrounds."""
    shape = (n, size, size)
    template = gen.normal(50.0, 20.0, shape)
    science = gen.normal(50.0, 20.0, shape)
    template_variance = gen.uniform(10.0, 40.0, shape)
    science_variance = gen.uniform(10.0, 40.0, shape)
    template_mask = ((gen.random(shape) < 0.002) * 4 | (gen.random(shape) < 0.05) * 2).astype(np.int32)
    science_mask = ((gen.random(shape) < 0.01) * 1 | (gen.random(shape) < 0.05) * 8).astype(np.int32)
    science_variance[0, size // 2, size // 2] = 0.0
    science_variance[0, size // 2, size // 2 + 1] = -3.0
    science_variance[-1, size // 2, size // 2] = np.inf
    science[-1, size // 2 + 1, size // 2] = np.nan
    kernels = gen.normal(0.0, 0.05, (n, kw, kw))
    kernels[:, kw // 2, kw // 2] += 1.0
    background = gen.normal(0.0, 1.0, n)
    return (template, science, template_variance, science_variance, template_mask, science_mask), kernels, background


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cut_stamps_equal_the_reference(emulator, rng, dtype):
    gen, seed = rng
    template, science = _image(gen, (61, 47), dtype), _image(gen, (61, 47), dtype)
    half = 6
    centres = np.stack([gen.integers(half, 61 - half, 33), gen.integers(half, 47 - half, 33)], axis=1)
    expected, expected_centres = NUMPY.cut_stamp_planes(template, science, centres, half)
    got, got_centres = KERNELS.cut_stamp_planes(template, science, centres, half)
    np.testing.assert_array_equal(got_centres, expected_centres)
    assert got_centres.dtype == expected_centres.dtype == np.int32
    for name, want, have in zip(("template", "science", "template variance", "science variance",
                                 "template mask", "science mask"), expected, got):
        assert have.dtype == want.dtype, name
        np.testing.assert_array_equal(have, want, err_msg=f"{name}, seed={seed}")


def test_cut_stamps_refuse_stamps_outside(emulator):
    image = _image(np.random.default_rng(1), (20, 20), np.float32)
    with pytest.raises(ValueError, match="do not lie inside"):
        cut_stamps(image.image, image.variance, image.mask, np.array([[2, 10]]), 3)


@pytest.mark.parametrize(("n", "size", "kw", "core_radius"), [(7, 17, 5, None), (5, 23, 9, 3), (2, 15, 9, None),
                                                               (130, 11, 3, 2)])
def test_stamp_residuals_equal_the_reference(emulator, rng, n, size, kw, core_radius):
    gen, seed = rng
    stamps, kernels, background = _batch(gen, n, size, kw)
    want_sums, want_rows = NUMPY.stamp_residuals(stamps, kernels, background, BAD, core_radius, rows=True)
    sums, rows = stamp_residuals(stamps, kernels, background, BAD, core_radius, rows=True)
    np.testing.assert_array_equal(sums[:, 0], want_sums[:, 0], err_msg=f"counts, seed={seed}")
    window = (size - kw + 1 if core_radius is None else 2 * core_radius + 1) ** 2
    assert 0 < want_sums[:, 0].sum() < n * window         # some pixels usable, some not
    np.testing.assert_allclose(sums[:, 1:], want_sums[:, 1:], rtol=1e-10, atol=1e-9, err_msg=f"seed={seed}")
    np.testing.assert_array_equal(np.isnan(rows), np.isnan(want_rows))
    np.testing.assert_allclose(rows, want_rows, rtol=1e-10, atol=1e-11, err_msg=f"seed={seed}")
    only_sums = stamp_residuals(stamps, kernels, background, BAD, core_radius)
    np.testing.assert_array_equal(only_sums, sums)


def test_stamp_residuals_through_the_operations_layer(emulator, rng):
    """KERNELS.stamp_residuals is the fused kernel; wider kernels than its shared stage fall back to composing."""
    gen, _ = rng
    stamps, kernels, background = _batch(gen, 4, 15, 5)
    fused = KERNELS.stamp_residuals(stamps, kernels, background, BAD)
    np.testing.assert_allclose(fused, NUMPY.stamp_residuals(stamps, kernels, background, BAD), rtol=1e-10,
                               atol=1e-9)
    assert STAMP_RESIDUALS_MAX_TAPS == 4096


def test_stamp_residuals_refuse_bad_kernels(emulator, rng):
    stamps, kernels, background = _batch(rng[0], 2, 9, 3)
    with pytest.raises(ValueError, match="kernels"):
        stamp_residuals(stamps, kernels[:1], background, BAD)
    with pytest.raises(ValueError, match="kernels"):
        stamp_residuals(stamps, np.zeros((2, 11, 11)), background, BAD)


@pytest.mark.gpu
def test_cupy_fused_stamp_kernels_match_numpy(rng):
    import cupy

    gen, seed = rng
    stamps, kernels, background = _batch(gen, 300, 43, 21)
    want = NUMPY.stamp_residuals(stamps, kernels, background, BAD, None, rows=True)
    got = stamp_residuals(tuple(cupy.asarray(a) for a in stamps), cupy.asarray(kernels), cupy.asarray(background),
                          BAD, None, rows=True)
    np.testing.assert_array_equal(_host(got[0])[:, 0], want[0][:, 0])
    np.testing.assert_allclose(_host(got[0]), want[0], rtol=1e-10, atol=1e-9, err_msg=f"seed={seed}")
    np.testing.assert_allclose(_host(got[1]), want[1], rtol=1e-10, atol=1e-11)
    template, science = _image(gen, (512, 512), np.float32), _image(gen, (512, 512), np.float32)
    centres = np.stack([gen.integers(20, 492, 200), gen.integers(20, 492, 200)], axis=1)
    expected, expected_centres = NUMPY.cut_stamp_planes(template, science, centres, 20)
    got, got_centres = KERNELS.cut_stamp_planes(template.to_module(cupy), science.to_module(cupy), centres, 20)
    assert len(got) == len(expected) == 6
    for want_plane, have in zip(expected, got):
        np.testing.assert_array_equal(_host(have), want_plane)
    np.testing.assert_array_equal(_host(got_centres), _host(expected_centres))
