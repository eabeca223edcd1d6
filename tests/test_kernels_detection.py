"""``kernels/detection.cu`` on the CPU emulator against the NumPy references.

* ``gdi_footprint_scan`` + ``gdi_footprint_peak`` equal
  :func:`gpudiffim.cutouts.footprint_stats` exactly (ties of the residual,
  -0.0, any label numbering);
* ``gdi_footprint_centres`` (with its sort and gather) gives the peaks of
  :func:`gpudiffim.cutouts.footprint_centres` that the host keeps, in the
  same order, for small, kept and bounding-box-centred footprints;
* ``gdi_select_rows`` gives ``rows[selected]`` for any mask (none, all,
  word edges), and the operations layer's selection the same whichever
  upload it picks (mask or index);
* ``gdi_core_snr`` + ``gdi_star_sigmas`` give :func:`gpudiffim.fwhm.rated_sigmas`'s
  ratings to float rounding (sums in another order: 1e-6 relative for float32
  planes, 1e-12 for float64), the same ranking, and its adaptive sigmas to
  1e-9 relative (exp and sums in another order, 30 iterations);
* ``gdi_fill_grid`` + ``gdi_detection_residual`` give the reference's
  residual (bin-median background interpolated bilinearly) and detections
  bit for bit, for irregular bins, empty and NaN bins and bad variances,
  and :func:`gpudiffim.candidates.coarse_background` of an image or a stack
  (kind -1, one launch for every plane) the reference's background;
* ``gdi_stamps_flagged`` equals :func:`gpudiffim.cutouts.stamps_flagged` exactly;
* through the operations layer (``cuda-emulator`` backend), detection,
  the PSF sizes and vetting give the NumPy backend's candidates.

Seeds are fresh per test and recorded in the report (``rng`` fixture).
"""

import numpy as np
import pytest
import scipy.ndimage as ndi
from numpy.testing import assert_allclose, assert_array_equal

from gpudiffim import MaskedImage, PsfMatchConfig, use_backend
from gpudiffim import candidates as cand
from gpudiffim._cuda.detection import (STAR_MAX_RADIUS, footprint_centres, footprint_stats, rated_sigmas,
                                       select_rows, stamps_flagged)
from gpudiffim.config import DetectionConfig
from gpudiffim.cutouts import footprint_centres as footprint_centres_reference
from gpudiffim.cutouts import footprint_stats as footprint_stats_reference
from gpudiffim.cutouts import stamps_flagged as stamps_flagged_reference
from gpudiffim.fwhm import rated_sigmas as rated_sigmas_reference
from gpudiffim.image import DEFAULT_MASK_PLANES
from gpudiffim.testing import make_fake_pair


def _labelled(gen, shape=(67, 83)):
    above = gen.random(shape) < 0.3
    labels, n_labels = ndi.label(above, structure=np.ones((3, 3)))
    permutation = gen.permutation(n_labels) + 1           # another numbering than SciPy's
    labels = np.where(labels > 0, permutation[labels - 1], 0).astype(np.int32)
    residual = np.round(gen.normal(size=shape) * 2.0)     # many ties
    residual[gen.random(shape) < 0.05] = -0.0
    return residual, labels, n_labels


def test_footprint_stats_equal_the_reference(emulator, rng):
    gen, seed = rng
    residual, labels, n_labels = _labelled(gen)
    with use_backend("cuda-emulator"):
        got = footprint_stats(residual, labels, n_labels)
    assert got.dtype == np.uint64 and got.shape == (7, n_labels) and n_labels > 20
    assert_array_equal(got, footprint_stats_reference(residual, labels, n_labels), err_msg=f"seed={seed}")


def test_footprint_stats_without_footprints(emulator):
    with use_backend("cuda-emulator"):
        got = footprint_stats(np.zeros((5, 6)), np.zeros((5, 6), dtype=np.int32), 0)
    assert got.shape == (7, 0)


@pytest.mark.parametrize(("npix_min", "npix_max"), [(1, 10**6), (3, 8), (5, 5)])
def test_footprint_centres_equal_the_host_peaks(emulator, rng, npix_min, npix_max):
    gen, seed = rng
    residual, labels, n_labels = _labelled(gen)
    stats = footprint_stats_reference(residual, labels, n_labels)
    centres, keys = footprint_centres_reference(stats, residual.shape[1], residual.size, npix_min, npix_max)
    n_kept = int(np.count_nonzero(stats[0] >= npix_min))
    want = centres[np.argsort(keys, kind="stable")[:n_kept]]
    with use_backend("cuda-emulator"):
        got = footprint_centres(stats, residual.shape[1], residual.size, npix_min, npix_max, n_kept)
    assert got.dtype == np.int32 and 0 < n_kept <= n_labels
    assert_array_equal(got, want, err_msg=f"seed={seed}")
    first = (~stats[1]).astype(np.int64)[np.argsort(keys, kind="stable")[:n_kept]]
    assert np.all(np.diff(first) > 0), "kept footprints in the raster order of their first pixel"


def test_footprint_centres_without_footprints(emulator):
    with use_backend("cuda-emulator"):
        got = footprint_centres(np.zeros((7, 0), dtype=np.uint64), 6, 30, 1, 10, 0)
    assert got.shape == (0, 2)


@pytest.mark.parametrize("n", [1, 31, 32, 33, 64 * 32 + 5, 5000])
@pytest.mark.parametrize("density", [0.0, 0.01, 0.5, 1.0])
def test_select_rows_equals_boolean_indexing(emulator, rng, n, density):
    gen, seed = rng
    rows = gen.integers(-2**31, 2**31 - 1, size=(n, 2), dtype=np.int64).astype(np.int32)
    selected = gen.random(n) < density
    with use_backend("cuda-emulator"):
        got = select_rows(rows, selected)
    assert got.dtype == np.int32 and got.shape == (int(selected.sum()), 2)
    assert_array_equal(got, rows[selected], err_msg=f"seed={seed}")


@pytest.mark.parametrize("fraction", [0.001, 0.5])
@pytest.mark.parametrize("increasing", [True, False])
def test_operations_select_rows_either_upload(emulator, rng, fraction, increasing):
    from gpudiffim._ops import KERNELS

    gen, seed = rng
    rows = gen.integers(0, 4096, size=(3000, 2)).astype(np.int32)
    index = np.flatnonzero(gen.random(len(rows)) < fraction)
    if not increasing:
        index = gen.permutation(index)
    with use_backend("cuda-emulator"):
        got = KERNELS.select_rows(rows, index)
    assert_array_equal(got, rows[index], err_msg=f"seed={seed}")


def _planes(gen, dtype, shape=(71, 64), n_stars=30):
    """Stars of sigma 1.2-2.5 px on a sky, with a hole of zero variance; their (row, col) centres."""
    y, x = np.mgrid[:shape[0], :shape[1]]
    image = 50.0 + gen.normal(0.0, 2.0, shape)
    centres = np.stack([gen.integers(-3, shape[0] + 3, n_stars), gen.integers(-3, shape[1] + 3, n_stars)], axis=1)
    for (row, col), sigma in zip(centres, gen.uniform(1.2, 2.5, n_stars)):
        image += gen.uniform(100, 2000) * np.exp(-0.5 * ((y - row) ** 2 + (x - col) ** 2) / sigma**2)
    variance = np.full(shape, 4.0)
    variance[10:14, 20:30] = 0.0
    centres[3] = centres[4]                                # a tie of ratings
    return image.astype(dtype), variance.astype(dtype), centres


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n_images", [1, 2])
def test_rated_sigmas_equal_the_reference(emulator, rng, dtype, n_images):
    gen, seed = rng
    image, variance, centres = _planes(gen, dtype)
    other = (image * 1.5 + 3.0).astype(dtype)
    images = [image, other][:n_images]
    star_centres = centres + gen.integers(-1, 2, centres.shape)
    for stars, max_stars in ((None, 8), (star_centres, 40)):
        expected = rated_sigmas_reference(image, variance, images, centres, stars, 3, 12, max_stars)
        with use_backend("cuda-emulator"):
            got = rated_sigmas(image, variance, images, centres, stars, 3, 12, max_stars)
        n = len(centres)
        rtol = 1e-6 if dtype == np.float32 else 1e-12
        assert_allclose(got[:n], expected[:n], rtol=rtol, err_msg=f"seed={seed}")
        finite = np.isfinite(expected[n:])
        assert finite.sum() >= 3 * n_images
        assert_array_equal(np.isfinite(got[n:]), finite, err_msg=f"seed={seed}")
        assert_allclose(got[n:][finite], expected[n:][finite], rtol=1e-9, err_msg=f"seed={seed}")


def test_rated_sigmas_refuses_large_cutouts(emulator):
    plane = np.ones((8, 8))
    with pytest.raises(ValueError, match="radius"):
        rated_sigmas(plane, plane, [plane], np.zeros((1, 2), dtype=int), None, 1, STAR_MAX_RADIUS + 1, 5)


@pytest.mark.parametrize("half_size", [1, 6])
def test_stamps_flagged_equal_the_reference(emulator, rng, half_size):
    gen, seed = rng
    shape = (53, 61)
    masks = [np.where(gen.random(shape) < 0.01, 1 << gen.integers(0, 9, shape), 0).astype(np.int32)
             for _ in range(2)]
    centres = np.stack([gen.integers(half_size, shape[0] - half_size, 200),
                        gen.integers(half_size, shape[1] - half_size, 200)], axis=1)
    with use_backend("cuda-emulator"):
        got = stamps_flagged(*masks, centres, half_size, 0b10110)
    expected = stamps_flagged_reference(*masks, centres, half_size, 0b10110)
    assert_array_equal(got != 0, expected, err_msg=f"seed={seed}")
    assert 0 < expected.sum() < len(expected)


def test_kernel_path_gives_the_numpy_candidates(emulator):
    """Detection, ratings, PSF sizes and vetting on the emulator equal the NumPy backend's."""
    pair = make_fake_pair(shape=(160, 144), n_stars=40, seed=5)
    config = PsfMatchConfig()
    answers = []
    for backend in ("numpy", "cuda-emulator"):
        with use_backend(backend):
            positions = cand.detect_candidates(pair.science, config.detection)
            fwhms, ratings = cand.rated_fwhms([pair.template, pair.science], pair.science, positions, 3)
            kept, rejected = cand.vet_candidates(positions, pair.template, pair.science, 10,
                                                 bad_mask_planes=config.detection.bad_mask_planes,
                                                 core_radius=3, min_snr=5.0, ratings=ratings)
        answers.append((positions, fwhms, ratings, kept, rejected))
    (positions, fwhms, ratings, kept, rejected), got = answers
    assert len(positions) > 10
    assert_array_equal(got[0], positions)
    assert_allclose(got[1], fwhms, rtol=1e-9)
    assert_allclose(got[2], ratings, rtol=1e-6)
    assert_array_equal(got[3].id, kept.id)
    assert got[4] == rejected


def _scene(gen, shape, dtype):
    """Sky gradient, stars and noise; a NO_DATA corner (an empty bin), a NaN pixel run, bad variances."""
    y, x = np.mgrid[:shape[0], :shape[1]]
    image = 100.0 + 0.05 * x - 0.03 * y + gen.normal(0.0, 3.0, shape)
    for row, col in gen.integers(0, shape, (15, 2)):
        image += 400.0 * np.exp(-0.5 * ((y - row) ** 2 + (x - col) ** 2) / 2.0)
    image[30, 10:14] = np.nan                              # past the input checks (_wrap): a NaN bin median
    variance = np.full(shape, 9.0)
    variance[gen.random(shape) < 0.02] = -1.0
    variance[gen.random(shape) < 0.01] = np.nan
    mask = np.zeros(shape, dtype=np.int32)
    mask[:20, :25] = 1 << DEFAULT_MASK_PLANES["NO_DATA"]   # an empty bin
    return MaskedImage._wrap(image.astype(dtype), mask, variance.astype(dtype), (0, 0), DEFAULT_MASK_PLANES)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("shape", "bin_size"), [((97, 131), 17), ((64, 200), 40), ((50, 60), 128)])
@pytest.mark.parametrize("kind", ["pixel_stdev", "value", "stdev"])
def test_detection_residual_equals_the_reference(emulator, rng, dtype, shape, bin_size, kind):
    gen, seed = rng
    masked = _scene(gen, shape, dtype)
    detection = DetectionConfig(det_threshold=5.0 if kind != "value" else 30.0, det_threshold_type=kind,
                                background_bin_size=bin_size)
    expected = cand._residual_and_detections(masked, detection)
    with use_backend("cuda-emulator"):
        got = cand._residual_and_detections(masked, detection)
    assert_array_equal(got[0], expected[0], err_msg=f"seed={seed}")
    assert_array_equal(got[1] != 0, expected[1], err_msg=f"seed={seed}")
    if kind != "stdev":                                     # (the NaN pixels make the image-wide level NaN)
        assert expected[1].any() and not expected[1].all()


@pytest.mark.parametrize("stacked", [False, True])
def test_coarse_background_equals_the_reference(emulator, rng, stacked):
    gen, seed = rng
    planes = [_scene(gen, (83, 121), np.float32) for _ in range(3 if stacked else 1)]
    image = np.stack([p.image for p in planes]) if stacked else planes[0].image
    exclude = gen.random(image.shape) < 0.1
    exclude[..., :30, :40] = True                           # empty bins
    for bin_size in (16, 50):
        expected = cand.coarse_background(image, bin_size, exclude)
        with use_backend("cuda-emulator"):
            got = cand.coarse_background(image, bin_size, exclude)
        assert got.dtype == np.float64 and got.shape == image.shape
        assert_array_equal(got, expected, err_msg=f"seed={seed}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cupy_detection_kernels_equal_the_reference(rng, dtype):
    """With a GPU (NVRTC's arithmetic, real atomics): the fused residual and detections bit for bit, the
    footprint reductions exactly, the ratings and sigmas to rounding, the mask test exactly."""
    import cupy

    gen, seed = rng
    masked = _scene(gen, (301, 257), dtype)
    detection = DetectionConfig(det_threshold=5.0, background_bin_size=64)
    expected = cand._residual_and_detections(masked, detection)
    device = MaskedImage._wrap(*(cupy.asarray(p) for p in (masked.image, masked.mask, masked.variance)), (0, 0),
                               DEFAULT_MASK_PLANES)
    got = cand._residual_and_detections(device, detection)
    assert_array_equal(cupy.asnumpy(got[0]), expected[0], err_msg=f"seed={seed}")
    assert_array_equal(cupy.asnumpy(got[1]) != 0, expected[1], err_msg=f"seed={seed}")
    residual, labels, n_labels = _labelled(gen)
    assert_array_equal(cupy.asnumpy(footprint_stats(cupy.asarray(residual), cupy.asarray(labels), n_labels)),
                       footprint_stats_reference(residual, labels, n_labels), err_msg=f"seed={seed}")
    image, variance, centres = _planes(gen, dtype)
    expected = rated_sigmas_reference(image, variance, [image], centres, None, 3, 12, 20)
    got = cupy.asnumpy(rated_sigmas(cupy.asarray(image), cupy.asarray(variance), [cupy.asarray(image)], centres,
                                    None, 3, 12, 20))
    assert_allclose(got, expected, rtol=1e-6 if dtype == np.float32 else 1e-12, err_msg=f"seed={seed}")
    masks = [np.where(gen.random(image.shape) < 0.01, 4, 0).astype(np.int32) for _ in range(2)]
    inside = centres[(centres >= 5).all(axis=1) & (centres < np.array(image.shape) - 5).all(axis=1)]
    assert_array_equal(cupy.asnumpy(stamps_flagged(*(cupy.asarray(m) for m in masks), inside, 5, 4)) != 0,
                       stamps_flagged_reference(*masks, inside, 5, 4), err_msg=f"seed={seed}")


def test_rated_fwhms_of_given_positions(emulator, rng):
    """Positions given as floats (some off the image): ratings at the rounded positions, cutouts at the
    truncated ones, on the kernel path as on the reference."""
    gen, seed = rng
    pair = make_fake_pair(shape=(128, 120), n_stars=30, seed=6)
    positions = cand.detect_candidates(pair.science, PsfMatchConfig().detection) + gen.uniform(-0.6, 0.6, (1, 2))
    positions = np.concatenate([positions, [[-3.4, 50.2], [125.7, 130.9]]])
    expected = cand.rated_fwhms([pair.science], pair.science, positions, 2, max_stars=12)
    with use_backend("cuda-emulator"):
        got = cand.rated_fwhms([pair.science], pair.science, positions, 2, max_stars=12)
    assert_allclose(got[0], expected[0], rtol=1e-9, err_msg=f"seed={seed}")
    assert_allclose(got[1], expected[1], rtol=1e-6, err_msg=f"seed={seed}")
