"""cProfile of one warm CuPy-backend subtraction (host-side costs of the GPU path).

    PYTHONPATH=. python bench/profile_gpu.py --size 4096 --top 30
"""

import argparse
import cProfile
import pstats

from gpudiffim import ImagePsfMatchTask, PsfMatchConfig, use_backend
from gpudiffim.testing import make_fake_pair

CONFIG = PsfMatchConfig(fit_for_background=True, spatial_kernel_order=2, spatial_bg_order=1)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--backend", default="cupy")
    args = parser.parse_args()
    pair = make_fake_pair(shape=(args.size, args.size), n_stars=int(8000 * (args.size / 4096) ** 2), seed=1)
    task = ImagePsfMatchTask(CONFIG)
    with use_backend(args.backend):
        task.subtract_masked_images(pair.template, pair.science)  # warm-up: compilation, FFT plans
        profile = cProfile.Profile()
        profile.enable()
        result = task.subtract_masked_images(pair.template, pair.science)
        profile.disable()
    print({k: round(v, 4) for k, v in result.timings.items()})
    stats = pstats.Stats(profile)
    stats.sort_stats("tottime").print_stats(args.top)
    stats.sort_stats("cumulative").print_stats(args.top)


if __name__ == "__main__":
    main()
