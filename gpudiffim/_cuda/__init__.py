"""The CUDA kernels of the ``cupy`` and ``cuda-emulator`` backends: loading, checked launches, host wrappers.

The kernel sources are the ``.cu`` files of the top-level ``kernels/`` folder
(``delta_function``, ``image_apply``, ``residual_moments``, ``spatial_assembly``,
``stamp_fit``, ``warp``, ``statistics``, ...), installed as package data of ``gpudiffim.kernels``.  The NumPy
reference modules (:mod:`gpudiffim.stamps`, :mod:`gpudiffim.apply`,
:mod:`gpudiffim.spatial_fit`, :mod:`gpudiffim.warp`) call the host wrappers
below when :func:`gpudiffim._backend.on_kernel_path` says so (CuPy arrays, or
NumPy arrays under ``cuda-emulator``).  The wrappers then run the kernels where
the data live, as :func:`.launch.launcher_for` says: CuPy arrays on the GPU,
NumPy arrays on the CPU emulator.  Those two functions are the only places
that choose.

Loading and launching:

* :mod:`._loader` finds ``kernels/`` (installed wheel, editable install or
  source checkout), assembles a unit's source text (``#define`` preamble,
  ``kernels/common.cuh`` if one is added, the ``.cu`` file) and compiles it
  with NVRTC into a ``cupy.RawModule``, once per process, device and defines.
* :mod:`.signatures` declares every entry point's parameter types
  (:data:`~.signatures.KERNELS`; CuPy does not check kernel arguments) and
  holds the one C type <-> dtype table (:data:`~.signatures.C_TYPES`).
* :mod:`.launch` holds :func:`launch`, the one launch helper: it checks the
  arguments against the signatures, then launches through CuPy or the
  emulator, as :func:`~.launch.launcher_for` of the arguments says.
* :mod:`._host` prepares the wrappers' arguments (dtypes, contiguity, int32
  masks, output buffers) in the launcher's array module.
* :mod:`.emulator` compiles the same source text with g++ and ``emulator.h``
  (threads, blocks, ``__shared__``, ``__syncthreads``, ``atomicAdd``) into a
  shared library, cached under ``$GPUDIFFIM_CACHE_DIR`` (default
  ``~/.cache/gpudiffim``), and runs it on the CPU, so CI verifies the kernels
  without a GPU.
* :mod:`.nvcc_check` compiles every unit to PTX with nvcc, warnings as errors
  (``python -m gpudiffim._cuda.nvcc_check``, run by ``.ci/run``).

Launch geometry and host wrappers, one module per unit, named after it:

* :mod:`.stamp_fit`: ``stamp_fit.cu``: basis correlation of the candidate
  stamps and the per-stamp normal equations.
* :mod:`.delta_function`: ``delta_function.cu``: the normal equations of
  delta-function stamp fits from the stamps, without a design matrix.
* :mod:`.spatial_assembly`: ``spatial_assembly.cu``: the spatial normal
  equations.
* :mod:`.residual_moments`: ``residual_moments.cu``: residual statistics of
  the stamps.
* :mod:`.image_apply`: ``image_apply.cu``: term accumulation and mask
  propagation of the full-image application, the box dilation of bad pixels
  (and the grid-stride geometry shared with ``warp``).
* :mod:`.warp`: ``warp.cu``: the Lanczos-3 warp.
* :mod:`.statistics`: ``statistics.cu``: the order statistics and sky planes
  of the variance correction and the noise-correlation measurement (sorted
  quantiles, bin medians, sky sources, band gathers, correlation planes).
"""

from .launch import launch

__all__ = ["launch"]
