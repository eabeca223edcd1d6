"""Exceptions and warnings raised by gpudiffim.

Every error subclasses :class:`GpudiffimError` and the builtin it refines, so
``except ValueError`` in calling code keeps working.  All classes pickle
(they only carry their message), so they cross process boundaries intact.
"""

import numpy as np

__all__ = [
    "GpudiffimError",
    "ConfigurationError",
    "ShapeError",
    "FitsFormatError",
    "RegistrationError",
    "InvalidImageError",
    "InvalidVarianceError",
    "NoKernelCandidatesError",
    "SingularSystemError",
    "BackendUnavailableError",
    "MissingDependencyError",
    "GpudiffimWarning",
    "NoDataWarning",
    "FitQualityWarning",
    "BadSubtractionWarning",
]


class GpudiffimError(Exception):
    """Base class of every gpudiffim error."""


class ConfigurationError(GpudiffimError, ValueError):
    """A configuration field or an argument has an invalid value."""


class ShapeError(GpudiffimError, ValueError):
    """Arrays have the wrong number of dimensions or mismatched shapes."""


class RegistrationError(GpudiffimError, ValueError):
    """Two images cannot be put on one pixel grid.

    A WCS is missing or unusable, the fields do not overlap, or warping is
    disabled while the grids differ.
    """


class FitsFormatError(GpudiffimError, ValueError):
    """A file is not readable FITS or lacks the expected image data.

    Raised for files that are not FITS or are truncated or corrupted, a
    missing or non-image HDU, an HDU without data, an array that is not 2-D,
    a header card gpudiffim reads (gain, read noise, saturation, WCS, XY0,
    mask planes) that cannot be parsed or has the wrong type, and a WCS that
    astropy rejects; the message names the file, the HDU and the keyword.
    """


class InvalidImageError(GpudiffimError, ValueError):
    """Pixel data unusable as given: wrong dtype, byte order, or no good pixel."""


class InvalidVarianceError(InvalidImageError):
    """A variance plane holds zero or negative values on unmasked pixels."""


class NoKernelCandidatesError(GpudiffimError, RuntimeError):
    """Too few usable kernel candidates to fit the PSF-matching kernel."""


class SingularSystemError(GpudiffimError, np.linalg.LinAlgError):
    """A normal-equation system is singular or too ill-conditioned to solve."""


class BackendUnavailableError(GpudiffimError, RuntimeError):
    """The requested compute backend cannot be used on this machine."""


class MissingDependencyError(GpudiffimError, ImportError):
    """An optional dependency is not installed; the message says how to install it."""


class GpudiffimWarning(UserWarning):
    """Base class of every gpudiffim warning."""


class NoDataWarning(GpudiffimWarning):
    """Non-finite input pixels were flagged NO_DATA and excluded."""


class FitQualityWarning(GpudiffimWarning):
    """The kernel fit is poorly constrained or rejected many candidates."""


class BadSubtractionWarning(FitQualityWarning):
    """Sources detected on a difference image cover too much of it: the subtraction is probably bad."""
