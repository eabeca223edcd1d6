"""Configuration of PSF matching: frozen, validated dataclasses.

The fields and defaults are those of LSST ``ip_diffim``'s ``PsfMatchConfig``,
``PsfMatchConfigAL``, ``PsfMatchConfigDF`` and the legacy ``DetectionConfig``,
renamed to snake_case (``kernelSize`` -> ``kernel_size``), with one default
changed: ``fit_for_background`` is True (``ip_diffim``: False), as in HOTPANTS
and Rubin's current subtraction task.  Fields that are dead
in ``ip_diffim`` (``useAfwBackground``, ``calculateKernelUncertainty``,
``useBicForKernelBasis``, the deprecated ``alard*Deconv`` degree fields and the
risk-minimisation lambda scan, which cannot run there) are left out.
gpudiffim adds ``reduce_spatial_order``, ``variance_correction`` (with its
limit), ``noise_correlation``, ``max_solve_restarts``,
``spatial_kernel_sum_order``, ``pca_weighting``, ``pca_method``, ``pca_deregularization``
and ``lambda_type="auto"``;
``PsfMatchConfig(fit_for_background=False, reduce_spatial_order=False,
variance_correction="none", noise_correlation=False)`` behaves as
``ip_diffim``'s ``ImagePsfMatchTask`` (``noise_correlation`` changes nothing
on images whose noise is white) with the Alard-Lupton basis; the
delta-function basis also needs ``spatial_kernel_sum_order=None,
pca_weighting="uniform", lambda_type="absolute", num_principal_components=5,
use_pca_for_spatial_kernel=True``: its defaults here were changed, by
measurement, because ``ip_diffim``'s leave it far behind Alard-Lupton on easy
data (issue 13, ``tests/test_delta_function.py``).

Defaults that depend on the basis set, as ``setDefaults`` does in ``ip_diffim``:
``max_condition_number`` (5e7 for Alard-Lupton, 5e6 for delta functions) and
``use_pca_for_spatial_kernel`` (False / True, but False for a spatially
constant kernel, ``spatial_kernel_order=0``, which a PCA basis could only
restrict); and gpudiffim's ``num_principal_components`` (5 / 10) and
``pca_weighting`` ("uniform" / "precision").  Left ``None``, they follow the
basis set (also after :func:`dataclasses.replace` changes it); the values in
force are the properties ``condition_number_limit``, ``pca_spatial_kernel``,
``pca_components`` and ``pca_weights``.

Derive variants with :func:`dataclasses.replace`; every instance is validated
on construction and raises :class:`~gpudiffim.errors.ConfigurationError` with
the field name, the value and what was expected.
"""

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field

from ._validate import check_int, check_real, fail
from .errors import ConfigurationError

__all__ = ["DetectionConfig", "PsfMatchConfig"]

BASIS_SETS = ("alard-lupton", "delta-function")
SPATIAL_MODEL_TYPES = ("chebyshev1", "polynomial")
CONDITION_NUMBER_TYPES = ("EIGENVALUE", "SVD")
REGULARIZATION_TYPES = ("centralDifference", "forwardDifference")
VARIANCE_CORRECTIONS = ("auto", "scale", "add", "none")
CONVOLVE_CHOICES = ("template", "science", "auto")
SCORE_FITS = ("difference", "preconvolved")
LAMBDA_TYPES = ("auto", "absolute", "relative")
PCA_WEIGHTINGS = ("precision", "uniform")
PCA_METHODS = ("kernels", "spatial")
DETECTION_THRESHOLD_TYPES = ("value", "stdev", "variance", "pixel_stdev")


def _check_bool(obj, name):
    value = getattr(obj, name)
    if not isinstance(value, bool):
        fail(name, value, "True or False")


def _check_int(obj, name, minimum=None, maximum=None, odd=False):
    check_int(name, getattr(obj, name), minimum, maximum, odd)


def _check_float(obj, name, minimum=None, positive=False):
    object.__setattr__(obj, name, check_real(name, getattr(obj, name), minimum, positive))


def _check_choice(obj, name, choices):
    value = getattr(obj, name)
    if value not in choices:
        fail(name, value, f"one of {choices}")


def _check_names(obj, name):
    value = getattr(obj, name)
    if isinstance(value, str) or not all(isinstance(v, str) for v in value):
        fail(name, value, "a sequence of mask-plane names")
    object.__setattr__(obj, name, tuple(value))


def _from_mapping(cls, mapping):
    """Build ``cls`` from a mapping, rejecting unknown keys clearly."""
    if not isinstance(mapping, Mapping):
        fail(cls.__name__, mapping, "a mapping of field names to values")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(mapping) - known)
    if unknown:
        msg = f"unknown {cls.__name__} field(s) {unknown}; known fields: {sorted(known)}"
        raise ConfigurationError(msg)
    return cls(**mapping)


@dataclass(frozen=True)
class DetectionConfig:
    """Detection of kernel candidates when the caller gives none (legacy ``DetectionConfig``).

    Attributes
    ----------
    det_threshold : float
        Detection threshold, in units given by ``det_threshold_type`` (>= 3).
    det_threshold_type : {"pixel_stdev", "stdev", "variance", "value"}
        "pixel_stdev": pixel > threshold x sqrt(variance plane) of that pixel;
        "stdev": threshold x robust standard deviation of the image;
        "variance": threshold x median of the variance plane; "value": absolute.
    det_on_template : bool
        Detect on the template instead of the science image.  The legacy
        ``ImagePsfMatchTask`` always detected on the science image, which is
        our default.
    bad_mask_planes : tuple of str
        Any of these bits in a candidate's stamp, on either image, rejects it.
    fp_npix_min, fp_npix_max : int
        Footprint area limits in pixels; footprints above ``fp_npix_max`` are
        replaced by the centre of their bounding box.
    fp_grow_kernel_scaling : float
        With ``scale_by_fwhm``, stamp half-size = int(scaling x kernel size + 0.5).
    fp_grow_pix : int
        Stamp half-size when ``scale_by_fwhm`` is False.
    scale_by_fwhm : bool
        Choose ``fp_grow_kernel_scaling`` over ``fp_grow_pix``.
    min_snr : float
        Minimum core signal-to-noise (mean of S/sigma over the candidate core) of a
        candidate; the S/N vetting of the issue.
    background_bin_size : int
        Bin size (px) of the coarse background removed before detection.
    """

    det_threshold: float = 10.0
    det_threshold_type: str = "pixel_stdev"
    det_on_template: bool = False
    bad_mask_planes: tuple = ("NO_DATA", "EDGE", "SAT")
    fp_npix_min: int = 5
    fp_npix_max: int = 500
    fp_grow_kernel_scaling: float = 1.0
    fp_grow_pix: int = 30
    scale_by_fwhm: bool = True
    min_snr: float = 5.0
    background_bin_size: int = 128

    def __post_init__(self):
        _check_float(self, "det_threshold", minimum=3.0)
        _check_choice(self, "det_threshold_type", DETECTION_THRESHOLD_TYPES)
        _check_bool(self, "det_on_template")
        _check_names(self, "bad_mask_planes")
        _check_int(self, "fp_npix_min", minimum=5)
        _check_int(self, "fp_npix_max", minimum=self.fp_npix_min, maximum=500)
        _check_float(self, "fp_grow_kernel_scaling", minimum=1.0)
        _check_int(self, "fp_grow_pix", minimum=10)
        _check_bool(self, "scale_by_fwhm")
        _check_float(self, "min_snr", minimum=0.0)
        _check_int(self, "background_bin_size", minimum=16)

    @classmethod
    def from_mapping(cls, mapping):
        """Build from a mapping (e.g. parsed YAML/JSON); unknown keys raise."""
        return _from_mapping(cls, mapping)


@dataclass(frozen=True)
class PsfMatchConfig:
    """All parameters of the PSF-matching kernel fit (``PsfMatchConfig[AL|DF]``).

    Attributes are grouped as in ``ip_diffim``; see the specification
    (``ipdiffim-reference.md`` section 1) for the meaning of each.  Units are
    pixels for sizes and sigmas.

    Attributes
    ----------
    kernel_basis_set : {"alard-lupton", "delta-function"}
        Kernel basis.
    kernel_size : int
        Kernel width (odd).  Replaced by the FWHM rule for Alard-Lupton when
        ``scale_by_fwhm`` and both FWHMs are known.
    scale_by_fwhm : bool
        Derive the AL sigmas and the kernel width from the two PSF FWHMs.
    kernel_size_fwhm_scaling : float
        Kernel width = this x largest AL sigma (then clamped).
    kernel_size_min, kernel_size_max : int
        Clamp of the FWHM-derived kernel width.
    fit_for_background : bool
        Fit a differential background (constant per stamp, spatial model
        of order ``spatial_bg_order``).  True by default, as in HOTPANTS and
        Rubin's current subtraction task, so that images that still hold
        their sky are matched; ``ip_diffim``'s ``PsfMatchConfig`` default
        was False (pass ``fit_for_background=False`` for it).
    spatial_model_type : {"chebyshev1", "polynomial"}
        Spatial functions; Chebyshev over the cell-set box, or monomials of
        raw parent-pixel coordinates.
    spatial_kernel_order, spatial_bg_order : int
        Total degree of the spatial variation of the kernel and background.
    spatial_kernel_sum_order : int or None
        Total degree of the spatial variation of the kernel sum (the
        photometric scaling), at most the kernel's order (which a lower
        order used for too few candidates also caps).  0, the default, keeps
        the kernel sum constant over the image, as ``ip_diffim``'s
        Alard-Lupton and PCA bases always do; the delta-function basis
        without PCA then has its sum constrained, where ``ip_diffim`` lets
        it vary at the kernel's order, so that the noise of 441 per-pixel
        spatial models does not enter the sum (a variation of 0.1 % over
        the field times a sky of 1000 counts is a 1-count gradient on empty
        sky).  None follows ``ip_diffim``: constant for Alard-Lupton and PCA,
        the kernel's order for raw delta functions.
    reduce_spatial_order : bool
        Lower each spatial order, for one spatial fit, to the highest that
        the candidates in that fit support: at least two candidates per
        spatial term, ``n >= (order + 1)(order + 2)``.  The orders used are
        logged and recorded in the result's diagnostics.  False fits the
        configured orders however few candidates there are (as ``ip_diffim``).
    size_cell_x, size_cell_y : int
        Spatial-cell size (px).
    n_star_per_cell : int
        Candidates used per cell (-1: all).
    max_spatial_iterations : int
        Outer rejection iterations of the spatial fit (1..5).
    use_pca_for_spatial_kernel, subtract_mean_for_pca, num_principal_components
        PCA compression of the per-candidate kernels before the spatial fit.
        ``num_principal_components`` counts the mean; None follows the
        basis set: 5 for Alard-Lupton (``ip_diffim``) and 10 for delta
        functions (``ip_diffim``: 5).  With 5, the delta-function basis
        leaves 2-4 % more D/sigma std on bright stars than Alard-Lupton
        (simulated 384^2-512^2 pairs with sky); with 8, 1.9-2.3 % more; with
        10, 1.7 %: the eigen-kernels beyond the true variation absorb the
        smoothing bias of the regularised stamp kernels the PCA is built
        from.
    pca_weighting : {"precision", "uniform"} or None
        Weight of each kernel in the PCA: "precision" weights it by how well
        its stamp determines it (``K^2 tr(M) / n``, see
        :func:`gpudiffim.solve.kernel_precision`), so that the eigen-kernels
        follow the bright stars' kernels rather than the faint ones' noise;
        "uniform" weights every kernel equally (``ip_diffim``).  None
        follows the basis set: "uniform" for Alard-Lupton, whose few smooth
        kernels are well determined, "precision" for delta functions.
    pca_method : {"kernels", "spatial"}
        How the PCA basis is found. "kernels": the mean and the leading
        eigen-kernels of the candidates' kernels (``ip_diffim``).
        "spatial": the mean, then the directions of the kernels' weighted
        least-squares fit by the spatial kernel function (at most its
        ``n_terms``: what the spatial model can follow), then the leading
        eigen-kernels of what that fit leaves.  Delta-function stamp
        kernels are noisy, and their leading eigen-kernels follow the
        noise: on a simulated 384^2 pair ten of them left a third of the
        true kernel's one direction of variation out of their span, while
        the spatial fit averages the noise over all candidates
        (:func:`gpudiffim.solve.pca_kernel_basis`,
        ``tests/test_delta_function.py``).  Default "kernels"; see
        ``pca_deregularization`` for why "spatial" is not the default.
    pca_deregularization : int
        Iterated-Tikhonov steps that take the regularisation's smoothing
        back out of the stamp kernels the PCA basis is built from (not out
        of the stamp fits themselves): ``x_{j+1} = x_0 + lambda (M +
        lambda H)^{-1} H x_j`` from the regularised solution ``x_0``, one
        more solve with the stamp's Cholesky factor per step
        (:func:`gpudiffim.linalg.deregularized`).  The smoothing
        biases every kernel the same way, so it survives the PCA's average
        and sits in the basis, which the spatial fit cannot undo: on six
        simulated 384^2-768^2 pairs (``bench/RESULTS.md``) the PCA basis
        of the regularised kernels left 0.7-3.9 % more D/sigma std on
        bright stars than Alard-Lupton, with three steps (and
        ``pca_method="spatial"``) 0.3-1.5 %.  The transient flux-ratio
        scatter moved by -6 to +6 % on the same pairs (up on four; 20-60
        transients each, whose own sampling scatter is ~10 %), to 3 % over
        Alard-Lupton's on one of the pairs the issue-13 acceptance test
        holds within 2 %, so it is not the default: 0 keeps the regularised kernels
        (``ip_diffim``).  Stamps that Cholesky cannot solve keep theirs.
        Used only with a regularised basis and a PCA spatial kernel
        (``pca_deregularization=3, pca_method="spatial"`` with the
        delta-function basis).
    single_kernel_clipping, kernel_sum_clipping, spatial_kernel_clipping : bool
        The three clipping stages.
    check_condition_number : bool
        Reject candidates whose normal matrix has condition number above
        ``max_condition_number``.
    bad_mask_planes : tuple of str
        Pixels ignored by residual statistics.
    candidate_residual_mean_max, candidate_residual_std_max : float
        Limits on |mean| and rms of the normalised residual D/sigma.
    use_core_stats, candidate_core_radius
        Residual statistics over the (2r+1)^2 core only.
    max_ksum_sigma : float
        Kernel-sum rejection threshold in clipped standard deviations.
    max_condition_number : float or None
        5e7 (AL) or 5e6 (DF) when None (see ``condition_number_limit``).
    condition_number_type : {"EIGENVALUE", "SVD"}
    max_spatial_condition_number : float
        Only produces a warning.
    iterate_single_kernel : bool
        Refit each stamp once with the difference-image variance
        (only without constant weighting).
    constant_variance_weighting : bool
        Weight every stamp pixel by 1 / median(V_S + V_T) of the stamp.
    alard_n_gauss, alard_deg_gauss, alard_sig_gauss, alard_gauss_beta, alard_min_sig, alard_min_sig_deconv
        Alard-Lupton basis (number of Gaussians, polynomial degrees, config
        sigmas, ratio of successive sigmas, minimum sigma in convolution and
        deconvolution mode).
    use_regularization, regularization_type, central_regularization_stencil, forward_regularization_orders, regularization_border_penalty, lambda_type, lambda_value, lambda_scaling
        Delta-function regularisation: each stamp solves ``(M + lambda H) a
        = b``.  ``lambda_type``: "auto" (default) chooses one absolute
        ``lambda`` for the whole fit by the minimum residual on held-out
        stamps (:mod:`gpudiffim.regularization`; logged and recorded in the
        result's ``diagnostics["regularization"]``), "absolute" uses
        ``lambda_value`` (``ip_diffim``'s default, 0.2, is negligible next to
        a bright star's normal matrix), "relative" uses ``lambda_scaling
        tr(M) / tr(H)`` per stamp.  ``ip_diffim``'s risk-minimising types
        cannot run there (reference section 13) and are not offered.
    variance_correction : {"auto", "scale", "add", "none"}
        Correct both input variance planes to the noise measured on their
        sky before fitting (:func:`gpudiffim.variance.scale_variance`, like
        Rubin's ``doScaleVariance``): "scale" multiplies the plane by a
        factor, "add" adds the missing sky variance (sky-subtracted frames
        whose variance lacks the sky's photon noise), "auto" scales when the
        factor is at most 2 and adds otherwise, "none" uses the planes as
        given (``ip_diffim``'s ``ImagePsfMatchTask``).  What was applied is
        logged and recorded in the result's ``diagnostics``.
    variance_correction_limit : float
        Largest correction factor (or ratio of measured to planned sky
        variance) accepted; beyond it the plane is reported as wrong.
    noise_correlation : bool
        Measure the noise autocorrelation of the convolved image on its sky
        (lags up to 3 px) and multiply the matched image's variance ``sum K^2
        V`` by the factor it implies for the fitted kernel
        (:mod:`gpudiffim.covariance`; drizzled or resampled images), when the
        correlation is significant; logged and recorded in the result's
        ``diagnostics["noise_correlation"]``.  False propagates the variance
        as for white noise (``ip_diffim``).
    quality_report : bool
        Keep the residual ``D/sigma`` of every fitted candidate's stamp, under
        its own kernel (recorded as it is fitted) and under the final spatial
        model (one more stamp pass at the end of the fit), so that
        ``result.quality`` can be computed later without the input images;
        about 16 bytes per fit-region pixel per fitted candidate.  False
        skips that pass; ``result.quality`` then raises and says so.
    max_solve_restarts : int
        Bound on the kernel-sum and PCA restarts of the solve loop, which are
        unbounded in ``ip_diffim``; exceeding it raises
        :class:`~gpudiffim.errors.NoKernelCandidatesError`.
    convolve : {"template", "science", "auto"}
        Which image the kernel convolves (Rubin's ``mode``): the template
        (default), the science image, or "auto": the image with the narrower
        PSF (:func:`gpudiffim.direction.choose_convolution`).  The task
        methods' ``convolve_template`` argument, when given, overrides it.
    decorrelate : bool
        Whiten the difference's noise afterwards (:mod:`gpudiffim.decorrelation`:
        the afterburner of Rubin's ``DecorrelateALKernelTask``, made to follow
        the spatially varying kernel).  Off by default.
    decorrelation_grid_step : int
        Spacing (px) of the grid of positions where the decorrelation kernel
        is evaluated; the corrected images of neighbouring positions are
        blended bilinearly in between.  0 decorrelates with the kernel at
        the image centre only (Rubin's ``DecorrelateALKernelTask``).  A
        spatially invariant kernel is decorrelated in one piece.
    score : bool
        Make a score image instead of a plain difference (Rubin's
        ``AlardLuptonPreconvolveSubtractTask``): the difference correlated
        with the science PSF (``score_fit`` says how its kernel is fitted),
        decorrelated in score mode and given in S/N per pixel.  Needs
        ``convolve`` "template" (or "auto", which then means template).
    score_fit : {"difference", "preconvolved"}
        How the score's kernel is fitted: the plain difference's kernel with
        the difference correlated with ``P`` ("difference", the default:
        ``D * P = S * P - T * (K * P)``, the same model; the fit is the plain
        one and the score adds one filtered decorrelation pass, +14-26 % of
        the subtraction), or against the preconvolved science image
        ("preconvolved", Rubin's; the kernel must reach the sqrt(2) wider PSF
        of ``S * P``, so the basis and stamps grow and the fit costs about 8
        times the plain one at 2048^2).
    source_threshold : float or None
        Detect and measure sources on the output at this S/N, both signs
        (:func:`gpudiffim.sources.detect_in_masked_image`: on the score image
        with ``score``, else on the (decorrelated) difference, with its PSF);
        the table is ``result.sources``.  None (default) detects nothing.
    detection : DetectionConfig
        Candidate detection when none are given.
    """

    kernel_basis_set: str = "alard-lupton"
    kernel_size: int = 21
    scale_by_fwhm: bool = True
    kernel_size_fwhm_scaling: float = 6.0
    kernel_size_min: int = 21
    kernel_size_max: int = 35
    fit_for_background: bool = True
    spatial_model_type: str = "chebyshev1"
    spatial_kernel_order: int = 2
    spatial_kernel_sum_order: int = 0
    spatial_bg_order: int = 1
    reduce_spatial_order: bool = True
    size_cell_x: int = 128
    size_cell_y: int = 128
    n_star_per_cell: int = 5
    max_spatial_iterations: int = 3
    use_pca_for_spatial_kernel: bool = None
    subtract_mean_for_pca: bool = True
    num_principal_components: int = None
    pca_weighting: str = None
    pca_method: str = "kernels"
    pca_deregularization: int = 0
    single_kernel_clipping: bool = True
    kernel_sum_clipping: bool = True
    spatial_kernel_clipping: bool = True
    check_condition_number: bool = False
    bad_mask_planes: tuple = ("NO_DATA", "EDGE", "SAT")
    candidate_residual_mean_max: float = 0.25
    candidate_residual_std_max: float = 1.50
    use_core_stats: bool = False
    candidate_core_radius: int = 3
    max_ksum_sigma: float = 3.0
    max_condition_number: float = None
    condition_number_type: str = "EIGENVALUE"
    max_spatial_condition_number: float = 1.0e10
    iterate_single_kernel: bool = False
    constant_variance_weighting: bool = True
    # Alard-Lupton basis
    alard_n_gauss: int = 3
    alard_deg_gauss: tuple = (4, 2, 2)
    alard_sig_gauss: tuple = (0.7, 1.5, 3.0)
    alard_gauss_beta: float = 2.0
    alard_min_sig: float = 0.7
    alard_min_sig_deconv: float = 0.4
    # delta-function basis
    use_regularization: bool = True
    regularization_type: str = "centralDifference"
    central_regularization_stencil: int = 9
    forward_regularization_orders: tuple = (1, 2)
    regularization_border_penalty: float = 3.0
    lambda_type: str = "auto"
    lambda_value: float = 0.2
    lambda_scaling: float = 1.0e-4
    # gpudiffim additions
    variance_correction: str = "auto"
    variance_correction_limit: float = 1000.0
    noise_correlation: bool = True
    quality_report: bool = True
    max_solve_restarts: int = 20
    convolve: str = "template"
    decorrelate: bool = False
    decorrelation_grid_step: int = 512
    score: bool = False
    score_fit: str = "difference"
    source_threshold: float = None
    detection: DetectionConfig = field(default_factory=DetectionConfig)

    def __post_init__(self):
        _check_choice(self, "kernel_basis_set", BASIS_SETS)
        self._validate_kernel_fields()
        self._validate_clipping_fields()
        self._validate_al_fields()
        self._validate_df_fields()
        if isinstance(self.detection, Mapping):
            object.__setattr__(self, "detection", DetectionConfig.from_mapping(self.detection))
        if not isinstance(self.detection, DetectionConfig):
            fail("detection", self.detection, "a DetectionConfig")

    def _validate_kernel_fields(self):
        _check_int(self, "kernel_size", minimum=3, odd=True)
        _check_bool(self, "scale_by_fwhm")
        _check_float(self, "kernel_size_fwhm_scaling", minimum=1.0)
        _check_int(self, "kernel_size_min", minimum=3, odd=True)
        _check_int(self, "kernel_size_max", minimum=self.kernel_size_min, odd=True)
        _check_bool(self, "fit_for_background")
        _check_choice(self, "spatial_model_type", SPATIAL_MODEL_TYPES)
        _check_int(self, "spatial_kernel_order", minimum=0, maximum=10)
        _check_int(self, "spatial_bg_order", minimum=0, maximum=10)
        if self.spatial_kernel_sum_order is not None:
            _check_int(self, "spatial_kernel_sum_order", minimum=0, maximum=10)
        _check_bool(self, "reduce_spatial_order")
        _check_int(self, "size_cell_x", minimum=32)
        _check_int(self, "size_cell_y", minimum=32)
        _check_int(self, "n_star_per_cell", minimum=-1)
        if self.n_star_per_cell == 0:
            fail("n_star_per_cell", 0, "-1 (all) or a positive integer")
        _check_int(self, "max_spatial_iterations", minimum=1, maximum=5)
        if self.use_pca_for_spatial_kernel is not None:
            _check_bool(self, "use_pca_for_spatial_kernel")
        _check_bool(self, "subtract_mean_for_pca")
        if self.num_principal_components is not None:
            _check_int(self, "num_principal_components", minimum=3)
        if self.pca_weighting is not None:
            _check_choice(self, "pca_weighting", PCA_WEIGHTINGS)
        _check_choice(self, "pca_method", PCA_METHODS)
        _check_int(self, "pca_deregularization", minimum=0, maximum=20)
        _check_int(self, "max_solve_restarts", minimum=0)
        _check_choice(self, "variance_correction", VARIANCE_CORRECTIONS)
        _check_float(self, "variance_correction_limit", minimum=1.0)
        _check_bool(self, "noise_correlation")
        _check_bool(self, "quality_report")
        _check_choice(self, "convolve", CONVOLVE_CHOICES)
        _check_bool(self, "decorrelate")
        _check_int(self, "decorrelation_grid_step", minimum=0)
        if 0 < self.decorrelation_grid_step < 64:
            fail("decorrelation_grid_step", self.decorrelation_grid_step, "0 (one kernel) or at least 64 px")
        _check_bool(self, "score")
        _check_choice(self, "score_fit", SCORE_FITS)
        if self.source_threshold is not None:
            _check_float(self, "source_threshold", positive=True)
        if self.score and self.convolve == "science":
            fail("convolve", self.convolve, '"template" or "auto" with score=True (the science image '
                 "is preconvolved, the template convolved)")

    def _validate_clipping_fields(self):
        for name in ("single_kernel_clipping", "kernel_sum_clipping", "spatial_kernel_clipping",
                     "check_condition_number", "use_core_stats", "iterate_single_kernel",
                     "constant_variance_weighting"):
            _check_bool(self, name)
        _check_names(self, "bad_mask_planes")
        _check_float(self, "candidate_residual_mean_max", positive=True)
        _check_float(self, "candidate_residual_std_max", positive=True)
        _check_int(self, "candidate_core_radius", minimum=1)
        _check_float(self, "max_ksum_sigma", positive=True)
        if self.max_condition_number is not None:
            _check_float(self, "max_condition_number", positive=True)
        _check_choice(self, "condition_number_type", CONDITION_NUMBER_TYPES)
        _check_float(self, "max_spatial_condition_number", positive=True)

    def _validate_al_fields(self):
        _check_int(self, "alard_n_gauss", minimum=1)
        for name in ("alard_deg_gauss", "alard_sig_gauss"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
                fail(name, value, "a sequence")
            if len(value) != self.alard_n_gauss:
                fail(name, value, f"a sequence of alard_n_gauss={self.alard_n_gauss} values")
            object.__setattr__(self, name, tuple(value))
        for deg in self.alard_deg_gauss:
            if isinstance(deg, bool) or not isinstance(deg, int) or deg < 0:
                fail("alard_deg_gauss", self.alard_deg_gauss, "non-negative integers")
        for sig in self.alard_sig_gauss:
            if isinstance(sig, bool) or not isinstance(sig, (int, float)) or not sig > 0:
                fail("alard_sig_gauss", self.alard_sig_gauss, "positive numbers")
        object.__setattr__(self, "alard_sig_gauss", tuple(float(s) for s in self.alard_sig_gauss))
        _check_float(self, "alard_gauss_beta", positive=True)
        _check_float(self, "alard_min_sig", minimum=0.25)
        _check_float(self, "alard_min_sig_deconv", minimum=0.25)

    def _validate_df_fields(self):
        _check_bool(self, "use_regularization")
        _check_choice(self, "regularization_type", REGULARIZATION_TYPES)
        _check_choice(self, "central_regularization_stencil", (5, 9))
        orders = self.forward_regularization_orders
        if isinstance(orders, (str, bytes)) or not hasattr(orders, "__iter__"):
            fail("forward_regularization_orders", orders, "a sequence of integers in 1..3")
        orders = tuple(orders)
        if not orders or any(isinstance(o, bool) or o not in (1, 2, 3) for o in orders):
            fail("forward_regularization_orders", orders, "a non-empty sequence of integers in 1..3")
        object.__setattr__(self, "forward_regularization_orders", orders)
        _check_float(self, "regularization_border_penalty", minimum=0.0)
        _check_choice(self, "lambda_type", LAMBDA_TYPES)
        _check_float(self, "lambda_value", minimum=0.0)
        _check_float(self, "lambda_scaling", minimum=0.0)

    @property
    def is_alard_lupton(self):
        """True for the Alard-Lupton basis set."""
        return self.kernel_basis_set == "alard-lupton"

    def _by_basis(self, value, alard_lupton, delta_function):
        """``value``, or when it is None the basis set's default."""
        if value is not None:
            return value
        return alard_lupton if self.is_alard_lupton else delta_function

    @property
    def condition_number_limit(self):
        """``max_condition_number``, or the basis set's default (5e7 AL, 5e6 DF)."""
        return self._by_basis(self.max_condition_number, 5.0e7, 5.0e6)

    @property
    def pca_spatial_kernel(self):
        """``use_pca_for_spatial_kernel``, or the basis set's default (False AL, True DF of spatial order > 0)."""
        return self._by_basis(self.use_pca_for_spatial_kernel, False, self.spatial_kernel_order > 0)

    @property
    def pca_components(self):
        """``num_principal_components``, or the basis set's default (5 AL, 10 DF)."""
        return self._by_basis(self.num_principal_components, 5, 10)

    @property
    def pca_weights(self):
        """``pca_weighting``, or the basis set's default ("uniform" AL, "precision" DF)."""
        return self._by_basis(self.pca_weighting, "uniform", "precision")

    @property
    def constant_first_term(self):
        """Whether basis 0's coefficient is spatially constant (AL or PCA)."""
        return self.is_alard_lupton or self.pca_spatial_kernel

    def kernel_sum_order(self, kernel_order):
        """Spatial order of the kernel sum under a kernel of spatial order ``kernel_order``.

        ``spatial_kernel_sum_order`` capped at ``kernel_order``; when None,
        0 for Alard-Lupton and PCA bases and ``kernel_order`` for raw
        delta functions (``ip_diffim``).
        """
        if self.spatial_kernel_sum_order is None:
            return 0 if self.constant_first_term else kernel_order
        return min(self.spatial_kernel_sum_order, kernel_order)

    @classmethod
    def from_mapping(cls, mapping):
        """Build from a mapping (e.g. parsed YAML/JSON); unknown keys raise.

        A nested ``"detection"`` mapping becomes a :class:`DetectionConfig`.
        """
        return _from_mapping(cls, mapping)

    def to_dict(self):
        """Plain-dict form (nested detection included), e.g. for FITS provenance."""
        return dataclasses.asdict(self)
