"""Noise covariance of the convolved image (gpudiffim.covariance, config ``noise_correlation``).

The matched image's variance is ``f sum K^2 V_T`` with ``f = sum_d rho(d) A_K(d) / A_K(0)``:
checked against the measured variance of convolved correlated noise, at every pixel of a
spatially varying kernel, end to end on a pair whose template noise is correlated (D/sigma
on the sky 1.00 with it, ~1.3 without), and as exactly 1 on white noise.
"""

import logging
import warnings

import numpy as np
import pytest
from scipy import ndimage, signal

from gpudiffim import ConfigurationError, ImagePsfMatchTask, MaskedImage, PsfMatchConfig, SpatialKernel
from gpudiffim.apply import convolve_masked_image
from gpudiffim.covariance import (
    correct_matched_variance,
    kernel_autocorrelation,
    measure_noise_correlation,
)
from gpudiffim.spatial import SpatialFunction
from gpudiffim.testing import gaussian_kernel, make_fake_pair

#: Smoothing of white noise: [1, 2, 1] x [1, 2, 1] / 16, correlated over +-2 px.
SMOOTH = np.outer([1.0, 2.0, 1.0], [1.0, 2.0, 1.0]) / 16.0


def _true_rho(max_lag=3):
    """Normalised autocorrelation of white noise smoothed by :data:`SMOOTH`: ``(1, 2/3, 1/6)`` per axis."""
    one_d = np.correlate([1.0, 2.0, 1.0], [1.0, 2.0, 1.0], "full") / 6.0
    rho = np.zeros((2 * max_lag + 1,) * 2)
    rho[max_lag - 2:max_lag + 3, max_lag - 2:max_lag + 3] = np.outer(one_d, one_d)
    return rho


def _correlated_noise(rng, shape, sigma=1.0):
    """Smoothed white noise with per-pixel standard deviation ``sigma`` (periodic, so homogeneous)."""
    noise = ndimage.correlate(rng.normal(size=shape), SMOOTH, mode="wrap")
    return noise * (sigma / np.sqrt(np.sum(SMOOTH**2)))


def _noise_image(noise, sigma=1.0):
    return MaskedImage(noise, variance=np.full(noise.shape, sigma**2))


def test_kernel_autocorrelation_is_the_direct_sum():
    kernel = np.random.default_rng(1).normal(size=(9, 9))
    full = signal.correlate2d(kernel, kernel, mode="full")      # [8 + dy, 8 + dx]
    assert np.allclose(kernel_autocorrelation(kernel, 3), full[5:12, 5:12])
    assert kernel_autocorrelation(kernel, 3)[3, 3] == pytest.approx(np.sum(kernel**2))


def test_measures_the_correlation_of_smoothed_noise():
    correlation = measure_noise_correlation(_noise_image(_correlated_noise(np.random.default_rng(2),
                                                                           (512, 512))))
    assert correlation.significant
    assert correlation.rho.shape == (7, 7) and correlation.rho[3, 3] == 1.0
    assert np.allclose(correlation.rho, correlation.rho[::-1, ::-1])
    assert np.max(np.abs(correlation.rho - _true_rho())) < 0.015      # 0.0045
    assert abs(correlation.plateau) < 0.01


@pytest.mark.parametrize("lag", [0, -1, 2.0, True])
def test_invalid_max_lag(lag):
    with pytest.raises(ConfigurationError, match="max_lag"):
        measure_noise_correlation(_noise_image(np.zeros((64, 64))), max_lag=lag)


def test_variance_factor_is_the_variance_of_convolved_correlated_noise():
    """Convolve correlated noise with a fixed kernel: the pixels' variance is f x sum K^2 V."""
    sigma = 3.0
    noise = _correlated_noise(np.random.default_rng(4), (512, 512), sigma)
    image = _noise_image(noise, sigma)
    kernel = SpatialKernel(gaussian_kernel(1.6, 7)[None], [[1.0]], SpatialFunction("chebyshev1", 0,
                                                                                     image.bbox()))
    convolved, variance, _ = convolve_masked_image(image, kernel)
    inner = np.s_[7:-7, 7:-7]
    measured = np.var(convolved[inner]) / np.mean(variance[inner])
    factor = measure_noise_correlation(image).variance_factor(kernel.image(0, 0))
    exact = np.sum(_true_rho() * kernel_autocorrelation(kernel.image(0, 0), 3)) / np.sum(kernel.image(0, 0) ** 2)
    assert factor == pytest.approx(exact, rel=0.02)                   # 5.85 vs 5.93
    assert measured == pytest.approx(exact, rel=0.03)                 # 5.80: the pixels agree


def _varying_kernel(bbox):
    """Narrow (sigma 1 px) at the left edge, broad (2.5 px) at the right: f changes across the image."""
    narrow, broad = gaussian_kernel(1.0, 7), gaussian_kernel(2.5, 7)
    return SpatialKernel(np.array([narrow, broad]), [[0.5, -0.5, 0.0], [0.5, 0.5, 0.0]],
                         SpatialFunction("chebyshev1", 1, bbox))


def test_factor_is_applied_at_every_pixel_of_a_varying_kernel():
    image = _noise_image(_correlated_noise(np.random.default_rng(5), (200, 240)))
    image = MaskedImage(image.image, variance=image.variance, xy0=(100, 50))
    kernel = _varying_kernel(image.bbox())
    variance, record = correct_matched_variance(image, kernel, np.ones(image.shape))
    correlation = record.correlation
    assert record.applied == "map"
    for row, column in [(7, 7), (100, 120), (192, 9), (40, 232), (150, 60)]:
        x, y = 100 + column, 50 + row
        assert variance[row, column] == pytest.approx(correlation.variance_factor(kernel.image(x, y)),
                                                      rel=1e-9)
    assert np.all(variance[:7] == 1.0) and np.all(variance[:, -7:] == 1.0)    # EDGE: input variance
    low, high = record.factor_range
    assert high > 1.3 * low                                           # 4.6 to 6.4 across the image
    assert low <= record.factor <= high

    constant = SpatialKernel(gaussian_kernel(1.6, 7)[None], [[1.0]], SpatialFunction("chebyshev1", 0,
                                                                                       image.bbox()))
    variance, record = correct_matched_variance(image, constant, np.ones(image.shape))
    assert record.applied == "constant"
    assert np.all(variance[7:-7, 7:-7] == np.float64(record.factor))


def test_white_noise_is_left_unchanged():
    """Pure white noise and simulated white-noise fields with stars (whose background model and
    faint light leave a small plateau of correlation): never significant, f exactly 1."""
    rng = np.random.default_rng(6)
    images = [_noise_image(rng.normal(size=(256, 256))), _noise_image(rng.normal(size=(512, 512)))]
    for seed in (0, 1):
        pair = make_fake_pair(shape=(256, 256), n_stars=60, seed=seed)
        images += [pair.template, pair.science]
    for image in images:
        correlation = measure_noise_correlation(image)
        assert not correlation.significant, correlation.describe()
        assert correlation.variance_factor(gaussian_kernel(1.6, 7)) == 1.0


@pytest.fixture(scope="module")
def white_pair():
    return make_fake_pair(shape=(256, 256), n_stars=50, seed=7)


def test_white_noise_pair_subtraction_is_unchanged(white_pair):
    results = [ImagePsfMatchTask(PsfMatchConfig(spatial_kernel_order=1, noise_correlation=flag))
               .subtract_masked_images(white_pair.template, white_pair.science) for flag in (True, False)]
    record = results[0].diagnostics["noise_correlation"]
    assert record.applied == "none" and record.factor == 1.0
    assert results[1].diagnostics["noise_correlation"] is None
    assert np.array_equal(results[0].subtracted_image.variance, results[1].subtracted_image.variance)


def test_noise_free_image_is_not_measured(caplog):
    pair = make_fake_pair(shape=(128, 128), n_stars=10, seed=8, template_noise=0.0)
    with caplog.at_level(logging.WARNING, logger="gpudiffim.covariance"):
        correlation = measure_noise_correlation(pair.template)
    assert not correlation.significant and correlation.variance_factor(np.ones((3, 3))) == 1.0
    assert "noise-free" in caplog.text


def test_large_images_are_sampled_in_bands():
    image = _noise_image(_correlated_noise(np.random.default_rng(9), (512, 512)))
    full = measure_noise_correlation(image)
    sampled = measure_noise_correlation(image, max_pixels=1 << 16)
    assert sampled.n_pixels < 0.3 * full.n_pixels
    assert np.max(np.abs(sampled.rho - _true_rho())) < 0.03           # 0.020 from 65k px


def test_config_field():
    assert PsfMatchConfig().noise_correlation is True
    with pytest.raises(ConfigurationError, match="noise_correlation"):
        PsfMatchConfig(noise_correlation="yes")


def _correlated_template_pair(seed, sigma=12.0):
    """A simulated pair whose template noise is smoothed white noise (per-pixel sigma 12, variance
    plane = the true per-pixel variance 144), science noise white (sigma 5)."""
    pair = make_fake_pair(shape=(256, 256), n_stars=50, seed=seed, template_noise=0.0, science_noise=5.0)
    noise = _correlated_noise(np.random.default_rng(seed + 1000), pair.template.shape, sigma)
    template = MaskedImage((pair.template.image + noise).astype(np.float32), pair.template.mask,
                           np.full(pair.template.shape, sigma**2, dtype=np.float32))
    return pair, template


def _sky_std(result, pair, radius=10):
    """Std of D/sigma over unflagged pixels farther than ``radius`` px (box) from every star."""
    difference = result.subtracted_image
    good = (difference.mask == 0) & (difference.variance > 0)
    for star in pair.stars:
        x, y = int(round(star["x"])), int(round(star["y"]))
        good[max(y - radius, 0):y + radius + 1, max(x - radius, 0):x + radius + 1] = False
    return float(np.std(difference.image[good] / np.sqrt(difference.variance[good])))


def test_correlated_template_noise_pair_has_unit_sky_noise():
    """The variance planes are exact here (variance_correction='none'), so only the covariance
    is missing without the fix: D/sigma on the sky 1.30 (the matched template is ~5.6 x noisier
    than sum K^2 V_T), 1.00 with it (seeds 0-4: 0.996-1.005)."""
    pair, template = _correlated_template_pair(seed=0)
    stds = {}
    for flag in (True, False):
        config = PsfMatchConfig(spatial_kernel_order=1, variance_correction="none", noise_correlation=flag)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")        # few candidates for the spatial model, on some seeds
            result = ImagePsfMatchTask(config).subtract_masked_images(template, pair.science)
        stds[flag] = _sky_std(result, pair)
        if flag:
            record = result.diagnostics["noise_correlation"]
    assert stds[True] == pytest.approx(1.0, abs=0.02)                 # 0.999
    assert stds[False] > 1.2                                          # 1.305
    assert record.applied == "map" and record.factor == pytest.approx(5.6, rel=0.1)
    assert record.correlation.rho[3, 4] == pytest.approx(2 / 3, abs=0.02)


@pytest.mark.gpu
def test_cupy_planes_give_the_numpy_result():
    import cupy

    image = _noise_image(_correlated_noise(np.random.default_rng(10), (256, 256)))
    on_device = image.to_module(cupy)
    kernel = _varying_kernel(image.bbox())
    host_variance, host = correct_matched_variance(image, kernel, np.ones(image.shape))
    device_variance, device = correct_matched_variance(on_device, kernel, cupy.ones(image.shape))
    assert np.allclose(device.correlation.rho, host.correlation.rho, rtol=1e-6, atol=1e-9)
    assert device.factor == pytest.approx(host.factor, rel=1e-6)
    assert np.allclose(cupy.asnumpy(device_variance), host_variance, rtol=1e-6)


def test_large_images_are_sampled_in_bands():
    """Beyond ``max_pixels`` the correlation is measured on bands prepared one by one: same answer."""
    from gpudiffim.variance import _bands

    noise = ndimage.uniform_filter(np.random.default_rng(7).normal(size=(768, 512)), 2, mode="wrap")
    image = MaskedImage(noise, variance=np.full(noise.shape, 0.25))
    assert len(_bands(noise.shape, 1 << 17)) == 4                       # 4 bands of 64 rows
    sampled = measure_noise_correlation(image, max_pixels=1 << 17)
    expected = [[0.25, 0.5, 0.25], [0.5, 1.0, 0.5], [0.25, 0.5, 0.25]]
    assert sampled.significant and sampled.n_pixels <= 4 * 64 * 512      # a third of the image
    np.testing.assert_allclose(sampled.rho[2:5, 2:5], expected, atol=0.02)


def test_sky_residual_of_the_variance_correction_gives_the_same_correlation():
    """The background-free sample made by the variance correction serves the noise-correlation
    measurement of the same image plane after its variance is scaled: the same rho, bit for bit;
    an image of another shape is refused."""
    from gpudiffim.variance import correct_variance, sky_residual

    rng = np.random.default_rng(7)
    noise = _correlated_noise(rng, (1200, 300))       # > MAX_PIXELS / 4: sampled in bands
    image = MaskedImage(noise + 100.0, variance=np.full(noise.shape, 0.2))    # plane 0.2 / 0.375 of the noise
    sky = sky_residual(image)
    corrected, record = correct_variance(image, mode="scale", sky=sky)
    assert record.applied == "scale"
    shared = measure_noise_correlation(corrected, sky=sky)
    fresh = measure_noise_correlation(corrected)
    np.testing.assert_array_equal(shared.rho, fresh.rho)
    assert shared.n_pixels == fresh.n_pixels and shared.significant
    other = MaskedImage(noise[:600] + 100.0, variance=np.full((600, 300), 0.375))
    with pytest.raises(ValueError, match=r"measured on a \(1200, 300\) image"):
        measure_noise_correlation(other, sky=sky)
