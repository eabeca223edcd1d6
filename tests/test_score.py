"""Score images (issue 15 item 3): preconvolved science, score-mode decorrelation, S/N per pixel."""

import numpy as np
import pytest

from difference_checks import sky_pixels
from gpudiffim import ImagePsfMatchTask, PsfMatchConfig
from gpudiffim.errors import ConfigurationError
from gpudiffim.testing import make_fake_pair

#: Equal-depth pair (noise 5 in both), science PSF wider than the template's.
EQUAL_DEPTH = dict(shape=(512, 512), n_stars=120, seed=8, template_noise=5.0, science_noise=5.0,
                   template_sigma=1.4, science_sigma=2.0, n_transients=10, flux_range=(2e3, 5e4))


@pytest.fixture(scope="module")
def score_result():
    pair = make_fake_pair(**EQUAL_DEPTH)
    result = ImagePsfMatchTask(PsfMatchConfig(spatial_kernel_order=1, score=True)).subtract_masked_images(
        pair.template, pair.science)
    return pair, result


def test_score_sky_is_unit_normal(score_result):
    """Sky std of the S/N image: 1 within 5 % (measured 0.997), mean within 0.05."""
    pair, result = score_result
    keep = sky_pixels(EQUAL_DEPTH["shape"], np.c_[pair.stars["x"], pair.stars["y"]])
    snr = result.score.snr.image[keep]
    assert np.std(snr) == pytest.approx(1.0, rel=0.05)
    assert abs(np.mean(snr)) < 0.05


def test_score_measures_transient_fluxes(score_result):
    """At a transient's pixel the score's PSF flux (S/N x flux error) is its flux: within 4 % for
    those 40 px or more from the edges (the pixel is up to 0.5 px off the source centre,
    which costs 1-2 %), and the S/N is the flux over the flux error."""
    pair, result = score_result
    transients = pair.stars[pair.stars["kind"] == "transient"]
    inside = np.all((np.c_[transients["x"], transients["y"]] > 40)
                    & (np.c_[transients["x"], transients["y"]] < 472), axis=1)
    rows, columns = np.round(transients["y"]).astype(int), np.round(transients["x"]).astype(int)
    flux = result.score.flux[rows, columns][inside]
    truth = transients["science_flux"][inside]
    assert inside.sum() >= 5
    np.testing.assert_allclose(flux, truth, rtol=0.04)
    assert np.all(result.score.snr.image[rows, columns][inside] > 30)


def test_score_result_fields(score_result):
    _, result = score_result
    assert result.subtracted_image is result.score.snr
    assert np.all(result.score.snr.variance == 1)
    assert result.convolved == "template"
    assert result.decorrelation.mode == "score"
    assert result.diagnostics["preconvolution_psf"] is not None
    assert result.difference_psf.source == "preconvolved science"
    assert result.difference_psf.image(100, 100).sum() == pytest.approx(1.0)


def test_score_needs_the_template_convolved():
    with pytest.raises(ConfigurationError, match="score"):
        PsfMatchConfig(score=True, convolve="science")
    pair = make_fake_pair(shape=(256, 256), n_stars=40, seed=1)
    task = ImagePsfMatchTask(PsfMatchConfig(spatial_kernel_order=0, score=True))
    with pytest.raises(ConfigurationError, match="score"):
        task.subtract_masked_images(pair.template, pair.science, convolve_template=False)
