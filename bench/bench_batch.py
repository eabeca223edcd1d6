"""Throughput of ``gpudiffim.batch.subtract_many`` on a local Dask cluster, and its overhead per pair.

    python bench/bench_batch.py                       # 2048² pairs with 1 and 2 workers, tiny pairs
    python bench/bench_batch.py --size 1024 --pairs 4 --tiny 20 --json batch.json

1. Throughput: ``--pairs`` pairs of ``--size``² (``--stars`` stars; two
   simulated pairs written once, read by alternate rows, each row its own
   output) on a local cluster of 1, then of 2, single-threaded worker
   processes (``--workers``), started before the clock; one warm-up pair per
   cluster first.  Prints pairs/s, scaling efficiency (rate with N workers /
   (N x rate with 1)), the mean wall and CPU seconds per pair on the workers
   (wall well above CPU: the workers waited for a core), and what a 189-CCD
   visit would take at that rate.
2. Overhead: ``--tiny`` pairs of 96² on one worker.  Overhead per pair =
   (batch wall time - sum of the pairs' times on the worker) / pairs: the
   submission, scheduling, result transfer and manifest rewrite, everything
   but the subtraction itself.  The issue's bound is 50 ms.

The CuPy backend runs when a GPU is usable (one worker per GPU needs
dask-cuda; ``--workers`` then counts GPUs).  Run on an idle machine.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import machine_info  # noqa: E402

VISIT_CCDS = 189


def _write_pairs(folder, size, stars, count):
    """``count`` rows over two simulated pairs of ``size``²; returns the rows."""
    from gpudiffim.io import write_masked_image
    from gpudiffim.testing import make_fake_pair

    for seed in (1, 2):
        pair = make_fake_pair(shape=(size, size), n_stars=stars, seed=seed)
        write_masked_image(folder / f"sci{seed}.fits", pair.science)
        write_masked_image(folder / f"tmpl{seed}.fits", pair.template)
    return [{"science": str(folder / f"sci{1 + i % 2}.fits"), "template": str(folder / f"tmpl{1 + i % 2}.fits"),
             "output": f"diff{i:04d}.fits"} for i in range(count)]


def _cluster(workers):
    import distributed

    if os.environ.get("GPUDIFFIM_BACKEND", "auto") != "numpy":
        try:
            from dask_cuda import LocalCUDACluster

            from gpudiffim._backend import compute_backend

            if compute_backend() == "cupy":
                return LocalCUDACluster(n_workers=workers, resources={"GPU": 1}, threads_per_worker=1,
                                        host="127.0.0.1", dashboard_address=":0")
        except ImportError:
            pass
    return distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                                    dashboard_address=":0")


def _timed_batch(client, rows, out):
    from gpudiffim.batch import subtract_many

    start = time.perf_counter()
    batch = subtract_many(rows, out, client)
    wall = time.perf_counter() - start
    statuses = {record["status"] for record in batch.records}
    if statuses != {"ok"}:
        errors = {record.get("error") for record in batch.records}
        raise SystemExit(f"a pair failed: {errors}")
    return (wall, sum(float(record["time_s"]) for record in batch.records),
            sum(float(record["cpu_s"]) for record in batch.records))


def _run(workers, rows, warm_rows, folder, name):
    import distributed

    with _cluster(workers) as cluster, distributed.Client(cluster) as client:
        client.wait_for_workers(workers)
        # warm-up: one pair per worker (imports, caches, compiled kernels)
        _timed_batch(client, warm_rows[:workers], folder / f"{name}-warm")
        wall, busy, cpu = _timed_batch(client, rows, folder / name)
    return {"workers": workers, "pairs": len(rows), "wall_s": wall, "pairs_per_s": len(rows) / wall,
            "worker_s_per_pair": busy / len(rows), "worker_cpu_s_per_pair": cpu / len(rows),
            "overhead_ms_per_pair": 1e3 * (wall * workers - busy) / len(rows)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--stars", type=int, default=4000)
    parser.add_argument("--pairs", type=int, default=6, help="pairs per throughput batch (default 6)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--tiny", type=int, default=40, help="tiny pairs for the overhead (default 40; 0 skips)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    print(f"load average (1, 5, 15 min) at the start: {os.getloadavg()}", flush=True)
    results = {"machine": machine_info(), "size": args.size, "stars": args.stars, "throughput": [], "tiny": None}
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
        folder = Path(tmp)
        rows = _write_pairs(folder, args.size, args.stars, args.pairs)
        warm = [{**row, "output": f"warm{i}.fits"} for i, row in enumerate(rows)]
        for workers in args.workers:
            result = _run(workers, rows, warm, folder, f"w{workers}")
            results["throughput"].append(result)
            print(f"{args.size}² x {args.pairs}, {workers} worker(s): {result['wall_s']:.1f} s, "
                  f"{result['pairs_per_s']:.3f} pairs/s, {result['worker_s_per_pair']:.2f} s per pair on a worker "
                  f"({result['worker_cpu_s_per_pair']:.2f} s CPU)",
                  flush=True)
        if args.tiny:
            tiny_folder = folder / "tiny"
            tiny_folder.mkdir()
            tiny = _write_pairs(tiny_folder, 96, 25, args.tiny)
            results["tiny"] = _run(1, tiny, [{**tiny[0], "output": "warm.fits"}], tiny_folder, "tiny")
            print(f"96² x {args.tiny}, 1 worker: {results['tiny']['wall_s']:.2f} s, "
                  f"{results['tiny']['worker_s_per_pair'] * 1e3:.0f} ms per pair on the worker, overhead "
                  f"{results['tiny']['overhead_ms_per_pair']:.1f} ms per pair", flush=True)
    _report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))


def _report(results):
    rates = {r["workers"]: r["pairs_per_s"] for r in results["throughput"]}
    print(f"\n| workers | pairs | wall (s) | pairs/s | s per pair on a worker (CPU s) | efficiency | "
          f"{VISIT_CCDS}-CCD visit |")
    print("|---|---|---|---|---|---|---|")
    for r in results["throughput"]:
        efficiency = r["pairs_per_s"] / (r["workers"] * rates[1]) if 1 in rates else float("nan")
        visit = VISIT_CCDS / r["pairs_per_s"]
        print(f"| {r['workers']} | {r['pairs']} | {r['wall_s']:.1f} | {r['pairs_per_s']:.3f} | "
              f"{r['worker_s_per_pair']:.2f} ({r['worker_cpu_s_per_pair']:.2f}) | {efficiency:.2f} | "
              f"{visit / 60:.1f} min |")
    if results["tiny"]:
        print(f"\nOverhead per tiny pair: {results['tiny']['overhead_ms_per_pair']:.1f} ms (bound 50 ms)")
    machine = results["machine"]
    print(f"\nmachine: {json.dumps(machine, default=str)}")
    print(f"load average (1, 5, 15 min) at the end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
