"""Per-candidate quality report (spec section 4.5): statistics, table, FITS round trip."""

import logging

import numpy as np
import pytest
import scipy.signal
import scipy.stats
from astropy.io import fits
from astropy.table import Table

from gpudiffim import ConfigurationError, Exposure, ImagePsfMatchTask, PsfMatchConfig
from gpudiffim.io import read_exposure, write_exposure
from gpudiffim.quality import (
    AD_CRITICAL_VALUES,
    AD_SIGNIFICANCE_LEVELS,
    RESIDUAL_STATISTICS,
    anderson_darling_normal,
    kernel_moments,
    kolmogorov_smirnov_normal,
    quality_table,
    residual_quality,
)

# The variance planes as simulated: the tests recompute statistics from the inputs independently.
CONFIG = PsfMatchConfig(fit_for_background=True, spatial_kernel_order=1, variance_correction="none")
TOLERANCE = {"rtol": 1e-10, "atol": 1e-10}


@pytest.fixture(scope="module")
def pair(variable_star_pair):
    return variable_star_pair


@pytest.fixture(scope="module")
def result(variable_star_fit):
    return variable_star_fit


def _stamp(plane, x, y, half):
    return np.asarray(plane[y - half:y + half + 1, x - half:x + half + 1], dtype=np.float64)


def _independent_z(template, science, x, y, half, kernel, background):
    """D/sigma of one stamp with scipy.signal.correlate (valid region), no gpudiffim code."""
    h = kernel.shape[0] // 2
    t, s = _stamp(template.image, x, y, half), _stamp(science.image, x, y, half)
    vt, vs = _stamp(template.variance, x, y, half), _stamp(science.variance, x, y, half)
    model = scipy.signal.correlate(t, kernel, mode="valid", method="direct") + background
    difference = s[h:-h, h:-h] - model
    variance = vs[h:-h, h:-h] + scipy.signal.correlate(vt, kernel**2, mode="valid", method="direct")
    return (difference / np.sqrt(variance)).ravel()


def _independent_stats(z, dof):
    n = z.size
    q1, q3 = np.percentile(z, [25, 75])
    ks = scipy.stats.kstest(z, "norm", method="asymp")
    zs = np.sort(z)
    i = np.arange(1, n + 1)
    a2 = -n - np.sum((2 * i - 1) * (scipy.stats.norm.logcdf(zs) + scipy.stats.norm.logsf(zs[::-1]))) / n
    return {"mean": np.mean(z), "median": np.median(z), "iqr": q3 - q1,
            "std": np.sqrt(np.mean((z - z.mean())**2)),
            "ks_d": ks.statistic, "ks_p": ks.pvalue, "ad_a2": a2,
            "chi2_red": np.sum(z**2) / (n - 1 - dof)}


def _independent_moments(kernel):
    rows, cols = np.indices(kernel.shape)
    u, v = cols - kernel.shape[1] // 2, rows - kernel.shape[0] // 2
    w = kernel**2 / np.sum(kernel**2)
    cx, cy = np.sum(w * u), np.sum(w * v)
    return cx, cy, np.sqrt(np.sum(w * (u - cx)**2)), np.sqrt(np.sum(w * (v - cy)**2))


def test_table_has_every_fitted_candidate(result):
    table = result.quality
    fitted = [r for r in result.kernel_cell_set.candidates if r.coefficients]
    assert list(table["id"]) == [r.id for r in fitted]
    assert list(table["status"]) == [r.status for r in fitted]
    assert set(table["status"]) == {"GOOD", "BAD"}
    for stage in ("local", "spatial"):
        for name in RESIDUAL_STATISTICS:
            assert np.all(np.isfinite(table[f"{stage}_{name}"]))
    assert table["kernel_cx_local"].unit == "pix" and table["local_mean"].description


def test_statistics_equal_independent_computation(pair, result):
    table = result.quality
    half = result.diagnostics["stamp_half_size"]
    dof = result.kernel_basis.n_basis + 1
    assert table.meta["dof_local"] == dof
    records = {r.id: r for r in result.kernel_cell_set.candidates}
    for row in table:
        record = records[row["id"]]
        local_kernel = np.tensordot(np.array(record.coefficients), result.kernel_basis.kernels, axes=1)
        spatial_kernel = result.psf_matching_kernel.image(record.x, record.y)
        for stage, kernel, background, stage_dof in (
                ("local", local_kernel, record.background, dof),
                ("spatial", spatial_kernel, float(result.background_model(record.x, record.y)), 0)):
            z = _independent_z(pair.template, pair.science, record.x, record.y, half, kernel, background)
            assert row["n_pixels"] == z.size
            for name, value in _independent_stats(z, stage_dof).items():
                np.testing.assert_allclose(row[f"{stage}_{name}"], value, **TOLERANCE,
                                           err_msg=f"{stage}_{name}")
            cx, cy, sx, sy = _independent_moments(kernel)
            for name, value in (("cx", cx), ("cy", cy), ("sx", sx), ("sy", sy)):
                np.testing.assert_allclose(row[f"kernel_{name}_{stage}"], value, **TOLERANCE)
            np.testing.assert_allclose(row[f"kernel_sum_{stage}"], kernel.sum(), **TOLERANCE)
        np.testing.assert_allclose(row["kernel_mse"], np.mean((spatial_kernel - local_kernel)**2),
                                   **TOLERANCE)


def test_local_statistics_agree_with_the_clipping_statistics(result):
    """The LOCAL sample is the one the single-kernel clipping used (no core statistics)."""
    records = {r.id: r for r in result.kernel_cell_set.candidates}
    for row in result.quality:
        record = records[row["id"]]
        n = row["n_pixels"]
        np.testing.assert_allclose(row["local_mean"], record.single_mean, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(row["local_std"] * np.sqrt(n / (n - 1)), record.single_rms, rtol=1e-9)


def test_anderson_darling_statistic_equals_scipy():
    z = np.random.RandomState(20240611).normal(0.05, 1.1, size=300)
    reference = scipy.stats.goodness_of_fit(scipy.stats.norm, z, known_params={"loc": 0.0, "scale": 1.0},
                                            statistic="ad", n_mc_samples=99)
    a2, _ = anderson_darling_normal(z)
    np.testing.assert_allclose(a2, reference.statistic, **TOLERANCE)


@pytest.mark.parametrize(("a2", "level"), list(zip(AD_CRITICAL_VALUES, AD_SIGNIFICANCE_LEVELS)))
def test_anderson_darling_p_value_at_the_critical_values(a2, level):
    """The asymptotic p-value reproduces Stephens' case-0 table (given to 3 decimals)."""
    from gpudiffim.quality import _anderson_darling_p

    assert _anderson_darling_p(a2) == pytest.approx(level / 100, rel=0.03)


def test_pure_noise_stamp_is_consistent_with_unit_normal():
    rng = np.random.RandomState(90210)
    sigma = 3.0
    difference = sigma * rng.normal(size=(25, 25))
    stats = residual_quality(difference, np.full((25, 25), sigma**2), dof=5)
    assert stats["n"] == 625
    assert stats["ks_p"] > 0.01 and stats["ad_p"] > 0.01
    assert abs(stats["mean"]) < 0.15 and abs(stats["median"]) < 0.15
    assert stats["std"] == pytest.approx(1.0, abs=0.1)
    assert stats["iqr"] == pytest.approx(1.349, abs=0.15)
    assert stats["chi2_red"] == pytest.approx(1.0, abs=0.15)


def test_wrong_noise_is_detected():
    rng = np.random.RandomState(90210)
    stats = residual_quality(1.5 * rng.normal(size=(25, 25)), np.ones((25, 25)))
    assert stats["ks_p"] < 1e-3 and stats["ad_p"] < 1e-3 and stats["chi2_red"] > 2


def test_masked_and_unusable_pixels_are_left_out():
    rng = np.random.RandomState(5)
    difference = rng.normal(size=(9, 9))
    variance = np.ones((9, 9))
    mask = np.zeros((9, 9), dtype=np.int32)
    mask[0, :] = 4          # bad bit
    mask[1, :] = 8          # another plane, not bad
    variance[2, 0] = 0.0    # unusable variance
    difference[3, 0] = np.nan
    stats = residual_quality(difference, variance, mask, bad_bits=4, dof=0)
    keep = np.ones((9, 9), dtype=bool)
    keep[0, :] = keep[2, 0] = keep[3, 0] = False
    assert stats["n"] == keep.sum()
    np.testing.assert_allclose(stats["mean"], difference[keep].mean(), **TOLERANCE)
    empty = residual_quality(difference, variance, np.full((9, 9), 4), bad_bits=4)
    assert empty["n"] == 0 and np.isnan(empty["mean"]) and np.isnan(empty["chi2_red"])


def test_kernel_moments_of_an_offset_gaussian():
    rows, cols = np.indices((21, 21)) - 10
    kernel = np.exp(-0.5 * (((cols - 1.0) / 2.0) ** 2 + ((rows + 0.5) / 1.5) ** 2))
    cx, cy, ixx, iyy, ixy = kernel_moments(kernel)
    assert (cx, cy) == pytest.approx((1.0, -0.5), abs=1e-6)
    assert np.sqrt(2 * ixx) == pytest.approx(2.0, abs=1e-4)
    assert np.sqrt(2 * iyy) == pytest.approx(1.5, abs=1e-4)
    assert ixy == pytest.approx(0.0, abs=1e-10)
    assert all(np.isnan(kernel_moments(np.zeros((5, 5)))))


def test_meta_holds_diagnostics_and_aggregates(result):
    table, diagnostics = result.quality, result.diagnostics
    assert table.meta["spatial_condition_number"] == diagnostics["spatial_condition_number"]
    assert table.meta["warnings"] == diagnostics["warnings"]
    assert table.meta["n_good"] == result.kernel_cell_set.n_good
    good = table[table["status"] == "GOOD"]
    assert table.meta["n_aggregated"] == len(good)
    for name in ("spatial_std", "local_chi2_red", "kernel_sx_spatial"):
        values = np.asarray(good[name])
        assert table.meta[f"{name}_MEAN"] == pytest.approx(values.mean(), rel=1e-12)
        assert table.meta[f"{name}_MEDIAN"] == pytest.approx(np.median(values), rel=1e-12)
        assert table.meta[f"{name}_STDEV"] == pytest.approx(values.std(), rel=1e-12)
    # GOOD candidates of a correct fit look like noise; the planted variables do not
    assert 0.9 < table.meta["spatial_std_MEDIAN"] < 1.1
    assert np.all(table[table["status"] == "BAD"]["local_chi2_red"] > 0) and len(good) >= 10


def test_underconstrained_fit_warnings_are_in_the_meta(pair):
    from gpudiffim import FitQualityWarning

    brightest = np.argsort(pair.stars["flux"])[::-1]
    inside = [k for k in brightest if 40 < pair.stars["x"][k] < 216 and 40 < pair.stars["y"][k] < 216]
    candidates = [(pair.stars["x"][k], pair.stars["y"][k]) for k in inside[:2]]
    config = PsfMatchConfig(fit_for_background=True, spatial_kernel_order=2, reduce_spatial_order=False)
    with pytest.warns(FitQualityWarning):
        fit = ImagePsfMatchTask(config).match_masked_images(pair.template, pair.science,
                                                            candidates=candidates)
    assert any("underconstrained" in w for w in fit.quality.meta["warnings"])
    assert fit.quality.meta["spatial_condition_number"] == fit.diagnostics["spatial_condition_number"]


def test_quality_is_summarised_in_the_log(pair, caplog):
    result = ImagePsfMatchTask(CONFIG).match_masked_images(pair.template, pair.science)
    with caplog.at_level(logging.INFO, logger="gpudiffim"):
        first = result.quality
        assert result.quality is first  # computed once
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("quality over")]
    assert len(lines) == 1 and "spatial condition number" in lines[0]


def test_exposure_results_carry_the_report(pair):
    result = ImagePsfMatchTask(CONFIG).subtract_exposures(Exposure(pair.template), Exposure(pair.science))
    assert len(result.quality) > 0
    again = quality_table(result, result.warped_exposure, Exposure(pair.science))
    np.testing.assert_array_equal(again["spatial_ks_d"], result.quality["spatial_ks_d"])


def test_convolving_the_science_image_swaps_the_stamps(pair):
    """With convolve_template=False the science stamps are convolved and the template is the target."""
    result = ImagePsfMatchTask(CONFIG).match_masked_images(pair.science, pair.template,
                                                           convolve_template=False)
    half = result.diagnostics["stamp_half_size"]
    row = result.quality[0]
    record = next(r for r in result.kernel_cell_set.candidates if r.id == row["id"])
    kernel = np.tensordot(np.array(record.coefficients), result.kernel_basis.kernels, axes=1)
    # arguments were (template=science image, science=template image): the "science" is convolved
    z = _independent_z(pair.template, pair.science, record.x, record.y, half, kernel, record.background)
    np.testing.assert_allclose(row["local_std"], np.std(z), **TOLERANCE)


def test_chunks_give_the_same_table(result, pair, monkeypatch):
    import gpudiffim.quality

    monkeypatch.setattr(gpudiffim.quality, "_CHUNK", 5)
    chunked = quality_table(result, pair.template, pair.science)
    assert len(chunked) == len(result.quality) > 10
    for name in chunked.colnames:
        if chunked[name].dtype.kind == "f":     # FFT batches of another size: last-bit differences
            np.testing.assert_allclose(chunked[name], result.quality[name], rtol=1e-12, atol=1e-12)
        else:
            np.testing.assert_array_equal(chunked[name], result.quality[name])
    assert chunked.meta.keys() == result.quality.meta.keys()
    assert chunked.meta["local_std_MEDIAN"] == pytest.approx(result.quality.meta["local_std_MEDIAN"],
                                                             rel=1e-12)


def test_ks_p_value_is_close_to_the_exact_one():
    z = np.random.RandomState(7).normal(0.1, 1.0, size=529)
    _, p = kolmogorov_smirnov_normal(z)
    assert p == pytest.approx(scipy.stats.kstest(z, "norm").pvalue, abs=0.015)


def test_quality_table_needs_the_fit_settings(result, pair):
    import dataclasses

    bare = dataclasses.replace(result, diagnostics={})
    with pytest.raises(ValueError, match="not made by ImagePsfMatchTask"):
        quality_table(bare, pair.template, pair.science)
    table = quality_table(bare, pair.template, pair.science,
                          stamp_half_size=result.diagnostics["stamp_half_size"],
                          bad_mask_planes=("NO_DATA", "EDGE", "SAT"),
                          n_stamp_parameters=result.diagnostics["n_stamp_parameters"])
    # the fit's own rows form T*K from the design columns, the images' recomputation by FFT: rounding apart
    np.testing.assert_allclose(table["local_ad_a2"], result.quality["local_ad_a2"], rtol=1e-10)


def test_quality_hdu_round_trips_through_write_exposure(result, tmp_path):
    path = tmp_path / "diff.fits"
    write_exposure(path, Exposure(result.subtracted_image), kernel=result.psf_matching_kernel,
                   tables={"QUALITY": result.quality})
    with fits.open(path) as hdus:
        assert [h.name for h in hdus] == ["PRIMARY", "IMAGE", "MASK", "VARIANCE", "KERNEL", "QUALITY"]
        assert isinstance(hdus["QUALITY"], fits.BinTableHDU)
        header = hdus["QUALITY"].header
        assert header["SPATIAL_CONDITION_NUMBER"] == result.quality.meta["spatial_condition_number"]
        assert header["LOCAL_STD_MEDIAN"] == result.quality.meta["local_std_MEDIAN"]
        assert header["TCOMM8"].startswith("mean of D/sigma")
    back = Table.read(path, hdu="QUALITY")
    assert back.colnames == result.quality.colnames
    for name in back.colnames:
        if back[name].dtype.kind in "fi":
            np.testing.assert_array_equal(back[name], result.quality[name])
        else:
            column = back[name].filled("") if hasattr(back[name], "filled") else back[name]
            assert list(column) == list(result.quality[name])
    assert str(back["kernel_cx_local"].unit) == "pix"
    exposure = read_exposure(path)
    np.testing.assert_array_equal(exposure.masked_image.image, result.subtracted_image.image)


def test_write_exposure_without_tables_is_unchanged(result, tmp_path):
    path = tmp_path / "plain.fits"
    write_exposure(path, Exposure(result.subtracted_image), tables={"QUALITY": None})
    with fits.open(path) as hdus:
        assert [h.name for h in hdus] == ["PRIMARY", "IMAGE", "MASK", "VARIANCE"]


@pytest.mark.parametrize("tables", [{"IMAGE": Table({"a": [1]})}, {"bad name": Table({"a": [1]})},
                                    [Table({"a": [1]})]])
def test_write_exposure_rejects_bad_table_names(result, tmp_path, tables):
    with pytest.raises(ConfigurationError):
        write_exposure(tmp_path / "x.fits", Exposure(result.subtracted_image), tables=tables)
    assert not (tmp_path / "x.fits").exists()


def test_the_report_from_the_kept_residuals_equals_the_one_from_the_images(result, pair):
    """What the fit kept (``residual_rows``) gives the table that cutting the stamps again gives."""
    kept, again = quality_table(result), quality_table(result, pair.template, pair.science)
    assert kept.colnames == again.colnames and len(kept) == len(again) > 10
    for name in kept.colnames:
        if kept[name].dtype.kind == "f":     # T*K from the design columns vs by FFT: rounding apart
            np.testing.assert_allclose(kept[name], again[name], rtol=1e-10, atol=1e-10, err_msg=name)
        else:
            np.testing.assert_array_equal(kept[name], again[name])
    rows = result.residual_rows
    fit_width = 2 * result.diagnostics["stamp_half_size"] + 2 - result.kernel_basis.kernels.shape[1]
    assert rows.local.shape == rows.spatial.shape == (len(kept), fit_width**2)


def test_results_do_not_keep_the_input_images_alive():
    import gc
    import weakref

    from gpudiffim.testing import make_fake_pair

    pair = make_fake_pair(shape=(192, 192), n_stars=40, seed=11)
    planes = [weakref.ref(getattr(image, name)) for image in (pair.template, pair.science)
              for name in ("image", "variance", "mask")]
    result = ImagePsfMatchTask(CONFIG).subtract_masked_images(pair.template, pair.science)
    del pair
    gc.collect()
    assert [ref() is None for ref in planes] == [True] * 6
    assert len(result.quality) == len(result.residual_rows.index) > 0


def test_without_kept_residuals_the_report_says_what_to_do(pair):
    import dataclasses

    config = dataclasses.replace(CONFIG, quality_report=False)
    result = ImagePsfMatchTask(config).match_masked_images(pair.template, pair.science)
    assert result.residual_rows is None
    with pytest.raises(ValueError, match="quality_report=False"):
        _ = result.quality
    assert len(quality_table(result, pair.template, pair.science)) > 0
    with pytest.raises(ValueError, match="both the template and the science image"):
        quality_table(result, pair.template)
