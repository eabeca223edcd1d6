"""FITS input and output of exposures and masked images.

Reading
-------
:func:`read_exposure` accepts two layouts:

* **LSST/Rubin** (as ``afw`` writes a ``MaskedImage`` or ``Exposure``): HDUs
  named ``IMAGE``, ``MASK`` and ``VARIANCE`` (``MASK`` and ``VARIANCE`` may be
  missing), or, without those names, an empty primary HDU followed by three
  2-D image HDUs of one shape whose second has integer pixels (the mask) and
  whose third has floating-point pixels (the variance).  Mask-plane names come
  from the ``MP_<NAME> = bit`` cards of the mask HDU (``HIERARCH`` cards
  included), or :data:`~gpudiffim.image.DEFAULT_MASK_PLANES` when it has none.
* **Plain image**: the HDU named or numbered by ``hdu`` (e.g. ``"SCI"`` for
  JWST), else the first image HDU holding data.

Pixel origin ``xy0``: from the ``A`` alternate WCS that ``afw`` writes
(``x0 = CRVAL1A - CRPIX1A + 1``, used when ``CRVAL1A`` and ``CRVAL2A`` exist
and ``CTYPE1A``/``CTYPE2A``, where present, are ``LINEAR``), else, in the
LSST layout only, from ``LTV1``/``LTV2`` (``x0 = -LTV1``).  ``LTV`` cards of plain
images (IRAF or SWarp cut-outs, e.g. the DECam frames) are ignored, because
there they describe a physical-pixel system, not an LSST parent box.

WCS: the celestial part of the image HDU's primary WCS (``astropy.wcs.WCS``
with ``relax=True``; ``None`` without ``CTYPE1``/``CTYPE2`` or a celestial
axis pair; a WCS that astropy or wcslib rejects is an error, see below).  A
FITS WCS refers to the stored array, so its reference pixel is shifted by
``xy0`` to give the parent-coordinate WCS of :class:`~gpudiffim.Exposure`
(``afw`` does the same); :func:`write_exposure` shifts it back.

Malformed files
---------------
Whatever is wrong with a file ends in a one-line
:class:`~gpudiffim.FitsFormatError` naming the file (and the HDU and
keyword where known), never in an astropy exception: not FITS, truncated or
corrupted (HDUs that overlap, a negative ``NAXISn``), pixels astropy cannot
read, and, among the cards gpudiffim reads, one that astropy cannot parse or
whose value has the wrong type (e.g. ``GAIN = 'banana'``).  The cards read
are ``GAIN``, ``RDNOISE``/``READNOIS`` and ``SATURATE``/``SATURATION``
(unless given as arguments, which is then the way round a damaged card), the
WCS and ``A``-WCS keywords, ``LTV1``/``LTV2`` (LSST layout), the ``MP_*``
mask-plane cards and ``EXTNAME``; a card whose keyword is damaged (astropy
shows a flipped byte as ``?``) counts as read when it may be one of them.  A
WCS that astropy or wcslib rejects (an unknown projection, a singular
matrix) is refused too: ignoring it would let registration take two
different pixel grids for one.

Other malformed cards are repaired with astropy's ``verify('fix')`` (or left
out when that fails), with a log WARNING showing the card.  Values of the
right type but out of range are logged and ignored: a gain <= 0 (SWarp writes
0 for an unknown gain), a negative read noise, a saturation <= 0.  Optional
metadata of the wrong type (``FILTER``, ``DATE-OBS``, ``TIME-OBS``,
``MJD-OBS``, zero point, ``FWHM``/``SEEING``) is logged and ignored as well.
Astropy's warnings while reading are logged, not re-issued, so that a
``-W error`` setting does not turn them into tracebacks.  Signalling NaNs
(a damaged byte can make one) are stored as quiet NaNs.

Writing
-------
:func:`write_exposure` and :func:`write_masked_image` write the LSST layout:
an empty primary HDU (metadata, provenance, background cards), then
``IMAGE``, ``MASK`` and ``VARIANCE`` HDUs each carrying the WCS, the ``A``
WCS and ``LTV1``/``LTV2`` (``afw``'s pixel-origin cards), and optionally
``PSF`` and ``KERNEL`` image HDUs, and binary tables: ``QUALITY``, and
``SOURCES`` (the table of :func:`gpudiffim.sources.detect_sources`, read back
by :func:`read_sources`).  Files are written atomically: to a
temporary file in the target folder, then renamed (or hard-linked when
``overwrite`` is False, so an existing file is never replaced), so a failed
write never leaves a truncated file.
"""

import contextlib
import datetime
import errno
import itertools
import json
import logging
import math
import numbers
import os
import re
import tempfile
import warnings
from dataclasses import dataclass, field

import numpy as np

from ._backend import to_host
from .errors import (
    ConfigurationError,
    FitsFormatError,
    GpudiffimError,
    GpudiffimWarning,
    InvalidImageError,
    InvalidVarianceError,
    ShapeError,
)
from .exposure import Exposure, ExposureInfo
from .image import DEFAULT_MASK_PLANES, MaskedImage

__all__ = [
    "FILTER_KEYWORDS",
    "FWHM_KEYWORDS",
    "GAIN_KEYWORDS",
    "MAX_STRING_LENGTH",
    "READ_NOISE_KEYWORDS",
    "SATURATION_KEYWORDS",
    "ZERO_POINT_KEYWORDS",
    "SOURCES_HDU",
    "read_exposure",
    "read_sources",
    "write_exposure",
    "write_masked_image",
]

log = logging.getLogger(__name__)

#: Header keywords read, in order of preference, for the gain (e-/ADU).
GAIN_KEYWORDS = ("GAIN",)
#: Header keywords for the read noise (electrons).
READ_NOISE_KEYWORDS = ("RDNOISE", "READNOIS")
#: Header keywords for the saturation level (ADU).
SATURATION_KEYWORDS = ("SATURATE", "SATURATION")
#: Header keywords for the filter name.
FILTER_KEYWORDS = ("FILTER", "BAND")
#: Header keywords for the photometric zero point (magnitude of 1 ADU).
ZERO_POINT_KEYWORDS = ("MAGZERO", "MAGZP", "ZP", "PHOTZP")
#: Header keywords for the PSF FWHM in pixels (see :func:`read_exposure`).
FWHM_KEYWORDS = ("FWHM", "SEEING")
#: Name of the binary-table HDU holding the sources detected on a difference image.
SOURCES_HDU = "SOURCES"
#: Longest string value written to a header card (longer ones are truncated).
MAX_STRING_LENGTH = 4096

_LSST_NAMES = ("IMAGE", "MASK", "VARIANCE")
_VARIANCE_SOURCES = ("variance", "inverse_variance", "sigma", "weight")
_STRUCTURAL = frozenset({"SIMPLE", "XTENSION", "BITPIX", "NAXIS", "EXTEND", "PCOUNT", "GCOUNT",
                         "BSCALE", "BZERO", "BLANK", "GROUPS", "THEAP", "TFIELDS", "END",
                         "CHECKSUM", "DATASUM"})
_COMMENTARY = frozenset({"", "COMMENT", "HISTORY"})
_SHORT_KEY = re.compile(r"[A-Z0-9_-]{1,8}")
_BRACKET = re.compile(r"^(?P<path>.+)\[(?P<hdu>[^\[\]]+)\]$")
_MAX_KEY_LENGTH = 40
_KEY_CHARACTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-"
#: Astropy's advice in its VerifyError messages, which means nothing to a command-line user.
_VERIFY_ADVICE = re.compile(r",?\s*fix it first with \.verify\('fix'\)\.?")


def _is_structural(key):
    return key in _STRUCTURAL or re.fullmatch(r"NAXIS\d+", key) is not None


def _is_reserved(key):
    """Keywords the writer manages: structure, extension names, commentary."""
    return (_is_structural(key) or key in _COMMENTARY or key == "CONTINUE"
            or key in ("EXTNAME", "EXTVER", "EXTLEVEL", "EXTTYPE"))


def _one_line(error):
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


# ---------------------------------------------------------------------------
# Opening files and selecting HDUs
# ---------------------------------------------------------------------------

def _parse_hdu(text):
    """HDU from the text inside ``path[...]``: an index, ``NAME`` or ``NAME,VER``."""
    text = text.strip()
    if re.fullmatch(r"[+-]?\d+", text):
        return int(text)
    name, sep, version = text.partition(",")
    if sep and version.strip().isdigit():
        return (name.strip(), int(version))
    return text


def _check_hdu(hdu):
    valid = (hdu is None or (isinstance(hdu, (int, np.integer)) and not isinstance(hdu, bool))
             or isinstance(hdu, str)
             or (isinstance(hdu, tuple) and len(hdu) == 2 and isinstance(hdu[0], str)
                 and isinstance(hdu[1], (int, np.integer))))
    if not valid:
        msg = f"hdu must be an index, an EXTNAME or an (EXTNAME, EXTVER) pair, got {hdu!r}"
        raise ConfigurationError(msg)
    return int(hdu) if isinstance(hdu, (int, np.integer)) else hdu


def _split_spec(spec, hdu=None, what="image"):
    """``(path, hdu)`` from ``path``, ``"path[HDU]"`` or ``(path, hdu)``."""
    if isinstance(spec, tuple):
        if len(spec) != 2 or not isinstance(spec[0], (str, os.PathLike)):
            msg = f"{what} must be a path, 'path[HDU]', a (path, hdu) pair or an array, got {spec!r}"
            raise ConfigurationError(msg)
        return os.fspath(spec[0]), _check_hdu(spec[1])
    path = os.fspath(spec)
    if hdu is None and not os.path.exists(path):
        match = _BRACKET.match(path)
        if match and os.path.exists(match["path"]):
            return match["path"], _check_hdu(_parse_hdu(match["hdu"]))
    return path, _check_hdu(hdu)


def _foreign(error):
    """Whether ``error`` must pass the reading boundary unchanged (not a property of the file).

    Out of memory, no permission, and programming or installation errors
    (``NameError``, an ``ImportError`` other than gpudiffim's own) are not
    reported as a malformed file.
    """
    return (isinstance(error, (MemoryError, PermissionError, NameError))
            or (isinstance(error, ImportError) and not isinstance(error, GpudiffimError)))


def _with_fits(path, reader):
    """Open ``path`` and return ``reader(hdus)``, mapping astropy errors to FitsFormatError.

    Every exception raised while the file is open (astropy's ``VerifyError``
    for an unparsable card, ``OSError`` or ``EOFError`` for a short file,
    ``UnicodeDecodeError``, ``KeyError``, ...) becomes a one-line
    :class:`FitsFormatError` naming the file, except gpudiffim's own errors
    and the ones :func:`_foreign` lets through.  Warnings are held until the
    file is closed: those telling of a damaged file (truncated, a header
    astropy cannot validate, an HDU it treats as corrupted) become the
    error; astropy's other warnings are logged (WARNING, with the file
    name), so that they never turn into exceptions under ``-W error``;
    gpudiffim's own and deprecation warnings are re-issued unchanged.
    """
    from astropy.io import fits
    from astropy.io.fits.verify import VerifyError

    if not os.path.exists(path):
        raise FileNotFoundError(errno.ENOENT, "no such FITS file", path)
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, "a folder, not a FITS file", path)
    caught = []
    try:
        # The file is opened here, not by astropy, so that it is closed even when astropy fails
        # half-way through opening it (astropy then leaves it to the garbage collector).
        with warnings.catch_warnings(record=True) as caught, open(path, "rb") as handle:
            warnings.simplefilter("always")
            with fits.open(handle, memmap=False) as hdus:
                _walk(hdus, path)
                result = reader(hdus)
    except Exception as error:
        if _foreign(error):
            raise
        damage = _damage(caught)
        if damage:
            msg = f"{path} is {damage}"
            raise FitsFormatError(msg) from error
        if isinstance(error, GpudiffimError):
            raise
        if isinstance(error, VerifyError):
            msg = f"{path} has an unparsable header card ({_VERIFY_ADVICE.sub('', _one_line(error))})"
        else:
            msg = f"{path} is not a readable FITS file ({_one_line(error)})"
        raise FitsFormatError(msg) from error
    damage = _damage(caught)
    if damage:
        msg = f"{path} is {damage}"
        raise FitsFormatError(msg)
    _pass_on(caught, path)
    return result


def _walk(hdus, path):
    """Read every HDU header once, refusing HDUs that do not follow one another in the file.

    A negative ``NAXISn`` gives a negative data size, and astropy then finds
    the next HDU inside (or before) the current one, again and again: an
    endless HDU list that would fill the memory.
    """
    end = 0
    for index in itertools.count():
        try:
            hdu = hdus[index]
        except IndexError:
            return
        header = hdu.header
        naxis = header.get("NAXIS", 0)
        axes = [f"NAXIS{i}" for i in range(1, naxis + 1)] if isinstance(naxis, int) else []
        bad = [f"{key} = {header[key]!r}" for key in axes
               if key in header and not (isinstance(header[key], int) and header[key] >= 0)]
        if bad:
            msg = f"{path} is corrupted: HDU {index} has {', '.join(bad)}"
            raise FitsFormatError(msg)
        info = hdu.fileinfo()
        if info is None:
            return
        if info["hdrLoc"] < end or info["datSpan"] < 0:
            msg = (f"{path} is corrupted: HDU {index} (header at byte {info['hdrLoc']}, "
                   f"{info['datSpan']} data bytes) overlaps the HDU before it, which ends at byte {end}")
            raise FitsFormatError(msg)
        end = info["datLoc"] + info["datSpan"]


def _damage(caught):
    """What astropy's warnings among ``caught`` say is wrong with the file, or None."""
    for item in caught:
        text = " ".join(str(item.message).split())
        if "truncated" in text and "file" in text.lower():
            return f"truncated ({text})"
        if "file is corrupted" in text or "treated as corrupted" in text:
            return f"corrupted ({_VERIFY_ADVICE.sub('', text)})"
    return None


#: Fragments of astropy's VerifyWarning reports that say nothing by themselves.
_NOISE = ("Verification reported errors:", "Note: astropy.io.fits uses zero-based indexing.")


def _pass_on(caught, path):
    """Log astropy's (and other libraries') warnings; re-issue gpudiffim's and deprecation warnings."""
    logged = set()
    for item in caught:
        if issubclass(item.category, (GpudiffimWarning, DeprecationWarning, PendingDeprecationWarning,
                                      FutureWarning)):
            warnings.warn_explicit(item.message, item.category, item.filename, item.lineno,
                                   source=item.source)
            continue
        text = " ".join(str(item.message).split())
        if text and text not in _NOISE and text not in logged:
            logged.add(text)
            log.warning("%s: %s", path, text)


def _label(path, hdus, index):
    name = hdus[index].name
    return f"HDU {index}" + (f" ({name})" if name and name != "PRIMARY" else "") + f" of {path}"


def _has_data(hdu):
    naxis = hdu.header.get("NAXIS", 0)
    return hdu.is_image and naxis > 0 and all(hdu.header.get(f"NAXIS{i}", 0) > 0
                                              for i in range(1, naxis + 1))


def _hdu_index(hdus, hdu, path):
    """Index of the requested HDU, or of the first image HDU with data."""
    if hdu is None:
        for index, candidate in enumerate(hdus):
            if _has_data(candidate):
                return index
        names = ", ".join(f"{i} {h.name} ({type(h).__name__})".replace("  ", " ") for i, h in enumerate(hdus))
        msg = f"{path} holds no image data (HDUs: {names})"
        raise FitsFormatError(msg)
    if isinstance(hdu, int):
        if not -len(hdus) <= hdu < len(hdus):
            msg = f"{path} has no HDU {hdu}: it has {len(hdus)} HDU(s)"
            raise FitsFormatError(msg)
        return hdu % len(hdus)
    try:
        return hdus.index_of(hdu)
    except (KeyError, IndexError):
        names = ", ".join(h.name for h in hdus)
        msg = f"{path} has no HDU named {hdu!r} (HDUs: {names})"
        raise FitsFormatError(msg) from None


def _native(array):
    """A native-byte-order copy of ``array`` (FITS data are big-endian)."""
    return np.array(array, dtype=array.dtype.newbyteorder("="))


def _image_data(hdus, index, path):
    """Native 2-D pixel array of HDU ``index`` (BSCALE/BZERO applied) and its label."""
    hdu, label = hdus[index], _label(path, hdus, index)
    if not hdu.is_image:
        msg = f"{label} is a {type(hdu).__name__}, not an image"
        raise FitsFormatError(msg)
    try:
        data = hdu.data
    except Exception as error:
        if _foreign(error):
            raise
        msg = f"cannot read the pixels of {label} ({_one_line(error)})"
        raise FitsFormatError(msg) from error
    if data is None or data.size == 0:
        msg = f"{label} holds no image data"
        raise FitsFormatError(msg)
    data = np.asarray(data)
    while data.ndim > 2 and data.shape[0] == 1:
        data = data[0]
    if data.ndim != 2:
        msg = f"{label} holds a {data.ndim}-D array of shape {data.shape}; expected a 2-D image"
        raise FitsFormatError(msg)
    data = _native(data)
    if data.dtype.kind == "f":
        # A damaged byte can make a signalling NaN, on which later arithmetic raises FE_INVALID
        # (a RuntimeWarning) in whatever code touches it first: make every NaN a quiet one.
        nan = np.isnan(data)
        if nan.any():
            data[nan] = np.nan
    return data, label


def _lsst_indices(hdus):
    """``(image, mask, variance)`` HDU indices of an LSST-layout file (None where absent), or None."""
    names = [hdu.name.upper() for hdu in hdus]
    if "IMAGE" in names:
        return tuple(names.index(name) if name in names else None for name in _LSST_NAMES)
    if len(hdus) < 4 or _has_data(hdus[0]) or not all(_has_data(hdus[i]) for i in (1, 2, 3)):
        return None
    headers = [hdus[i].header for i in (1, 2, 3)]
    shapes = {tuple(h.get(f"NAXIS{k}") for k in range(1, h["NAXIS"] + 1)) for h in headers}
    if len(shapes) == 1 and headers[0]["NAXIS"] == 2 and headers[1]["BITPIX"] > 0 > headers[2]["BITPIX"]:
        return (1, 2, 3)
    return None


# ---------------------------------------------------------------------------
# Header cards: parsing, value types, metadata
# ---------------------------------------------------------------------------

#: Keywords gpudiffim reads to build the variance and the SAT plane.
_VALUE_KEYWORDS = (*GAIN_KEYWORDS, *READ_NOISE_KEYWORDS, *SATURATION_KEYWORDS)
#: WCS keywords (an alternate-WCS letter may follow) by the type of their value.
_WCS_PATTERNS = (
    ("number", re.compile(r"(?:(?:CRPIX|CRVAL|CDELT|CROTA|CRDER|CSYER)\d+|(?:PC|CD|PV)\d+_\d+"
                          r"|(?:PC|CD)\d{6}|WCSAXES|LONPOLE|LATPOLE|(?:A|B|AP|BP)_(?:\d+_\d+|ORDER|DMAX))"
                          r"(?P<alt>[A-Z]?)")),
    ("string", re.compile(r"(?:(?:CTYPE|CUNIT|CNAME)\d+|PS\d+_\d+|RADESYS|WCSNAME)(?P<alt>[A-Z]?)")),
    ("other", re.compile(r"(?:EQUINOX|RADECSYS|EPOCH|MJDREF|(?:DP|DQ|CPDIS|CQDIS|D2IMDIS|D2IMERR)\d+"
                         r"|D2IMEXT)(?P<alt>[A-Z]?)")),
)


def _is_number(value):
    return (isinstance(value, numbers.Real) and not isinstance(value, bool)
            and math.isfinite(float(value)))


def _wcs_kind(key):
    """``(kind, alternate letter)`` of a WCS keyword (kind "number", "string" or "other"), or None."""
    base = key.split(".")[0]
    for kind, pattern in _WCS_PATTERNS:
        match = pattern.fullmatch(base)
        if match:
            return kind, match["alt"]
    return None


def _read_wcs_keys(header):
    """Alternate-WCS letters whose keywords gpudiffim reads from an image header.

    ``A`` always (the ``afw`` pixel origin); the primary WCS ("") when
    ``CTYPE1`` and ``CTYPE2`` are present, as :func:`_read_wcs` requires.
    """
    return {"A", ""} if "CTYPE1" in header and "CTYPE2" in header else {"A"}


def _image_keys(header, overridden, use_ltv):
    """Predicate: keywords of an image header whose values gpudiffim reads (``overridden`` left out)."""
    keys = {key for key in _VALUE_KEYWORDS if key not in overridden} | {"EXTNAME", "EXTVER"}
    if use_ltv:
        keys |= {"LTV1", "LTV2"}
    letters = _read_wcs_keys(header)

    def used(key):
        kind = _wcs_kind(key)
        return key in keys or (kind is not None and kind[1] in letters)

    return used


def _mask_keys(key):
    """Keywords of a mask header whose values gpudiffim reads: ``MP_<NAME>`` and the HDU name."""
    return key.upper().startswith("MP_") or key in ("EXTNAME", "EXTVER")


def _card_errors():
    from astropy.io.fits.verify import VerifyError

    return (VerifyError, ValueError, TypeError, KeyError, IndexError, AttributeError)


def _raw_text(card):
    """The 80 characters of a card as read, for messages (astropy re-formats ``card.image``)."""
    text = getattr(card, "_image", None)
    return " ".join(text.split()) if isinstance(text, str) and text.strip() else None


def _card_keyword(card):
    try:
        return card.keyword
    except _card_errors():
        text = _raw_text(card) or "?"
        return text.split("=")[0].strip() if text.upper().startswith("HIERARCH") else text[:8].strip()


def _parsed(card):
    """``(keyword, value)`` of a card, or None when astropy cannot parse it without complaint."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            key, value, _ = card.keyword, card.value, card.comment
    except (*_card_errors(), Warning):
        return None
    return key, value


def _standard(card):
    """Whether a parsed card is FITS-standard as it stands (so astropy writes it without a warning)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            card.verify("exception")
            _ = card.image
    except (*_card_errors(), Warning):
        return False
    return True


def _repaired(card, parsed):
    """A FITS-standard copy of ``card``, or None.

    Astropy's ``verify('fix')`` of the card's text, else, when its value
    parsed, a new card of the same keyword and value without the comment.
    """
    from astropy.io import fits

    text = getattr(card, "_image", None)
    candidates = []
    if isinstance(text, str):
        candidates.append(lambda: fits.Card.fromstring(text))
    if parsed is not None:
        candidates.append(lambda: fits.Card(*parsed))
    for make in candidates:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fixed = make()
                fixed.verify("fix")
        except (*_card_errors(), Warning):
            continue
        if _parsed(fixed) is not None and _standard(fixed):
            return fixed
    return None


def _may_be_used(key, used):
    """Whether ``key`` may be a keyword that ``used`` accepts, its non-FITS characters read as unknown.

    A flipped byte that astropy shows as ``?`` (or a space) inside a keyword
    hides which card it was: ``CRV?L1`` may have been ``CRVAL1``.
    """
    key = key.upper()
    unknown = [i for i, char in enumerate(key) if char not in _KEY_CHARACTERS]
    if not unknown:
        return used(key)
    if len(unknown) > 2:
        return True
    for chars in itertools.product(_KEY_CHARACTERS, repeat=len(unknown)):
        candidate = list(key)
        for i, char in zip(unknown, chars):
            candidate[i] = char
        if used("".join(candidate)):
            return True
    return False


def _clean_header(header, label, used):
    """A copy of ``header`` in which every card parses and is FITS-standard.

    A card that is not is repaired with astropy's ``verify('fix')`` (or,
    failing that, rebuilt from its keyword and value, or left out), with a
    log WARNING giving the card's text.  When gpudiffim reads the card's
    value (``used(keyword)``, or a damaged keyword may be such a one), the
    file is refused instead unless the value parsed and the repair kept it
    unchanged (e.g. a lower-case keyword).

    Parameters
    ----------
    header : astropy.io.fits.Header
    label : str
        ``"HDU n (NAME) of path"``, for messages.
    used : callable
        Keyword -> whether gpudiffim reads that card's value.

    Raises
    ------
    FitsFormatError
        Naming ``label`` and the keyword, for a card that gpudiffim reads
        and whose value cannot be parsed or would change.
    """
    from astropy.io import fits

    cards = []
    for card in header.cards:
        parsed = _parsed(card)
        if parsed is not None and _standard(card):
            cards.append(card)
            continue
        key, text = (parsed[0] if parsed else _card_keyword(card)), _raw_text(card)
        fixed = _repaired(card, parsed)
        damaged = any(char not in _KEY_CHARACTERS for char in key.upper())
        kept = (parsed is not None and fixed is not None and type(fixed.value) is type(parsed[1])
                and fixed.value == parsed[1])
        if _may_be_used(key, used) and (damaged or not kept):
            msg = (f"{label}: header card {key} has a damaged keyword that may be one gpudiffim reads: "
                   f"{text or key!r}" if damaged else
                   f"{label}: header card {key} cannot be parsed: {text or key!r}")
            raise FitsFormatError(msg)
        if fixed is None:
            log.warning("%s: malformed header card %r left out (not used by gpudiffim)", label,
                        text or key)
            continue
        log.warning("%s: malformed header card %r read as %r", label, text or key,
                    " ".join(fixed.image.split()))
        cards.append(fixed)
    return fits.Header(cards)


def _check_wcs_values(header, label):
    """Refuse WCS cards of the wrong type among those gpudiffim reads.

    wcslib reads a string where it expects a number as 0 and carries on
    (only printing a note), so ``CRVAL1 = 'x'`` would silently move the
    image on the sky.
    """
    letters = _read_wcs_keys(header)
    for card in header.cards:
        kind = _wcs_kind(card.keyword)
        if kind is None or kind[1] not in letters or kind[0] == "other":
            continue
        value = card.value
        if kind[0] == "number" and not _is_number(value):
            msg = f"{label}: WCS card {card.keyword} = {value!r} is not a finite number"
            raise FitsFormatError(msg)
        if kind[0] == "string" and not isinstance(value, str):
            msg = f"{label}: WCS card {card.keyword} = {value!r} is not a string"
            raise FitsFormatError(msg)


def _cards(headers, keys):
    """``(key, value, header, label)`` of each card named in ``keys``: headers in order, then keys."""
    for header, label in headers:
        for key in keys:
            if key in header:
                yield key, header[key], header, label


def _header_number(headers, keys, what, argument, valid, meaning):
    """The first valid number among the cards ``keys`` (image header first), or None.

    A card that is not a finite number is refused (:class:`FitsFormatError`
    naming the file, HDU and keyword); one outside the valid range
    (``valid(value)`` false) is logged with ``meaning`` and skipped.
    """
    for key, value, _, label in _cards(headers, keys):
        if not _is_number(value):
            msg = (f"{label}: header card {key} = {value!r} is not a number ({what}); fix the card or "
                   f"give the {what} explicitly (read_exposure {argument}=, or the command line's "
                   f"--science-{argument.replace('_', '-')}/--template-{argument.replace('_', '-')})")
            raise FitsFormatError(msg)
        if valid(value):
            return float(value)
        log.warning("%s: header card %s = %r ignored: %s", label, key, value, meaning)
    return None


def _header_optional(headers, keys, kind):
    """The first usable value of optional metadata ``keys``, or None.

    ``kind`` is "number" or "string"; a value of another type is logged
    (WARNING) and skipped, an empty string skipped.
    """
    for key, value, _, label in _cards(headers, keys):
        if kind == "number" and _is_number(value):
            return float(value)
        if kind == "string" and isinstance(value, str):
            if value.strip():
                return value.strip()
            continue
        log.warning("%s: header card %s = %r ignored: expected a %s", label, key, value, kind)
    return None


def _header_date(headers):
    date = _header_optional(headers, ("DATE-OBS",), "string")
    if date is not None:
        time = _header_optional(headers, ("TIME-OBS",), "string")
        return f"{date}T{time}" if time and "T" not in date else date
    mjd = _header_optional(headers, ("MJD-OBS",), "number")
    if mjd is None:
        return None
    try:
        moment = datetime.datetime(1858, 11, 17) + datetime.timedelta(days=mjd)
    except OverflowError:
        log.warning("header card MJD-OBS = %r ignored: out of range", mjd)
        return None
    return moment.isoformat(timespec="milliseconds")


def _header_fwhm(headers):
    """PSF FWHM in pixels: FWHM unless its comment names arcsec; SEEING only if its comment names pixels."""
    for key, value, header, label in _cards(headers, FWHM_KEYWORDS):
        if not (_is_number(value) and value > 0):
            log.warning("%s: header card %s = %r ignored: expected a positive number of pixels", label,
                        key, value)
            continue
        comment = header.comments[key].lower()
        if "arcsec" in comment or '"' in comment:
            continue
        if key == "SEEING" and "pix" not in comment:
            continue
        return float(value)
    return None


def _plain_value(value):
    from astropy.io import fits

    if isinstance(value, fits.card.Undefined):
        return None
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    return value if isinstance(value, (str, complex)) else str(value)


def _header_dict(headers):
    """Non-structural, non-commentary cards of ``headers`` (later headers win)."""
    cards = {}
    for header in headers:
        for card in header.cards:
            key = card.keyword
            if key in _COMMENTARY or _is_structural(key):
                continue
            cards[key] = _plain_value(card.value)
    return cards


def _mask_planes(header, label):
    """Plane name -> bit from the ``MP_<NAME>`` cards of a mask header.

    Raises
    ------
    FitsFormatError
        If an ``MP_`` card does not hold a bit number from 0 to 31.
    """
    planes = {}
    for key, value in header.items():
        if not key.upper().startswith("MP_"):
            continue
        if not (isinstance(value, (int, np.integer)) and not isinstance(value, bool) and 0 <= value < 32):
            msg = f"{label}: mask-plane card {key} = {value!r} is not a bit number from 0 to 31"
            raise FitsFormatError(msg)
        planes[key[3:].upper()] = int(value)
    return planes


def _read_xy0(header, use_ltv, label):
    """Parent origin from the ``A`` WCS, else (LSST layout) ``LTV1``/``LTV2``.

    Like ``afw``, the ``A`` WCS counts when ``CRVAL1A`` and ``CRVAL2A`` are
    present and ``CTYPE1A``/``CTYPE2A``, where present, are ``LINEAR``.
    The value types were checked by :func:`_check_wcs_values`; ``LTV``
    cards that are not numbers are refused here.
    """
    linear = all(str(header.get(f"CTYPE{i}A", "LINEAR")).strip().upper() == "LINEAR" for i in (1, 2))
    if linear and "CRVAL1A" in header and "CRVAL2A" in header:
        source = "CRVAL1A/CRVAL2A"
        values = [header[f"CRVAL{i}A"] - header.get(f"CRPIX{i}A", 1) + 1 for i in (1, 2)]
    elif use_ltv and "LTV1" in header and "LTV2" in header:
        source = "LTV1/LTV2"
        for key in ("LTV1", "LTV2"):
            if not _is_number(header[key]):
                msg = f"{label}: pixel-origin card {key} = {header[key]!r} is not a finite number"
                raise FitsFormatError(msg)
        values = [-header["LTV1"], -header["LTV2"]]
    else:
        return (0, 0)
    if not all(float(v).is_integer() for v in values):
        log.warning("%s: non-integer pixel origin %s from %s ignored; xy0 = (0, 0)", label, values, source)
        return (0, 0)
    if not all(abs(v) < 2**31 for v in values):
        msg = f"{label}: pixel origin {values} from {source} is out of the 32-bit range"
        raise FitsFormatError(msg)
    return (int(values[0]), int(values[1]))


# ---------------------------------------------------------------------------
# WCS
# ---------------------------------------------------------------------------

def _shift_wcs(wcs, dx, dy):
    """Copy of ``wcs`` whose pixel coordinates are offset by ``(dx, dy)`` (reference pixel + shift)."""
    if dx == 0 and dy == 0:
        return wcs
    from astropy.wcs import Sip

    wcs = wcs.deepcopy()
    wcs.wcs.crpix = wcs.wcs.crpix + np.array([dx, dy], dtype=np.float64)
    if wcs.sip is not None:
        wcs.sip = Sip(wcs.sip.a, wcs.sip.b, wcs.sip.ap, wcs.sip.bp, wcs.wcs.crpix)
    if any(getattr(wcs, name, None) is not None for name in ("cpdis1", "cpdis2", "det2im1", "det2im2")):
        log.warning("lookup-table distortions of the WCS are not shifted by the pixel origin (%d, %d)",
                    dx, dy)
    return wcs


def _read_wcs(header, hdus, xy0, label):
    """Celestial parent-coordinate WCS of an image header, or None without ``CTYPE1``/``CTYPE2``.

    Raises
    ------
    FitsFormatError
        If astropy or wcslib rejects the WCS (an unknown projection, a
        singular CD matrix, ...): ignoring it would let registration take
        two different grids for one.
    """
    from astropy.wcs import WCS, FITSFixedWarning

    if not ("CTYPE1" in header and "CTYPE2" in header):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)
            wcs = WCS(header, fobj=hdus, relax=True)
            if not wcs.has_celestial:
                return None
            if wcs.naxis != 2:
                wcs = wcs.celestial
            wcs.wcs.set()  # wcslib's own checks (e.g. a singular CD matrix) now, not in the fit
            return _shift_wcs(wcs, *xy0)
    except (ValueError, KeyError, TypeError, AttributeError, ArithmeticError) as error:
        msg = f"{label}: unusable WCS ({_one_line(error)}); fix its cards or remove them"
        raise FitsFormatError(msg) from error


def _wcs_cards(wcs, xy0):
    """FITS-WCS cards of a parent-coordinate WCS for an array whose element [0, 0] is ``xy0``."""
    from astropy.wcs import FITSFixedWarning

    if wcs is None:
        return []
    if not hasattr(wcs, "to_header"):
        msg = f"exposure.wcs must be an astropy.wcs.WCS or None, got {type(wcs).__name__}"
        raise ConfigurationError(msg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        header = _shift_wcs(wcs, -xy0[0], -xy0[1]).to_header(relax=True)
    return list(header.cards)


# ---------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------

@dataclass
class _Loaded:
    """Planes and headers read from the main file."""

    image: np.ndarray
    label: str
    header: object
    primary_header: object
    xy0: tuple
    primary_label: str = None
    wcs: object = None
    mask: np.ndarray = None
    mask_planes: dict = field(default_factory=dict)
    variance: np.ndarray = None
    psf: np.ndarray = None


def _load(hdus, path, hdu, overridden=frozenset()):
    """Read the main file: the LSST layout when ``hdu`` is None and it applies, else one image HDU.

    Headers are checked card by card (:func:`_clean_header`); ``overridden``
    names the keywords whose values the caller gave, which are then not read.
    """
    indices = _lsst_indices(hdus) if hdu is None else None
    index = indices[0] if indices else _hdu_index(hdus, hdu, path)
    if hdu is None and not indices and hdus[index].name.upper() in _LSST_NAMES[1:]:
        names = ", ".join(h.name for h in hdus)
        msg = f"{path} has a {hdus[index].name.upper()} HDU but no IMAGE HDU (HDUs: {names})"
        raise FitsFormatError(msg)
    image, label = _image_data(hdus, index, path)
    use_ltv = indices is not None
    header = _clean_header(hdus[index].header, label, _image_keys(hdus[index].header, overridden, use_ltv))
    _check_wcs_values(header, label)
    primary = None
    if index:
        primary = _clean_header(hdus[0].header, _label(path, hdus, 0),
                                lambda key: key in _VALUE_KEYWORDS and key not in overridden)
    loaded = _Loaded(image=image, label=label, header=header, primary_header=primary,
                     xy0=_read_xy0(header, use_ltv, label), primary_label=_label(path, hdus, 0))
    loaded.wcs = _read_wcs(header, hdus, loaded.xy0, label)
    loaded.mask_planes = dict(DEFAULT_MASK_PLANES)
    if indices and indices[1] is not None:
        loaded.mask, mask_label = _image_data(hdus, indices[1], path)
        _check_same_shape(loaded.mask, mask_label, image, label)
        if loaded.mask.dtype.kind not in "iub":
            msg = f"mask {mask_label} must hold integers, got {loaded.mask.dtype}"
            raise FitsFormatError(msg)
        mask_header = _clean_header(hdus[indices[1]].header, mask_label, _mask_keys)
        loaded.mask_planes = _mask_planes(mask_header, mask_label) or loaded.mask_planes
    if indices and indices[2] is not None:
        loaded.variance, variance_label = _image_data(hdus, indices[2], path)
        _check_same_shape(loaded.variance, variance_label, image, label)
    if indices and "PSF" in [h.name.upper() for h in hdus] and _has_data(hdus["PSF"]):
        loaded.psf, _ = _image_data(hdus, hdus.index_of("PSF"), path)
    return loaded


def _check_same_shape(array, label, image, image_label):
    if array.shape != image.shape:
        msg = f"{label} has shape {array.shape} but the image {image_label} has shape {image.shape}"
        raise ShapeError(msg)


def _read_source(spec, what):
    """``(array, header or None, label)`` from a path, ``"path[HDU]"``, ``(path, hdu)`` or an array."""
    if isinstance(spec, (str, os.PathLike, tuple)):
        path, hdu = _split_spec(spec, what=what)

        def reader(hdus):
            index = _hdu_index(hdus, hdu, path)
            data, label = _image_data(hdus, index, path)
            label = f"{what} {label}"
            return data, _clean_header(hdus[index].header, label, _mask_keys), label

        return _with_fits(path, reader)
    array = np.asarray(spec)
    if array.ndim != 2:
        msg = f"{what} array must be 2-D (rows, columns), got shape {array.shape}"
        raise ShapeError(msg)
    if array.dtype.kind not in "biuf":
        msg = f"{what} array must hold real numbers, got dtype {array.dtype}"
        raise InvalidImageError(msg)
    return _native(array), None, f"the {what} array"


def _variance_from(kind, array):
    """Variance and a NO_DATA selection from a variance, inverse-variance, weight or sigma map."""
    if kind == "variance":
        return array, array <= 0
    values = array.astype(np.float64)
    no_data = values <= 0
    if kind == "sigma":
        variance = np.where(no_data, 0.0, values * values)
    else:
        variance = np.zeros_like(values)
        np.divide(1.0, values, out=variance, where=values > 0)
        variance[np.isnan(values)] = np.nan
    return variance, no_data


def _log_flagged(selection, reason, label):
    count = int(np.count_nonzero(selection))
    if count:
        log.warning("%s: %d pixel(s) with %s flagged NO_DATA", label, count, reason)


def _gain_variance(image, gain, read_noise, mask_no_data, label):
    """``max(image, 0) / gain + (read_noise / gain)**2`` in ADU^2."""
    if read_noise is None:
        log.info("%s: gain %.6g e-/ADU but no read noise: variance from photon noise only", label, gain)
        read_noise = 0.0
    pixels = image.astype(np.float64)
    variance = np.maximum(pixels, 0.0) / gain + (read_noise / gain) ** 2
    zero = (variance <= 0) & np.isfinite(pixels) & ~mask_no_data
    if np.any(zero):
        msg = (f"{label}: gain {gain:.6g} e-/ADU with read noise {read_noise:.6g} e- gives zero "
               f"variance on {int(np.count_nonzero(zero))} pixel(s) at or below 0 ADU; "
               f"pass read_noise= or a variance, sigma or weight map")
        raise InvalidVarianceError(msg)
    return variance


def _add_plane(planes, name):
    """Bit of plane ``name``, adding it at the next free bit when missing."""
    if name not in planes:
        used = set(planes.values())
        bit = max(used, default=-1) + 1
        if bit > 31:
            free = [b for b in range(32) if b not in used]
            if not free:
                msg = f"no free mask bit for plane {name!r}: all 32 bits are in use"
                raise InvalidImageError(msg)
            bit = free[0]
        planes[name] = bit
    return planes[name]


def _merge_mask(mask, planes, extra, header, label):
    """OR a separate mask into ``mask``: by plane name if it has MP_ cards, else nonzero -> BAD."""
    source_planes = _mask_planes(header, label) if header is not None else {}
    if not source_planes:
        mask[extra != 0] |= 1 << _add_plane(planes, "BAD")
        return
    if extra.dtype.kind not in "iub":
        msg = f"{label} has MP_ mask-plane cards but holds {extra.dtype} values, not integers"
        raise FitsFormatError(msg)
    bits = extra.astype(np.int64) & 0xFFFFFFFF
    named = 0
    for name, bit in source_planes.items():
        mask |= ((bits >> bit) & 1) << _add_plane(planes, name)
        named |= 1 << bit
    mask[(bits & ~named) != 0] |= 1 << _add_plane(planes, "BAD")


def _to_int32(mask):
    return (mask & 0xFFFFFFFF).astype(np.uint32).view(np.int32)


def _number_argument(name, value, bound=""):
    """``float(value)``, or None; ``bound`` is "", "> 0" or ">= 0"."""
    if value is None:
        return None
    ok = _is_number(value) and (bound != "> 0" or value > 0) and (bound != ">= 0" or value >= 0)
    if not ok:
        msg = f"{name} must be a finite number{' ' + bound if bound else ''}, got {value!r}"
        raise ConfigurationError(msg)
    return float(value)


def _read_psf(psf):
    array, _, label = _read_source(psf, "psf")
    if array.shape[0] != array.shape[1] or array.shape[0] % 2 == 0:
        msg = f"PSF image {label} must be an odd square array, got shape {array.shape}"
        raise ShapeError(msg)
    return array.astype(np.float64)


def read_exposure(path, *, hdu=None, variance=None, inverse_variance=None, sigma=None, mask=None,
                  weight=None, gain=None, read_noise=None, saturation=None, psf=None,
                  psf_fwhm_pix=None) -> Exposure:
    """Read an image, its mask, variance, WCS and metadata from FITS.

    Parameters
    ----------
    path : str or os.PathLike
        FITS file in the LSST layout or a plain image (see the module notes).
        ``"file.fits[SCI]"`` or ``"file.fits[1]"`` selects an HDU, like ``hdu``.
    hdu : int, str or (str, int), optional
        Index, EXTNAME or (EXTNAME, EXTVER) of the image HDU.  Given, the file
        is read as a plain image even if it has the LSST layout.
    variance, inverse_variance, sigma, weight : path, (path, hdu) or ndarray, optional
        At most one per-pixel noise map (a path may end in ``[HDU]``;
        otherwise its first image HDU with data is read); it overrides the
        file's VARIANCE plane.  ``variance`` is used as it is (image units
        squared).  ``sigma`` (1-sigma error, e.g. a JWST ERR map) is squared.
        ``inverse_variance`` and ``weight`` are inverted (a weight map is
        taken as inverse variance, SWarp's MAP_WEIGHT; rescale it afterwards
        if it is only relative).  Pixels where the map (or the file's
        VARIANCE plane) is <= 0 are flagged NO_DATA, with a log WARNING
        giving the count when they were not NO_DATA already; NaN gives NaN
        variance, hence NO_DATA with a :class:`~gpudiffim.NoDataWarning`.
    mask : path, (path, hdu) or ndarray, optional
        Mask ORed into the file's mask.  If the mask HDU has ``MP_<NAME>``
        cards it is an LSST bit mask: each named bit is set in the plane of
        that name (added when missing) and unnamed bits set BAD.  Otherwise
        (arrays included) every nonzero or NaN pixel is flagged BAD.
    gain : float, optional
        e-/ADU; overrides the header (:data:`GAIN_KEYWORDS`).
    read_noise : float, optional
        Electrons; overrides the header (:data:`READ_NOISE_KEYWORDS`).
    saturation : float, optional
        ADU; overrides the header (:data:`SATURATION_KEYWORDS`).  Pixels
        ``>= saturation`` are flagged SAT.
    psf : path, (path, hdu) or ndarray, optional
        PSF image (odd square, e.g. a WebbPSF file).  Without it, the PSF HDU
        that :func:`write_exposure` writes is read.
    psf_fwhm_pix : float, optional
        PSF FWHM in pixels.  Without it, the header's ``FWHM`` card is used
        unless its comment mentions arcsec, or a ``SEEING`` card whose
        comment mentions pixels.

    Returns
    -------
    Exposure
        Image float32/float64 as stored (integer images become float64).
        Without a variance plane or map, the variance is, in ADU^2,

        .. math:: V = \\max(I, 0) / g + (r / g)^2

        with gain ``g`` (e-/ADU) and read noise ``r`` (e-; 0 when unknown)
        when a gain is known, else the constant square of the robust (MAD)
        sky noise of the image (logged at INFO).  ``info`` holds gain, read
        noise, saturation, filter (:data:`FILTER_KEYWORDS`), date
        (``DATE-OBS`` [+ ``TIME-OBS``], else ``MJD-OBS`` as ISO UTC), zero
        point (:data:`ZERO_POINT_KEYWORDS`) and the primary and image
        header cards as a dict (structural and commentary cards left out).

    Raises
    ------
    FileNotFoundError
        If ``path`` or a map file does not exist.
    FitsFormatError
        If a file is not readable FITS (not FITS, truncated, corrupted), an
        HDU is missing, not an image or empty, the data are not 2-D, a
        header card gpudiffim reads cannot be parsed or has a value of the
        wrong type (the message names the file, HDU and keyword; for the
        gain, read noise and saturation, passing the value as an argument
        bypasses the card), astropy rejects the WCS (see the module
        notes), or the LSST layout has MASK or VARIANCE but no IMAGE HDU.
    InvalidImageError
        If the pixels hold no data (all non-finite, or a constant image
        without a variance); the message starts with the image HDU and file.
    ShapeError
        If a map's shape differs from the image's (both shapes are named).
    ConfigurationError
        For more than one noise map or an invalid argument value.
    InvalidVarianceError
        If a gain without read noise gives zero variance on pixels <= 0.

    Warns
    -----
    NoDataWarning
        If pixels are NaN or infinite: they are flagged NO_DATA.

    Examples
    --------
    >>> exposure = read_exposure("science.fits", sigma="science.noise.fits[ERR]")  # doctest: +SKIP
    """
    path, hdu = _split_spec(path, hdu)
    sources = {name: value for name, value in zip(_VARIANCE_SOURCES, (variance, inverse_variance, sigma,
                                                                     weight)) if value is not None}
    if len(sources) > 1:
        msg = f"pass at most one of variance, inverse_variance, sigma and weight; got {', '.join(sources)}"
        raise ConfigurationError(msg)
    gain = _number_argument("gain", gain, "> 0")
    read_noise = _number_argument("read_noise", read_noise, ">= 0")
    saturation = _number_argument("saturation", saturation)
    psf_fwhm_pix = _number_argument("psf_fwhm_pix", psf_fwhm_pix, "> 0")
    overridden = {key for keys, value in ((GAIN_KEYWORDS, gain), (READ_NOISE_KEYWORDS, read_noise),
                                          (SATURATION_KEYWORDS, saturation)) if value is not None
                  for key in keys}
    loaded = _with_fits(path, lambda hdus: _load(hdus, path, hdu, overridden))
    headers = [(loaded.header, loaded.label)]
    if loaded.primary_header is not None:
        headers.append((loaded.primary_header, loaded.primary_label))
    if gain is None:
        gain = _header_number(headers, GAIN_KEYWORDS, "gain", "gain", lambda v: v > 0,
                              "not positive, so the gain is taken as unknown")
    if read_noise is None:
        read_noise = _header_number(headers, READ_NOISE_KEYWORDS, "read noise", "read_noise",
                                    lambda v: v >= 0, "negative, so the read noise is taken as unknown")
    if saturation is None:
        saturation = _header_number(headers, SATURATION_KEYWORDS, "saturation level", "saturation",
                                    lambda v: v > 0, "not positive, so no SAT flags are set from it")
    try:
        masked = _assemble(loaded, sources, mask, gain, read_noise, saturation)
        psf_image = _read_psf(psf) if psf is not None else loaded.psf
        info = ExposureInfo(gain=gain, read_noise=read_noise, saturation=saturation,
                            filter=_header_optional(headers, FILTER_KEYWORDS, "string"),
                            date=_header_date(headers),
                            zero_point=_header_optional(headers, ZERO_POINT_KEYWORDS, "number"),
                            header=_header_dict([header for header, _ in headers[::-1]]))
        return Exposure(masked, wcs=loaded.wcs, psf_fwhm_pix=psf_fwhm_pix or _header_fwhm(headers),
                        psf_image=psf_image, info=info)
    except GpudiffimError as error:
        raise _naming(error, path, loaded.label) from error


def _naming(error, path, label):
    """``error``, or one of its class whose message starts with ``label`` when it does not name ``path``."""
    if path in str(error):
        return error
    return type(error)(f"{label}: {error}")


def _assemble(loaded, sources, mask, gain, read_noise, saturation):
    """The MaskedImage: noise map, extra mask, SAT and NO_DATA flags on the file's planes."""
    image, label = loaded.image, loaded.label
    planes = dict(loaded.mask_planes)
    bits = np.zeros(image.shape, dtype=np.int64) if loaded.mask is None else (
        loaded.mask.astype(np.int64) & 0xFFFFFFFF)
    variance = loaded.variance
    no_data = np.zeros(image.shape, dtype=bool)
    if "NO_DATA" in planes:
        no_data |= (bits & (1 << planes["NO_DATA"])) != 0
    if sources:
        (kind, spec), = sources.items()
        array, _, source_label = _read_source(spec, kind)
        _check_same_shape(array, source_label, image, label)
        variance, flagged = _variance_from(kind, array)
        _log_flagged(flagged & ~no_data, f"{kind} <= 0", source_label)
        no_data |= flagged
    elif variance is not None:
        _log_flagged((variance <= 0) & ~no_data, "variance <= 0", label)
        no_data |= variance <= 0
    elif gain is not None:
        variance = _gain_variance(image, gain, read_noise, no_data, label)
    else:
        log.info("%s: no variance map and no gain: constant variance from the robust (MAD) sky noise",
                 label)
    if mask is not None:
        extra, extra_header, extra_label = _read_source(mask, "mask")
        _check_same_shape(extra, extra_label, image, label)
        _merge_mask(bits, planes, extra, extra_header, extra_label)
    if saturation is not None:
        with np.errstate(invalid="ignore"):
            bits[image >= saturation] |= 1 << _add_plane(planes, "SAT")
    if np.any(no_data):
        bits[no_data] |= 1 << _add_plane(planes, "NO_DATA")
    return MaskedImage(image, _to_int32(bits), variance, xy0=loaded.xy0, mask_planes=planes)


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------

def _card_key(key, what):
    """Upper-cased FITS keyword, with a HIERARCH prefix when it is not a standard 8-character key."""
    if not isinstance(key, str):
        msg = f"{what} keys must be strings, got {key!r}"
        raise ConfigurationError(msg)
    name = key.strip().upper()
    if name.startswith("HIERARCH "):
        name = name[len("HIERARCH "):].strip()
    if not name or len(name) > _MAX_KEY_LENGTH or "=" in name or not re.fullmatch(r"[ -~]+", name):
        msg = (f"invalid {what} keyword {key!r}: expected 1 to {_MAX_KEY_LENGTH} printable ASCII "
               f"characters without '='")
        raise ConfigurationError(msg)
    if _is_reserved(name):
        msg = f"{what} keyword {key!r} is reserved by the FITS format"
        raise ConfigurationError(msg)
    return name if _SHORT_KEY.fullmatch(name) else f"HIERARCH {name}"


def _ascii(text, key):
    text = "".join(c if " " <= c <= "~" else ("?" if c not in "\t\n\r" else " ") for c in text)
    if len(text) > MAX_STRING_LENGTH:
        log.info("header card %s: string of %d characters truncated to %d", key, len(text),
                 MAX_STRING_LENGTH)
        text = text[:MAX_STRING_LENGTH - 3] + "..."
    return text


def _card_value(value, key):
    """A FITS-compatible value: bool, int, float, or an ASCII string (None -> skip)."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        value = int(value)
        return value if -(2**63) <= value < 2**63 else str(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else str(value)
    if not isinstance(value, str):
        try:
            value = json.dumps(value.tolist() if isinstance(value, np.ndarray) else value)
        except (TypeError, ValueError):
            value = str(value)
    return _ascii(value, key)


def _set_card(header, key, value, comment=None):
    """Set a card, shortening the comment so that a one-card value still fits in 80 characters."""
    from astropy.io import fits

    if comment:
        comment = _ascii(str(comment), key)
        image = fits.Card(key, value).image
        if len(image) <= 80:
            room = 80 - len(image.rstrip()) - 3
            comment = comment[:room] if room > 0 else None
    header[key] = (value, comment) if comment else value


def _add_cards(header, items, what, lenient=False):
    """Add ``(key, value[, comment])`` items to an astropy header after validation.

    ``lenient``: leave out (and log) reserved or invalid keywords instead of raising.
    """
    for item in items:
        key, value = item[0], item[1]
        if isinstance(key, str) and key.strip().upper() in ("COMMENT", "HISTORY"):
            adder = header.add_comment if key.strip().upper() == "COMMENT" else header.add_history
            for line in (value if isinstance(value, (list, tuple)) else [value]):
                adder(_ascii(str(line), key))
            continue
        if lenient and isinstance(key, str) and _is_reserved(key.strip().upper()):
            log.debug("%s card %s left out: the writer sets it", what, key)
            continue
        try:
            card_key = _card_key(key, what)
        except ConfigurationError as error:
            if not lenient:
                raise
            log.warning("%s left out", error)
            continue
        if value is not None:
            _set_card(header, card_key, _card_value(value, card_key), item[2] if len(item) > 2 else None)


def _header_items(header):
    """Items of a user header: an astropy Header (comments kept) or a mapping (value or (value, comment))."""
    if header is None:
        return []
    if hasattr(header, "cards"):
        return [(card.keyword, _plain_value(card.value), card.comment) for card in header.cards
                if card.keyword not in ("", "COMMENT", "HISTORY")]
    if not hasattr(header, "items"):
        msg = f"header must be a mapping or an astropy Header, got {type(header).__name__}"
        raise ConfigurationError(msg)
    items = []
    for key, value in header.items():
        if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], str):
            items.append((key, value[0], value[1]))
        else:
            items.append((key, value))
    return items


def _info_items(exposure):
    info = exposure.info
    items = [("GAIN", info.gain, "gain (e-/ADU)"), ("RDNOISE", info.read_noise, "read noise (e-)"),
             ("SATURATE", info.saturation, "saturation level (ADU)"), ("FILTER", info.filter, "filter"),
             ("DATE-OBS", info.date, "observation date"),
             ("MAGZERO", info.zero_point, "magnitude of 1 ADU"),
             ("FWHM", exposure.psf_fwhm_pix, "PSF FWHM in pixels")]
    return [item for item in items if item[1] is not None]


def _background_items(background):
    """Header items of a BackgroundModel (or a sequence of coefficients)."""
    function = getattr(background, "spatial_function", None)
    try:
        coefficients = np.atleast_1d(np.asarray(getattr(background, "coefficients", background),
                                                dtype=np.float64)).ravel()
    except (TypeError, ValueError) as error:
        msg = f"background must be a BackgroundModel or a sequence of numbers ({_one_line(error)})"
        raise ConfigurationError(msg) from None
    items = [("BGNCOEF", coefficients.size, "number of differential-background coefficients")]
    if function is not None:
        items += [("BGMODEL", function.model_type, "background spatial model"),
                  ("BGORDER", function.order, "background spatial order")]
        items += [(f"BGBBOX{i}", int(v), "background box x0 y0 x1 y1 (parent px)")
                  for i, v in enumerate(function.bbox)]
    items += [(f"BGC{i}", float(c), f"background coefficient {i}") for i, c in enumerate(coefficients)]
    return items


def _read_only(array):
    """Read-only host view of a plane (CuPy planes are copied to the host)."""
    view = to_host(array).view()
    view.flags.writeable = False
    return view


def _kernel_hdu(kernel, masked_image):
    """KERNEL HDU: a SpatialKernel realised at the image centre, or a 2-D kernel array."""
    from astropy.io import fits

    x0, y0, x1, y1 = masked_image.bbox()
    xc, yc = 0.5 * (x0 + x1), 0.5 * (y0 + y1)
    if callable(getattr(kernel, "image", None)):
        image = np.asarray(kernel.image(xc, yc), dtype=np.float64)
    else:
        image = np.asarray(kernel, dtype=np.float64)
    if image.ndim != 2:
        msg = f"kernel must be a SpatialKernel or a 2-D array, got shape {image.shape}"
        raise ShapeError(msg)
    hdu = fits.ImageHDU(_read_only(image), name="KERNEL")
    hdu.header["KERNX"] = (xc, "parent x where the kernel is realised")
    hdu.header["KERNY"] = (yc, "parent y where the kernel is realised")
    hdu.header["KSUM"] = (float(image.sum()), "kernel sum at (KERNX, KERNY)")
    if hasattr(kernel, "n_basis") and hasattr(kernel, "spatial_function"):
        hdu.header["NBASIS"] = (kernel.n_basis, "number of basis kernels")
        hdu.header["KSPORDER"] = (kernel.spatial_function.order, "kernel spatial order")
        hdu.header["KSPMODEL"] = (kernel.spatial_function.model_type, "kernel spatial model")
    return hdu


def _table_hdus(tables, taken):
    """Binary-table HDUs of a ``{name: Table}`` mapping, with the tables' meta as cards."""
    from astropy.io import fits
    from astropy.table import Table

    if tables is None:
        return []
    if not hasattr(tables, "items"):
        msg = f"tables must be a mapping of HDU name to astropy Table, got {type(tables).__name__}"
        raise ConfigurationError(msg)
    hdus = []
    taken = {name.upper() for name in taken}
    for name, table in tables.items():
        if table is None:
            continue
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]{0,67}", name) \
                or name.upper() in taken:
            msg = f"invalid or duplicate table HDU name {name!r}"
            raise ConfigurationError(msg)
        taken.add(name.upper())
        bare = Table(table, copy=False)
        bare.meta = {}
        hdu = fits.table_to_hdu(bare)
        hdu.name = name.upper()
        for k, column in enumerate(bare.columns.values(), start=1):
            if column.description:
                _set_card(hdu.header, f"TCOMM{k}", _ascii(column.description, f"TCOMM{k}"))
        _add_cards(hdu.header, list(getattr(table, "meta", {}).items()), f"table {name} meta")
        hdus.append(hdu)
    return hdus


def _with_sources(tables, sources):
    """``tables`` with the ``SOURCES`` table added (``tables`` as given when there are no sources)."""
    if sources is None:
        return tables
    if not hasattr(sources, "colnames"):
        msg = f"sources must be an astropy Table, got {type(sources).__name__}"
        raise ConfigurationError(msg)
    if tables is None:
        return {SOURCES_HDU: sources}
    if not hasattr(tables, "items"):
        return tables                                   # _table_hdus names the error
    if any(isinstance(name, str) and name.upper() == SOURCES_HDU for name in tables):
        msg = f"the sources were given twice: as sources= and as tables[{SOURCES_HDU!r}]"
        raise ConfigurationError(msg)
    return {**tables, SOURCES_HDU: sources}


def read_sources(path):
    """Read the ``SOURCES`` table that :func:`write_exposure` wrote with a difference image.

    Parameters
    ----------
    path : str or os.PathLike
        A file written by :func:`write_exposure` or :func:`write_masked_image`
        with ``sources``.

    Returns
    -------
    astropy.table.Table
        The columns with their units and descriptions (from ``TUNITn`` and
        ``TCOMMn``), and ``meta`` holding the table's header cards other
        than the FITS table structure (the detection settings, ``FPFRAC``,
        ``BADSUB``, ...).

    Raises
    ------
    FitsFormatError
        If the file is not readable FITS or has no ``SOURCES`` binary table.
    FileNotFoundError
        If ``path`` does not exist.
    """
    path = os.fspath(path)
    return _with_fits(path, lambda hdus: _sources_from(hdus, path))


def _sources_from(hdus, path):
    from astropy.io import fits
    from astropy.table import Table

    matches = [hdu for hdu in hdus if hdu.name.upper() == SOURCES_HDU]
    if not matches or not isinstance(matches[0], fits.BinTableHDU):
        names = [hdu.name for hdu in hdus]
        msg = f"{path} has no {SOURCES_HDU} binary-table HDU (HDUs: {names})"
        raise FitsFormatError(msg)
    hdu = matches[0]
    table = Table.read(hdu, format="fits", character_as_bytes=False)
    for k, (name, column) in enumerate(list(table.columns.items()), start=1):
        if not column.dtype.isnative:                   # FITS is big-endian; CuPy and friends want native
            table.replace_column(name, column.astype(column.dtype.newbyteorder("=")), copy=False)
            column = table[name]
        comment = hdu.header.get(f"TCOMM{k}")
        if comment is not None:
            column.description = str(comment)
        table.meta.pop(f"TCOMM{k}", None)
    table.meta.pop("EXTNAME", None)
    return table


def _plane_hdus(masked_image, wcs=None):
    """IMAGE, MASK and VARIANCE HDUs with WCS, A-WCS, LTV and MP_ cards."""
    from astropy.io import fits

    x0, y0 = masked_image.xy0
    wcs_cards = _wcs_cards(wcs, (x0, y0))
    hdus = []
    for name, data in zip(_LSST_NAMES, (masked_image.image, masked_image.mask, masked_image.variance)):
        hdu = fits.ImageHDU(_read_only(data), name=name)
        header = hdu.header
        header["EXTTYPE"] = name
        header.extend(wcs_cards)
        for axis, origin in ((1, x0), (2, y0)):
            header[f"CRPIX{axis}A"] = (1, "afw pixel origin (A WCS)")
            header[f"CRVAL{axis}A"] = (origin, "parent pixel of the first array pixel")
            header[f"CTYPE{axis}A"] = "LINEAR"
            header[f"CUNIT{axis}A"] = "PIXEL"
        header["LTV1"], header["LTV2"] = -x0, -y0
        if name == "MASK":
            for plane, bit in sorted(masked_image.mask_planes.items(), key=lambda kv: kv[1]):
                header[f"HIERARCH MP_{plane.upper()}"] = bit
        hdus.append(hdu)
    return hdus


def _umask():
    with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/self/status",
                                                                    encoding="ascii") as status:
        for line in status:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_atomic(path, hdulist, overwrite):
    """Write ``hdulist`` to a temporary file next to ``path``, then move it into place."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, "output is a folder", path)
    if os.path.exists(path) and not overwrite:
        msg = f"{path} exists; pass overwrite=True to replace it"
        raise FileExistsError(msg)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(errno.ENOENT, "output folder does not exist", folder)
    handle, temporary = tempfile.mkstemp(prefix=".gpudiffim-", suffix=".fits.tmp", dir=folder)
    os.close(handle)
    try:
        hdulist.writeto(temporary, overwrite=True)
        os.chmod(temporary, 0o666 & ~_umask())
        if overwrite:
            os.replace(temporary, path)
        else:
            _link_new(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)


def _link_new(temporary, path):
    """Give ``temporary`` the name ``path`` without replacing an existing file."""
    try:
        os.link(temporary, path)
    except FileExistsError:
        msg = f"{path} exists; pass overwrite=True to replace it"
        raise FileExistsError(msg) from None
    except OSError:  # no hard links on this file system: check, then rename
        if os.path.exists(path):
            msg = f"{path} exists; pass overwrite=True to replace it"
            raise FileExistsError(msg) from None
        os.replace(temporary, path)


def _hdulist(masked_image, wcs, primary_items, extra_hdus=()):
    from astropy.io import fits

    primary = fits.PrimaryHDU()
    for items, what in primary_items:
        _add_cards(primary.header, items, what, lenient=what == "header")
    return fits.HDUList([primary, *_plane_hdus(masked_image, wcs), *extra_hdus])


def write_masked_image(path, masked_image, header=None, overwrite=False, *, sources=None):
    """Write a :class:`~gpudiffim.MaskedImage` to FITS in the LSST layout, atomically.

    Parameters
    ----------
    path : str or os.PathLike
        Output file.
    masked_image : MaskedImage
    header : mapping or astropy.io.fits.Header, optional
        Extra primary-header cards (e.g. provenance), written as the
        ``header`` of :func:`write_exposure`.
    overwrite : bool
        Replace an existing file.
    sources : astropy.table.Table, optional
        Sources detected on the image, written as a ``SOURCES`` binary-table
        HDU as by :func:`write_exposure`.

    Raises
    ------
    FileExistsError
        If ``path`` exists and ``overwrite`` is False (the file is untouched).
    ConfigurationError
        If ``sources`` is not an astropy Table.
    """
    if not isinstance(masked_image, MaskedImage):
        msg = f"masked_image must be a MaskedImage, got {type(masked_image).__name__}"
        raise TypeError(msg)
    hdulist = _hdulist(masked_image, None, [(_header_items(header), "header")],
                       _table_hdus(_with_sources(None, sources), _LSST_NAMES))
    _write_atomic(path, hdulist, overwrite)


def write_exposure(path, exposure, *, header=None, kernel=None, background=None, provenance=None,
                   tables=None, sources=None, overwrite=False):
    """Write an :class:`~gpudiffim.Exposure` to FITS in the LSST layout, atomically.

    :func:`read_exposure` reads the file back exactly: image, mask, variance,
    mask planes, ``xy0``, WCS, PSF image and ``info`` fields.

    Parameters
    ----------
    path : str or os.PathLike
        Output file.
    exposure : Exposure
    header : mapping or astropy.io.fits.Header, optional
        Extra primary-header cards; a mapping value may be ``(value, comment)``.
        Pass ``exposure.info.header`` to carry the input's cards over.
        Values are written as for ``provenance``; cards the writer manages
        (``SIMPLE``, ``BITPIX``, ``NAXIS*``, ``BZERO``, ``EXTNAME``, ...) and
        invalid keywords are left out (the latter with a log WARNING), so a
        header read from another file can be passed as it is.
    kernel : SpatialKernel or ndarray, optional
        Written as a ``KERNEL`` image HDU: a SpatialKernel realised at the
        image centre (``KERNX``, ``KERNY`` cards, parent pixels), with its
        sum (``KSUM``), number of bases and spatial order and model.
    background : BackgroundModel or sequence of float, optional
        Primary-header cards ``BGNCOEF`` (count), ``BGMODEL``, ``BGORDER``,
        ``BGBBOX0..3`` (spatial model and box) and ``BGC0``, ``BGC1``, ...
        (coefficients, in the model's term order).
    provenance : mapping, optional
        Primary-header cards.  Keys are upper-cased; keys longer than 8
        characters or with characters outside ``A-Z0-9_-`` become HIERARCH
        cards (at most 40 characters).  bool, int and float values are
        written as such (NaN/inf as strings), strings as ASCII (non-ASCII
        characters become ``?``; long strings use CONTINUE cards and are cut
        to :data:`MAX_STRING_LENGTH` characters ending in ``...``), other
        values as JSON (or ``str``); ``None`` values are skipped.
    tables : mapping of str to astropy.table.Table, optional
        Each written as a binary-table HDU of that name (e.g.
        ``{"QUALITY": result.quality}``), after the other HDUs; ``None``
        tables are skipped.  The table ``meta`` becomes header cards as for
        ``provenance`` (long keys as HIERARCH cards, lists as JSON strings);
        column units and descriptions go to ``TUNITn`` and ``TCOMMn``.
        ``astropy.table.Table.read(path, hdu=name)`` reads a table back.
    sources : astropy.table.Table, optional
        Sources detected on the difference (:func:`gpudiffim.sources.detect_sources`),
        written as a ``SOURCES`` binary-table HDU like ``tables`` (column
        units in ``TUNITn``, descriptions in ``TCOMMn``, the detection
        settings and the bad-subtraction flag of its ``meta`` as cards);
        :func:`read_sources` reads it back.
    overwrite : bool
        Replace an existing file.

    Notes
    -----
    The primary header also receives ``GAIN``, ``RDNOISE``, ``SATURATE``,
    ``FILTER``, ``DATE-OBS``, ``MAGZERO`` and ``FWHM`` from ``exposure``
    where known; ``header`` then ``background`` then ``provenance`` cards
    override them.  A PSF image is written as a ``PSF`` HDU.

    Raises
    ------
    FileExistsError
        If ``path`` exists and ``overwrite`` is False (the file is untouched).
    ConfigurationError
        For an invalid or reserved ``provenance`` keyword (``SIMPLE``,
        ``BITPIX``, ``NAXIS*``, ``BZERO``, ``EXTNAME``, ...), a non-numeric
        background, a table name that is not a new FITS extension name, or
        ``sources`` given both as ``sources`` and in ``tables`` or not a Table.
    ShapeError
        If ``kernel`` is not 2-D.
    """
    from astropy.io import fits

    if not isinstance(exposure, Exposure):
        msg = f"exposure must be an Exposure, got {type(exposure).__name__}"
        raise TypeError(msg)
    extra = []
    if exposure.psf_image is not None:
        extra.append(fits.ImageHDU(_read_only(exposure.psf_image), name="PSF"))
    if kernel is not None:
        extra.append(_kernel_hdu(kernel, exposure.masked_image))
    extra += _table_hdus(_with_sources(tables, sources), [*_LSST_NAMES, *(hdu.name for hdu in extra)])
    if provenance is not None and not hasattr(provenance, "items"):
        msg = f"provenance must be a mapping, got {type(provenance).__name__}"
        raise ConfigurationError(msg)
    items = [(_info_items(exposure), "exposure info"), (_header_items(header), "header"),
             (_background_items(background) if background is not None else [], "background"),
             (list((provenance or {}).items()), "provenance")]
    hdulist = _hdulist(exposure.masked_image, exposure.wcs, items, extra)
    _write_atomic(path, hdulist, overwrite)
