"""Input validation: bad input gets a clear, specific exception, and inputs are never modified.

Covers :class:`gpudiffim.MaskedImage`, the argument checks of
:class:`gpudiffim.ImagePsfMatchTask`, the validation of
:class:`gpudiffim.PsfMatchConfig` / :class:`gpudiffim.DetectionConfig`, and the
exception hierarchy of :mod:`gpudiffim.errors`.
"""

import dataclasses
import math
import pickle
import re
import warnings

import numpy as np
import pytest

import gpudiffim.errors
from gpudiffim import (
    DEFAULT_MASK_PLANES,
    ConfigurationError,
    DetectionConfig,
    FitQualityWarning,
    GpudiffimError,
    GpudiffimWarning,
    ImagePsfMatchTask,
    InvalidImageError,
    InvalidVarianceError,
    MaskedImage,
    NoDataWarning,
    NoKernelCandidatesError,
    PsfMatchConfig,
    ShapeError,
)
from gpudiffim.testing import make_fake_pair

NO_DATA = 1 << DEFAULT_MASK_PLANES["NO_DATA"]
SHAPE = (24, 30)

#: Small, fast configuration for the task-level cases that need a full fit.
FAST_CONFIG = PsfMatchConfig(spatial_kernel_order=0, fit_for_background=True)


def _planes(seed=0, shape=SHAPE, dtype=np.float64):
    rng = np.random.default_rng(seed)
    image = (100.0 + 5.0 * rng.normal(size=shape)).astype(dtype)
    mask = np.zeros(shape, dtype=np.int32)
    mask[2, 3] = 1 << DEFAULT_MASK_PLANES["SAT"]
    variance = np.full(shape, 25.0, dtype=dtype)
    return image, mask, variance


@pytest.fixture(scope="module")
def pair():
    """A small simulated pair (template, science) with its truth."""
    return make_fake_pair(shape=(160, 160), n_stars=40, seed=11)


def _copies(masked):
    return masked.image.copy(), masked.mask.copy(), masked.variance.copy()


def _assert_unchanged(masked, copies):
    for plane, before in zip((masked.image, masked.mask, masked.variance), copies):
        np.testing.assert_array_equal(plane, before)
        assert not plane.flags.writeable


# ---------------------------------------------------------------------------
# MaskedImage
# ---------------------------------------------------------------------------


class TestMaskedImageShapes:
    @pytest.mark.parametrize("shape", [(30,), (2, 24, 30), (1, 1, 1, 1)])
    def test_image_not_2d(self, shape):
        with pytest.raises(ShapeError, match="2-D"):
            MaskedImage(np.ones(shape))

    def test_scalar_image(self):
        with pytest.raises(ShapeError):
            MaskedImage(np.float64(3.0))

    def test_empty_image(self):
        with pytest.raises(ShapeError, match="empty"):
            MaskedImage(np.zeros((0, 5)))

    @pytest.mark.parametrize("shape", [(24, 31), (30, 24), (24,), (2, 24, 30)])
    def test_mask_of_other_shape(self, shape):
        image, _, variance = _planes()
        with pytest.raises(ShapeError, match="mask"):
            MaskedImage(image, np.zeros(shape, dtype=np.int32), variance)

    @pytest.mark.parametrize("shape", [(24, 31), (30, 24), (24,), (2, 24, 30)])
    def test_variance_of_other_shape(self, shape):
        image, mask, _ = _planes()
        with pytest.raises(ShapeError, match="variance"):
            MaskedImage(image, mask, np.ones(shape))


class TestMaskedImageDtypes:
    @pytest.mark.parametrize("dtype", [np.complex128, np.complex64, bool, object])
    def test_non_real_image(self, dtype):
        image, mask, variance = _planes()
        with pytest.raises(InvalidImageError, match="dtype"):
            MaskedImage(image.astype(dtype), mask, variance)

    def test_string_image(self):
        with pytest.raises(InvalidImageError, match="dtype"):
            MaskedImage(np.full(SHAPE, "1.0"))

    @pytest.mark.parametrize("dtype", [np.complex128, bool, object])
    def test_non_real_variance(self, dtype):
        image, mask, variance = _planes()
        with pytest.raises(InvalidImageError, match="variance"):
            MaskedImage(image, mask, variance.astype(dtype))

    @pytest.mark.parametrize("dtype", [">f4", ">f8", ">i4"])
    def test_big_endian_image(self, dtype):
        image, mask, variance = _planes()
        with pytest.raises(InvalidImageError, match="byte order"):
            MaskedImage(image.astype(dtype), mask, variance)

    @pytest.mark.parametrize("dtype", [">f4", ">f8"])
    def test_big_endian_variance(self, dtype):
        image, mask, variance = _planes()
        with pytest.raises(InvalidImageError, match="byte order") as info:
            MaskedImage(image, mask, variance.astype(dtype))
        assert "variance" in str(info.value)

    @pytest.mark.parametrize("dtype", [np.float32, np.float64, bool, np.complex64])
    def test_non_integer_mask(self, dtype):
        image, mask, variance = _planes()
        with pytest.raises(InvalidImageError, match="mask must be an integer"):
            MaskedImage(image, mask.astype(dtype), variance)

    @pytest.mark.parametrize("dtype", [np.float32, np.float64])
    def test_float_dtypes_kept(self, dtype):
        image, mask, variance = _planes(dtype=dtype)
        masked = MaskedImage(image, mask, variance)
        assert masked.dtype == dtype
        assert masked.variance.dtype == dtype
        assert masked.mask.dtype == np.int32

    def test_integer_image_becomes_float64(self):
        image, mask, variance = _planes()
        masked = MaskedImage(image.astype(np.int32), mask, variance)
        assert masked.dtype == np.float64
        np.testing.assert_array_equal(masked.image, image.astype(np.int32))


class TestMaskedImageNonFinite:
    @pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
    @pytest.mark.parametrize("plane", ["image", "variance"])
    def test_non_finite_flagged_no_data(self, plane, bad_value):
        image, mask, variance = _planes()
        bad = [(0, 0), (5, 7), (23, 29)]
        target = image if plane == "image" else variance
        for row, col in bad:
            target[row, col] = bad_value
        copies = (image.copy(), mask.copy(), variance.copy())
        with pytest.warns(NoDataWarning, match="3 NaN/inf"):
            masked = MaskedImage(image, mask, variance)
        # the caller's arrays are untouched (NaN compares equal to NaN here)
        for array, before in zip((image, mask, variance), copies):
            np.testing.assert_array_equal(array, before)
        flagged = np.zeros(SHAPE, dtype=bool)
        flagged[tuple(np.array(bad).T)] = True
        assert np.array_equal((masked.mask & NO_DATA) != 0, flagged)
        assert np.all(np.isfinite(masked.image))
        assert np.all(np.isfinite(masked.variance))
        # documented: flagged pixels get image = variance = 0
        np.testing.assert_array_equal(masked.image[flagged], 0.0)
        np.testing.assert_array_equal(masked.variance[flagged], 0.0)
        # other bits are kept, other pixels untouched
        assert masked.mask[2, 3] & (1 << DEFAULT_MASK_PLANES["SAT"])
        np.testing.assert_array_equal(masked.image[~flagged], image[~flagged])
        np.testing.assert_array_equal(masked.variance[~flagged], variance[~flagged])

    def test_non_finite_image_without_variance(self):
        image, mask, _ = _planes()
        image[4, 4] = np.nan
        before = image.copy()
        with pytest.warns(NoDataWarning):
            masked = MaskedImage(image, mask)
        np.testing.assert_array_equal(image, before)
        assert masked.mask[4, 4] & NO_DATA
        assert np.all(np.isfinite(masked.variance))
        has_data = (masked.mask & NO_DATA) == 0
        assert np.all(masked.variance[has_data] > 0)

    def test_all_nan_image(self):
        with pytest.raises(InvalidImageError):
            MaskedImage(np.full(SHAPE, np.nan))

    def test_all_nan_image_with_variance(self):
        # the specific error comes first, with no NoDataWarning before it
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(InvalidImageError, match="no data"):
                MaskedImage(np.full(SHAPE, np.nan), variance=np.ones(SHAPE))

    def test_planes_cannot_be_made_writeable(self):
        masked = MaskedImage(*_planes())
        with pytest.raises(ValueError):
            masked.image.flags.writeable = True

    @pytest.mark.parametrize("xy0", [(1.7, 2), (1, 2, 3), "ab", None])
    def test_non_integer_xy0(self, xy0):
        with pytest.raises(InvalidImageError, match="xy0"):
            MaskedImage(np.ones(SHAPE), variance=np.ones(SHAPE), xy0=xy0)

    def test_mask_out_of_int32_range(self):
        with pytest.raises(InvalidImageError, match="32 bits"):
            MaskedImage(np.ones(SHAPE), np.full(SHAPE, 2**40, dtype=np.int64))

    @pytest.mark.parametrize("dtype", [np.float16, np.int16, np.uint8])
    def test_other_real_dtypes_become_float64(self, dtype):
        assert MaskedImage(np.ones(SHAPE, dtype=dtype), variance=np.ones(SHAPE)).dtype == np.float64

    def test_every_pixel_flagged_no_data(self):
        image, _, variance = _planes()
        with pytest.raises(InvalidImageError, match="NO_DATA"):
            MaskedImage(image, np.full(SHAPE, NO_DATA, dtype=np.int32), variance)


class TestMaskedImageVariance:
    @pytest.mark.parametrize("value", [0.0, -1.0, -1e-30])
    def test_non_positive_variance(self, value):
        image, mask, variance = _planes()
        variance[7, 11] = value
        variance[9, 2] = value
        with pytest.raises(InvalidVarianceError, match=r"2 pixel\(s\).*row 7, column 11"):
            MaskedImage(image, mask, variance)

    def test_non_positive_variance_is_invalid_image_error(self):
        image, mask, variance = _planes()
        variance[0, 0] = 0.0
        with pytest.raises(InvalidImageError):
            MaskedImage(image, mask, variance)

    def test_non_positive_variance_allowed_on_no_data(self):
        image, mask, variance = _planes()
        variance[7, 11] = 0.0
        variance[9, 2] = -3.0
        mask[7, 11] |= NO_DATA
        mask[9, 2] |= NO_DATA
        masked = MaskedImage(image, mask, variance)
        assert masked.variance[9, 2] == -3.0

    def test_constant_image_without_variance(self):
        with pytest.raises(InvalidVarianceError, match="variance="):
            MaskedImage(np.full(SHAPE, 7.0))


class TestMaskedImageImmutability:
    def test_planes_read_only(self):
        image, mask, variance = _planes()
        masked = MaskedImage(image, mask, variance)
        for plane in (masked.image, masked.mask, masked.variance):
            with pytest.raises(ValueError, match="read-only"):
                plane[0, 0] = 1
            with pytest.raises(ValueError, match="read-only"):
                plane += 1

    def test_caller_arrays_copied(self):
        image, mask, variance = _planes()
        masked = MaskedImage(image, mask, variance)
        copies = (image.copy(), mask.copy(), variance.copy())
        for array in (image, mask, variance):
            assert array.flags.writeable
            array[...] = 0
        np.testing.assert_array_equal(masked.image, copies[0])
        np.testing.assert_array_equal(masked.mask, copies[1])
        np.testing.assert_array_equal(masked.variance, copies[2])

    def test_properties_cannot_be_reassigned(self):
        masked = MaskedImage(*_planes())
        with pytest.raises(AttributeError):
            masked.image = np.zeros(SHAPE)

    def test_geometry(self):
        masked = MaskedImage(*_planes(), xy0=(100, -7))
        assert masked.xy0 == (100, -7)
        assert masked.shape == SHAPE
        assert masked.bbox() == (100, -7, 100 + SHAPE[1] - 1, -7 + SHAPE[0] - 1)


# ---------------------------------------------------------------------------
# ImagePsfMatchTask arguments
# ---------------------------------------------------------------------------

METHODS = ["subtract_masked_images", "match_masked_images"]


def _with_xy0(masked, xy0):
    return MaskedImage(masked.image, masked.mask, masked.variance, xy0=xy0)


class TestTaskArguments:
    @pytest.mark.parametrize("method", METHODS)
    def test_different_shapes_are_matched_on_the_overlap(self, pair, method, caplog):
        crop = pair.science
        science = MaskedImage(crop.image[:150], crop.mask[:150], crop.variance[:150], xy0=crop.xy0)
        with caplog.at_level("WARNING", logger="gpudiffim.task"):
            result = getattr(ImagePsfMatchTask(FAST_CONFIG), method)(pair.template, science)
        assert result.matched_image.shape == (150, pair.template.shape[1])
        assert result.matched_image.xy0 == crop.xy0
        assert "matching on their overlap" in caplog.text

    @pytest.mark.parametrize("method", METHODS)
    def test_different_xy0_are_matched_on_the_overlap(self, pair, method):
        rows, cols = pair.template.shape
        bbox = (20, 0, cols - 1, rows - 11)
        science = pair.science.subimage(bbox)              # its own xy0 (20, 0) in the parent frame
        task = ImagePsfMatchTask(FAST_CONFIG)
        result = getattr(task, method)(pair.template, science)
        assert result.matched_image.bbox() == bbox
        # the same as matching the two overlapping parts given explicitly
        explicit = getattr(task, method)(pair.template.subimage(bbox), science.subimage(bbox))
        np.testing.assert_array_equal(result.matched_image.image, explicit.matched_image.image)
        np.testing.assert_array_equal(result.matched_image.variance, explicit.matched_image.variance)

    @pytest.mark.parametrize("method", METHODS)
    def test_disjoint_images(self, pair, method):
        rows, cols = pair.template.shape
        science = _with_xy0(pair.science, (cols, 0))
        with pytest.raises(ShapeError, match="do not overlap"):
            getattr(ImagePsfMatchTask(FAST_CONFIG), method)(pair.template, science)

    @pytest.mark.parametrize("method", METHODS)
    @pytest.mark.parametrize("which", ["template", "science"])
    def test_plain_ndarray(self, pair, method, which):
        args = {"template": pair.template, "science": pair.science}
        args[which] = np.array(args[which].image)
        with pytest.raises(TypeError, match=which):
            getattr(ImagePsfMatchTask(FAST_CONFIG), method)(args["template"], args["science"])

    @pytest.mark.parametrize("method", METHODS)
    @pytest.mark.parametrize("name", ["template_fwhm_pix", "science_fwhm_pix"])
    @pytest.mark.parametrize("value", [-2.0, 0.0, 0, np.nan, np.inf, True, "3.0"])
    def test_invalid_fwhm(self, pair, method, name, value):
        with pytest.raises(ConfigurationError, match=name):
            getattr(ImagePsfMatchTask(FAST_CONFIG), method)(
                pair.template, pair.science, **{name: value})

    def test_invalid_task_config(self):
        with pytest.raises(ConfigurationError, match="PsfMatchConfig"):
            ImagePsfMatchTask({"kernel_size": 21})

    @pytest.mark.parametrize("method", METHODS)
    @pytest.mark.parametrize("candidates", [[], np.zeros((0, 2))])
    def test_no_candidates_given(self, pair, method, candidates):
        with pytest.raises(NoKernelCandidatesError):
            getattr(ImagePsfMatchTask(FAST_CONFIG), method)(
                pair.template, pair.science, candidates=candidates)

    @pytest.mark.parametrize("method", METHODS)
    def test_field_without_stars(self, method):
        rng = np.random.default_rng(5)
        shape = (160, 160)
        variance = np.full(shape, 25.0, dtype=np.float32)
        template = MaskedImage((5.0 * rng.normal(size=shape)).astype(np.float32), variance=variance)
        science = MaskedImage((5.0 * rng.normal(size=shape)).astype(np.float32), variance=variance)
        with pytest.raises(NoKernelCandidatesError, match="candidate"):
            getattr(ImagePsfMatchTask(FAST_CONFIG), method)(template, science)

    @pytest.mark.parametrize("candidates", [
        np.zeros((5, 3)),
        np.zeros((2, 5)),
        np.array([10.0, 20.0]),
        np.zeros((2, 2, 2)),
        [[10.0, np.nan]],
        [[10.0, 20.0, 30.0]],
    ], ids=["5x3", "2x5", "1d", "3d", "nan", "triple"])
    @pytest.mark.parametrize("method", METHODS)
    def test_candidates_of_wrong_shape(self, pair, method, candidates):
        with pytest.raises(ConfigurationError, match="candidate"):
            getattr(ImagePsfMatchTask(FAST_CONFIG), method)(
                pair.template, pair.science, candidates=candidates)

    @pytest.mark.parametrize("method", METHODS)
    def test_table_without_xy_columns(self, pair, method):
        table = pytest.importorskip("astropy.table")
        candidates = table.Table({"ra": [10.0, 20.0], "dec": [30.0, 40.0]})
        with pytest.raises(ConfigurationError, match="column"):
            getattr(ImagePsfMatchTask(FAST_CONFIG), method)(
                pair.template, pair.science, candidates=candidates)

    def test_ill_conditioned_spatial_fit_warns(self, pair):
        """Two candidates for a second-order spatial kernel: the fit is underconstrained."""
        brightest = np.argsort(pair.stars["flux"])[::-1]
        inside = [k for k in brightest if 30 < pair.stars["x"][k] < 130 and 30 < pair.stars["y"][k] < 130]
        candidates = [(pair.stars["x"][k], pair.stars["y"][k]) for k in inside[:2]]
        config = PsfMatchConfig(fit_for_background=True, spatial_kernel_order=2, reduce_spatial_order=False)
        with pytest.warns(FitQualityWarning) as caught:
            result = ImagePsfMatchTask(config).subtract_masked_images(
                pair.template, pair.science, candidates=candidates)
        messages = [str(w.message) for w in caught]
        assert any("underconstrained" in m for m in messages)
        assert any("condition number" in m for m in messages)
        assert any("underconstrained" in w for w in result.diagnostics["warnings"])

    def test_table_with_xy_columns(self, pair):
        table = pytest.importorskip("astropy.table")
        stars = pair.stars
        candidates = table.Table({"X": stars["x"], "Y": stars["y"]})
        result = ImagePsfMatchTask(FAST_CONFIG).match_masked_images(
            pair.template, pair.science, candidates=candidates,
            template_fwhm_pix=pair.template_fwhm_pix, science_fwhm_pix=pair.science_fwhm_pix)
        assert result.kernel_cell_set.n_good > 0


class TestTaskDoesNotModifyInputs:
    @pytest.mark.parametrize("convolve_template", [True, False])
    def test_subtract(self, pair, convolve_template):
        before = (_copies(pair.template), _copies(pair.science))
        candidates = np.stack([pair.stars["x"], pair.stars["y"]], axis=1)
        candidates_before = candidates.copy()
        with warnings.catch_warnings():
            # matching the broader science PSF to the template is a deconvolution: the fit
            # may be poorly constrained, which is not what this test is about
            warnings.simplefilter("ignore", FitQualityWarning)
            result = ImagePsfMatchTask(FAST_CONFIG).subtract_masked_images(
                pair.template, pair.science, candidates=candidates,
                convolve_template=convolve_template)
        assert result.subtracted_image.shape == pair.science.shape
        _assert_unchanged(pair.template, before[0])
        _assert_unchanged(pair.science, before[1])
        np.testing.assert_array_equal(candidates, candidates_before)

    def test_match_with_detection(self, pair):
        before = (_copies(pair.template), _copies(pair.science))
        config = PsfMatchConfig(spatial_kernel_order=1, fit_for_background=True)
        result = ImagePsfMatchTask(config).match_masked_images(pair.template, pair.science)
        assert result.matched_image.shape == pair.template.shape
        _assert_unchanged(pair.template, before[0])
        _assert_unchanged(pair.science, before[1])
        # the outputs are new, read-only planes
        assert not np.shares_memory(result.matched_image.image, pair.template.image)
        assert not result.matched_image.image.flags.writeable


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------

INVALID_PSF_MATCH = [
    ("kernel_size", {"kernel_size": 20}),
    ("kernel_size", {"kernel_size": 1}),
    ("kernel_size_max", {"kernel_size_min": 25, "kernel_size_max": 23}),
    ("kernel_size_min", {"kernel_size_min": 4}),
    ("spatial_kernel_order", {"spatial_kernel_order": -1}),
    ("spatial_bg_order", {"spatial_bg_order": -1}),
    ("kernel_basis_set", {"kernel_basis_set": "gaussian"}),
    ("kernel_basis_set", {"kernel_basis_set": "alardLupton"}),
    ("spatial_model_type", {"spatial_model_type": "legendre"}),
    ("alard_deg_gauss", {"alard_deg_gauss": (4, 2)}),
    ("alard_sig_gauss", {"alard_sig_gauss": (0.7, 1.5)}),
    ("alard_deg_gauss", {"alard_deg_gauss": (4, -1, 2)}),
    ("alard_sig_gauss", {"alard_sig_gauss": (0.7, 0.0, 3.0)}),
    ("n_star_per_cell", {"n_star_per_cell": 0}),
    ("n_star_per_cell", {"n_star_per_cell": -2}),
    ("max_spatial_iterations", {"max_spatial_iterations": 6}),
    ("max_spatial_iterations", {"max_spatial_iterations": 0}),
    ("kernel_size", {"kernel_size": True}),
    ("spatial_kernel_order", {"spatial_kernel_order": False}),
    ("spatial_kernel_order", {"spatial_kernel_order": 1.0}),
    ("fit_for_background", {"fit_for_background": 1}),
    ("kernel_size_fwhm_scaling", {"kernel_size_fwhm_scaling": "6.0"}),
    ("max_ksum_sigma", {"max_ksum_sigma": "3"}),
    ("candidate_residual_std_max", {"candidate_residual_std_max": math.nan}),
    ("max_condition_number", {"max_condition_number": math.inf}),
    ("max_ksum_sigma", {"max_ksum_sigma": True}),
    ("max_ksum_sigma", {"max_ksum_sigma": 0.0}),
    ("central_regularization_stencil", {"central_regularization_stencil": 7}),
    ("forward_regularization_orders", {"forward_regularization_orders": (0,)}),
    ("forward_regularization_orders", {"forward_regularization_orders": (4,)}),
    ("forward_regularization_orders", {"forward_regularization_orders": ()}),
    ("forward_regularization_orders", {"forward_regularization_orders": "12"}),
    ("regularization_type", {"regularization_type": "foo"}),
    ("condition_number_type", {"condition_number_type": "eigenvalue"}),
    ("bad_mask_planes", {"bad_mask_planes": "SAT"}),
    ("size_cell_x", {"size_cell_x": 16}),
    ("detection", {"detection": 3}),
]

INVALID_DETECTION = [
    ("det_threshold", {"det_threshold": 2}),
    ("det_threshold", {"det_threshold": math.nan}),
    ("det_threshold_type", {"det_threshold_type": "sigma"}),
    ("fp_npix_min", {"fp_npix_min": 4}),
    ("fp_npix_max", {"fp_npix_max": 501}),
    ("fp_grow_pix", {"fp_grow_pix": 9.5}),
    ("scale_by_fwhm", {"scale_by_fwhm": "yes"}),
    ("min_snr", {"min_snr": -1.0}),
]


def _ids(cases):
    return [f"{name}={next(iter(values.values()))!r}"[:60] for name, values in cases]


class TestConfigValidation:
    @pytest.mark.parametrize(("name", "values"), INVALID_PSF_MATCH, ids=_ids(INVALID_PSF_MATCH))
    def test_invalid_psf_match_config(self, name, values):
        with pytest.raises(ConfigurationError, match=rf"\b{name}\b"):
            PsfMatchConfig(**values)

    @pytest.mark.parametrize(("name", "values"), INVALID_DETECTION, ids=_ids(INVALID_DETECTION))
    def test_invalid_detection_config(self, name, values):
        with pytest.raises(ConfigurationError, match=rf"\b{name}\b"):
            DetectionConfig(**values)

    @pytest.mark.parametrize(("name", "values"), INVALID_DETECTION, ids=_ids(INVALID_DETECTION))
    def test_invalid_nested_detection(self, name, values):
        with pytest.raises(ConfigurationError, match=rf"\b{name}\b"):
            PsfMatchConfig(detection=values)

    def test_invalid_via_replace(self):
        with pytest.raises(ConfigurationError, match="kernel_size"):
            dataclasses.replace(PsfMatchConfig(), kernel_size=22)

    def test_message_names_value_and_expectation(self):
        with pytest.raises(ConfigurationError) as info:
            PsfMatchConfig(max_spatial_iterations=6)
        message = str(info.value)
        assert "max_spatial_iterations=6" in message
        assert "<= 5" in message

    def test_valid_edge_values(self):
        PsfMatchConfig(spatial_kernel_order=0, spatial_bg_order=0, n_star_per_cell=-1,
                       max_spatial_iterations=5, central_regularization_stencil=5,
                       forward_regularization_orders=(1, 2, 3), kernel_size=3,
                       alard_n_gauss=2, alard_deg_gauss=[3, 1], alard_sig_gauss=[1, 2])
        DetectionConfig(det_threshold=3, fp_npix_min=5, fp_npix_max=5)


class TestConfigFromMapping:
    def test_unknown_key(self):
        with pytest.raises(ConfigurationError, match=r"kernelSize.*known fields") as info:
            PsfMatchConfig.from_mapping({"kernel_size": 21, "kernelSize": 21, "zzz": 1})
        assert "'zzz'" in str(info.value)

    def test_unknown_detection_key(self):
        with pytest.raises(ConfigurationError, match="detThreshold"):
            DetectionConfig.from_mapping({"detThreshold": 5.0})
        with pytest.raises(ConfigurationError, match="detThreshold"):
            PsfMatchConfig.from_mapping({"detection": {"detThreshold": 5.0}})

    def test_not_a_mapping(self):
        with pytest.raises(ConfigurationError):
            PsfMatchConfig.from_mapping([("kernel_size", 21)])

    def test_nested_detection(self):
        config = PsfMatchConfig.from_mapping({
            "kernel_size": 19,
            "alard_deg_gauss": [4, 2, 2],           # lists, as parsed from YAML/JSON
            "bad_mask_planes": ["SAT", "NO_DATA"],
            "detection": {"det_threshold": 5.0, "bad_mask_planes": ["SAT"]},
        })
        assert config.kernel_size == 19
        assert config.alard_deg_gauss == (4, 2, 2)
        assert config.bad_mask_planes == ("SAT", "NO_DATA")
        assert isinstance(config.detection, DetectionConfig)
        assert config.detection.det_threshold == 5.0
        assert config.detection.bad_mask_planes == ("SAT",)
        assert config.detection.fp_npix_min == DetectionConfig().fp_npix_min

    def test_round_trip_to_dict(self):
        config = PsfMatchConfig(kernel_basis_set="delta-function", spatial_kernel_order=1,
                                detection=DetectionConfig(det_threshold=7.0))
        assert PsfMatchConfig.from_mapping(config.to_dict()) == config


class TestConfigDefaults:
    def test_alard_lupton_defaults(self):
        config = PsfMatchConfig()
        assert config.kernel_basis_set == "alard-lupton"
        assert config.condition_number_limit == 5.0e7
        assert config.pca_spatial_kernel is False

    def test_delta_function_defaults(self):
        config = PsfMatchConfig(kernel_basis_set="delta-function")
        assert config.condition_number_limit == 5.0e6
        assert config.pca_spatial_kernel is True

    def test_replace_basis_set_rederives_defaults(self):
        config = dataclasses.replace(PsfMatchConfig(), kernel_basis_set="delta-function")
        assert config.condition_number_limit == 5.0e6
        assert config.pca_spatial_kernel is True

    def test_explicit_values_win(self):
        config = PsfMatchConfig(kernel_basis_set="delta-function", max_condition_number=1e8,
                                use_pca_for_spatial_kernel=False)
        assert config.condition_number_limit == 1e8
        assert config.pca_spatial_kernel is False

    def test_detection_default(self):
        assert PsfMatchConfig().detection == DetectionConfig()


class TestConfigFrozen:
    @pytest.mark.parametrize("config", [PsfMatchConfig(), DetectionConfig()])
    def test_assignment_raises(self, config):
        name = dataclasses.fields(config)[0].name
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(config, name, getattr(config, name))

    def test_hashable(self):
        # every sequence field is normalised to a tuple, so configs hash by value
        a = PsfMatchConfig(bad_mask_planes=["SAT"], alard_deg_gauss=[4, 2, 2])
        b = PsfMatchConfig(bad_mask_planes=("SAT",), alard_deg_gauss=(4, 2, 2))
        assert a == b
        assert hash(a) == hash(b)
        assert len({a, b, PsfMatchConfig()}) == 2
        detection = DetectionConfig(bad_mask_planes=["SAT"])
        assert hash(detection) == hash(DetectionConfig(bad_mask_planes=("SAT",)))


# ---------------------------------------------------------------------------
# Exception hierarchy
# ---------------------------------------------------------------------------

ERROR_BUILTINS = {
    "ConfigurationError": ValueError,
    "ShapeError": ValueError,
    "RegistrationError": ValueError,
    "FitsFormatError": ValueError,
    "InvalidImageError": ValueError,
    "InvalidVarianceError": ValueError,
    "NoKernelCandidatesError": RuntimeError,
    "SingularSystemError": np.linalg.LinAlgError,
    "BackendUnavailableError": RuntimeError,
    "MissingDependencyError": ImportError,
}
WARNINGS = ["GpudiffimWarning", "NoDataWarning", "FitQualityWarning", "BadSubtractionWarning"]


class TestExceptions:
    def test_every_class_is_covered(self):
        assert set(gpudiffim.errors.__all__) == set(ERROR_BUILTINS) | set(WARNINGS) | {"GpudiffimError"}

    @pytest.mark.parametrize(("name", "builtin"), sorted(ERROR_BUILTINS.items(), key=lambda kv: kv[0]))
    def test_hierarchy(self, name, builtin):
        cls = getattr(gpudiffim.errors, name)
        assert issubclass(cls, GpudiffimError)
        assert issubclass(cls, builtin)
        assert not issubclass(cls, Warning)

    def test_invalid_variance_is_invalid_image(self):
        assert issubclass(InvalidVarianceError, InvalidImageError)

    @pytest.mark.parametrize("name", sorted(ERROR_BUILTINS) + ["GpudiffimError"] + WARNINGS)
    def test_pickle_round_trip(self, name):
        cls = getattr(gpudiffim.errors, name)
        error = cls("something went wrong: value 3 at (1, 2)")
        restored = pickle.loads(pickle.dumps(error))
        assert type(restored) is cls
        assert str(restored) == str(error)
        assert restored.args == error.args

    def test_pickle_raised_error(self):
        with pytest.raises(ShapeError) as info:
            MaskedImage(np.ones(5))
        restored = pickle.loads(pickle.dumps(info.value))
        assert type(restored) is ShapeError
        assert str(restored) == str(info.value)

    @pytest.mark.parametrize("name", WARNINGS)
    def test_warnings(self, name):
        cls = getattr(gpudiffim.errors, name)
        assert issubclass(cls, GpudiffimWarning)
        assert issubclass(cls, UserWarning)
        assert not issubclass(cls, GpudiffimError)

    def test_exported_from_package(self):
        import gpudiffim
        for name in gpudiffim.errors.__all__:
            assert getattr(gpudiffim, name) is getattr(gpudiffim.errors, name)

    def test_catch_as_builtin(self):
        with pytest.raises(ValueError, match=re.escape("kernel_size")):
            PsfMatchConfig(kernel_size=4)
