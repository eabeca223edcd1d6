"""pytest-benchmark benchmarks of gpudiffim's subtraction and its two hot stages.

Not part of the test run (``testpaths = tests``).  Run from the repository root::

    python -m pytest bench/test_bench_subtract.py --benchmark-only

Every benchmark uses ``benchmark.pedantic`` with a warm-up round, so one-off
costs (FFT plan caches, first-touch allocation) stay out of the statistics.
The like-for-like configuration of ``bench_subtract.py`` is used throughout
(Alard-Lupton basis, background fitted, kernel order 2, background order 1).
"""

import functools

import numpy as np
import pytest

from _machine import machine_info
from gpudiffim import ImagePsfMatchTask, PsfMatchConfig
from gpudiffim.apply import convolve_masked_image
from gpudiffim.basis import make_kernel_basis
from gpudiffim.stamps import StampBatch, fit_stamps
from gpudiffim.testing import make_fake_pair

CONFIG = PsfMatchConfig(fit_for_background=True, spatial_kernel_order=2, spatial_bg_order=1)
#: Stars per image side length: the 2048^2 default of bench_subtract.py (4000) scaled by area.
STARS_PER_PIXEL = 4000 / 2048**2
SEED = 1
N_STAMPS = 1000


@functools.lru_cache(maxsize=None)
def fake_pair(size):
    """Simulated float32 pair of ``size x size`` (cached across benchmarks)."""
    return make_fake_pair(shape=(size, size), n_stars=int(round(STARS_PER_PIXEL * size**2)),
                          seed=SEED)


_FITTED = {}


def fitted(size):
    """A subtraction of the pair (its kernel feeds the convolution benchmark).

    Reuses the result of ``test_subtract_masked_images`` when that ran first.
    """
    if size not in _FITTED:
        pair = fake_pair(size)
        _FITTED[size] = ImagePsfMatchTask(CONFIG).subtract_masked_images(pair.template, pair.science)
    return _FITTED[size]


@functools.lru_cache(maxsize=None)
def _machine():
    return machine_info()


def _record(benchmark, **extra):
    benchmark.extra_info.update(_machine())
    benchmark.extra_info.update(extra)


@pytest.mark.parametrize("size", [1024, pytest.param(2048, marks=pytest.mark.slow)])
def test_subtract_masked_images(benchmark, size):
    pair = fake_pair(size)
    task = ImagePsfMatchTask(CONFIG)
    result = benchmark.pedantic(task.subtract_masked_images, args=(pair.template, pair.science),
                                warmup_rounds=1, rounds=3, iterations=1)
    _FITTED[size] = result
    cells = result.kernel_cell_set
    _record(benchmark, size=size, n_stars=len(pair.stars), n_good=cells.n_good, n_bad=cells.n_bad,
            kernel_width=result.kernel_basis.width, n_basis=result.kernel_basis.n_basis,
            sigmas=list(result.kernel_basis.sigmas), last_round_timings=dict(result.timings))
    assert cells.n_good > 0


@pytest.mark.parametrize("size", [1024, pytest.param(2048, marks=pytest.mark.slow)])
def test_full_image_convolution(benchmark, size):
    pair = fake_pair(size)
    kernel = fitted(size).psf_matching_kernel
    image, variance, mask = benchmark.pedantic(convolve_masked_image, args=(pair.template, kernel),
                                               warmup_rounds=1, rounds=3, iterations=1)
    _record(benchmark, size=size, kernel_width=kernel.shape[0], n_basis=kernel.n_basis,
            spatial_order=kernel.spatial_function.order)
    assert image.shape == pair.template.shape


def _stamp_batch(n_stamps):
    """``n_stamps`` stamps around the brightest simulated stars of the 2048^2 pair."""
    pair = fake_pair(2048)
    basis = make_kernel_basis(CONFIG, pair.template_fwhm_pix, pair.science_fwhm_pix)
    half_size = int(CONFIG.detection.fp_grow_kernel_scaling * basis.width + 0.5)
    stars = pair.stars[pair.stars["kind"] == "star"]
    x = np.floor(stars["x"] + 0.5).astype(int)
    y = np.floor(stars["y"] + 0.5).astype(int)
    inside = (x >= half_size) & (x < 2048 - half_size) & (y >= half_size) & (y < 2048 - half_size)
    order = np.argsort(-stars["flux"][inside])[:n_stamps]
    centres = np.stack([x[inside][order], y[inside][order]], axis=1)
    return StampBatch.extract(centres, pair.template, pair.science, half_size), basis


def test_fit_stamps(benchmark):
    batch, basis = _stamp_batch(N_STAMPS)
    fit = benchmark.pedantic(fit_stamps, args=(batch, basis.kernels, CONFIG),
                             warmup_rounds=1, rounds=3, iterations=1)
    _record(benchmark, n_stamps=len(batch), stamp_width=batch.template.shape[1],
            kernel_width=basis.width, n_basis=basis.n_basis, sigmas=list(basis.sigmas))
    assert len(batch) == N_STAMPS
    assert sum(not f for f in fit.failure) > 0.9 * N_STAMPS
