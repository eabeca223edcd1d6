"""CUDA kernels verified without a GPU (issue 4): nvcc compile, CPU emulation, launch checks.

* every ``kernels/*.cu`` compiles to PTX with nvcc for sm_75/80/90, warnings as
  errors (skipped without nvcc; ``.ci/run`` runs the same check);
* the residual-moments kernel, compiled by g++ with ``gpudiffim/_cuda/emulator.h``
  and launched through :func:`gpudiffim._cuda.launch`, equals
  :func:`gpudiffim.statistics.residual_statistics` (fresh seeds, NaN-poisoned
  output buffers);
* the launch helper rejects wrong argument types and counts, and runs where the
  data live (:func:`gpudiffim._cuda.launch.launcher_for`), whatever backend is requested;
* with a GPU, the CuPy launch equals NumPy (``@pytest.mark.gpu``).
"""

import configparser
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from gpudiffim._backend import use_backend
from gpudiffim._cuda import launch
from gpudiffim._cuda._loader import kernel_dir, source, units
from gpudiffim._cuda.launch import launcher_for
from gpudiffim._cuda.residual_moments import residual_moments, residual_moments_geometry
from gpudiffim._cuda.nvcc_check import ARCHS, compile_ptx
from gpudiffim._cuda.signatures import KERNELS
from gpudiffim.statistics import residual_statistics

ROOT = Path(__file__).resolve().parent.parent
BAD, SAT, DETECTED = 1 << 0, 1 << 1, 1 << 5
BAD_BITS = BAD | SAT
RTOL = {np.float64: 1e-12, np.float32: 1e-6}


# ---------------------------------------------------------------------------
# sources and packaging

def test_kernel_units_are_found_and_include_nothing():
    assert "residual_moments" in units()
    for unit in units():
        text = source(unit)
        assert not re.search(r"^\s*#\s*include", text, re.MULTILINE), f"kernels/{unit}.cu must not #include (STYLE 2.3)"


def test_every_declared_kernel_has_a_unit():
    assert {spec.unit for spec in KERNELS.values()} <= set(units())


def test_setup_cfg_lists_every_subpackage():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    listed = set(cfg["options"]["packages"].split())
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "gpudiffim").rglob("__init__.py")}
    assert found | {"gpudiffim.kernels"} == listed
    assert "gpudiffim.kernels = kernels" in cfg["options"]["package_dir"]
    assert "*.cu" in cfg["options.package_data"]["gpudiffim.kernels"]
    assert "*.h" in cfg["options.package_data"]["gpudiffim._cuda"]
    assert (kernel_dir() / "residual_moments.cu").is_file()


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("unit", units())
def test_nvcc_compiles_to_ptx_without_warnings(unit, arch):
    ok, log = compile_ptx(unit, arch)
    assert ok, f"kernels/{unit}.cu for {arch}:\n{log}"


# ---------------------------------------------------------------------------
# emulated residual moments == statistics.residual_statistics

def _stamps(gen, shape, dtype):
    """Random stamps with every kind of pixel the selection must handle."""
    n, ny, nx = shape
    diff = gen.normal(0.3, 1.7, size=shape)
    var = gen.uniform(0.2, 4.0, size=shape)
    mask = np.where(gen.random(shape) < 0.15, gen.choice([BAD, SAT, DETECTED, BAD | DETECTED], size=shape), 0)
    special = gen.random(shape)
    var[special < 0.03] = 0.0
    var[(special >= 0.03) & (special < 0.06)] = -1.0
    var[(special >= 0.06) & (special < 0.07)] = np.nan
    var[(special >= 0.07) & (special < 0.075)] = np.inf  # 1/V = 0 is finite: used with z = 0, as in NumPy
    diff[(special >= 0.08) & (special < 0.11)] = np.nan
    diff[(special >= 0.11) & (special < 0.12)] = np.inf
    if n > 2:
        mask[0] = BAD  # no usable pixel: mean and rms NaN
        mask[1] = SAT
        mask[1, ny // 2, nx // 2] = DETECTED  # one usable pixel: rms NaN
        var[1, ny // 2, nx // 2] = 1.0
        diff[1, ny // 2, nx // 2] = 2.0
    return diff.astype(dtype), var.astype(dtype), mask.astype(np.int32)


def _reference_sums(diff, var, mask, rows=slice(None), cols=slice(None)):
    """count, sum z, sum z^2 in float64 from the same selection as residual_statistics."""
    d, v, m = (a[:, rows, cols] for a in (diff, var, mask))
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1 / v
        good = ((m & BAD_BITS) == 0) & np.isfinite(inv) & (v > 0) & np.isfinite(d)
        z = np.where(good, d.astype(np.float64) * np.sqrt(np.where(good, inv, 0).astype(np.float64)), 0.0)
    return np.stack([good.sum(axis=(1, 2)), z.sum(axis=(1, 2)), (z * z).sum(axis=(1, 2))], axis=1)


def _max_rel(a, b):
    ok = np.isfinite(b)
    return float(np.max(np.abs(a[ok] - b[ok]) / np.maximum(np.abs(b[ok]), 1e-300), initial=0.0))


SHAPES = [(1, 1, 1), (1, 7, 5), (3, 21, 21), (5, 16, 33), (17, 9, 12), (4, 45, 41)]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("core_radius", [None, 3])
def test_emulated_residual_moments_match_numpy(emulator, rng, dtype, shape, core_radius):
    gen, seed = rng
    diff, var, mask = _stamps(gen, shape, dtype)
    out = np.full((shape[0], 3), np.nan)  # poisoned: an unwritten element fails
    got = residual_moments(diff, var, mask, BAD_BITS, core_radius, out=out)
    want = residual_statistics(diff, var, mask, BAD_BITS, core_radius)
    note = f"seed={seed} shape={shape} dtype={np.dtype(dtype).name} core_radius={core_radius}"
    assert np.isfinite(out).all(), note
    assert_array_equal(got.n_pixels, want.n_pixels, err_msg=note)
    # mean can sit near zero (cancellation), so the absolute floor is relative to the z scale (~1)
    rtol = RTOL[dtype]
    assert_allclose(got.mean, want.mean, rtol=rtol, atol=rtol, err_msg=note)
    assert_allclose(got.rms, want.rms, rtol=rtol, atol=0, err_msg=note)
    assert_array_equal(np.isnan(got.mean), np.isnan(want.mean), err_msg=note)
    assert_array_equal(np.isnan(got.rms), np.isnan(want.rms), err_msg=note)
    if dtype is np.float64:  # the raw sums, against a float64 reference of the same selection
        if core_radius is None:
            rows = cols = slice(None)
        else:
            from gpudiffim.statistics import core_slice
            rows, cols = core_slice(shape[1], core_radius), core_slice(shape[2], core_radius)
        assert _max_rel(out, _reference_sums(diff, var, mask, rows, cols)) <= 1e-12, note


def test_emulated_surplus_blocks_write_nothing(emulator, rng):
    gen, seed = rng
    diff, var, mask = _stamps(gen, (3, 11, 13), np.float64)
    out = np.full((5, 3), np.nan)
    launch("gdi_residual_moments<double>", (5,), residual_moments_geometry(3)[1],
           (diff, var, mask, BAD_BITS, 3, 11, 13, 0, 11, 0, 13, out),
           defines=(("GDI_RM_THREADS", 128),))
    assert np.isfinite(out[:3]).all(), seed
    assert np.isnan(out[3:]).all(), seed


def test_emulated_block_smaller_than_shared_size(emulator, rng):
    """blockDim 32 < GDI_RM_THREADS: the tree reduction follows blockDim, not the array size."""
    gen, seed = rng
    diff, var, mask = _stamps(gen, (4, 15, 15), np.float64)
    out = np.full((4, 3), np.nan)
    launch("gdi_residual_moments<double>", 4, 32, (diff, var, mask, BAD_BITS, 4, 15, 15, 0, 15, 0, 15, out),
           defines=(("GDI_RM_THREADS", 128),))
    assert _max_rel(out, _reference_sums(diff, var, mask)) <= 1e-12, seed


# ---------------------------------------------------------------------------
# argument checks (CuPy does not make them)

def _good_args(n=2, ny=5, nx=6, dtype=np.float64):
    shape = (n, ny, nx)
    return [np.ones(shape, dtype), np.ones(shape, dtype), np.zeros(shape, np.int32), BAD_BITS, n, ny, nx,
            0, ny, 0, nx, np.full((n, 3), np.nan)]


@pytest.mark.parametrize(("index", "value", "match"), [
    (0, np.ones((2, 5, 6), np.float32), r"argument 0 \(const double\* diff\): expected dtype float64, got float32"),
    (2, np.zeros((2, 5, 6), np.int64), r"argument 2 \(const int\* mask\): expected dtype int32, got int64"),
    (11, np.full((2, 3), np.nan, np.float32), r"argument 11 \(double\* out\): expected dtype float64"),
    (0, [[1.0]], r"argument 0 .* expected a numpy.ndarray, got list"),
    (3, 1.5, r"argument 3 \(int bad_bits\): expected an int, got float"),
    (4, True, r"argument 4 \(int n_stamps\): expected an int, got bool"),
    (5, 2**31, r"argument 5 \(int ny\): 2147483648 does not fit in a 32-bit int"),
    (1, np.ones((2, 6, 5), np.float64).transpose(0, 2, 1), r"argument 1 .* C-contiguous"),
])
def test_launch_rejects_wrong_argument_types(index, value, match):
    args = _good_args()
    args[index] = value
    with pytest.raises(TypeError, match=match):
        launch("gdi_residual_moments<double>", 2, 128, args)


def test_launch_rejects_read_only_output():
    args = _good_args()
    args[11].setflags(write=False)
    with pytest.raises(TypeError, match=r"argument 11 .* read-only"):
        launch("gdi_residual_moments<double>", 2, 128, args)


@pytest.mark.parametrize("count", [11, 13])
def test_launch_rejects_wrong_argument_count(count):
    args = (_good_args() + [0])[:count]
    with pytest.raises(TypeError, match=rf"takes 12 arguments, got {count}"):
        launch("gdi_residual_moments<double>", 2, 128, args)


def test_launch_rejects_unknown_kernel_and_geometry():
    with pytest.raises(TypeError, match="unknown kernel 'gdi_residual_moments<half>'"):
        launch("gdi_residual_moments<half>", 2, 128, _good_args())
    with pytest.raises(ValueError, match="block must be"):
        launch("gdi_residual_moments<double>", 2, (0,), _good_args())


def test_launcher_follows_the_data():
    assert launcher_for(np.zeros(3), 2, 1.5) == "emulator"
    assert launcher_for() == "emulator"
    assert launcher_for([1.0], np.zeros(2)) == "emulator"


@pytest.mark.parametrize("requested", ["numpy", "cupy", "auto", "cuda-emulator"])
def test_numpy_arrays_launch_on_the_emulator_whatever_the_backend(emulator, rng, requested):
    """No ambient lookup: NumPy arguments run on the emulator even under ``use_backend("cupy")``."""
    gen, seed = rng
    diff, var, mask = _stamps(gen, (3, 9, 9), np.float64)
    out = np.full((3, 3), np.nan)
    with use_backend(requested):
        launch("gdi_residual_moments<double>", 3, 128, (diff, var, mask, BAD_BITS, 3, 9, 9, 0, 9, 0, 9, out),
               defines=(("GDI_RM_THREADS", 128),))
    assert _max_rel(out, _reference_sums(diff, var, mask)) <= 1e-12, seed


# ---------------------------------------------------------------------------
# the same kernel on a GPU

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("core_radius", [None, 3])
def test_cupy_residual_moments_match_numpy(rng, dtype, core_radius):
    import cupy

    gen, seed = rng
    diff, var, mask = _stamps(gen, (37, 41, 41), dtype)
    out = cupy.full((37, 3), cupy.nan)
    got = residual_moments(*(cupy.asarray(a) for a in (diff, var, mask)), BAD_BITS, core_radius, out=out)
    want = residual_statistics(diff, var, mask, BAD_BITS, core_radius)
    note = f"seed={seed} dtype={np.dtype(dtype).name} core_radius={core_radius}"
    assert bool(cupy.isfinite(out).all()), note
    assert_array_equal(cupy.asnumpy(got.n_pixels), want.n_pixels, err_msg=note)
    rtol = RTOL[dtype]
    assert_allclose(cupy.asnumpy(got.mean), want.mean, rtol=rtol, atol=rtol, err_msg=note)
    assert_allclose(cupy.asnumpy(got.rms), want.rms, rtol=rtol, atol=0, err_msg=note)
