"""What one subtraction would ask of a GPU, counted on the CPU with the CuPy stand-in.

Runs ``ImagePsfMatchTask.subtract_masked_images`` on a simulated pair whose
planes are stand-in device arrays (``tests/cupy_standin.py``: the pipeline's
real CuPy branches, kernels as NumPy versions of ``kernels/*.cu``), after one
warm-up run (imports, caches), and prints per stage: CuPy calls, kernel
launches, device->host synchronisations, host->device uploads (count, kB),
host CPU time outside the emulated device work, and the emulated device time
(CPU time of the NumPy stand-ins; not a GPU time).  Then the sites of the
syncs and uploads, and an estimate of the GPU's host-side cost from the counts.

Host time is given twice: as measured around the emulated device work (whose
tens of MB a step flush the host's caches, which a GPU does not), and in
replays of the run's tape (``tests/cupy_standin.py``: the same calls and
decisions, no device work; the least of ``--replays`` runs): the host's own
cost on a GPU machine, and what the budgets below are read against.

    python bench/gpu_budget.py --size 4096 --stars 8000
    python bench/gpu_budget.py --size 2048 --stars 4000 --json out.json
    python bench/gpu_budget.py --size 512 --stars 250 --basis delta-function

The budgets of issue 17 (4096², 8000 stars): at most 5 + 2 per clipping pass
syncs (25 in all), 400 CuPy calls, no upload beyond the input planes and a
few kB per pass, host time <= 20 ms on the 2-core CI machine (<= 10 ms at 2048²).
"""

import argparse
import cProfile
import json
import pstats
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from cupy_standin import Tape, cupy_standin, to_device  # noqa: E402

from gpudiffim import ImagePsfMatchTask, PsfMatchConfig  # noqa: E402
from gpudiffim._backend import tune_host_allocator  # noqa: E402
from gpudiffim.testing import make_fake_pair  # noqa: E402

#: Host cost per CuPy call and per synchronisation on a GPU machine (seconds), for the estimate:
#: CuPy's Python overhead per call and launch, and one round trip through the driver per sync.
CALL_SECONDS, SYNC_SECONDS = 10e-6, 30e-6


def run(size, stars, seed=1, kernels="numpy", config=None, profile=None, replays=0):
    """(recorder, result) of one warm subtraction of a ``size``² pair with ``stars`` stars.

    With ``replays``, the subtraction's tape is then replayed that many times
    (no device work) and the recorder gets ``replayed_host_seconds`` and
    ``replayed_stage_host`` (the least of the replays, in total and per stage).
    With ``profile`` (a :class:`cProfile.Profile` made by :func:`host_profile`),
    the measured subtraction (or, with ``replays``, the last replay) is
    profiled in host time only.
    """
    pair = make_fake_pair(shape=(size, size), n_stars=stars, seed=seed)
    config = PsfMatchConfig() if config is None else config
    with cupy_standin(kernels=kernels):
        ImagePsfMatchTask(config).subtract_masked_images(to_device(pair.template), to_device(pair.science))
    tape = Tape() if replays else None
    recorder, result = _measured(pair, config, kernels, None if replays else profile, tape=tape)
    recorder.replayed_host_seconds, recorder.replayed_stage_host = None, {}
    for k in range(replays):
        replayed, _ = _measured(pair, config, kernels, profile if k == replays - 1 else None, tape=tape, replay=True)
        if recorder.replayed_host_seconds is None or replayed.host_seconds < recorder.replayed_host_seconds:
            recorder.replayed_host_seconds = replayed.host_seconds
        for stage, seconds in replayed.stage_host.items():
            recorder.replayed_stage_host[stage] = min(seconds, recorder.replayed_stage_host.get(stage, seconds))
    return recorder, result


def _measured(pair, config, kernels, profile, **tape):
    """(recorder, result) of one subtraction of ``pair`` on the stand-in, its host time that of the subtraction."""
    with cupy_standin(kernels=kernels, **tape) as recorder:
        template, science = to_device(pair.template), to_device(pair.science)
        recorder.events.clear()           # the input planes are not part of the budget
        recorder.stage_host.clear()
        task = ImagePsfMatchTask(config)
        start = recorder.host_clock()
        if profile is None:
            result = task.subtract_masked_images(template, science)
        else:
            profile.timer = recorder.host_clock
            result = profile.runcall(task.subtract_masked_images, template, science)
        subtraction = recorder.host_clock() - start
    # the subtraction's own host time: entering and leaving the stand-in block is not the pipeline's
    recorder.host_seconds = subtraction
    return recorder, result


class _HostProfile:
    """A :class:`cProfile.Profile` started on the recorder's host clock when :func:`run` calls it."""

    timer = None

    def runcall(self, function, *args):
        self.profile = cProfile.Profile(self.timer)
        return self.profile.runcall(function, *args)


def print_host_profile(profile, top):
    """The ``top`` functions of the package by host time of their own (the profiler's overhead included)."""
    stats = pstats.Stats(profile.profile)
    rows = [(tottime, cumtime, calls, f"{Path(file).name}:{line}({name})")
            for (file, line, name), (_, calls, tottime, cumtime, _) in stats.stats.items()
            if "gpudiffim" in file]
    total = sum(row[0] for row in rows)
    print(f"\nhost time by function of gpudiffim (own / with callees, ms; cProfile's overhead included; "
          f"{1e3 * total:.1f} ms in all):")
    for tottime, cumtime, calls, where in sorted(rows, reverse=True)[:top]:
        print(f"  {1e3 * tottime:7.2f} {1e3 * cumtime:8.2f}  ×{calls:<5d} {where}")


def summary(recorder, result):
    cells = result.kernel_cell_set
    return {"calls": recorder.calls, "launches": recorder.launches, "syncs": recorder.syncs,
            "uploads": recorder.uploads, "upload_bytes": recorder.bytes("h2d"),
            "host_ms": 1e3 * recorder.host_seconds, "device_ms_emulated": 1e3 * recorder.device_seconds,
            "host_ms_replayed": (None if recorder.replayed_host_seconds is None
                                 else 1e3 * recorder.replayed_host_seconds),
            "n_good": cells.n_good, "n_bad": cells.n_bad, "n_candidates": len(cells),
            "estimated_host_overhead_ms": 1e3 * (_host_seconds(recorder) + CALL_SECONDS * recorder.calls
                                                 + SYNC_SECONDS * recorder.syncs)}


def _host_seconds(recorder):
    """The replays' host time where there are replays, else the measured one."""
    return recorder.host_seconds if recorder.replayed_host_seconds is None else recorder.replayed_host_seconds


def format_replayed(recorder):
    """Per-stage host ms of the replays, one line."""
    return ", ".join(f"{stage} {1e3 * seconds:.1f}" for stage, seconds in recorder.replayed_stage_host.items()
                     if stage != "-")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--stars", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--kernels", choices=("numpy", "emulator"), default="numpy")
    parser.add_argument("--basis", choices=("alard-lupton", "delta-function"), default="alard-lupton",
                        help="kernel basis set (the other fields at their defaults)")
    parser.add_argument("--top", type=int, default=12, help="call sites listed per kind")
    parser.add_argument("--json", help="write the summary and the per-stage rows here")
    parser.add_argument("--profile", type=int, metavar="N", default=0,
                        help="also list the N functions with the most host time (cProfile on the host clock, "
                             "of the last replay when there are replays)")
    parser.add_argument("--replays", type=int, default=5,
                        help="replays of the run's tape for the host time without device work (0: none)")
    args = parser.parse_args(argv)
    # CuPy's memory pool keeps freed device blocks for reuse, so dropping a device array costs the host
    # next to nothing; the stand-in's "device" buffers are host memory, which glibc would unmap on free
    # (a 4096^2 run frees GBs): keep it for reuse, as the pool does, so that it is not charged as host time
    tune_host_allocator()
    profile = _HostProfile() if args.profile else None
    recorder, result = run(args.size, args.stars, args.seed, args.kernels,
                           PsfMatchConfig(kernel_basis_set=args.basis), profile, args.replays)
    print(f"{args.size}² pair, {args.stars} stars: {len(result.kernel_cell_set)} candidates, "
          f"{result.kernel_cell_set.n_good} GOOD, {result.kernel_cell_set.n_bad} BAD")
    print(recorder.format_table())
    for kind in ("sync", "h2d", "call"):
        print(f"\n{kind} sites:", ", ".join(f"{site} ×{n}" for site, n in recorder.sites(kind).most_common(args.top)))
    gaps = sorted(recorder.host_gaps.items(), key=lambda item: -item[1])[:args.top]
    print("\nhost time before each device operation, by site (where the host time goes):",
          ", ".join(f"{site} {1e3 * seconds:.1f} ms" for site, seconds in gaps))
    numbers = summary(recorder, result)
    if recorder.replayed_host_seconds is not None:
        print(f"\nhost ms replayed (least of {args.replays}; no device work, warm caches): "
              f"{numbers['host_ms_replayed']:.1f} in all; {format_replayed(recorder)}")
    print(f"\nestimated host-side cost on a GPU machine: {numbers['estimated_host_overhead_ms']:.1f} ms "
          f"(host {1e3 * _host_seconds(recorder):.1f} ms + {CALL_SECONDS * 1e6:.0f} µs per call + "
          f"{SYNC_SECONDS * 1e6:.0f} µs per sync)")
    if profile is not None:
        print_host_profile(profile, args.profile)
    if args.json:
        Path(args.json).write_text(json.dumps({"size": args.size, "stars": args.stars, **numbers,
                                               "stages": recorder.table(),
                                               "stages_host_ms_replayed": {
                                                   stage: 1e3 * seconds
                                                   for stage, seconds in recorder.replayed_stage_host.items()}},
                                              indent=1, default=float))
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    raise SystemExit(main())
