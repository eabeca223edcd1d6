"""Tests of gpudiffim.warp: Lanczos-3 resampling between WCSs."""

import copy

import numpy as np
import pytest
from astropy.wcs import WCS, NoConvergence, Sip

from gpudiffim import MaskedImage, _resample, warp
from gpudiffim.errors import (
    ConfigurationError,
    InvalidImageError,
    NoDataWarning,
    RegistrationError,
    ShapeError,
)
from gpudiffim.warp import (
    lanczos_kernel,
    pixel_mapping,
    same_grid,
    warp_masked_image,
    wcs_overlap,
)

N = 256
SCALE_DEG = 0.2 / 3600
CRVAL = (150.0, 2.0)
PLANES = MaskedImage(np.ones((2, 2)), variance=np.ones((2, 2))).mask_planes
NO_DATA, EDGE, BAD = (1 << PLANES[name] for name in ("NO_DATA", "EDGE", "BAD"))


def make_wcs(crpix=(N / 2, N / 2), *, crval=CRVAL, rotation_deg=0.0, scale_deg=SCALE_DEG, sip=None):
    """TAN WCS; ``crpix`` is 0-based (the FITS value is one more)."""
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"] if sip else ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = crval
    wcs.wcs.crpix = [crpix[0] + 1, crpix[1] + 1]
    wcs.wcs.cdelt = [-scale_deg, scale_deg]
    t = np.deg2rad(rotation_deg)
    wcs.wcs.pc = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
    if sip:
        a, b = sip
        wcs.sip = Sip(a, b, None, None, wcs.wcs.crpix)
    return wcs


def shifted_pair(shift, rotation_deg=0.0):
    """Source and target WCSs: target pixel p maps to source pixel c + R (p - c) + shift."""
    centre = np.array([N / 2, N / 2])
    source = make_wcs(tuple(centre))
    target = make_wcs(tuple(centre - np.asarray(shift)), rotation_deg=rotation_deg)
    return source, target


def exact_source_xy(source, target, x, y, target_xy0=(0, 0), source_xy0=(0, 0)):
    """Independent exact mapping with the low-level astropy calls."""
    ra, dec = target.all_pix2world(np.asarray(x, float) + target_xy0[0], np.asarray(y, float) + target_xy0[1], 0)
    xs, ys = source.all_world2pix(ra, dec, 0)
    return xs - source_xy0[0], ys - source_xy0[1]


def gaussian(shape, x0, y0, sigma, flux=1.0):
    y, x = np.indices(shape, dtype=float)
    return flux / (2 * np.pi * sigma**2) * np.exp(-((x - x0) ** 2 + (y - y0) ** 2) / (2 * sigma**2))


def star_field(rng, n_stars=None, sigma=2.0, margin=40, spacing=60):
    """Isolated Gaussian stars on a grid with random sub-pixel positions and fluxes."""
    centres = []
    for y in range(margin, N - margin + 1, spacing):
        for x in range(margin, N - margin + 1, spacing):
            centres.append((x + rng.uniform(-0.5, 0.5), y + rng.uniform(-0.5, 0.5), rng.uniform(1e3, 1e4)))
    centres = centres[:n_stars]
    image = sum(gaussian((N, N), x, y, sigma, f) for x, y, f in centres)
    return image, centres


def flux_and_centroid(image, x, y, radius=10):
    """Aperture sum and first-moment centroid in a square around (x, y)."""
    ix, iy = round(float(x)), round(float(y))
    cut = image[iy - radius:iy + radius + 1, ix - radius:ix + radius + 1].astype(float)
    yy, xx = np.mgrid[iy - radius:iy + radius + 1, ix - radius:ix + radius + 1]
    total = cut.sum()
    return total, (cut * xx).sum() / total, (cut * yy).sum() / total


def brute_force(masked_image, source, target, row, col):
    """Independent Lanczos-3 resampling of one target pixel with the exact mapping."""
    xs, ys = exact_source_xy(source, target, col, row)
    ix, iy = int(np.floor(xs)), int(np.floor(ys))
    taps = np.arange(-2, 4)
    wx = lanczos_kernel(xs - (ix + taps))
    wy = lanczos_kernel(ys - (iy + taps))
    w = np.outer(wy / wy.sum(), wx / wx.sum())
    window = (slice(iy - 2, iy + 4), slice(ix - 2, ix + 4))
    image = (w * masked_image.image[window]).sum()
    variance = (w**2 * masked_image.variance[window]).sum()
    mask = np.bitwise_or.reduce(masked_image.mask[window][w != 0])
    return image, variance, mask


# --------------------------------------------------------------------------
# Kernel


def test_lanczos_kernel_values():
    x = np.linspace(-4, 4, 801)
    values = lanczos_kernel(x)
    expected = np.where(np.abs(x) < 3, np.sinc(x) * np.sinc(x / 3), 0.0)
    np.testing.assert_allclose(values, expected, atol=1e-15)
    assert lanczos_kernel(0.0) == 1.0
    assert np.all(lanczos_kernel(np.array([-3.0, -2.0, -1.0, 1.0, 2.0, 3.0, 3.5])) == 0.0)
    np.testing.assert_array_equal(lanczos_kernel(x), lanczos_kernel(-x))
    assert lanczos_kernel(2.5, a=2) == 0.0
    with pytest.raises(ConfigurationError):
        lanczos_kernel(0.5, a=0)


def test_fast_taps_match_kernel():
    # Fractions as the warp produces them: 0, or at least the snapping tolerance from an integer.
    edges = [0.0, 1e-6, 0.5, 1 - 1e-6]
    fraction = np.concatenate([edges, np.random.RandomState(3).uniform(1e-6, 1 - 1e-6, 1000)])
    fast = _resample.lanczos_taps(fraction)
    slow = lanczos_kernel(fraction[None] - np.arange(-2, 4)[:, None])
    np.testing.assert_allclose(fast, slow, rtol=1e-9, atol=1e-15)
    np.testing.assert_array_equal(fast[:, 0], [0, 0, 1, 0, 0, 0])


# --------------------------------------------------------------------------
# Identity and integer shifts


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_identity_is_exact(dtype):
    rng = np.random.RandomState(11)
    image = rng.normal(size=(70, 90)).astype(dtype)
    image[30, 40] = np.nan
    mask = np.zeros(image.shape, dtype=np.int32)
    mask[10, 12] = BAD
    mask[0, :] |= EDGE
    with pytest.warns(NoDataWarning):
        source = MaskedImage(image, mask, rng.uniform(1, 2, image.shape).astype(dtype), xy0=(100, 200))
    wcs = make_wcs((150.0, 230.0))
    out = warp_masked_image(source, wcs, copy.deepcopy(wcs), source.shape, source.xy0)
    assert out.dtype == dtype and out.xy0 == (100, 200)
    np.testing.assert_array_equal(out.image, source.image)
    np.testing.assert_array_equal(out.variance, source.variance)
    np.testing.assert_array_equal(out.mask, source.mask)
    assert out.mask_planes == source.mask_planes


def test_integer_offset_bbox_copies_pixels():
    rng = np.random.RandomState(12)
    source = MaskedImage(rng.normal(size=(60, 50)), variance=np.ones((60, 50)))
    wcs = make_wcs((25.0, 30.0))
    out = warp_masked_image(source, wcs, wcs, (40, 40), (20, -10))
    # Target element [j, i] is parent pixel (20 + i, -10 + j) = source[j - 10, i + 20].
    np.testing.assert_array_equal(out.image[10:, :30], source.image[:30, 20:])
    assert np.all(out.mask[:10] == NO_DATA | EDGE) and np.all(out.mask[:, 30:] == NO_DATA | EDGE)
    assert np.all(out.image[:10] == 0) and np.all(out.variance[:10] == 0)
    assert not np.any(out.mask[10:, :30])


# --------------------------------------------------------------------------
# Sub-pixel shift and rotation


SHIFT = (0.3, -0.45)


def lanczos_bias(shift):
    """First moment sum_k w_k (f - k) of the normalised Lanczos-3 weights at the fraction of ``shift``.

    Lanczos-3 does not reproduce linear functions exactly: a smooth image
    resampled at fraction f is displaced by this amount (up to ~0.018 px).
    """
    fraction = shift - np.floor(shift)
    offsets = fraction - np.arange(-2, 4)
    weights = lanczos_kernel(offsets)
    return (weights / weights.sum()) @ offsets


def test_subpixel_shift_band_limited_image():
    rng = np.random.RandomState(21)
    blobs = [(rng.uniform(40, N - 40), rng.uniform(40, N - 40), rng.uniform(2, 5), rng.uniform(100, 1000))
             for _ in range(40)]

    def truth(dx, dy):
        return sum(gaussian((N, N), x - dx, y - dy, s, f) for x, y, s, f in blobs)

    source, target = shifted_pair(SHIFT)
    original = truth(0, 0)
    out = warp_masked_image(MaskedImage(original, variance=np.ones((N, N))), source, target, (N, N))
    expected = truth(*SHIFT)   # out(p) = in(p + shift)
    interior = (slice(8, -8), slice(8, -8))
    # Lanczos-3's own accuracy on a sigma = 2 px Gaussian is ~4e-3 of the peak
    # (3.6e-3 measured here): this checks the implementation, not the kernel.
    error = np.abs(out.image - expected)[interior].max() / expected[interior].max()
    assert error < 5e-3, error
    # The unit-sum weights conserve the total exactly for a pure shift.
    assert out.image.sum() == pytest.approx(original.sum(), rel=1e-9)
    assert not np.any(out.mask[interior])


@pytest.mark.parametrize("rotation_deg, shift, tolerance", [(0.0, SHIFT, 0.02), (1.0, (2.3, -1.45), 0.025)])
def test_star_flux_and_centroids(rotation_deg, shift, tolerance):
    rng = np.random.RandomState(22)
    image, stars = star_field(rng)
    source, target = shifted_pair(shift, rotation_deg)
    out = warp_masked_image(MaskedImage(image, variance=np.ones((N, N))), source, target, (N, N))
    bias = np.array([lanczos_bias(s) for s in shift])
    for x, y, flux in stars:
        in_flux, in_x, in_y = flux_and_centroid(image, x, y)
        px, py = target.world_to_pixel(source.pixel_to_world(in_x, in_y))
        out_flux, out_x, out_y = flux_and_centroid(out.image, px, py)
        assert abs(out_flux / in_flux - 1) < 1e-3
        offset = np.array([out_x - px, out_y - py])
        assert np.all(np.abs(offset) < tolerance), offset
        if rotation_deg == 0.0:
            # A pure shift moves the centroid by exactly the shift minus the Lanczos bias.
            np.testing.assert_allclose(offset, bias, atol=1e-3)


def test_conserve_flux_with_different_pixel_scales():
    rng = np.random.RandomState(23)
    image, stars = star_field(rng, n_stars=4, margin=90, spacing=70)
    source = make_wcs()
    target = make_wcs(scale_deg=1.25 * SCALE_DEG)
    masked = MaskedImage(image, variance=np.ones((N, N)))
    plain = warp_masked_image(masked, source, target, (N, N))
    conserved = warp_masked_image(masked, source, target, (N, N), conserve_flux=True)
    for x, y, flux in stars:
        px, py = target.world_to_pixel(source.pixel_to_world(x, y))
        # Resampling onto coarser pixels is not exactly flux-neutral (1.7e-3 measured).
        assert abs(flux_and_centroid(conserved.image, px, py)[0] / flux - 1) < 3e-3
        assert abs(flux_and_centroid(plain.image, px, py)[0] * 1.25**2 / flux - 1) < 3e-3
    good = plain.mask == 0
    np.testing.assert_allclose(conserved.variance[good], plain.variance[good] * 1.25**4, rtol=1e-7)


# --------------------------------------------------------------------------
# Variance


def test_variance_matches_independent_sum_of_squared_weights():
    rng = np.random.RandomState(31)
    source, target = shifted_pair((1.3, -0.45), rotation_deg=1.0)
    variance = np.full((N, N), 4.0)
    variance[100:110, 80:90] = rng.uniform(1, 9, (10, 10))
    masked = MaskedImage(rng.normal(size=(N, N)), variance=variance)
    out = warp_masked_image(masked, source, target, (N, N))
    for row, col in [(10, 10), (50, 200), (104, 84), (128, 128), (240, 17)]:
        image, var, mask = brute_force(masked, source, target, row, col)
        assert out.image[row, col] == pytest.approx(image, rel=1e-6, abs=1e-9)
        assert out.variance[row, col] == pytest.approx(var, rel=1e-6)
        assert out.mask[row, col] == mask
    # A constant variance V becomes V * sum(w^2): between 0.785^2 V (both fractions 1/2) and V.
    ratio = out.variance[140:-10, 10:-10] / 4.0
    assert 0.785**2 - 1e-3 < ratio.min() and ratio.max() <= 1.0 + 1e-12


def test_noise_variance_is_consistent():
    rng = np.random.RandomState(32)
    sigma = 3.0
    masked = MaskedImage(rng.normal(scale=sigma, size=(N, N)), variance=np.full((N, N), sigma**2))
    source, target = shifted_pair((0.37, -0.21), rotation_deg=1.0)
    out = warp_masked_image(masked, source, target, (N, N))
    interior = (slice(10, -10), slice(10, -10))
    measured = out.image[interior].var()
    predicted = out.variance[interior].mean()
    assert abs(measured / predicted - 1) < 0.05, (measured, predicted)


# --------------------------------------------------------------------------
# Mask


def test_bad_pixel_grows_over_footprints():
    source, target = shifted_pair((0.3, -0.45), rotation_deg=1.0)
    mask = np.zeros((N, N), dtype=np.int32)
    mask[120, 100] = BAD
    masked = MaskedImage(np.ones((N, N)), mask, np.ones((N, N)))
    out = warp_masked_image(masked, source, target, (N, N))
    xs, ys = exact_source_xy(source, target, *np.meshgrid(np.arange(N), np.arange(N)))
    covers = ((np.abs(np.floor(xs) - 100 + 0.5) <= 2.5) & (np.abs(np.floor(ys) - 120 + 0.5) <= 2.5))
    np.testing.assert_array_equal((out.mask & BAD) != 0, covers)
    assert np.count_nonzero(covers) >= 36
    np.testing.assert_allclose(out.image[out.mask == 0], 1.0, rtol=1e-12)


def test_pixels_outside_coverage_are_no_data():
    shift = (N / 4 + 0.5, 0.3)   # the target sees the source's right three quarters
    source, target = shifted_pair(shift)
    masked = MaskedImage(np.full((N, N), 5.0), variance=np.ones((N, N)))
    out = warp_masked_image(masked, source, target, (N, N))
    xs = np.arange(N) + shift[0]
    outside = (np.floor(xs) + 3 > N - 1)   # a non-zero tap past the last column
    assert np.all(out.mask[:, outside] & NO_DATA) and np.all(out.mask[:, outside] & EDGE)
    assert np.all(out.image[:, outside] == 0) and np.all(out.variance[:, outside] == 0)
    inner = (slice(3, -3), ~outside)
    assert not np.any(out.mask[inner])
    np.testing.assert_allclose(out.image[inner], 5.0, rtol=1e-12)
    assert np.all(out.variance[out.mask == 0] > 0)


def test_nan_source_pixels_propagate_as_no_data():
    image = np.ones((N, N))
    image[60, 70] = np.nan
    with pytest.warns(NoDataWarning):
        masked = MaskedImage(image, variance=np.ones((N, N)))
    source, target = shifted_pair(SHIFT)
    out = warp_masked_image(masked, source, target, (N, N))
    # out(p) samples in(p + shift); the footprint is floor(p + shift) - 2 .. + 3:
    # x = p + 0.3 covers column 70 for p in 67..72, y = p - 0.45 covers row 60 for p in 58..63.
    expected = np.zeros((N, N), dtype=bool)
    expected[58:64, 67:73] = True
    flagged = (out.mask & NO_DATA) != 0
    np.testing.assert_array_equal(flagged[10:-10, 10:-10], expected[10:-10, 10:-10])
    assert np.all(out.image[expected] == 0) and np.all(out.variance[expected] == 0)
    assert np.all(np.isfinite(out.image)) and np.all(out.variance[~flagged] > 0)


# --------------------------------------------------------------------------
# Pixel mapping and grid comparisons


@pytest.mark.parametrize("sip", [None, "quadratic"])
def test_pixel_mapping_interpolation_error(sip):
    n = 512
    terms = None
    if sip:
        a = np.zeros((3, 3))
        b = np.zeros((3, 3))
        a[2, 0], a[1, 1], b[0, 2] = 2e-6, -1e-6, 1.5e-6   # ~0.5 px at the corners
        terms = (a, b)
    source = make_wcs((n / 2, n / 2), sip=terms)
    target = make_wcs((n / 2 + 17.3, n / 2 - 8.6), crval=(CRVAL[0] + 1e-3, CRVAL[1] - 2e-3),
                      rotation_deg=1.0, scale_deg=1.01 * SCALE_DEG)
    x, y = pixel_mapping(source, target, (n, n), (5, -7), (-3, 4))
    exact_x, exact_y = exact_source_xy(source, target, *np.meshgrid(np.arange(n), np.arange(n)),
                                       target_xy0=(5, -7), source_xy0=(-3, 4))
    error = np.hypot(x - exact_x, y - exact_y).max()
    assert error < (1e-3 if sip else 1e-6), error   # measured 6e-5 and 2e-9 px
    # Interpolation is exact on the coarse nodes.
    np.testing.assert_allclose(x[::10, ::10], exact_x[::10, ::10], atol=1e-9)
    np.testing.assert_allclose(x[-1, -1], exact_x[-1, -1], atol=1e-9)


def test_pixel_mapping_small_and_odd_shapes():
    wcs = make_wcs()
    for shape, step in [((1, 1), 10), ((1, 23), 10), ((23, 1), 4), ((11, 21), 10), ((5, 7), 1)]:
        x, y = pixel_mapping(wcs, wcs, shape, (0, 0), (0, 0), step)
        rows, cols = np.indices(shape)
        np.testing.assert_allclose(x, cols, atol=1e-6)
        np.testing.assert_allclose(y, rows, atol=1e-6)


def test_same_grid():
    wcs = make_wcs()
    assert same_grid(wcs, (N, N), (0, 0), wcs, (N, N), (0, 0))
    assert same_grid(wcs, (N, N), (0, 0), copy.deepcopy(wcs), (N, N), (0, 0))
    shifted = make_wcs((N / 2 + 0.1, N / 2))
    assert not same_grid(wcs, (N, N), (0, 0), shifted, (N, N), (0, 0))
    assert not same_grid(wcs, (N, N), (0, 0), make_wcs(rotation_deg=1e-4), (N, N), (0, 0))
    assert not same_grid(wcs, (N, N), (0, 0), wcs, (N, N + 1), (0, 0))
    assert not same_grid(wcs, (N, N), (0, 0), wcs, (N, N), (1, 0))


def test_wcs_overlap():
    wcs = make_wcs()
    assert wcs_overlap(wcs, (N, N), (0, 0), wcs, (N, N), (0, 0)) == 1.0
    quarter = make_wcs((N / 2 - N / 4, N / 2))
    assert wcs_overlap(wcs, (N, N), (0, 0), quarter, (N, N), (0, 0)) == pytest.approx(0.75, abs=1 / N)
    far = make_wcs(crval=(CRVAL[0] + 0.1, CRVAL[1]))   # 0.1 deg = 1800 px away
    assert wcs_overlap(wcs, (N, N), (0, 0), far, (N, N), (0, 0)) == 0.0
    antipode = make_wcs(crval=(CRVAL[0] + 180, -CRVAL[1]))   # off the TAN projection: NaN
    assert wcs_overlap(wcs, (N, N), (0, 0), antipode, (N, N), (0, 0)) == 0.0


# --------------------------------------------------------------------------
# Errors and blocking


def test_disjoint_fields_raise():
    masked = MaskedImage(np.ones((32, 32)), variance=np.ones((32, 32)))
    wcs = make_wcs((16.0, 16.0))
    for other in (make_wcs((16.0, 16.0), crval=(CRVAL[0] + 0.1, CRVAL[1])),
                  make_wcs((16.0, 16.0), crval=(CRVAL[0] + 180, -CRVAL[1]))):
        with pytest.raises(RegistrationError, match="do not overlap"):
            warp_masked_image(masked, wcs, other, (32, 32))


def test_argument_errors():
    masked = MaskedImage(np.ones((8, 8)), variance=np.ones((8, 8)))
    wcs = make_wcs((4.0, 4.0))
    with pytest.raises(RegistrationError, match="WCS is needed"):
        warp_masked_image(masked, None, wcs, (8, 8))
    with pytest.raises(RegistrationError, match="2 pixel axes"):
        warp_masked_image(masked, wcs, WCS(naxis=3), (8, 8))
    with pytest.raises(TypeError):
        warp_masked_image(np.ones((8, 8)), wcs, wcs, (8, 8))
    with pytest.raises(ShapeError):
        warp_masked_image(masked, wcs, wcs, (8, 0))
    with pytest.raises(InvalidImageError):
        warp_masked_image(masked, wcs, wcs, (8, 8), (0.5, 0))
    with pytest.raises(ConfigurationError):
        warp_masked_image(masked, wcs, wcs, (8, 8), interp_length=0)
    with pytest.raises(RegistrationError):
        same_grid(wcs, (8, 8), (0, 0), None, (8, 8), (0, 0))
    assert issubclass(RegistrationError, ValueError)


def test_row_blocks_and_threads_give_the_same_result(monkeypatch):
    rng = np.random.RandomState(41)
    mask = np.zeros((100, 90), dtype=np.int32)
    mask[rng.randint(0, 100, 20), rng.randint(0, 90, 20)] = BAD
    masked = MaskedImage(rng.normal(size=(100, 90)), mask, rng.uniform(1, 2, (100, 90)))
    source, target = shifted_pair((0.4, 0.7), rotation_deg=1.0)
    whole = warp_masked_image(masked, source, target, (97, 83), (60, 70))
    monkeypatch.setattr(warp, "_BLOCK_PIXELS", 500)   # 6 rows per block, 17 blocks
    blocked = warp_masked_image(masked, source, target, (97, 83), (60, 70))
    for plane in ("image", "variance", "mask"):
        np.testing.assert_array_equal(getattr(blocked, plane), getattr(whole, plane))


def test_diverging_distortion_inversion_gives_nan():
    a, b = np.zeros((4, 4)), np.zeros((4, 4))
    a[3, 0], b[0, 3], a[2, 0] = 1e-5, 1e-5, 1e-4   # a strong distortion that cannot be inverted far out
    source = make_wcs(sip=(a, b))
    target = make_wcs()
    grid = np.linspace(-3000, 3000, 41)
    x, y = np.meshgrid(grid, grid)
    with pytest.raises(NoConvergence):
        source.all_world2pix(*target.all_pix2world(x, y, 0), 0)
    xs, ys = warp._world_to_pixel(source, (target.pixel_to_world(x, y),))   # no warning, no error
    assert np.isnan(xs).any() and np.array_equal(np.isnan(xs), np.isnan(ys))
    centre = (20, 20)   # target pixel (0, 0)
    exact = source.all_world2pix(*target.all_pix2world([0.0], [0.0], 0), 0)
    assert xs[centre] == pytest.approx(exact[0][0], abs=1e-6) and ys[centre] == pytest.approx(exact[1][0], abs=1e-6)
