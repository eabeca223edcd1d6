"""Command line: ``gpudiffim demo`` simulates a pair, subtracts it and reports."""

import argparse
import logging
import sys
import time

import numpy as np

from . import __version__
from .config import PsfMatchConfig
from .io import write_masked_image
from .task import ImagePsfMatchTask
from .testing import make_fake_pair

__all__ = ["main"]


def _residual_summary(result, pair, radius=12):
    """Mean, std and count of D/sigma over unflagged pixels away from changed sources.

    Pixels within ``radius`` of a simulated variable star or transient (whose
    residuals are real signal, not noise) are left out.
    """
    difference = result.subtracted_image
    good = difference.mask == 0
    x0, y0 = difference.xy0
    for star in pair.stars[pair.stars["kind"] != "star"]:
        col, row = int(round(star["x"])) - x0, int(round(star["y"])) - y0
        good[max(row - radius, 0):row + radius + 1, max(col - radius, 0):col + radius + 1] = False
    z = difference.image[good] / np.sqrt(difference.variance[good])
    return float(np.mean(z)), float(np.std(z)), int(good.sum())


def _demo(args):
    start = time.perf_counter()
    pair = make_fake_pair(shape=(args.size, args.size), n_stars=args.stars, seed=args.seed,
                          n_variables=args.variables, n_transients=args.transients)
    simulate = time.perf_counter() - start
    config = PsfMatchConfig(fit_for_background=True, spatial_kernel_order=args.kernel_order)
    result = ImagePsfMatchTask(config).subtract_masked_images(pair.template, pair.science)
    cells = result.kernel_cell_set
    mean, std, n_good = _residual_summary(result, pair)
    centre = 0.5 * (args.size - 1)
    truth_sum = pair.kernel.kernel_sum(centre, centre)
    rejected = {}
    for record in cells.candidates:
        if record.status == "BAD":
            key = record.reason.split(" ")[0] + " " + record.reason.split(" ")[1]
            rejected[key] = rejected.get(key, 0) + 1
    print(f"gpudiffim {__version__} demo: {args.size}x{args.size} simulated pair, {args.stars} stars, "
          f"seed {args.seed}")
    print(f"  kernel: {result.kernel_basis.n_basis} {result.kernel_basis.kind} bases, "
          f"{result.kernel_basis.width}x{result.kernel_basis.width} px, spatial order {args.kernel_order}")
    print(f"  FWHM template / science: {result.template_fwhm_pix:.2f} / {result.science_fwhm_pix:.2f} px")
    print(f"  kernel sum at centre: {result.psf_matching_kernel.kernel_sum(centre, centre):.5f} "
          f"(truth {truth_sum:.5f})")
    print(f"  candidates: {cells.n_good} GOOD, {cells.n_bad} BAD "
          f"({', '.join(f'{v} {k}' for k, v in rejected.items()) or 'none rejected'}), "
          f"{cells.count('UNKNOWN')} not needed")
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
                                   "NGOOD": cells.n_good, "NBAD": cells.n_bad})
        print(f"  difference image written to {args.output}")
    return 0


def _parser():
    parser = argparse.ArgumentParser(prog="gpudiffim", description=__doc__)
    parser.add_argument("--version", action="version", version=f"gpudiffim {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress of every stage")
    commands = parser.add_subparsers(dest="command", required=True)
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
    return parser


def main(argv=None):
    """Entry point of the ``gpudiffim`` command."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
