"""CUDA kernels (top-level ``kernels/``), their loader, one launch helper and a CPU emulator.

* :mod:`._loader` finds ``kernels/`` (installed wheel, editable install or
  source checkout) and assembles a unit's source text (``#define`` preamble,
  ``common.cuh`` when present, the ``.cu`` file) for NVRTC and the emulator.
* :mod:`.signatures` declares every entry point's parameter types; CuPy does
  not check kernel arguments, :func:`.launch.launch` does.
* :mod:`.emulator` compiles the same source with g++ and ``emulator.h`` into a
  shared library and runs it on the CPU, so CI verifies the kernels without a GPU.
* :mod:`.kernels` holds the launch-geometry helper and host wrapper per unit.
* :mod:`.nvcc_check` compiles every unit to PTX with nvcc, warnings as errors.
"""

from .launch import launch

__all__ = ["launch"]
