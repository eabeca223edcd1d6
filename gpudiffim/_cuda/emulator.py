"""Run the kernels on the CPU: g++ compiles the same ``.cu`` text with ``emulator.h``.

The translation unit is ``emulator.h`` + the unit's source (exactly what NVRTC
gets, see :func:`._loader.source`) + a launch shim generated from
:data:`.signatures.KERNELS`: one ``extern "C"`` function per entry point that
takes the geometry and a ``void**`` argument array, as ``cuLaunchKernel``
does.  The shared library is cached under ``$GPUDIFFIM_CACHE_DIR`` (default
``~/.cache/gpudiffim``) by a hash of the text and flags, built once and loaded
once per process.
"""

import ctypes
import functools
import hashlib
import importlib.resources
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from ..errors import BackendUnavailableError
from ._loader import source
from .signatures import KERNELS, parse_ctype

__all__ = ["compiler", "library", "run", "symbol"]

FLAGS = ("-std=c++20", "-O1", "-pthread", "-shared", "-fPIC", "-Wall", "-Werror",
         "-Wno-unknown-pragmas")  # "#pragma unroll" is a CUDA hint


def compiler():
    """Path of the C++ compiler (``$CXX`` or ``g++``), or None."""
    return shutil.which(os.environ.get("CXX", "g++"))


def symbol(kernel_name):
    """Name of the ``extern "C"`` shim of ``kernel_name``."""
    return "gdi_emu_" + re.sub(r"[^A-Za-z0-9]", "_", kernel_name)


def _shim(unit):
    lines = []
    for name, spec in KERNELS.items():
        if spec.unit != unit:
            continue
        casts = []
        for index, (_, ctype) in enumerate(spec.params):
            casts.append(f"*static_cast<{ctype}*>(args[{index}])")  # args[i] points at the value
        lines.append(
            f'extern "C" int {symbol(name)}(unsigned gx, unsigned gy, unsigned gz,\n'
            f"        unsigned bx, unsigned by, unsigned bz, void** args)\n"
            f"{{\n"
            f"    return gdi_emu::launch(dim3(gx, gy, gz), dim3(bx, by, bz), [args] {{\n"
            f"        {name}({', '.join(casts)});\n"
            f"    }});\n"
            f"}}\n")
    return "\n// ---- generated launch shims ----\n" + "\n".join(lines)


def translation_unit(unit, defines=()):
    """Full C++ text compiled for ``unit``."""
    header = (importlib.resources.files("gpudiffim._cuda") / "emulator.h").read_text()
    return header + "\n" + source(unit, defines) + _shim(unit)


def _cache_dir():
    env = os.environ.get("GPUDIFFIM_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "gpudiffim"


@functools.cache
def library(unit, defines=()):
    """The loaded ``ctypes.CDLL`` of ``unit`` (built with g++ on first use)."""
    cxx = compiler()
    if cxx is None:
        msg = ("the cuda-emulator backend needs a C++20 compiler (g++ or $CXX) and none was found; "
               "use GPUDIFFIM_BACKEND=numpy or auto")
        raise BackendUnavailableError(msg)
    text = translation_unit(unit, defines)
    key = hashlib.sha256("\0".join((cxx, *FLAGS, text)).encode()).hexdigest()[:20]
    folder = _cache_dir() / "emulator"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{unit}-{key}.so"
    if not target.is_file():
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            cpp = Path(tmp) / f"{unit}.cpp"
            cpp.write_text(text)
            built = Path(tmp) / "lib.so"
            result = subprocess.run([cxx, *FLAGS, str(cpp), "-o", str(built)], capture_output=True, text=True,
                                    check=False)
            if result.returncode != 0:
                msg = f"emulator build of kernels/{unit}.cu failed:\n{result.stderr}"
                raise RuntimeError(msg)
            os.replace(built, target)  # atomic: concurrent builders agree on the content
    lib = ctypes.CDLL(str(target))
    for name, spec in KERNELS.items():
        if spec.unit == unit:
            fn = getattr(lib, symbol(name))
            fn.argtypes = [ctypes.c_uint] * 6 + [ctypes.POINTER(ctypes.c_void_p)]
            fn.restype = ctypes.c_int
    return lib


def run(unit, defines, kernel_name, grid, block, args):
    """Run ``kernel_name`` with already checked and converted ``args`` (NumPy arrays and scalars)."""
    fn = getattr(library(unit, tuple(defines)), symbol(kernel_name))
    holders = []
    for (_, ctype), arg in zip(KERNELS[kernel_name].params, args):
        kind, dtype, _ = parse_ctype(ctype)
        if kind == "pointer":
            holders.append(ctypes.c_void_p(arg.ctypes.data))
        else:
            holders.append(np.ctypeslib.as_ctypes_type(dtype)(arg.item()))
    argv = (ctypes.c_void_p * len(holders))(*(ctypes.addressof(h) for h in holders))
    status = fn(*grid, *block, argv)
    if status != 0:
        msg = f"emulated launch of {kernel_name} failed (status {status}: grid {grid}, block {block})"
        raise RuntimeError(msg)
