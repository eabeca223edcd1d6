"""``gpudiffim batch`` / :func:`gpudiffim.batch.subtract_many` on a local Dask cluster.

Six small simulated pairs (192²) on a cluster of two single-threaded worker
processes on the loopback interface: four good pairs, one with a corrupted
science file and one of pure noise whose fit must fail.  The good outputs are
compared byte for byte with ``gpudiffim subtract`` run in a separate process
with the workers' thread settings (Dask starts its workers with one BLAS
thread; other thread counts change the last bits of the fit).

Waiting is by polling with timeouts, never fixed sleeps.
"""

import csv
import hashlib
import io
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from astropy.io import fits

distributed = pytest.importorskip("distributed")

from gpudiffim import batch as gbatch  # noqa: E402
from gpudiffim.cli import EXIT_BAD_INPUT, _residual_summary, main  # noqa: E402
from gpudiffim.errors import ConfigurationError  # noqa: E402
from gpudiffim.io import read_exposure, write_masked_image  # noqa: E402
from gpudiffim.testing import make_fake_pair  # noqa: E402

GOOD = ("p0", "p1", "p2", "p3")
#: Dask's worker environment (distributed.nanny.pre-spawn-environ): one thread per library.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
TIMEOUT = 120.0


def _wait_for(condition, timeout=TIMEOUT, what="condition"):
    """Poll ``condition()`` every 20 ms until it is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def _kill_group(group, timeout=10.0):
    """SIGKILL every process of ``group`` until none is left (orphans may linger as zombies: give up then)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            return
        time.sleep(0.02)


def _write_pairs(folder, size=192):
    """Six pairs in ``folder`` and their ``pairs.csv``; returns its path."""
    rows = []
    for number, name in enumerate(GOOD):
        pair = make_fake_pair(shape=(size, size), n_stars=50, seed=40 + number)
        write_masked_image(folder / f"{name}_sci.fits", pair.science)
        write_masked_image(folder / f"{name}_tmpl.fits", pair.template)
        rows.append({"science": f"{name}_sci.fits", "template": f"{name}_tmpl.fits"})
    rows[3]["convolve"] = "science"  # a per-pair option
    # corrupted: a valid file cut in half
    write_masked_image(folder / "bad_sci.fits", make_fake_pair(shape=(size, size), n_stars=50, seed=9).science)
    data = (folder / "bad_sci.fits").read_bytes()
    (folder / "bad_sci.fits").write_bytes(data[:len(data) // 2])
    rows.append({"science": "bad_sci.fits", "template": "p0_tmpl.fits", "output": "bad-diff.fits"})
    # pure noise with the widths given: no kernel candidate, the fit must fail
    rng = np.random.default_rng(3)
    for name in ("noise_sci.fits", "noise_tmpl.fits"):
        fits.PrimaryHDU((5.0 * rng.normal(size=(128, 128))).astype(np.float32)).writeto(folder / name)
    rows.append({"science": "noise_sci.fits", "template": "noise_tmpl.fits", "template_fwhm": "3",
                 "science_fwhm": "4"})
    path = folder / "pairs.csv"
    columns = ["science", "template", "output", "convolve", "template_fwhm", "science_fwhm"]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _manifest(out):
    with open(out / "manifest.csv", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def pairs_csv(tmp_path_factory):
    return _write_pairs(tmp_path_factory.mktemp("inputs"))


@pytest.fixture(scope="module")
def references(pairs_csv, tmp_path_factory):
    """``gpudiffim subtract`` of each good pair, in separate processes with one thread each."""
    folder = tmp_path_factory.mktemp("references")
    env = {**os.environ, **ONE_THREAD}
    runs = {}
    for name in GOOD:
        extra = ["--convolve", "science"] if name == "p3" else []
        command = [sys.executable, "-m", "gpudiffim.cli", "-q", "subtract", str(pairs_csv.parent / f"{name}_sci.fits"),
                   str(pairs_csv.parent / f"{name}_tmpl.fits"), "-o", str(folder / f"{name}.fits"), *extra]
        runs[name] = subprocess.Popen(command, env=env)
    for name, run in runs.items():
        assert run.wait(timeout=TIMEOUT) == 0, name
    return folder


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=":0") as cluster, distributed.Client(cluster) as dask_client:
        yield dask_client


def _check_outputs_valid(out):
    """Every ok row's output exists with its size and checksum; no partial folder is left."""
    rows = _manifest(out)
    outputs = [row["output"] for row in rows]
    assert len(outputs) == len(set(outputs))
    for row in rows:
        if row["status"] == "ok":
            path = type(out)(row["output"])
            assert path.stat().st_size == int(row["bytes"]) and _sha256(path) == row["sha256"]
            read_exposure(path)
    assert not (out / gbatch.PARTIAL_FOLDER).exists()
    return rows


def test_batch_of_six(pairs_csv, references, client, tmp_path):
    out = tmp_path / "out"
    batch = gbatch.subtract_many(pairs_csv, out, client)
    assert batch.counts() == {"ok": 4, "failed": 2, "error": 0, "done": 6, "running": 0, "skipped": 0,
                              "total": 6}
    rows = {os.path.basename(row["output"]): row for row in _check_outputs_valid(out)}
    assert len(rows) == 6
    for name in GOOD:
        row = rows[f"{name}_sci-diff.fits"]
        assert row["status"] == "ok" and row["error"] == ""
        assert (out / f"{name}_sci-diff.fits").read_bytes() == (references / f"{name}.fits").read_bytes()
        header = fits.getheader(out / f"{name}_sci-diff.fits")
        assert float(row["kernel_sum"]) == header["KSUM"]
        assert (int(row["n_good"]), int(row["n_bad"])) == (header["NGOOD"], header["NBAD"])
        mean, std, count = _residual_summary(read_exposure(out / f"{name}_sci-diff.fits").masked_image)
        assert (float(row["residual_mean"]), float(row["residual_std"]), int(row["residual_pixels"])) == (
            mean, std, count)
        assert abs(mean) < 0.1 and count > 20000 and float(row["time_s"]) > 0
    assert fits.getheader(out / "p3_sci-diff.fits")["CONVOLVD"] == "science"
    bad, noise = rows["bad-diff.fits"], rows["noise_sci-diff.fits"]
    assert bad["status"] == "failed" and "bad_sci.fits" in bad["error"]
    assert noise["status"] == "failed" and noise["error"].startswith("fit failed:") and "candidate" in noise["error"]
    assert not (out / "bad-diff.fits").exists() and not (out / "noise_sci-diff.fits").exists()
    assert len({row["worker"] for row in rows.values()}) <= 2  # workers reused, not one process per pair

    assert batch.summary().startswith("6 pairs: 4 written, 2 failed, 0 already done;")

    # a second run has nothing to do and changes nothing
    before = {path.name: path.stat().st_mtime_ns for path in out.glob("*.fits")}
    manifest = (out / "manifest.csv").read_text()
    again = gbatch.subtract_many(pairs_csv, out, client)
    assert again.futures == {} and again.skipped == 6
    assert (out / "manifest.csv").read_text() == manifest
    assert {path.name: path.stat().st_mtime_ns for path in out.glob("*.fits")} == before

    # a changed input is redone; a damaged output too
    (out / "p1_sci-diff.fits").write_bytes(b"damaged")
    os.utime(pairs_csv.parent / "p2_tmpl.fits")
    third = gbatch.subtract_many(pairs_csv, out, client)
    assert sorted(os.path.basename(pair.output) for pair in third.futures.values()) == [
        "p1_sci-diff.fits", "p2_sci-diff.fits"]
    assert third.counts()["ok"] == 2
    _check_outputs_valid(out)
    assert (out / "p1_sci-diff.fits").read_bytes() == (references / "p1.fits").read_bytes()


def test_as_completed_records(pairs_csv, client, tmp_path):
    pairs = gbatch.read_pairs(pairs_csv, tmp_path)[:2]
    batch = gbatch.subtract_many(pairs, tmp_path, client, options={"config": ["spatial_kernel_order=1"]},
                                 wait=False)
    seen = [record["status"] for _, record in batch.as_completed()]
    batch.close()
    assert seen == ["ok", "ok"]
    assert all(row["status"] == "ok" for row in _check_outputs_valid(tmp_path))
    assert '"spatial_kernel_order": 1' in fits.getheader(pairs[0].output)["CONFIG"]


def test_cli_on_a_running_scheduler(pairs_csv, client, tmp_path, caplog):
    out = tmp_path / "out"
    with caplog.at_level("INFO", logger="gpudiffim"):
        code = main(["batch", str(pairs_csv), "--out", str(out), "--scheduler", client.scheduler.address,
                     "--config", "spatial_kernel_order=1", "--retries", "0"])
    assert code == gbatch.EXIT_PAIRS_FAILED
    assert "6 pairs: 4 written, 2 failed, 0 already done;" in caplog.text
    rows = _check_outputs_valid(out)
    assert sorted(row["status"] for row in rows) == ["failed"] * 2 + ["ok"] * 4
    assert all('"spatial_kernel_order": 1' in fits.getheader(row["output"])["CONFIG"]
               for row in rows if row["status"] == "ok")
    assert client.status == "running"  # the CLI closed its own connection only


class _FakeBatch:
    def __init__(self, done, total):
        self.futures, self.started = dict.fromkeys(range(total)), time.perf_counter() - 10.0
        self.records = [{"output": "x.fits", "status": "ok"}] * done

    def counts(self):
        done = len(self.records)
        return {"ok": done, "failed": 0, "error": 0, "done": done, "running": len(self.futures) - done,
                "skipped": 1, "total": len(self.futures) + 1}


def test_progress_line_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    progress = gbatch.ProgressLine(stream)
    progress(_FakeBatch(2, 4))
    progress(_FakeBatch(4, 4))
    first, last = stream.getvalue().split("\r")[1:]
    assert first.startswith("pairs 2/4 done (0 failed), 2 running or queued, 1 already done, 0.20 pairs/s, ETA 10 s")
    assert last.startswith("pairs 4/4 done (0 failed), 0 running or queued") and last.endswith("\n")


def test_killed_client_restarts(pairs_csv, tmp_path):
    """The client (with its local cluster) killed after the first pair; the rerun finishes the batch."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "gpudiffim.cli", "-q", "batch", str(pairs_csv), "--out", str(out),
               "--workers", "1", "--no-dashboard"]
    process = subprocess.Popen(command, start_new_session=True, stderr=subprocess.DEVNULL)
    try:
        def one_done():
            try:
                rows = _manifest(out)
            except (FileNotFoundError, KeyError):
                return None
            return rows if any(row["status"] in ("ok", "failed") for row in rows) else None

        rows = _wait_for(one_done, what="the first finished pair")
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=TIMEOUT)
        _kill_group(process.pid)  # its worker processes
    assert any(row["status"] == "pending" for row in rows)  # killed mid-way
    assert main(["-q", "batch", str(pairs_csv), "--out", str(out), "--workers", "2", "--no-dashboard"]) == 4
    rows = _check_outputs_valid(out)
    assert len(rows) == 6 and sorted(row["status"] for row in rows) == ["failed"] * 2 + ["ok"] * 4


def test_worker_killed_during_a_pair(client, tmp_path):
    """SIGKILL of the worker running a pair: the pair is retried elsewhere or recorded, never half-written."""
    pair = make_fake_pair(shape=(768, 768), n_stars=300, seed=7)
    write_masked_image(tmp_path / "s.fits", pair.science)
    write_masked_image(tmp_path / "t.fits", pair.template)
    out = tmp_path / "out"
    batch = gbatch.subtract_many([(str(tmp_path / "s.fits"), str(tmp_path / "t.fits"))], out, client, wait=False)
    partial = out / gbatch.PARTIAL_FOLDER
    _wait_for(lambda: partial.exists() and any(partial.iterdir()), what="the pair to start")
    (future,) = batch.futures
    address = _wait_for(lambda: next((worker for worker, keys in client.processing().items()
                                      if future.key in keys), None), what="the pair's worker")
    pid = client.run(os.getpid, workers=[address])[address]
    assert not (out / "s-diff.fits").exists()
    os.kill(pid, signal.SIGKILL)
    (record,) = batch.wait()
    assert record["status"] in ("ok", "error")
    rows = _check_outputs_valid(out)
    assert [row["status"] for row in rows] == [record["status"]]
    if record["status"] == "ok":
        assert not record["worker"].endswith(f":{pid}")
    else:
        assert not (out / "s-diff.fits").exists()
    client.wait_for_workers(2, timeout=TIMEOUT)


def test_torn_output_is_not_renamed(pairs_csv, tmp_path, monkeypatch):
    """An output that does not read back is a transient error: nothing at the final name, no leftovers."""
    (pair,) = gbatch.read_pairs(pairs_csv, tmp_path)[:1]

    def torn(path):
        with open(path, "r+b") as handle:
            handle.truncate(os.path.getsize(path) // 3)
        return original(path)

    original = gbatch._summary_of
    monkeypatch.setattr(gbatch, "_summary_of", torn)
    with pytest.raises(OSError, match="did not read back"):
        gbatch.run_pair(pair)
    assert not os.path.exists(pair.output)
    assert os.listdir(tmp_path / gbatch.PARTIAL_FOLDER) == []


@pytest.mark.parametrize(("text", "message"), [
    ("science,template,colour\na.fits,b.fits,red\n", "unknown subtract option 'colour'"),
    ("science,template,convolve\na.fits,b.fits,both\n", "must be one of template, science"),
    ("science,template,science_fwhm\na.fits,b.fits,wide\n", "cannot read 'wide' as float"),
    ("science,output\na.fits,x.fits\n", "no column 'template'"),
    ("science,template\na.fits,b.fits\na.fits,c.fits\n", "both write"),
    ("science,template\n", "has no pairs"),
])
def test_bad_pairs_file(tmp_path, text, message):
    path = tmp_path / "pairs.csv"
    path.write_text(text)
    with pytest.raises(ConfigurationError, match=message):
        gbatch.read_pairs(path, tmp_path)


def test_cli_bad_pairs_file(tmp_path, one_line_error):
    assert main(["batch", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "out")]) == EXIT_BAD_INPUT
    assert "nope.csv" in one_line_error()
    assert main(["batch", str(tmp_path / "nope.csv"), "--out", str(tmp_path), "--retries", "-1"]) == EXIT_BAD_INPUT
    assert "--retries" in one_line_error()


def test_pair_options_and_defaults(tmp_path):
    (pair,) = gbatch.as_pairs([{"science": "a/sci.fits.fz", "template": "/x/t.fits", "convolve": "science",
                                "no_warp": "yes", "config": "kernel_size=15; spatial_kernel_order=1",
                                "science_variance": "a/var.fits"}],
                              tmp_path / "out", base=str(tmp_path))
    assert pair.science == str(tmp_path / "a" / "sci.fits.fz") and pair.template == "/x/t.fits"
    assert pair.output == str(tmp_path / "out" / "sci-diff.fits")
    assert dict(pair.options) == {"convolve": "science", "no_warp": True,
                                  "config": ["kernel_size=15", "spatial_kernel_order=1"],
                                  "science_variance": str(tmp_path / "a" / "var.fits")}
    assert gbatch.check_options({"candidates": "xy.csv"}) == {"candidates": os.path.abspath("xy.csv")}
    args = gbatch._subtract_args(pair, {"config": ["fit_for_background=false"], "science_fwhm": 3.0}, "o.fits")
    assert args.config == ["fit_for_background=false", "kernel_size=15", "spatial_kernel_order=1"]
    assert (args.convolve, args.no_warp, args.science_fwhm, args.output) == ("science", True, 3.0, "o.fits")
