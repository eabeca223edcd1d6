"""The CUDA sources load from a wheel, an editable install and a source checkout (issue 4).

Each case runs a fresh interpreter that imports gpudiffim from the place under
test and asks :func:`gpudiffim._cuda._loader.kernel_dir` where the ``.cu``
files are: inside the unpacked wheel, the checkout's ``kernels/`` (editable
install and plain checkout), with every unit present.

A failing pip build fails the test (a broken ``setup.cfg`` must not read as
"skipped").  Builds use ``--no-build-isolation`` when the environment has the
build requirements (setuptools, wheel; ``.ci/run`` installs them), else pip
fetches them from its index; only when it finds none there at all (offline)
is the test skipped.  The wheel is built from a copy of the checkout, so that
concurrent test runs do not share setuptools' ``build/`` folder.  The pip
helpers are those of ``.ci/check_docker_context.py`` (also used by
``tests/test_docker_context.py``).
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest
from conftest import ci_checker

from gpudiffim._cuda._loader import units

ROOT = Path(__file__).resolve().parent.parent


checker = ci_checker()

#: Generated or private folders of a checkout, never part of a build.
_NOT_SOURCES = shutil.ignore_patterns(".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__",
                                      ".pytest_cache", ".benchmarks", "*.fits")
PROBE = ("import json, gpudiffim; from gpudiffim._cuda._loader import kernel_dir, units, source; "
         "first = kernel_dir() / (units()[0] + '.cu'); "
         "print(json.dumps({'package': gpudiffim.__file__, 'kernels': str(first.parent), 'units': units(), "
         "'ok': all(len(source(u)) > 100 for u in units())}))")


def _probe(python, cwd, pythonpath=None):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = str(pythonpath)
    run = subprocess.run([str(python), "-c", PROBE], cwd=cwd, env=env, capture_output=True, text=True,
                         check=False)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


def _offline_skip(error):
    pytest.skip(f"build tools unavailable offline: {error}")


def test_source_checkout(tmp_path):
    found = _probe(sys.executable, tmp_path, ROOT)
    assert Path(found["package"]).parent == ROOT / "gpudiffim"
    assert Path(found["kernels"]) == ROOT / "kernels"
    assert found["units"] == units() and found["ok"]


@pytest.mark.slow
def test_wheel(tmp_path):
    checkout = tmp_path / "checkout"
    shutil.copytree(ROOT, checkout, ignore=_NOT_SOURCES, symlinks=True)
    try:
        wheel = checker.build_wheel(checkout, tmp_path / "dist")
    except checker.BuildBackendUnavailable as error:
        _offline_skip(error)
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        archive.extractall(tmp_path / "site")
    assert {f"gpudiffim/kernels/{unit}.cu" for unit in units()} <= names
    found = _probe(sys.executable, tmp_path, tmp_path / "site")
    assert Path(found["kernels"]).is_relative_to(tmp_path / "site")
    assert found["units"] == units() and found["ok"]


def _dependencies_without_gpudiffim(folder):
    """``folder`` of links to the running environment's packages, gpudiffim's own entries left out.

    The fresh virtual environment of the editable test gets its dependencies
    (NumPy, SciPy, astropy, ...) from here, whatever interpreter the tests run
    under, and cannot pick up an installed gpudiffim instead of the editable one.
    """
    folder.mkdir()
    for site_dir in {Path(sysconfig.get_paths()[key]) for key in ("purelib", "platlib")}:
        for entry in site_dir.iterdir():
            if entry.name.lower().startswith(("gpudiffim", "__editable__")) or (folder / entry.name).exists():
                continue
            (folder / entry.name).symlink_to(entry)
    return folder


@pytest.mark.slow
def test_editable_install(tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)  # pip, like NumPy, comes through dependencies.pth
    python = env_dir / "bin" / "python"
    site_dir = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              capture_output=True, text=True, check=True).stdout.strip()
    (Path(site_dir) / "dependencies.pth").write_text(f"{_dependencies_without_gpudiffim(tmp_path / 'deps')}\n")
    command = [str(python), "-m", "pip", "install", "--no-deps", "--disable-pip-version-check", "-e", "."]
    if checker.build_requirements_installed(ROOT):  # the new environment sees this one's packages
        command.insert(4, "--no-build-isolation")
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    output = (run.stdout + run.stderr).strip()
    if run.returncode != 0 and "--no-build-isolation" not in command and "(from versions: none)" in output:
        missing = [line for line in output.splitlines() if "(from versions: none)" in line]
        _offline_skip(f"pip found no build requirement on its index: {missing[0].strip()}")
    assert run.returncode == 0, f"`{' '.join(command)}` failed:\n{output[-3000:]}"
    found = _probe(python, tmp_path)
    assert Path(found["package"]).parent == ROOT / "gpudiffim"
    assert Path(found["kernels"]).resolve() == (ROOT / "kernels").resolve()
    assert found["units"] == units() and found["ok"]
