"""The CUDA sources load from a wheel, an editable install and a source checkout (issue 4).

Each case runs a fresh interpreter that imports gpudiffim from the place under
test and asks :func:`gpudiffim._cuda._loader.kernel_dir` where the ``.cu``
files are: inside the unpacked wheel, the checkout's ``kernels/`` (editable
install and plain checkout), with every unit present.
"""

import json
import os
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

from gpudiffim._cuda._loader import units

ROOT = Path(__file__).resolve().parent.parent
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


def _pip(python, *args, cwd=ROOT):
    run = subprocess.run([str(python), "-m", "pip", *args], cwd=cwd, capture_output=True, text=True,
                         check=False)
    if run.returncode != 0:
        pytest.skip(f"pip {' '.join(args[:2])} failed here (offline build tools?): {run.stderr[-300:]}")


def test_source_checkout(tmp_path):
    found = _probe(sys.executable, tmp_path, ROOT)
    assert Path(found["package"]).parent == ROOT / "gpudiffim"
    assert Path(found["kernels"]) == ROOT / "kernels"
    assert found["units"] == units() and found["ok"]


@pytest.mark.slow
def test_wheel(tmp_path):
    _pip(sys.executable, "wheel", ".", "--no-deps", "-q", "-w", str(tmp_path / "dist"))
    wheel = next((tmp_path / "dist").glob("gpudiffim-*.whl"))
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
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    site_dir = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              capture_output=True, text=True, check=True).stdout.strip()
    (Path(site_dir) / "dependencies.pth").write_text(f"{_dependencies_without_gpudiffim(tmp_path / 'deps')}\n")
    _pip(python, "install", "-q", "--no-deps", "-e", ".")
    found = _probe(python, tmp_path)
    assert Path(found["package"]).parent == ROOT / "gpudiffim"
    assert Path(found["kernels"]).resolve() == (ROOT / "kernels").resolve()
    assert found["units"] == units() and found["ok"]
