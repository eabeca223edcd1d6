"""gpudiffim: Alard-Lupton PSF matching and image subtraction.

The algorithm of LSST ``ip_diffim``'s ``ImagePsfMatchTask``: a PSF-matching
kernel built from a basis (Alard-Lupton Gaussians x polynomials, or delta
functions with regularisation), fitted on stamps around stars, spatially
varying, with a differential background and three stages of candidate
clipping; the matched and difference images carry propagated variance and
mask planes.
"""

import importlib

from ._backend import backend_info, compute_backend, tune_host_allocator, use_backend
from .config import DetectionConfig, PsfMatchConfig
from .errors import (
    BackendUnavailableError,
    BadSubtractionWarning,
    ConfigurationError,
    FitQualityWarning,
    FitsFormatError,
    GpudiffimError,
    GpudiffimWarning,
    InvalidImageError,
    InvalidVarianceError,
    MissingDependencyError,
    NoDataWarning,
    NoKernelCandidatesError,
    RegistrationError,
    ShapeError,
    SingularSystemError,
)
from .exposure import Exposure, ExposureInfo
from .image import DEFAULT_MASK_PLANES, MaskedImage
from .kernel import BackgroundModel, SpatialKernel

__version__ = "0.1.0"

#: Public names loaded on first access (PEP 562), so that importing a low-level
#: module (``import gpudiffim.basis``) does not load detection, stamp fitting and
#: the solve loop through this package's ``__init__``.
_LAZY = {name: ".task" for name in ("ExposureMatchResult", "ExposureSubtractResult", "ImagePsfMatchTask",
                                     "MatchResult", "ScoreImage", "SubtractResult")}
_LAZY.update({"DecorrelationModel": ".decorrelation", "DifferencePsf": ".difference_psf"})
_LAZY.update({name: ".sources" for name in ("detect_sources", "detect_in_masked_image")})


def __getattr__(name):
    """Import a lazily exported name (see :data:`_LAZY`) on first access."""
    if name not in _LAZY:
        msg = f"module {__name__!r} has no attribute {name!r}"
        raise AttributeError(msg)
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value


def __dir__():
    """Module attributes, the lazily exported names included."""
    return sorted(set(globals()) | set(_LAZY))

__all__ = [
    "__version__",
    "backend_info",
    "compute_backend",
    "tune_host_allocator",
    "use_backend",
    "BackendUnavailableError",
    "BackgroundModel",
    "BadSubtractionWarning",
    "ConfigurationError",
    "DecorrelationModel",
    "DEFAULT_MASK_PLANES",
    "DetectionConfig",
    "DifferencePsf",
    "Exposure",
    "ExposureInfo",
    "ExposureMatchResult",
    "ExposureSubtractResult",
    "FitQualityWarning",
    "FitsFormatError",
    "GpudiffimError",
    "GpudiffimWarning",
    "ImagePsfMatchTask",
    "InvalidImageError",
    "InvalidVarianceError",
    "MaskedImage",
    "MatchResult",
    "MissingDependencyError",
    "NoDataWarning",
    "NoKernelCandidatesError",
    "PsfMatchConfig",
    "RegistrationError",
    "ScoreImage",
    "ShapeError",
    "SingularSystemError",
    "SpatialKernel",
    "SubtractResult",
    "detect_in_masked_image",
    "detect_sources",
]
