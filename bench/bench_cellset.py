"""Host cost of the solve loop's bookkeeping on the cell set (no image work).

    PYTHONPATH=. python bench/bench_cellset.py --candidates 6400

Times, best of 5, the cell-set operations of one 4096^2 solve (6400 vetted
candidates in 32 x 32 cells of 128 px, 5 per cell visited): building the
cell set, one visit, one clipping decision over the visited candidates
(statistics stored, 10 % rejected with reasons), freezing the result, and
building every user-facing record.  A solve makes about 14 visits and 8
decisions, so their sum is the per-solve host overhead that the GPU path
cannot hide.
"""

import argparse
import time

import numpy as np

from gpudiffim.cellset import Candidates, KernelCellSet, RejectReason, SpatialCellSet


def _best_ms(func, rounds=5):
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        func()
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--candidates", type=int, default=6400)
    args = parser.parse_args()
    rng = np.random.default_rng(1)
    n = args.candidates
    candidates = Candidates.from_arrays(np.arange(n), rng.integers(0, 4096, n), rng.integers(0, 4096, n),
                                        rng.random(n))
    bbox = (0, 0, 4095, 4095)

    def build():
        return SpatialCellSet(bbox, 128, 128, candidates)

    cell_set = build()

    def decide():
        visited = cell_set.visit(5)
        cell_set.record_stats("single", visited, rng.normal(size=len(visited)), rng.random(len(visited)),
                              np.full(len(visited), 529))
        cell_set.mark_good(visited)
        rejected = visited[::10]
        cell_set.reject(rejected, RejectReason.SINGLE_KERNEL_RESIDUAL,
                        [f"single-kernel residual rms {v:.3g} > 1.5" for v in rng.random(len(rejected))])
        cell_set.status[:] = 0

    rows = {"build": _best_ms(build), "visit": _best_ms(lambda: cell_set.visit(5)), "decide": _best_ms(decide),
            "freeze": _best_ms(lambda: KernelCellSet.from_cell_set(cell_set, {})),
            "records": _best_ms(lambda: KernelCellSet.from_cell_set(cell_set, {}).candidates, rounds=3)}
    per_solve = rows["build"] + 14 * rows["visit"] + 8 * rows["decide"] + rows["freeze"]
    print(f"{n} candidates: " + ", ".join(f"{k} {v:.3f} ms" for k, v in rows.items()))
    print(f"per solve (build + 14 visits + 8 decisions + freeze): {per_solve:.1f} ms; records on demand")


if __name__ == "__main__":
    main()
