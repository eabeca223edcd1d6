"""The ``gpudiffim`` command line: subtract, info, exit codes, real data end to end."""

import json

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from gpudiffim.candidates import detect_candidates
from gpudiffim.cli import EXIT_BAD_INPUT, EXIT_FIT_FAILED, main
from gpudiffim.config import DetectionConfig
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


def _star_and_sky_stats(difference, science, fwhm, mode="scale"):
    """Std of D/sigma over boxes on isolated stars, and over empty sky.

    Stars: peaks detected at 10 sigma on the science image with no other peak
    within 4 FWHM; a box of +-1.5 FWHM around each.  Sky: unflagged pixels
    farther than 3 FWHM from every peak detected at 5 sigma.
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
    near = np.zeros(image.shape, dtype=bool)
    reach = int(np.ceil(3 * fwhm))
    for x, y in detect_candidates(science, DetectionConfig(det_threshold=5.0)):
        near[max(y - y0 - reach, 0):y - y0 + reach + 1, max(x - x0 - reach, 0):x - x0 + reach + 1] = True
    stars = np.concatenate(star_values) if star_values else np.zeros(0)
    return float(np.std(stars)), len(star_values), float(np.std(z[usable & ~near]))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::gpudiffim.FitQualityWarning")  # few stars in a 256^2 cut-out
@pytest.mark.xfail(strict=True, reason="issue 5 open: isolated-star D/sigma std 1.34 over 6 stars "
                                       "(needs < 1.2); sky 0.97 passes")
def test_decam_pair_end_to_end(shared_data, tmp_path):
    folder = shared_data / "decam"
    output = tmp_path / "decam-diff.fits"
    # a 256^2 cut-out holds only a handful of stars: a spatially constant kernel and background
    code = main(["subtract", str(folder / "DEC-OBS04a.mini.fits"), str(folder / "DEC-OBS18a.mini.fits"),
                 "-o", str(output), "--config", "spatial_kernel_order=0", "--config", "spatial_bg_order=0",
                 "--config", "detection.det_threshold=5", "--variance-correction", "add"])
    assert code == 0
    science = read_exposure(folder / "DEC-OBS04a.mini.fits").masked_image
    star_std, n_stars, sky_std = _star_and_sky_stats(read_exposure(output), science, 5.2, mode="add")
    print(f"DECam: isolated-star D/sigma std {star_std:.3f} over {n_stars} stars, sky {sky_std:.3f}")
    assert n_stars >= 3
    assert star_std < 1.2
    assert sky_std == pytest.approx(1.0, rel=0.1)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::gpudiffim.NoDataWarning")  # the i2d edges and 5 NaN pixels
@pytest.mark.filterwarnings("ignore::gpudiffim.FitQualityWarning")  # narrow deconvolution basis
@pytest.mark.xfail(strict=True, reason="issue 5 open: isolated-star D/sigma std 1.45 (needs < 1.2), "
                                       "sky 1.12 (needs 1 +- 10 %); drizzled, correlated noise")
def test_jwst_pair_end_to_end(shared_data, tmp_path):
    folder = shared_data / "jwst-nircam"
    science = sorted(folder.glob("jw02561*_stamp.fits"))
    template = sorted(folder.glob("jw01324*_stamp.fits"))
    if not science or not template:
        pytest.skip("JWST science/template files not present")
    noise = {f: f.with_name(f.name.replace(".fits", ".noise.fits")) for f in science + template}
    output = tmp_path / "jwst-diff.fits"
    code = main(["subtract", str(science[0]), str(template[0]), "-o", str(output),
                 "--science-hdu", "SCI", "--template-hdu", "SCI",
                 "--science-sigma", str(noise[science[0]]), "--template-sigma", str(noise[template[0]]),
                 "--config", "spatial_kernel_order=1"])
    assert code == 0
    science_image = read_exposure(science[0], hdu="SCI", sigma=noise[science[0]]).masked_image
    star_std, n_stars, sky_std = _star_and_sky_stats(read_exposure(output), science_image, 2.5)
    print(f"JWST: isolated-star D/sigma std {star_std:.3f} over {n_stars} stars, sky {sky_std:.3f}")
    assert n_stars >= 3
    assert star_std < 1.2
    assert sky_std == pytest.approx(1.0, rel=0.1)
