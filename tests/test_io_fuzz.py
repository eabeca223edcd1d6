"""Seeded fuzz test of the FITS reader through ``gpudiffim subtract``.

Two small valid files are the starting points: an LSST-layout exposure that
gpudiffim's own writer wrote (IMAGE, MASK, VARIANCE and PSF HDUs, a TAN WCS,
GAIN and RDNOISE cards) and a plain single-image file that astropy wrote
(GAIN, RDNOISE, SATURATE, FILTER, MJD-OBS, FWHM and a TAN WCS).  Each seed
picks one way to break one of them (a byte flipped in a header card or in the
pixels, a cut at a random offset, a plane of another shape or dtype, NaN/inf
blocks, a missing HDU, a header value of the wrong type), then runs the
command line in-process on it, as the science or as the template image.

Whatever the damage, the reading layer (:func:`~gpudiffim.io.read_exposure`,
every warning an error) either reads the file or raises a one-line gpudiffim
error (or ``OSError``) naming it, and the command ends with exit code 0, 2
(bad input: always when the reader refused the file, with the file named on
stderr) or 3 (fit failed), without a traceback, writing its output only when
it succeeds.  Every case is fixed by its seed; a failure names it, and
``pytest tests/test_io_fuzz.py -k case17`` reruns one.
"""

import warnings

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from gpudiffim.cli import main
from gpudiffim.errors import GpudiffimError
from gpudiffim.exposure import Exposure, ExposureInfo
from gpudiffim.io import read_exposure, write_exposure
from gpudiffim.testing import gaussian_kernel, make_fake_pair

# The reader warns about NaN pixels, and a 64x64 image gives a thin kernel fit: both are expected.
pytestmark = [pytest.mark.filterwarnings("ignore::gpudiffim.NoDataWarning"),
              pytest.mark.filterwarnings("ignore::gpudiffim.FitQualityWarning")]

SHAPE = (64, 64)
KINDS = ("header_byte", "header_value", "data_bytes", "truncate", "wrong_shape", "wrong_dtype",
         "non_finite", "missing_hdu", "wrong_type")
#: Fifty consecutive seeds, and seeds that found a failure in a run of 3000 (kept as regression
#: cases): 279 a damaged WCS keyword (CRV?L1) read as a missing one, 1001 a signalling NaN,
#: 1603 a negative NAXIS1 (an endless HDU list), 2097/2763/2979 a file astropy left open.
SEEDS = (*range(50), 279, 1001, 1603, 2097, 2763, 2979)
CARD = 80
BLOCK = 2880
#: Cards whose value gpudiffim reads: a wrong-typed value must be refused with exit code 2.
WRONG_TYPES = {
    "lsst": [("GAIN", 0, "banana"), ("RDNOISE", 0, True), ("CRVAL1", "IMAGE", "x"),
             ("CRVAL1A", "IMAGE", "origin"), ("HIERARCH MP_SAT", "MASK", "y"), ("CTYPE1", "IMAGE", 5)],
    "plain": [("GAIN", 0, "banana"), ("RDNOISE", 0, "low"), ("SATURATE", 0, "high"),
              ("PC1_1", 0, "x"), ("CRPIX2", 0, False), ("CRVAL2", 0, "north")],
}
#: Cards whose value is optional metadata: a wrong type is logged and ignored.
OPTIONAL_TYPES = [("FWHM", "wide"), ("FILTER", 5), ("MJD-OBS", "yesterday"), ("MAGZERO", "x")]


def _wcs():
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crpix = [32.5, 32.5]
    wcs.wcs.crval = [150.0, 2.0]
    wcs.wcs.cd = [[-5.5e-5, 0.0], [0.0, 5.5e-5]]
    return wcs


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Valid starting files: ``lsst`` and ``template`` (gpudiffim's writer), ``plain`` (astropy)."""
    folder = tmp_path_factory.mktemp("fuzz-bases")
    pair = make_fake_pair(shape=SHAPE, n_stars=6, seed=1, flux_range=(3e3, 3e4))
    info = ExposureInfo(gain=2.0, read_noise=5.0, filter="r", date="2020-01-02T03:04:05")
    files = {}
    for name, masked in (("lsst", pair.science), ("template", pair.template)):
        files[name] = folder / f"{name}.fits"
        write_exposure(files[name], Exposure(masked, wcs=_wcs(), psf_image=gaussian_kernel(2.0, 5),
                                             info=info))
    header = _wcs().to_header()
    for key, value in (("GAIN", 2.0), ("RDNOISE", 5.0), ("SATURATE", 6.0e4), ("FILTER", "r"),
                       ("MJD-OBS", 58000.5), ("FWHM", (3.5, "PSF FWHM in pixels")), ("MAGZERO", 27.0)):
        header[key] = value
    files["plain"] = folder / "plain.fits"
    fits.PrimaryHDU(np.asarray(pair.science.image), header=header).writeto(files["plain"])
    return files, pair


def _layout(path):
    """``(header start, data start, data bytes, number of cards)`` of each HDU."""
    with fits.open(path) as hdus:
        return [(info["hdrLoc"], info["datLoc"], info["datSpan"], len(hdu.header))
                for hdu, info in ((hdu, hdu.fileinfo()) for hdu in hdus)]


def _card_offset(raw, layout, key, hdu_index):
    """Byte offset of the card ``key`` in the header of HDU ``hdu_index``, or None."""
    start, data, _, _ = layout[hdu_index]
    prefix = key.encode() if key.startswith("HIERARCH") else f"{key:<8}=".encode()
    for offset in range(start, data, CARD):
        if raw[offset:offset + CARD].startswith(prefix):
            return offset
    return None


def _planes(pair):
    masked = pair.science
    return np.asarray(masked.image), np.asarray(masked.mask), np.asarray(masked.variance)


def _lsst_hdus(image, mask, variance, names=("IMAGE", "MASK", "VARIANCE")):
    hdus = [fits.PrimaryHDU()]
    for name, data in zip(names, (image, mask, variance)):
        if data is not None:
            hdus.append(data if isinstance(data, fits.hdu.base.ExtensionHDU)
                        else fits.ImageHDU(data, name=name))
    return fits.HDUList(hdus)


def _mutate(kind, base, rng, files, pair, target):
    """Write the broken file ``target``.

    Returns
    -------
    done : str
        What was broken (for failure messages).
    refuse : bool or None
        True if the file must be refused (exit code 2), False if it must not
        be, None if either is right (e.g. a flipped pixel byte).
    """
    source = files[base]
    raw = bytearray(source.read_bytes())
    layout = _layout(source)
    image, mask, variance = _planes(pair)
    if kind == "header_byte":
        index = int(rng.integers(len(layout)))
        start, _, _, n_cards = layout[index]
        offset = start + CARD * int(rng.integers(n_cards)) + int(rng.integers(CARD))
        old = raw[offset]
        raw[offset] = (old + int(rng.integers(1, 256))) % 256
        target.write_bytes(bytes(raw))
        return f"HDU {index} byte {offset}: {old:#04x} -> {raw[offset]:#04x}", None
    if kind == "header_value":
        choices = {"lsst": [("GAIN", 0), ("RDNOISE", 0), ("CRVAL1", 1), ("PC1_1", 1), ("CRVAL1A", 1),
                            ("CRPIX2A", 3), ("LTV1", 2), ("HIERARCH MP_SAT", 2), ("EXTNAME", 2),
                            ("NAXIS1", 3), ("BITPIX", 1)],
                   "plain": [("GAIN", 0), ("RDNOISE", 0), ("SATURATE", 0), ("FILTER", 0),
                             ("MJD-OBS", 0), ("FWHM", 0), ("CRPIX1", 0), ("CTYPE2", 0), ("NAXIS2", 0)]}[base]
        key, index = choices[int(rng.integers(len(choices)))]
        offset = _card_offset(raw, layout, key, index)
        equals = raw.index(b"=", offset, offset + CARD)
        column = int(rng.integers(equals + 2 - offset, 31))
        byte = [b"#", b"x", b"'", b"\xff", b"\x00", b"=", b"/", b"e", b"-"][int(rng.integers(9))]
        raw[offset + column] = byte[0]
        target.write_bytes(bytes(raw))
        return f"card {key} of HDU {index}, column {column} -> {byte!r}", None
    if kind == "data_bytes":
        with_data = [entry for entry in layout if entry[2] > 0]
        start, data, span, _ = with_data[int(rng.integers(len(with_data)))]
        offsets = data + rng.integers(0, span, size=int(rng.integers(1, 40)))
        for offset in offsets:
            raw[offset] = int(rng.integers(256))
        target.write_bytes(bytes(raw))
        return f"{len(offsets)} data bytes of the HDU at {start}", None
    if kind == "truncate":
        cut = int(rng.integers(0, len(raw)))
        target.write_bytes(bytes(raw[:cut]))
        # a cut at a block boundary can leave a shorter but valid file
        return f"cut at byte {cut} of {len(raw)}", True if cut % BLOCK else None
    if kind == "wrong_shape":
        variant = int(rng.integers(4))
        if variant == 0:
            hdus = _lsst_hdus(image, mask[:, :-1], variance)
        elif variant == 1:
            hdus = _lsst_hdus(image, mask, variance[:-3])
        elif variant == 2:
            hdus = _lsst_hdus(np.stack([image, image]), mask, variance)
        else:
            hdus = fits.HDUList([fits.PrimaryHDU(image.ravel())])
        hdus.writeto(target)
        return f"shape variant {variant}", True
    if kind == "wrong_dtype":
        variant = int(rng.integers(6))
        if variant == 0:
            hdus = _lsst_hdus(image, mask.astype(np.float32), variance)
        elif variant == 1:
            column = fits.Column(name="pixels", format="20A", array=np.array(["star"] * 64))
            hdus = _lsst_hdus(fits.BinTableHDU.from_columns([column], name="IMAGE"), mask, variance)
        elif variant == 2:
            column = fits.Column(name="z", format="64C", array=image.astype(np.complex64))
            hdus = fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns([column])])
        elif variant == 3:
            column = fits.Column(name="flag", format="64L", array=image > 10)
            hdus = _lsst_hdus(image, fits.BinTableHDU.from_columns([column], name="MASK"), variance)
        elif variant == 4:
            hdus = fits.HDUList([fits.PrimaryHDU(np.clip(image, -128, 127).astype(np.int8))])
        else:
            hdus = _lsst_hdus(image, mask, variance.astype(np.int32) + 1)
        hdus.writeto(target)
        return f"dtype variant {variant}", True if variant < 4 else None  # int8 image, int variance: valid
    if kind == "non_finite":
        value = [np.nan, np.inf, -np.inf][int(rng.integers(3))]
        plane = int(rng.integers(2))
        planes = [image.copy(), variance.copy()]
        row, col = (int(v) for v in rng.integers(0, 48, size=2))
        size = int(rng.integers(1, 64))
        planes[plane][row:row + size, col:col + size] = value
        _lsst_hdus(planes[0], mask, planes[1]).writeto(target)
        return f"{value} block of {size} px in {'image variance'.split()[plane]} at ({row}, {col})", None
    if kind == "missing_hdu":
        variant = int(rng.integers(5))
        hdus = [_lsst_hdus(image, mask, None), _lsst_hdus(image, None, variance),
                _lsst_hdus(None, mask, variance), fits.HDUList([fits.PrimaryHDU()]),
                _lsst_hdus(image, mask, variance, names=("SCI", "MASK", "VARIANCE"))][variant]
        hdus.writeto(target)
        return f"missing-HDU variant {variant}", True if variant in (2, 3) else None  # no IMAGE; no data
    # wrong_type: a value gpudiffim reads, or optional metadata, of the wrong type
    options = [(key, hdu, value, True) for key, hdu, value in WRONG_TYPES[base]]
    if base == "plain":
        options += [(key, 0, value, False) for key, value in OPTIONAL_TYPES]
    key, hdu, value, refused = options[int(rng.integers(len(options)))]
    with fits.open(source) as hdus:
        hdus[hdu].header[key] = value
        hdus.writeto(target)
    return f"{key.replace('HIERARCH ', '')} = {value!r} in HDU {hdu}", refused


def _run(capsys, *arguments):
    """``gpudiffim -q subtract ...`` with a constant kernel and background; exit code and stderr."""
    code = main(["-q", "subtract", *map(str, arguments), "--config", "spatial_kernel_order=0",
                 "--config", "spatial_bg_order=0"])
    return code, capsys.readouterr().err


def _read(path):
    """The reading layer alone: None, or its error (only gpudiffim errors and OSError may escape)."""
    try:
        read_exposure(path)
    except (GpudiffimError, OSError) as error:
        return error
    return None


@pytest.mark.parametrize("seed", SEEDS, ids=lambda seed: f"case{seed}")
def test_reader_fuzz(seed, bases, tmp_path, capsys):
    files, pair = bases
    kind, base = KINDS[seed % len(KINDS)], ("lsst", "plain")[(seed // len(KINDS)) % 2]
    role = "template" if (seed // (2 * len(KINDS))) % 3 == 2 else "science"
    rng = np.random.default_rng(seed)
    broken = tmp_path / f"case-{seed}.fits"
    done, refuse = _mutate(kind, base, rng, files, pair, broken)
    what = f"case {seed}: {kind} of the {base} file as the {role} ({done})"
    # Reading: every warning is an error here (astropy's must be logged, not raised), and a
    # refusal is a one-line gpudiffim error or OSError that names the file.
    error = _read(broken)
    if error is not None:
        assert broken.name in str(error) and "\n" not in str(error), f"{what}: {error!r}"
    if refuse is not None:
        assert (error is not None) == refuse, f"{what}: read error {error!r}"
    if kind == "wrong_type" and refuse:
        assert done.split()[0] in str(error), f"{what}: {error!r}"
    # The command line: a pixel byte may turn into 1e38 or a negative variance, on which the fit
    # stages (not the reader) emit numpy RuntimeWarnings; those are left to the fit's owners.
    science, template = (broken, files["template"]) if role == "science" else (files["lsst"], broken)
    output = tmp_path / "difference.fits"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        code, err = _run(capsys, science, template, "-o", output)
    what += f": read error {error!r}, exit {code}, stderr {err!r}"
    assert code in (0, 2, 3), what
    assert "Traceback" not in err, what
    assert output.exists() == (code == 0), what
    if error is not None:
        assert code == 2 and broken.name in err, what


def test_fuzz_bases_are_valid(bases, tmp_path, capsys):
    """Both starting files subtract cleanly, as science and as template."""
    files, _ = bases
    for science in (files["lsst"], files["plain"]):
        output = tmp_path / f"{science.stem}-difference.fits"
        code, err = _run(capsys, science, files["template"], "-o", output)
        assert code == 0 and output.exists(), err
