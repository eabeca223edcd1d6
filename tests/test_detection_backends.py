"""Detection, FWHM and vetting: vectorised code against straightforward references, NumPy against CuPy.

The references are the loops the vectorised code replaced: ``np.median`` bin by
bin, ``scipy.ndimage.find_objects`` with an ``argmax`` per footprint, and a box
test by two ``maximum_filter1d`` passes.  The results must be *equal* (same
positions in the same order, same kept candidates and ratings), on the host
(whole-image passes, and small row blocks with labelling in threaded row
strips) and, ``@pytest.mark.gpu``, with CuPy planes.
"""

import numpy as np
import pytest
import scipy.ndimage as ndi

import gpudiffim._backend

from gpudiffim import MaskedImage, PsfMatchConfig
from gpudiffim import candidates as cand
from gpudiffim import statistics
from gpudiffim.config import DetectionConfig
from gpudiffim.cutouts import stamps_flagged
from gpudiffim.fwhm import adaptive_sigma, estimate_fwhm
from gpudiffim.testing import make_fake_pair

SEEDS = (0, 1, 2, 3)
PLANES = ("NO_DATA", "EDGE", "SAT")


# ----------------------------------------------------------------------------
# References


def _reference_grid(image, bin_size, exclude=None):
    """Bin medians as the former ``coarse_background`` computed them (NaN filled)."""
    ny, nx = image.shape
    edges_y = np.linspace(0, ny, max(1, round(ny / bin_size)) + 1).astype(int)
    edges_x = np.linspace(0, nx, max(1, round(nx / bin_size)) + 1).astype(int)
    grid = np.full((len(edges_y) - 1, len(edges_x) - 1), np.nan)
    for j in range(len(edges_y) - 1):
        for i in range(len(edges_x) - 1):
            window = np.s_[edges_y[j]:edges_y[j + 1], edges_x[i]:edges_x[i + 1]]
            block = image[window] if exclude is None else image[window][~exclude[window]]
            if block.size:
                grid[j, i] = np.median(block)
    fill = np.nanmedian(grid) if np.isfinite(grid).any() else 0.0
    return np.where(np.isfinite(grid), grid, fill), edges_y, edges_x


def _reference_background(image, bin_size, exclude=None):
    grid, edges_y, edges_x = _reference_grid(image, bin_size, exclude)
    rows = cand._interpolation_matrix(image.shape[0], 0.5 * (edges_y[:-1] + edges_y[1:]) - 0.5)
    cols = cand._interpolation_matrix(image.shape[1], 0.5 * (edges_x[:-1] + edges_x[1:]) - 0.5)
    return rows @ grid @ cols.T


def _reference_peaks(residual, labels, npix_max):
    """Former ``_footprint_peaks``: find_objects + argmax in each box, SciPy label order."""
    n_labels = int(labels.max())
    area = np.bincount(labels.ravel(), minlength=n_labels + 1)[1:]
    peaks = np.zeros((n_labels, 2), dtype=int)
    for k, (sy, sx) in enumerate(ndi.find_objects(labels)):
        if area[k] > npix_max:
            peaks[k] = ((sy.start + sy.stop - 1) // 2, (sx.start + sx.stop - 1) // 2)
            continue
        values = np.where(labels[sy, sx] == k + 1, residual[sy, sx], -np.inf)
        row, col = np.unravel_index(np.argmax(values), values.shape)
        peaks[k] = (sy.start + row, sx.start + col)
    return peaks, area


def _reference_detect(masked_image, detection):
    """Former ``detect_candidates`` on the (separately checked) background of this version."""
    valid = (masked_image.mask & masked_image.bits(["NO_DATA"])) == 0
    background = cand.coarse_background(masked_image.image, detection.background_bin_size, ~valid)
    residual = masked_image.image - background
    kind, value = detection.det_threshold_type, detection.det_threshold
    if kind == "pixel_stdev":
        threshold = value * np.sqrt(masked_image.variance)
    elif kind == "variance":
        threshold = value * np.median(masked_image.variance[valid])
    elif kind == "stdev":
        threshold = value * cand.mad_sigma(residual[valid])
    else:
        threshold = value
    labels, n_labels = ndi.label((residual > threshold) & valid, structure=np.ones((3, 3)))
    if n_labels == 0:
        return np.zeros((0, 2), dtype=int)
    peaks, area = _reference_peaks(residual, labels, detection.fp_npix_max)
    keep = area >= detection.fp_npix_min
    x0, y0 = masked_image.xy0
    return np.stack([peaks[keep, 1] + x0, peaks[keep, 0] + y0], axis=1)


def _reference_box_any(flags, half_size):
    size = 2 * half_size + 1
    grown = ndi.maximum_filter1d(flags.astype(np.uint8), size, axis=0, mode="constant")
    return ndi.maximum_filter1d(grown, size, axis=1, mode="constant").astype(bool)


def _reference_vet(positions, template, science, half_size, *, bad_mask_planes, core_radius, min_snr):
    x0, y0 = science.xy0
    centres = np.floor(positions + 0.5).astype(int) - np.array([x0, y0])
    ny, nx = science.shape
    inside = ((centres[:, 0] >= half_size) & (centres[:, 0] < nx - half_size)
              & (centres[:, 1] >= half_size) & (centres[:, 1] < ny - half_size))
    bad_bits = science.bits(bad_mask_planes) | template.bits(bad_mask_planes)
    flagged = _reference_box_any(((science.mask | template.mask) & bad_bits) != 0, half_size)
    rc = centres[:, ::-1]
    clean = inside.copy()
    clean[inside] = ~flagged[rc[inside, 0], rc[inside, 1]]
    offsets = np.arange(-core_radius, core_radius + 1)
    rows = np.clip(rc[clean, 0, None, None] + offsets[None, :, None], 0, ny - 1)
    cols = np.clip(rc[clean, 1, None, None] + offsets[None, None, :], 0, nx - 1)
    sigma = np.sqrt(science.variance[rows, cols])
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = np.where(sigma > 0, science.image[rows, cols] / sigma, 0.0)
    rating = np.full(len(positions), -np.inf)
    rating[clean] = snr.mean(axis=(1, 2))
    bright = rating >= min_snr
    kept = [(int(k), int(centres[k, 0] + x0), int(centres[k, 1] + y0), float(rating[k]))
            for k in np.flatnonzero(bright)]
    return kept, [int((~inside).sum()), int((inside & ~clean).sum()), int((clean & ~bright).sum())]


# ----------------------------------------------------------------------------
# Inputs


@pytest.fixture(params=["whole", "blocks"])
def host_mode(request, monkeypatch):
    """Host code on whole images, or in many small row blocks."""
    if request.param == "blocks":
        monkeypatch.setattr(gpudiffim._backend, "HOST_BLOCK_PIXELS", 700)
    else:
        monkeypatch.setattr(gpudiffim._backend, "HOST_BLOCK_PIXELS", 1 << 62)
    return request.param


def _masked_scene(seed, shape=(211, 173), dtype=np.float32, n_stars=40, quantised=False, speckle=0.01):
    """Sky gradient + stars + noise, with NO_DATA / EDGE / SAT / CR bits and a dead bin."""
    rng = np.random.RandomState(seed)
    ny, nx = shape
    y, x = np.mgrid[:ny, :nx]
    image = 100.0 + 0.05 * x - 0.03 * y + rng.normal(0.0, 3.0, shape)
    for _ in range(n_stars):
        cy, cx = rng.uniform(0, ny), rng.uniform(0, nx)
        flux, sigma = rng.uniform(200, 5000), rng.uniform(1.0, 2.5)
        image += flux / (2 * np.pi * sigma**2) * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma**2))
    image[20:30, 40:70] += 400.0                      # a big flat footprint (ties, big)
    if quantised:
        image = np.round(image / 4.0) * 4.0           # many equal values: peak ties
    mask = np.zeros(shape, dtype=np.int32)
    mask[rng.random_sample(shape) < speckle / 5] |= 1 << 1  # SAT
    mask[rng.random_sample(shape) < 0.002] |= 1 << 3        # CR (not a bad plane)
    mask[:, :3] |= 1 << 4                                    # EDGE
    mask[60:90, 100:140] |= 1 << 8                           # NO_DATA block
    mask[rng.random_sample(shape) < speckle] |= 1 << 8
    variance = np.full(shape, 9.0) + 0.01 * np.abs(image - 100.0)
    return MaskedImage(image.astype(dtype), mask, variance.astype(dtype), xy0=(7, -3))


# ----------------------------------------------------------------------------
# Background


def test_two_point_weights_are_the_interpolation_matrix():
    for n, bin_size in ((211, 40), (173, 40), (100, 128), (64, 16), (5, 16)):
        edges = cand._bin_edges(n, bin_size)
        first, second, w1, w2 = cand._two_point_weights(n, edges)
        dense = np.zeros((n, len(edges) - 1))
        np.add.at(dense, (np.arange(n), first), w1)
        np.add.at(dense, (np.arange(n), second), w2)
        centres = 0.5 * (edges[:-1] + edges[1:]) - 0.5
        np.testing.assert_array_equal(dense, cand._interpolation_matrix(n, centres))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("shape", "bin_size"), [((211, 173), 40), ((128, 96), 32), ((61, 67), 16)])
def test_bin_medians_equal_np_median(seed, dtype, shape, bin_size, host_mode):
    """Uneven bin edges, odd and even counts, excluded pixels, one empty bin."""
    rng = np.random.RandomState(seed)
    image = (rng.normal(10.0, 5.0, shape) * (1 + (seed % 2) * 1e3)).astype(dtype)
    image[rng.random_sample(shape) < 0.3] = 7.0      # ties
    exclude = rng.random_sample(shape) < 0.2 * seed
    exclude[:bin_size, :bin_size] = True             # an empty bin
    expected, edges_y, edges_x = _reference_grid(image, bin_size, exclude)
    raw_expected = np.full(expected.shape, np.nan)
    for j in range(len(edges_y) - 1):
        for i in range(len(edges_x) - 1):
            block = image[edges_y[j]:edges_y[j + 1], edges_x[i]:edges_x[i + 1]]
            kept = block[~exclude[edges_y[j]:edges_y[j + 1], edges_x[i]:edges_x[i + 1]]]
            if kept.size:
                raw_expected[j, i] = np.median(kept)
    for medians in (statistics.bin_medians_loop, statistics.bin_medians_sorted):
        got = medians(image, ~exclude, edges_y, edges_x)
        np.testing.assert_array_equal(got, raw_expected, err_msg=medians.__name__)
    np.testing.assert_array_equal(cand._Background(image, bin_size, ~exclude).grid, expected)
    background = cand.coarse_background(image, bin_size, exclude)
    assert background.dtype == np.float64
    np.testing.assert_allclose(background, _reference_background(image, bin_size, exclude),
                               rtol=1e-13, atol=0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bin_medians_nan_and_no_exclusion(dtype):
    rng = np.random.RandomState(5)
    image = rng.normal(size=(50, 70)).astype(dtype)
    image[3, 4] = np.nan
    image[20, 1] = -np.nan
    image[40:, 60:] = -0.0
    image[45:, 66:] = np.inf
    image[40:, :10] = -np.inf
    edges_y, edges_x = cand._bin_edges(50, 16), cand._bin_edges(70, 16)
    with np.errstate(invalid="ignore"):
        expected = np.array([[np.median(image[edges_y[j]:edges_y[j + 1], edges_x[i]:edges_x[i + 1]])
                              for i in range(len(edges_x) - 1)] for j in range(len(edges_y) - 1)])
    assert np.isnan(expected[0, 0]) and np.isnan(expected[1, 0])
    for medians in (statistics.bin_medians_loop, statistics.bin_medians_sorted):
        np.testing.assert_array_equal(medians(image, None, edges_y, edges_x), expected)
    every = np.ones(image.shape, dtype=bool)
    for medians in (statistics.bin_medians_loop, statistics.bin_medians_sorted):
        assert np.isnan(medians(image, ~every, edges_y, edges_x)).all()
    np.testing.assert_array_equal(cand.coarse_background(image, 16, every), np.zeros(image.shape))


def test_integer_image_background():
    image = np.random.RandomState(2).randint(-2**30, 2**30, size=(40, 40)).astype(np.int32)
    np.testing.assert_array_equal(cand._Background(image, 16).grid, _reference_grid(image, 16)[0])
    np.testing.assert_allclose(cand.coarse_background(image, 16), _reference_background(image, 16),
                               rtol=0, atol=1e-13 * 2**30)


# ----------------------------------------------------------------------------
# Footprints and peaks


def _above(seed, shape=(157, 203), density=0.08):
    rng = np.random.RandomState(seed)
    above = ndi.binary_dilation(rng.random_sample(shape) < density / 9)
    above |= rng.random_sample(shape) < density / 4
    above[40:120, 50] = True                         # a long footprint across strip edges
    above[::37, :] |= True                           # rows touching many footprints
    return above


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("npix_max", [8, 500])
@pytest.mark.parametrize("npix_min", [1, 3])
def test_footprint_peaks_equal_find_objects_argmax(seed, npix_max, npix_min):
    rng = np.random.RandomState(seed)
    above = _above(seed)
    residual = np.round(rng.normal(size=above.shape) * 2.0)  # many ties
    labels, n_labels = ndi.label(above, structure=np.ones((3, 3)))
    expected_peaks, expected_area = _reference_peaks(residual, labels, npix_max)
    expected_peaks = expected_peaks[expected_area >= npix_min]   # SciPy's numbering = first-pixel order
    peaks, device_centres = cand._footprint_peaks(residual, labels, n_labels, npix_min, npix_max)
    np.testing.assert_array_equal(peaks, expected_peaks)
    assert device_centres is None                                 # the NumPy reference keeps the host's
    # any numbering gives the same, canonical, answer
    permutation = np.random.RandomState(seed + 100).permutation(n_labels)
    permuted = np.where(labels > 0, permutation[labels - 1] + 1, 0).astype(np.int32)
    peaks, _ = cand._footprint_peaks(residual, permuted, n_labels, npix_min, npix_max)
    np.testing.assert_array_equal(peaks, expected_peaks)


def test_footprints_without_any():
    labels, count = cand._footprints(np.zeros((600, 600), dtype=bool))
    assert count == 0 and not labels.any()


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kind", ["pixel_stdev", "stdev", "variance", "value"])
def test_detect_candidates_equals_reference(seed, kind, host_mode):
    masked = _masked_scene(seed, quantised=seed % 2 == 1, dtype=np.float32 if seed < 2 else np.float64)
    threshold = {"pixel_stdev": 4.0, "stdev": 4.0, "variance": 4.0, "value": 30.0}[kind]
    detection = DetectionConfig(det_threshold=threshold, det_threshold_type=kind, fp_npix_max=40,
                                background_bin_size=40)
    got = cand.detect_candidates(masked, detection)
    expected = _reference_detect(masked, detection)
    assert len(got) > 5
    np.testing.assert_array_equal(got, expected)
    assert got.dtype == expected.dtype


def test_detect_candidates_on_a_fake_pair(host_mode):
    pair = make_fake_pair(shape=(640, 512), n_stars=300, seed=4)
    detection = PsfMatchConfig().detection
    np.testing.assert_array_equal(cand.detect_candidates(pair.science, detection),
                                  _reference_detect(pair.science, detection))


def test_detect_candidates_nothing_above():
    masked = MaskedImage(np.zeros((64, 64)), variance=np.ones((64, 64)))
    got = cand.detect_candidates(masked, DetectionConfig())
    assert got.shape == (0, 2)


# ----------------------------------------------------------------------------
# Vetting


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("half_size", [1, 4, 11])
@pytest.mark.parametrize("density", [0.0, 0.001, 0.02])
def test_stamps_flagged_equals_box_filter(seed, half_size, density, host_mode):
    rng = np.random.RandomState(seed)
    shape = (97, 131)
    masks = [np.where(rng.random_sample(shape) < density, 1 << rng.randint(0, 9, shape), 0)
             .astype(np.int32) for _ in range(2)]
    template, science = (MaskedImage(np.zeros(shape), m, np.ones(shape)) for m in masks)
    bad_bits = science.bits(PLANES)
    rows = rng.randint(half_size, shape[0] - half_size, 300)
    cols = rng.randint(half_size, shape[1] - half_size, 300)
    centres_rc = np.stack([rows, cols], axis=1)
    got = stamps_flagged(science.mask, template.mask, centres_rc, half_size, bad_bits)
    box = _reference_box_any(((masks[0] | masks[1]) & bad_bits) != 0, half_size)
    np.testing.assert_array_equal(got, box[rows, cols])
    assert stamps_flagged(science.mask, template.mask, centres_rc[:0], half_size, bad_bits).shape == (0,)


def _rows(candidates):
    """(id, x, y, rating) of every vetted candidate."""
    return list(zip(candidates.id.tolist(), candidates.x.tolist(), candidates.y.tolist(),
                    candidates.rating.tolist()))


@pytest.mark.parametrize("seed", SEEDS)
def test_vet_candidates_equals_reference(seed, host_mode):
    rng = np.random.RandomState(seed)
    science = _masked_scene(seed, speckle=2e-4)
    template = _masked_scene(seed + 10, speckle=2e-4)
    ny, nx = science.shape
    positions = np.stack([rng.uniform(-5, nx + 5, 400), rng.uniform(-5, ny + 5, 400)], axis=1)
    positions += np.array(science.xy0)
    kwargs = {"bad_mask_planes": PLANES, "core_radius": 2, "min_snr": 35.0}
    kept, rejected = cand.vet_candidates(positions, template, science, 9, **kwargs)
    expected_kept, expected_rejected = _reference_vet(positions, template, science, 9, **kwargs)
    assert _rows(kept) == expected_kept
    assert list(rejected.values()) == expected_rejected
    assert all(v > 0 for v in expected_rejected) and kept


# ----------------------------------------------------------------------------
# NumPy against CuPy


def _to_cupy(masked):
    import cupy

    return MaskedImage(cupy.asarray(masked.image), cupy.asarray(masked.mask),
                       cupy.asarray(masked.variance), xy0=masked.xy0)


@pytest.mark.gpu
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cupy_background_equals_numpy(seed, dtype):
    import cupy

    rng = np.random.RandomState(seed)
    image = rng.normal(10.0, 5.0, (211, 173)).astype(dtype)
    image[rng.random_sample(image.shape) < 0.3] = 7.0
    exclude = rng.random_sample(image.shape) < 0.2 * seed
    exclude[:40, :40] = True
    expected = cand.coarse_background(image, 40, exclude)
    got = cand.coarse_background(cupy.asarray(image), 40, cupy.asarray(exclude))
    assert isinstance(got, cupy.ndarray)
    np.testing.assert_array_equal(got.get(), expected)


@pytest.mark.gpu
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kind", ["pixel_stdev", "stdev", "variance", "value"])
def test_cupy_detection_equals_numpy(seed, kind):
    masked = _masked_scene(seed, quantised=seed % 2 == 1, dtype=np.float32 if seed < 2 else np.float64)
    threshold = {"pixel_stdev": 4.0, "stdev": 4.0, "variance": 4.0, "value": 30.0}[kind]
    detection = DetectionConfig(det_threshold=threshold, det_threshold_type=kind, fp_npix_max=40,
                                background_bin_size=40)
    expected = cand.detect_candidates(masked, detection)
    got = cand.detect_candidates(_to_cupy(masked), detection)
    assert isinstance(got, np.ndarray)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("seed", SEEDS)
def test_cupy_footprint_peaks_equal_numpy(seed):
    import cupy
    from cupyx.scipy import ndimage as cupy_ndi

    rng = np.random.RandomState(seed)
    above = _above(seed)
    residual = np.round(rng.normal(size=above.shape) * 2.0)
    labels, n_labels = cand._footprints(cupy.asarray(above))
    count = cupy_ndi.label(cupy.asarray(above), structure=np.ones((3, 3)))[1]
    assert n_labels == count == ndi.label(above, structure=np.ones((3, 3)))[1]
    for npix_min, npix_max in ((1, 8), (3, 500)):
        peaks, device_centres = cand._footprint_peaks(cupy.asarray(residual), labels, n_labels, npix_min, npix_max)
        expected, area = _reference_peaks(residual, ndi.label(above, structure=np.ones((3, 3)))[0], npix_max)
        np.testing.assert_array_equal(peaks, expected[area >= npix_min])
        np.testing.assert_array_equal(cupy.asnumpy(device_centres), peaks)   # the same centres, on the device


@pytest.mark.gpu
def test_cupy_detection_on_a_fake_pair():
    pair = make_fake_pair(shape=(1024, 768), n_stars=600, seed=4)
    detection = PsfMatchConfig().detection
    np.testing.assert_array_equal(cand.detect_candidates(_to_cupy(pair.science), detection),
                                  cand.detect_candidates(pair.science, detection))


@pytest.mark.gpu
@pytest.mark.parametrize("seed", SEEDS)
def test_cupy_vetting_equals_numpy(seed):
    rng = np.random.RandomState(seed)
    science, template = _masked_scene(seed, speckle=2e-4), _masked_scene(seed + 10, speckle=2e-4)
    ny, nx = science.shape
    positions = np.stack([rng.uniform(-5, nx + 5, 400), rng.uniform(-5, ny + 5, 400)], axis=1)
    kwargs = {"bad_mask_planes": PLANES, "core_radius": 2, "min_snr": 35.0}
    expected = cand.vet_candidates(positions, template, science, 9, **kwargs)
    got = cand.vet_candidates(positions, _to_cupy(template), _to_cupy(science), 9, **kwargs)
    assert _rows(got[0]) == _rows(expected[0])
    assert got[1] == expected[1]
    rc = np.floor(positions[:50] + 0.5).astype(int)[:, ::-1]
    np.testing.assert_array_equal(cand.core_snr(_to_cupy(science), rc, 3), cand.core_snr(science, rc, 3))


@pytest.mark.gpu
def test_cupy_fwhm_equals_numpy():
    import cupy

    pair = make_fake_pair(shape=(256, 256), n_stars=60, seed=3)
    positions = cand.detect_candidates(pair.science, PsfMatchConfig().detection)
    assert estimate_fwhm(_to_cupy(pair.science), positions) == estimate_fwhm(pair.science, positions)
    stack = np.random.RandomState(0).normal(size=(4, 25, 25))
    np.testing.assert_array_equal(adaptive_sigma(cupy.asarray(stack)), adaptive_sigma(stack))
