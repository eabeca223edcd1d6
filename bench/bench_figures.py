"""Time the diagnostic figures of one fit: seconds per figure and for the PDF report.

    python bench/bench_figures.py                      # simulated 1024^2 pair, 1000 stars
    python bench/bench_figures.py --size 512 --stars 300
    python bench/bench_figures.py --pair decam         # real pairs of ../shared/data (CLI settings)
    python bench/bench_figures.py --pair jwst --profile 30

The simulated pair is fitted once (not timed, nor its quality table, which
the CLI computes before the figures), then
:func:`gpudiffim.diagnostics.write_figures` writes every figure into a
temporary folder (or ``--out DIR``), ``--rounds`` times.  A real pair runs
the whole ``gpudiffim subtract ... --plots DIR`` command ``--rounds`` times
(``gpudiffim.cli.main`` in this process; its wall time is printed too).
The seconds per figure are the progress records of ``write_figures``
(logger ``gpudiffim.diagnostics`` at INFO: "figure k/9 NAME: T s"; the
"report" record is the PDF).  Its wall and CPU time and the load average
follow: on a small shared machine other processes inflate the wall time.
``--profile N`` prints the N most expensive functions of the last round
(cProfile, cumulative time).

The real pairs use the options of ``tests/test_cli.py`` (DECam: spatial
orders 0, detection threshold 5, variance correction 'add'; JWST: ERR maps,
spatial kernel order 1), read from ``$GPUDIFFIM_TEST_DATA`` or
``../shared/data``.
"""

import argparse
import logging
import os
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path

from _machine import REPO, machine_info


def _data_folder():
    folder = os.environ.get("GPUDIFFIM_TEST_DATA")
    return Path(folder) if folder else REPO.parent / "shared" / "data"


def _cli_arguments(name, folder):
    """``gpudiffim subtract`` arguments of a real pair, as ``tests/test_cli.py`` runs it."""
    data = _data_folder()
    if name == "decam":
        decam = data / "decam"
        return ["subtract", str(decam / "DEC-OBS04a.mini.fits"), str(decam / "DEC-OBS18a.mini.fits"),
                "--config", "spatial_kernel_order=0", "--config", "spatial_bg_order=0",
                "--config", "detection.det_threshold=5", "--variance-correction", "add",
                "-o", str(Path(folder) / "difference.fits"), "--overwrite"]
    jwst = data / "jwst-nircam"
    science, template = next(jwst.glob("jw02561*_stamp.fits")), next(jwst.glob("jw01324*_stamp.fits"))
    noise = {p: p.with_name(p.name.replace(".fits", ".noise.fits")) for p in (science, template)}
    return ["subtract", str(science), str(template), "--science-hdu", "SCI", "--template-hdu", "SCI",
            "--science-sigma", str(noise[science]), "--template-sigma", str(noise[template]),
            "--config", "spatial_kernel_order=1", "-o", str(Path(folder) / "difference.fits"),
            "--overwrite"]


def _simulated_pair(size, stars, seed):
    from gpudiffim import ImagePsfMatchTask, PsfMatchConfig
    from gpudiffim.testing import make_fake_pair

    pair = make_fake_pair(shape=(size, size), n_stars=stars, seed=seed)
    result = ImagePsfMatchTask(PsfMatchConfig(fit_for_background=True)).subtract_masked_images(
        pair.template, pair.science)
    return result, pair.template, pair.science


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _timed_write_figures(diagnostics, totals, profile):
    """A wrapper of ``write_figures`` that records its wall time (and profiles the last call)."""
    original = diagnostics.write_figures

    def timed(*args, **kwargs):
        if profile is not None:
            profile.enable()
        start, cpu = time.perf_counter(), time.process_time()
        try:
            return original(*args, **kwargs)
        finally:
            totals.append((time.perf_counter() - start, time.process_time() - cpu))
            if profile is not None:
                profile.disable()

    return original, timed


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", choices=("simulated", "decam", "jwst"), default="simulated")
    parser.add_argument("--size", type=int, default=1024, help="simulated image side (default 1024)")
    parser.add_argument("--stars", type=int, default=1000, help="simulated stars (default 1000)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1, help="timed rounds (default 1)")
    parser.add_argument("--out", help="keep the figures in this folder")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="print the N most expensive functions of the last round")
    args = parser.parse_args()

    from gpudiffim import diagnostics

    warnings.simplefilter("ignore")   # fit-quality warnings of small or hard real pairs
    handler = _Records()
    logger = logging.getLogger("gpudiffim.diagnostics")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False          # printed below, not by the CLI's handler as well
    totals, rounds_wall = [], []
    profile = None
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.out or scratch
        if args.pair == "simulated":
            start = time.perf_counter()
            result, template, science = _simulated_pair(args.size, args.stars, args.seed)
            result.quality  # noqa: B018 - the CLI computes it before the figures: not their time
            fitted = sum(1 for r in result.kernel_cell_set.candidates if r.coefficients)
            print(f"simulated {args.size}x{args.size}, {args.stars} stars, seed {args.seed}: fit "
                  f"{time.perf_counter() - start:.2f} s, {len(result.kernel_cell_set.candidates)} "
                  f"candidates ({fitted} fitted), {result.psf_matching_kernel.n_basis} kernel bases")
        else:
            print(f"{args.pair} pair through `gpudiffim subtract ... --plots DIR` (the whole command "
                  f"timed, and write_figures within it)", flush=True)
        for round_ in range(args.rounds):
            handler.messages.clear()
            if args.profile and round_ == args.rounds - 1:
                import cProfile

                profile = cProfile.Profile()
            original, timed = _timed_write_figures(diagnostics, totals, profile)
            start = time.perf_counter()
            if args.pair == "simulated":
                timed(result, template, science, folder)
            else:
                from gpudiffim.cli import main as cli

                diagnostics.write_figures = timed
                try:
                    code = cli(["-q", *_cli_arguments(args.pair, scratch), "--plots", folder])
                finally:
                    diagnostics.write_figures = original
                if code != 0:
                    sys.exit(f"gpudiffim subtract failed with exit code {code}")
            rounds_wall.append(time.perf_counter() - start)
    logger.removeHandler(handler)
    timed_lines = [m for m in handler.messages if re.match(r"(figure|report)", m)]
    print("\n".join(f"  {m}" for m in timed_lines) or "  (no progress records: an older write_figures)")
    walls = [wall for wall, _ in totals]
    print(f"write_figures: wall {', '.join(f'{t:.2f}' for t in walls)} s (min {min(walls):.2f} s over "
          f"{len(walls)} round(s)); CPU {', '.join(f'{c:.2f}' for _, c in totals)} s; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    if args.pair != "simulated":
        print(f"whole command: {', '.join(f'{t:.2f}' for t in rounds_wall)} s")
    print("machine: " + ", ".join(f"{k} {v}" for k, v in machine_info().items()))
    if profile is not None:
        import pstats

        pstats.Stats(profile, stream=sys.stdout).sort_stats("cumtime").print_stats(args.profile)


if __name__ == "__main__":
    main()
