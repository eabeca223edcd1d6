"""Automatic convolution direction (issue 15 item 1): the narrower PSF is convolved, fluxes agree."""

import numpy as np
import pytest

from difference_checks import transient_fluxes
from gpudiffim import ImagePsfMatchTask, PsfMatchConfig
from gpudiffim.direction import choose_convolution, psf_axis_fwhms
from gpudiffim.errors import ConfigurationError
from gpudiffim.testing import gaussian_kernel, make_fake_pair

#: A pair whose template (sigma 1.4 px) is sharper than the science image (2.1 px), and whose
#: science image is 1.25 x brighter: the kernel sum is 1.25 one way and 0.8 the other.
PAIR = dict(shape=(512, 512), n_stars=150, seed=21, template_sigma=1.4, science_sigma=2.1, kernel_sum=1.25,
            template_noise=4.0, science_noise=4.0, n_transients=12, flux_range=(3e3, 1e5))


@pytest.mark.parametrize(("template", "science", "expected"), [
    (3.0, 4.0, "template"), (4.0, 4.0, "template"), (4.5, 4.0, "science"),
    ((3.0, 3.5), (4.0, 4.0), "template"), ((4.2, 4.5), (4.0, 4.1), "science"),
    ((3.0, 6.0), (4.0, 5.0), "science"), ((3.0, 5.0), (4.0, 6.0), "template"), ((5.0, 3.0), (4.0, 5.0), "template"),
])
def test_choose_convolution(template, science, expected):
    assert choose_convolution(template, science) == expected


def test_choose_convolution_rejects_bad_widths():
    with pytest.raises(ConfigurationError, match="template_fwhm"):
        choose_convolution(0.0, 3.0)
    with pytest.raises(ConfigurationError, match="science_fwhm"):
        choose_convolution(3.0, (np.nan, 3.0))


def test_psf_axis_fwhms_of_an_elliptical_gaussian():
    grid = np.arange(-15, 16)
    psf = np.outer(np.exp(-0.5 * (grid / 3.0) ** 2), np.exp(-0.5 * (grid / 2.0) ** 2))
    fx, fy = psf_axis_fwhms(psf)
    assert fx == pytest.approx(2.3548 * 2.0, rel=1e-3) and fy == pytest.approx(2.3548 * 3.0, rel=1e-3)
    assert psf_axis_fwhms(gaussian_kernel(1.5, 10))[0] == pytest.approx(2.3548 * 1.5, rel=1e-3)


@pytest.fixture(scope="module")
def both_orders():
    """The pair subtracted with convolve="auto" as given, and with the two images' roles swapped."""
    pair = make_fake_pair(**PAIR)
    task = ImagePsfMatchTask(PsfMatchConfig(spatial_kernel_order=1, convolve="auto"))
    as_given = task.subtract_masked_images(pair.template, pair.science)
    swapped = task.subtract_masked_images(pair.science, pair.template)
    return pair, as_given, swapped


def test_auto_convolves_the_narrower_psf_in_both_orders(both_orders):
    _, as_given, swapped = both_orders
    assert as_given.convolved == "template"
    assert swapped.convolved == "science"           # the image passed as science is the sharp one
    for result in (as_given, swapped):
        record = result.diagnostics["direction"]
        assert record["requested"] == "auto" and record["chosen"] == result.convolved
    assert swapped.template_fwhm_pix > swapped.science_fwhm_pix


def test_both_orders_give_the_same_transient_fluxes(both_orders):
    """Science minus template, in science flux units, with the kernel sum divided out once.

    As given, the transients are positive with their science flux (1.25 x the simulated one, the
    kernel sum).  Swapped, the "science" image is the original template: they are negative, in the
    original template's units, so ``-1.25`` times the swapped fluxes equals the first: within 1 %
    (measured: 0.3 %).  Both differences have the original science PSF.
    """
    pair, as_given, swapped = both_orders
    first = transient_fluxes(as_given, pair.stars, minimum_flux=2e4)
    second = transient_fluxes(swapped, pair.stars, minimum_flux=2e4)
    assert np.isfinite(first).sum() >= 4
    print("swapped / as given:", np.round(-1.25 * second / first, 4))
    np.testing.assert_allclose(-1.25 * second, first, rtol=0.01)
    assert as_given.difference_psf.source == "science" and swapped.difference_psf.source == "template"


def test_background_sign_follows_the_direction(both_orders):
    """The fitted background is always the reference's minus the convolved image's: the
    simulated science background as given, and again (the passed template is the simulated
    science image) when swapped, where the difference adds it instead of subtracting it (the
    sign flip of convolving the science image).  Either way no background is left in D."""
    pair, as_given, swapped = both_orders
    centre = (255.5, 255.5)
    truth = float(pair.background(*centre))
    assert float(as_given.background_model(*centre)) == pytest.approx(truth, abs=0.2)
    assert float(swapped.background_model(*centre)) == pytest.approx(truth, abs=0.2)
    for result in (as_given, swapped):
        image = result.subtracted_image.image[100:400, 100:400]
        assert abs(float(np.median(image))) < 0.3


def test_convolve_template_keyword_overrides_the_config():
    pair = make_fake_pair(shape=(256, 256), n_stars=50, seed=1)
    task = ImagePsfMatchTask(PsfMatchConfig(spatial_kernel_order=0, convolve="science"))
    assert task.subtract_masked_images(pair.template, pair.science, convolve_template=True).convolved == "template"
    assert task.match_masked_images(pair.template, pair.science).convolved == "science"
    with pytest.raises(ConfigurationError, match="convolve_template"):
        task.match_masked_images(pair.template, pair.science, convolve_template="yes")
    with pytest.raises(ConfigurationError, match="convolve"):
        PsfMatchConfig(convolve="both")


def test_auto_uses_the_psf_images_per_axis():
    """With PSF images (exposures that carry them) the widths per axis decide: a template PSF
    narrower than the science PSF in x but wider in y (its larger axis 5.65 px against 4.71)
    is not convolved, although its one measured FWHM (3.3 px) is the smaller."""
    grid = np.arange(-15, 16)
    template_psf = np.outer(np.exp(-0.5 * (grid / 2.4) ** 2), np.exp(-0.5 * (grid / 1.2) ** 2))
    science_psf = gaussian_kernel(2.0, 15)
    task = ImagePsfMatchTask(PsfMatchConfig(convolve="auto"))
    convolve_template, record = task._direction("auto", (3.3, 4.7), (template_psf, science_psf))
    assert not convolve_template and record["chosen"] == "science"
    assert record["template_widths"] == pytest.approx((2.3548 * 1.2, 2.3548 * 2.4), rel=1e-3)
    assert task._direction("auto", (3.3, 4.7), (None, None))[1]["chosen"] == "template"
