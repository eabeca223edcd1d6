"""Peak array memory of one subtraction on the NumPy backend, per stage (tracemalloc).

    PYTHONPATH=. python bench/peak_memory.py --size 4096

NumPy reports its buffers to :mod:`tracemalloc`, so the traced peak of a stage
minus what was held when it started is the stage's working set.  The CuPy
backend allocates the same arrays on the device except where a CUDA kernel
replaces a host temporary (the stamp correlations: direct sums instead of
FFT buffers), which makes this a host-side estimate of the device working
set; ``bench_gpu.py`` measures the device pool itself.  "working set" is a
stage's peak above what it started with; "peak held" counts everything the
call allocated so far (earlier stages' results included).
"""

import argparse
import contextlib
import tracemalloc

from gpudiffim import ImagePsfMatchTask, PsfMatchConfig, use_backend
from gpudiffim import task as task_module
from gpudiffim.testing import make_fake_pair

CONFIG = PsfMatchConfig(fit_for_background=True, spatial_kernel_order=2, spatial_bg_order=1)
MB = 2**20


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=4096)
    args = parser.parse_args()
    pair = make_fake_pair(shape=(args.size, args.size), n_stars=int(8000 * (args.size / 4096) ** 2), seed=1)
    stages = {}
    timed = task_module._timed

    @contextlib.contextmanager
    def traced(timings, stage):
        held = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        with timed(timings, stage):
            yield
        peak = tracemalloc.get_traced_memory()[1]
        stages[stage] = (max(stages.get(stage, (0, 0))[0], peak - held), peak)

    task_module._timed = traced
    tracemalloc.start()
    try:
        with use_backend("numpy"):
            ImagePsfMatchTask(CONFIG).subtract_masked_images(pair.template, pair.science)
    finally:
        task_module._timed = timed
        tracemalloc.stop()
    inputs = sum(p.nbytes for m in (pair.template, pair.science) for p in (m.image, m.mask, m.variance))
    print(f"{args.size}^2: input planes {inputs / MB:.0f} MB (not traced)")
    print(f"  {'stage':<24} {'working set MB':>14} {'peak held MB':>13}")
    for stage, (working, peak) in stages.items():
        print(f"  {stage:<24} {working / MB:14.0f} {peak / MB:13.0f}")
    print(f"  peak with the inputs: {(max(p for _, p in stages.values()) + inputs) / MB:.0f} MB")


if __name__ == "__main__":
    main()
