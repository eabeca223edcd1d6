"""Sources detected on difference and score images (issue 15, item 5): :mod:`gpudiffim.sources`.

Simulated differences are white noise plus Gaussian point sources of known
flux (what an ideal or decorrelated difference is), except the dipole and
bad-subtraction tests, which subtract a simulated pair with the task.

Detection statistics on white noise: with a matched filter the two-sided
false-detection rate at a threshold ``t`` falls as ``t exp(-t^2/2)`` and with
the PSF area; the completeness of sources of PSF S/N ``s`` is about
``Phi(s - t)`` (plus a little from picking the highest pixel).  At the
default 5 sigma, 6-sigma sources are therefore found at ~86 % only; the
issue's criterion (>= 90 % at <= 1 false per 10^6 px) needs a threshold of
~4.75 sigma, and is then met only just: with a PSF of FWHM 5.9 px, four
pairs of 2048^2 fields gave 90.4-91.6 % and 0.14-0.85 false per 10^6 px
(seeds 11 and 12, used here: 90.5 % and 0.28).
"""

import warnings

import numpy as np
import pytest
from scipy.spatial import cKDTree

from gpudiffim import ImagePsfMatchTask, MaskedImage
from gpudiffim.errors import (BadSubtractionWarning, ConfigurationError, InvalidImageError, InvalidVarianceError,
                              ShapeError)
from gpudiffim.image import DEFAULT_MASK_PLANES
from gpudiffim.sources import SOURCE_COLUMNS, detect_in_masked_image, detect_sources, matched_filter
from gpudiffim.testing import _render, gaussian_kernel, make_fake_pair

SIGMA = 2.5                      # PSF sigma (px) of the white-noise differences: FWHM 5.9 px
PSF = gaussian_kernel(SIGMA, 12)
NOISE = 3.0
#: PSF-flux error of a centred source on noise NOISE: NOISE / sqrt(sum P^2).
FLUX_ERR = NOISE / np.sqrt(np.sum(PSF**2))


def _grid_sources(rng, n, spacing, border=40):
    """Positions on a grid (one per ``spacing`` box, randomly placed within half a pixel)."""
    g = np.arange(border, n - border, spacing, dtype=float)
    x, y = (a.ravel() for a in np.meshgrid(g, g))
    return x + rng.uniform(-0.5, 0.5, x.size), y + rng.uniform(-0.5, 0.5, y.size)


def _difference(seed, n, snr, spacing=64, sigma=SIGMA):
    """White-noise difference (n x n, noise NOISE) with sources of PSF S/N ``snr`` (a value or one per source)."""
    rng = np.random.default_rng(seed)
    x, y = _grid_sources(rng, n, spacing)
    snr = np.broadcast_to(np.asarray(snr, dtype=float), x.shape)
    flux = snr * FLUX_ERR
    image = rng.normal(0.0, NOISE, (n, n)) + _render((n, n), (0, 0), x, y, flux, sigma)
    return image, np.full((n, n), NOISE**2), x, y, flux


def _match(table, x, y, radius=2.0):
    """Index of the detection nearest each true position, and whether it lies within ``radius``."""
    if len(table) == 0:
        return np.zeros(len(x), dtype=int), np.zeros(len(x), dtype=bool)
    distance, index = cKDTree(np.c_[table["x"], table["y"]]).query(np.c_[x, y])
    return index, distance <= radius


def _false_per_million(table, x, y, shape, exclusion=15.0):
    """Detections farther than ``exclusion`` px from every true source, per 10^6 such pixels."""
    rows, cols = np.indices(shape)
    free = cKDTree(np.c_[x, y]).query(np.c_[cols.ravel(), rows.ravel()], distance_upper_bound=exclusion)[0]
    n_free = np.count_nonzero(np.isinf(free))
    distance = cKDTree(np.c_[x, y]).query(np.c_[table["x"], table["y"]])[0] if len(table) else np.zeros(0)
    return np.count_nonzero(distance > exclusion) / n_free * 1e6


@pytest.fixture(scope="module")
def six_sigma_fields():
    """Two 2048^2 white-noise differences with 6-sigma and 8-sigma sources (alternating), 961 each."""
    fields = []
    for seed in (11, 12):
        rng_snr = np.where(np.arange(31 * 31) % 2 == 0, 6.0, 8.0)
        fields.append(_difference(seed, 2048, rng_snr))
    return fields


def _recovery(fields, threshold):
    found = {6.0: [], 8.0: []}
    false = []
    for image, variance, x, y, flux in fields:
        table = detect_sources(image, variance, psf=PSF, threshold=threshold)
        _, matched = _match(table, x, y)
        for snr in found:
            found[snr].append(matched[np.isclose(flux, snr * FLUX_ERR)])
        false.append(_false_per_million(table, x, y, image.shape))
    return {snr: np.concatenate(v).mean() for snr, v in found.items()}, np.mean(false)


def test_six_sigma_transients_recovered_with_few_false_detections(six_sigma_fields):
    """The issue's criterion at 4.75 sigma: >= 90 % of 6-sigma sources, <= 1 false per 10^6 px."""
    recovered, false = _recovery(six_sigma_fields, 4.75)
    assert recovered[6.0] >= 0.90, recovered                      # measured 0.905
    assert recovered[8.0] >= 0.995, recovered
    assert false <= 1.0, false                                     # measured 0.28


def test_default_threshold_completeness_follows_gaussian_statistics(six_sigma_fields):
    """At 5 sigma, 6-sigma sources are found at about Phi(1) = 84 % (+ peak picking), 8-sigma ones all."""
    recovered, false = _recovery(six_sigma_fields, 5.0)
    assert 0.83 <= recovered[6.0] <= 0.93, recovered               # measured 0.864
    assert recovered[8.0] >= 0.995, recovered
    assert false <= 0.5, false                                     # measured 0


def _varying_psf(x, y):
    """A PSF whose sigma grows from 2.2 px (x = 0) to 2.8 px (x = 1024)."""
    return gaussian_kernel(2.2 + 0.6 * x / 1024, 12)


@pytest.mark.parametrize("varying", [False, True], ids=["constant-psf", "callable-psf"])
def test_psf_flux_is_unbiased_and_errors_are_right(varying):
    """S/N-20 sources: mean flux ratio within 1 %, pull std 1 within 10 %, positions within 0.05 px."""
    rng = np.random.default_rng(21)
    n, xy0 = 1024, (100, -50)
    x, y = _grid_sources(rng, n, 48)
    sigma = 2.2 + 0.6 * x / 1024 if varying else np.full(x.size, SIGMA)
    flux = 20 * FLUX_ERR
    image = rng.normal(0.0, NOISE, (n, n))
    for s in np.unique(np.round(sigma, 3)):           # _render takes one sigma per call
        pick = np.round(sigma, 3) == s
        image += _render((n, n), (0, 0), x[pick], y[pick], np.full(pick.sum(), flux), s)
    psf = (lambda px, py: _varying_psf(px - xy0[0], py - xy0[1])) if varying else PSF
    table = detect_sources(image, np.full((n, n), NOISE**2), psf=psf, xy0=xy0)
    index, matched = _match(table, x + xy0[0], y + xy0[1], radius=1.0)
    assert matched.all()
    assert len(table) == x.size                                    # no false detection on 10^6 px at 5 sigma
    got = table[index]
    ratio = got["flux"] / flux
    pull = (got["flux"] - flux) / got["flux_err"]
    assert abs(ratio.mean() - 1) < 0.01, ratio.mean()
    assert abs(pull.std() - 1) < 0.10, pull.std()
    assert abs(np.mean(got["x"] - x - xy0[0])) < 0.05 and abs(np.mean(got["y"] - y - xy0[1])) < 0.05
    assert np.std(got["x"] - x - xy0[0]) < 0.2                     # ~ 1.4 sigma / S/N
    np.testing.assert_allclose(got["snr"], got["flux"] / got["flux_err"])
    assert np.all(got["sign"] == 1) and not np.any(got["dipole"])


def test_negative_sources_mirror_positive_ones():
    image, variance, x, y, flux = _difference(31, 256, 12.0)
    plus = detect_sources(image, variance, psf=PSF)
    minus = detect_sources(-image, variance, psf=PSF)
    assert len(plus) == len(minus) == x.size
    assert np.all(plus["sign"] == 1) and np.all(minus["sign"] == -1)
    np.testing.assert_allclose(minus["flux"], -plus["flux"], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(minus["flux_err"], plus["flux_err"], rtol=1e-12)
    np.testing.assert_allclose(minus["x"], plus["x"], atol=1e-9)


def test_score_image_gives_the_same_sources_as_the_difference():
    """A score (the matched filter's S/N) with its flux-error map: the difference's sources and fluxes."""
    image, variance, x, y, flux = _difference(32, 256, np.linspace(8.0, 30.0, 9), spacing=80)
    direct = detect_sources(image, variance, psf=PSF)
    score, information = matched_filter(image, 1 / variance, PSF)
    score_psf = gaussian_kernel(SIGMA * np.sqrt(2), 17)             # P correlated with itself
    from_score = detect_sources(score, kind="score", psf=score_psf, flux_error=1 / np.sqrt(information))
    assert len(direct) == len(from_score) == x.size
    for column in ("x", "y", "npix", "peak_snr"):
        np.testing.assert_allclose(from_score[column], direct[column], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(from_score["flux_err"], direct["flux_err"], rtol=0.01)
    # the interpolated peak S/N is the PSF fit at the refined position, to a small fraction of sigma
    np.testing.assert_allclose(from_score["flux"], direct["flux"], rtol=0, atol=0.1 * FLUX_ERR)
    assert from_score.meta["DETFWHM"] == pytest.approx(direct.meta["DETFWHM"], rel=0.01)
    unmeasured = detect_sources(score, np.ones_like(score), kind="score", psf=score_psf)
    assert np.all(np.isnan(unmeasured["flux"]))
    np.testing.assert_allclose(unmeasured["snr"], direct["peak_snr"], rtol=1e-9)


# ---------------------------------------------------------------------------
# dipoles


def _isolated_pair(offset, negative_fraction, seed=41):
    rng = np.random.default_rng(seed)
    n = 128
    image = rng.normal(0.0, NOISE, (n, n))
    flux = 40 * FLUX_ERR
    image += _render((n, n), (0, 0), np.array([60.2]), np.array([64.7]), np.array([flux]), SIGMA)
    image -= _render((n, n), (0, 0), np.array([60.2 + offset]), np.array([64.7]),
                     np.array([negative_fraction * flux]), SIGMA)
    return detect_sources(image, np.full((n, n), NOISE**2), psf=PSF)


@pytest.mark.parametrize(("offset", "negative_fraction", "dipole"), [
    (8.0, 1.0, True),        # two lobes 1.4 PSF FWHM apart, equal fluxes
    (30.0, 1.0, False),      # too far apart
    (8.0, 0.25, False),      # a bright positive and a faint negative: not comparable
])
def test_dipole_pairing(offset, negative_fraction, dipole):
    table = _isolated_pair(offset, negative_fraction)
    assert sorted(table["sign"].tolist()) == [-1, 1]
    assert table["dipole"].tolist() == [dipole, dipole]
    assert table["partner"].tolist() == ([2, 1] if dipole else [0, 0])
    assert table.meta["NDIPOLE"] == int(dipole)


@pytest.fixture(scope="module")
def crowded_subtraction():
    """A simulated 1024^2 pair with 2000 stars, 20 transients and one star moved by 1 px, subtracted."""
    pair = make_fake_pair(shape=(1024, 1024), n_stars=2000, seed=3, n_transients=20)
    x, y, flux = 300.3, 400.6, 3e4
    template, science = pair.template, pair.science
    moved_template = np.asarray(template.image) + _render(template.image.shape, (0, 0), np.array([x]),
                                                          np.array([y]), np.array([flux]), 1.5)
    moved_science = np.asarray(science.image) + _render(science.image.shape, (0, 0), np.array([x + 1.0]),
                                                        np.array([y]), np.array([flux]), 2.2)
    template = MaskedImage(moved_template.astype(np.float32), template.mask, template.variance)
    science = MaskedImage(moved_science.astype(np.float32), science.mask, science.variance)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")              # the task's own fit-quality notes are not under test
        result = ImagePsfMatchTask().subtract_masked_images(template, science)
    return pair, result, (x + 0.5, y)


def test_moved_star_is_a_dipole(crowded_subtraction):
    pair, result, (x, y) = crowded_subtraction
    table = detect_in_masked_image(result.subtracted_image, psf=result.difference_psf)   # has .image(x, y)
    near = table[np.hypot(table["x"] - x, table["y"] - y) < 6]
    assert sorted(near["sign"].tolist()) == [-1, 1]
    assert near["dipole"].all()
    assert sorted(near["partner"].tolist()) == sorted(near["id"].tolist())[::-1] or \
        set(near["partner"]) == set(near["id"])
    positive = near[near["sign"] == 1][0]
    assert positive["x"] > x                      # the star moved to +x: the positive lobe is on that side
    assert table.meta["NDIPOLE"] == 1             # nothing else pairs up
    transients = pair.stars[pair.stars["kind"] == "transient"]
    _, matched = _match(table, transients["x"], transients["y"])
    found = table[_match(table, transients["x"], transients["y"])[0][matched]]
    assert np.all(found["sign"] == 1) and not found["dipole"].any()


def test_bad_subtraction_guard(crowded_subtraction):
    """A kernel sum 20 % too large on a crowded field covers ~25 % of the image with footprints."""
    _, result, _ = crowded_subtraction
    good = result.subtracted_image
    psf = result.difference_psf
    table = detect_in_masked_image(good, psf=psf)            # no warning (warnings are errors here)
    assert table.meta["FPFRAC"] < 0.01 and table.meta["BADSUB"] is False       # measured 0.52 %
    bad = MaskedImage(np.asarray(good.image) - 0.2 * np.asarray(result.matched_image.image), good.mask,
                      good.variance, xy0=good.xy0)
    with pytest.warns(BadSubtractionWarning, match="footprints cover"):
        flagged = detect_in_masked_image(bad, psf=psf)
    assert flagged.meta["BADSUB"] is True
    assert flagged.meta["FPFRAC"] > 0.10, flagged.meta["FPFRAC"]            # measured 25 %
    assert flagged.meta["FPMAXFRC"] == 0.05
    # a stricter or looser limit moves the guard
    assert detect_in_masked_image(bad, psf=psf, max_footprint_fraction=0.5).meta["BADSUB"] is False


# ---------------------------------------------------------------------------
# masks, table layout, bad input


def test_masked_pixels_are_excluded():
    image, variance, x, y, flux = _difference(51, 192, 30.0)
    mask = np.zeros(image.shape, dtype=np.int32)
    row, col = int(round(y[0])), int(round(x[0]))
    mask[row - 20:row + 21, col - 20:col + 21] = 1 << DEFAULT_MASK_PLANES["BAD"]
    image[mask != 0] = np.nan                                     # NaN is allowed where masked
    table = detect_sources(image, variance, mask, psf=PSF)
    assert len(table) == x.size - 1
    assert np.min(np.hypot(table["x"] - x[0], table["y"] - y[0])) > 15
    boolean = detect_sources(image, variance, mask != 0, psf=PSF)
    np.testing.assert_array_equal(boolean["x"], table["x"])
    assert table.meta["NGOODPIX"] == image.size - 41 * 41
    # a plane not in bad_mask_planes is not excluded
    cr = np.where(mask != 0, 1 << DEFAULT_MASK_PLANES["CR"], 0).astype(np.int32)
    clean = image.copy()
    clean[mask != 0] = 0.0
    assert len(detect_sources(clean, variance, cr, psf=PSF, min_pixels=1)) >= x.size - 1


def test_source_at_the_edge_is_measured_without_edge_pixels():
    rng = np.random.default_rng(52)
    n = 96
    flux = 30 * FLUX_ERR
    image = rng.normal(0.0, NOISE, (n, n)) + _render((n, n), (0, 0), np.array([1.2]), np.array([50.3]),
                                                     np.array([flux]), SIGMA)
    table = detect_sources(image, np.full((n, n), NOISE**2), psf=PSF)
    assert len(table) == 1
    # part of the PSF is off the image: the error is that of the PSF's pixels inside (at the measured
    # position, which the missing half makes less certain), and the flux stays right
    inside = _render((n, n), (0, 0), np.array(table["x"]), np.array(table["y"]), np.array([1.0]), SIGMA)
    assert table["flux_err"][0] == pytest.approx(NOISE / np.sqrt(np.sum(inside**2)), rel=0.01)
    assert table["flux_err"][0] > 1.1 * FLUX_ERR
    assert abs(table["flux"][0] - flux) < 3 * table["flux_err"][0]


def test_table_columns_units_and_meta():
    image, variance, *_ = _difference(53, 128, 10.0)
    table = detect_sources(image, variance, psf=PSF)
    assert table.colnames == list(SOURCE_COLUMNS)
    assert str(table["x"].unit) == "pix" and str(table["flux"].unit) == "ct"
    assert table["id"].tolist() == list(range(1, len(table) + 1))
    assert {"KIND", "THRESH", "FPFRAC", "FPMAXFRC", "BADSUB", "NPOS", "NNEG", "NDIPOLE"} <= set(table.meta)
    assert table.meta["DETFWHM"] == pytest.approx(np.sqrt(2) * 2.3548 * SIGMA, rel=0.01)
    assert table.meta["DIPSEP"] == pytest.approx(1.5 * table.meta["DETFWHM"])
    empty = detect_sources(np.zeros((64, 64)), np.ones((64, 64)), psf=PSF)
    assert len(empty) == 0 and empty.colnames == list(SOURCE_COLUMNS)


@pytest.mark.parametrize(("change", "error", "match"), [
    (lambda a: {"image": a["image"][0]}, ShapeError, "2-D"),
    (lambda a: {"variance": a["variance"][:-1]}, ShapeError, "variance has shape"),
    (lambda a: {"mask": np.zeros((3, 3), dtype=np.int32)}, ShapeError, "mask has shape"),
    (lambda a: {"image": np.where(np.eye(64, dtype=bool), np.nan, a["image"])}, InvalidImageError,
     "64 NaN or infinite"),
    (lambda a: {"variance": np.where(np.eye(64, dtype=bool), 0.0, a["variance"])}, InvalidVarianceError,
     "zero or negative"),
    (lambda a: {"variance": np.where(np.eye(64, dtype=bool), np.inf, a["variance"])}, InvalidVarianceError,
     "NaN or infinite"),
    (lambda a: {"variance": None}, ConfigurationError, "needs its variance"),
    (lambda a: {"image": a["image"].astype(">f8")}, InvalidImageError, "byte order"),
    (lambda a: {"psf": np.ones((4, 5))}, ShapeError, "odd shape"),
    (lambda a: {"psf": lambda x, y: np.ones((4, 4))}, ShapeError, "odd shape"),
    (lambda a: {"psf": -PSF}, InvalidImageError, "positive sum"),
    (lambda a: {"kind": "scores"}, ConfigurationError, "kind"),
    (lambda a: {"threshold": -5}, ConfigurationError, "threshold"),
    (lambda a: {"min_pixels": 0}, ConfigurationError, "min_pixels"),
    (lambda a: {"dipole_flux_ratio": 2.0}, ConfigurationError, "dipole_flux_ratio"),
    (lambda a: {"max_footprint_fraction": 0.0}, ConfigurationError, "max_footprint_fraction"),
    (lambda a: {"flux_error": a["variance"]}, ConfigurationError, "flux_error is for a score"),
])
def test_bad_input_raises_clear_errors(change, error, match):
    rng = np.random.default_rng(61)
    arguments = {"image": rng.normal(size=(64, 64)), "variance": np.ones((64, 64)), "mask": None, "psf": PSF}
    arguments.update(change(arguments))
    with pytest.raises(error, match=match):
        detect_sources(arguments.pop("image"), arguments.pop("variance"), arguments.pop("mask"), **arguments)


def test_masked_image_wrapper_refuses_its_own_fields():
    masked = MaskedImage(np.zeros((32, 32)), variance=np.ones((32, 32)))
    with pytest.raises(ConfigurationError, match="xy0"):
        detect_in_masked_image(masked, psf=PSF, xy0=(1, 1))
    with pytest.raises(TypeError, match="MaskedImage"):
        detect_in_masked_image(np.zeros((32, 32)), psf=PSF)


# ---------------------------------------------------------------------------
# GPU


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["difference", "score"])
def test_cupy_detection_equals_numpy(kind):
    import cupy

    image, variance, *_ = _difference(71, 384, np.linspace(5.0, 30.0, 25), spacing=64)
    image[100:110, 200:260] -= 40.0                               # a negative streak
    mask = np.zeros(image.shape, dtype=np.int32)
    mask[300:330, 10:50] = 1 << DEFAULT_MASK_PLANES["SAT"]
    flux_error = None
    if kind == "score":
        image, information = matched_filter(image, 1 / variance, PSF)
        variance, flux_error = None, 1 / np.sqrt(information)
    options = {"psf": PSF, "xy0": (7, 9), "kind": kind}
    expected = detect_sources(image, variance, mask, flux_error=flux_error, **options)
    on_device = [None if a is None else cupy.asarray(a) for a in (image, variance, mask, flux_error)]
    got = detect_sources(*on_device[:3], flux_error=on_device[3], **options)
    assert len(got) == len(expected) > 20
    for column in ("id", "sign", "npix", "partner", "dipole"):
        np.testing.assert_array_equal(got[column], expected[column])
    for column in ("x", "y", "flux", "flux_err", "snr", "peak_snr"):
        np.testing.assert_allclose(got[column], expected[column], rtol=1e-7, atol=1e-7)
    assert got.meta == pytest.approx(expected.meta)


def test_device_syncs_do_not_grow_with_the_number_of_sources():
    """On the CuPy path (the counting stand-in), a fixed number of device-to-host reads: no per-source sync."""
    from cupy_standin import cupy_standin

    counts = []
    for spacing in (120, 60):
        image, variance, *_ = _difference(72, 384, 15.0, spacing=spacing)
        with cupy_standin(kernels="numpy") as recorder:
            import cupy

            table = detect_sources(cupy.asarray(image), cupy.asarray(variance), psf=PSF)
        counts.append((len(table), recorder.count("sync")))
    assert counts[0][0] < counts[1][0]
    assert counts[0][1] == counts[1][1] <= 16, counts                   # measured 15


# ---------------------------------------------------------------------------
# FITS


@pytest.fixture
def small_difference():
    image, variance, *_ = _difference(81, 160, np.array([10.0, -12.0, 20.0, 8.0]), spacing=50)
    masked = MaskedImage(image.astype(np.float32), variance=variance.astype(np.float32), xy0=(30, 40))
    return masked, detect_in_masked_image(masked, psf=PSF)


def _assert_same_table(got, expected):
    assert got.colnames == expected.colnames
    for name in expected.colnames:
        np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(expected[name]))
        assert got[name].unit == expected[name].unit
        assert got[name].description == expected[name].description
        assert got[name].dtype == expected[name].dtype
    assert dict(got.meta) == pytest.approx(dict(expected.meta))


def test_sources_hdu_round_trip(tmp_path, small_difference):
    from astropy.table import Table

    from gpudiffim import Exposure
    from gpudiffim.io import read_exposure, read_sources, write_exposure, write_masked_image

    masked, sources = small_difference
    assert len(sources) == 4 and sorted(set(sources["sign"].tolist())) == [-1, 1]
    path = tmp_path / "difference.fits"
    other = Table({"a": [1, 2]})
    write_exposure(path, Exposure(masked, psf_image=PSF), sources=sources, tables={"OTHER": other})
    _assert_same_table(read_sources(path), sources)
    assert read_exposure(path).masked_image.xy0 == (30, 40)            # the planes are untouched
    assert len(Table.read(path, hdu="OTHER")) == 2
    plain = tmp_path / "plain.fits"
    write_masked_image(plain, masked, sources=sources)
    _assert_same_table(read_sources(plain), sources)
    empty = sources[:0]
    write_masked_image(plain, masked, sources=empty, overwrite=True)
    assert len(read_sources(plain)) == 0 and read_sources(plain).colnames == sources.colnames


def test_sources_hdu_errors(tmp_path, small_difference):
    from gpudiffim import Exposure
    from gpudiffim.errors import FitsFormatError
    from gpudiffim.io import read_sources, write_exposure, write_masked_image

    masked, sources = small_difference
    path = tmp_path / "difference.fits"
    with pytest.raises(ConfigurationError, match="given twice"):
        write_exposure(path, Exposure(masked), sources=sources, tables={"sources": sources})
    with pytest.raises(ConfigurationError, match="astropy Table"):
        write_exposure(path, Exposure(masked), sources=np.zeros(3))
    assert not path.exists()
    write_masked_image(path, masked)
    with pytest.raises(FitsFormatError, match="no SOURCES binary-table HDU"):
        read_sources(path)


# ---------------------------------------------------------------------------
# with the task's decorrelated difference and score image


@pytest.mark.parametrize("mode", ["decorrelate", "score"])
def test_few_false_detections_on_the_tasks_detection_images(mode):
    """Equal-depth pair: on the decorrelated difference and on the score, <= 1 false per 10^6 px.

    (On the raw difference the kernel-correlated template noise makes the
    matched filter's S/N too large: 17 per 10^6 px on these pairs, which is
    why one detects on the decorrelated difference or the score.)
    """
    from gpudiffim import PsfMatchConfig

    pair = make_fake_pair(shape=(768, 768), n_stars=250, seed=1)
    config = PsfMatchConfig(decorrelate=mode == "decorrelate", score=mode == "score")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = ImagePsfMatchTask(config).subtract_masked_images(pair.template, pair.science)
    if mode == "score":
        table = detect_in_masked_image(result.score.snr, psf=result.difference_psf, kind="score",
                                       flux_error=result.score.flux_error)
    else:
        table = detect_in_masked_image(result.subtracted_image, psf=result.difference_psf)
    stars = pair.stars
    assert _false_per_million(table, stars["x"], stars["y"], (768, 768), exclusion=20.0) <= 1.0   # measured 0
