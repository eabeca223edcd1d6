"""Registration of a template exposure onto the science exposure's pixel grid.

Follows the legacy ``ImagePsfMatchTask._validateWcs``: if both exposures are on
the same grid, or one has no WCS (then both are taken to be in one parent pixel
frame, and the task matches them on their overlap), nothing is done; otherwise the template is warped onto the
science WCS and bounding box (Lanczos-3, see :mod:`gpudiffim.warp`), unless
warping is disabled, which is then an error.  Fields that do not overlap at
all are an error.
"""

import logging

from .errors import RegistrationError
from .exposure import Exposure
from .warp import same_grid, warp_masked_image, wcs_overlap

__all__ = ["check_exposures", "register_template"]

log = logging.getLogger(__name__)


def _grid(exposure):
    image = exposure.masked_image
    return exposure.wcs, image.shape, image.xy0


def check_exposures(template, science):
    """Raise :class:`TypeError` unless ``template`` and ``science`` are both :class:`Exposure`."""
    for name, value in (("template", template), ("science", science)):
        if not isinstance(value, Exposure):
            msg = f"{name} must be a gpudiffim Exposure, got {type(value).__name__}"
            raise TypeError(msg)


def register_template(template, science, *, do_warping=True):
    """The template on the science grid: the template itself, or a warped copy.

    Parameters
    ----------
    template, science : Exposure
    do_warping : bool
        Allow warping when the grids differ.

    Returns
    -------
    Exposure
        The template on the science pixel grid (science WCS and ``xy0``).
    warped : bool
        Whether a warp was done.

    Raises
    ------
    RegistrationError
        If the grids differ and ``do_warping`` is False, or if the fields do
        not overlap.  Without a WCS on either exposure both are taken to be
        in one parent pixel frame; images placed differently there are
        matched on their overlap by the task.
    """
    check_exposures(template, science)
    t_image, s_image = template.masked_image, science.masked_image
    if template.wcs is None or science.wcs is None:
        log.info("an exposure has no WCS: assuming both are in one parent pixel frame (xy0)")
        return template, False
    if same_grid(*_grid(template), *_grid(science)):
        return template, False
    if not do_warping:
        msg = "template and science WCSs differ and do_warping=False: warp the template or enable warping"
        raise RegistrationError(msg)
    coverage = wcs_overlap(*_grid(template), *_grid(science))
    if coverage <= 0:
        msg = "template and science exposures do not overlap on the sky"
        raise RegistrationError(msg)
    log.info("warping the template onto the science grid (Lanczos-3); it covers %.1f %% of the science "
             "image", 100 * coverage)
    warped = warp_masked_image(t_image, template.wcs, science.wcs, s_image.shape, s_image.xy0)
    return Exposure(warped, wcs=science.wcs, psf_fwhm_pix=template.fwhm(), info=template.info), True
