"""FITS output of masked images in the LSST layout.

Layout: an empty primary HDU, then IMAGE, MASK and VARIANCE image HDUs; the
mask-plane names are recorded as ``MP_<NAME> = bit`` keywords of the MASK HDU
and the parent origin as ``LTV1 = -x0``, ``LTV2 = -y0`` (as ``afw`` writes
them).  Files are written atomically: to a temporary file in the target
folder, then renamed, so a failed write never leaves a truncated file.
"""

import os
import tempfile

import numpy as np

__all__ = ["write_masked_image"]


def _hdus(masked_image, header):
    from astropy.io import fits

    primary = fits.PrimaryHDU()
    for key, value in (header or {}).items():
        primary.header[key] = value
    hdus = [primary]
    x0, y0 = masked_image.xy0
    for name, data in (("IMAGE", masked_image.image), ("MASK", masked_image.mask),
                       ("VARIANCE", masked_image.variance)):
        hdu = fits.ImageHDU(np.asarray(data), name=name)
        hdu.header["LTV1"], hdu.header["LTV2"] = -x0, -y0
        if name == "MASK":
            for plane, bit in sorted(masked_image.mask_planes.items(), key=lambda kv: kv[1]):
                hdu.header[f"HIERARCH MP_{plane}"] = bit
        hdus.append(hdu)
    return fits.HDUList(hdus)


def write_masked_image(path, masked_image, header=None, overwrite=False):
    """Write a :class:`~gpudiffim.MaskedImage` to FITS, atomically.

    Parameters
    ----------
    path : str or os.PathLike
        Output file.
    masked_image : MaskedImage
    header : mapping, optional
        Extra primary-header keywords (e.g. provenance).
    overwrite : bool
        Replace an existing file.

    Raises
    ------
    FileExistsError
        If ``path`` exists and ``overwrite`` is False.
    """
    path = os.fspath(path)
    if os.path.exists(path) and not overwrite:
        msg = f"{path} exists; pass overwrite=True to replace it"
        raise FileExistsError(msg)
    folder = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(suffix=".fits", dir=folder)
    os.close(handle)
    try:
        _hdus(masked_image, header).writeto(temporary, overwrite=True)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
