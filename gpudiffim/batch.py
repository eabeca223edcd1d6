"""Many image pairs on Dask: ``gpudiffim batch`` and :func:`subtract_many`.

A batch is a list of (science, template) pairs, each subtracted exactly as
``gpudiffim subtract`` does it (the same code, the same output file), as one
``dask.distributed`` task per pair.  Needs the optional ``dask`` extra
(``pip install "gpudiffim[dask]"``; ``gpudiffim[dask-cuda12x]`` or ``[dask-cuda13x]`` adds dask-cuda
for one worker per GPU).

Nothing is lost:

* each pair is written under a temporary name in a ``.gpudiffim-partial``
  folder next to its output, read back, checksummed (SHA-256) and only then
  renamed (:func:`os.replace`) to its final name, so an output that exists is
  complete;
* ``DIR/manifest.csv`` has one row per pair (columns :data:`MANIFEST_COLUMNS`)
  and is rewritten atomically (temporary file, then rename) after every
  finished pair (once for pairs that finish together; ~20 ms for 10,000
  rows);
* a failing pair is recorded with its one-line message and the batch goes
  on.  ``failed`` is a failure that the same inputs and options would repeat
  (unreadable or corrupted file, no overlap, failed fit); ``error`` is
  anything else (a worker lost more often than the scheduler allows, an
  unexpected exception after ``retries`` retries);
* re-running the same batch skips every pair whose output is complete and
  valid (its size and checksum match the manifest) and every ``failed`` pair
  whose inputs and options are unchanged (same ``key``); it redoes the rest.

Per-worker reuse: worker processes live for the whole batch and run one pair
at a time, so what the library caches per process (compiled CUDA kernels,
cuFFT plans, the device memory pool, imported modules) is built by a worker's
first pair and reused by the next.  The kernel basis depends on each pair's
measured PSF widths and is built per pair.
"""

import contextlib
import csv
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import socket
import sys
import time
import uuid
import warnings

from ._backend import HOST_THREADS_VARIABLE
from .errors import ConfigurationError, GpudiffimError, MissingDependencyError

__all__ = ["MANIFEST_COLUMNS", "Batch", "Pair", "read_pairs", "run_pair", "subtract_many"]

log = logging.getLogger(__name__)

#: Columns of ``manifest.csv``, in order.  ``time_s``: seconds the pair took
#: on its worker (reading, fit, writing, checking) and ``cpu_s`` the CPU
#: seconds of the worker process meanwhile; ``kernel_sum``: at the
#: centre of the difference image; ``residual_*``: mean, standard deviation
#: and pixel count of D/sigma over unflagged pixels; ``sha256`` and ``bytes``
#: of the output file; ``key``: a digest of the pair's paths, options and
#: input file sizes and modification times; ``worker``: host:pid.
MANIFEST_COLUMNS = ("science", "template", "output", "status", "error", "time_s", "cpu_s", "kernel_sum",
                    "n_good", "n_bad", "residual_mean", "residual_std", "residual_pixels", "sha256",
                    "bytes", "warnings", "key", "worker")

#: subtract options that a batch does not take (the paths, and what a batch handles itself).
NOT_BATCH_OPTIONS = frozenset({"help", "science", "template", "output", "matched", "overwrite",
                               "plots", "debug"})

#: subtract options that name files: relative paths are made absolute on the client (from the
#: working directory for batch-wide options, from the CSV's folder for per-pair ones).
PATH_OPTIONS = frozenset({"candidates", "config_file"} | {f"{prefix}_{name}" for prefix in ("science", "template")
                                                           for name in ("variance", "sigma", "mask", "weight", "psf")})

#: Folder next to each output where pairs are written before their rename.
PARTIAL_FOLDER = ".gpudiffim-partial"

#: Exit code of ``gpudiffim batch`` when at least one pair failed (the others are written).
EXIT_PAIRS_FAILED = 4

_PERMANENT = (GpudiffimError, ValueError, TypeError, FileNotFoundError, PermissionError,
              IsADirectoryError, NotADirectoryError)


@dataclasses.dataclass(frozen=True)
class Pair:
    """One image pair of a batch.

    Attributes
    ----------
    science, template : str
        Absolute paths of the input FITS files (``file.fits[HDU]`` allowed).
    output : str
        Absolute path of the difference image.
    options : tuple of (str, object)
        Per-pair ``subtract`` options (argument names as in
        ``gpudiffim subtract``, dashes as underscores), already typed.
    """

    science: str
    template: str
    output: str
    options: tuple = ()


# --------------------------------------------------------------------------- options


def _subtract_parser():
    """The argument parser of ``gpudiffim subtract``."""
    from .cli import _parser

    return _parser()._subparsers._group_actions[0].choices["subtract"]


def batch_option_actions():
    """``{dest: argparse.Action}`` of the ``subtract`` options a batch accepts."""
    return {action.dest: action for action in _subtract_parser()._actions
            if action.option_strings and action.dest not in NOT_BATCH_OPTIONS}


def _parse_bool(name, text):
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "y", "on"):
        return True
    if lowered in ("0", "false", "no", "n", "off", ""):
        return False
    msg = f"option {name} expects true or false, got {text!r}"
    raise ConfigurationError(msg)


def _coerce(name, value, actions):
    """A ``subtract`` option value, typed and checked against its choices.

    Strings (from a CSV cell) are converted with the option's type; ``config``
    takes a list, or a string of ``field=value`` items separated by ``;``.

    Raises
    ------
    ConfigurationError
        For an unknown option, a value of the wrong type or outside the choices.
    """
    dest = name.replace("-", "_")
    if dest not in actions:
        known = ", ".join(sorted(actions))
        msg = f"unknown subtract option {name!r} (options: {known})"
        raise ConfigurationError(msg)
    action = actions[dest]
    if action.nargs == 0:  # a flag
        return _parse_bool(name, value) if isinstance(value, str) else bool(value)
    if dest == "config":
        items = value.split(";") if isinstance(value, str) else list(value)
        return [item.strip() for item in items if item.strip()]
    if isinstance(value, str) and action.type is not None:
        try:
            value = action.type(value)
        except ValueError:
            msg = f"option {name}: cannot read {value!r} as {action.type.__name__}"
            raise ConfigurationError(msg) from None
    if action.choices is not None and value not in action.choices:
        msg = f"option {name} must be one of {', '.join(action.choices)}, got {value!r}"
        raise ConfigurationError(msg)
    return value


def check_options(options):
    """Typed, validated batch-wide ``subtract`` options (``{dest: value}``).

    Parameters
    ----------
    options : mapping of str to object or None
        ``subtract`` option names (``science_fwhm`` or ``science-fwhm``) to
        values; ``None`` values are dropped, relative paths of file options
        (:data:`PATH_OPTIONS`) are made absolute.

    Returns
    -------
    dict

    Raises
    ------
    ConfigurationError
        For an unknown option or an invalid value.
    """
    actions = batch_option_actions()
    checked = {name.replace("-", "_"): _coerce(name, value, actions)
               for name, value in (options or {}).items() if value is not None}
    return {name: _absolute(value, os.getcwd()) if name in PATH_OPTIONS else value
            for name, value in checked.items()}


# --------------------------------------------------------------------------- pairs


def _stem(path):
    name = os.path.basename(path.split("[", 1)[0])
    for suffix in (".gz", ".fz", ".fits", ".fit", ".fts"):
        if name.lower().endswith(suffix):
            name = name[:-len(suffix)]
    return name


def _absolute(path, folder):
    path = os.path.expanduser(path.strip())
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(folder, path))


def _pair_from_row(row, number, base, out_dir, actions):
    """A :class:`Pair` from one mapping (a CSV row); ``number`` names it in messages."""
    missing = [name for name in ("science", "template") if not str(row.get(name) or "").strip()]
    if missing:
        msg = f"pair {number}: column {missing[0]} is empty"
        raise ConfigurationError(msg)
    science = _absolute(str(row["science"]), base)
    template = _absolute(str(row["template"]), base)
    output = str(row.get("output") or "").strip()
    output = _absolute(output, out_dir) if output else os.path.join(out_dir, f"{_stem(science)}-diff.fits")
    options = []
    for name, value in row.items():
        if name in ("science", "template", "output") or value is None or value == "":
            continue
        try:
            value = _coerce(name, value, actions)
            dest = name.replace("-", "_")
            options.append((dest, _absolute(value, base) if dest in PATH_OPTIONS else value))
        except ConfigurationError as error:
            msg = f"pair {number}: {error}"
            raise ConfigurationError(msg) from None
    return Pair(science, template, output, tuple(options))


def _check_unique(pairs):
    seen = {}
    for number, pair in enumerate(pairs, 1):
        if pair.output in seen:
            msg = f"pairs {seen[pair.output]} and {number} both write {pair.output}: give an output column"
            raise ConfigurationError(msg)
        if pair.output in (pair.science, pair.template):
            msg = f"pair {number}: output {pair.output} is also an input"
            raise ConfigurationError(msg)
        seen[pair.output] = number


def read_pairs(path, out_dir):
    """The pairs of a ``PAIRS.csv`` file.

    Parameters
    ----------
    path : str or os.PathLike
        CSV with a header.  Columns ``science`` and ``template`` (paths,
        relative ones taken from the CSV's folder) are required; ``output``
        is optional (relative to ``out_dir``; default
        ``out_dir/<science file stem>-diff.fits``); any other column is a
        per-pair ``subtract`` option (``convolve``, ``science_fwhm``,
        ``config`` as ``field=value;field=value``, ...); empty cells keep the
        batch-wide value.
    out_dir : str or os.PathLike
        Output folder.

    Returns
    -------
    list of Pair

    Raises
    ------
    ConfigurationError
        For an unreadable file, a missing column, an unknown option or a bad
        value, or two pairs with the same output.
    """
    path = os.fspath(path)
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
            header = rows and list(rows[0]) or []
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        msg = f"cannot read pairs file {path}: {error}"
        raise ConfigurationError(msg) from None
    if not rows:
        msg = f"pairs file {path} has no pairs (a header with science,template then one row per pair)"
        raise ConfigurationError(msg)
    for name in ("science", "template"):
        if name not in header:
            msg = f"pairs file {path} has no column {name!r} (header: {','.join(map(str, header))})"
            raise ConfigurationError(msg)
    return as_pairs(rows, out_dir, base=os.path.dirname(os.path.abspath(path)))


def as_pairs(pairs, out_dir, base=None):
    """:class:`Pair` objects from pairs, mappings (like CSV rows) or (science, template) tuples.

    Parameters
    ----------
    pairs : iterable of Pair, mapping or (str, str)
    out_dir : str or os.PathLike
        Output folder (default outputs, relative ``output`` values).
    base : str, optional
        Folder of relative input paths (default: the working directory).

    Returns
    -------
    list of Pair

    Raises
    ------
    ConfigurationError
        As :func:`read_pairs`.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    base = base or os.getcwd()
    actions = batch_option_actions()
    result = []
    for number, item in enumerate(pairs, 1):
        if isinstance(item, Pair):
            result.append(item)
            continue
        if not hasattr(item, "items"):
            item = dict(zip(("science", "template", "output"), item))
        result.append(_pair_from_row({str(k): v for k, v in item.items()}, number, base, out_dir, actions))
    _check_unique(result)
    return result


# --------------------------------------------------------------------------- one pair (on a worker)


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _summary_of(path):
    """Kernel sum, GOOD/BAD counts and D/sigma statistics of a written difference image."""
    from astropy.io import fits

    from .cli import _residual_summary
    from .io import read_exposure

    header = fits.getheader(path, 0)
    mean, std, count = _residual_summary(read_exposure(path).masked_image)
    return {"kernel_sum": float(header["KSUM"]), "n_good": int(header["NGOOD"]),
            "n_bad": int(header["NBAD"]), "residual_mean": mean, "residual_std": std,
            "residual_pixels": count}


def _checked(partial):
    """:func:`_summary_of` a freshly written output; a failure to read it back is transient.

    Raises
    ------
    OSError
        If the file does not read back (a torn write): not a property of the
        inputs, so the pair is retried.
    """
    try:
        return _summary_of(partial)
    except Exception as error:  # any reading failure of our own output
        msg = f"output {os.path.basename(partial)} did not read back ({type(error).__name__}: {error})"
        raise OSError(msg) from error


def _subtract_args(pair, options, output):
    """The ``argparse`` namespace of ``gpudiffim subtract`` for ``pair`` written to ``output``."""
    from .cli import _parser

    args = _parser().parse_args(["subtract", pair.science, pair.template, "-o", output])
    merged = dict(options)
    for name, value in pair.options:
        merged[name] = [*merged.get(name, []), *value] if name == "config" else value
    for name, value in merged.items():
        setattr(args, name, value)
    return args


def _one_line(error):
    from .errors import NoKernelCandidatesError, SingularSystemError

    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, (NoKernelCandidatesError, SingularSystemError)):
        return f"fit failed: {text}"
    return text


def _worker_name():
    return f"{socket.gethostname()}:{os.getpid()}"


def _subtract_to(pair, options, partial):
    """Run ``gpudiffim subtract`` for ``pair`` into ``partial``; returns the warnings' text."""
    from ._backend import use_backend
    from .cli import _subtract

    args = _subtract_args(pair, options, partial)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with use_backend(args.backend) if args.backend else contextlib.nullcontext():
            _subtract(args)
    return "; ".join(dict.fromkeys(" ".join(str(w.message).split()) for w in caught))


def run_pair(pair, options=None, key=""):
    """Subtract one pair as ``gpudiffim subtract`` does, writing its output atomically.

    The difference image is written into a fresh folder
    ``.gpudiffim-partial/<random>/`` next to the output, read back (a
    corrupt write raises), checksummed and renamed to ``pair.output``
    (replacing an older file); the folder is removed in every case.

    Parameters
    ----------
    pair : Pair
    options : mapping, optional
        Batch-wide ``subtract`` options (``{dest: value}``, as
        :func:`check_options` returns); ``pair.options`` override them
        (``config`` items are appended).
    key : str
        Copied into the record (see :data:`MANIFEST_COLUMNS`).

    Returns
    -------
    dict
        The manifest row (:data:`MANIFEST_COLUMNS`): status ``ok``, or
        ``failed`` with the one-line message for a failure that would repeat
        (bad input, failed fit).

    Raises
    ------
    Exception
        Any other failure (e.g. out of memory), so that Dask retries the pair.
    """
    start, cpu_start = time.perf_counter(), time.process_time()
    record = {"science": pair.science, "template": pair.template, "output": pair.output,
              "key": key, "worker": _worker_name()}
    folder = os.path.join(os.path.dirname(pair.output), PARTIAL_FOLDER, uuid.uuid4().hex)
    try:
        os.makedirs(folder)
        partial = os.path.join(folder, os.path.basename(pair.output))
        record["warnings"] = _subtract_to(pair, options or {}, partial)
        record.update(_checked(partial), sha256=_sha256(partial), bytes=os.path.getsize(partial))
        os.replace(partial, pair.output)
        record["status"] = "ok"
    except _PERMANENT as error:
        record.update(status="failed", error=_one_line(error))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    record["time_s"] = round(time.perf_counter() - start, 4)
    record["cpu_s"] = round(time.process_time() - cpu_start, 4)
    return record


# --------------------------------------------------------------------------- manifest


def _input_stamp(path):
    try:
        stat = os.stat(path.split("[", 1)[0])
    except OSError:
        return None
    return [stat.st_size, stat.st_mtime_ns]


def pair_key(pair, options):
    """Digest of a pair's paths, options and input files (size, modification time).

    Parameters
    ----------
    pair : Pair
    options : mapping
        Batch-wide options.

    Returns
    -------
    str
        16 hexadecimal digits.
    """
    text = json.dumps({"pair": [pair.science, pair.template, pair.output, list(pair.options)],
                       "options": sorted(options.items()),
                       "inputs": [_input_stamp(pair.science), _input_stamp(pair.template)]},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Manifest:
    """``manifest.csv``: one row per pair, rewritten atomically on every update.

    Parameters
    ----------
    path : str
        The CSV file; rows of an existing file are kept for the pairs given.
    pairs : list of Pair
        The pairs, in order; a pair without a row gets status ``pending``.
    """

    def __init__(self, path, pairs):
        self.path = path
        old = self._read(path)
        self.rows = {}
        for pair in pairs:
            row = old.get(pair.output) or {"science": pair.science, "template": pair.template,
                                           "output": pair.output, "status": "pending"}
            self.rows[pair.output] = {name: row.get(name, "") for name in MANIFEST_COLUMNS}

    @staticmethod
    def _read(path):
        try:
            with open(path, newline="", encoding="utf-8") as handle:
                return {row["output"]: row for row in csv.DictReader(handle) if row.get("output")}
        except FileNotFoundError:
            return {}
        except (OSError, csv.Error, KeyError, UnicodeDecodeError) as error:
            log.warning("ignoring unreadable manifest %s (%s): every pair is redone", path, error)
            return {}

    def is_done(self, pair, key):
        """Whether ``pair`` needs no work: output complete and valid, or a repeatable failure.

        Parameters
        ----------
        pair : Pair
        key : str
            Its current :func:`pair_key`.

        Returns
        -------
        bool
        """
        row = self.rows[pair.output]
        if row["key"] != key:
            return False
        if row["status"] == "failed":
            return True
        if row["status"] != "ok":
            return False
        try:
            return os.path.getsize(pair.output) == int(row["bytes"]) and _sha256(pair.output) == row["sha256"]
        except (OSError, ValueError):
            return False

    def set(self, record):
        """Set the row of ``record["output"]`` (the file is rewritten by :meth:`write`)."""
        self.rows[record["output"]] = {name: _cell(record.get(name)) for name in MANIFEST_COLUMNS}

    def update(self, record):
        """Set the row of ``record["output"]`` and rewrite the file atomically."""
        self.set(record)
        self.write()

    def write(self):
        """Write every row to a temporary file next to the manifest, then rename it."""
        temporary = f"{self.path}.{uuid.uuid4().hex}.tmp"
        try:
            with open(temporary, "w", newline="", encoding="utf-8") as handle:
                writer = csv.DictWriter(handle, MANIFEST_COLUMNS)
                writer.writeheader()
                writer.writerows(self.rows.values())
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, self.path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(temporary)

    def counts(self):
        """``{status: number of rows}``."""
        result = {}
        for row in self.rows.values():
            result[row["status"]] = result.get(row["status"], 0) + 1
        return result


def _cell(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    return str(value)


# --------------------------------------------------------------------------- the batch (client side)


def _require_distributed():
    try:
        import distributed
    except ImportError as error:
        msg = 'gpudiffim batch needs dask.distributed: pip install "gpudiffim[dask]"'
        raise MissingDependencyError(msg) from error
    return distributed


def _on_gpus():
    """Whether pairs would run on the CuPy backend here (``GPUDIFFIM_BACKEND`` and a usable device)."""
    from ._backend import compute_backend

    try:
        return compute_backend() == "cupy"
    except GpudiffimError:  # an unusable backend request: the workers report it per pair
        return False


def local_cluster(n_workers=None, *, dashboard=True):
    """A local Dask cluster sized to this machine.

    One worker per GPU (``dask_cuda.LocalCUDACluster``, each with the
    resource ``GPU=1``) when the CuPy backend would run here (a usable GPU,
    ``GPUDIFFIM_BACKEND`` not ``numpy``) and dask-cuda is installed;
    otherwise one single-threaded worker process per CPU core.  Workers
    listen on the loopback interface only.

    Parameters
    ----------
    n_workers : int, optional
        Worker processes (CPU clusters; default: the number of cores).
    dashboard : bool
        Serve the Dask dashboard on port 8787 (needs bokeh); otherwise the
        scheduler's HTTP endpoints take any free port.

    Returns
    -------
    distributed.deploy.Cluster
    """
    distributed = _require_distributed()
    address = ":8787" if dashboard else ":0"  # ":0": any free port, never a clash
    if _on_gpus():
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError:
            log.warning('a GPU is present but dask-cuda is not: CPU workers (pip install "gpudiffim[dask-cuda12x]")')
        else:
            return LocalCUDACluster(resources={"GPU": 1}, threads_per_worker=1, host="127.0.0.1",
                                    dashboard_address=address)
    cores = os.cpu_count() or 1
    n_workers = n_workers or cores
    # the cores shared among the worker processes: each one's host threads (gpudiffim._backend.host_threads)
    env = {HOST_THREADS_VARIABLE: str(max(1, cores // n_workers))}
    return distributed.LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                                    host="127.0.0.1", dashboard_address=address, env=env)


def _resources(client):
    """``{"GPU": 1}`` when the cluster's workers declare GPUs, else None."""
    workers = client.scheduler_info().get("workers", {})
    has_gpu = any("GPU" in (worker.get("resources") or {}) for worker in workers.values())
    return {"GPU": 1} if has_gpu else None


def dashboard_address(client):
    """The dashboard URL of ``client``'s scheduler, or None when it serves none."""
    services = client.scheduler_info().get("services", {})
    return client.dashboard_link if "dashboard" in services else None


class Batch:
    """Pairs submitted to a Dask cluster; records them in the manifest as they finish.

    Made by :func:`subtract_many`.  ``futures`` holds one
    ``distributed.Future`` per pair that had work to do (its result is the
    pair's manifest row); :meth:`as_completed` yields them as they finish and
    records each in the manifest; :meth:`wait` does the whole batch.

    Attributes
    ----------
    pairs : list of Pair
    futures : dict of Future to Pair
    manifest : Manifest
    records : list of dict
        Rows of the pairs finished in this run, in finishing order.
    skipped : int
        Pairs with nothing to do (complete and valid, or a failure that would repeat).
    """

    def __init__(self, pairs, manifest, client, owns_client, retries):
        self.pairs, self.manifest, self.client = pairs, manifest, client
        self._owns_client, self.retries = owns_client, retries
        self.futures, self.records, self.skipped = {}, [], 0
        self.started = time.perf_counter()

    def _record_of(self, future):
        pair = self.futures[future]
        if future.status == "finished":
            return future.result()
        try:
            error = future.exception()
        except BaseException as cancelled:  # a cancelled future raises its CancelledError here
            error = cancelled
        text = _one_line(error) if error is not None else future.status
        if type(error).__name__ == "KilledWorker":
            text = f"worker lost while running the pair ({text})"
        return {"science": pair.science, "template": pair.template, "output": pair.output,
                "status": "error", "error": text, "key": self._keys[pair.output]}

    def as_completed(self):
        """Yield ``(future, record)`` as pairs finish, each recorded in the manifest first.

        Yields
        ------
        future : distributed.Future
        record : dict
            The pair's manifest row.
        """
        distributed = _require_distributed()
        # pairs finished together are recorded with one rewrite of the manifest
        for group in distributed.as_completed(list(self.futures)).batches():
            finished = [(future, self._record_of(future)) for future in group]
            for _, record in finished:
                self.manifest.set(record)
            self.manifest.write()
            for future, record in finished:
                self.records.append(record)
                yield future, record

    def wait(self, progress=None):
        """Run the batch to its end, then clean up and close a cluster it started.

        Parameters
        ----------
        progress : callable, optional
            Called as ``progress(batch)`` before the first pair and after each.

        Returns
        -------
        list of dict
            The records of the pairs run, in finishing order.
        """
        try:
            if progress:
                progress(self)
            for _ in self.as_completed():
                if progress:
                    progress(self)
        finally:
            self.close()
        return self.records

    def close(self):
        """Remove leftover partial folders of the outputs; close a client :func:`subtract_many` started."""
        _clean_partials(self.pairs)
        if self._owns_client:
            cluster = self.client.cluster
            self.client.close()
            if cluster is not None:
                cluster.close()
            self._owns_client = False

    def counts(self):
        """``{"ok", "failed", "error", "done", "running", "skipped", "total"}`` of this run."""
        counts = {"ok": 0, "failed": 0, "error": 0}
        for record in self.records:
            counts[record["status"]] += 1
        done = len(self.records)
        return {**counts, "done": done, "running": len(self.futures) - done, "skipped": self.skipped,
                "total": len(self.pairs)}

    def summary(self):
        """One line: pairs ok / failed / skipped, time and rate."""
        counts, elapsed = self.counts(), time.perf_counter() - self.started
        rate = counts["done"] / elapsed if elapsed > 0 else 0.0
        text = (f"{counts['total']} pairs: {counts['ok']} written, {counts['failed'] + counts['error']} "
                f"failed, {counts['skipped']} already done; {elapsed:.1f} s, {rate:.2f} pairs/s; "
                f"manifest {self.manifest.path}")
        return text


def _clean_partials(pairs):
    """Remove the ``.gpudiffim-partial`` folders next to the outputs (leftovers of killed writes)."""
    for folder in {os.path.join(os.path.dirname(pair.output), PARTIAL_FOLDER) for pair in pairs}:
        shutil.rmtree(folder, ignore_errors=True)


def _prepare(pairs, out_dir, options):
    """Pairs, checked options, output folders and the manifest of a batch."""
    out_dir = os.path.abspath(os.fspath(out_dir))
    if isinstance(pairs, (str, os.PathLike)):
        pairs = read_pairs(pairs, out_dir)
    else:
        pairs = as_pairs(pairs, out_dir)
    options = check_options(options)
    os.makedirs(out_dir, exist_ok=True)
    for folder in {os.path.dirname(pair.output) for pair in pairs}:
        if not os.path.isdir(folder):
            msg = f"output folder {folder} does not exist"
            raise ConfigurationError(msg)
    return pairs, options, Manifest(os.path.join(out_dir, "manifest.csv"), pairs)


def subtract_many(pairs, out_dir, client=None, *, options=None, retries=1, redo=False, wait=True,
                  n_workers=None, progress=None, dashboard=False):
    """Subtract many image pairs on a Dask cluster, resumably.

    Each pair runs as ``gpudiffim subtract`` would (same options, same
    output file) in one task; see the module notes for the guarantees.

    Parameters
    ----------
    pairs : str, os.PathLike or iterable
        A ``PAIRS.csv`` file (:func:`read_pairs`), or :class:`Pair` objects,
        mappings with the CSV's columns, or (science, template[, output])
        tuples.
    out_dir : str or os.PathLike
        Folder of the default outputs and of ``manifest.csv`` (created if
        missing).
    client : distributed.Client, optional
        Runs the tasks.  Without it a local cluster (:func:`local_cluster`)
        is started and closed at the end.
    options : mapping, optional
        Batch-wide ``subtract`` options, e.g. ``{"convolve": "science",
        "config": ["spatial_kernel_order=1"]}``.
    retries : int
        Retries of a pair after an unexpected error; for a cluster started
        here also the times a pair may lose its worker before it is
        recorded as ``error``.
    redo : bool
        Run every pair, even those complete or failed with the same inputs.
    wait : bool
        Run the batch to its end (default).  False returns at once with the
        tasks submitted; use :meth:`Batch.as_completed` or :meth:`Batch.wait`.
    n_workers : int, optional
        Worker processes of a local CPU cluster.
    progress : callable, optional
        Passed to :meth:`Batch.wait`.
    dashboard : bool
        Serve the dashboard from a local cluster.

    Returns
    -------
    Batch

    Raises
    ------
    ConfigurationError
        For a bad pairs file, option or output folder.
    MissingDependencyError
        Without dask.distributed.

    Examples
    --------
    >>> from gpudiffim.batch import subtract_many
    >>> batch = subtract_many("pairs.csv", "diffs", retries=2)      # doctest: +SKIP
    >>> print(batch.summary())                                      # doctest: +SKIP
    """
    distributed = _require_distributed()
    pairs, options, manifest = _prepare(pairs, out_dir, options)
    owns = client is None
    if owns:
        import dask

        with dask.config.set({"distributed.scheduler.allowed-failures": retries}):
            client = distributed.Client(local_cluster(n_workers, dashboard=dashboard))
    batch = Batch(pairs, manifest, client, owns, retries)
    try:
        _submit(batch, options, redo)
    except BaseException:
        batch.close()
        raise
    if wait:
        batch.wait(progress)
    return batch


def _submit(batch, options, redo):
    """Write the manifest's pending rows, then submit every pair with work to do."""
    batch._keys = {pair.output: pair_key(pair, options) for pair in batch.pairs}
    todo = []
    for pair in batch.pairs:
        if not redo and batch.manifest.is_done(pair, batch._keys[pair.output]):
            batch.skipped += 1
        else:
            batch.manifest.rows[pair.output] = {name: "" for name in MANIFEST_COLUMNS} | {
                "science": pair.science, "template": pair.template, "output": pair.output, "status": "pending"}
            todo.append(pair)
    batch.manifest.write()
    _clean_partials(batch.pairs)
    resources = _resources(batch.client)
    for pair in todo:
        future = batch.client.submit(run_pair, pair, options, batch._keys[pair.output],
                                     key=f"gpudiffim-{_stem(pair.output)}-{uuid.uuid4().hex[:12]}",
                                     retries=batch.retries, pure=False, resources=resources)
        batch.futures[future] = pair


# --------------------------------------------------------------------------- progress


class ProgressLine:
    """A one-line progress display: pairs done / failed / running, rate and ETA.

    On a terminal the line is redrawn in place; elsewhere one line is logged
    per finished pair.

    Parameters
    ----------
    stream : file, optional
        Default ``sys.stderr``.
    """

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.shown = 0

    def __call__(self, batch):
        """Show the state of ``batch``."""
        counts = batch.counts()
        elapsed = time.perf_counter() - batch.started
        rate = counts["done"] / elapsed if elapsed > 0 else 0.0
        left = counts["running"]
        eta = f"{left / rate:.0f} s" if rate > 0 else "?"
        line = (f"pairs {counts['done']}/{len(batch.futures)} done ({counts['failed'] + counts['error']} failed), "
                f"{left} running or queued, {counts['skipped']} already done, {rate:.2f} pairs/s, ETA {eta}")
        if self.tty:
            self.stream.write("\r" + line.ljust(self.shown))
            self.shown = len(line)
            if not left:
                self.stream.write("\n")
            self.stream.flush()
        elif counts["done"] and batch.records:
            record = batch.records[-1]
            log.info("%s: %s%s", record["output"], record["status"],
                     f" ({record['error']})" if record.get("error") else "")
