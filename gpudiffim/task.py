"""``ImagePsfMatchTask``: PSF-match and subtract two aligned masked images.

Model (Alard & Lupton 1998, ApJ 503, 325, doi:10.1086/305984; Alard 2000,
A&AS 144, 363, doi:10.1051/aas:2000214):

.. math:: S(x, y) \\approx (T \\star K_{x,y})(x, y) + b(x, y),

with ``T`` the image that is convolved (the template by default), ``S`` the
image it is matched to, ``K`` the spatially varying PSF-matching kernel
(``afw`` correlation convention, see :mod:`gpudiffim.convolve`) and ``b`` a
differential background.  The difference is ``D = S - T * K - b`` with
variance ``V_S + f sum K^2 V_T`` and the OR of the masks, where ``f`` accounts
for the noise correlation of ``T`` measured on its sky (1 for white noise; see
:mod:`gpudiffim.covariance`).
"""

import contextlib
import logging
from contextlib import contextmanager
import dataclasses
import functools
from dataclasses import dataclass, field

import numpy as np

from ._backend import StageTimings, array_module, host_background, moved, stage_timer
from .apply import convolve_masked_image, spatial_image
from .basis import make_kernel_basis, make_regularization_matrix
from .candidates import (
    candidate_positions,
    detected_centres,
    rated_fwhms,
    require_candidates,
    vet_candidates,
)
from .cellset import KernelCellSet, RejectReason, SpatialCellSet
from .config import PsfMatchConfig
from .covariance import correct_matched_variance, measure_noise_correlation
from .decorrelation import DecorrelationModel, decorrelate
from .difference_psf import DifferencePsf, gaussian_psf, preconvolved_psf
from .direction import choose_convolution, psf_axis_fwhms
from .errors import ConfigurationError, NoKernelCandidatesError, ShapeError
from .exposure import Exposure
from .image import MaskedImage
from .kernel import BackgroundModel, SpatialKernel
from .registration import check_exposures, register_template
from .solve import ResidualRows, solve_kernel
from .spatial import SpatialFunction
from .variance import correct_variances

__all__ = ["ImagePsfMatchTask", "MatchResult", "SubtractResult", "ExposureMatchResult",
           "ExposureSubtractResult", "ScoreImage"]

log = logging.getLogger(__name__)

#: Side (px) of the central box on which the decorrelation measures the noise
#: correlation of the image that was not convolved (0.4 s for 2048^2, 0.1 s for 1024^2;
#: 768^2 holds ~3e5 sky pixels, a standard error of 0.002 per lag).
CORRELATION_BOX = 768

#: Row and column step of the pixels whose median variance sets the decorrelation's s^2 and t^2.
SKY_VARIANCE_STRIDE = 4


@dataclass(frozen=True)
class MatchResult:
    """Outcome of :meth:`ImagePsfMatchTask.match_masked_images`.

    Attributes
    ----------
    matched_image : MaskedImage
        The convolved image ``T * K`` (no background added), on the input grid
        (their overlap), with variance ``f sum K^2 V_T``.
    psf_matching_kernel : SpatialKernel
        ``.image(x, y)`` and ``.kernel_sum(x, y)`` at any parent position.
    background_model : BackgroundModel
        Callable ``b(x, y)``; zero when no background is fitted.
    kernel_cell_set : KernelCellSet
        Every candidate with its status, rejection reason, statistics and kernel sum.
    kernel_basis : KernelBasis
        The basis of the solution (before any PCA).
    convolved : {"template", "science"}
        Which input was convolved.
    template_fwhm_pix, science_fwhm_pix : float or None
        FWHMs used (given or estimated; None when neither was needed).
    timings : dict of str to float
        Wall time per stage in seconds.
    diagnostics : dict
        Kernel sum at the centre, spatial condition number, the spatial orders
        used (``spatial_kernel_order``, ``spatial_bg_order``), the variance
        correction of the inputs (``variance_correction``: the mode and a
        :class:`~gpudiffim.variance.VarianceCorrection` per image or None),
        the matched variance's noise-correlation factor (``noise_correlation``:
        a :class:`~gpudiffim.covariance.MatchedVarianceCorrection`, or None
        when disabled), warnings, and the settings the quality report needs
        (``stamp_half_size``, ``bad_mask_planes``, ``n_stamp_parameters``).
    residual_rows : ResidualRows or None
        ``D/sigma`` of every fitted candidate's stamp under its own kernel and
        under the spatial model, in the compute backend's array module: what
        the quality report is computed from (None when
        ``config.quality_report`` is False).  The result keeps no input image.
    quality : astropy.table.Table
        Per-candidate quality report (:func:`gpudiffim.quality.quality_table`):
        LOCAL and SPATIAL residual statistics, kernel moments, aggregates in
        ``meta``.  Computed from ``residual_rows`` on first access and then
        kept; its one-line summary is logged then.
    """

    matched_image: MaskedImage
    psf_matching_kernel: SpatialKernel
    background_model: BackgroundModel
    kernel_cell_set: KernelCellSet
    kernel_basis: object
    convolved: str
    template_fwhm_pix: float
    science_fwhm_pix: float
    timings: dict = field(default_factory=dict)
    diagnostics: dict = field(default_factory=dict)
    residual_rows: ResidualRows = field(default=None, repr=False, compare=False)

    @functools.cached_property
    def quality(self):
        """The quality report (see the class attributes); computed once, on first access.

        Raises
        ------
        ValueError
            If the fit kept no residuals (``config.quality_report=False``).
        """
        from .quality import quality_summary, quality_table

        table = quality_table(self)
        log.info("%s", quality_summary(table))
        return table


@dataclass(frozen=True)
class ScoreImage:
    """A score image (``config.score``) in units of S/N per pixel.

    Attributes
    ----------
    snr : MaskedImage
        The decorrelated score divided by its noise: at a point source, the
        S/N of its PSF flux (the matched filter's output); variance 1.
    flux_error : ndarray of shape (M, N)
        Error of the PSF flux (science flux units) of a point source centred
        on each pixel: its flux is ``snr.image * flux_error``.  In the images'
        array module.
    """

    snr: MaskedImage
    flux_error: object = field(repr=False)

    @property
    def flux(self):
        """PSF flux of a point source centred on each pixel (``snr.image * flux_error``)."""
        return self.snr.image * self.flux_error


@dataclass(frozen=True)
class SubtractResult(MatchResult):
    """:class:`MatchResult` plus the difference image.

    Attributes
    ----------
    subtracted_image : MaskedImage
        ``S - T * K - b`` (convolving the template), or
        ``(S * K + b - T) / k`` (convolving the science image; ``k`` = kernel sum
        at the image centre, which puts ``D`` in science flux units); always
        science minus template.  Decorrelated with ``config.decorrelate``.
        With ``config.score``, the score in S/N per pixel (``score.snr``).
    difference_psf : DifferencePsf or None
        The PSF of ``subtracted_image`` at any position (science PSF when the
        template was convolved, template PSF otherwise, the preconvolved
        science PSF for a score; decorrelated as the image was): the PSF
        image given with the exposure, else a Gaussian of the FWHM.  None
        when neither is known (a delta-function basis with no FWHMs given and
        no decorrelation, which measures none).
    decorrelation : DecorrelationModel or None
        The decorrelation applied (None when off).
    score : ScoreImage or None
        The score image (``config.score``).
    sources : astropy.table.Table or None
        Sources detected on ``subtracted_image`` with
        ``config.source_threshold`` (:mod:`gpudiffim.sources`); None when
        not asked for.
    """

    subtracted_image: MaskedImage = None
    difference_psf: DifferencePsf = None
    decorrelation: DecorrelationModel = None
    score: ScoreImage = None
    sources: object = None


@dataclass(frozen=True)
class ExposureMatchResult(MatchResult):
    """:class:`MatchResult` of :meth:`ImagePsfMatchTask.match_exposures`.

    Attributes
    ----------
    warped_exposure : Exposure
        The template on the science pixel grid (the template itself when no
        warp was needed).
    matched_exposure : Exposure
        The matched image with the science WCS and the PSF it was matched to.
    """

    warped_exposure: Exposure = None
    matched_exposure: Exposure = None


@dataclass(frozen=True)
class ExposureSubtractResult(ExposureMatchResult):
    """:class:`ExposureMatchResult` plus the difference.

    Attributes
    ----------
    subtracted_image, difference_psf, decorrelation, score, sources
        As in :class:`SubtractResult`.
    subtracted_exposure : Exposure
        The difference with the science WCS and metadata, the PSF FWHM of
        the matched pair (the science PSF when the template was convolved, the
        template PSF otherwise) and, as its PSF image, ``difference_psf`` at
        the image centre.
    """

    subtracted_image: MaskedImage = None
    difference_psf: DifferencePsf = None
    decorrelation: DecorrelationModel = None
    score: ScoreImage = None
    sources: object = None
    subtracted_exposure: Exposure = None


@contextmanager
def _timed(timings, stage):
    """Add the wall time of the block to ``timings[stage]`` and log it (a :class:`StageTimings`:
    on the GPU, CUDA events read once at the end of the subtraction)."""
    with stage_timer(timings, stage):
        yield


def _check_pair(template, science):
    for name, value in (("template", template), ("science", science)):
        if not isinstance(value, MaskedImage):
            msg = f"{name} must be a gpudiffim.MaskedImage, got {type(value).__name__}"
            raise TypeError(msg)
    if template.xp is not science.xp:
        msg = ("template and science planes must both be NumPy or both be CuPy arrays, got "
               f"{template.xp.__name__} and {science.xp.__name__}")
        raise TypeError(msg)


def _common_grid(template, science):
    """Both images cut to the overlap of their parent bounding boxes.

    Images with the same shape and ``xy0`` are returned as they are.  Images
    placed differently in one parent pixel frame (LSST ``XY0``) are matched
    on their overlap, which is logged as a warning: the outputs then cover
    the overlap only.

    Raises
    ------
    ShapeError
        If the bounding boxes do not overlap.
    """
    if template.shape == science.shape and template.xy0 == science.xy0:
        return template, science
    (tx0, ty0, tx1, ty1), (sx0, sy0, sx1, sy1) = template.bbox(), science.bbox()
    bbox = (max(tx0, sx0), max(ty0, sy0), min(tx1, sx1), min(ty1, sy1))
    if bbox[0] > bbox[2] or bbox[1] > bbox[3]:
        msg = (f"template (shape {template.shape} at xy0 {template.xy0}) and science (shape "
               f"{science.shape} at xy0 {science.xy0}) do not overlap in the parent pixel frame")
        raise ShapeError(msg)
    log.warning("template (shape %s at xy0 %s) and science (shape %s at xy0 %s) differ: matching on "
                "their overlap, parent x %d..%d, y %d..%d", template.shape, template.xy0, science.shape,
                science.xy0, *bbox[::2], *bbox[1::2])
    return template.subimage(bbox), science.subimage(bbox)


def _check_fwhm(name, value):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) \
            or not np.isfinite(value) or value <= 0:
        msg = f"{name} must be a positive number of pixels, got {value!r}"
        raise ConfigurationError(msg)
    return float(value)


class ImagePsfMatchTask:
    """Fit a PSF-matching kernel between two aligned images and apply it.

    Parameters
    ----------
    config : PsfMatchConfig, optional
        Algorithm parameters; defaults to ``PsfMatchConfig()`` (Alard-Lupton).
    debug : sequence of str, optional
        ``ip_diffim`` debug-display names (:data:`gpudiffim.diagnostics.DEBUG_NAMES`,
        e.g. ``("displayCandidates", "displayKernelMosaic")``, ``("display",)``
        for all); after each match or subtraction of masked images their figures
        are written to ``debug_dir`` as PNG files plus a PDF report (needs
        matplotlib: ``pip install gpudiffim[plot]``).
    debug_dir : str or os.PathLike, optional
        Folder of the debug figures (created; files are replaced on every fit);
        required with ``debug``.

    Examples
    --------
    >>> from gpudiffim import ImagePsfMatchTask, PsfMatchConfig
    >>> from gpudiffim.testing import make_fake_pair
    >>> pair = make_fake_pair(shape=(256, 256), n_stars=60, seed=3)
    >>> task = ImagePsfMatchTask(PsfMatchConfig(spatial_kernel_order=1))
    >>> result = task.subtract_masked_images(pair.template, pair.science)
    >>> round(result.psf_matching_kernel.kernel_sum(128, 128), 2)
    1.0
    """

    def __init__(self, config=None, *, debug=(), debug_dir=None):
        if config is None:
            config = PsfMatchConfig()
        if not isinstance(config, PsfMatchConfig):
            msg = f"config must be a PsfMatchConfig, got {type(config).__name__}"
            raise ConfigurationError(msg)
        self.config = config
        self.debug, self.debug_dir = _check_debug(debug, debug_dir)

    def _write_debug_figures(self, result, fitted):
        """Write the ``debug`` figures of ``result`` (``fitted``: the images it was fitted to); return it.

        The units are those of the science exposure's ``BUNIT`` when the
        inputs were exposures read from FITS.
        """
        if self.debug:
            from .diagnostics import write_figures

            template, science = (image.to_module(np) for image in fitted)
            write_figures(_on_host(result), template, science, self.debug_dir, names=self.debug)
        return result

    def _positions(self, candidates, template, science):
        """Candidate positions (given or detected) and, when detected on the kernel path, their
        ``(row, column)`` centres where the images live (:func:`~gpudiffim.candidates.detected_centres`;
        else None): the later launches read them there instead of uploading them."""
        if candidates is not None:
            return candidate_positions(candidates), None
        detect_on = template if self.config.detection.det_on_template else science
        return detected_centres(detect_on, self.config.detection)

    def _fwhms(self, positions, to_convolve, reference, fwhms, needed=False, device_centres=None):
        """FWHMs of (image to convolve, reference), estimated where missing, and the core S/N ratings.

        The ratings (:func:`~gpudiffim.candidates.core_snr` of the reference at
        every position) rank the stars measured; they are returned for the
        candidate selection (None when no FWHM was estimated).  The FWHMs are
        estimated only where the basis needs them, or always if ``needed``
        (the automatic direction, the score's preconvolution, the PSF of a
        decorrelated difference and source detection).
        """
        if not (needed or (self.config.is_alard_lupton and self.config.scale_by_fwhm)):
            return fwhms, None
        if all(f is not None for f in fwhms):
            return fwhms, None
        missing = [image for f, image in zip(fwhms, (to_convolve, reference)) if f is None]
        measured, ratings = rated_fwhms(missing, reference, positions, self.config.candidate_core_radius,
                                        device_centres=device_centres)
        measured = iter(measured)
        estimated = tuple(f if f is not None else next(measured) for f in fwhms)
        log.info("PSF FWHM (px): image to convolve %.3f, reference %.3f", *estimated)
        return estimated, ratings

    def _stamp_half_size(self, kernel_width):
        detection = self.config.detection
        if detection.scale_by_fwhm:
            half_size = int(detection.fp_grow_kernel_scaling * kernel_width + 0.5)
        else:
            half_size = detection.fp_grow_pix
        if half_size <= kernel_width // 2:
            msg = (f"stamp half-size {half_size} must exceed the kernel half-width "
                   f"{kernel_width // 2}: raise detection.fp_grow_pix")
            raise ConfigurationError(msg)
        return half_size

    def _select(self, positions, to_convolve, reference, half_size, ratings=None, device_centres=None):
        detection = self.config.detection
        kept, rejects = vet_candidates(
            positions, to_convolve, reference, half_size,
            bad_mask_planes=detection.bad_mask_planes,
            core_radius=self.config.candidate_core_radius, min_snr=detection.min_snr, ratings=ratings,
            device_centres=device_centres)
        log.info("candidates: %d usable of %d (%s)", len(kept), len(positions),
                 ", ".join(f"{v} {k.label}" for k, v in rejects.items() if v) or "none rejected")
        require_candidates(kept)
        cell_set = SpatialCellSet(reference.bbox(), self.config.size_cell_x, self.config.size_cell_y, kept)
        return cell_set, rejects

    def _correct_variances(self, timings, images, skies=None):
        """Images with their variance corrected (``config.variance_correction``), and the record.

        Parameters
        ----------
        timings : dict
            Stage times; "variance correction" is added.
        images : dict of str to MaskedImage
            ``{"template": ..., "science": ...}``.
        skies : dict, optional
            Filled with each image's :func:`~gpudiffim.variance.sky_residual`
            (for the noise correlation measured later on the same planes).

        Returns
        -------
        corrected : dict of str to MaskedImage
        record : dict
            ``{"mode": config mode, "template": VarianceCorrection or None, "science": ...}``.
        """
        mode = self.config.variance_correction
        record = {"mode": mode, **{name: None for name in images}}
        if mode == "none":
            return images, record
        corrected = {}
        with _timed(timings, "variance correction"):
            results = correct_variances(images, mode=mode, limit=self.config.variance_correction_limit)
        for name, (corrected[name], record[name], sky) in results.items():
            if skies is not None:
                skies[name] = sky
            log.info("%s variance corrected (%s): %s", name, mode, record[name].describe())
        return corrected, record

    def _solve(self, basis, to_convolve, reference, cell_set, half_size, regularization, device_centres=None):
        """:func:`solve_kernel`, naming the variance correction when every candidate fails the residual cuts."""
        try:
            return solve_kernel(self.config, basis, to_convolve, reference, cell_set, half_size,
                                regularization, device_centres=device_centres)
        except NoKernelCandidatesError as error:
            residual = {RejectReason.SINGLE_KERNEL_RESIDUAL.label, RejectReason.SPATIAL_KERNEL_RESIDUAL.label}
            all_rejected = not cell_set.has_usable_cells()
            if (self.config.variance_correction != "none" or not all_rejected
                    or residual.isdisjoint(cell_set.rejection_counts())):
                raise
            msg = (f"{error}. The variance planes were used as given (variance_correction='none'); if "
                   "they miss noise (e.g. the sky of a sky-subtracted frame), use "
                   "variance_correction='auto' (command line: --variance-correction auto)")
            raise NoKernelCandidatesError(msg) from None

    def _fit(self, template, science, candidates, template_fwhm_pix, science_fwhm_pix,
             convolve, corrections=None, timings=None, psfs=(None, None)):
        """Variance correction, detection, selection, kernel fit and full-image convolution.

        Everything runs in the compute backend's array module (CuPy inputs
        are never copied to the host; only candidate positions, stamps and
        per-candidate results are).  Images placed differently in the parent
        frame are cut to their overlap first.  ``corrections`` is the record
        of a variance correction already applied (by the exposure methods,
        before warping); None corrects here.  ``timings`` (a
        :class:`~gpudiffim._backend.StageTimings`, new if None) gets the stages.
        Returns ``(fields, reference, fitted)`` with the matched image and
        ``reference`` in that module, and ``fitted``, the (cut, corrected)
        ``(template, science)`` the kernel was fitted to (for the debug
        figures; results do not keep them).  ``convolve`` is "template",
        "science" or "auto" (:mod:`gpudiffim.direction`; the PSF images
        ``psfs = (template, science)``, where known, give the widths per
        axis).  With ``config.score`` the science image is preconvolved with
        its PSF (``psfs[1]``, else a Gaussian of its FWHM) and the kernel fitted
        against that.
        """
        _check_pair(template, science)
        fwhms = (_check_fwhm("template_fwhm_pix", template_fwhm_pix),
                 _check_fwhm("science_fwhm_pix", science_fwhm_pix))
        template, science = _common_grid(template, science)
        timings = StageTimings(log=log) if timings is None else timings
        xp = array_module()
        with _timed(timings, "transfer") if xp is not template.xp else contextlib.nullcontext():
            compute = (template.to_module(xp), science.to_module(xp))
        skies = {}
        if corrections is None:
            corrected, corrections = self._correct_variances(timings, dict(zip(("template", "science"),
                                                                               compute)), skies)
            compute = (corrected["template"], corrected["science"])
        score = self.config.score
        with _timed(timings, "detection"):
            positions, device_centres = self._positions(candidates, *compute)
            require_candidates(positions)
            ratings = None
            if convolve == "auto" or score or self.config.decorrelate or self.config.source_threshold:
                fwhms, ratings = self._fwhms(positions, *compute, fwhms, needed=True, device_centres=device_centres)
            convolve_template, direction = self._direction(convolve, fwhms, psfs)
            if not convolve_template:
                fwhms, ratings = fwhms[::-1], None
            to_convolve, reference = compute if convolve_template else compute[::-1]
            if ratings is None:
                fwhms, ratings = self._fwhms(positions, to_convolve, reference, fwhms,
                                             device_centres=device_centres)
        sky = skies.pop("template" if convolve_template else "science", None)   # kept for the noise correlation
        skies.clear()
        preconvolution = None
        if score:
            preconvolution = psfs[1] if psfs[1] is not None else gaussian_psf(fwhms[1])
        preconvolved = score and self.config.score_fit == "preconvolved"
        if preconvolved:
            with _timed(timings, "preconvolution"):
                reference = _preconvolve(reference, preconvolution)
            fwhms = (fwhms[0], np.sqrt(2.0) * fwhms[1])
            log.info("score: science image preconvolved with its PSF (%s); kernel fitted against it",
                     "given" if psfs[1] is not None else f"Gaussian of FWHM {fwhms[1] / np.sqrt(2.0):.3f} px")
        basis = make_kernel_basis(self.config, *fwhms)
        half_size = self._stamp_half_size(basis.width)
        with _timed(timings, "candidate selection"):
            cell_set, rejects = self._select(positions, to_convolve, reference, half_size, ratings, device_centres)
        regularization = None
        if not self.config.is_alard_lupton and self.config.use_regularization:
            regularization = make_regularization_matrix(self.config, basis.width, basis.width)
        with _timed(timings, "kernel fit"):
            solution = self._solve(basis, to_convolve, reference, cell_set, half_size, regularization,
                                   device_centres)
        diagnostics = {**solution.diagnostics, "variance_correction": corrections,
                       "stamp_half_size": half_size,
                       "bad_mask_planes": tuple(self.config.bad_mask_planes),
                       "n_stamp_parameters": basis.n_basis + int(self.config.fit_for_background),
                       "direction": direction, "preconvolution_psf": preconvolution}
        measuring = None      # the noise correlation of to_convolve, measured while it is convolved (host)
        if self.config.noise_correlation:
            measuring = host_background(functools.partial(measure_noise_correlation, to_convolve, sky=sky),
                                        to_convolve.image)
        with _timed(timings, "full-image convolution"):
            image, variance, mask = convolve_masked_image(to_convolve, solution.kernel)
        diagnostics["noise_correlation"] = None
        if measuring is not None:
            with _timed(timings, "noise correlation"):   # what the convolution did not hide
                variance, diagnostics["noise_correlation"] = correct_matched_variance(
                    to_convolve, solution.kernel, variance, correlation=measuring.result())
        matched = MaskedImage._wrap(image, mask, variance, to_convolve.xy0, to_convolve.mask_planes)
        if preconvolved:
            fwhms = (fwhms[0], fwhms[1] / np.sqrt(2.0))
        if not convolve_template:
            fwhms = fwhms[::-1]
        fields = dict(matched_image=matched, psf_matching_kernel=solution.kernel,
                      background_model=solution.background,
                      kernel_cell_set=KernelCellSet.from_cell_set(cell_set, rejects),
                      kernel_basis=basis, convolved="template" if convolve_template else "science",
                      template_fwhm_pix=fwhms[0], science_fwhm_pix=fwhms[1], timings=timings,
                      diagnostics=diagnostics, residual_rows=solution.residuals)
        return fields, reference, compute

    def match_masked_images(self, template, science, *, candidates=None, template_fwhm_pix=None,
                            science_fwhm_pix=None, convolve_template=None):
        """PSF-match one image to the other.

        Parameters
        ----------
        template, science : MaskedImage
            Images in one parent pixel frame: the same shape and ``xy0``, or
            else they are matched on the overlap of their bounding boxes (a
            warning is logged; the outputs cover the overlap).
        candidates : sequence of (x, y) or astropy.table.Table, optional
            Kernel candidate positions in parent pixels; detected on the
            science image when omitted.
        template_fwhm_pix, science_fwhm_pix : float, optional
            PSF FWHMs in pixels; estimated from the candidates when missing
            (Alard-Lupton with ``scale_by_fwhm``).
        convolve_template : bool, optional
            Convolve the template to the science PSF (True), or the science
            image to the template PSF (False); None (default) follows
            ``config.convolve`` ("template", "science" or "auto").

        Returns
        -------
        MatchResult

        Raises
        ------
        ShapeError
            If the images do not overlap.
        InvalidVarianceError
            If a variance plane cannot be corrected to the measured sky noise
            (``config.variance_correction``).
        NoKernelCandidatesError
            If too few candidates survive selection and clipping.
        ConfigurationError
            For invalid FWHMs or candidates.
        """
        return self._write_debug_figures(*self._match(
            template, science, False, candidates=candidates, template_fwhm_pix=template_fwhm_pix,
            science_fwhm_pix=science_fwhm_pix, convolve_template=convolve_template))

    def subtract_masked_images(self, template, science, *, candidates=None, template_fwhm_pix=None,
                               science_fwhm_pix=None, convolve_template=None):
        """PSF-match and subtract; see :meth:`match_masked_images` for parameters.

        Returns
        -------
        SubtractResult
            With ``subtracted_image`` = science minus the matched template and
            the background (see :class:`SubtractResult` for the other mode).
        """
        return self._write_debug_figures(*self._match(
            template, science, True, candidates=candidates, template_fwhm_pix=template_fwhm_pix,
            science_fwhm_pix=science_fwhm_pix, convolve_template=convolve_template))

    def _match(self, template, science, subtract, *, candidates, template_fwhm_pix, science_fwhm_pix,
               convolve_template, corrections=None, timings=None, psfs=(None, None)):
        """Fit, then the matched image (and the difference if ``subtract``) in the inputs' module.

        Returns ``(result, fitted)``: ``fitted`` as of :meth:`_fit`.
        """
        timings = StageTimings(log=log) if timings is None else timings
        fields, reference, fitted = self._fit(template, science, candidates, template_fwhm_pix,
                                              science_fwhm_pix, self._convolve(convolve_template), corrections,
                                              timings, psfs)
        extra = {}
        if subtract:
            with _timed(timings, "subtraction"):
                difference = _difference(fields["matched_image"], reference, fields["background_model"],
                                         fields["psf_matching_kernel"], fields["convolved"] == "template")
            extra = self._afterburner(fields, difference, fitted, psfs, timings)
            if self.config.source_threshold is not None:
                with _timed(timings, "source detection"):
                    extra["sources"] = self._detect(extra)
        moving = fields["matched_image"].xp is not template.xp
        with _timed(timings, "transfer") if moving else contextlib.nullcontext():
            fields["matched_image"] = fields["matched_image"].to_module(template.xp)
            if subtract:
                extra["subtracted_image"] = extra["subtracted_image"].to_module(template.xp)
                if extra["score"] is not None:
                    extra["score"] = ScoreImage(extra["subtracted_image"],
                                                moved(extra["score"].flux_error, template.xp))
        fields["timings"] = timings.read()
        result = SubtractResult(**fields, **extra) if subtract else MatchResult(**fields)
        return result, fitted

    def _detect(self, extra):
        """Sources on the output (``config.source_threshold``): on the score, or on the difference."""
        from .sources import detect_in_masked_image

        score = extra["score"]
        options = {"kind": "score", "flux_error": score.flux_error} if score is not None else {}
        return detect_in_masked_image(extra["subtracted_image"], psf=extra["difference_psf"],
                                      threshold=self.config.source_threshold, **options)

    def _convolve(self, convolve_template):
        """The direction asked for: ``config.convolve`` unless ``convolve_template`` overrides it."""
        if convolve_template is None:
            return self.config.convolve
        if not isinstance(convolve_template, (bool, np.bool_)):
            msg = f"convolve_template must be True, False or None, got {convolve_template!r}"
            raise ConfigurationError(msg)
        return "template" if convolve_template else "science"

    def _direction(self, convolve, fwhms, psfs):
        """``(convolve_template, record)`` for "template", "science" or "auto" (``fwhms``: template, science).

        ``record`` (``diagnostics["direction"]``) holds what was asked, what
        was chosen and, for "auto", the widths compared.
        """
        record = {"requested": convolve}
        if self.config.score and convolve == "science":
            msg = "a score image convolves the template: convolve_template=False cannot be used with score=True"
            raise ConfigurationError(msg)
        chosen = "template" if self.config.score else convolve
        if chosen == "auto":
            widths = [psf_axis_fwhms(psf) if psf is not None else fwhm for psf, fwhm in zip(psfs, fwhms)]
            chosen = choose_convolution(*widths)
            record["template_widths"], record["science_widths"] = widths
            log.info("convolve=auto: PSF FWHM (px) template %s, science %s: convolving the %s",
                     widths[0], widths[1], chosen)
        record["chosen"] = chosen
        return chosen == "template", record

    def _noise_correlations(self, unconvolved, diagnostics):
        """Noise autocorrelations ``rho`` of (unconvolved, convolved) image for the decorrelation.

        With ``config.noise_correlation`` the convolved image's was measured
        by the fit; the other image's is measured here, on its central
        :data:`CORRELATION_BOX` pixels square at most (the correlation is
        assumed the same over the image, as the fit's).  Each is None (white
        noise) unless significant (:mod:`gpudiffim.covariance`), or when the
        measurement is off.
        """
        if not self.config.noise_correlation:
            return None, None
        convolved = diagnostics["noise_correlation"].correlation
        measured = measure_noise_correlation(_central(unconvolved, CORRELATION_BOX))
        log.info("noise correlation of the image not convolved: %s", measured.describe())
        return tuple(c.rho if c.significant else None for c in (measured, convolved))

    def _afterburner(self, fields, difference, fitted, psfs, timings):
        """Decorrelation, score and the difference's PSF: the result fields after the subtraction."""
        convolved, diagnostics = fields["convolved"], fields["diagnostics"]
        kernel = fields["psf_matching_kernel"]
        preconvolution = diagnostics["preconvolution_psf"]
        if preconvolution is not None:
            base, source = preconvolved_psf(preconvolution), "preconvolved science"
        elif convolved == "template":
            base, source = _psf_image(psfs[1], fields["science_fwhm_pix"]), "science"
        else:
            base, source = _psf_image(psfs[0], fields["template_fwhm_pix"]), "template"
        extra = {"decorrelation": None, "score": None, "subtracted_image": difference}
        if self.config.decorrelate or self.config.score:
            template, science = fitted
            unconvolved, convolved_image = (science, template) if convolved == "template" else (template, science)
            x0, y0, x1, y1 = difference.bbox()
            scale = 1.0 if convolved == "template" else 1.0 / kernel.kernel_sum(0.5 * (x0 + x1), 0.5 * (y0 + y1))
            with _timed(timings, "decorrelation"):
                correlations = self._noise_correlations(unconvolved, diagnostics)
                model = DecorrelationModel(
                    kernel, _sky_variance(unconvolved), _sky_variance(convolved_image),
                    "score" if self.config.score else "difference", preconvolution,
                    float(self.config.decorrelation_grid_step or np.inf),
                    prefiltered=self.config.score and self.config.score_fit == "difference",
                    unconvolved_correlation=correlations[0], convolved_correlation=correlations[1])
                image, response = decorrelate(difference, model, unconvolved.variance, convolved_image.variance,
                                              scale=scale, response_psf=base if self.config.score else None)
            extra["decorrelation"], extra["subtracted_image"] = model, image
            if self.config.score:
                extra["score"] = _score_image(image, response)
                extra["subtracted_image"] = extra["score"].snr
        extra["difference_psf"] = None if base is None else DifferencePsf(base, extra["decorrelation"],
                                                                          source=source)
        return extra

    def _fit_exposures(self, template, science, subtract, *, candidates, template_fwhm_pix,
                       science_fwhm_pix, do_warping, convolve_template):
        check_exposures(template, science)  # before the variance correction replaces their images
        timings = StageTimings(log=log)
        # Before warping: the warp correlates the noise, and the correction measures pixel noise.
        images, corrections = self._correct_variances(timings, {"template": template.masked_image,
                                                                "science": science.masked_image})
        template = dataclasses.replace(template, masked_image=images["template"])
        science = dataclasses.replace(science, masked_image=images["science"])
        with _timed(timings, "registration"):
            warped, _ = register_template(template, science, do_warping=do_warping)
        fwhms = (template_fwhm_pix if template_fwhm_pix is not None else warped.fwhm(),
                 science_fwhm_pix if science_fwhm_pix is not None else science.fwhm())
        result, fitted = self._match(warped.masked_image, science.masked_image, subtract,
                                     candidates=candidates, template_fwhm_pix=fwhms[0],
                                     science_fwhm_pix=fwhms[1], convolve_template=convolve_template,
                                     corrections=corrections, timings=timings,
                                     psfs=(warped.psf_image, science.psf_image))
        values = {f.name: getattr(result, f.name) for f in dataclasses.fields(result)}
        matched_fwhm = result.science_fwhm_pix if result.convolved == "template" else result.template_fwhm_pix
        values["warped_exposure"] = warped
        values["matched_exposure"] = Exposure(result.matched_image, wcs=science.wcs,
                                              psf_fwhm_pix=matched_fwhm, info=science.info)
        if subtract:
            x0, y0, x1, y1 = result.subtracted_image.bbox()
            values["subtracted_exposure"] = Exposure(
                result.subtracted_image, wcs=science.wcs, psf_fwhm_pix=matched_fwhm, info=science.info,
                psf_image=None if result.difference_psf is None
                else result.difference_psf.image(0.5 * (x0 + x1), 0.5 * (y0 + y1)))
        return values, fitted

    def match_exposures(self, template, science, *, candidates=None, template_fwhm_pix=None,
                        science_fwhm_pix=None, do_warping=True, convolve_template=None):
        """Register the template onto the science grid if needed, then PSF-match.

        Parameters
        ----------
        template, science : Exposure
            Exposures with celestial WCSs (or on the same pixel grid).
        candidates : sequence of (x, y) or astropy.table.Table, optional
            Kernel candidates in science parent pixels.
        template_fwhm_pix, science_fwhm_pix : float, optional
            PSF FWHMs (px); default to the exposures' PSFs, else measured on stars.
        do_warping : bool
            Warp the template (Lanczos-3) when the WCSs differ; if False, differing
            WCSs are an error.
        convolve_template : bool, optional
            See :meth:`match_masked_images`.

        Returns
        -------
        ExposureMatchResult

        Raises
        ------
        RegistrationError
            If the WCSs differ and ``do_warping`` is False, or the fields do not overlap.
        """
        values, fitted = self._fit_exposures(
            template, science, False, candidates=candidates, template_fwhm_pix=template_fwhm_pix,
            science_fwhm_pix=science_fwhm_pix, do_warping=do_warping, convolve_template=convolve_template)
        return self._write_debug_figures(ExposureMatchResult(**values), fitted)

    def subtract_exposures(self, template, science, *, candidates=None, template_fwhm_pix=None,
                           science_fwhm_pix=None, do_warping=True, convolve_template=None):
        """Register, PSF-match and subtract; see :meth:`match_exposures` for parameters.

        Returns
        -------
        ExposureSubtractResult
        """
        values, fitted = self._fit_exposures(
            template, science, True, candidates=candidates, template_fwhm_pix=template_fwhm_pix,
            science_fwhm_pix=science_fwhm_pix, do_warping=do_warping, convolve_template=convolve_template)
        return self._write_debug_figures(ExposureSubtractResult(**values), fitted)


def _on_host(result):
    """``result`` with its images as NumPy arrays (for figures and FITS output)."""
    images = {name: getattr(result, name).to_module(np) for name in ("matched_image", "subtracted_image")
              if getattr(result, name, None) is not None}
    return dataclasses.replace(result, **images) if images else result


def _check_debug(debug, debug_dir):
    """Validated (debug names, folder) of :class:`ImagePsfMatchTask`."""
    from .diagnostics import check_debug_names, require_matplotlib

    names = check_debug_names(debug)
    if names and debug_dir is None:
        msg = "debug figures need a folder: pass debug_dir="
        raise ConfigurationError(msg)
    if names:
        require_matplotlib()
    return names, debug_dir


def _difference(matched, reference, background, kernel, convolve_template):
    """Difference image with variance and mask (see :class:`SubtractResult`)."""
    dtype, xp = reference.dtype, reference.xp
    image = matched.image + spatial_image(background.spatial_function, background.coefficients, reference.shape,
                                          reference.xy0, reference.image).astype(dtype)
    image -= reference.image
    variance = reference.variance + matched.variance
    if convolve_template:
        xp.negative(image, out=image)
    else:
        x0, y0, x1, y1 = reference.bbox()
        scale = kernel.kernel_sum(0.5 * (x0 + x1), 0.5 * (y0 + y1))
        image /= scale
        variance /= scale**2
    return MaskedImage._wrap(image, reference.mask | matched.mask, variance, reference.xy0,
                             reference.mask_planes)


def _psf_image(psf, fwhm):
    """A PSF image: the one given, else a Gaussian of ``fwhm`` (px), else None."""
    if psf is not None:
        return psf
    return gaussian_psf(fwhm) if fwhm is not None else None


def _preconvolve(masked, psf):
    """``masked`` correlated with ``psf`` (score mode): image, variance ``sum P^2 V``, propagated mask."""
    kernel = SpatialKernel(np.asarray(psf, dtype=np.float64)[None] / np.sum(psf), [[1.0]],
                           SpatialFunction("chebyshev1", 0, masked.bbox()))
    image, variance, mask = convolve_masked_image(masked, kernel)
    return MaskedImage._wrap(image, mask, variance, masked.xy0, masked.mask_planes)


def _sky_variance(masked):
    """Median of the variance plane over unmasked pixels with finite values (one read-back).

    Taken on every :data:`SKY_VARIANCE_STRIDE`-th row and column: the
    variance plane is smooth, and the median of a 2048^2 plane costs 60 ms.
    """
    xp = masked.xp
    variance = masked.variance[::SKY_VARIANCE_STRIDE, ::SKY_VARIANCE_STRIDE]
    finite = xp.isfinite(variance)
    values = variance[(masked.mask[::SKY_VARIANCE_STRIDE, ::SKY_VARIANCE_STRIDE] == 0) & finite]
    if values.size == 0:
        values = variance[finite]
    return float(xp.median(values))


def _score_image(score, response):
    """:class:`ScoreImage` of a decorrelated raw score and its unit-flux response."""
    xp = score.xp
    sigma = xp.sqrt(score.variance)
    snr = xp.where(sigma > 0, score.image / xp.where(sigma > 0, sigma, 1), 0).astype(score.dtype)
    flux_error = (sigma / response).astype(score.dtype)
    return ScoreImage(MaskedImage._wrap(snr, score.mask, xp.ones_like(score.variance), score.xy0,
                                        score.mask_planes), flux_error)


def _central(masked, side):
    """The central ``side`` x ``side`` pixels of ``masked`` (all of it along a shorter axis)."""
    x0, y0, x1, y1 = masked.bbox()
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    half = side // 2
    box = (max(x0, cx - half), max(y0, cy - half), min(x1, cx - half + side - 1), min(y1, cy - half + side - 1))
    return masked if box == (x0, y0, x1, y1) else masked.subimage(box)
