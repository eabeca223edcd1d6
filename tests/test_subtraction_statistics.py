"""Difference-image statistics consistent with the noise (ip_diffim test_subtractTask style).

Pairs follow ``makeTestImage``'s scales: Gaussian stars of 500-1000 counts and
Gaussian noise.  Statistics use unflagged pixels with 3-sigma clipping (the
few residual pixels of the brightest stars are not noise).

Without ``ip_diffim``'s decorrelation afterburner (not part of
``ImagePsfMatchTask``), the per-pixel variance of the difference is
``sigma_s^2 + sigma_t^2 sum(K^2)``: convolving the template smooths its
noise.  The tests check the variance plane and the measured variance against
that expectation and against each other.
"""

import numpy as np
import pytest
from astropy.stats import sigma_clipped_stats

from gpudiffim import ImagePsfMatchTask, PsfMatchConfig, SpatialKernel
from gpudiffim.spatial import SpatialFunction
from gpudiffim.testing import make_fake_pair

SHAPE = (512, 512)
BBOX = (0, 0, SHAPE[1] - 1, SHAPE[0] - 1)
CONFIG = PsfMatchConfig(fit_for_background=True, spatial_kernel_order=1, spatial_bg_order=1)


def background_precision(result, sigma):
    """Standard error of a background estimated from the fit regions of the GOOD stamps."""
    width = result.kernel_basis.width
    fit_pixels = (2 * width + 1 - 2 * (width // 2)) ** 2
    return sigma / np.sqrt(result.kernel_cell_set.n_good * fit_pixels)


def identity_kernel():
    """A spatially constant 3x3 delta kernel (equal PSFs)."""
    basis = np.zeros((1, 3, 3))
    basis[0, 1, 1] = 1.0
    return SpatialKernel(basis, np.ones((1, 1)), SpatialFunction("chebyshev1", 0, BBOX))


def _difference_pixels(result):
    difference = result.subtracted_image
    good = difference.mask == 0
    return difference.image[good].astype(np.float64), difference.variance[good].astype(np.float64)


def test_equal_psfs():
    """No background in the pair and none fitted (as ip_diffim, which does not subtract it)."""
    pair = make_fake_pair(shape=SHAPE, n_stars=200, seed=21, template_sigma=2.4, kernel=identity_kernel(),
                          background=(0.0, 0.0, 0.0), template_noise=1.0, science_noise=1.0,
                          flux_range=(500, 1000))
    config = PsfMatchConfig(spatial_kernel_order=1, fit_for_background=False)
    result = ImagePsfMatchTask(config).subtract_masked_images(pair.template, pair.science,
                                                              template_fwhm_pix=pair.template_fwhm_pix,
                                                              science_fwhm_pix=pair.template_fwhm_pix)
    values, variance = _difference_pixels(result)
    mean, _, std = sigma_clipped_stats(values, sigma=3.0)
    # the AL basis has no delta function: the fitted kernel is a narrow blur, so the
    # expected variance is 1 + sum(K^2) (2 only after ip_diffim's decorrelation)
    expected = 1.0 + np.sum(result.psf_matching_kernel.image(256, 256) ** 2)
    assert not np.isnan(result.subtracted_image.image).any()
    assert abs(mean) < 5 * np.sqrt(expected) / np.sqrt(values.size)
    assert std**2 == pytest.approx(expected, rel=0.1)
    assert np.mean(variance) == pytest.approx(expected, rel=0.1)
    assert result.psf_matching_kernel.kernel_sum(256, 256) == pytest.approx(1.0, abs=0.01)


@pytest.mark.parametrize("science_noise, template_noise", [(1.0, 1.0), (1.0, 0.1), (0.1, 0.1)])
def test_template_better(science_noise, template_noise):
    pair = make_fake_pair(shape=SHAPE, n_stars=200, seed=22, template_sigma=2.0, science_sigma=2.4,
                          background=(3.0, 0.5, -0.5), template_noise=template_noise,
                          science_noise=science_noise, flux_range=(500, 1000))
    result = ImagePsfMatchTask(CONFIG).subtract_masked_images(pair.template, pair.science)
    values, variance = _difference_pixels(result)
    mean, _, std = sigma_clipped_stats(values, sigma=3.0)
    kernel_power = np.sum(pair.kernel.image(256, 256) ** 2)
    expected = science_noise**2 + template_noise**2 * kernel_power
    # the fitted background's own error, not pixel noise, bounds the mean of D
    assert abs(mean) < 5 * background_precision(result, np.sqrt(expected))
    assert np.mean(variance) == pytest.approx(expected, rel=0.1)
    assert std**2 == pytest.approx(expected, rel=0.1)
    assert std**2 == pytest.approx(np.mean(variance), rel=0.1)


def test_convolve_science():
    """Science sharper than the template: convolve the science image instead."""
    pair = make_fake_pair(shape=SHAPE, n_stars=200, seed=23, template_sigma=2.0, science_sigma=2.4,
                          background=(0.0, 0.0, 0.0), template_noise=1.0, science_noise=1.0,
                          flux_range=(500, 1000))
    # swap roles: the broad image is the "template" of this call
    result = ImagePsfMatchTask(CONFIG).subtract_masked_images(pair.science, pair.template,
                                                              convolve_template=False)
    values, variance = _difference_pixels(result)
    _, _, std = sigma_clipped_stats(values, sigma=3.0)
    assert result.convolved == "science"
    assert std**2 == pytest.approx(np.mean(variance), rel=0.1)
    # D is in science flux units: a star's residual is small compared with its flux
    star = pair.stars[np.argmax(pair.stars["flux"])]
    x, y = int(round(star["x"])), int(round(star["y"]))
    box = result.subtracted_image.image[y - 6:y + 7, x - 6:x + 7]
    assert abs(box.sum()) < 0.03 * star["flux"] + 5 * 13 * np.sqrt(np.mean(variance))
