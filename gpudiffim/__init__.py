"""gpudiffim: Alard-Lupton PSF matching and image subtraction.

The algorithm of LSST ``ip_diffim``'s ``ImagePsfMatchTask``: a PSF-matching
kernel built from a basis (Alard-Lupton Gaussians x polynomials, or delta
functions with regularisation), fitted on stamps around stars, spatially
varying, with a differential background and three stages of candidate
clipping; the matched and difference images carry propagated variance and
mask planes.
"""

from ._backend import backend_info, compute_backend, use_backend
from .config import DetectionConfig, PsfMatchConfig
from .errors import (
    BackendUnavailableError,
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
from .task import (
    ExposureMatchResult,
    ExposureSubtractResult,
    ImagePsfMatchTask,
    MatchResult,
    SubtractResult,
)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "backend_info",
    "compute_backend",
    "use_backend",
    "BackendUnavailableError",
    "BackgroundModel",
    "ConfigurationError",
    "DEFAULT_MASK_PLANES",
    "DetectionConfig",
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
    "ShapeError",
    "SingularSystemError",
    "SpatialKernel",
    "SubtractResult",
]
