"""Compile every unit in ``kernels/`` to PTX with nvcc, warnings as errors.

``python -m gpudiffim._cuda.nvcc_check`` (run by ``.ci/run``) and
``tests/test_kernels.py`` both use :func:`compile_ptx`.  The text compiled is
the one NVRTC gets (:func:`._loader.source`, default defines).
"""

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from ._loader import source, units

__all__ = ["ARCHS", "compile_ptx", "main"]

#: Targets checked.  Issue 4 asks for sm_70, which CUDA 13 no longer supports; sm_75 is its oldest.
ARCHS = ("sm_75", "sm_80", "sm_90")


def compile_ptx(unit, arch, nvcc="nvcc"):
    """Compile ``unit`` for ``arch``; return ``(ok, diagnostics)``."""
    with tempfile.TemporaryDirectory() as tmp:
        cu = Path(tmp) / f"{unit}.cu"
        cu.write_text(source(unit))
        cmd = [nvcc, "-ptx", f"-arch={arch}", "-std=c++17", "-Werror", "all-warnings", str(cu),
               "-o", str(Path(tmp) / f"{unit}.ptx")]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        ptx = Path(tmp) / f"{unit}.ptx"
        ok = result.returncode == 0 and ptx.is_file() and ".entry" in ptx.read_text()
        return ok, (result.stdout + result.stderr).strip()


def main():
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        print("nvcc not found: kernel compile check skipped")
        return 0
    failed = 0
    for unit in units():
        for arch in ARCHS:
            ok, log = compile_ptx(unit, arch, nvcc)
            print(f"{'ok  ' if ok else 'FAIL'} kernels/{unit}.cu {arch}")
            if not ok:
                failed += 1
                print(log or "(no PTX entry emitted)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
