#!/usr/bin/env python
"""Benchmark gpudiffim's subtraction against HOTPANTS on one simulated pair.

Steps: simulate a template/science pair (``gpudiffim.testing.make_fake_pair``);
write it as plain FITS for HOTPANTS; estimate the arithmetic of the main stages;
time ``ImagePsfMatchTask.subtract_masked_images`` in this process (one warm-up,
then ``--rounds``); measure its peak RSS in a fresh subprocess; run HOTPANTS
with a 10x10 and a 40x40 stamp grid (``--rounds`` each, wall clock and peak
RSS of the child); compare the difference images in noise units on the same
central pixels; print a markdown table.

HOTPANTS is optional: when the binary is missing or fails, that part is
reported and skipped.  Nothing is written outside ``--workdir`` (a temporary
folder by default) and ``--json``.

Run from the repository root::

    python bench/bench_subtract.py --size 2048 --stars 4000 --rounds 3 --json bench/result.json
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.fft

_HERE = Path(__file__).resolve().parent
_REPO = _HERE.parent
try:
    import gpudiffim  # noqa: F401
except ImportError:       # running from a checkout that is not installed
    sys.path.insert(0, str(_REPO))

from _machine import machine_info  # noqa: E402

from gpudiffim import ImagePsfMatchTask, PsfMatchConfig  # noqa: E402
from gpudiffim._backend import tune_host_allocator  # noqa: E402
from gpudiffim.convolve import TILE_SIDE, _tile_grid  # noqa: E402
from gpudiffim.testing import make_fake_pair  # noqa: E402

#: gpudiffim's configuration: its defaults, ``PsfMatchConfig()`` (issue 17
#: compares each tool at its defaults).
CONFIG_KWARGS = {}

#: What makes the comparison like-for-like with HOTPANTS' -ko 2 -bgo 1
#: (background fitted); the defaults have these values (checked at run time,
#: and the like-for-like configuration gets its own row if they ever differ).
LIKE_FOR_LIKE_KWARGS = dict(fit_for_background=True, spatial_kernel_order=2, spatial_bg_order=1)


def defaults_are_like_for_like():
    """Whether ``PsfMatchConfig()`` has the values of :data:`LIKE_FOR_LIKE_KWARGS`."""
    config = PsfMatchConfig()
    return all(getattr(config, key) == value for key, value in LIKE_FOR_LIKE_KWARGS.items())

#: HOTPANTS options matching gpudiffim's defaults (21x21 kernel, 3 Gaussians
#: sigma 0.7/1.5/3.0 with degrees 4/2/2, kernel order 2, background order 1,
#: convolve the template, no normalisation of the output).  Thresholds are
#: opened wide so that no pixel is masked; gain 4 / read noise 0 only matter
#: without the sigma maps, which we always pass (-tni/-ini).
HOTPANTS_OPTIONS = ["-r", "10", "-rss", "15", "-ng", "3", "4", "0.7", "2", "1.5", "2", "3.0",
                    "-ko", "2", "-bgo", "1", "-c", "t", "-n", "i",
                    "-tu", "1e6", "-tl", "-1e4", "-iu", "1e6", "-il", "-1e4",
                    "-tg", "4", "-tr", "0", "-ig", "4", "-ir", "0", "-nss", "3", "-v", "0"]
HOTPANTS_GRIDS = (10, 40)
#: HOTPANTS' own default stamp grid (-nsx/-nsy 10).
HOTPANTS_DEFAULT_GRID = 10

#: gpudiffim with about as many stamps as HOTPANTS' default 10x10 grid: one
#: star per cell, cells sized for a 10x10 grid (the cell size scales with the image).
def sparse_config_kwargs(size):
    cell = max(32, -(-size // 10))
    return dict(LIKE_FOR_LIKE_KWARGS, size_cell_x=cell, size_cell_y=cell, n_star_per_cell=1)

#: Bits that exclude a pixel from the quality statistic.
BAD_PLANES = ("NO_DATA", "EDGE", "SAT")


# --------------------------------------------------------------------------
# Child processes
# --------------------------------------------------------------------------

#: Peak-RSS launchers.  A child forked from this (large) Python process
#: inherits its RSS high-water mark across exec, so neither ``os.wait4`` nor
#: ``RUSAGE_CHILDREN`` deltas measure the child alone; a small intermediate
#: process that forks the command itself does.  GNU time is preferred (about
#: 2 MB of its own); the fallback is a minimal Python (about 10 MB), which
#: then is a floor of the reported figure.
_TRAMPOLINE = ("import os, sys; pid = os.posix_spawnp(sys.argv[2], sys.argv[2:], os.environ); "
               "_, status, usage = os.wait4(pid, 0); "
               "open(sys.argv[1], 'w').write(str(usage.ru_maxrss)); "
               "sys.exit(os.waitstatus_to_exitcode(status))")


def _gnu_time():
    path = "/usr/bin/time"
    if not os.access(path, os.X_OK):
        return None
    probe = subprocess.run([path, "--version"], capture_output=True, text=True)
    return path if "GNU" in probe.stdout + probe.stderr else None


GNU_TIME = _gnu_time()
RSS_METHOD = "GNU time %M" if GNU_TIME else "python -I -S posix_spawn + wait4 (floor ~10 MB)"


def run_measured(command, stdout, stderr, timeout=None):
    """Run ``command``; return (returncode, wall seconds, peak RSS in MB of the command).

    The wall time is ``time.perf_counter`` around the whole launch, so it
    includes the launcher (about a millisecond for GNU time).
    """
    rss_file = Path(str(stdout) + ".maxrss")
    if GNU_TIME:
        launcher = [GNU_TIME, "-f", "%M", "-o", str(rss_file)]
    else:
        launcher = [sys.executable, "-I", "-S", "-c", _TRAMPOLINE, str(rss_file)]
    with open(stdout, "wb") as out, open(stderr, "wb") as err:
        start = time.perf_counter()
        try:
            rc = subprocess.run(launcher + [str(c) for c in command], stdout=out, stderr=err,
                                timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = 124
        wall = time.perf_counter() - start
    try:
        peak = int(rss_file.read_text().split()[-1]) / 1024.0    # KiB -> MiB
    except (OSError, ValueError, IndexError):
        peak = float("nan")
    return rc, wall, peak


_CHILD = r"""
import json, sys, time
def hwm():  # VmHWM belongs to this process image (reset at exec), unlike ru_maxrss
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")
sys.path.insert(0, {repo!r})
import numpy as np
from gpudiffim import ImagePsfMatchTask, MaskedImage, PsfMatchConfig
from gpudiffim._backend import tune_host_allocator
if {tuned!r}:
    tune_host_allocator()
planes = np.load({planes!r})
images = [MaskedImage(planes[k + "_image"], planes[k + "_mask"], planes[k + "_variance"])
          for k in ("template", "science")]
del planes
loaded = hwm()
task = ImagePsfMatchTask(PsfMatchConfig(**{config!r}))
start = time.perf_counter()
result = task.subtract_masked_images(*images)
wall = time.perf_counter() - start
peak = hwm()
json.dump(dict(loaded_rss_mb=loaded, peak_rss_mb=peak, wall_s=wall), sys.stdout)
"""


def gpudiffim_memory(workdir, planes_path, tuned):
    """Peak RSS of one subtraction in a fresh Python process (its allocator ``tuned`` as this one's)."""
    code = _CHILD.format(repo=str(_REPO), planes=str(planes_path), config=CONFIG_KWARGS, tuned=bool(tuned))
    out, err = workdir / "gpudiffim_child.out", workdir / "gpudiffim_child.err"
    rc, wall, rss = run_measured([sys.executable, "-c", code], out, err)
    if rc != 0:
        return dict(error=f"child exited {rc}: {err.read_text()[-500:]}")
    report = json.loads(out.read_text())
    report.update(process_wall_s=wall, process_peak_rss_mb=rss)
    return report


# --------------------------------------------------------------------------
# Work estimate
# --------------------------------------------------------------------------

def _fft_flops(n_points):
    """2.5 n log2 n: the usual count for one real-input FFT of n points."""
    return 2.5 * n_points * math.log2(n_points)


def work_estimate(shape, n_stamps, n_basis, kernel_width, stamp_width, kernel_order,
                  fit_background):
    """Rough FLOP and byte counts of the main stages (counted, not measured).

    Returns a list of (stage, flops, bytes, how it was counted).
    """
    h = kernel_width // 2
    fit_side = stamp_width - 2 * h
    fit_pixels = fit_side**2
    kernel_pixels = kernel_width**2
    n_params = n_basis + int(fit_background)
    rows = []
    # stamp correlations, as a direct sum
    flops = n_stamps * n_basis * fit_pixels * kernel_pixels * 2
    bytes_ = n_stamps * n_basis * fit_pixels * 8            # correlated columns, float64, written
    rows.append(("stamp correlations (direct sum)", flops, bytes_,
                 f"N={n_stamps} x K={n_basis} x F^2={fit_pixels} x k^2={kernel_pixels} x 2"))
    # as implemented: FFT of each stamp, K inverse FFTs per stamp
    n = scipy.fft.next_fast_len(stamp_width, real=True)
    n_ffts = n_stamps * (1 + n_basis) + n_basis
    spectrum = n * (n // 2 + 1)
    flops = n_ffts * _fft_flops(n * n) + n_stamps * n_basis * spectrum * 6
    bytes_ = n_stamps * n_basis * spectrum * 16 * 2 + n_stamps * n_basis * fit_pixels * 8
    rows.append(("stamp correlations (FFT, as implemented)", flops, bytes_,
                 f"{n_ffts} FFTs of {n}^2 + products"))
    # normal equations M = C^T W C, b = C^T W S
    flops = n_stamps * (n_params**2 + n_params) * fit_pixels * 2
    bytes_ = n_stamps * n_params * fit_pixels * 8 * 3         # read C twice, weighted copy
    rows.append(("normal equations", flops, bytes_,
                 f"N x P^2={n_params}^2 x F^2 x 2"))
    # full image: image and variance correlations by FFT of overlap-save tiles (NumPy backend)
    grids = [_tile_grid(s, kernel_width, TILE_SIDE) for s in shape]
    n_tiles = len(grids[0][0]) * len(grids[1][0])
    tile = grids[0][2] * grids[1][2]
    n_padded = n_tiles * tile
    n_terms = (kernel_order + 1) * (kernel_order + 2) // 2
    n_var_terms = (2 * kernel_order + 1) * (2 * kernel_order + 2) // 2
    n_full = 2 + n_terms + n_var_terms                        # 2 forward, one inverse per term
    pixels = shape[0] * shape[1]
    flops = n_full * n_tiles * _fft_flops(tile) + (n_terms + n_var_terms) * (3 * n_padded + 3 * pixels)
    # each 2-D FFT: two passes over a complex64 spectrum (read + write), and the
    # complex product per term; each term: weight the float32 output and accumulate (3 passes)
    spectrum = n_tiles * grids[0][2] * (grids[1][2] // 2 + 1) * 8
    bytes_ = n_full * 2 * 2 * spectrum + (n_terms + n_var_terms) * (3 * spectrum + pixels * 4 * 5)
    rows.append(("full-image convolution", flops, bytes_,
                 f"{n_full} FFTs of {n_tiles} tiles of {grids[0][2]}x{grids[1][2]} ({n_terms} image + "
                 f"{n_var_terms} variance terms)"))
    return rows


def print_estimate(rows):
    print("\nWork estimate (counted from the sizes, not measured; rough):")
    print(f"  {'stage':42s} {'GFLOP':>9s} {'GB moved':>9s}  basis")
    for stage, flops, bytes_, how in rows:
        print(f"  {stage:42s} {flops / 1e9:9.2f} {bytes_ / 1e9:9.2f}  {how}")


# --------------------------------------------------------------------------
# HOTPANTS
# --------------------------------------------------------------------------

def _parse_hotpants_log(text):
    """Stamp counts from HOTPANTS' stderr: (used, built, effective grid)."""
    used = built = None
    grid = None
    for line in text.splitlines():
        words = line.split()
        if "stamps built" in line and words and words[0].isdigit():
            built = int(words[0])
        if "stamps remain" in line and len(words) >= 4 and words[0].isdigit() \
                and words[3].isdigit():                       # "82 out of 82 stamps remain"
            used, total = int(words[0]), int(words[3])
            built = built if built is not None else total
        if line.strip().startswith("using nsx"):
            grid = line.strip()[len("using "):]
    return used, built, grid


def run_hotpants(binary, workdir, grid, rounds):
    """Run HOTPANTS ``rounds`` times with an ``grid x grid`` stamp grid."""
    out_image = workdir / f"hotpants_diff_{grid}.fits"
    out_noise = workdir / f"hotpants_noise_{grid}.fits"
    command = [binary, "-inim", str(workdir / "science.fits"),
               "-tmplim", str(workdir / "template.fits"),
               "-tni", str(workdir / "template_sigma.fits"),
               "-ini", str(workdir / "science_sigma.fits"),
               "-outim", str(out_image), "-oni", str(out_noise),
               *HOTPANTS_OPTIONS, "-nsx", str(grid), "-nsy", str(grid)]
    walls, peaks = [], []
    log_out, log_err = workdir / f"hotpants_{grid}.out", workdir / f"hotpants_{grid}.err"
    for _ in range(rounds):
        for path in (out_image, out_noise):
            if path.exists():
                path.unlink()
        rc, wall, rss = run_measured(command, log_out, log_err, timeout=3600)
        if rc != 0:
            tail = log_err.read_text(errors="replace")[-800:]
            return dict(grid=grid, error=f"hotpants exited {rc}: {tail}",
                        command=" ".join(command))
        walls.append(wall)
        peaks.append(rss)
    used, built, effective = _parse_hotpants_log(log_err.read_text(errors="replace"))
    from astropy.io import fits

    with fits.open(out_image) as hdus:
        header = hdus[0].header
        difference = np.asarray(hdus[0].data, dtype=np.float64)
        kernel_sum = float(header.get("KSUM00", "nan"))
        mask_value = float(header.get("MASKVAL", 1e-30))
    noise = np.asarray(fits.getdata(out_noise), dtype=np.float64)
    return dict(grid=grid, effective_grid=effective, stamps_used=used, stamps_built=built,
                wall_s=walls, wall_min_s=min(walls), wall_median_s=statistics.median(walls),
                peak_rss_mb=max(peaks), kernel_sum=kernel_sum, command=" ".join(command),
                _difference=difference, _noise=noise, _mask_value=mask_value)


# --------------------------------------------------------------------------
# Quality
# --------------------------------------------------------------------------

def central_region(shape, kernel_width):
    """Slices of the central region: a margin of max(size/8, 2 kernel widths)."""
    margin_y = max(shape[0] // 8, 2 * kernel_width)
    margin_x = max(shape[1] // 8, 2 * kernel_width)
    return np.s_[margin_y:shape[0] - margin_y, margin_x:shape[1] - margin_x]


def normalised_std(values):
    """(std, robust std = 1.4826 MAD) of finite values."""
    values = values[np.isfinite(values)]
    median = np.median(values)
    return float(np.std(values)), float(1.4826 * np.median(np.abs(values - median)))


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------

def write_inputs(pair, workdir):
    """Plain single-HDU float32 FITS for HOTPANTS, and the exact planes for the child."""
    from astropy.io import fits

    for name, masked in (("template", pair.template), ("science", pair.science)):
        image = np.asarray(masked.image, dtype=np.float32)
        sigma = np.sqrt(np.asarray(masked.variance, dtype=np.float64)).astype(np.float32)
        fits.PrimaryHDU(image).writeto(workdir / f"{name}.fits", overwrite=True)
        fits.PrimaryHDU(sigma).writeto(workdir / f"{name}_sigma.fits", overwrite=True)
    planes = {f"{name}_{plane}": np.asarray(getattr(masked, plane))
              for name, masked in (("template", pair.template), ("science", pair.science))
              for plane in ("image", "mask", "variance")}
    path = workdir / "planes.npz"
    np.savez(path, **planes)
    return path


def time_gpudiffim(pair, rounds, config_kwargs=CONFIG_KWARGS):
    task = ImagePsfMatchTask(PsfMatchConfig(**config_kwargs))
    start = time.perf_counter()
    result = task.subtract_masked_images(pair.template, pair.science)
    warmup = time.perf_counter() - start
    walls, best = [], result
    del result                 # one result alive at a time, as in a pipeline (the rounds do not pile up memory)
    for _ in range(rounds):
        start = time.perf_counter()
        r = task.subtract_masked_images(pair.template, pair.science)
        walls.append(time.perf_counter() - start)
        if walls[-1] <= min(walls):
            best = r
        del r
    return warmup, walls, best


def _fmt(value, spec):
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) \
        else format(value, spec)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=2048, help="image side (px)")
    parser.add_argument("--stars", type=int, default=4000, help="stars in the simulation")
    parser.add_argument("--seed", type=int, default=1, help="simulation seed")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per tool/config")
    parser.add_argument("--hotpants", default=os.environ.get("HOTPANTS", "/tmp/hotpants/hotpants"),
                        help="HOTPANTS binary (default $HOTPANTS or /tmp/hotpants/hotpants)")
    parser.add_argument("--workdir", help="folder for the FITS files (temporary by default)")
    parser.add_argument("--json", help="write the results to this JSON file")
    parser.add_argument("--default-allocator", action="store_true",
                        help="leave glibc's malloc thresholds alone (default: tune them as the command "
                             "line does, gpudiffim._backend.tune_host_allocator)")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    args.allocator_tuned = False if args.default_allocator else tune_host_allocator()

    if args.workdir:
        workdir = Path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        cleanup = None
    else:
        cleanup = tempfile.TemporaryDirectory(prefix="gpudiffim-bench-")
        workdir = Path(cleanup.name)
    try:
        report = benchmark(args, workdir)
    finally:
        if cleanup is not None:
            cleanup.cleanup()
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2, default=float)
        print(f"\nwrote {args.json}")
    return 0


def benchmark(args, workdir):
    machine = machine_info()
    shape = (args.size, args.size)
    print(f"# gpudiffim vs HOTPANTS: {args.size}x{args.size}, {args.stars} stars, seed {args.seed}, "
          f"{args.rounds} round(s)")
    print(f"date {machine['date_utc']}, gpudiffim {machine['gpudiffim']} @ {machine['git_revision']}, "
          f"glibc malloc thresholds {'tuned' if args.allocator_tuned else 'default'}")
    print(f"CPU {machine['cpu_model']}, nproc {machine['nproc']}, memory {machine['memory_gib']} GiB; "
          f"Python {machine['python']}, NumPy {machine['numpy']}, SciPy {machine['scipy']}, "
          f"BLAS {machine['blas']}")
    print(f"workdir {workdir}")

    start = time.perf_counter()
    pair = make_fake_pair(shape=shape, n_stars=args.stars, seed=args.seed)
    print(f"simulated in {time.perf_counter() - start:.2f} s (dtype {pair.template.dtype})")
    planes_path = write_inputs(pair, workdir)

    # --- gpudiffim, in process ------------------------------------------------
    warmup, walls, result = time_gpudiffim(pair, args.rounds)
    basis = result.kernel_basis
    cells = result.kernel_cell_set
    n_fitted = cells.n_good + cells.n_bad
    config = PsfMatchConfig(**CONFIG_KWARGS)
    half_size = int(config.detection.fp_grow_kernel_scaling * basis.width + 0.5) \
        if config.detection.scale_by_fwhm else config.detection.fp_grow_pix
    stamp_width = 2 * half_size + 1
    print(f"\ngpudiffim basis: {basis.kind} ({basis.mode}), sigmas "
          f"{', '.join(f'{s:.3f}' for s in basis.sigmas)} px, degrees {basis.degrees}, "
          f"{basis.n_basis} kernels of {basis.width}x{basis.width}; stamps {stamp_width}x{stamp_width}; "
          f"FWHM template {result.template_fwhm_pix:.3f}, science {result.science_fwhm_pix:.3f} px")
    print(f"candidates: {cells.n_good} GOOD, {cells.n_bad} BAD (fitted {n_fitted}), "
          f"{len(cells.candidates)} in the cell set")

    estimate = work_estimate(shape, n_fitted, basis.n_basis, basis.width, stamp_width,
                             config.spatial_kernel_order, config.fit_for_background)
    print_estimate(estimate)

    timings = dict(result.timings)
    print(f"\ngpudiffim subtract_masked_images: warm-up {warmup:.3f} s; rounds "
          + ", ".join(f"{w:.3f}" for w in walls) + " s")
    print("stage timings of the fastest round:")
    for stage, seconds in timings.items():
        print(f"  {stage:24s} {seconds:8.3f} s")
    rates = {"kernel fit": sum(r[1] for r in estimate if r[0] in
                               ("stamp correlations (FFT, as implemented)", "normal equations")),
             "full-image convolution": estimate[-1][1]}
    for stage, flops in rates.items():
        if timings.get(stage):
            print(f"  implied rate, {stage}: {flops / timings[stage] / 1e9:.1f} GFLOP/s")
    print("  (implied rate = FLOP estimate / stage time; the fit stage also extracts stamps, "
          "clips and solves, so its rate is a lower bound)")

    sparse_warmup, sparse_walls, sparse_result = time_gpudiffim(pair, args.rounds,
                                                                sparse_config_kwargs(args.size))
    sparse_cells = sparse_result.kernel_cell_set
    print(f"\ngpudiffim with ~100 stamps ({sparse_config_kwargs(args.size)}): rounds "
          + ", ".join(f"{w:.3f}" for w in sparse_walls) + " s; stages of the fastest: "
          + ", ".join(f"{k} {v:.3f}" for k, v in sparse_result.timings.items()))

    memory = gpudiffim_memory(workdir, planes_path, args.allocator_tuned)
    if "error" in memory:
        print(f"gpudiffim memory subprocess failed: {memory['error']}")
    else:
        print(f"gpudiffim fresh process: peak RSS {memory['process_peak_rss_mb']:.0f} MB "
              f"({RSS_METHOD}; VmHWM {memory['peak_rss_mb']:.0f} MB, of which "
              f"{memory['loaded_rss_mb']:.0f} MB after import and loading the images); "
              f"run {memory['wall_s']:.3f} s, whole process {memory['process_wall_s']:.2f} s")

    # --- HOTPANTS -------------------------------------------------------------
    hotpants_runs = []
    binary = args.hotpants
    if not (binary and os.path.isfile(binary) and os.access(binary, os.X_OK)):
        print(f"\nHOTPANTS not found at {binary!r}: skipping the HOTPANTS comparison "
              f"(see bench/README.md to build it)")
    else:
        for grid in HOTPANTS_GRIDS:
            run = run_hotpants(binary, workdir, grid, args.rounds)
            if "error" in run:
                print(f"\nHOTPANTS {grid}x{grid} failed, skipped: {run['error']}")
            else:
                print(f"\nHOTPANTS {grid}x{grid}: rounds " + ", ".join(f"{w:.3f}" for w in run["wall_s"])
                      + f" s; stamps {run['stamps_used']} used of {run['stamps_built']}"
                      + (f" ({run['effective_grid']})" if run["effective_grid"] else ""))
            hotpants_runs.append(run)
        print(f"HOTPANTS command: {hotpants_runs[0]['command']}")

    # --- quality on the same pixels --------------------------------------------
    region = central_region(shape, basis.width)
    diff = result.subtracted_image
    good = (np.asarray(diff.mask) & diff.bits(BAD_PLANES)) == 0
    good &= np.asarray(diff.variance) > 0
    for run in hotpants_runs:
        if "error" not in run:
            good &= (run["_noise"] > 0) & np.isfinite(run["_difference"]) \
                & (run["_difference"] != run["_mask_value"])
    selected = good[region]
    n_pixels = int(selected.sum())
    g_z = (np.asarray(diff.image, np.float64) / np.sqrt(np.asarray(diff.variance, np.float64)))
    g_std, g_robust = normalised_std(g_z[region][selected])
    centre = (0.5 * (args.size - 1), 0.5 * (args.size - 1))
    truth_sum = float(pair.kernel.kernel_sum(*centre))
    g_sum = float(result.psf_matching_kernel.kernel_sum(*centre))
    for run in hotpants_runs:
        if "error" not in run:
            z = run["_difference"] / run["_noise"]
            run["z_std"], run["z_robust_std"] = normalised_std(z[region][selected])

    # --- table ----------------------------------------------------------------
    like_for_like = defaults_are_like_for_like()
    gpu_row = dict(tool="gpudiffim", config=f"defaults (PsfMatchConfig(): AL {basis.n_basis} bases "
                   f"{basis.width}^2, ko {config.spatial_kernel_order}, bgo {config.spatial_bg_order}"
                   f"{', background fitted' if config.fit_for_background else ''})",
                   stamps=f"{cells.n_good} of {n_fitted}", wall_min_s=min(walls),
                   wall_median_s=statistics.median(walls),
                   peak_rss_mb=memory.get("process_peak_rss_mb"), z_std=g_std, z_robust_std=g_robust,
                   kernel_sum=g_sum)
    sparse_diff = sparse_result.subtracted_image
    sparse_z = np.asarray(sparse_diff.image, np.float64) / np.sqrt(np.asarray(sparse_diff.variance, np.float64))
    sparse_std, sparse_robust = normalised_std(sparse_z[region][selected])
    sparse_row = dict(tool="gpudiffim", config="same, 1 star per cell of a 10x10 cell grid",
                      stamps=f"{sparse_cells.n_good} of {sparse_cells.n_good + sparse_cells.n_bad}",
                      wall_min_s=min(sparse_walls), wall_median_s=statistics.median(sparse_walls),
                      peak_rss_mb=None, z_std=sparse_std, z_robust_std=sparse_robust,
                      kernel_sum=float(sparse_result.psf_matching_kernel.kernel_sum(*centre)))
    rows = [gpu_row, sparse_row]
    if not like_for_like:
        _, lfl_walls, lfl_result = time_gpudiffim(pair, args.rounds, LIKE_FOR_LIKE_KWARGS)
        lfl_diff = lfl_result.subtracted_image
        lfl_z = np.asarray(lfl_diff.image, np.float64) / np.sqrt(np.asarray(lfl_diff.variance, np.float64))
        lfl_std, lfl_robust = normalised_std(lfl_z[region][selected])
        lfl_cells = lfl_result.kernel_cell_set
        rows.append(dict(tool="gpudiffim", config=f"like-for-like {LIKE_FOR_LIKE_KWARGS}",
                         stamps=f"{lfl_cells.n_good} of {lfl_cells.n_good + lfl_cells.n_bad}",
                         wall_min_s=min(lfl_walls), wall_median_s=statistics.median(lfl_walls),
                         peak_rss_mb=None, z_std=lfl_std, z_robust_std=lfl_robust,
                         kernel_sum=float(lfl_result.psf_matching_kernel.kernel_sum(*centre))))
    n_gpudiffim_rows = len(rows)
    for run in hotpants_runs:
        if "error" in run:
            continue
        grid = f"-nsx {run['grid']} -nsy {run['grid']}"
        if run["effective_grid"]:
            grid += f" (ran {run['effective_grid'].replace(' = ', ' ')})"
        rows.append(dict(tool="HOTPANTS", config=grid,
                         stamps=f"{run['stamps_used']} of {run['stamps_built']}",
                         wall_min_s=run["wall_min_s"], wall_median_s=run["wall_median_s"],
                         peak_rss_mb=run["peak_rss_mb"], z_std=run["z_std"],
                         z_robust_std=run["z_robust_std"], kernel_sum=run["kernel_sum"]))
    print(f"\nQuality: D/sigma over the central {region[0].stop - region[0].start}x"
          f"{region[1].stop - region[1].start} px ({n_pixels} unmasked pixels, the same for every "
          f"tool; gpudiffim sigma from its variance plane, HOTPANTS from -oni). "
          f"True kernel sum at the centre {truth_sum:.5f}.")
    print("gpudiffim time: in-process subtract_masked_images (no I/O); HOTPANTS time: whole "
          "process incl. FITS I/O. HOTPANTS is single-threaded.\n")
    print("| tool | config | stamps used | wall min (s) | wall median (s) | peak RSS (MB) "
          "| D/σ std | D/σ robust std | kernel sum |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['tool']} | {row['config']} | {row['stamps']} | {row['wall_min_s']:.3f} "
              f"| {row['wall_median_s']:.3f} | {_fmt(row['peak_rss_mb'], '.0f')} "
              f"| {_fmt(row['z_std'], '.4f')} | {_fmt(row['z_robust_std'], '.4f')} "
              f"| {_fmt(row['kernel_sum'], '.5f')} |")
    ratios = {}
    print()
    for row in rows[n_gpudiffim_rows:]:
        for reference in rows[:n_gpudiffim_rows]:
            ratio = row["wall_min_s"] / reference["wall_min_s"]
            ratios[f"{row['config']} / gpudiffim {reference['config']}"] = ratio
            print(f"speed ratio HOTPANTS {row['config']} / gpudiffim {reference['config']} "
                  f"(min wall): {ratio:.2f}x")
    default_hotpants = [row for row, run in zip(rows[n_gpudiffim_rows:], (r for r in hotpants_runs if "error" not in r))
                        if run["grid"] == HOTPANTS_DEFAULT_GRID]
    if default_hotpants:
        ratio = default_hotpants[0]["wall_min_s"] / gpu_row["wall_min_s"]
        ratios["each tool's defaults"] = ratio
        print(f"\n**each tool's defaults** (HOTPANTS -nsx {HOTPANTS_DEFAULT_GRID} -nsy {HOTPANTS_DEFAULT_GRID} / "
              f"gpudiffim PsfMatchConfig(), min wall): {ratio:.2f}x "
              f"(medians {default_hotpants[0]['wall_median_s'] / gpu_row['wall_median_s']:.2f}x; "
              f"defaults are{'' if like_for_like else ' NOT'} the like-for-like -ko 2 -bgo 1)")
    print(f"peak RSS measured with {RSS_METHOD}")

    for run in hotpants_runs:
        for key in [k for k in run if k.startswith("_")]:
            del run[key]
    return dict(machine=machine, args=vars(args), config=CONFIG_KWARGS, like_for_like=like_for_like,
                rss_method=RSS_METHOD,
                basis=dict(kind=basis.kind, mode=basis.mode, sigmas=list(basis.sigmas),
                           degrees=list(basis.degrees), width=basis.width, n_basis=basis.n_basis),
                stamp_width=stamp_width, n_good=cells.n_good, n_bad=cells.n_bad,
                estimate=[dict(stage=s, flops=f, bytes=b, basis=h) for s, f, b, h in estimate],
                gpudiffim=dict(warmup_s=warmup, wall_s=walls, timings_fastest=timings,
                               memory=memory, kernel_sum_centre=g_sum,
                               kernel_sum_truth=truth_sum, z_std=g_std, z_robust_std=g_robust),
                hotpants=hotpants_runs, quality_pixels=n_pixels, table=rows, speed_ratio=ratios)


if __name__ == "__main__":
    sys.exit(main())
