"""``kernels/statistics.cu`` on the CPU emulator against the NumPy references of :mod:`gpudiffim.statistics`.

``gdi_sorted_quantiles`` (after the wrapper's sort) must give
:func:`~gpudiffim.statistics.masked_quantiles` bit for bit -- the same
interpolation, the median averaged as ``np.median`` -- and the row counts,
for rows with NaN selected or not, nothing selected, one value, +-inf, even
and odd counts; ``gdi_bin_medians`` must give
:func:`~gpudiffim.statistics.bin_medians_loop` bit for bit on float32 and
float64 stacks with uneven bins, a ``keep`` plane, empty bins, NaN, +-inf and
-0.0, and so must ``gdi_bin_sort_keys`` with ``gdi_sorted_bin_medians`` on
float32 (the keys those of :func:`~gpudiffim.statistics.bin_sort_keys`); ``gdi_sky_sources``, ``gdi_sky_normalised``, ``gdi_sky_value_planes``,
``gdi_subtract_mean`` and ``gdi_correlation_near`` must give their
references in :mod:`gpudiffim.statistics` exactly, and ``gdi_gather_rows``
a row gather.  The stand-in's NumPy versions (``tests/standin_kernels.py``) are
checked against the emulator too.
"""

import numpy as np
import pytest
from numpy.testing import assert_array_equal

from gpudiffim._backend import use_backend
from gpudiffim._cuda import statistics as statistics_kernels
from gpudiffim._cuda.statistics import (
    MAX_BIN_PIXELS,
    bin_medians,
    bin_medians_by_sort,
    bin_medians_fit,
    sky_sources,
    sorted_quantiles,
)
from gpudiffim.statistics import (
    beyond_robust_level,
    bin_medians_loop,
    bin_medians_sorted,
    bin_sort_keys,
    masked_quantiles,
    near_lags,
    normalised_sky_values,
    sky_value_planes,
    subtract_sky_mean,
)


def _rows(gen):
    values = gen.normal(size=(9, 301))
    mask = gen.random(values.shape) < 0.6
    mask[0] = False                       # nothing selected
    mask[1] = False
    mask[1, 17] = True                    # one value
    values[2, mask[2].nonzero()[0][3]] = np.nan   # a NaN selected
    values[3, ~mask[3]] = np.nan          # NaN not selected only
    values[4, :5] = (np.inf, -np.inf, np.inf, 0.0, -0.0)
    mask[4, :5] = True                    # infinities selected
    values[6] = np.round(values[6])       # ties
    return values, mask


@pytest.mark.parametrize(("quantiles", "median"), [((0.25, 0.75), False), ((0.25, 0.75), True), ((), True),
                                                   ((0.0, 0.1, 0.5, 1.0), True)])
def test_sorted_quantiles_equal_masked_quantiles(emulator, rng, quantiles, median):
    gen, seed = rng
    values, mask = _rows(gen)
    with use_backend("cuda-emulator"):
        out = sorted_quantiles(values, mask, quantiles, median=median)
    with np.errstate(invalid="ignore"):
        expected = masked_quantiles(values, mask, quantiles, median=median)
    assert out.shape == (len(quantiles) + median + 1, len(values))
    assert_array_equal(out[:-1], expected, err_msg=f"seed={seed}")
    assert_array_equal(out[-1], mask.sum(axis=1))


def _planes(gen, dtype):
    image = gen.normal(size=(3, 70, 97)).astype(dtype)
    keep = gen.random(image.shape) < 0.7
    keep[0, :20, :30] = False             # an empty bin
    image[1, 40, 50] = np.nan             # a NaN kept ...
    keep[1, 40, 50] = True
    image[2, 5, 5] = np.nan               # ... and one left out
    keep[2, 5, 5] = False
    image[2, 60:, :10] = np.inf
    image[2, 60:, 10:20] = -0.0
    image[0, 50:, 60:] = np.round(image[0, 50:, 60:])   # ties
    return image, keep


@pytest.mark.parametrize(("function", "dtype"), [("bin_medians", np.float32), ("bin_medians", np.float64),
                                               ("bin_medians_by_sort", np.float32)])
@pytest.mark.parametrize("with_keep", [True, False])
def test_bin_medians_equal_the_loop(emulator, rng, function, dtype, with_keep):
    """The kernel path's bin medians (shared-memory sort, and from rows sorted once) equal the loop's."""
    gen, seed = rng
    medians_of = {"bin_medians": bin_medians, "bin_medians_by_sort": bin_medians_by_sort}[function]
    image, keep = _planes(gen, dtype)
    keep = keep if with_keep else None
    edges_y, edges_x = np.array([0, 20, 41, 70]), np.array([0, 30, 31, 64, 97])
    with use_backend("cuda-emulator"):
        medians = medians_of(image, keep, edges_y, edges_x)
        one = medians_of(image[1], None if keep is None else keep[1], edges_y, edges_x)
    expected = bin_medians_loop(image, keep, edges_y, edges_x)
    assert medians.dtype == np.float64 and medians.shape == (3, 3, 4)
    assert_array_equal(medians, expected, err_msg=f"seed={seed}")
    assert_array_equal(one, expected[1])
    assert np.isnan(medians[1]).sum() == 1
    if function == "bin_medians_by_sort":
        assert_array_equal(medians, bin_medians_sorted(image, keep, edges_y, edges_x))
    assert_array_equal(one, expected[1])


def test_bin_sort_keys_equal_the_reference(emulator, rng):
    gen, _ = rng
    image, keep = _planes(gen, np.float32)
    edges_y, edges_x = [0, 20, 41, 70], [0, 30, 31, 64, 97]
    keys = np.empty(image.size, dtype=np.uint64)
    with use_backend("cuda-emulator"):
        statistics_kernels.launch("gdi_bin_sort_keys", (8,), (64,),
                                  (image, keep, 1, 3, 70, 97, np.array(edges_y + edges_x, dtype=np.int32), 3, 4, keys),
                                  defines=statistics_kernels.STATISTICS_DEFINES)
    assert_array_equal(keys, bin_sort_keys(image, keep, edges_y, edges_x))


def test_bin_medians_by_sort_refuse_float64():
    with pytest.raises(TypeError, match="float32"):
        bin_medians_by_sort(np.zeros((8, 8)), None, [0, 8], [0, 8])


def test_bin_medians_refuse_large_bins():
    assert bin_medians_fit([0, 64], [0, 64]) and not bin_medians_fit([0, 64], [0, 65])
    with pytest.raises(ValueError, match=str(MAX_BIN_PIXELS)):
        bin_medians(np.zeros((65, 65)), None, [0, 65], [0, 65])


def test_sky_sources_equal_beyond_robust_level(emulator, rng):
    gen, seed = rng
    residual = gen.normal(size=(4, 33, 21)) * np.array([1.0, 2.0, 0.5, 3.0])[:, None, None]
    residual[0, 3, 4] = np.nan
    quartiles = np.array([[-0.7, -1.3, 0.0, np.nan], [0.6, 1.4, 0.0, 2.0], [9.0, 9.0, 9.0, 9.0]])
    with use_backend("cuda-emulator"):
        sources = sky_sources(residual, quartiles, 2.5)
    expected = beyond_robust_level(residual, quartiles, 2.5)
    assert sources.dtype == np.int32
    assert_array_equal(sources, expected, err_msg=f"seed={seed}")
    assert sources[2].all() and sources[3].all() and not sources[0, 3, 4]    # sigma 0 or NaN: level tiny


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n_bands", [1, 3])
def test_sky_value_planes_equal_the_reference(emulator, rng, dtype, n_bands):
    gen, seed = rng
    shape = (n_bands, 20, 17)
    residual = gen.normal(size=shape) * 3.0
    variance = gen.uniform(0.5, 2.0, shape).astype(dtype)
    variance[0, 2, :4] = (0.0, -1.0, np.inf, np.nan)        # z infinite, NaN, 0, NaN
    residual[0, 3, 5] = np.nan
    residual[0, 4, 6] = 40.0                                # beyond the clip
    sky = gen.random(shape) < 0.8
    own_rows = np.array([0, 4, 8])[:n_bands, None] + np.arange(12)
    with use_backend("cuda-emulator"):
        planes = statistics_kernels.sky_value_planes(residual, variance, sky, own_rows, 5, 6.0)
        sums = planes.sum(axis=(1, 2))
        statistics_kernels.subtract_sky_mean(planes, sums)
        near = statistics_kernels.correlation_near(planes, 3, sums[1:])
    expected = sky_value_planes(residual, variance, sky, own_rows, 5, 6.0)
    assert planes.shape == expected.shape == (2, 17 * n_bands if n_bands > 1 else 20, 17)
    subtract_sky_mean(expected, expected.sum(axis=(1, 2)))
    assert_array_equal(planes, expected, err_msg=f"seed={seed}")
    assert_array_equal(near, np.concatenate([near_lags(expected, 3).ravel(), sums[1:]]))
    assert 0 < expected[1].sum() < sky.sum()


def test_near_lags_are_the_circular_lags():
    correlation = np.arange(2 * 9 * 11, dtype=float).reshape(2, 9, 11)
    near = near_lags(correlation, 2)
    for dy in range(-2, 3):
        for dx in range(-2, 3):
            assert_array_equal(near[:, 2 + dy, 2 + dx], correlation[:, dy % 9, dx % 11])


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32])
def test_gather_rows_equal_the_index(emulator, rng, dtype):
    gen, seed = rng
    planes = [(gen.normal(size=(40, 13)) * 100).astype(dtype) for _ in range(2)]
    windows = np.array([0, 9, 24])
    masks = [(plane != 0).astype(np.int32) for plane in planes]
    with use_backend("cuda-emulator"):
        bands, mask_bands = statistics_kernels.gather_rows([planes, masks[:1]], windows, 16)
    index = windows[:, None] + np.arange(16)
    assert_array_equal(bands, np.concatenate([plane[index] for plane in planes]), err_msg=f"seed={seed}")
    assert_array_equal(mask_bands, masks[0][index])
    with pytest.raises(ValueError, match="do not fit"):
        statistics_kernels.gather_rows([planes], np.array([30]), 16)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sky_normalised_equal_the_reference(emulator, rng, dtype):
    gen, seed = rng
    shape = (6, 20, 17)                                     # 2 images of 3 bands
    residual = gen.normal(size=shape) * 3.0
    residual[0, 5, 5] = np.nan
    variance = gen.uniform(0.5, 2.0, shape).astype(dtype)
    variance[1, 6, 6] = np.inf
    sky = gen.random(shape) < 0.8
    sky[0, 5, 5] = sky[1, 6, 6] = True                       # the NaN and the 0 selected
    own_rows = np.array([0, 4, 8])[:, None] + np.arange(12)
    with use_backend("cuda-emulator"):
        values, selected = statistics_kernels.sky_normalised(residual, variance, sky, own_rows, 2)
    z, expected = normalised_sky_values(residual, variance, sky, own_rows, 2)
    assert values.shape == selected.shape == (2, 3 * 20 * 17)
    assert_array_equal(selected, expected, err_msg=f"seed={seed}")
    assert_array_equal(values, np.where(expected, z, np.inf))
    assert np.isnan(values).any() and (values == 0).any()
