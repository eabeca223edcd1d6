"""The ``gpudiffim`` command line: subtract, info, exit codes, real data end to end."""

import dataclasses
import json
import warnings

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS
from scipy import ndimage

from gpudiffim import FitQualityWarning, ImagePsfMatchTask, NoDataWarning, PsfMatchConfig
from gpudiffim.candidates import coarse_background, detect_candidates
from gpudiffim.cli import EXIT_BAD_INPUT, EXIT_FIT_FAILED, build_config, main
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


def _subtract_plain(fits_pair, output, *options):
    """``gpudiffim subtract`` of the plain-file pair with its variance maps and ``options``; the exit code."""
    return main(["subtract", str(fits_pair["science"]), str(fits_pair["template"]), "-o", str(output),
                 "--science-variance", str(fits_pair["science_var"]),
                 "--template-variance", str(fits_pair["template_var"]), "--config", "spatial_kernel_order=1",
                 *options])


def test_subtract_plain_files(fits_pair, tmp_path):
    output = tmp_path / "diff.fits"
    assert _subtract_plain(fits_pair, output, "--variance-correction", "none") == 0
    difference = read_exposure(output)
    good = difference.masked_image.mask == 0
    z = difference.masked_image.image[good] / np.sqrt(difference.masked_image.variance[good])
    assert abs(np.median(z)) < 0.05 and 0.9 < 1.4826 * np.median(np.abs(z - np.median(z))) < 1.1
    with fits.open(output) as hdus:
        assert hdus[0].header["KSUM"] == pytest.approx(1.0, abs=0.01)
        assert json.loads(hdus[0].header["CONFIG"])["spatial_kernel_order"] == 1


def test_subtract_without_the_quality_report(fits_pair, tmp_path):
    """--config quality_report=false: no QUALITY table (the fit kept no residuals for it), no error."""
    output = tmp_path / "diff.fits"
    assert _subtract_plain(fits_pair, output, "--config", "quality_report=false") == 0
    with fits.open(output) as hdus:
        assert "QUALITY" not in [hdu.name for hdu in hdus]
        assert json.loads(hdus[0].header["CONFIG"])["quality_report"] is False


def test_info(capsys):
    assert main(["info"]) == 0
    assert "gpudiffim" in capsys.readouterr().out


def test_missing_file(tmp_path, one_line_error):
    code = main(["subtract", str(tmp_path / "nope.fits"), str(tmp_path / "nope2.fits"),
                 "-o", str(tmp_path / "d.fits")])
    assert code == EXIT_BAD_INPUT
    assert "nope.fits" in one_line_error()


@pytest.mark.parametrize("config", [["kernel_size=20"], ["no_such_field=1"], ["kernel_size"],
                                    ["detection.det_threshold=1"]])
def test_malformed_config(fits_pair, tmp_path, one_line_error, config):
    args = ["subtract", str(fits_pair["science"]), str(fits_pair["template"]), "-o",
            str(tmp_path / "d.fits")]
    for item in config:
        args += ["--config", item]
    assert main(args) == EXIT_BAD_INPUT
    one_line_error()


def test_malformed_config_file(fits_pair, tmp_path, one_line_error):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    assert main(["subtract", str(fits_pair["science"]), str(fits_pair["template"]), "-o",
                 str(tmp_path / "d.fits"), "--config-file", str(bad)]) == EXIT_BAD_INPUT
    assert "config" in one_line_error()


def test_non_overlapping_pair(fits_pair, tmp_path, one_line_error):
    far = tmp_path / "far.fits"
    _write_plain(far, fits_pair["pair"].template, _wcs((256, 256), ra=10.0, dec=-40.0))
    code = main(["subtract", str(fits_pair["science"]), str(far), "-o", str(tmp_path / "d.fits")])
    assert code == EXIT_BAD_INPUT
    message = one_line_error()
    assert "overlap" in message and str(far) in message and str(fits_pair["science"]) in message


def test_fit_failure_exit_code(tmp_path, one_line_error):
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
    assert "candidate" in one_line_error()


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


def _scoring_regions(science, fwhm):
    """The boxes on isolated stars and the empty-sky pixels that every statistic here is taken on.

    Stars: peaks detected at 10 sigma on the science image (its variance
    corrected as the command line does by default) with no other peak within
    4 FWHM; a box of +-1.5 FWHM around each.  Sky: unflagged pixels farther
    than 3 FWHM from every source footprint detected at 5 sigma
    (:func:`_source_footprints`).  Returns ``{"stars": [(x, y, box), ...],
    "sky": bool array}``.
    """
    science = scale_variance(science, mode="auto", limit=1000.0)[0]
    radius, x0, y0 = int(np.ceil(1.5 * fwhm)), science.xy0[0], science.xy0[1]
    bright = detect_candidates(science, DetectionConfig(det_threshold=10.0))
    stars = []
    for x, y in bright:
        if np.sum(np.hypot(*(bright - (x, y)).T) < 4 * fwhm) > 1:
            continue
        row, col = y - y0, x - x0
        stars.append((int(x), int(y), np.s_[max(row - radius, 0):row + radius + 1,
                                            max(col - radius, 0):col + radius + 1]))
    return {"stars": stars, "sky": ~_source_footprints(science, 5.0, fwhm)}


def _normalised(difference):
    """D/sigma of a difference masked image, and where it is usable (no mask bit, finite)."""
    z = difference.image / np.sqrt(np.where(difference.variance > 0, difference.variance, np.inf))
    return z, (difference.mask == 0) & np.isfinite(z)


def _scores(difference, regions):
    """Std of D/sigma over all star boxes together, per box, and over the empty sky."""
    z, usable = _normalised(difference)
    per_star = [z[box][usable[box]] for _, _, box in regions["stars"]]
    stars = np.concatenate(per_star) if per_star else np.zeros(0)
    return {"star_std": float(np.std(stars)), "n_stars": len(per_star),
            "per_star": [float(np.std(values)) for values in per_star],
            "sky_std": float(np.std(z[usable & regions["sky"]]))}


def _run_cli(arguments, output, science):
    """Run ``gpudiffim subtract``; the exit code, the difference exposure and the science image."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FitQualityWarning)  # few candidates / a narrow basis
        warnings.simplefilter("ignore", NoDataWarning)      # the JWST i2d edges and NaN pixels
        code = main([*arguments, "-o", str(output)])
        difference = read_exposure(output) if code == 0 else None
        science_image = read_exposure(**science).masked_image
    return code, difference, science_image


DECAM_FWHM = 5.2          # science (DEC-OBS04a) header FWHM, px
JWST_FWHM = 2.5           # the drizzled NIRCam F200W PSF, px
#: The JWST pair's configuration, as README "Known limitations" advises: a basis of narrow
#: Gaussians (sigma 0.5/1/2 px, degrees 6/4/2) for PSFs of ~2 px FWHM, a 15-px kernel, and a
#: spatially constant kernel over the 28" field.
JWST_CONFIG = ("scale_by_fwhm=false", "alard_sig_gauss=[0.5,1,2]", "alard_deg_gauss=[6,4,2]",
               "kernel_size=15", "spatial_kernel_order=0")


def _jwst_files(shared_data):
    folder = shared_data / "jwst-nircam"
    science = sorted(folder.glob("jw02561*_stamp.fits"))
    template = sorted(folder.glob("jw01324*_stamp.fits"))
    if not science or not template:
        pytest.skip("JWST science/template files not present")
    files = {name: {"image": path, "noise": path.with_name(path.name.replace(".fits", ".noise.fits")),
                    "psf": path.with_name(path.name.replace(".fits", ".WebbPSF.fits"))}
             for name, path in (("science", science[0]), ("template", template[0]))}
    missing = [str(path) for paths in files.values() for path in paths.values() if not path.is_file()]
    if missing:
        pytest.skip(f"JWST files not present: {missing}")
    return files


@pytest.fixture(scope="module")
def decam_subtraction(shared_data, tmp_path_factory):
    """The DECam pair through the command line with its defaults, and its statistics.

    The defaults suit it: the variance correction adds the sky the planes lack, and the
    spatial orders are lowered to what the handful of candidates of a 256^2 cut-out
    supports (0: three candidates survive the fit).
    """
    folder = shared_data / "decam"
    output = tmp_path_factory.mktemp("decam") / "decam-diff.fits"
    science = folder / "DEC-OBS04a.mini.fits"
    code, difference, science_image = _run_cli(["subtract", str(science),
                                                str(folder / "DEC-OBS18a.mini.fits")],
                                               output, {"path": science})
    assert code == 0
    regions = _scoring_regions(science_image, DECAM_FWHM)
    scores = _scores(difference.masked_image, regions)
    print("DECam: isolated-star D/sigma std {star_std:.3f} over {n_stars} stars, sky {sky_std:.3f}"
          .format(**scores))
    return {"output": output, "regions": regions, **scores}


@pytest.fixture(scope="module")
def jwst_subtraction(shared_data, tmp_path_factory):
    """The JWST NIRCam pair (ERR maps, WebbPSF models) through the command line with
    :data:`JWST_CONFIG`, and its statistics."""
    files = _jwst_files(shared_data)
    science, template = files["science"], files["template"]
    output = tmp_path_factory.mktemp("jwst") / "jwst-diff.fits"
    arguments = ["subtract", str(science["image"]), str(template["image"]),
                 "--science-hdu", "SCI", "--template-hdu", "SCI",
                 "--science-sigma", str(science["noise"]), "--template-sigma", str(template["noise"]),
                 "--science-psf", str(science["psf"]), "--template-psf", str(template["psf"])]
    for item in JWST_CONFIG:
        arguments += ["--config", item]
    code, difference, science_image = _run_cli(
        arguments, output, {"path": science["image"], "hdu": "SCI", "sigma": science["noise"]})
    assert code == 0
    regions = _scoring_regions(science_image, JWST_FWHM)
    scores = _scores(difference.masked_image, regions)
    print("JWST: isolated-star D/sigma std {star_std:.3f} over {n_stars} stars, sky {sky_std:.3f}"
          .format(**scores))
    return {"output": output, "regions": regions, "files": files, **scores}


@pytest.mark.slow
def test_decam_pair_sky_noise(decam_subtraction):
    assert decam_subtraction["n_stars"] >= 3
    assert 0.95 <= decam_subtraction["sky_std"] <= 1.05                       # 0.986


@pytest.mark.slow
def test_decam_pair_isolated_stars(decam_subtraction):
    """Side by side with what else reaches on the same boxes: D/sigma std <= 1.37 = 1.03 x 1.33.

    1.33 is what HOTPANTS leaves with the same noise images in the best of about 20
    configurations, and what the best spatially constant kernel, least-squares fitted to these
    very boxes, leaves (1.35 now, with this pipeline's variance:
    ``tests/test_real_data_limits.py``).  The limit is in the data, not the fit: the stars
    moved between the 2016 and 2018 epochs (one by 0.20 px, 0.13-0.18 px rms in x, the same
    in all five exposure pairs), which no kernel that is smooth over the field can follow, and
    one "star" is a galaxy that brightened by 15-21 %.  The old criterion (< 1.2) is out of
    reach for any of them.
    """
    assert decam_subtraction["n_stars"] >= 3
    assert decam_subtraction["star_std"] <= 1.37                               # 1.359


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
def test_decam_leave_one_out_guard(shared_data, decam_subtraction):
    """A scored star left out of the candidates scores no worse under the default spatial
    model than under a spatially constant kernel fitted to the same candidates.

    Each of the isolated stars is dropped from the candidates that the task detects (passed
    explicitly), the pair refitted, and the std of D/sigma taken on that star's box: out of
    sample, so a spatial model fitted through a few candidates cannot hide how it predicts the
    kernel elsewhere.  The default lowers the spatial order to what the candidates support
    (``reduce_spatial_order``; here 0, from three surviving candidates), so it matches the
    constant kernel (a 2 % margin is allowed).  Without the reduction, spatial order 2
    through three candidates predicts one left-out star far worse (6.6 against 4.0): issue 14
    item 8.
    """
    folder = shared_data / "decam"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoDataWarning)
        science = read_exposure(folder / "DEC-OBS04a.mini.fits")
        template = read_exposure(folder / "DEC-OBS18a.mini.fits")
    detected_on = scale_variance(science.masked_image, mode="auto", limit=1000.0)[0]  # as the task
    candidates = detect_candidates(detected_on, DetectionConfig())
    stars = decam_subtraction["regions"]["stars"]

    def left_out_scores(config):
        scores = []
        for x, y, box in stars:
            kept = candidates[np.hypot(*(candidates - (x, y)).T) > 2 * DECAM_FWHM]
            assert len(kept) == len(candidates) - 1                   # the star was a candidate
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FitQualityWarning)
                result = ImagePsfMatchTask(config).subtract_exposures(template, science, candidates=kept)
            z, usable = _normalised(result.subtracted_image)
            scores.append(float(np.std(z[box][usable[box]])))
        return np.array(scores)

    default = left_out_scores(PsfMatchConfig())
    constant = left_out_scores(PsfMatchConfig(spatial_kernel_order=0))
    unreduced = left_out_scores(PsfMatchConfig(reduce_spatial_order=False))
    print("DECam left-out stars: default", np.round(default, 3), "constant", np.round(constant, 3),
          "order 2 unreduced", np.round(unreduced, 3))
    assert np.all(default <= 1.02 * constant)
    assert np.max(unreduced / constant) > 1.3                                 # 1.64


@pytest.mark.slow
def test_jwst_pair_sky_noise(jwst_subtraction):
    assert jwst_subtraction["n_stars"] >= 3
    assert 0.95 <= jwst_subtraction["sky_std"] <= 1.05                        # 1.011


@pytest.mark.slow
def test_jwst_pair_sky_noise_needs_the_noise_correlation(jwst_subtraction):
    """The i2d images are drizzled: neighbouring pixels' noise correlates at 0.37, and the
    matched template is about 1.9 x noisier (in variance) than ``sum K^2 V_T`` says.  Without
    ``noise_correlation`` the empty-sky D/sigma std is 1.13 with the same configuration."""
    files = jwst_subtraction["files"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoDataWarning)
        science, template = (read_exposure(files[name]["image"], hdu="SCI", sigma=files[name]["noise"],
                                           psf=files[name]["psf"]) for name in ("science", "template"))
    config = dataclasses.replace(build_config(JWST_CONFIG), noise_correlation=False)   # as the CLI parses it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FitQualityWarning)
        result = ImagePsfMatchTask(config).subtract_exposures(template, science)
    without = _scores(result.subtracted_image, jwst_subtraction["regions"])
    print(f"JWST without noise correlation: sky {without['sky_std']:.3f}, stars {without['star_std']:.3f}")
    assert without["sky_std"] > 1.08                                          # 1.125
    assert jwst_subtraction["sky_std"] < without["sky_std"] - 0.05


@pytest.mark.slow
def test_jwst_pair_isolated_stars(jwst_subtraction):
    """Side by side with what else reaches on the same boxes: D/sigma std <= 1.44.

    HOTPANTS with the same noise images and its best of about 20 configurations leaves 1.41
    (1.44 = 1.03 x that), the best spatially constant kernel about 1.37 (1.44 = 1.05 x that;
    fitted to these very boxes, in sample: 1.36 for the default basis scaled by the WebbPSF
    FWHMs, 1.31 for this configuration's basis, both with HOTPANTS's white-noise variance
    ``sum K^2 V_T``; 1.23 and 1.18 with the covariance-corrected variance used here).
    The limit is in the data, not the fit: the epochs' position angles differ by 150 deg, so
    the hexagonal, undersampled (FWHM ~2 px) drizzled PSF is rotated by 30 deg (mod 60), which
    no convolution turns back.  A bright star whose PSF is rotated dominates the excess:
    Alard-Lupton bases leave D/sigma std 2.0-2.9 on it, a free 21 x 21 kernel about 1.1; the
    unresolved sources share one coherent core residual (next test); nearly all of the ~80
    "stars" are cluster galaxies, one with a real fading nucleus.  With README's earlier
    advice (the default basis scaled by the WebbPSF FWHMs, spatial order 1) the pipeline left
    1.45, with this configuration 1.30 (1.45 without ``noise_correlation``, whose larger
    matched-template variance is the true one on these drizzled images).
    """
    assert jwst_subtraction["n_stars"] >= 3
    assert jwst_subtraction["star_std"] <= 1.44                               # 1.305


@pytest.mark.slow
def test_jwst_pair_compact_source_residual_is_systematic(jwst_subtraction):
    """The residual on the unresolved sources is the same on all of them (a sharper science
    core: positive centre, negative ring), not noise: the kernel cannot turn the template's
    PSF into the science PSF.  The position angles (PA_V3) of the epochs differ by 150 deg."""
    files = jwst_subtraction["files"]
    science, template = files["science"]["image"], files["template"]["image"]
    angles = [fits.getheader(f, "SCI")["PA_V3"] for f in (science, template)]
    assert abs(abs(angles[0] - angles[1]) % 60 - 30) < 5                      # 150 deg apart
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoDataWarning)
        image = scale_variance(read_exposure(science, hdu="SCI", sigma=files["science"]["noise"])
                               .masked_image)[0]
        difference = read_exposure(jwst_subtraction["output"]).masked_image
    z, _ = _normalised(difference)
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
    assert stack[4, 4] > 5 * noise_of_mean                                   # 1.95 vs 0.33
