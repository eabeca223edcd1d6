"""The ``gpudiffim`` command line: subtract, info, exit codes, real data end to end."""

import json
import warnings

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS
from scipy import ndimage

from gpudiffim import FitQualityWarning, NoDataWarning
from gpudiffim.candidates import coarse_background, detect_candidates
from gpudiffim.cli import EXIT_BAD_INPUT, EXIT_FIT_FAILED, main
from gpudiffim.config import DetectionConfig
from gpudiffim.fwhm import SIGMA_TO_FWHM, adaptive_sigma
from gpudiffim.io import read_exposure
from gpudiffim.testing import make_fake_pair
from gpudiffim.variance import scale_variance


def _wcs(shape, ra=150.0, dec=2.0, scale_arcsec=0.2):
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crpix = [shape[1] / 2 + 0.5, shape[0] / 2 + 0.5]
    wcs.wcs.crval = [ra, dec]
    wcs.wcs.cdelt = [-scale_arcsec / 3600, scale_arcsec / 3600]
    return wcs


def _write_plain(path, masked, wcs):
    header = wcs.to_header()
    fits.PrimaryHDU(np.asarray(masked.image), header=header).writeto(path)
    variance_path = path.with_name(path.stem + "_var.fits")
    fits.PrimaryHDU(np.asarray(masked.variance)).writeto(variance_path)
    return variance_path


@pytest.fixture(scope="module")
def fits_pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pair")
    pair = make_fake_pair(shape=(256, 256), n_stars=90, seed=51, template_noise=2.0, science_noise=2.0)
    wcs = _wcs((256, 256))
    science, template = folder / "science.fits", folder / "template.fits"
    science_var = _write_plain(science, pair.science, wcs)
    template_var = _write_plain(template, pair.template, wcs)
    return dict(science=science, template=template, science_var=science_var,
                template_var=template_var, folder=folder, pair=pair)


def _one_line_error(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("gpudiffim:")]
    assert len(errors) == 1 and "Traceback" not in "\n".join(err)
    return errors[0]


def test_subtract_plain_files(fits_pair, tmp_path):
    output = tmp_path / "diff.fits"
    code = main(["subtract", str(fits_pair["science"]), str(fits_pair["template"]), "-o", str(output),
                 "--science-variance", str(fits_pair["science_var"]),
                 "--template-variance", str(fits_pair["template_var"]),
                 "--variance-correction", "none", "--config", "spatial_kernel_order=1"])
    assert code == 0
    difference = read_exposure(output)
    good = difference.masked_image.mask == 0
    z = difference.masked_image.image[good] / np.sqrt(difference.masked_image.variance[good])
    assert abs(np.median(z)) < 0.05 and 0.9 < 1.4826 * np.median(np.abs(z - np.median(z))) < 1.1
    with fits.open(output) as hdus:
        assert hdus[0].header["KSUM"] == pytest.approx(1.0, abs=0.01)
        assert json.loads(hdus[0].header["CONFIG"])["spatial_kernel_order"] == 1


def test_info(capsys):
    assert main(["info"]) == 0
    assert "gpudiffim" in capsys.readouterr().out


def test_missing_file(tmp_path, capsys):
    code = main(["subtract", str(tmp_path / "nope.fits"), str(tmp_path / "nope2.fits"),
                 "-o", str(tmp_path / "d.fits")])
    assert code == EXIT_BAD_INPUT
    assert "nope.fits" in _one_line_error(capsys)


@pytest.mark.parametrize("config", [["kernel_size=20"], ["no_such_field=1"], ["kernel_size"],
                                    ["detection.det_threshold=1"]])
def test_malformed_config(fits_pair, tmp_path, capsys, config):
    args = ["subtract", str(fits_pair["science"]), str(fits_pair["template"]), "-o",
            str(tmp_path / "d.fits")]
    for item in config:
        args += ["--config", item]
    assert main(args) == EXIT_BAD_INPUT
    _one_line_error(capsys)


def test_malformed_config_file(fits_pair, tmp_path, capsys):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    assert main(["subtract", str(fits_pair["science"]), str(fits_pair["template"]), "-o",
                 str(tmp_path / "d.fits"), "--config-file", str(bad)]) == EXIT_BAD_INPUT
    assert "config" in _one_line_error(capsys)


def test_non_overlapping_pair(fits_pair, tmp_path, capsys):
    far = tmp_path / "far.fits"
    _write_plain(far, fits_pair["pair"].template, _wcs((256, 256), ra=10.0, dec=-40.0))
    code = main(["subtract", str(fits_pair["science"]), str(far), "-o", str(tmp_path / "d.fits")])
    assert code == EXIT_BAD_INPUT
    assert "overlap" in _one_line_error(capsys)


def test_fit_failure_exit_code(tmp_path, capsys):
    rng = np.random.default_rng(3)
    paths = []
    for name in ("s.fits", "t.fits"):
        path = tmp_path / name
        fits.PrimaryHDU((5.0 * rng.normal(size=(128, 128))).astype(np.float32),
                        header=_wcs((128, 128)).to_header()).writeto(path)
        paths.append(str(path))
    code = main(["subtract", *paths, "-o", str(tmp_path / "d.fits"), "--template-fwhm", "3",
                 "--science-fwhm", "4"])
    assert code == EXIT_FIT_FAILED
    assert "candidate" in _one_line_error(capsys)


def _source_footprints(science, threshold, fwhm):
    """Pixels within 3 FWHM of a footprint detected at ``threshold`` sigma.

    The footprints themselves (as :func:`detect_candidates` finds them: pixels
    above ``threshold`` sqrt(V) after the coarse background, 8-connected, at
    least ``fp_npix_min`` pixels), not their peaks: detection reports a
    footprint larger than ``fp_npix_max`` by the centre of its bounding box,
    which in the JWST cluster core left the field's brightest star (peak
    23 MJy/sr at (279, 639), merged with its neighbours) and its diffraction
    spikes in the "empty sky".
    """
    detection = DetectionConfig(det_threshold=threshold)
    valid = (science.mask & science.bits(["NO_DATA"])) == 0
    image = np.where(valid, science.image, 0.0).astype(np.float64)
    residual = image - coarse_background(image, detection.background_bin_size, ~valid)
    sigma = np.sqrt(np.where(valid & (science.variance > 0), science.variance, np.inf))
    labels, _ = ndimage.label(valid & (residual > threshold * sigma), structure=np.ones((3, 3), bool))
    keep = np.bincount(labels.ravel()) >= detection.fp_npix_min
    keep[0] = False
    reach = int(np.ceil(3 * fwhm))
    return ndimage.binary_dilation(keep[labels], structure=np.ones((2 * reach + 1,) * 2, bool))


def _star_and_sky_stats(difference, science, fwhm, mode="scale"):
    """Std of D/sigma over boxes on isolated stars, and over empty sky.

    Stars: peaks detected at 10 sigma on the science image with no other peak
    within 4 FWHM; a box of +-1.5 FWHM around each.  Sky: unflagged pixels
    farther than 3 FWHM from every source footprint detected at 5 sigma
    (:func:`_source_footprints`).
    """
    science = scale_variance(science, mode=mode, limit=1000.0)[0]  # as the command line does
    image = difference.masked_image
    z = image.image / np.sqrt(np.where(image.variance > 0, image.variance, np.inf))
    usable = (image.mask == 0) & np.isfinite(z)
    radius, x0, y0 = int(np.ceil(1.5 * fwhm)), image.xy0[0], image.xy0[1]
    bright = detect_candidates(science, DetectionConfig(det_threshold=10.0))
    star_values = []
    for x, y in bright:
        if np.sum(np.hypot(*(bright - (x, y)).T) < 4 * fwhm) > 1:
            continue
        row, col = y - y0, x - x0
        box = np.s_[max(row - radius, 0):row + radius + 1, max(col - radius, 0):col + radius + 1]
        star_values.append(z[box][usable[box]])
    near = _source_footprints(science, 5.0, fwhm)
    stars = np.concatenate(star_values) if star_values else np.zeros(0)
    return float(np.std(stars)), len(star_values), float(np.std(z[usable & ~near]))


def _run_cli(arguments, output, science):
    """Run ``gpudiffim subtract``; the exit code, the difference exposure and the statistics."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FitQualityWarning)  # few candidates / a narrow basis
        warnings.simplefilter("ignore", NoDataWarning)      # the JWST i2d edges and NaN pixels
        code = main([*arguments, "-o", str(output)])
        difference = read_exposure(output) if code == 0 else None
        science_image = read_exposure(**science).masked_image
    return code, difference, science_image


@pytest.fixture(scope="module")
def decam_subtraction(shared_data, tmp_path_factory):
    """The DECam pair through the command line, and its star and sky statistics."""
    folder = shared_data / "decam"
    output = tmp_path_factory.mktemp("decam") / "decam-diff.fits"
    # a 256^2 cut-out holds only a handful of stars: a spatially constant kernel and background
    code, difference, science = _run_cli(
        ["subtract", str(folder / "DEC-OBS04a.mini.fits"), str(folder / "DEC-OBS18a.mini.fits"),
         "--config", "spatial_kernel_order=0", "--config", "spatial_bg_order=0",
         "--config", "detection.det_threshold=5", "--variance-correction", "add"],
        output, {"path": folder / "DEC-OBS04a.mini.fits"})
    assert code == 0
    stats = _star_and_sky_stats(difference, science, 5.2, mode="add")
    print("DECam: isolated-star D/sigma std {:.3f} over {} stars, sky {:.3f}".format(*stats))
    return {"output": output, "stats": stats}


@pytest.fixture(scope="module")
def jwst_subtraction(shared_data, tmp_path_factory):
    """The JWST NIRCam pair (with its ERR maps) through the command line, and its statistics."""
    folder = shared_data / "jwst-nircam"
    science = sorted(folder.glob("jw02561*_stamp.fits"))
    template = sorted(folder.glob("jw01324*_stamp.fits"))
    if not science or not template:
        pytest.skip("JWST science/template files not present")
    noise = {f: f.with_name(f.name.replace(".fits", ".noise.fits")) for f in science + template}
    output = tmp_path_factory.mktemp("jwst") / "jwst-diff.fits"
    code, difference, science_image = _run_cli(
        ["subtract", str(science[0]), str(template[0]),
         "--science-hdu", "SCI", "--template-hdu", "SCI",
         "--science-sigma", str(noise[science[0]]), "--template-sigma", str(noise[template[0]]),
         "--config", "spatial_kernel_order=1"],
        output, {"path": science[0], "hdu": "SCI", "sigma": noise[science[0]]})
    assert code == 0
    stats = _star_and_sky_stats(difference, science_image, 2.5)
    print("JWST: isolated-star D/sigma std {:.3f} over {} stars, sky {:.3f}".format(*stats))
    return {"output": output, "stats": stats}


@pytest.mark.slow
def test_decam_pair_sky_noise(decam_subtraction):
    _, n_stars, sky_std = decam_subtraction["stats"]
    assert n_stars >= 3
    assert sky_std == pytest.approx(1.0, rel=0.1)     # 0.971


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason=(
    "physical, not a fit defect: isolated-star D/sigma std 1.34 over 6 stars (needs < 1.2). The "
    "stars moved between the 2016 and 2018 epochs (proper motion: x offsets scatter 0.10-0.14 px "
    "about the best plane, the same in three independent exposure pairs and at equal airmass), "
    "and one 'star' is a galaxy that brightened by 13 % (also in SFFT's difference); the best "
    "spatially constant kernel fitted to these very boxes reaches 1.33 "
    "(tests/test_real_data_limits.py)"))
def test_decam_pair_isolated_stars(decam_subtraction):
    star_std, n_stars, _ = decam_subtraction["stats"]
    assert n_stars >= 3
    assert star_std < 1.2


@pytest.mark.slow
def test_decam_pair_variance_at_stars(decam_subtraction):
    """Under its own (local) kernel every candidate's stamp has D/sigma std ~1: the variance
    plane (photon noise of the star plus the measured sky) is right on the stars; what the
    spatial kernel leaves on them is a kernel that cannot follow each star."""
    quality = Table.read(decam_subtraction["output"], hdu="QUALITY")
    local = np.asarray(quality["local_std"], dtype=float)
    assert len(local) >= 3
    assert np.all(local < 1.1) and 0.85 < np.median(local) < 1.1     # 0.86-0.99, median 0.95


@pytest.mark.slow
def test_jwst_pair_sky_noise(jwst_subtraction):
    _, n_stars, sky_std = jwst_subtraction["stats"]
    assert n_stars >= 3
    assert sky_std == pytest.approx(1.0, rel=0.1)     # 1.018


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason=(
    "PSF change a convolution kernel cannot reproduce: isolated-'star' D/sigma std 1.45 over 77 "
    "sources, nearly all cluster galaxies (needs < 1.2). The epochs' position angles differ by "
    "150 deg (hexagonal PSF rotated by 30 deg mod 60) on an undersampled drizzled PSF (FWHM ~2.5 px): "
    "the brightest compact source alone holds 28 % of the excess chi^2, as predicted by the best "
    "Alard-Lupton kernel between the two WebbPSF models; a per-source local kernel still leaves "
    "1.22 on the source cores; one galaxy has a real -21 sigma fading nucleus"))
def test_jwst_pair_isolated_stars(jwst_subtraction):
    star_std, n_stars, _ = jwst_subtraction["stats"]
    assert n_stars >= 3
    assert star_std < 1.2


@pytest.mark.slow
def test_jwst_pair_compact_source_residual_is_systematic(shared_data, jwst_subtraction):
    """The residual on the unresolved sources is the same on all of them (a sharper science
    core: positive centre, negative ring), not noise: the kernel cannot turn the template's
    PSF into the science PSF.  The position angles (PA_V3) of the epochs differ by 150 deg."""
    folder = shared_data / "jwst-nircam"
    science = min(folder.glob("jw02561*_stamp.fits"))
    template = min(folder.glob("jw01324*_stamp.fits"))
    angles = [fits.getheader(f, "SCI")["PA_V3"] for f in (science, template)]
    assert abs(abs(angles[0] - angles[1]) % 60 - 30) < 5                      # 150 deg apart
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoDataWarning)
        noise = science.with_name(science.name.replace(".fits", ".noise.fits"))
        image = scale_variance(read_exposure(science, hdu="SCI", sigma=noise).masked_image)[0]
        difference = read_exposure(jwst_subtraction["output"]).masked_image
    z = difference.image / np.sqrt(np.where(difference.variance > 0, difference.variance, np.inf))
    peaks = detect_candidates(image, DetectionConfig(det_threshold=10.0))
    stamps = []
    for x, y in peaks:
        if not (12 <= x < image.shape[1] - 12 and 12 <= y < image.shape[0] - 12):
            continue
        if np.sum(np.hypot(*(peaks - (x, y)).T) < 10) > 1:
            continue
        cut = np.nan_to_num(image.image[y - 12:y + 13, x - 12:x + 13].astype(np.float64))
        cut -= np.median(np.concatenate([cut[0], cut[-1], cut[:, 0], cut[:, -1]]))
        if SIGMA_TO_FWHM * adaptive_sigma(cut[None])[0] < 3.75:                 # unresolved
            stamps.append(z[y - 4:y + 5, x - 4:x + 5])
    assert len(stamps) >= 5
    stack = np.mean(stamps, axis=0)
    noise_of_mean = 1.0 / np.sqrt(len(stamps))
    print(f"JWST: {len(stamps)} unresolved sources, stacked D/sigma at the centre {stack[4, 4]:.2f} "
          f"(noise {noise_of_mean:.2f})")
    assert stack[4, 4] > 5 * noise_of_mean                                   # 3.95 vs 0.35
