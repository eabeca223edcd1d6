"""Command line gpudiffim: subtract, batch, demo and info.

Exit codes: 0 success, 2 bad input (files, FITS, configuration, registration),
3 the kernel fit failed (too few candidates, singular system), 4 (batch)
some pairs failed (the others are written; see the manifest).  Errors are
reported as one line on stderr; progress and the summary go to stderr through
``logging``.
"""

import argparse
import json
import logging
import os
import platform
import sys
import time
import warnings

import numpy as np

from . import __version__
from .config import PsfMatchConfig
from .errors import (
    ConfigurationError,
    GpudiffimError,
    NoKernelCandidatesError,
    RegistrationError,
    SingularSystemError,
)

__all__ = ["main"]

log = logging.getLogger("gpudiffim")

EXIT_BAD_INPUT = 2
EXIT_FIT_FAILED = 3


def _residual_summary(difference, exclude=()):
    """Mean, std and count of D/sigma over unflagged pixels, leaving out boxes around ``exclude``."""
    good = (difference.mask == 0) & (difference.variance > 0)
    x0, y0 = difference.xy0
    for x, y, radius in exclude:
        col, row = int(round(x)) - x0, int(round(y)) - y0
        good[max(row - radius, 0):row + radius + 1, max(col - radius, 0):col + radius + 1] = False
    z = difference.image[good].astype(np.float64) / np.sqrt(difference.variance[good].astype(np.float64))
    return float(np.mean(z)), float(np.std(z)), int(good.sum())


def _candidate_summary(cells):
    reasons = ", ".join(f"{v} {k}" for k, v in cells.rejection_counts().items()) or "none rejected"
    return f"{cells.n_good} GOOD, {cells.n_bad} BAD ({reasons}), {cells.count('UNKNOWN')} not needed"


def _parse_value(text):
    """A config value from the command line: JSON if it parses, else the string."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text
    return tuple(value) if isinstance(value, list) else value


def build_config(assignments, config_file=None, defaults=None):
    """PsfMatchConfig from a JSON file and ``field=value`` overrides.

    ``detection.field=value`` sets a field of the nested detection config.

    Raises
    ------
    ConfigurationError
        For a malformed assignment, file, field or value.
    """
    values = dict(defaults or {})
    if config_file:
        try:
            with open(config_file, encoding="utf-8") as handle:
                loaded = json.load(handle)
        except (OSError, json.JSONDecodeError) as error:
            msg = f"cannot read config file {config_file}: {error}"
            raise ConfigurationError(msg) from None
        if not isinstance(loaded, dict):
            msg = f"config file {config_file} must hold a JSON object of field: value"
            raise ConfigurationError(msg)
        values.update(loaded)
    for assignment in assignments or ():
        name, sep, text = assignment.partition("=")
        if not sep or not name.strip():
            msg = f"--config expects field=value, got {assignment!r}"
            raise ConfigurationError(msg)
        keys = name.strip().split(".")
        target = values
        for key in keys[:-1]:
            target = target.setdefault(key, {})
        target[keys[-1]] = _parse_value(text.strip())
    return PsfMatchConfig.from_mapping(values)


def _demo(args):
    from .io import write_masked_image
    from .task import ImagePsfMatchTask
    from .testing import make_fake_pair

    start = time.perf_counter()
    pair = make_fake_pair(shape=(args.size, args.size), n_stars=args.stars, seed=args.seed,
                          n_variables=args.variables, n_transients=args.transients)
    simulate = time.perf_counter() - start
    config = PsfMatchConfig(fit_for_background=True, spatial_kernel_order=args.kernel_order)
    result = ImagePsfMatchTask(config).subtract_masked_images(pair.template, pair.science)
    changed = [(s["x"], s["y"], 12) for s in pair.stars[pair.stars["kind"] != "star"]]
    mean, std, n_good = _residual_summary(result.subtracted_image, changed)
    centre = 0.5 * (args.size - 1)
    print(f"gpudiffim {__version__} demo: {args.size}x{args.size} simulated pair, {args.stars} stars, "
          f"seed {args.seed}")
    print(f"  kernel: {result.kernel_basis.n_basis} {result.kernel_basis.kind} bases, "
          f"{result.kernel_basis.width}x{result.kernel_basis.width} px, spatial order {args.kernel_order}")
    print(f"  FWHM template / science: {result.template_fwhm_pix:.2f} / {result.science_fwhm_pix:.2f} px")
    print(f"  kernel sum at centre: {result.psf_matching_kernel.kernel_sum(centre, centre):.5f} "
          f"(truth {pair.kernel.kernel_sum(centre, centre):.5f})")
    print(f"  candidates: {_candidate_summary(result.kernel_cell_set)}")
    print(f"  background at centre: {result.background_model(centre, centre):.3f} "
          f"(truth {pair.background(centre, centre):.3f})")
    print(f"  difference / sigma over {n_good} unflagged px away from the {args.variables} variables "
          f"and {args.transients} transients: mean {mean:+.4f}, std {std:.4f} (pure noise: 0, 1)")
    print("  time per stage (s): " + ", ".join(f"{k} {v:.3f}" for k, v in
                                                 {"simulation": simulate, **result.timings}.items()))
    if args.output:
        write_masked_image(args.output, result.subtracted_image, overwrite=True,
                           header={"GDIFFVER": __version__,
                                   "KSUM": result.psf_matching_kernel.kernel_sum(centre, centre),
                                   "NGOOD": result.kernel_cell_set.n_good,
                                   "NBAD": result.kernel_cell_set.n_bad})
        print(f"  difference image written to {args.output}")
    return 0


def _read(prefix, args):
    from .io import read_exposure

    options = {name: getattr(args, f"{prefix}_{name}") for name in
               ("hdu", "variance", "sigma", "mask", "weight", "psf", "gain", "read_noise",
                "saturation")}
    hdu = options.pop("hdu")
    if hdu is not None and hdu.isdigit():
        hdu = int(hdu)
    return read_exposure(getattr(args, prefix), hdu=hdu, **{k: v for k, v in options.items() if v is not None})


def _input_paths(args):
    """Every file the command reads (images, maps, PSFs, candidates, config)."""
    names = ["science", "template", "candidates", "config_file"]
    names += [f"{prefix}_{name}" for prefix in ("science", "template")
              for name in ("variance", "sigma", "mask", "weight", "psf")]
    return [getattr(args, name) for name in names if getattr(args, name, None)]


def _check_outputs(args):
    """Refuse unusable output paths before any input is read.

    Raises
    ------
    ConfigurationError
        If an output exists without ``--overwrite``, its folder is missing,
        it is also an input or another output, or ``--plots`` names a file.
    """
    inputs = {os.path.realpath(path): path for path in _input_paths(args)}
    outputs = {}
    for option, path in (("-o/--output", args.output), ("--matched", args.matched)):
        if not path:
            continue
        real = os.path.realpath(path)
        if real in inputs:
            msg = f"{option} {path} is also an input ({inputs[real]}): choose another output file"
            raise ConfigurationError(msg)
        if real in outputs:
            msg = f"{option} {path} is also {outputs[real]}: choose two different output files"
            raise ConfigurationError(msg)
        outputs[real] = option
        folder = os.path.dirname(real)
        if not os.path.isdir(folder):
            msg = f"{option} {path}: folder {os.path.dirname(path) or folder} does not exist"
            raise ConfigurationError(msg)
        if os.path.isdir(real):
            msg = f"{option} {path} is a folder: name a FITS file"
            raise ConfigurationError(msg)
        if os.path.exists(real) and not args.overwrite:
            msg = f"{option} {path} exists: pass --overwrite to replace it"
            raise ConfigurationError(msg)
    if args.plots and os.path.exists(args.plots) and not os.path.isdir(args.plots):
        msg = f"--plots {args.plots} is a file, not a folder: name a folder for the figures"
        raise ConfigurationError(msg)


def _read_candidates(path):
    """Candidate positions (x, y in parent pixels) from a CSV or FITS table.

    The columns are those :func:`gpudiffim.candidates.candidate_positions` reads.

    Raises
    ------
    ConfigurationError
        If the file cannot be read as such a table.
    """
    from astropy.table import Table

    from .candidates import candidate_positions

    if path is None:
        return None
    is_csv = path.lower().endswith((".csv", ".txt"))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # astropy's unit/format chatter; bad content raises below
            table = Table.read(path, format="ascii.csv" if is_csv else None)
    except Exception as error:  # astropy raises many kinds for a malformed file
        msg = f"--candidates {path}: cannot read a table ({type(error).__name__}: {error})"
        raise ConfigurationError(msg) from None
    try:
        positions = candidate_positions(table)  # the task's own reading of a candidate table
    except ConfigurationError as error:
        msg = f"--candidates {path}: {error}"
        raise ConfigurationError(msg) from None
    log.info("%d kernel candidate(s) read from %s", len(positions), path)
    return positions


def _plot_names(args):
    """Figure names for ``--plots`` (checked before the fit), or None without ``--plots``."""
    if args.debug and not args.plots:
        msg = "--debug selects the figures of --plots DIR: pass --plots too"
        raise ConfigurationError(msg)
    if not args.plots:
        return None
    from .diagnostics import check_debug_names, require_matplotlib

    require_matplotlib()
    names = [name.strip() for text in (args.debug or ["display"]) for name in text.split(",")]
    return check_debug_names([name for name in names if name])


def _config_defaults(args):
    """Config fields set by dedicated command-line options (``--config`` overrides them)."""
    defaults = {}
    if args.variance_correction is not None:
        defaults["variance_correction"] = args.variance_correction
    if args.variance_scale_limit is not None:
        defaults["variance_correction_limit"] = args.variance_scale_limit
    if args.convolve is not None:
        defaults["convolve"] = args.convolve
    for name in ("decorrelate", "score"):
        if getattr(args, name):
            defaults[name] = True
    if args.score_fit is not None:
        defaults["score_fit"] = args.score_fit
    if args.detect is not None:
        defaults["source_threshold"] = args.detect
    return defaults


def _provenance(config, result, centre):
    """Header cards of the outputs: version, kernel, candidates, variance correction, orders, config.

    ``VARCORR`` is the variance correction asked for; ``VCTAPPL``/``VCSAPPL``
    what was applied to the template/science ("scale", "add" or "none") and
    ``VCTVAL``/``VCSVAL`` the factor or the variance added.  ``SPKORDER`` and
    ``SPBORDER`` are the spatial orders used (lowered when the candidates
    support fewer terms).  ``NCORAPPL`` says how the matched variance took the
    convolved image's noise correlation into account ("none", "constant",
    "map", or "off" when disabled), ``NCORFAC`` is the variance factor at the
    centre and ``NCORRHO1`` the measured correlation at a lag of one pixel in x.
    ``CONVMODE`` is the direction asked for ("template", "science", "auto";
    ``CONVOLVD`` the one chosen), ``DECORR`` whether the difference was
    decorrelated (``DECGRID``: node spacing in px, 0 for one kernel at the
    centre) and ``SCORE`` whether the output is a score image in S/N per
    pixel; ``DPSFSRC`` names the PSF the difference has (the ``PSF`` HDU at the
    centre, the ``DIFFPSF`` table on a grid).
    """
    diagnostics = result.diagnostics
    cards = {"GDIFFVER": __version__, "CONVOLVD": result.convolved,
             "KSUM": result.psf_matching_kernel.kernel_sum(*centre),
             "NGOOD": result.kernel_cell_set.n_good, "NBAD": result.kernel_cell_set.n_bad,
             "SPKORDER": diagnostics["spatial_kernel_order"], "SPBORDER": diagnostics["spatial_bg_order"],
             "VARCORR": diagnostics["variance_correction"]["mode"]}
    for key, name in (("VCT", "template"), ("VCS", "science")):
        done = diagnostics["variance_correction"][name]
        cards[f"{key}APPL"] = done.applied if done else "none"
        if done and done.applied != "none":
            cards[f"{key}VAL"] = done.value
    correlation = diagnostics.get("noise_correlation")
    cards["NCORAPPL"] = correlation.applied if correlation else "off"
    if correlation:
        cards["NCORFAC"] = correlation.factor
        cards["NCORRHO1"] = float(correlation.correlation.rho[correlation.correlation.max_lag,
                                                               correlation.correlation.max_lag + 1])
    cards["CONVMODE"] = diagnostics["direction"]["requested"]
    cards["DECORR"] = result.decorrelation is not None
    if result.decorrelation is not None:
        cards["DECGRID"] = config.decorrelation_grid_step
    cards["SCORE"] = result.score is not None
    if result.difference_psf is not None:
        cards["DPSFSRC"] = result.difference_psf.source
    cards["CONFIG"] = json.dumps(config.to_dict(), sort_keys=True)
    return cards


def _tables(config, result):
    """Table HDUs of the difference file: ``QUALITY`` (when kept) and ``DIFFPSF`` (the PSF on a 3 x 3 grid)."""
    from .difference_psf import difference_psf_table

    tables = {}
    if config.quality_report:
        tables["QUALITY"] = result.quality
    if result.difference_psf is not None:
        tables["DIFFPSF"] = difference_psf_table(result.difference_psf, result.subtracted_image.bbox())
    return tables or None


def _subtract(args):
    from ._backend import tune_host_allocator
    from .io import write_exposure
    from .task import ImagePsfMatchTask

    _check_outputs(args)
    tune_host_allocator()     # a process of its own: freed planes are reused, not faulted in anew
    plot_names = _plot_names(args)
    config = build_config(args.config, args.config_file, defaults=_config_defaults(args))
    candidates = _read_candidates(args.candidates)
    science, template = _read("science", args), _read("template", args)
    # --plots: the task draws the figures from the images it fitted (variance-corrected, cut to
    # the overlap); results do not keep them
    task = ImagePsfMatchTask(config, debug=plot_names or (), debug_dir=args.plots if plot_names else None)
    try:
        result = task.subtract_exposures(template, science, candidates=candidates,
                                         template_fwhm_pix=args.template_fwhm,
                                         science_fwhm_pix=args.science_fwhm,
                                         do_warping=not args.no_warp)
    except RegistrationError as error:
        msg = f"{error} (science {args.science}, template {args.template})"
        raise RegistrationError(msg) from None
    x0, y0, x1, y1 = result.subtracted_image.bbox()
    centre = (0.5 * (x0 + x1), 0.5 * (y0 + y1))
    provenance = _provenance(config, result, centre)
    write_exposure(args.output, result.subtracted_exposure, kernel=result.psf_matching_kernel,
                   background=result.background_model, provenance=provenance,
                   tables=_tables(config, result), sources=result.sources,
                   overwrite=args.overwrite)
    if args.matched:
        write_exposure(args.matched, result.matched_exposure, kernel=result.psf_matching_kernel,
                       provenance=provenance, overwrite=args.overwrite)
    mean, std, n_good = _residual_summary(result.subtracted_image)
    log.info("kernel sum at centre %.5f; candidates: %s", provenance["KSUM"],
             _candidate_summary(result.kernel_cell_set))
    log.info("difference / sigma over %d unflagged px: mean %+.4f, std %.4f", n_good, mean, std)
    log.info("time per stage (s): %s", ", ".join(f"{k} {v:.3f}" for k, v in result.timings.items()))
    log.info("difference written to %s", args.output)
    if plot_names:
        log.info("figures written to %s", args.plots)
    return 0


def _info(args):
    import astropy
    import scipy

    from ._backend import backend_info, compute_backend

    compute_backend()  # an unusable requested backend is an error here, as in subtract
    info = backend_info()
    print(f"gpudiffim {__version__}")
    print(f"python {platform.python_version()}, numpy {np.__version__}, scipy {scipy.__version__}, "
          f"astropy {astropy.__version__}")
    print(f"backend: {info['backend']} (requested {info['requested']}); device: {info['device'] or 'none'}"
          + (f"; CuPy {info['cupy']}, CUDA runtime {info['cuda_runtime']}" if info["cupy"] else "")
          + (f"; CuPy not used: {info['reason']}" if info["reason"] else ""))
    return 0


def _add_exposure_options(parser, prefix):
    group = parser.add_argument_group(f"{prefix} inputs")
    group.add_argument(f"--{prefix}-hdu", help="HDU name or index of the image")
    for name, text in (("variance", "variance"), ("sigma", "1-sigma error"),
                       ("mask", "integer mask"), ("weight", "inverse-variance weight"),
                       ("psf", "PSF image")):
        group.add_argument(f"--{prefix}-{name}", help=f"FITS file with the {prefix} {text} map")
    for name, text in (("gain", "gain (e-/ADU)"), ("read-noise", "read noise (e-)"),
                       ("saturation", "saturation level (ADU)")):
        group.add_argument(f"--{prefix}-{name}", type=float, help=f"{prefix} {text}, overriding the header")


def _parser():
    parser = argparse.ArgumentParser(prog="gpudiffim", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"gpudiffim {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every stage (DEBUG)")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    commands = parser.add_subparsers(dest="command", required=True)

    subtract = commands.add_parser("subtract", help="PSF-match a template to a science image and subtract")
    subtract.add_argument("science", help="science FITS file")
    subtract.add_argument("template", help="template FITS file")
    subtract.add_argument("-o", "--output", required=True, help="difference image (FITS, LSST layout)")
    subtract.add_argument("--matched", help="also write the matched image here")
    subtract.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    subtract.add_argument("--config", action="append", metavar="FIELD=VALUE",
                          help="PsfMatchConfig field (repeatable; detection.FIELD for detection)")
    subtract.add_argument("--config-file", help="JSON file of PsfMatchConfig fields")
    subtract.add_argument("--convolve", choices=("template", "science", "auto"),
                          help="image to convolve (config field convolve; default template): auto "
                               "convolves the one with the narrower PSF, compared per axis")
    subtract.add_argument("--decorrelate", action="store_true",
                          help="whiten the difference's noise (config field decorrelate), following the "
                               "spatial kernel on a grid of decorrelation_grid_step px")
    subtract.add_argument("--detect", type=float, metavar="SIGMA",
                          help="detect positive and negative sources on the output at SIGMA (config field "
                               "source_threshold): PSF fluxes, S/N and dipoles, written as a SOURCES table")
    subtract.add_argument("--score", action="store_true",
                          help="write a score image in S/N per pixel instead of the difference (config "
                               "field score): the difference correlated with the science PSF (see --score-fit), "
                               "decorrelated in score mode")
    subtract.add_argument("--score-fit", choices=("difference", "preconvolved"),
                          help="how --score fits its kernel (config field score_fit): the plain fit's, the "
                               "difference correlated with the PSF (default; about as fast as --decorrelate), "
                               "or against the preconvolved science image (Rubin's; about 8x the fit)")
    subtract.add_argument("--template-fwhm", type=float, help="template PSF FWHM (px)")
    subtract.add_argument("--science-fwhm", type=float, help="science PSF FWHM (px)")
    subtract.add_argument("--no-warp", action="store_true", help="fail instead of warping the template")
    subtract.add_argument("--candidates", metavar="FILE",
                          help="kernel candidates: a CSV (header x,y) or FITS table with columns x and y "
                               "in parent pixels of the science image, instead of detecting them")
    subtract.add_argument("--variance-correction", choices=("auto", "scale", "add", "none"),
                          help="match each variance plane to the measured sky noise (config field "
                               "variance_correction): 'scale' it (as Rubin's doScaleVariance), 'add' the "
                               "missing sky variance (sky-subtracted frames whose variance lacks the sky), "
                               "'auto' (default: scale when the factor is at most 2, else add), or 'none'")
    subtract.add_argument("--variance-scale-limit", type=float,
                          help="largest variance correction ratio accepted (default 1000; config field "
                               "variance_correction_limit)")
    subtract.add_argument("--backend", choices=("auto", "numpy", "cupy", "cuda-emulator"),
                          help="compute backend (default: GPUDIFFIM_BACKEND, else auto: CuPy where a CUDA "
                               "device answers, else NumPy; cuda-emulator runs the CUDA kernels on the "
                               "CPU, slowly, for verification)")
    subtract.add_argument("--plots", metavar="DIR",
                          help="write diagnostic figures (PNG) and a PDF report to DIR after the fit "
                               "(needs matplotlib: pip install gpudiffim[plot])")
    subtract.add_argument("--debug", action="append", metavar="NAME[,NAME]",
                          help="figures for --plots, by ip_diffim debug name (repeatable): "
                               "displayCandidates, displayKernelBasis, displayKernelMosaic, "
                               "plotKernelSpatialModel, plotKernelCoefficients, displayTemplate, "
                               "displaySciIm, displaySpatialCells, displayDiffIm; default display (all)")
    _add_exposure_options(subtract, "science")
    _add_exposure_options(subtract, "template")
    subtract.set_defaults(run=_subtract)

    demo = commands.add_parser("demo", help="simulate a pair with a known kernel and subtract it")
    demo.add_argument("--size", type=int, default=1024, help="image side in pixels (default 1024)")
    demo.add_argument("--stars", type=int, default=1000, help="number of stars (default 1000)")
    demo.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    demo.add_argument("--variables", type=int, default=5, help="variable stars (default 5)")
    demo.add_argument("--transients", type=int, default=5, help="transients (default 5)")
    demo.add_argument("--kernel-order", type=int, default=2, help="spatial kernel order (default 2)")
    demo.add_argument("--output", default="gpudiffim-demo-difference.fits",
                      help="FITS file for the difference image ('' to skip)")
    demo.set_defaults(run=_demo)

    info = commands.add_parser("info", help="versions, backend and device")
    info.set_defaults(run=_info)
    _add_batch_parser(commands, subtract)
    return parser


def _add_batch_parser(commands, subtract):
    """``gpudiffim batch``: its own options, then every subtract option a batch takes."""
    from .batch import NOT_BATCH_OPTIONS

    batch = commands.add_parser("batch", help="subtract the pairs of a CSV file on a Dask cluster")
    batch.add_argument("pairs", help="CSV with columns science,template[,output][,subtract options]")
    batch.add_argument("--out", required=True, metavar="DIR",
                       help="folder of the outputs and of manifest.csv (created if missing)")
    batch.add_argument("--scheduler", metavar="ADDRESS",
                       help="address of a running Dask scheduler (default: a local cluster)")
    batch.add_argument("--workers", type=int, help="worker processes of the local cluster (default: cores)")
    batch.add_argument("--retries", type=int, default=1,
                       help="retries of a pair after an unexpected error or a lost worker (default 1)")
    batch.add_argument("--redo", action="store_true",
                       help="run every pair again, even those complete or failed with the same inputs")
    batch.add_argument("--no-dashboard", action="store_true", help="do not serve the Dask dashboard")
    for action in subtract._actions:
        if action.option_strings and action.dest not in NOT_BATCH_OPTIONS:
            batch._add_action(action)
    batch.set_defaults(run=_batch)


def _batch_options(args):
    """The subtract options given to ``gpudiffim batch`` (those differing from their defaults)."""
    from .batch import batch_option_actions

    return {dest: getattr(args, dest) for dest, action in batch_option_actions().items()
            if getattr(args, dest, None) != action.default}


def _batch(args):
    from .batch import EXIT_PAIRS_FAILED, ProgressLine, _require_distributed, dashboard_address, subtract_many

    distributed = _require_distributed()
    if not args.verbose:  # the scheduler's and workers' INFO chatter; their warnings still show
        logging.getLogger("distributed").setLevel(logging.WARNING)
    if args.workers is not None and args.workers < 1:
        msg = f"--workers must be at least 1, got {args.workers}"
        raise ConfigurationError(msg)
    if args.retries < 0:
        msg = f"--retries must be at least 0, got {args.retries}"
        raise ConfigurationError(msg)
    client = None
    if args.scheduler:
        try:
            client = distributed.Client(args.scheduler, timeout="30s")
        except OSError as error:
            msg = f"--scheduler {args.scheduler}: cannot connect ({error})"
            raise ConfigurationError(msg) from None
    try:
        batch = subtract_many(args.pairs, args.out, client, options=_batch_options(args), retries=args.retries,
                              redo=args.redo, wait=False, n_workers=args.workers,
                              dashboard=not args.no_dashboard)
        link = dashboard_address(batch.client)
        if link:
            log.info("Dask dashboard: %s", link)
        batch.wait(ProgressLine())
    finally:
        if client is not None:
            client.close()
    log.info("%s", batch.summary())
    counts = batch.counts()
    return EXIT_PAIRS_FAILED if counts["failed"] + counts["error"] else 0


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """Warnings as one line on stderr (``warning: ...``), without source paths."""
    print(f"warning: {message}", file=sys.stderr if file is None else file)


def _run(args):
    backend = getattr(args, "backend", None)
    if backend is None:
        return args.run(args)
    from ._backend import use_backend

    with use_backend(backend):
        return args.run(args)


def main(argv=None):
    """Entry point of the ``gpudiffim`` command; returns the exit code."""
    args = _parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        with warnings.catch_warnings():
            if not args.verbose:
                warnings.showwarning = _show_warning
            return _run(args)
    except (NoKernelCandidatesError, SingularSystemError) as error:
        if args.verbose:
            raise
        print(f"gpudiffim: fit failed: {error}", file=sys.stderr)
        return EXIT_FIT_FAILED
    except (GpudiffimError, OSError, ValueError, TypeError) as error:
        if args.verbose:
            raise
        print(f"gpudiffim: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
