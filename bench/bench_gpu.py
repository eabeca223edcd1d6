"""GPU benchmark of ``subtract_masked_images``: CuPy backend against NumPy, same machine, same run.

Run on a machine with a CUDA device, from the repository root::

    PYTHONPATH=. python bench/bench_gpu.py --sizes 2048 4096 --repeat 5 --json out.json

For each size, a simulated float32 pair (``make_fake_pair``, stars scaled from
8000 at 4096^2) is subtracted with the issue-4 configuration (Alard-Lupton
basis, 27 kernels, spatial kernel order 2, background fitted, order 1: the
defaults), or with ``--basis delta-function`` the same configuration with the
delta-function basis at its defaults (issue 13: its time against the
Alard-Lupton rows of the same session):

* ``cold``: the first CuPy call of the process (NVRTC compilation of the
  kernels, cuFFT plans, memory-pool growth), reported separately;
* ``host in``: NumPy inputs, results copied back (transfers included);
* ``device in``: CuPy inputs, results left on the device;
* ``numpy``: the NumPy backend on the host CPU, one run, for the speed-up.

Stage times are the task's own ``timings`` (CUDA events around each stage,
recorded after a device synchronisation, so GPU work is inside its stage); the median of
``--repeat`` warm runs is reported.  Peak device memory is the high-water
mark of the bytes in use in CuPy's memory pool, tracked by an allocator hook
over one run (inputs included), and the pool's total (used + cached).
"""

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import machine_info  # noqa: E402
from gpudiffim import ImagePsfMatchTask, MaskedImage, PsfMatchConfig, backend_info, use_backend  # noqa: E402
from gpudiffim.testing import make_fake_pair  # noqa: E402

CONFIG = PsfMatchConfig(fit_for_background=True, spatial_kernel_order=2, spatial_bg_order=1)
BASIS_SETS = ("alard-lupton", "delta-function")
STARS_AT_4096 = 8000


class PeakTracker:
    """CuPy allocator that records the peak of the memory pool's bytes in use."""

    def __init__(self):
        import cupy

        self.pool = cupy.get_default_memory_pool()
        self.peak = 0
        cupy.cuda.set_allocator(self.malloc)

    def malloc(self, size):
        memory = self.pool.malloc(size)
        self.peak = max(self.peak, self.pool.used_bytes())
        return memory

    def reset(self):
        self.peak = self.pool.used_bytes()


def _run(task, template, science, backend):
    with use_backend(backend):
        start = time.perf_counter()
        result = task.subtract_masked_images(template, science)
        if backend == "cupy":
            import cupy

            cupy.cuda.runtime.deviceSynchronize()
        return time.perf_counter() - start, result


def _median_stages(results):
    stages = {}
    for result in results:
        for name, value in result.timings.items():
            stages.setdefault(name, []).append(value)
    return {name: statistics.median(values) for name, values in stages.items()}


def _summary(result):
    image = result.subtracted_image.to_module(np)
    good = (image.mask & image.bits(["EDGE", "NO_DATA", "SAT", "BAD"])) == 0
    z = image.image[good] / np.sqrt(image.variance[good])
    return {"n_good": result.kernel_cell_set.n_good, "n_bad": result.kernel_cell_set.n_bad,
            "kernel_sum": float(result.diagnostics["kernel_sum_at_centre"]), "d_over_sigma_std": float(z.std())}


def bench_size(size, repeat, numpy_too, tracker, basis=BASIS_SETS[0]):
    import cupy

    n_stars = int(round(STARS_AT_4096 * (size / 4096) ** 2))
    pair = make_fake_pair(shape=(size, size), n_stars=n_stars, seed=1)
    task = ImagePsfMatchTask(dataclasses.replace(CONFIG, kernel_basis_set=basis))
    pool = cupy.get_default_memory_pool()
    out = {"size": size, "n_stars": n_stars, "basis": basis}

    pool.free_all_blocks()
    out["cold_s"], first = _run(task, pair.template, pair.science, "cupy")
    tracker.reset()
    host = [_run(task, pair.template, pair.science, "cupy") for _ in range(repeat)]
    out["peak_used_bytes_host_in"] = tracker.peak
    out["host_in_s"] = statistics.median(t for t, _ in host)
    out["host_in_stages"] = _median_stages([r for _, r in host])
    out["peak_pool_bytes_host_in"] = pool.total_bytes()

    template, science = (MaskedImage(cupy.asarray(m.image), cupy.asarray(m.mask), cupy.asarray(m.variance))
                         for m in (pair.template, pair.science))
    pool.free_all_blocks()
    tracker.reset()
    device = [_run(task, template, science, "cupy") for _ in range(repeat)]
    out["peak_used_bytes_device_in"] = tracker.peak
    out["device_in_s"] = statistics.median(t for t, _ in device)
    out["device_in_stages"] = _median_stages([r for _, r in device])
    out["peak_pool_bytes_device_in"] = pool.total_bytes()
    out["cupy"] = _summary(host[-1][1])

    if numpy_too:
        out["numpy_s"], reference = _run(task, pair.template, pair.science, "numpy")
        out["numpy_stages"] = dict(reference.timings)
        out["numpy"] = _summary(reference)
        got, want = host[-1][1], reference
        scale = np.max(np.abs(want.psf_matching_kernel.coefficients))
        out["max_rel_coefficient_diff"] = float(
            np.max(np.abs(got.psf_matching_kernel.coefficients - want.psf_matching_kernel.coefficients)) / scale)
        a, b = got.subtracted_image.to_module(np), want.subtracted_image
        valid = (b.mask & b.bits(["EDGE", "NO_DATA"])) == 0
        out["max_rel_difference_image"] = float(np.max(np.abs(a.image[valid] - b.image[valid]))
                                                / np.max(np.abs(b.image[valid])))
    return out


def _table(rows):
    lines = [f"{'basis':>14} {'size':>5} {'stars':>6} {'cold s':>7} {'host-in ms':>10} {'device-in ms':>12} "
             f"{'numpy s':>8} {'speed-up':>8} {'peak MB':>8} {'coef rel':>9}"]
    for r in rows:
        speedup = r.get("numpy_s", float("nan")) / r["host_in_s"]
        lines.append(f"{r['basis']:>14} {r['size']:>5} {r['n_stars']:>6} {r['cold_s']:>7.2f} "
                     f"{1e3 * r['host_in_s']:>10.1f} {1e3 * r['device_in_s']:>12.1f} "
                     f"{r.get('numpy_s', float('nan')):>8.2f} {speedup:>8.1f} "
                     f"{r['peak_used_bytes_device_in'] / 1e6:>8.0f} "
                     f"{r.get('max_rel_coefficient_diff', float('nan')):>9.2e}")
        for key in ("device_in_stages", "host_in_stages"):
            stages = ", ".join(f"{k} {1e3 * v:.1f}" for k, v in r[key].items())
            lines.append(f"      {key} (ms): {stages}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--no-numpy", action="store_true", help="skip the NumPy-backend comparison")
    parser.add_argument("--basis", choices=BASIS_SETS, default=BASIS_SETS[0],
                        help="kernel basis set (the rest of the configuration as above)")
    parser.add_argument("--json", type=Path, help="write the full results here")
    args = parser.parse_args(argv)
    with use_backend("cupy"):
        info = {"machine": machine_info(), "backend": backend_info()}
    rows = []
    tracker = PeakTracker()
    for size in args.sizes:
        rows.append(bench_size(size, args.repeat, not args.no_numpy, tracker, args.basis))
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"info": info, "results": rows}, indent=1, default=str))
    print(json.dumps(info["backend"]))
    print(_table(rows))


if __name__ == "__main__":
    main()
