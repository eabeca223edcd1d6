"""The CUDA kernels of the ``cupy`` and ``cuda-emulator`` backends: loading, checked launches, host wrappers.

The kernel sources are the ``.cu`` files of the top-level ``kernels/`` folder
(``image_apply``, ``residual_moments``, ``spatial_assembly``, ``stamp_fit``,
``warp``), installed as package data of ``gpudiffim.kernels``.  The NumPy
reference modules (:mod:`gpudiffim.stamps`, :mod:`gpudiffim.apply`,
:mod:`gpudiffim.spatial_fit`, :mod:`gpudiffim.warp`) call the host wrappers
below when :func:`gpudiffim._backend.kernel_path_for` says so: ``"cupy"`` for
CuPy arrays, ``"emulator"`` for NumPy arrays under ``cuda-emulator``.

Loading and launching:

* :mod:`._loader` finds ``kernels/`` (installed wheel, editable install or
  source checkout), assembles a unit's source text (``#define`` preamble,
  ``kernels/common.cuh`` if one is added, the ``.cu`` file) and compiles it
  with NVRTC into a ``cupy.RawModule``, once per process, device and defines.
* :mod:`.signatures` declares every entry point's parameter types
  (:data:`~.signatures.KERNELS`); CuPy does not check kernel arguments.
* :mod:`.launch` holds :func:`launch`, the one launch helper: it checks the
  arguments against the signatures, then launches through CuPy or the emulator.
* :mod:`.emulator` compiles the same source text with g++ and ``emulator.h``
  (threads, blocks, ``__shared__``, ``__syncthreads``, ``atomicAdd``) into a
  shared library, cached under ``$GPUDIFFIM_CACHE_DIR`` (default
  ``~/.cache/gpudiffim``), and runs it on the CPU, so CI verifies the kernels
  without a GPU.
* :mod:`.nvcc_check` compiles every unit to PTX with nvcc, warnings as errors
  (``python -m gpudiffim._cuda.nvcc_check``, run by ``.ci/run``).

Launch geometry and host wrappers, one module per group of units:

* :mod:`.stamp_kernels`: ``stamp_fit.cu`` and ``spatial_assembly.cu``: basis
  correlation of the candidate stamps, per-stamp normal equations and the
  spatial normal equations.
* :mod:`.image_kernels`: ``image_apply.cu`` and ``warp.cu``: term
  accumulation and mask propagation of the full-image application, the box
  dilation of bad pixels, the Lanczos-3 warp.
* :mod:`.kernels`: ``residual_moments.cu``: residual statistics of the stamps.
"""

from .launch import launch

__all__ = ["launch"]
