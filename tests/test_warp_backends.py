"""``warp_masked_image`` on the kernel path equals the NumPy reference.

Under ``use_backend("cuda-emulator")`` NumPy planes are resampled by the CUDA
kernel ``gdi_warp_lanczos3`` (``kernels/warp.cu``, compiled by g++); with CuPy
planes the same kernel runs on the GPU.  Both must give the NumPy path's
result: image and variance to 1e-12 relative in float64 and 1e-6 in float32,
masks exactly, planes in the input's array module.  The WCS pair is the
rotated and shifted pair of ``tests/test_warp.py`` (TAN, 0.2"/px, 256 x 256).
"""

import numpy as np
import pytest
from astropy.wcs import WCS

from gpudiffim import MaskedImage, use_backend, warp
from gpudiffim._cuda import warp as warp_kernel
from gpudiffim.errors import NoDataWarning, RegistrationError
from gpudiffim.warp import warp_masked_image

N = 256
SCALE_DEG = 0.2 / 3600
CRVAL = (150.0, 2.0)
PLANES = MaskedImage(np.ones((2, 2)), variance=np.ones((2, 2))).mask_planes
NO_DATA, EDGE, BAD, SAT = (1 << PLANES[name] for name in ("NO_DATA", "EDGE", "BAD", "SAT"))
RTOL = {np.float64: 1e-12, np.float32: 1e-6}


def make_wcs(crpix=(N / 2, N / 2), *, crval=CRVAL, rotation_deg=0.0, scale_deg=SCALE_DEG):
    """TAN WCS; ``crpix`` is 0-based (as ``tests/test_warp.py::make_wcs``)."""
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = crval
    wcs.wcs.crpix = [crpix[0] + 1, crpix[1] + 1]
    wcs.wcs.cdelt = [-scale_deg, scale_deg]
    t = np.deg2rad(rotation_deg)
    wcs.wcs.pc = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
    return wcs


def shifted_pair(shift, rotation_deg=0.0):
    """Target pixel p maps to source pixel c + R (p - c) + shift (``tests/test_warp.py::shifted_pair``)."""
    centre = np.array([N / 2, N / 2])
    return make_wcs(tuple(centre)), make_wcs(tuple(centre - np.asarray(shift)), rotation_deg=rotation_deg)


def source_image(dtype, shape=(N, N), xy0=(0, 0), seed=51):
    """Noise on a background with stars, BAD/SAT pixels and NaN (NO_DATA) pixels."""
    rng = np.random.RandomState(seed)
    image = rng.normal(100.0, 5.0, size=shape)
    y, x = np.indices(shape, dtype=float)
    for _ in range(12):
        cx, cy = rng.uniform(10, shape[1] - 10), rng.uniform(10, shape[0] - 10)
        image += rng.uniform(1e3, 1e4) * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / 8.0)
    variance = rng.uniform(1.0, 4.0, size=shape)
    mask = np.zeros(shape, dtype=np.int32)
    mask[rng.randint(0, shape[0], 30), rng.randint(0, shape[1], 30)] |= BAD
    mask[rng.randint(0, shape[0], 10), rng.randint(0, shape[1], 10)] |= SAT
    image[rng.randint(0, shape[0], 4), rng.randint(0, shape[1], 4)] = np.nan
    with pytest.warns(NoDataWarning):
        return MaskedImage(image.astype(dtype), mask, variance.astype(dtype), xy0=xy0)


@pytest.fixture
def launches(monkeypatch):
    """Shapes of the x_src of every ``warp_kernel.warp_resample`` call (the kernel path's launches)."""
    calls = []
    original = warp_kernel.warp_resample

    def spy(image, variance, mask, x_src, y_src, **kwargs):
        calls.append(x_src.shape)
        return original(image, variance, mask, x_src, y_src, **kwargs)

    monkeypatch.setattr(warp_kernel, "warp_resample", spy)
    return calls


def assert_same_warp(got, want, dtype):
    """Image and variance to RTOL[dtype], masks exactly, same geometry and planes."""
    assert got.shape == want.shape and got.xy0 == want.xy0 and got.mask_planes == want.mask_planes
    rtol = RTOL[dtype]
    for name in ("image", "variance"):
        g, w = getattr(got, name), getattr(want, name)
        assert g.dtype == dtype, name
        np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * np.abs(w).max(), err_msg=name)
    np.testing.assert_array_equal(got.mask, want.mask)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("conserve_flux", [False, True])
@pytest.mark.parametrize(("shift", "rotation_deg"), [((0.3, -0.45), 0.0), ((2.3, -1.45), 1.0),
                                                     ((N / 4 + 0.5, 0.3), 1.0)])   # the last: partial coverage
def test_emulated_warp_equals_numpy(emulator, launches, dtype, conserve_flux, shift, rotation_deg):
    masked = source_image(dtype)
    source, target = shifted_pair(shift, rotation_deg)
    with use_backend("numpy"):
        want = warp_masked_image(masked, source, target, (N, N), conserve_flux=conserve_flux)
    assert launches == []   # the reference does not touch the kernel
    with use_backend("cuda-emulator"):
        got = warp_masked_image(masked, source, target, (N, N), conserve_flux=conserve_flux)
    assert launches == [(N, N)]
    assert isinstance(got.image, np.ndarray) and isinstance(got.mask, np.ndarray)
    assert_same_warp(got, want, dtype)
    assert (want.mask & NO_DATA).any() and (want.mask & BAD).any()   # both kinds of flagged pixel occur


def test_emulated_warp_other_bbox_and_blocks(emulator, launches, monkeypatch):
    """Source and target origins off zero, a target smaller than the source, several launches."""
    masked = source_image(np.float64, shape=(100, 90), xy0=(-5, 12), seed=52)
    source, target = shifted_pair((0.4, 0.7), rotation_deg=1.0)
    with use_backend("numpy"):
        want = warp_masked_image(masked, source, target, (97, 83), (60, 70), interp_length=7)
    monkeypatch.setattr(warp, "_KERNEL_BLOCK_PIXELS", 20 * 83)   # 20 rows per launch: 5 launches
    with use_backend("cuda-emulator"):
        got = warp_masked_image(masked, source, target, (97, 83), (60, 70), interp_length=7)
    assert launches == [(20, 83)] * 4 + [(17, 83)]
    assert_same_warp(got, want, np.float64)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_emulated_identity_is_exact(emulator, dtype):
    masked = source_image(dtype, shape=(60, 70), xy0=(100, 200), seed=53)
    wcs = make_wcs((150.0, 230.0))
    with use_backend("cuda-emulator"):
        out = warp_masked_image(masked, wcs, make_wcs((150.0, 230.0)), masked.shape, masked.xy0)
    for name in ("image", "variance", "mask"):
        np.testing.assert_array_equal(getattr(out, name), getattr(masked, name))


def test_emulated_disjoint_fields_raise(emulator):
    masked = MaskedImage(np.ones((32, 32)), variance=np.ones((32, 32)))
    wcs = make_wcs((16.0, 16.0))
    far = make_wcs((16.0, 16.0), crval=(CRVAL[0] + 0.1, CRVAL[1]))
    with use_backend("cuda-emulator"), pytest.raises(RegistrationError, match="do not overlap"):
        warp_masked_image(masked, wcs, far, (32, 32))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("conserve_flux", [False, True])
def test_cupy_warp_equals_numpy(launches, dtype, conserve_flux):
    import cupy

    masked = source_image(dtype)
    source, target = shifted_pair((2.3, -1.45), rotation_deg=1.0)
    with use_backend("numpy"):
        want = warp_masked_image(masked, source, target, (N, N), conserve_flux=conserve_flux)
    got = warp_masked_image(masked.to_module(cupy), source, target, (N, N), conserve_flux=conserve_flux)
    assert launches == [(N, N)]
    assert got.xp is cupy and all(isinstance(p, cupy.ndarray) for p in (got.image, got.variance, got.mask))
    assert_same_warp(got.to_module(np), want, dtype)
