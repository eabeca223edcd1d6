"""End-to-end options of ImagePsfMatchTask: bases, PCA, spatial models, weighting, outputs."""

import numpy as np
import pytest
from astropy.io import fits
from astropy.stats import sigma_clipped_stats

from gpudiffim import ImagePsfMatchTask, MaskedImage, PsfMatchConfig
from gpudiffim.cellset import RejectReason
from gpudiffim.cli import main
from gpudiffim.errors import NoKernelCandidatesError
from gpudiffim.io import write_masked_image
from gpudiffim.testing import make_fake_pair

SHAPE = (384, 384)


@pytest.fixture(scope="module")
def pair():
    return make_fake_pair(shape=SHAPE, n_stars=150, seed=41, template_noise=2.0, science_noise=2.0)


def _noise_ratio(result):
    difference = result.subtracted_image
    good = difference.mask == 0
    z = difference.image[good] / np.sqrt(difference.variance[good])
    return sigma_clipped_stats(z, sigma=3.0)


def _check_good_subtraction(result, pair, ksum_tol=0.01):
    mean, _, std = _noise_ratio(result)
    assert abs(mean) < 0.05
    assert std == pytest.approx(1.0, abs=0.05)
    assert result.psf_matching_kernel.kernel_sum(192, 192) == pytest.approx(1.0, abs=ksum_tol)


@pytest.fixture(scope="module")
def bright_pair():
    return make_fake_pair(shape=SHAPE, n_stars=150, seed=41, template_noise=2.0, science_noise=2.0,
                          flux_range=(1e3, 1e5))


def test_delta_function_basis_without_pca(bright_pair):
    config = PsfMatchConfig(kernel_basis_set="delta-function", kernel_size=19, fit_for_background=True,
                            spatial_kernel_order=1, use_pca_for_spatial_kernel=False)
    result = ImagePsfMatchTask(config).subtract_masked_images(bright_pair.template, bright_pair.science)
    assert result.kernel_basis.kind == "delta-function" and result.kernel_basis.n_basis == 361
    assert result.psf_matching_kernel.n_basis == 361
    _check_good_subtraction(result, bright_pair)


@pytest.mark.filterwarnings("ignore::gpudiffim.FitQualityWarning")
def test_delta_function_basis_with_pca(bright_pair):
    """DF's default: PCA of the per-stamp kernels (8 components for DF, the mean included)."""
    config = PsfMatchConfig(kernel_basis_set="delta-function", kernel_size=19, fit_for_background=True,
                            spatial_kernel_order=1)
    result = ImagePsfMatchTask(config).subtract_masked_images(bright_pair.template, bright_pair.science)
    kernel = result.psf_matching_kernel
    assert kernel.n_basis == config.pca_components
    np.testing.assert_allclose(kernel.basis.sum(axis=(1, 2)), [1] + [0] * (kernel.n_basis - 1), atol=1e-12)
    assert kernel.kernel_sum(192, 192) == pytest.approx(1.0, abs=0.01)
    mean, _, std = _noise_ratio(result)
    assert abs(mean) < 0.15 and std == pytest.approx(1.0, abs=0.1)


@pytest.mark.parametrize("lambda_type", ["absolute", "relative"])
@pytest.mark.parametrize("regularization_type", ["centralDifference", "forwardDifference"])
@pytest.mark.filterwarnings("ignore::gpudiffim.FitQualityWarning")
def test_delta_function_regularization_variants(pair, lambda_type, regularization_type):
    config = PsfMatchConfig(kernel_basis_set="delta-function", kernel_size=9, fit_for_background=True,
                            spatial_kernel_order=0, use_pca_for_spatial_kernel=False,
                            lambda_type=lambda_type, regularization_type=regularization_type)
    result = ImagePsfMatchTask(config).subtract_masked_images(pair.template, pair.science)
    assert result.psf_matching_kernel.n_basis == 81
    assert result.psf_matching_kernel.kernel_sum(192, 192) == pytest.approx(1.0, abs=0.03)


def test_alard_lupton_with_pca(pair):
    config = PsfMatchConfig(fit_for_background=True, spatial_kernel_order=1,
                            use_pca_for_spatial_kernel=True, num_principal_components=4)
    result = ImagePsfMatchTask(config).subtract_masked_images(pair.template, pair.science)
    kernel = result.psf_matching_kernel
    assert kernel.n_basis == 4
    # first PCA kernel (the mean) sums to 1, the others to 0; its coefficient is constant
    np.testing.assert_allclose(kernel.basis.sum(axis=(1, 2)), [1, 0, 0, 0], atol=1e-12)
    assert np.all(kernel.coefficients[0, 1:] == 0)
    _check_good_subtraction(result, pair)


@pytest.mark.filterwarnings("ignore::gpudiffim.FitQualityWarning")  # raw-coordinate polynomials
def test_chebyshev_and_polynomial_agree(pair):
    results = [ImagePsfMatchTask(PsfMatchConfig(fit_for_background=True, spatial_kernel_order=1,
                                                spatial_model_type=model)).subtract_masked_images(
        pair.template, pair.science) for model in ("chebyshev1", "polynomial")]
    for x, y in ((50, 50), (192, 192), (330, 300)):
        sums = [r.psf_matching_kernel.kernel_sum(x, y) for r in results]
        assert sums[0] == pytest.approx(sums[1], abs=1e-5)
        images = [r.psf_matching_kernel.image(x, y) for r in results]
        np.testing.assert_allclose(images[0], images[1], atol=1e-6 * np.abs(images[0]).max())
        backgrounds = [r.background_model(x, y) for r in results]
        assert backgrounds[0] == pytest.approx(backgrounds[1], abs=1e-3)


def test_xy0_shift_leaves_chebyshev_solution_unchanged(pair):
    shifted = [MaskedImage(m.image, m.mask, m.variance, xy0=(5000, -300)) for m in (pair.template, pair.science)]
    config = PsfMatchConfig(fit_for_background=True, spatial_kernel_order=1)
    base = ImagePsfMatchTask(config).subtract_masked_images(pair.template, pair.science)
    moved = ImagePsfMatchTask(config).subtract_masked_images(*shifted)
    for x, y in ((60, 60), (192, 192)):
        np.testing.assert_allclose(moved.psf_matching_kernel.image(x + 5000, y - 300),
                                   base.psf_matching_kernel.image(x, y), atol=1e-9)
    np.testing.assert_allclose(moved.subtracted_image.image, base.subtracted_image.image, atol=1e-3)


@pytest.mark.parametrize("changes", [
    {"constant_variance_weighting": False},
    {"constant_variance_weighting": False, "iterate_single_kernel": True},
    {"use_core_stats": True},
    {"check_condition_number": True, "max_condition_number": 1e12},
    {"detection": {"det_on_template": True}},
])
def test_options_give_good_subtractions(pair, changes):
    config = PsfMatchConfig.from_mapping({"fit_for_background": True, "spatial_kernel_order": 1, **changes})
    result = ImagePsfMatchTask(config).subtract_masked_images(pair.template, pair.science)
    _check_good_subtraction(result, pair)


def test_condition_number_check_rejects_candidates(pair):
    config = PsfMatchConfig(fit_for_background=True, spatial_kernel_order=0, check_condition_number=True,
                            max_condition_number=10.0)
    rejected = r"every kernel candidate was rejected \(\d+ by condition number\); see the candidates' reasons$"
    with pytest.raises(NoKernelCandidatesError, match=rejected):
        ImagePsfMatchTask(config).subtract_masked_images(pair.template, pair.science)


def test_match_masked_images_and_result_fields(pair):
    result = ImagePsfMatchTask(PsfMatchConfig(fit_for_background=True, spatial_kernel_order=1)) \
        .match_masked_images(pair.template, pair.science)
    assert not hasattr(result, "subtracted_image")
    assert result.matched_image.shape == SHAPE and result.convolved == "template"
    assert set(result.timings) >= {"detection", "kernel fit", "full-image convolution"}
    table = result.kernel_cell_set.to_table()
    assert len(table) == len(result.kernel_cell_set.candidates)
    assert set(table["status"]) <= {"GOOD", "BAD", "UNKNOWN"}
    bad = table[table["status"] == "BAD"]
    assert all(reason for reason in bad["reason"])
    assert table.colnames.index("reason_code") == table.colnames.index("reason") + 1
    for status, reason, code in zip(table["status"], table["reason"], table["reason_code"]):
        assert (status == "BAD") == (code != RejectReason.NONE)
        assert reason.startswith(RejectReason(code).label)      # the sentence opens with the label
    with pytest.raises(AttributeError):
        result.matched_image = None


def test_write_masked_image_is_atomic_and_readable(tmp_path, pair):
    path = tmp_path / "out.fits"
    write_masked_image(path, pair.science, header={"KSUM": 1.0})
    with fits.open(path) as hdus:
        assert [h.name for h in hdus] == ["PRIMARY", "IMAGE", "MASK", "VARIANCE"]
        np.testing.assert_array_equal(hdus["IMAGE"].data, pair.science.image)
        assert hdus["MASK"].header["MP_NO_DATA"] == 8 and hdus[0].header["KSUM"] == 1.0
    with pytest.raises(FileExistsError):
        write_masked_image(path, pair.science)
    assert [p.name for p in tmp_path.iterdir()] == ["out.fits"]


def test_demo_command(tmp_path, capsys):
    output = tmp_path / "diff.fits"
    assert main(["demo", "--size", "256", "--stars", "80", "--kernel-order", "1",
                 "--output", str(output)]) == 0
    text = capsys.readouterr().out
    assert "kernel sum at centre" in text and "GOOD" in text and "std" in text
    with fits.open(output) as hdus:
        assert hdus["IMAGE"].data.shape == (256, 256)
