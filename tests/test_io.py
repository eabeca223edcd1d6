"""FITS reading and writing: layouts, noise maps, masks, metadata, errors, atomic writes."""

import hashlib
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS, Sip

from gpudiffim import (
    DEFAULT_MASK_PLANES,
    BackgroundModel,
    ConfigurationError,
    FitsFormatError,
    InvalidImageError,
    InvalidVarianceError,
    MaskedImage,
    NoDataWarning,
    ShapeError,
    SpatialKernel,
)
from gpudiffim.exposure import Exposure, ExposureInfo
from gpudiffim.io import (
    MAX_STRING_LENGTH,
    read_exposure,
    write_exposure,
    write_masked_image,
)
from gpudiffim.spatial import SpatialFunction

SHAPE = (40, 50)


def _sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _wcs(sip=True):
    """A TAN (+ SIP) WCS in parent pixel coordinates."""
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"] if sip else ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crpix = [40.3, 25.7]
    wcs.wcs.crval = [150.123456789012, 2.234567890123]
    wcs.wcs.cd = [[-5.5e-5, 1.2e-7], [1.1e-7, 5.5e-5]]
    if sip:
        a, b = np.zeros((3, 3)), np.zeros((3, 3))
        a[2, 0], a[1, 1], b[0, 2] = 2e-6, -1e-6, 1.5e-6
        wcs.sip = Sip(a, b, None, None, wcs.wcs.crpix)
    return wcs


def _masked(dtype=np.float32, xy0=(0, 0), planes=None, seed=1, shape=SHAPE):
    rng = np.random.RandomState(seed)
    image = (100 + 10 * rng.normal(size=shape)).astype(dtype)
    variance = rng.uniform(50, 150, size=shape).astype(dtype)
    planes = dict(DEFAULT_MASK_PLANES if planes is None else planes)
    top = max(planes.values())
    mask = rng.randint(0, 2 ** (top + 1), size=shape) * (rng.uniform(size=shape) < 0.1)
    return MaskedImage(image, mask.astype(np.int32), variance, xy0=xy0, mask_planes=planes)


def _noisy(seed=0):
    return np.random.RandomState(seed).normal(10.0, 1.0, size=SHAPE)


def _psf(size=11, sigma=1.5):
    y, x = np.mgrid[:size, :size] - size // 2
    psf = np.exp(-(x**2 + y**2) / (2 * sigma**2))
    return psf / psf.sum()


def _max_sky_difference(wcs_a, wcs_b, xy0, shape, seed=3):
    rng = np.random.RandomState(seed)
    x = xy0[0] + rng.uniform(-0.5, shape[1] - 0.5, 300)
    y = xy0[1] + rng.uniform(-0.5, shape[0] - 0.5, 300)
    a = np.array(wcs_a.all_pix2world(x, y, 0))
    b = np.array(wcs_b.all_pix2world(x, y, 0))
    return float(np.abs(a - b).max())


def _assert_same_planes(read, expected):
    for name in ("image", "mask", "variance"):
        got, want = getattr(read, name), getattr(expected, name)
        assert got.dtype == want.dtype and got.dtype.isnative, name
        np.testing.assert_array_equal(got, want, err_msg=name)
    assert read.mask_planes == expected.mask_planes
    assert read.xy0 == expected.xy0


# ---------------------------------------------------------------------------
# LSST layout round trips
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("xy0", [(0, 0), (-7, 13)])
def test_round_trip_lsst_layout(tmp_path, dtype, xy0):
    planes = {**DEFAULT_MASK_PLANES, "CUSTOM_PLANE": 12}
    info = ExposureInfo(gain=2.0, read_noise=5.0, saturation=6.0e4, filter="r", date="2020-01-02T03:04:05",
                        zero_point=27.5)
    exposure = Exposure(_masked(dtype, xy0, planes), wcs=_wcs(), psf_fwhm_pix=3.25, psf_image=_psf(),
                        info=info)
    path = tmp_path / "exposure.fits"
    write_exposure(path, exposure)
    read = read_exposure(path)
    _assert_same_planes(read.masked_image, exposure.masked_image)
    assert _max_sky_difference(read.wcs, exposure.wcs, xy0, SHAPE) < 1e-9
    assert read.wcs.sip is not None
    np.testing.assert_array_equal(read.psf_image, exposure.psf_image)
    assert read.psf_fwhm_pix == 3.25
    for name in ("gain", "read_noise", "saturation", "filter", "date", "zero_point"):
        assert getattr(read.info, name) == getattr(info, name), name
    with fits.open(path) as hdus:
        assert [h.name for h in hdus] == ["PRIMARY", "IMAGE", "MASK", "VARIANCE", "PSF"]
        assert hdus[0].data is None
        header = hdus["MASK"].header
        assert header["LTV1"] == -xy0[0] and header["CRVAL2A"] == xy0[1] and header["CTYPE1A"] == "LINEAR"
        assert header["MP_CUSTOM_PLANE"] == 12 and header["MP_NO_DATA"] == 8
        # The file's WCS refers to the stored array (FITS convention), like afw's.
        file_wcs = WCS(hdus["IMAGE"].header, relax=True)
        array_sky = np.array(file_wcs.all_pix2world([0.0, 17.0], [0.0, 9.0], 0))
        parent_sky = np.array(exposure.wcs.all_pix2world([xy0[0], xy0[0] + 17.0], [xy0[1], xy0[1] + 9.0], 0))
        np.testing.assert_allclose(array_sky, parent_sky, rtol=0, atol=1e-9)


def test_round_trip_without_wcs_or_psf(tmp_path):
    exposure = Exposure(_masked(np.float64, (3, 4)))
    path = tmp_path / "plain.fits"
    write_exposure(path, exposure)
    read = read_exposure(path)
    _assert_same_planes(read.masked_image, exposure.masked_image)
    assert read.wcs is None and read.psf_image is None and read.psf_fwhm_pix is None
    assert read.info.gain is None and read.info.date is None


def test_write_masked_image_round_trip(tmp_path):
    masked = _masked(np.float32, (5, -2))
    path = tmp_path / "mi.fits"
    write_masked_image(path, masked, header={"KSUM": (0.98, "kernel sum"), "NGOOD": 12})
    read = read_exposure(path)
    _assert_same_planes(read.masked_image, masked)
    assert read.info.header["KSUM"] == 0.98 and read.info.header["NGOOD"] == 12


@pytest.mark.gpu
def test_write_masked_image_with_device_planes(tmp_path):
    import cupy

    masked = _masked(np.float32, (5, -2))
    on_device = MaskedImage(cupy.asarray(masked.image), cupy.asarray(masked.mask), cupy.asarray(masked.variance),
                            xy0=masked.xy0)
    write_masked_image(tmp_path / "mi.fits", on_device)
    _assert_same_planes(read_exposure(tmp_path / "mi.fits").masked_image, masked)


def _afw_style_file(path, xy0_cards, mask_dtype=np.uint16, names=False):
    """An LSST MaskedImage file as older afw writes it: no EXTNAME, uint16 mask with BZERO."""
    rng = np.random.RandomState(7)
    image = rng.normal(10, 2, size=SHAPE).astype(">f4")
    mask = np.zeros(SHAPE, dtype=mask_dtype)
    mask[3, 4] = 1 << 0
    mask[5, 6] = (1 << 1) | (1 << 9)
    mask[7, 8] = 1 << 6
    variance = rng.uniform(1, 2, size=SHAPE).astype(">f4")
    hdus = [fits.PrimaryHDU()]
    for index, data in enumerate((image, mask, variance)):
        hdu = fits.ImageHDU(data, name=("IMAGE", "MASK", "VARIANCE")[index] if names else None)
        for key, value in xy0_cards.items():
            hdu.header[key] = value
        hdus.append(hdu)
    header = hdus[2].header
    header["MP_BAD"], header["MP_SAT"] = 0, 1
    header["HIERARCH MP_DETECTED_NEGATIVE"] = 6
    header["HIERARCH MP_MY_PLANE"] = 9
    fits.HDUList(hdus).writeto(path)
    return image, mask, variance


def test_lsst_layout_by_position_a_wcs_preferred(tmp_path):
    path = tmp_path / "afw.fits"
    cards = {"CRVAL1A": 9, "CRVAL2A": -4, "CRPIX1A": 1, "CRPIX2A": 1, "CTYPE1A": "LINEAR",
             "LTV1": 100, "LTV2": 100}
    image, mask, variance = _afw_style_file(path, cards)
    with fits.open(path) as hdus:
        assert hdus[2].header["BITPIX"] == 16 and hdus[2].header["BZERO"] == 32768
    read = read_exposure(path).masked_image
    np.testing.assert_array_equal(read.image, image)
    np.testing.assert_array_equal(read.mask, mask.astype(np.int32))
    np.testing.assert_array_equal(read.variance, variance)
    planes = read.mask_planes
    assert {k: planes[k] for k in ("BAD", "SAT", "DETECTED_NEGATIVE", "MY_PLANE")} == {
        "BAD": 0, "SAT": 1, "DETECTED_NEGATIVE": 6, "MY_PLANE": 9}
    assert "NO_DATA" in planes and "EDGE" in planes
    assert read.xy0 == (9, -4)


def test_lsst_layout_xy0_from_ltv(tmp_path):
    path = tmp_path / "ltv.fits"
    _afw_style_file(path, {"LTV1": -5, "LTV2": -6}, mask_dtype=np.int32, names=True)
    assert read_exposure(path).masked_image.xy0 == (5, 6)


def test_plain_image_ignores_ltv_and_hdu_selects_plane(tmp_path):
    path = tmp_path / "ltv_plain.fits"
    hdu = fits.PrimaryHDU(np.ones(SHAPE) + np.arange(SHAPE[1]))
    hdu.header["LTV1"], hdu.header["LTV2"] = -1.0, -1.0
    hdu.writeto(path)
    assert read_exposure(path).masked_image.xy0 == (0, 0)
    lsst = tmp_path / "lsst.fits"
    masked = _masked(np.float64)
    write_masked_image(lsst, masked)
    variance_as_image = read_exposure(lsst, hdu="VARIANCE").masked_image
    np.testing.assert_array_equal(variance_as_image.image, masked.variance)
    np.testing.assert_array_equal(read_exposure(f"{lsst}[3]").masked_image.image, masked.variance)


# ---------------------------------------------------------------------------
# Plain images: byte order, scaling, compression
# ---------------------------------------------------------------------------

@pytest.mark.parametrize(("stored", "expected_dtype"), [
    (">f4", np.float32), (">f8", np.float64), ("uint16", np.float64), (">i4", np.float64)])
def test_plain_image_byte_orders(tmp_path, stored, expected_dtype):
    rng = np.random.RandomState(11)
    values = rng.randint(1, 60000, size=SHAPE) if stored == "uint16" else rng.normal(5, 3, size=SHAPE) * 1000
    data = values.astype(stored)
    path = tmp_path / "plain.fits"
    fits.PrimaryHDU(data).writeto(path)
    with fits.open(path, do_not_scale_image_data=True) as hdus:
        raw = hdus[0].data
        assert raw.dtype.byteorder == ">"
        if stored == "uint16":
            assert hdus[0].header["BITPIX"] == 16 and hdus[0].header["BZERO"] == 32768
    read = read_exposure(path).masked_image
    assert read.dtype == expected_dtype and read.image.dtype.isnative
    np.testing.assert_array_equal(read.image, data.astype(expected_dtype))
    assert np.all(read.variance == read.variance[0, 0]) and read.variance[0, 0] > 0
    assert not read.mask.any()


def test_bscale_bzero_applied(tmp_path):
    rng = np.random.RandomState(2)
    raw = rng.randint(-300, 300, size=SHAPE).astype(np.int16)
    path = tmp_path / "scaled.fits"
    fits.PrimaryHDU(raw).writeto(path)
    fits.setval(path, "BSCALE", value=0.5)
    fits.setval(path, "BZERO", value=10.0)
    read = read_exposure(path).masked_image
    np.testing.assert_allclose(read.image, raw * 0.5 + 10.0, rtol=0, atol=0)
    assert "BSCALE" not in read_exposure(path).info.header


@pytest.mark.parametrize("kind", ["rice-int32", "gzip-float64"])
def test_compressed_hdu(tmp_path, kind):
    rng = np.random.RandomState(5)
    if kind == "rice-int32":
        data = rng.randint(0, 5000, size=SHAPE).astype(np.int32)
        hdu = fits.CompImageHDU(data, compression_type="RICE_1", name="SCI")
    else:
        data = rng.normal(size=SHAPE)
        hdu = fits.CompImageHDU(data, compression_type="GZIP_2", quantize_level=0.0, name="SCI")
    path = tmp_path / "compressed.fits"
    fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(path)
    for spec in (path, f"{path}[SCI]"):
        read = read_exposure(spec).masked_image
        np.testing.assert_array_equal(read.image, data.astype(np.float64))
        assert read.dtype == np.float64


def test_gzipped_file(tmp_path):
    """The reader opens the file itself and hands astropy the handle: gzip is still recognised."""
    import gzip

    data = _noisy()
    plain = _plain_file(tmp_path / "plain.fits", data)
    zipped = tmp_path / "plain.fits.gz"
    zipped.write_bytes(gzip.compress(plain.read_bytes()))
    np.testing.assert_array_equal(read_exposure(zipped).masked_image.image, data)


def test_degenerate_axes_squeezed(tmp_path):
    path = tmp_path / "cube1.fits"
    data = np.arange(np.prod(SHAPE), dtype=np.float32).reshape((1, *SHAPE)) + 1
    fits.PrimaryHDU(data).writeto(path)
    np.testing.assert_array_equal(read_exposure(path).masked_image.image, data[0])


# ---------------------------------------------------------------------------
# Variance from gain and read noise, saturation, NaN
# ---------------------------------------------------------------------------

def _plain_file(path, image, **cards):
    hdu = fits.PrimaryHDU(image)
    for key, value in cards.items():
        hdu.header[key if len(key) <= 8 else f"HIERARCH {key}"] = value
    hdu.writeto(path)
    return path


@pytest.mark.parametrize("read_noise_key", ["RDNOISE", "READNOIS"])
def test_gain_read_noise_variance_exact(tmp_path, read_noise_key):
    image = np.random.RandomState(4).normal(0, 50, size=SHAPE)
    path = _plain_file(tmp_path / "gain.fits", image, GAIN=3.984046692260535, **{read_noise_key: 11.83702})
    exposure = read_exposure(path)
    expected = np.maximum(image, 0) / 3.984046692260535 + (11.83702 / 3.984046692260535) ** 2
    np.testing.assert_array_equal(exposure.masked_image.variance, expected)
    assert exposure.info.gain == 3.984046692260535 and exposure.info.read_noise == 11.83702
    overridden = read_exposure(path, gain=2.0, read_noise=4.0)
    np.testing.assert_array_equal(overridden.masked_image.variance, np.maximum(image, 0) / 2.0 + 4.0)
    assert overridden.info.gain == 2.0 and overridden.info.read_noise == 4.0


def test_gain_without_read_noise(tmp_path):
    image = np.random.RandomState(4).normal(0, 50, size=SHAPE)
    path = _plain_file(tmp_path / "gain_only.fits", image, GAIN=2.0)
    with pytest.raises(InvalidVarianceError, match="read_noise"):
        read_exposure(path)
    positive = _plain_file(tmp_path / "positive.fits", np.abs(image) + 1, GAIN=2.0)
    np.testing.assert_array_equal(read_exposure(positive).masked_image.variance, (np.abs(image) + 1) / 2.0)


def test_no_gain_uses_mad_variance_and_logs(tmp_path, caplog):
    image = np.random.RandomState(8).normal(100, 7, size=(200, 200))
    path = _plain_file(tmp_path / "nogain.fits", image)
    with caplog.at_level(logging.INFO, logger="gpudiffim"):
        variance = read_exposure(path).masked_image.variance
    assert np.all(variance == variance[0, 0]) and variance[0, 0] == pytest.approx(49, rel=0.1)
    assert any("MAD" in record.getMessage() and "nogain.fits" in record.getMessage()
               for record in caplog.records)


@pytest.mark.parametrize("key", ["SATURATE", "SATURATION"])
def test_saturation_sets_sat_bit(tmp_path, key):
    image = np.random.RandomState(9).uniform(0, 200, size=SHAPE)
    path = _plain_file(tmp_path / "sat.fits", image, GAIN=1.0, RDNOISE=1.0, **{key: 150.0})
    exposure = read_exposure(path)
    sat = 1 << exposure.masked_image.mask_planes["SAT"]
    np.testing.assert_array_equal((exposure.masked_image.mask & sat) != 0, image >= 150.0)
    assert not np.any(exposure.masked_image.mask & ~sat)
    assert exposure.info.saturation == 150.0
    lower = read_exposure(path, saturation=120.0)
    np.testing.assert_array_equal((lower.masked_image.mask & sat) != 0, image >= 120.0)
    assert lower.info.saturation == 120.0


def test_nan_pixels_become_no_data(tmp_path):
    image = np.random.RandomState(1).normal(10, 1, size=SHAPE).astype(">f4")
    image[2, 3] = image[10, 20] = np.nan
    path = _plain_file(tmp_path / "nan.fits", image)
    with pytest.warns(NoDataWarning, match="2 NaN"):
        masked = read_exposure(path).masked_image
    no_data = (masked.mask & (1 << masked.mask_planes["NO_DATA"])) != 0
    np.testing.assert_array_equal(no_data, np.isnan(image))


# ---------------------------------------------------------------------------
# Separate noise maps and masks
# ---------------------------------------------------------------------------

def _noise_file(path, data):
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(data.astype(">f8"), name="NOISE")]).writeto(path)
    return path


def _spec(form, path, array):
    return {"path": path, "bracket": f"{path}[NOISE]", "tuple": (path, "NOISE"), "index": f"{path}[1]",
            "array": array}[form]


@pytest.mark.parametrize("form", ["path", "bracket", "tuple", "index", "array"])
@pytest.mark.parametrize("kind", ["variance", "inverse_variance", "sigma", "weight"])
def test_noise_maps(tmp_path, kind, form):
    rng = np.random.RandomState(12)
    image_path = _plain_file(tmp_path / "image.fits", rng.normal(0, 1, size=SHAPE))
    values = rng.uniform(0.5, 2.0, size=SHAPE)
    expected = {"variance": values, "sigma": values**2, "inverse_variance": 1.0 / values,
                "weight": 1.0 / values}[kind]
    if kind != "variance":
        values[4, 5] = 0.0
    spec = _spec(form, _noise_file(tmp_path / "noise.fits", values), values)
    masked = read_exposure(image_path, **{kind: spec}).masked_image
    no_data = (masked.mask & (1 << masked.mask_planes["NO_DATA"])) != 0
    data = ~no_data
    np.testing.assert_array_equal(masked.variance[data], expected[data])
    assert np.count_nonzero(no_data) == (0 if kind == "variance" else 1)
    if kind != "variance":
        assert no_data[4, 5] and masked.variance[4, 5] == 0


def test_sigma_nan_is_no_data_with_warning(tmp_path):
    image_path = _plain_file(tmp_path / "image.fits", _noisy())
    sigma = np.full(SHAPE, 2.0)
    sigma[1, 1] = np.nan
    with pytest.warns(NoDataWarning):
        masked = read_exposure(image_path, sigma=sigma).masked_image
    assert masked.mask[1, 1] & (1 << masked.mask_planes["NO_DATA"])
    assert masked.variance[0, 0] == 4.0


def test_noise_map_overrides_lsst_variance(tmp_path):
    masked = _masked(np.float64)
    path = tmp_path / "lsst.fits"
    write_masked_image(path, masked)
    read = read_exposure(path, variance=np.full(SHAPE, 3.0)).masked_image
    assert np.all(read.variance == 3.0)
    np.testing.assert_array_equal(read.mask, masked.mask)


def test_more_than_one_noise_map(tmp_path):
    image_path = _plain_file(tmp_path / "image.fits", _noisy())
    with pytest.raises(ConfigurationError, match="at most one"):
        read_exposure(image_path, variance=np.ones(SHAPE), sigma=np.ones(SHAPE))


@pytest.mark.parametrize("as_file", [True, False])
def test_mask_nonzero_is_bad(tmp_path, as_file):
    image_path = _plain_file(tmp_path / "image.fits", _noisy())
    extra = np.zeros(SHAPE, dtype=np.float32)
    extra[2, 2], extra[3, 7], extra[9, 9] = 1.0, 5.0, np.nan
    spec = extra
    if as_file:
        spec = tmp_path / "mask.fits"
        fits.PrimaryHDU(extra).writeto(spec)
    masked = read_exposure(image_path, mask=spec).masked_image
    bad = 1 << masked.mask_planes["BAD"]
    np.testing.assert_array_equal(masked.mask, np.where((extra != 0), bad, 0))


def test_mask_with_plane_cards_is_remapped_by_name(tmp_path):
    image_path = _plain_file(tmp_path / "image.fits", _noisy())
    extra = np.zeros(SHAPE, dtype=np.int16)
    extra[1, 1] = 1 << 3          # SAT in the source numbering
    extra[2, 2] = 1 << 0          # CR
    extra[3, 3] = 1 << 5          # FOO, a plane the image lacks
    extra[4, 4] = 1 << 7          # unnamed bit -> BAD
    hdu = fits.PrimaryHDU(extra)
    hdu.header["MP_SAT"], hdu.header["MP_CR"], hdu.header["MP_FOO"] = 3, 0, 5
    path = tmp_path / "bitmask.fits"
    hdu.writeto(path)
    masked = read_exposure(image_path, mask=path).masked_image
    planes = masked.mask_planes
    assert planes["FOO"] not in [v for k, v in planes.items() if k != "FOO"]
    expected = np.zeros(SHAPE, dtype=np.int32)
    expected[1, 1] = 1 << planes["SAT"]
    expected[2, 2] = 1 << planes["CR"]
    expected[3, 3] = 1 << planes["FOO"]
    expected[4, 4] = 1 << planes["BAD"]
    np.testing.assert_array_equal(masked.mask, expected)


def test_psf_from_file_and_fwhm(tmp_path):
    image_path = _plain_file(tmp_path / "image.fits", _noisy())
    psf_path = tmp_path / "psf.fits"
    fits.PrimaryHDU(_psf(15, 2.0).astype(">f4")).writeto(psf_path)
    exposure = read_exposure(image_path, psf=psf_path)
    assert exposure.psf_image.shape == (15, 15)
    assert exposure.fwhm() == pytest.approx(2.0 * 2.3548, rel=0.05)
    assert read_exposure(image_path, psf=_psf(), psf_fwhm_pix=4.5).fwhm() == 4.5
    with pytest.raises(ShapeError, match=r"odd square.*\(10, 10\)"):
        read_exposure(image_path, psf=np.ones((10, 10)))


@pytest.mark.parametrize(("cards", "expected"), [
    ({"FWHM": (5.2, "Median FWHM in pixels")}, 5.2),
    ({"FWHM": (1.1, "seeing in arcsec")}, None),
    ({"SEEING": (3.5, "FWHM [pix]")}, 3.5),
    ({"SEEING": (0.9, "seeing")}, None),
    ({}, None)])
def test_header_fwhm(tmp_path, cards, expected):
    path = _plain_file(tmp_path / "image.fits", _noisy(), **cards)
    assert read_exposure(path).psf_fwhm_pix == expected


# ---------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("zp_key", ["MAGZERO", "MAGZP", "ZP", "PHOTZP"])
def test_info_from_primary_and_image_headers(tmp_path, zp_key):
    primary = fits.PrimaryHDU()
    primary.header["BAND"] = "g"
    primary.header["MJD-OBS"] = 58334.5
    primary.header["OBSERVER"] = "someone"
    primary.header[zp_key] = 30.25
    image = fits.ImageHDU(np.ones(SHAPE), name="SCI")
    image.header["GAIN"], image.header["RDNOISE"] = 2.0, 3.0
    image.header["OBSERVER"] = "image wins"
    image.header["COMMENT"] = "not a card value"
    path = tmp_path / "mef.fits"
    fits.HDUList([primary, image]).writeto(path)
    info = read_exposure(path).info
    assert info.filter == "g" and info.zero_point == 30.25
    assert info.date == "2018-08-04T12:00:00.000"
    assert info.header["OBSERVER"] == "image wins" and info.header["EXTNAME"] == "SCI"
    assert not {"SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "COMMENT"} & set(info.header)


def test_date_obs_with_time_obs(tmp_path):
    path = _plain_file(tmp_path / "image.fits", _noisy(), FILTER="R ", **{"DATE-OBS": "2001-02-03",
                                                                                   "TIME-OBS": "04:05:06"})
    info = read_exposure(path).info
    assert info.date == "2001-02-03T04:05:06" and info.filter == "R"


def test_non_celestial_wcs_is_none(tmp_path):
    path = _plain_file(tmp_path / "linear.fits", _noisy(), CTYPE1="PIXEL", CTYPE2="PIXEL", CRPIX1=1.0,
                       CRPIX2=1.0, CRVAL1=0.0, CRVAL2=0.0)
    assert read_exposure(path).wcs is None


# ---------------------------------------------------------------------------
# Malformed inputs
# ---------------------------------------------------------------------------

def _one_line_error(error_type, match, *args, **kwargs):
    with pytest.raises(error_type, match=match) as info:
        read_exposure(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.fits"
    assert "nope.fits" in _one_line_error(FileNotFoundError, "nope.fits", missing)
    image_path = _plain_file(tmp_path / "image.fits", _noisy())
    _one_line_error(FileNotFoundError, "novar.fits", image_path, variance=tmp_path / "novar.fits")


def test_not_fits(tmp_path):
    text = tmp_path / "notes.fits"
    text.write_text("hello world\n" * 100)
    _one_line_error(FitsFormatError, "notes.fits.*not a readable FITS", text)
    empty = tmp_path / "empty.fits"
    empty.write_bytes(b"")
    _one_line_error(FitsFormatError, "empty.fits", empty)


def test_truncated_file(tmp_path):
    whole = tmp_path / "whole.fits"
    fits.PrimaryHDU(np.ones((100, 80), dtype=np.float32)).writeto(whole)
    truncated = tmp_path / "truncated.fits"
    truncated.write_bytes(whole.read_bytes()[:2880 + 5000])
    _one_line_error(FitsFormatError, "truncated.fits", truncated)


def test_fits_without_image_data(tmp_path):
    table = fits.BinTableHDU.from_columns([fits.Column(name="a", format="E", array=np.arange(3.0))])
    path = tmp_path / "table.fits"
    fits.HDUList([fits.PrimaryHDU(), table]).writeto(path)
    _one_line_error(FitsFormatError, "no image data", path)
    _one_line_error(FitsFormatError, "HDU 1 .*BinTableHDU, not an image", path, hdu=1)
    _one_line_error(FitsFormatError, "HDU 0 of .*no image data", path, hdu=0)


def test_missing_hdu(tmp_path):
    path = _plain_file(tmp_path / "image.fits", _noisy())
    _one_line_error(FitsFormatError, "no HDU named 'SCI'", path, hdu="SCI")
    _one_line_error(FitsFormatError, "no HDU 3", path, hdu=3)
    _one_line_error(ConfigurationError, "hdu must be", path, hdu=1.5)


def test_wrong_dimensionality(tmp_path):
    path = tmp_path / "cube.fits"
    fits.PrimaryHDU(np.ones((2, 4, 5))).writeto(path)
    _one_line_error(FitsFormatError, r"3-D array of shape \(2, 4, 5\)", path)
    image_path = _plain_file(tmp_path / "image.fits", _noisy())
    _one_line_error(ShapeError, "2-D", image_path, variance=np.ones(5))


def test_mismatched_map_shape(tmp_path):
    image_path = _plain_file(tmp_path / "image.fits", _noisy())
    noise = _noise_file(tmp_path / "noise.fits", np.ones((SHAPE[0], SHAPE[1] + 1)))
    message = _one_line_error(ShapeError, "shape", image_path, variance=noise)
    assert "(40, 51)" in message and "(40, 50)" in message
    _one_line_error(ShapeError, r"\(3, 3\)", image_path, mask=np.zeros((3, 3)))


@pytest.mark.parametrize(("name", "value"), [("gain", -1.0), ("gain", np.nan), ("read_noise", -2.0),
                                             ("saturation", "high"), ("psf_fwhm_pix", 0.0)])
def test_bad_numeric_arguments(tmp_path, name, value):
    image_path = _plain_file(tmp_path / "image.fits", _noisy())
    _one_line_error(ConfigurationError, name, image_path, **{name: value})


def test_inputs_not_modified(tmp_path):
    image = np.random.RandomState(3).normal(10, 1, size=SHAPE).astype(">f4")
    image_path = _plain_file(tmp_path / "image.fits", image, GAIN=2.0, RDNOISE=3.0, SATURATE=11.0)
    sigma = np.full(SHAPE, 2.0, dtype=">f8")
    sigma[0, 0] = 0
    mask = np.zeros(SHAPE, dtype=np.int16)
    mask[1, 1] = 3
    copies = (sigma.copy(), mask.copy())
    before = _sha(image_path)
    read_exposure(image_path, sigma=sigma, mask=mask)
    assert _sha(image_path) == before
    for array, copy in zip((sigma, mask), copies):
        np.testing.assert_array_equal(array, copy)
        assert array.dtype == copy.dtype and array.flags.writeable


# ---------------------------------------------------------------------------
# Malformed headers: unparsable cards, values of the wrong type
# ---------------------------------------------------------------------------

def _with_card_bytes(path, key, column, byte, out):
    """Copy of ``path`` with ``byte`` at ``column`` (0-based) of the first card named ``key``."""
    raw = bytearray(Path(path).read_bytes())
    start = raw.index(f"{key:<8}=".encode())
    raw[start + column] = byte[0]
    Path(out).write_bytes(bytes(raw))
    return out


def _pair_files(tmp_path, **cards):
    """A plain science file with GAIN/RDNOISE (and ``cards``) and a template, from one simulated pair."""
    from gpudiffim.testing import make_fake_pair

    pair = make_fake_pair(shape=(64, 64), n_stars=6, seed=1, flux_range=(3e3, 3e4))
    science = _plain_file(tmp_path / "science.fits", np.asarray(pair.science.image),
                          **{"GAIN": 2.0, "RDNOISE": 5.0, **cards})
    template = tmp_path / "template.fits"
    write_masked_image(template, pair.template)
    return science, template


def _subtract(capsys, science, template, output):
    from gpudiffim.cli import main

    code = main(["-q", "subtract", str(science), str(template), "-o", str(output),
                 "--config", "spatial_kernel_order=0", "--config", "spatial_bg_order=0"])
    return code, capsys.readouterr().err


@pytest.mark.filterwarnings("ignore::gpudiffim.FitQualityWarning")
def test_corrupted_header_byte_exits_2_naming_the_file(tmp_path, capsys):
    science, template = _pair_files(tmp_path)
    broken = _with_card_bytes(science, "GAIN", 12, b"#", tmp_path / "broken.fits")
    output = tmp_path / "difference.fits"
    code, err = _subtract(capsys, broken, template, output)
    assert code == 2 and "Traceback" not in err and not output.exists()
    assert "broken.fits" in err and "GAIN" in err and "cannot be parsed" in err
    # the same file reads with the gain given explicitly: the broken card is then not used
    exposure = read_exposure(broken, gain=2.0)
    assert exposure.info.gain == 2.0 and exposure.info.read_noise == 5.0


def test_unparsable_card_in_each_used_value_is_refused(tmp_path):
    image = _noisy()
    path = _plain_file(tmp_path / "cards.fits", image, GAIN=2.0, RDNOISE=5.0, SATURATE=1e4, LTV1=3,
                       **_wcs(sip=False).to_header())
    for key in ("RDNOISE", "SATURATE", "CRVAL1", "CTYPE2", "PC1_1"):
        broken = _with_card_bytes(path, key, 29, b"'", tmp_path / f"{key}.fits")
        message = _one_line_error(FitsFormatError, "cannot be parsed|unusable WCS", broken)
        assert message.startswith(f"HDU 0 of {broken}: ")
        # CTYPE2 = 'DEC--TAN'  ' parses, as "DEC--TAN'": wcslib then refuses the WCS
        assert f"header card {key} cannot be parsed" in message or key == "CTYPE2"


def test_unparsable_card_not_used_is_repaired_or_left_out(tmp_path, caplog):
    path = _plain_file(tmp_path / "cards.fits", _noisy(), GAIN=2.0, RDNOISE=5.0, OBSERVER="someone",
                       EXPTIME=30.0)
    broken = _with_card_bytes(path, "EXPTIME", 29, b"x", tmp_path / "exptime.fits")
    broken = _with_card_bytes(broken, "OBSERVER", 12, b"\x00", tmp_path / "both.fits")
    with caplog.at_level(logging.WARNING, logger="gpudiffim"):
        exposure = read_exposure(broken)
    assert exposure.info.gain == 2.0 and exposure.info.read_noise == 5.0
    assert exposure.info.header["EXPTIME"] == "30.x"               # verify('fix') made it a string
    assert "OBSERVER" not in exposure.info.header                  # a NUL byte: cannot be fixed
    messages = [record.getMessage() for record in caplog.records]
    assert any("both.fits" in m and "EXPTIME" in m and "read as" in m for m in messages)
    assert any("both.fits" in m and "OBSERVER" in m and "left out" in m for m in messages)


def test_damaged_keyword_that_may_be_a_used_one_is_refused(tmp_path, caplog):
    path = _plain_file(tmp_path / "cards.fits", _noisy(), GAIN=2.0, RDNOISE=5.0, OBSERVER="someone")
    hidden = _with_card_bytes(path, "GAIN", 2, b"\xff", tmp_path / "hidden.fits")   # GA?N: GAIN?
    _one_line_error(FitsFormatError, "hidden.fits: header card GA.N has a damaged keyword", hidden)
    other = _with_card_bytes(path, "OBSERVER", 3, b"\xff", tmp_path / "other.fits")  # OBS?RVER: unused
    with caplog.at_level(logging.WARNING, logger="gpudiffim"):
        assert read_exposure(other).info.gain == 2.0
    messages = [record.getMessage() for record in caplog.records]
    assert any("other.fits" in m and "non-ASCII" in m for m in messages)   # logged, not warned


def test_lower_case_keyword_is_still_read(tmp_path, caplog):
    path = _plain_file(tmp_path / "lower.fits", _noisy(), GAIN=2.0, RDNOISE=5.0)
    raw = path.read_bytes().replace(b"GAIN    =", b"gain    =")
    path.write_bytes(raw)
    with caplog.at_level(logging.WARNING, logger="gpudiffim"):
        assert read_exposure(path).info.gain == 2.0
    assert any("gain" in record.getMessage() and "read as" in record.getMessage()
               for record in caplog.records)


@pytest.mark.parametrize(("key", "value", "match"), [
    ("GAIN", "banana", "header card GAIN = 'banana' is not a number"),
    ("GAIN", True, "header card GAIN = True is not a number"),
    ("RDNOISE", "low", "header card RDNOISE = 'low' is not a number"),
    ("READNOIS", "2 e-", "header card READNOIS = '2 e-' is not a number"),
    ("SATURATE", "high", "header card SATURATE = 'high' is not a number"),
])
def test_header_value_of_wrong_type_is_refused(tmp_path, key, value, match):
    cards = {"GAIN": 2.0, "RDNOISE" if key != "READNOIS" else "READNOIS": 5.0, key: value}
    path = _plain_file(tmp_path / "typed.fits", np.abs(_noisy()), **cards)
    message = _one_line_error(FitsFormatError, match, path)
    assert f"HDU 0 of {path}" in message
    argument = {"GAIN": "gain", "RDNOISE": "read_noise", "READNOIS": "read_noise",
                "SATURATE": "saturation"}[key]
    assert f"{argument}=" in message
    assert read_exposure(path, **{argument: 3.0}).masked_image.shape == SHAPE   # overriding: not read


def test_gain_banana_through_the_command_line(tmp_path, capsys):
    science, template = _pair_files(tmp_path, **{"GAIN": "banana"})
    output = tmp_path / "difference.fits"
    code, err = _subtract(capsys, science, template, output)
    assert code == 2 and not output.exists() and "Traceback" not in err
    assert "science.fits" in err and "GAIN = 'banana'" in err and "--science-gain" in err


def test_header_values_out_of_range_are_logged_and_ignored(tmp_path, caplog):
    path = _plain_file(tmp_path / "zero.fits", _noisy(), GAIN=0.0, RDNOISE=-1.0, SATURATE=0.0)
    with caplog.at_level(logging.WARNING, logger="gpudiffim"):
        info = read_exposure(path).info
    assert info.gain is None and info.read_noise is None and info.saturation is None
    messages = " ".join(record.getMessage() for record in caplog.records)
    for key in ("GAIN = 0.0", "RDNOISE = -1.0", "SATURATE = 0.0"):
        assert key in messages and "zero.fits" in messages


def test_optional_metadata_of_wrong_type_is_logged_and_ignored(tmp_path, caplog):
    path = _plain_file(tmp_path / "optional.fits", _noisy(), FILTER=5, MAGZERO="x", FWHM="wide",
                       **{"MJD-OBS": "yesterday"})
    with caplog.at_level(logging.WARNING, logger="gpudiffim"):
        exposure = read_exposure(path)
    info = exposure.info
    assert (info.filter, info.zero_point, info.date, exposure.psf_fwhm_pix) == (None, None, None, None)
    messages = " ".join(record.getMessage() for record in caplog.records)
    for text in ("FILTER = 5 ignored", "MAGZERO = 'x' ignored", "FWHM = 'wide' ignored",
                 "MJD-OBS = 'yesterday' ignored"):
        assert text in messages


@pytest.mark.parametrize(("cards", "match"), [
    ({"CRVAL1": "x"}, "WCS card CRVAL1 = 'x' is not a finite number"),
    ({"CRPIX2": False}, "WCS card CRPIX2 = False is not a finite number"),
    ({"CTYPE1": 5}, "WCS card CTYPE1 = 5 is not a string"),
    ({"CTYPE1": "RA---XYZ"}, "unusable WCS .*XYZ"),
    ({"PC1_1": 0.0, "PC1_2": 0.0}, "unusable WCS .*[Ss]ingular"),
])
def test_wcs_of_wrong_type_or_unusable_is_refused(tmp_path, cards, match):
    header = _wcs(sip=False).to_header()
    header.update(cards)
    path = tmp_path / "wcs.fits"
    fits.PrimaryHDU(_noisy(), header=header).writeto(path)
    assert f"HDU 0 of {path}" in _one_line_error(FitsFormatError, match, path)


def test_lsst_cards_of_wrong_type_are_refused(tmp_path):
    path = tmp_path / "exposure.fits"
    write_exposure(path, Exposure(_masked()))
    for hdu, key, value, match in ((2, "HIERARCH MP_SAT", "y", "mask-plane card MP_SAT = 'y'"),
                                   (2, "HIERARCH MP_CR", 40, "MP_CR = 40 is not a bit number"),
                                   (1, "CRVAL1A", "origin", "WCS card CRVAL1A = 'origin'")):
        broken = tmp_path / f"{key.split()[-1]}.fits"
        with fits.open(path) as hdus:
            hdus[hdu].header[key] = value
            hdus.writeto(broken)
        assert str(broken) in _one_line_error(FitsFormatError, match, broken)
    with fits.open(path) as hdus:
        del hdus[1].header["CRVAL1A"], hdus[1].header["CRVAL2A"]
        hdus[1].header["LTV1"] = "left"
        hdus.writeto(tmp_path / "ltv.fits")
    _one_line_error(FitsFormatError, "pixel-origin card LTV1 = 'left'", tmp_path / "ltv.fits")


def test_mask_and_variance_without_image_hdu_is_refused(tmp_path):
    masked = _masked()
    path = tmp_path / "no-image.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(masked.mask, name="MASK"),
                  fits.ImageHDU(masked.variance, name="VARIANCE")]).writeto(path)
    _one_line_error(FitsFormatError, "no-image.fits has a MASK HDU but no IMAGE HDU", path)


def test_unusable_pixels_error_names_the_file(tmp_path):
    path = _plain_file(tmp_path / "nan.fits", np.full(SHAPE, np.nan, dtype=np.float32))
    message = _one_line_error(InvalidImageError, "no finite pixel", path)
    assert message.startswith(f"HDU 0 of {path}: ")


def test_corrupted_hdu_header_is_refused(tmp_path):
    path = tmp_path / "exposure.fits"
    write_exposure(path, Exposure(_masked(), psf_image=_psf()))
    broken = _with_card_bytes(path, "NAXIS1", 28, b"x", tmp_path / "naxis.fits")
    _one_line_error(FitsFormatError, "naxis.fits is (corrupted|not a readable)", broken)


def test_astropy_warnings_are_logged_not_raised(tmp_path, caplog):
    """Under ``-W error`` (this project's pytest setting) a re-issued astropy warning would raise."""
    path = _plain_file(tmp_path / "comment.fits", _noisy(), GAIN=(2.0, "gain in e-/ADU"), RDNOISE=5.0)
    broken = _with_card_bytes(path, "GAIN", 40, b"\xe9", tmp_path / "accent.fits")   # in the comment
    with caplog.at_level(logging.WARNING, logger="gpudiffim"):
        assert read_exposure(broken).info.gain == 2.0
    assert any(record.getMessage().startswith(f"{broken}: non-ASCII") for record in caplog.records)


# ---------------------------------------------------------------------------
# Writing: atomicity, extra HDUs, header cards
# ---------------------------------------------------------------------------

def test_write_is_atomic_and_refuses_to_overwrite(tmp_path):
    path = tmp_path / "out.fits"
    write_exposure(path, Exposure(_masked()))
    assert os.listdir(tmp_path) == ["out.fits"]
    before = _sha(path)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_exposure(path, Exposure(_masked(seed=2)))
    assert _sha(path) == before and os.listdir(tmp_path) == ["out.fits"]
    write_exposure(path, Exposure(_masked(seed=2)), overwrite=True)
    assert _sha(path) != before and os.listdir(tmp_path) == ["out.fits"]
    np.testing.assert_array_equal(read_exposure(path).masked_image.image, _masked(seed=2).image)


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    path = tmp_path / "out.fits"
    write_exposure(path, Exposure(_masked()))
    before = _sha(path)

    def broken(self, name, **kwargs):
        with open(name, "wb") as handle:
            handle.write(b"SIMPLE  =  partial")
        raise OSError("disk full")

    monkeypatch.setattr(fits.HDUList, "writeto", broken)
    with pytest.raises(OSError, match="disk full"):
        write_exposure(path, Exposure(_masked(seed=2)), overwrite=True)
    with pytest.raises(OSError, match="disk full"):
        write_exposure(tmp_path / "new.fits", Exposure(_masked(seed=2)))
    assert os.listdir(tmp_path) == ["out.fits"] and _sha(path) == before


def test_invalid_provenance_writes_nothing(tmp_path):
    for provenance, match in (({"NAXIS": 1}, "reserved"), ({"A=B": 1}, "invalid"),
                              ({"X" * 41: 1}, "invalid"), (["KEY", 1], "mapping")):
        with pytest.raises(ConfigurationError, match=match):
            write_exposure(tmp_path / "out.fits", Exposure(_masked()), provenance=provenance)
    assert os.listdir(tmp_path) == []


def test_provenance_cards(tmp_path):
    provenance = {"gdiffver": "0.1.0", "a_long_keyword": 3, "flag": True, "np_value": np.float32(1.5),
                  "count": np.int64(7), "nan": np.nan, "config": "x" * (MAX_STRING_LENGTH + 10),
                  "none": None, "list": [1, 2], "accent": "caf\u00e9"}
    path = tmp_path / "out.fits"
    write_exposure(path, Exposure(_masked()), provenance=provenance)
    with fits.open(path) as hdus:
        header = hdus[0].header
        assert header["GDIFFVER"] == "0.1.0" and header["A_LONG_KEYWORD"] == 3
        assert header["FLAG"] is True and header["NP_VALUE"] == 1.5 and header["COUNT"] == 7
        assert header["NAN"] == "nan" and header["LIST"] == "[1, 2]" and header["ACCENT"] == "caf?"
        assert len(header["CONFIG"]) == MAX_STRING_LENGTH and header["CONFIG"].endswith("...")
        assert "NONE" not in header
    assert read_exposure(path).info.header["A_LONG_KEYWORD"] == 3


def test_header_argument_skips_structural_and_invalid_cards(tmp_path, caplog):
    source = tmp_path / "source.fits"
    _plain_file(source, _noisy(), OBSERVER=("me", "who observed"), EXTNAME="SCI")
    path = tmp_path / "out.fits"
    write_exposure(path, Exposure(_masked()), header=fits.getheader(source))
    with fits.open(path) as hdus:
        primary = hdus[0].header
        assert primary["OBSERVER"] == "me" and primary.comments["OBSERVER"] == "who observed"
        assert primary["NAXIS"] == 0 and "EXTNAME" not in primary
    long_key = "ESO INS OPTI1 NAME WITH A LONG KEY"
    write_exposure(path, Exposure(_masked()), overwrite=True,
                   header={long_key: (-1.2345678901234567e-05, "x" * 60), "SHORT": ("y" * 60, "z" * 60)})
    with fits.open(path) as hdus:
        primary = hdus[0].header
        assert primary[long_key] == pytest.approx(-1.2345678901234567e-05, rel=1e-12)
        assert primary["SHORT"] == "y" * 60 and primary.comments["SHORT"].startswith("zzz")
    assert read_exposure(path).masked_image.shape == SHAPE
    with caplog.at_level(logging.WARNING, logger="gpudiffim"):
        write_exposure(path, Exposure(_masked()), header={"A=B": 1, "OK": 2}, overwrite=True)
    assert "A=B" in caplog.text and fits.getval(path, "OK") == 2


def test_kernel_and_background(tmp_path):
    masked = _masked(np.float64, (10, 20))
    bbox = masked.bbox()
    rng = np.random.RandomState(6)
    function = SpatialFunction("chebyshev1", 1, bbox)
    kernel = SpatialKernel(rng.normal(size=(3, 7, 7)), rng.normal(size=(3, 3)), function)
    background = BackgroundModel(np.array([0.5, -0.25, 0.125]), function)
    path = tmp_path / "out.fits"
    write_exposure(path, Exposure(masked), kernel=kernel, background=background)
    xc, yc = 0.5 * (bbox[0] + bbox[2]), 0.5 * (bbox[1] + bbox[3])
    with fits.open(path) as hdus:
        hdu = hdus["KERNEL"]
        np.testing.assert_array_equal(hdu.data, kernel.image(xc, yc))
        assert (hdu.header["KERNX"], hdu.header["KERNY"]) == (xc, yc)
        assert hdu.header["KSUM"] == pytest.approx(kernel.kernel_sum(xc, yc), rel=1e-12)
        assert hdu.header["NBASIS"] == 3 and hdu.header["KSPORDER"] == 1
        header = hdus[0].header
        assert header["BGNCOEF"] == 3 and header["BGMODEL"] == "chebyshev1" and header["BGORDER"] == 1
        assert [header[f"BGC{i}"] for i in range(3)] == [0.5, -0.25, 0.125]
        assert [header[f"BGBBOX{i}"] for i in range(4)] == list(bbox)
    _assert_same_planes(read_exposure(path).masked_image, masked)
    other = tmp_path / "array_kernel.fits"
    write_exposure(other, Exposure(masked), kernel=np.ones((5, 5)), background=[1.5])
    with fits.open(other) as hdus:
        assert hdus["KERNEL"].header["KSUM"] == 25.0 and hdus[0].header["BGC0"] == 1.5
    with pytest.raises(ShapeError):
        write_exposure(tmp_path / "bad.fits", Exposure(masked), kernel=np.ones(5))


# ---------------------------------------------------------------------------
# Real data (skipped when ../shared/data is absent)
# ---------------------------------------------------------------------------

def _file(folder, name):
    path = folder / name
    if not path.exists():
        pytest.skip(f"{path} not present")
    return path


def test_decam_plain_image(shared_data, tmp_path):
    path = _file(shared_data / "decam", "DEC-OBS04a.mini.fits")
    before = _sha(path)
    exposure = read_exposure(path)
    assert _sha(path) == before
    info = exposure.info
    assert info.gain == pytest.approx(3.984046692260535) and info.read_noise == pytest.approx(11.83702)
    assert info.saturation == pytest.approx(46536.1041736873) and info.filter.startswith("i DECam")
    assert info.date == "2018-08-04T09:23:31.598174" and exposure.psf_fwhm_pix == pytest.approx(5.231596)
    assert exposure.wcs is not None and exposure.wcs.has_celestial
    masked = exposure.masked_image
    assert masked.shape == (256, 256) and masked.dtype == np.float64 and masked.xy0 == (0, 0)
    image = fits.getdata(path).astype(np.float64)
    np.testing.assert_array_equal(masked.image, image)
    np.testing.assert_array_equal(masked.variance, np.maximum(image, 0) / info.gain
                                  + (info.read_noise / info.gain) ** 2)
    sat = (masked.mask & masked.bits(["SAT"])) != 0
    np.testing.assert_array_equal(sat, image >= info.saturation)
    out = tmp_path / "decam.fits"
    write_exposure(out, exposure, header=info.header)
    read = read_exposure(out)
    _assert_same_planes(read.masked_image, masked)
    assert _max_sky_difference(read.wcs, exposure.wcs, (0, 0), masked.shape) < 1e-9
    assert read.info.gain == info.gain and read.psf_fwhm_pix == exposure.psf_fwhm_pix


def test_decam_wcs_round_trip_with_origin(shared_data, tmp_path):
    exposure = read_exposure(_file(shared_data / "decam", "DEC-OBS04a.mini.fits"))
    masked = exposure.masked_image
    shifted = MaskedImage(masked.image, masked.mask, masked.variance, xy0=(100, -50))
    path = tmp_path / "shifted.fits"
    write_exposure(path, Exposure(shifted, wcs=exposure.wcs))
    read = read_exposure(path)
    assert read.masked_image.xy0 == (100, -50)
    assert _max_sky_difference(read.wcs, exposure.wcs, (100, -50), masked.shape) < 1e-9


def test_jwst_sci_with_error_map(shared_data):
    folder = shared_data / "jwst-nircam"
    stem = "jw01324001001-01324-o001_t001_nircam_clear-f200w_i2d_stamp"
    science, noise = _file(folder, f"{stem}.fits"), _file(folder, f"{stem}.noise.fits")
    psf = _file(folder, f"{stem}.WebbPSF.fits")
    with pytest.warns(NoDataWarning, match="5 NaN"):
        exposure = read_exposure(science, hdu="SCI", sigma=f"{noise}[ERR]", psf=psf)
    masked = exposure.masked_image
    sci, err = fits.getdata(science), fits.getdata(noise)
    no_data = (masked.mask & masked.bits(["NO_DATA"])) != 0
    assert np.count_nonzero(no_data) == 5
    np.testing.assert_array_equal(no_data, ~np.isfinite(sci) | ~np.isfinite(err) | (err <= 0))
    np.testing.assert_array_equal(masked.variance[~no_data], (err.astype(np.float32) ** 2)[~no_data])
    np.testing.assert_array_equal(masked.image[~no_data], sci[~no_data])
    assert masked.dtype == np.float32 and exposure.info.filter == "F200W"
    assert exposure.info.date.startswith("2022-06-29")
    assert exposure.wcs is not None and exposure.psf_image.shape == (205, 205)


def test_compare_to_hotpants_lsst_files(shared_data, tmp_path):
    folder = shared_data / "ip_diffim-compareToHotpants"
    for name in ("scienceMI.fits", "templateMI.fits"):
        path = _file(folder, name)
        exposure = read_exposure(path)
        masked = exposure.masked_image
        assert masked.shape == (193, 193) and masked.dtype == np.float32
        with fits.open(path) as hdus:
            variance = hdus[3].data
            np.testing.assert_array_equal(masked.image, hdus[1].data)
            np.testing.assert_array_equal(masked.variance, variance)
            # The noiseless template has zero variance wherever its image is 0: those become NO_DATA.
            no_data = np.where(variance <= 0, masked.bits(["NO_DATA"]), 0)
            np.testing.assert_array_equal(masked.mask, hdus[2].data.astype(np.int32) | no_data)
        assert (name == "templateMI.fits") == bool(np.any(variance <= 0))
        assert masked.xy0 == {"scienceMI.fits": (9, 9), "templateMI.fits": (24, 24)}[name]
        assert exposure.wcs is None
        planes = masked.mask_planes
        assert {k: planes[k] for k in ("BAD", "SAT", "INTRP", "CR", "EDGE", "DETECTED",
                                       "DETECTED_NEGATIVE")} == {
            "BAD": 0, "SAT": 1, "INTRP": 2, "CR": 3, "EDGE": 4, "DETECTED": 5, "DETECTED_NEGATIVE": 6}
        out = tmp_path / name
        write_exposure(out, exposure)
        _assert_same_planes(read_exposure(out).masked_image, masked)


def test_properimage_integer_bzero(shared_data):
    path = _file(shared_data / "properimage", "aligned_eso085-030-004.fit")
    exposure = read_exposure(path)
    masked = exposure.masked_image
    with fits.open(path, do_not_scale_image_data=True) as hdus:
        assert hdus[0].header["BITPIX"] == 16 and hdus[0].header["BZERO"] == 32768
        raw = hdus[0].data.astype(np.float64) + 32768
    assert masked.shape == (682, 1024) and masked.dtype == np.float64
    np.testing.assert_array_equal(masked.image, raw)
    assert np.all(masked.variance == masked.variance[0, 0]) and masked.variance[0, 0] > 0
    assert exposure.info.filter == "Clear" and exposure.info.date == "2015-12-27T06:26:24"
    assert exposure.wcs is None and exposure.info.gain is None
