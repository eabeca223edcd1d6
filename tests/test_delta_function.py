"""The delta-function basis against Alard-Lupton where AL is right (issue 13).

Why ``ip_diffim``'s delta-function defaults fell behind Alard-Lupton on easy
data, each cause with the test that shows it:

* The PCA spatial basis (DF's default) is the PCA of every candidate's
  kernel divided by its sum, weighted equally.  A delta-function stamp fit
  has 441 unknowns on 529 pixels, so a faint star's kernel is mostly noise,
  and the eigen-kernels follow that noise instead of the real variation of
  the bright stars' kernels (:func:`test_uniform_pca_misses_the_kernel_variation`);
  ``pca_weighting="precision"`` weights each kernel by how well its stamp
  determines it.
* ``ip_diffim``'s default ``lambda = 0.2`` (absolute) is nothing next to a
  bright star's normal matrix (traces of 1e7-1e9), so the stamp kernels fed
  to the PCA are unregularised; ``lambda_type="auto"`` chooses ``lambda`` by
  the residual on held-out stamps (:mod:`gpudiffim.regularization`).
* The regularisation smooths every stamp kernel the same way, so the
  smoothing survives the PCA's average and sits in the basis (its mean
  kernel), where the spatial fit cannot undo it; ``pca_deregularization``
  builds the basis from the kernels with the smoothing taken back out
  (:func:`test_deregularized_pca_basis_holds_the_true_mean_kernel`).  And
  the leading eigen-kernels follow the largest stamp-to-stamp variation,
  which is noise, not the one that follows position;
  ``pca_method="spatial"`` takes the kernels' spatial fit first
  (:func:`test_spatial_pca_follows_the_variation_with_position`).  Both are
  options, not defaults (:func:`test_pca_options_bring_bright_stars_to_alard_lupton`).
* Without PCA, each of the 441 kernel pixels has its own spatial model, and
  the kernel sum (their sum) inherits their noise: it varies over the field
  although the truth is constant, and times the sky that is a gradient on
  empty sky that the variance plane does not describe
  (:func:`test_raw_delta_function_kernel_sum_follows_the_noise`);
  ``spatial_kernel_sum_order`` (default 0) holds it to a lower order.
"""

import dataclasses
import warnings

import numpy as np
import pytest

from gpudiffim import ImagePsfMatchTask, MaskedImage, PsfMatchConfig
from gpudiffim.basis import renormalize_kernel_list
from gpudiffim.errors import ConfigurationError, FitQualityWarning
from gpudiffim.regularization import choose_lambda, held_out_partners
from gpudiffim.solve import pca_kernel_basis
from gpudiffim.spatial import SpatialFunction
from gpudiffim.spatial_fit import kernel_sum_constraint, solve_spatial
from gpudiffim.testing import gaussian_kernel, make_fake_pair

DF = PsfMatchConfig(kernel_basis_set="delta-function")
#: The delta-function basis with the PCA options of issue 13's eighth session.
DF_PCA = dataclasses.replace(DF, pca_method="spatial", pca_deregularization=3)
SKY, GAIN = 1000.0, 50.0


# --------------------------------------------------------------------------
# causes
# --------------------------------------------------------------------------

def _noisy_kernels(rng, n=60, half_width=10):
    """Unit-sum kernels whose width varies along one direction, with noise ~ 1/flux."""
    narrow, wide = gaussian_kernel(1.4, half_width), gaussian_kernel(2.0, half_width)
    mix = rng.uniform(0.3, 0.7, n)
    flux = np.exp(rng.uniform(np.log(1e3), np.log(1e5), n))
    noise = 0.002 * narrow.max() * 1e5 / flux         # per pixel, bright: 0.2 % of the peak; faint: 100x
    images = mix[:, None, None] * narrow + (1 - mix[:, None, None]) * wide
    images = images + noise[:, None, None] * rng.normal(size=images.shape)
    return images, 1.0 / noise**2, (narrow - wide).ravel()


def _missed_fraction(basis, direction):
    """Fraction of ``direction`` (norm) outside the span of the basis' varying kernels."""
    span = basis[1:].reshape(len(basis) - 1, -1).T
    coefficients, *_ = np.linalg.lstsq(span, direction, rcond=None)
    return np.linalg.norm(direction - span @ coefficients) / np.linalg.norm(direction)


def test_uniform_pca_misses_the_kernel_variation():
    """The cause of DF + PCA's residuals at bright stars: with equal weights the eigen-kernels
    are the faint stars' noise, and the one real direction of variation is mostly outside
    their span; weighted by precision it is inside."""
    images, precision, direction = _noisy_kernels(np.random.RandomState(1301))
    uniform = pca_kernel_basis(images, 5, True)
    weighted = pca_kernel_basis(images, 5, True, precision)
    missed_uniform, missed_weighted = _missed_fraction(uniform, direction), _missed_fraction(weighted, direction)
    assert missed_uniform > 0.9                                                # 0.97
    assert missed_weighted < 0.25                                              # 0.10


def test_spatial_pca_follows_the_variation_with_position():
    """The eigen-kernels follow the largest stamp-to-stamp variation: three random patterns, as
    large as the real variation but unrelated to position, take all three after the mean, and the
    direction that varies with position is missed; the kernels' fit by the spatial terms averages
    the patterns out over the 400 kernels and keeps it (``pca_method="spatial"``)."""
    rng = np.random.RandomState(1320)
    n, half_width = 400, 10
    narrow, wide = gaussian_kernel(1.4, half_width), gaussian_kernel(2.0, half_width)
    x, y = rng.uniform(0, 1000, n), rng.uniform(0, 1000, n)
    mix = 0.5 + 0.1 * (x - 500) / 500                                      # 0.4 .. 0.6 across the field
    patterns = rng.normal(size=(3, 2 * half_width + 1, 2 * half_width + 1))
    patterns *= 0.1 * np.linalg.norm(narrow - wide) / np.linalg.norm(patterns, axis=(1, 2))[:, None, None]
    images = mix[:, None, None] * narrow + (1 - mix[:, None, None]) * wide
    images += np.tensordot(rng.normal(size=(n, 3)), patterns, axes=1)
    terms = SpatialFunction("chebyshev1", 2, (0, 0, 999, 999)).terms(x, y)
    direction = (narrow - wide).ravel()
    assert _missed_fraction(pca_kernel_basis(images, 4, True), direction) > 0.9           # 0.98
    assert _missed_fraction(pca_kernel_basis(images, 4, True, None, terms), direction) < 0.2   # 0.10
    one_term = pca_kernel_basis(images, 4, True, None, terms[:, :1])      # a constant: the PCA itself
    np.testing.assert_array_equal(one_term, pca_kernel_basis(images, 4, True))


def test_spatial_pca_of_an_exact_field_has_no_round_off_direction():
    """Kernels exactly linear in position: the mean and the two directions of the fit, nothing else.
    The mean-subtracted constant term fits only round-off, whose direction is arbitrary (kept, it
    made the host's and the GPU's bases differ); the residual images are round-off too."""
    rng = np.random.RandomState(1321)
    x, y = rng.uniform(0, 1000, 50), rng.uniform(0, 1000, 50)
    shapes = rng.normal(size=(3, 7, 7))
    shapes[0] += 1.0
    images = shapes[0] + np.multiply.outer(x / 1000, shapes[1]) + np.multiply.outer(y / 1000, shapes[2])
    terms = SpatialFunction("chebyshev1", 1, (0, 0, 999, 999)).terms(x, y)
    basis = pca_kernel_basis(images, 6, True, rng.uniform(0.5, 2.0, 50), terms)
    assert len(basis) == 3
    for shape in shapes[1:]:
        assert _missed_fraction(basis, (shape - shape.sum() * basis[0]).ravel()) < 1e-10


def test_pca_drops_round_off_eigen_kernels():
    """N kernels less their mean span N - 1 dimensions: the N-th eigen-image belongs to a
    round-off eigenvalue, is arbitrary, and is not kept (it made the CuPy and NumPy paths'
    DF kernels differ by 0.2 % of their peak, 0.85 sigma in D, with 7 candidates)."""
    images, precision, _ = _noisy_kernels(np.random.RandomState(1305), n=4)
    for weights in (None, precision):
        basis = pca_kernel_basis(images, 10, True, weights)
        assert len(basis) == 4                                   # the mean and 3 eigen-kernels



@pytest.mark.parametrize("n_images", [30, 600])      # the images' Gram matrix, then the pixels' scatter
def test_pca_leading_eigen_kernels_equal_those_of_the_full_decomposition(n_images):
    """Only the leading eigenvalues are decomposed (a subset of ``syevr``): the kept eigen-kernels are
    those of every eigenvector of the scatter matrix (``numpy.linalg.eigh``), where their eigenvalues
    stand apart (here a rank-3 variation over noise 1e-3 of it: the noise eigen-kernels are arbitrary)."""
    rng = np.random.default_rng(n_images)
    shapes = rng.normal(size=(3, 9, 9))
    images = np.tensordot(rng.normal(size=(n_images, 3)) * [4.0, 2.0, 1.0], shapes, axes=1)
    images += 1e-3 * rng.normal(size=images.shape) + 1.0 / 81
    weights = rng.uniform(0.5, 2.0, n_images)
    basis = pca_kernel_basis(images, 4, True, weights)       # the mean and three eigen-kernels
    w = weights / weights.sum()
    mean = np.tensordot(w, images, axes=1)
    flat = (images - mean).reshape(n_images, -1) * np.sqrt(w * n_images)[:, None]
    _, vectors = np.linalg.eigh(flat.T @ flat)
    expected = [mean.ravel()] + [v / v[np.argmax(np.abs(v))] for v in vectors[:, ::-1][:, :3].T]
    np.testing.assert_allclose(basis, renormalize_kernel_list(np.array(expected).reshape(4, 9, 9)),
                               rtol=0, atol=1e-9)

def test_kernel_sum_constraint_solves_the_constrained_problem():
    """The eliminated system gives the least-squares solution under sum_i s_i a_{i,t} = 0
    (t >= n_s), the same as the Lagrange (KKT) solution."""
    rng = np.random.RandomState(1302)
    n_b, n_k, n_s, n_g = 7, 6, 1, 3
    n_theta = n_b * n_k + n_g
    design = rng.normal(size=(200, n_theta))
    matrix, vector = design.T @ design, design.T @ rng.normal(size=200)
    sums = rng.uniform(0.5, 1.5, n_b)
    constraint = kernel_sum_constraint(sums, n_k, n_s, n_theta)
    theta = solve_spatial(matrix, vector, constraint=constraint)[0]
    coefficients = theta[:n_b * n_k].reshape(n_b, n_k)
    np.testing.assert_allclose(sums @ coefficients[:, n_s:], 0.0, atol=1e-10)
    rows = np.zeros((n_k - n_s, n_theta))
    for row, term in enumerate(range(n_s, n_k)):
        rows[row, np.arange(n_b) * n_k + term] = sums
    kkt = np.block([[matrix, rows.T], [rows, np.zeros((len(rows), len(rows)))]])
    expected = np.linalg.solve(kkt, np.concatenate([vector, np.zeros(len(rows))]))[:n_theta]
    np.testing.assert_allclose(theta, expected, rtol=1e-8, atol=1e-10)
    assert kernel_sum_constraint(sums, n_k, n_k, n_theta) is None


def _with_sky(image, rng):
    """``image`` plus a flat sky of SKY counts with its photon noise (gain GAIN)."""
    noise = rng.normal(size=image.image.shape) * np.sqrt(SKY / GAIN)
    return MaskedImage((image.image + SKY + noise).astype(np.float32), image.mask,
                       (image.variance + SKY / GAIN).astype(np.float32), xy0=image.xy0)


def _sky_pair(size, seed):
    """A pair with ~1000 stars per 1024^2, transients, and SKY counts of sky on both images."""
    n_stars = int(1000 * (size / 1024) ** 2)
    pair = make_fake_pair((size, size), n_stars, seed=seed, n_transients=max(20, n_stars // 3),
                          flux_range=(1e3, 3e5))
    rng = np.random.RandomState(seed)
    return pair, _with_sky(pair.template, rng), _with_sky(pair.science, rng)


def _subtract(config, template, science):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FitQualityWarning)
        return ImagePsfMatchTask(config).subtract_masked_images(template, science)


@pytest.fixture(scope="module")
def small_sky_pair():
    return _sky_pair(256, 1303)


@pytest.mark.slow
def test_deregularized_pca_basis_holds_the_true_mean_kernel():
    """The cause of DF + PCA's remaining bright-star residuals on small pairs: the regularised
    stamp kernels are all smoothed alike, so the PCA basis's mean kernel is too, by 0.9 % of the
    true kernel (seen through the template's PSF, a Gaussian of 1.5 px) on this 384^2 pair; built
    from the kernels after three iterated-Tikhonov steps (``pca_deregularization=3``) it is off
    by 0.3 %."""
    from scipy.ndimage import gaussian_filter

    pair, template, science = _sky_pair(384, 1312)
    truth = pair.kernel.image(192.0, 192.0)

    def mean_kernel_error(config):
        mean = _subtract(config, template, science).psf_matching_kernel.basis[0]
        pad = (mean.shape[0] - truth.shape[0]) // 2
        true = np.zeros_like(mean)
        true[pad:pad + truth.shape[0], pad:pad + truth.shape[1]] = truth
        seen = lambda kernel: gaussian_filter(kernel, 1.5, mode="constant")     # noqa: E731
        return np.linalg.norm(seen(mean - true)) / np.linalg.norm(seen(true))

    smoothed = mean_kernel_error(dataclasses.replace(DF_PCA, pca_deregularization=0))
    deregularized = mean_kernel_error(DF_PCA)
    assert smoothed > 0.007                                                    # 0.0094
    assert deregularized < 0.004 and deregularized < 0.5 * smoothed            # 0.0028


def test_raw_delta_function_kernel_sum_follows_the_noise(small_sky_pair):
    """The cause of raw DF's sky structure: with the kernel sum at the kernel's spatial order
    (``ip_diffim``) it varies over the field although the true sum is constant (its noise
    times the sky is structure on empty sky); ``spatial_kernel_sum_order=0`` holds it."""
    pair, template, science = small_sky_pair
    raw = dataclasses.replace(DF, kernel_size=13, use_pca_for_spatial_kernel=False, spatial_kernel_order=1,
                              lambda_type="absolute", lambda_value=1e4)
    corners = [(x, y) for x in (0, 255) for y in (0, 255)]
    sums = {}
    for order in (None, 0):
        kernel = _subtract(dataclasses.replace(raw, spatial_kernel_sum_order=order), template,
                           science).psf_matching_kernel
        sums[order] = np.array([kernel.kernel_sum(x, y) for x, y in corners])
    truth = np.array([pair.kernel.kernel_sum(x, y) for x, y in corners])
    assert np.ptp(truth) < 1e-12
    assert np.ptp(sums[None]) * SKY > 0.3 * np.sqrt(SKY / GAIN)               # 0.3 sigma of sky structure
    assert np.ptp(sums[0]) < 1e-9


# --------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------

def test_only_the_spatial_fit_basis_keeps_normal_matrices(small_sky_pair, monkeypatch):
    """Memory (issue 13): with the PCA spatial basis (DF's default) the normal matrices of the
    delta-function fits are not kept (442^2 at 21 x 21: 1.56 MB each, 2.1 GB at 2048^2), only the
    PCA fits' that the spatial fit uses; without PCA the delta-function fits keep theirs."""
    import gpudiffim.solve as solve_module

    _, template, science = small_sky_pair
    for pca, expected in ((True, {121: False, 10: True}), (False, {121: True})):
        kept = {}
        fit_stamps = solve_module.fit_stamps

        def recording(batch, basis, *args, fit_stamps=fit_stamps, kept=kept, **kwargs):
            fit = fit_stamps(batch, basis, *args, **kwargs)
            kept.setdefault(len(basis), set()).add(fit.normal_matrix is not None)
            return fit

        monkeypatch.setattr(solve_module, "fit_stamps", recording)
        config = dataclasses.replace(DF, kernel_size=11, spatial_kernel_order=1, use_pca_for_spatial_kernel=pca)
        _subtract(config, template, science)
        assert {n: flags.pop() for n, flags in kept.items() if len(flags) == 1} == expected


def test_delta_function_config_defaults_and_validation():
    assert DF.lambda_type == "auto" and DF.pca_weights == "precision" and DF.pca_components == 10
    assert PsfMatchConfig().pca_weights == "uniform" and PsfMatchConfig().pca_components == 5
    assert DF.pca_method == "kernels" and DF.pca_deregularization == 0    # ip_diffim's PCA of the fits' kernels
    assert DF.kernel_sum_order(2) == 0 and DF.pca_spatial_kernel
    assert not dataclasses.replace(DF, spatial_kernel_order=0).pca_spatial_kernel   # PCA could only restrict it
    ip_diffim = dataclasses.replace(DF, spatial_kernel_sum_order=None, use_pca_for_spatial_kernel=False)
    assert ip_diffim.kernel_sum_order(2) == 2 and PsfMatchConfig(spatial_kernel_sum_order=None).kernel_sum_order(2) == 0
    assert dataclasses.replace(DF, spatial_kernel_sum_order=5).kernel_sum_order(1) == 1
    for field, value in (("spatial_kernel_sum_order", -1), ("pca_weighting", "flux"), ("lambda_type", "risk"),
                         ("pca_method", "eigen"), ("pca_deregularization", -1), ("pca_deregularization", 21)):
        with pytest.raises(ConfigurationError, match=field):
            dataclasses.replace(DF, **{field: value})


# --------------------------------------------------------------------------
# regularisation strength
# --------------------------------------------------------------------------

def test_held_out_partners_are_nearest_others():
    x, y = np.array([0.0, 10.0, 11.0, 50.0]), np.array([0.0, 0.0, 0.0, 0.0])
    assert held_out_partners(x, y).tolist() == [1, 2, 1, 2]


def test_choose_lambda_prefers_an_interior_value():
    """Stamps of one smooth kernel: the held-out residual is smallest at an intermediate
    lambda, neither unregularised (noise) nor at the top of the grid (over-smoothed)."""
    from gpudiffim.basis import make_regularization_matrix

    rng = np.random.RandomState(1304)
    width = 7
    truth = gaussian_kernel(1.2, width // 2).ravel()
    penalty = make_regularization_matrix(dataclasses.replace(DF, fit_for_background=False), width, width)
    matrices, vectors = [], []
    for _ in range(16):
        design = rng.normal(size=(60, width * width)) + 3.0 * rng.normal(size=(60, 1))
        data = design @ truth + 0.5 * rng.normal(size=60)
        matrices.append(design.T @ design)
        vectors.append(design.T @ data)
    choice = choose_lambda(np.array(matrices), np.array(vectors), rng.uniform(0, 100, 16),
                           rng.uniform(0, 100, 16), penalty, width * width)
    assert choice.grid[0] < choice.value < choice.grid[-1]
    assert min(choice.scores) == choice.scores[choice.grid.index(choice.value)]


def test_choose_lambda_on_the_device_is_the_hosts_with_one_score_read_back():
    """On the CuPy stand-in every reachable lambda is scored in one pass: the same choice and grid as
    the host's pass-by-pass search (scores to rounding), with one read-back of scores instead of three."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from cupy_standin import cupy_standin

    from gpudiffim.basis import make_regularization_matrix

    rng = np.random.RandomState(7)
    width = 5
    truth = gaussian_kernel(1.0, width // 2).ravel()
    penalty = make_regularization_matrix(dataclasses.replace(DF, fit_for_background=False), width, width)
    designs = rng.normal(size=(12, 40, width * width)) + 3.0 * rng.normal(size=(12, 40, 1))
    data = designs @ truth + 0.5 * rng.normal(size=(12, 40))
    matrices, vectors = designs.transpose(0, 2, 1) @ designs, (designs.transpose(0, 2, 1) @ data[..., None])[..., 0]
    x, y = rng.uniform(0, 100, 12), rng.uniform(0, 100, 12)
    host = choose_lambda(matrices, vectors, x, y, penalty, width * width)
    with cupy_standin(kernels="numpy") as recorder:
        import cupy

        device = choose_lambda(cupy.asarray(matrices), cupy.asarray(vectors), x, y, penalty, width * width)
        score_reads = sum(1 for e in recorder.events if e.kind == "sync" and "regularization" in e.site) - 2
    assert (device.value, device.grid, device.n_pairs) == (host.value, host.grid, host.n_pairs)
    np.testing.assert_allclose(device.scores, host.scores, rtol=1e-12)     # (sums in another order)
    assert score_reads == 1


def test_regularization_is_recorded(small_sky_pair):
    """The chosen lambda is in the result's diagnostics; ``lambda_type="absolute"`` turns the
    choice off and records the configured value."""
    _, template, science = small_sky_pair
    config = dataclasses.replace(DF, kernel_size=11, spatial_kernel_order=1)
    record = _subtract(config, template, science).diagnostics["regularization"]
    assert record["lambda_type"] == "auto" and record["lambda"] in record["grid"]
    assert len(record["scores"]) == len(record["grid"]) and record["n_pairs"] >= 2
    fixed = _subtract(dataclasses.replace(config, lambda_type="absolute"), template, science)
    assert fixed.diagnostics["regularization"] == {"lambda_type": "absolute", "lambda": 0.2}
    assert _subtract(PsfMatchConfig(spatial_kernel_order=1), template, science) \
        .diagnostics["regularization"] is None


# --------------------------------------------------------------------------
# acceptance: delta functions at the defaults against Alard-Lupton (issue 13 item 1)
# --------------------------------------------------------------------------

def _boxes(stars, size, radius, margin=20):
    """Boolean image of the (2 radius + 1)^2 boxes around ``stars`` inside ``margin``."""
    boxes = np.zeros((size, size), dtype=bool)
    for x, y in zip(np.rint(stars["x"]).astype(int), np.rint(stars["y"]).astype(int)):
        boxes[max(y - radius, 0):y + radius + 1, max(x - radius, 0):x + radius + 1] = True
    if margin:
        boxes[:margin] = boxes[-margin:] = False
        boxes[:, :margin] = boxes[:, -margin:] = False
    return boxes


def _transient_fluxes(pair, difference, size, radius=8, margin=20):
    """Aperture flux in D (local background from a 10-14 px annulus) / true flux of the
    transients with no star within 14 px."""
    stars, ratios = pair.stars, []
    reach = 14
    rows, cols = np.mgrid[-reach:reach + 1, -reach:reach + 1]
    for star in stars[stars["kind"] == "transient"]:
        x, y = int(round(star["x"])), int(round(star["y"]))
        crowded = np.sum((np.abs(stars["x"] - star["x"]) < reach) & (np.abs(stars["y"] - star["y"]) < reach)) > 1
        if crowded or not (margin <= x < size - margin and margin <= y < size - margin):
            continue
        r2 = (cols + x - star["x"]) ** 2 + (rows + y - star["y"]) ** 2
        box = difference[y - reach:y + reach + 1, x - reach:x + reach + 1]
        aperture, annulus = r2 <= radius**2, (r2 >= 10**2) & (r2 <= reach**2)
        ratios.append((box[aperture].sum() - aperture.sum() * np.median(box[annulus])) / star["science_flux"])
    return np.array(ratios)


def _scores(pair, result, size):
    """Star-box and empty-sky D/sigma std, transient flux-ratio scatter, false 5-sigma pixels."""
    d = result.subtracted_image
    z = d.image / np.sqrt(d.variance)
    usable = (d.mask == 0) & np.isfinite(z)
    stars = pair.stars
    snr = stars["science_flux"] / np.sqrt(4 * np.pi * 2.2**2 * (25.0 + SKY / GAIN))
    transients = _boxes(stars[stars["kind"] == "transient"], size, 10)
    bright = stars[(stars["kind"] != "transient") & (snr > 50)]
    near_any = _boxes(stars, size, 15, margin=0)
    sky = usable & ~near_any
    sky[:20] = sky[-20:] = False
    sky[:, :20] = sky[:, -20:] = False
    return {"star": float(np.std(z[usable & _boxes(bright, size, 5) & ~transients])),
            "sky": float(np.std(z[sky])),
            "transient": float(np.std(_transient_fluxes(pair, d.image, size))),
            "false": int(np.sum(usable & ~transients & (np.abs(z) > 5) & _boxes(stars, size, size, 20)))}


@pytest.mark.slow
@pytest.mark.parametrize("size, seed", [(512, 1313), (512, 1314), (768, 1315)])
def test_delta_function_defaults_match_alard_lupton(size, seed):
    """Issue 13 item 1, with a sky of 1000 counts (gain 50) on both images and ~1000 stars per
    1024^2: the delta-function basis at its defaults (``lambda_type="auto"``, a precision-
    weighted PCA of 10 components, a constant kernel sum) leaves D/sigma std on bright stars
    (S/N > 50) and on empty sky, and a transient flux-ratio scatter, within 2 % of
    Alard-Lupton's, and at most 2 x AL + 2 false 5-sigma pixels.  (``ip_diffim``'s DF defaults
    at 1024^2: 82 on stars and 800 000 false pixels, 4 GOOD candidates of 805.)

    Not yet everywhere: on smaller or other pairs the bright-star std is 2.5-3.3 % above AL's
    (384^2 seeds 1311 and 1312, 640^2 seed 1315, where the transient scatter is 15 % above
    too); :func:`test_pca_options_bring_bright_stars_to_alard_lupton` brings the stars within 2 %
    there, with the transient scatter moved by -6 to +6 % (``bench/RESULTS.md``, eighth session)."""
    pair, template, science = _sky_pair(size, seed)
    al = _scores(pair, _subtract(PsfMatchConfig(), template, science), size)
    df = _scores(pair, _subtract(DF, template, science), size)
    print(f"{size}^2 seed {seed}: AL {al}, DF {df}")
    for key in ("star", "sky", "transient"):
        assert df[key] <= 1.02 * al[key], key
    assert df["false"] <= 2 * al["false"] + 2


@pytest.mark.slow
@pytest.mark.parametrize("size, seed", [(384, 1311), (384, 1312), (640, 1315)])
def test_pca_options_bring_bright_stars_to_alard_lupton(size, seed):
    """On the pairs where the defaults leave 2.9-3.9 % more bright-star D/sigma std than AL,
    ``pca_method="spatial"`` with ``pca_deregularization=3`` leaves 0.4-1.5 % more (the
    star criterion of the acceptance test), sky std as AL's and no false pixel more."""
    pair, template, science = _sky_pair(size, seed)
    al = _scores(pair, _subtract(PsfMatchConfig(), template, science), size)
    df = _scores(pair, _subtract(DF_PCA, template, science), size)
    print(f"{size}^2 seed {seed}: AL {al}, DF with the PCA options {df}")
    assert df["star"] <= 1.02 * al["star"]
    assert df["sky"] <= 1.02 * al["sky"]
    assert df["false"] <= 2 * al["false"] + 2


# --------------------------------------------------------------------------
# where delta functions should win: the JWST pair's rotated PSF (issue 13 item 4)
# --------------------------------------------------------------------------

#: The bright star of the JWST pair whose PSF is rotated between the epochs (parent x, y).
ROTATED_STAR = (759, 491)


@pytest.mark.slow
def test_jwst_rotated_star_needs_a_free_kernel(shared_data):
    """With the real-pair tests' configuration (``tests/test_cli.py::JWST_CONFIG``: spatially
    constant kernel) and a 21 x 21 delta-function kernel, the bright star whose PSF is
    rotated by 150 deg between the epochs leaves D/sigma std 0.91 in its box (Alard-Lupton
    with the same configuration: 1.93), and the isolated-star statistic is 1.35, below the
    1.45 of the configuration the issue measured; Alard-Lupton at the tests' configuration
    leaves 1.305.  Most of the gap is one box, the brightest source at the image's left edge
    (x = 20), which no kernel of this pair fits (AL 5.0, DF 5.1-5.8 for 15-25 px kernels).
    The DF defaults at spatial order 0 use no PCA (a PCA basis could only restrict a constant
    kernel; with it the statistic was 2.6)."""
    from test_cli import JWST_CONFIG, JWST_FWHM, _jwst_files, _scores, _scoring_regions

    from gpudiffim import NoDataWarning
    from gpudiffim.cli import build_config
    from gpudiffim.io import read_exposure

    files = _jwst_files(shared_data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoDataWarning)
        science, template = (read_exposure(files[name]["image"], hdu="SCI", sigma=files[name]["noise"],
                                           psf=files[name]["psf"]) for name in ("science", "template"))
        scored = read_exposure(files["science"]["image"], hdu="SCI", sigma=files["science"]["noise"])
    regions = _scoring_regions(scored.masked_image, JWST_FWHM)
    rotated = [k for k, (x, y, _) in enumerate(regions["stars"]) if (x, y) == ROTATED_STAR]
    assert len(rotated) == 1
    config = dataclasses.replace(build_config(JWST_CONFIG), kernel_basis_set="delta-function", kernel_size=21)
    assert not config.pca_spatial_kernel
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FitQualityWarning)
        warnings.simplefilter("ignore", NoDataWarning)
        result = ImagePsfMatchTask(config).subtract_exposures(template, science)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)       # a box inside the kernel's no-data border
        scores = _scores(result.subtracted_image, regions)
    print(f"JWST DF 21x21: isolated-star std {scores['star_std']:.3f}, rotated star "
          f"{scores['per_star'][rotated[0]]:.3f}, sky {scores['sky_std']:.3f}, "
          f"lambda {result.diagnostics['regularization']['lambda']:.3g}")
    assert scores["per_star"][rotated[0]] < 1.5                                # 0.91
    assert scores["star_std"] < 1.451                                          # 1.353
    assert 0.95 <= scores["sky_std"] <= 1.05                                   # 1.012
