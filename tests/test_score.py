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


@pytest.fixture(scope="module", params=["preconvolved", "difference"])
def score_result(request):
    """The equal-depth pair as a score, fitted against the preconvolved science image (Rubin's) or
    from the plain difference's kernel."""
    pair = make_fake_pair(**EQUAL_DEPTH)
    config = PsfMatchConfig(spatial_kernel_order=1, score=True, score_fit=request.param)
    result = ImagePsfMatchTask(config).subtract_masked_images(pair.template, pair.science)
    return pair, result


def test_score_sky_is_unit_normal(score_result):
    """Sky std of the S/N image: 1 within 5 % (measured 0.997 preconvolved, 0.997 from the
    difference).  The mean is the fitted background's error seen through the matched filter,
    which sums about a PSF area of pixels: -0.03 and +0.08 (the plain fit's background is 0.07
    ADU, 0.017 sigma per pixel, off); it must stay below 0.1."""
    pair, result = score_result
    keep = sky_pixels(EQUAL_DEPTH["shape"], np.c_[pair.stars["x"], pair.stars["y"]])
    snr = result.score.snr.image[keep]
    assert np.std(snr) == pytest.approx(1.0, rel=0.05)
    assert abs(np.mean(snr)) < 0.1


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


@pytest.mark.gpu
@pytest.mark.parametrize("fields", [{"decorrelate": True, "convolve": "auto"}, {"score": True},
                                    {"score": True, "score_fit": "difference"}])
def test_cupy_pipeline_matches_numpy(fields):
    """The whole subtraction with decorrelation or a score on the CuPy backend equals NumPy's, on
    device inputs (which stay there) and within float32 rounding in units of the noise (1e-3: the
    score sums ~100 pixels, measured 4e-4 on the stand-in)."""
    cupy = pytest.importorskip("cupy")
    from gpudiffim import MaskedImage, use_backend

    pair = make_fake_pair(shape=(192, 192), n_stars=45, seed=11, template_noise=8.0, science_noise=4.0)
    config = PsfMatchConfig(spatial_kernel_order=1, size_cell_x=64, size_cell_y=64, **fields)
    with use_backend("numpy"):
        expected = ImagePsfMatchTask(config).subtract_masked_images(pair.template, pair.science)
    template, science = (MaskedImage(cupy.asarray(m.image), cupy.asarray(m.mask), cupy.asarray(m.variance))
                         for m in (pair.template, pair.science))
    with use_backend("cupy"):
        result = ImagePsfMatchTask(config).subtract_masked_images(template, science)
    got, want = result.subtracted_image, expected.subtracted_image
    assert isinstance(got.image, cupy.ndarray)
    assert np.array_equal(cupy.asnumpy(got.mask), want.mask)
    valid = (want.mask & want.bits(["EDGE", "NO_DATA"])) == 0
    sigma = np.sqrt(want.variance[valid])
    np.testing.assert_allclose(cupy.asnumpy(got.image)[valid] / sigma, want.image[valid] / sigma, atol=1e-3)
    np.testing.assert_allclose(cupy.asnumpy(got.variance)[valid], want.variance[valid], rtol=1e-4)
    if expected.score is not None:
        np.testing.assert_allclose(cupy.asnumpy(result.score.flux_error), expected.score.flux_error, rtol=1e-4)


def test_sources_detected_on_the_score(tmp_path):
    """``--score --detect 6``: the bright transients are found as positive sources with their
    fluxes, and the SOURCES table is written (the detection itself is tested in test_sources)."""
    from astropy.io import fits
    from astropy.table import Table

    from gpudiffim import Exposure
    from gpudiffim.cli import main
    from gpudiffim.io import write_exposure

    pair = make_fake_pair(**EQUAL_DEPTH)
    paths = {name: tmp_path / f"{name}.fits" for name in ("science", "template")}
    write_exposure(paths["science"], Exposure(pair.science))
    write_exposure(paths["template"], Exposure(pair.template))
    output = tmp_path / "score.fits"
    assert main(["subtract", str(paths["science"]), str(paths["template"]), "-o", str(output), "--score",
                 "--score-fit", "difference", "--detect", "6", "--config", "spatial_kernel_order=1"]) == 0
    with fits.open(output) as hdus:
        assert hdus[0].header["SCORE"] is True
    sources = Table.read(output, hdu="SOURCES")
    transients = pair.stars[(pair.stars["kind"] == "transient") & (pair.stars["science_flux"] > 5e3)]
    for star in transients:
        distance = np.hypot(sources["x"] - star["x"], sources["y"] - star["y"])
        nearest = np.argmin(distance)
        assert distance[nearest] < 1.0
        assert sources["flux"][nearest] == pytest.approx(star["science_flux"], rel=0.05)


def test_score_with_a_large_psf_model():
    """A PSF image larger than the decorrelation tiles (a 151 px model on a 160 px image) is cut to
    the part that fits; the score is finite and its sky std still about 1."""
    from gpudiffim import Exposure
    from gpudiffim.difference_psf import gaussian_psf

    pair = make_fake_pair(shape=(160, 160), n_stars=25, seed=5, template_noise=5.0, science_noise=5.0,
                          template_sigma=1.4, science_sigma=2.0)
    psf = np.pad(gaussian_psf(4.71), 60)
    task = ImagePsfMatchTask(PsfMatchConfig(spatial_kernel_order=0, score=True, score_fit="difference"))
    result = task.subtract_exposures(Exposure(pair.template), Exposure(pair.science, psf_image=psf))
    snr = result.score.snr.image
    keep = sky_pixels(snr.shape, np.c_[pair.stars["x"], pair.stars["y"]], border=20)
    assert np.all(np.isfinite(snr[keep])) and 0.85 < np.std(snr[keep]) < 1.15
    assert result.subtracted_exposure.psf_image.shape == (2 * psf.shape[0] - 1,) * 2
