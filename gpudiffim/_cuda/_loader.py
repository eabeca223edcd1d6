"""Find ``kernels/`` and assemble a unit's source text; CuPy modules memoised per device.

``kernels/`` is package data of ``gpudiffim.kernels`` (``setup.cfg``
``package_dir``), so an installed wheel has ``gpudiffim/kernels/*.cu``; an
editable install or a plain source checkout falls back to the ``kernels/``
folder next to the ``gpudiffim`` package.  Shared code goes in
``kernels/common.cuh`` and is concatenated here, never ``#include``-d through
``-I`` (STYLE §2.3: CuPy's disk-cache key would not cover it).
"""

import functools
import importlib.resources
from pathlib import Path

__all__ = ["kernel_dir", "units", "source", "module_loader"]

_COMMON = "common.cuh"


@functools.cache
def kernel_dir():
    """The folder (a Traversable) holding the ``.cu`` sources."""
    try:
        folder = importlib.resources.files("gpudiffim.kernels")
        if (folder / "residual_moments.cu").is_file():
            return folder
    except ModuleNotFoundError:
        pass
    checkout = Path(__file__).resolve().parents[2] / "kernels"
    if checkout.is_dir():
        return checkout
    msg = "CUDA kernel sources not found: neither package data gpudiffim.kernels nor a checkout's kernels/"
    raise FileNotFoundError(msg)


def units():
    """Names of the kernel units (``.cu`` files without the suffix), sorted."""
    return sorted(p.name[:-3] for p in kernel_dir().iterdir() if p.name.endswith(".cu"))


def source(unit, defines=()):
    """Source text of ``unit``: ``#define`` preamble + ``common.cuh`` (if any) + ``unit.cu``.

    Parameters
    ----------
    unit : str
        File name in ``kernels/`` without ``.cu``.
    defines : tuple of (str, int) pairs
        Compile-time constants (only those that fix shared-memory sizes or unrolling).
    """
    folder = kernel_dir()
    path = folder / f"{unit}.cu"
    if not path.is_file():
        msg = f"no kernel unit {unit!r} in {folder} (have {units()})"
        raise ValueError(msg)
    pre = "".join(f"#define {k} {int(v)}\n" for k, v in defines)
    common = folder / _COMMON
    text = common.read_text() if common.is_file() else ""
    return pre + text + path.read_text()


@functools.cache
def _memoized_module():
    import cupy

    from .signatures import KERNELS

    @cupy.memoize(for_each_device=True)
    def module(unit, defines):
        names = [name for name, spec in KERNELS.items() if spec.unit == unit]
        return cupy.RawModule(code=source(unit, defines), options=("--std=c++17",), name_expressions=names)

    return module


def module_loader():
    """The function ``(unit, defines) -> cupy.RawModule`` (NVRTC): each module compiled once per
    process, device and defines (``defines`` a tuple of pairs); the loader is one object per process."""
    return _memoized_module()
