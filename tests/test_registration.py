"""Subtraction of exposures on different pixel grids: Lanczos-3 registration end to end."""

import numpy as np
import pytest
from astropy.stats import sigma_clipped_stats
from astropy.wcs import WCS

from gpudiffim import Exposure, ImagePsfMatchTask, MaskedImage, PsfMatchConfig, RegistrationError
from gpudiffim.testing import _render, make_fake_pair
from gpudiffim.warp import warp_masked_image

SHAPE = (384, 384)
CONFIG = PsfMatchConfig(fit_for_background=True, spatial_kernel_order=1)


def tan_wcs(rotation_deg=0.0, shift=(0.0, 0.0), scale_arcsec=0.25):
    """A TAN WCS whose pixel grid is rotated and shifted (px) against the reference one."""
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [210.0, -30.0]
    wcs.wcs.crpix = [SHAPE[1] / 2 + 1 + shift[0], SHAPE[0] / 2 + 1 + shift[1]]
    angle = np.radians(rotation_deg)
    scale = scale_arcsec / 3600
    wcs.wcs.cd = scale * np.array([[-np.cos(angle), np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return wcs


@pytest.fixture(scope="module")
def rotated_pair():
    """Science on the reference grid; template rendered on a grid rotated 1 deg and shifted."""
    pair = make_fake_pair(shape=SHAPE, n_stars=250, seed=61, template_noise=2.0, science_noise=2.0)
    science_wcs, template_wcs = tan_wcs(), tan_wcs(1.0, (0.3, -0.45))
    sky = science_wcs.pixel_to_world(pair.stars["x"], pair.stars["y"])
    x, y = template_wcs.world_to_pixel(sky)
    rng = np.random.default_rng(62)
    signal = _render(SHAPE, (0, 0), np.asarray(x), np.asarray(y), pair.stars["flux"], 1.5)
    image = (signal + rng.normal(scale=2.0, size=SHAPE)).astype(np.float32)
    template = MaskedImage(image, variance=np.full(SHAPE, 4.0, dtype=np.float32))
    noise_free = MaskedImage(signal, variance=np.ones(SHAPE))
    return (pair, Exposure(template, wcs=template_wcs), Exposure(pair.science, wcs=science_wcs),
            Exposure(noise_free, wcs=template_wcs))


def _noise_check(result):
    difference = result.subtracted_image
    good = difference.mask == 0
    z = difference.image[good] / np.sqrt(difference.variance[good])
    values = difference.image[good].astype(np.float64)
    _, _, std = sigma_clipped_stats(values, sigma=3.0)
    mean_z, _, std_z = sigma_clipped_stats(z, sigma=3.0)
    return mean_z, std_z, std**2, float(np.mean(difference.variance[good]))


def test_rotated_template_subtracts_like_aligned(rotated_pair):
    pair, template, science, _ = rotated_pair
    task = ImagePsfMatchTask(CONFIG)
    rotated = task.subtract_exposures(template, science)
    aligned = task.subtract_masked_images(pair.template, pair.science)
    assert rotated.warped_exposure.wcs is science.wcs
    assert rotated.subtracted_exposure.masked_image.shape == SHAPE
    for result in (rotated, aligned):
        mean_z, std_z, measured, predicted = _noise_check(result)
        assert abs(mean_z) < 0.05
        assert measured == pytest.approx(predicted, rel=0.1)
        assert result.psf_matching_kernel.kernel_sum(192, 192) == pytest.approx(1.0, abs=0.01)
    assert _noise_check(rotated)[1] == pytest.approx(_noise_check(aligned)[1], rel=0.05)


def test_warp_conserves_flux_on_isolated_stars(rotated_pair):
    """Noise-free template warped onto the science grid vs the same stars rendered there."""
    pair, _, science, noise_free = rotated_pair
    warped = warp_masked_image(noise_free.masked_image, noise_free.wcs, science.wcs, SHAPE)
    stars = pair.stars
    ratios = []
    for star in stars:
        x, y = int(round(star["x"])), int(round(star["y"]))
        distance = np.hypot(stars["x"] - star["x"], stars["y"] - star["y"])
        if np.sum(distance < 25) > 1 or not (20 < x < SHAPE[1] - 20 and 20 < y < SHAPE[0] - 20):
            continue
        box = np.s_[y - 10:y + 11, x - 10:x + 11]
        rendered = _render(SHAPE, (0, 0), np.array([star["x"]]), np.array([star["y"]]),
                           np.array([star["flux"]]), 1.5)[box].sum()
        ratios.append(warped.image[box].sum() / rendered)
    assert len(ratios) >= 5
    assert np.max(np.abs(np.array(ratios) - 1.0)) < 1e-3


def test_no_warping_with_different_wcs_is_an_error(rotated_pair):
    _, template, science, _ = rotated_pair
    with pytest.raises(RegistrationError, match="do_warping"):
        ImagePsfMatchTask(CONFIG).match_exposures(template, science, do_warping=False)


def test_same_grid_is_not_warped(rotated_pair):
    pair, _, science, _ = rotated_pair
    template = Exposure(pair.template, wcs=science.wcs)
    result = ImagePsfMatchTask(CONFIG).match_exposures(template, science, do_warping=False)
    warped = result.warped_exposure
    assert warped.wcs is template.wcs
    np.testing.assert_array_equal(warped.masked_image.image, template.masked_image.image)
    np.testing.assert_array_equal(warped.masked_image.mask, template.masked_image.mask)
