"""Reference parity with HOTPANTS on the ip_diffim ``compareToHotpants`` image pair.

HOTPANTS (``alard.c``) was run on a synthetic 193 x 193 pair with nine point
sources; its kernel and background solutions are listed in section 11.2.1 of
``ipdiffim-reference.md``.  This test rebuilds the same problem from
gpudiffim's lower-level pieces (basis, stamp fits, spatial normal equations)
and checks every published number:

* one stamp: the stamp solution and the spatial solution (orders 0/0);
* four stamps: kernel order 0/1 x background order 0/1;
* nine stamps: kernel order 0/2 x background order 0/2 (three combinations).

HOTPANTS and gpudiffim (like ip_diffim) differ only in bookkeeping:

* basis order: HOTPANTS lists the monomials ``x^i y^j`` with ``i`` as the
  outer loop, gpudiffim by total degree (``ORDER`` maps one to the other);
* basis normalisation: gpudiffim's bases have unit L2 norm, HOTPANTS' do not
  (``SCALING`` = gpudiffim / HOTPANTS basis, checked independently below);
* sign: HOTPANTS convolves, gpudiffim correlates, so terms odd in
  ``x^i y^j`` change sign (``PARITY``); the background does not;
* spatial term order: HOTPANTS (1, y, x) / (1, y, y^2, x, xy, x^2), gpudiffim
  (1, x, y) / (1, x, y, x^2, xy, y^2), for kernel and background terms alike.

Hence the gpudiffim coefficient of basis ``ORDER[k]``, spatial term ``t`` is
``PARITY[k] * HP[k][perm[t]] / SCALING[k]``.  The comparison is made in
HOTPANTS units (gpudiffim values mapped forward), where the reference numbers
are rounded to 6 decimals and the tolerances apply.

The data folder is optional: without it the test skips (``shared_data``).
"""

import numpy as np
import pytest
from astropy.io import fits

from gpudiffim.basis import make_alard_lupton_basis
from gpudiffim.config import PsfMatchConfig
from gpudiffim.image import DEFAULT_MASK_PLANES, MaskedImage
from gpudiffim.spatial import SpatialFunction, term_exponents
from gpudiffim.spatial_fit import (
    local_parameter_maps,
    solve_spatial,
    spatial_normal_equations,
    unpack_spatial,
)
from gpudiffim.stamps import StampBatch, fit_stamps

# --------------------------------------------------------------------------
# Problem definition (spec section 11.2.1)
# --------------------------------------------------------------------------

SIGMA = 3.0
DEGREE = 3
HALF_WIDTH = 9                 # kernel 19 x 19
STAMP_HALF = 24                # stamps 49 x 49
N_BASIS = 10
IMAGE_SIZE = 193
CENTRE = 0.5 * IMAGE_SIZE      # x_n = (x - W/2) / (W/2), W = 193

CENTRES_ALL = ((32, 32), (96, 32), (160, 32), (96, 95), (31, 96),
               (160, 96), (96, 160), (160, 160), (32, 160))
CENTRES_FOUR = ((96, 95), (160, 96), (96, 160), (160, 160))
CENTRES_ONE = ((160, 160),)

#: gpudiffim (afw) basis index of HOTPANTS basis k.
ORDER = (0, 2, 5, 9, 1, 4, 8, 3, 7, 6)
#: gpudiffim basis ORDER[k] = SCALING[k] x HOTPANTS basis k.
SCALING = (1.0, 8.866037e-2, 12.18095, 5.099318e-3, 8.866037e-2, 4.179772e-2,
           1.138120e-2, 12.18095, 1.138120e-2, 5.099318e-3)
#: (-1)^(i + j) of HOTPANTS basis k = x^i y^j (convolution vs correlation).
PARITY = (1, -1, 1, -1, -1, 1, -1, 1, -1, -1)
#: HOTPANTS exponents (i, j) of basis k: i outer, j inner, i + j <= 3.
HOTPANTS_EXPONENTS = tuple((i, j) for i in range(DEGREE + 1) for j in range(DEGREE + 1 - i))
#: gpudiffim spatial term t = HOTPANTS spatial term SPATIAL_PERM[order][t].
SPATIAL_PERM = {0: (0,), 1: (0, 2, 1), 2: (0, 3, 1, 5, 4, 2)}

# HOTPANTS solutions, in HOTPANTS basis order, term order and sign.
K1 = (0.959086, -0.000344, -0.197758, 0.000019, -0.000172, 0.000053, 0.000018,
      -0.192776, 0.000000, 0.000001)
K4 = (0.969559, -0.000223, -0.198374, 0.000012, -0.000010, 0.000036, -0.000004,
      -0.206751, 0.000012, 0.000004)
K9 = (0.968505, -0.000053, -0.206505, 0.000005, 0.000062, 0.000028, -0.000004,
      -0.206135, 0.000005, 0.000001)
# Spatial kernels: basis 0 is a constant only; HOTPANTS terms (1, y, x).
K4S = ((0.969559,),
       (-0.000082, -0.000620, 0.000185),
       (-0.197749, 0.001418, -0.003321),
       (0.000002, 0.000049, -0.000016),
       (0.000211, -0.000283, -0.000397),
       (0.000034, 0.000002, 0.000006),
       (-0.000013, 0.000041, -0.000010),
       (-0.220238, 0.028395, 0.013148),
       (0.000019, -0.000025, 0.000003),
       (0.000003, 0.000000, 0.000005))
# HOTPANTS terms (1, y, y^2, x, xy, x^2).
K9S = ((0.968505,),
       (-0.000094, -0.000206, -0.000027, 0.000025, -0.000705, 0.000162),
       (-0.188375, 0.001801, -0.027534, 0.008718, 0.016346, -0.033879),
       (0.000004, 0.000012, 0.000023, 0.000004, 0.000017, -0.000020),
       (0.000128, -0.000218, 0.000304, -0.000038, -0.000151, -0.000531),
       (-0.000011, -0.000013, 0.000038, -0.000017, 0.000133, 0.000093),
       (-0.000003, 0.000003, 0.000006, 0.000008, 0.000002, -0.000010),
       (-0.212235, -0.000856, 0.012246, -0.010893, 0.049302, 0.008249),
       (0.000014, -0.000002, -0.000050, -0.000001, 0.000030, 0.000020),
       (-0.000001, 0.000010, -0.000012, -0.000007, 0.000015, 0.000019))
B4 = (0.782113, -0.910963, -0.106636)                                   # HOTPANTS (1, y, x)
B9 = (0.812488, 0.096456, -1.140900, 0.132670, -0.571923, -0.284670)   # (1, y, y^2, x, xy, x^2)

#: Absolute tolerances: Python's assertAlmostEqual(places=5) resp. places=6.
TOL_5 = 5e-6
TOL_6 = 5e-7

# (name, centres, kernel order, bg order, HOTPANTS kernel, HOTPANTS background, kernel tolerance)
CASES = [
    ("SingleNoVariation", CENTRES_ONE, 0, 0, K1, (0.602642,), TOL_6),
    ("FourNoVariation", CENTRES_FOUR, 0, 0, K4, (0.452304,), TOL_5),
    ("FourKernelVariation", CENTRES_FOUR, 1, 0, K4S, (0.452304,), TOL_5),
    ("FourBgVariation", CENTRES_FOUR, 0, 1, K4, B4, TOL_5),
    ("FourVariation", CENTRES_FOUR, 1, 1, K4S, B4, TOL_5),
    ("AllBgVariation2", CENTRES_ALL, 0, 2, K9, B9, TOL_5),
    ("AllKernelVariation2", CENTRES_ALL, 2, 0, K9S, (0.392482,), TOL_5),
    ("AllVariation2", CENTRES_ALL, 2, 2, K9S, B9, TOL_5),
]


# --------------------------------------------------------------------------
# Mapping HOTPANTS numbers onto gpudiffim's basis and term order
# --------------------------------------------------------------------------

def hotpants_array(hotpants, kernel_order):
    """HOTPANTS kernel numbers as an ``(n_basis, n_terms)`` array (HOTPANTS order).

    ``hotpants[k]`` is a scalar (spatially constant basis) or the HOTPANTS
    spatial terms of basis k; a basis given by its constant only has zero
    higher terms.
    """
    n_terms = len(SPATIAL_PERM[kernel_order])
    out = np.zeros((N_BASIS, n_terms))
    for k, values in enumerate(hotpants):
        values = np.atleast_1d(np.asarray(values, dtype=np.float64))
        out[k, :len(values)] = values
    return out


def to_hotpants(kernel, kernel_order):
    """gpudiffim spatial kernel coefficients in HOTPANTS basis, scale, sign and term order.

    Inverse of: gpudiffim coefficient of basis ``ORDER[k]``, term ``t`` =
    ``PARITY[k] * HP[k][SPATIAL_PERM[t]] / SCALING[k]``.  The comparison is
    made in HOTPANTS units because the reference numbers (6 decimals) and the
    tolerances are given there.
    """
    perm = list(SPATIAL_PERM[kernel_order])
    out = np.zeros_like(kernel)
    for k in range(N_BASIS):
        out[k, perm] = PARITY[k] * SCALING[k] * kernel[ORDER[k]]
    return out


def expected_background(hotpants, bg_order):
    """HOTPANTS background terms in gpudiffim term order (no parity)."""
    return np.asarray(hotpants, dtype=np.float64)[list(SPATIAL_PERM[bg_order])]


def hotpants_basis():
    """HOTPANTS-style basis in HOTPANTS order (independent of gpudiffim).

    Basis k = x^i g(x) * y^j g(y), g(t) = exp(-t^2 / 2 sigma^2) at integer
    offsets t in [-h, h] (x = column, y = row).  When i and j are both even,
    each 1-D factor is normalised to unit sum and, for k > 0, basis 0 is
    subtracted; other bases are left as they are.
    """
    t = np.arange(-HALF_WIDTH, HALF_WIDTH + 1, dtype=np.float64)
    g = np.exp(-t**2 / (2.0 * SIGMA**2))
    bases = []
    for i, j in HOTPANTS_EXPONENTS:
        fx, fy = t**i * g, t**j * g
        if i % 2 == 0 and j % 2 == 0:
            fx, fy = fx / fx.sum(), fy / fy.sum()
        kernel = np.outer(fy, fx)                  # [row (y), column (x)]
        if bases and i % 2 == 0 and j % 2 == 0:
            kernel = kernel - bases[0]
        bases.append(kernel)
    return np.array(bases)


# --------------------------------------------------------------------------
# Fixture: the image pair and the stamp systems
# --------------------------------------------------------------------------

def _read_masked_image(path):
    """LSST MaskedImage FITS (primary, image, mask, variance) with xy0 = (0, 0)."""
    with fits.open(path) as hdus:
        planes = [np.asarray(hdus[k].data) for k in (1, 2, 3)]
    image, mask, variance = (p.astype(p.dtype.newbyteorder("=")) for p in planes)
    assert image.shape == (IMAGE_SIZE, IMAGE_SIZE)
    assert not mask.any()
    # The template is noiseless (variance = image), so its variance is 0
    # wherever the image is 0.  MaskedImage refuses zero variance on pixels
    # with data; flag those NO_DATA.  Masks do not enter the stamp fits, and
    # the pixel values are unchanged, so the fitted systems are unaffected.
    zero = variance <= 0
    assert np.all(image[zero] == 0)
    mask = np.where(zero, 1 << DEFAULT_MASK_PLANES["NO_DATA"], 0).astype(np.int32)
    # The reference test ignores the headers' XY0 and uses (0, 0).
    return MaskedImage(image, mask, variance, xy0=(0, 0))


def _config(kernel_order=0, bg_order=0):
    return PsfMatchConfig(
        kernel_basis_set="alard-lupton",
        kernel_size=2 * HALF_WIDTH + 1,
        scale_by_fwhm=False,
        fit_for_background=True,
        spatial_model_type="polynomial",
        spatial_kernel_order=kernel_order,
        spatial_bg_order=bg_order,
        alard_n_gauss=1,
        alard_sig_gauss=(SIGMA,),
        alard_deg_gauss=(DEGREE,),
        constant_variance_weighting=True,
    )


@pytest.fixture(scope="module")
def basis():
    kernels = make_alard_lupton_basis(HALF_WIDTH, (SIGMA,), (DEGREE,))
    assert kernels.shape == (N_BASIS, 2 * HALF_WIDTH + 1, 2 * HALF_WIDTH + 1)
    return kernels


@pytest.fixture(scope="module")
def stamp_fits(shared_data, basis):
    """Stamp fits of all nine candidates, keyed by centre."""
    folder = shared_data / "ip_diffim-compareToHotpants"
    science = _read_masked_image(folder / "scienceMI.fits")
    template = _read_masked_image(folder / "templateMI.fits")
    batch = StampBatch.extract(CENTRES_ALL, template, science, STAMP_HALF)
    assert batch.template.shape == (len(CENTRES_ALL), 2 * STAMP_HALF + 1, 2 * STAMP_HALF + 1)
    fit = fit_stamps(batch, basis, _config())
    assert fit.failure == [""] * len(CENTRES_ALL)
    assert fit.normal_matrix.shape == (len(CENTRES_ALL), N_BASIS + 1, N_BASIS + 1)
    return {centre: (fit.coefficients[n], fit.background[n], fit.normal_matrix[n],
                     fit.normal_vector[n]) for n, centre in enumerate(CENTRES_ALL)}


def _spatial_solution(stamp_fits, centres, kernel_order, bg_order):
    bbox = (0, 0, IMAGE_SIZE - 1, IMAGE_SIZE - 1)      # unused by "polynomial"
    xy = np.array(centres, dtype=np.float64)
    xn = (xy[:, 0] - CENTRE) / CENTRE
    yn = (xy[:, 1] - CENTRE) / CENTRE
    kernel_terms = SpatialFunction("polynomial", kernel_order, bbox).terms(xn, yn)
    bg_terms = SpatialFunction("polynomial", bg_order, bbox).terms(xn, yn)
    matrices = np.array([stamp_fits[c][2] for c in centres])
    vectors = np.array([stamp_fits[c][3] for c in centres])
    maps = local_parameter_maps(kernel_terms, bg_terms, N_BASIS, constant_first_term=True)
    matrix, vector = spatial_normal_equations(matrices, vectors, maps)
    theta = solve_spatial(matrix, vector)[0]
    return unpack_spatial(theta, N_BASIS, kernel_terms.shape[1], bg_terms.shape[1], True)


# --------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------

def test_mapping_tables_consistent():
    """ORDER, PARITY and SPATIAL_PERM follow from the two term orderings."""
    afw = term_exponents(DEGREE)
    assert tuple(afw.index(e) for e in HOTPANTS_EXPONENTS) == ORDER
    assert tuple((-1) ** (i + j) for i, j in HOTPANTS_EXPONENTS) == PARITY
    for order, perm in SPATIAL_PERM.items():
        hotpants_terms = [(i, j) for i in range(order + 1) for j in range(order + 1 - i)]
        assert tuple(hotpants_terms.index(e) for e in term_exponents(order)) == perm


def test_basis_is_rescaled_hotpants_basis(basis):
    """gpudiffim basis ORDER[k] = SCALING[k] x HOTPANTS basis k (1e-6 relative)."""
    reference = hotpants_basis()
    for k in range(N_BASIS):
        ours = basis[ORDER[k]]
        theirs = SCALING[k] * reference[k]
        assert np.max(np.abs(ours - theirs)) <= 1e-6 * np.max(np.abs(theirs)), k
        if k > 0:   # SCALING[k] = 1 / ||HOTPANTS basis k||
            norm = np.sqrt(np.sum(reference[k] ** 2))
            assert abs(SCALING[k] * norm - 1.0) < 1e-6, k


def test_single_stamp_solution(stamp_fits):
    """Stamp (160, 160) alone: its own solution equals HOTPANTS' K1 (5 places)."""
    coefficients, background, _, _ = stamp_fits[(160, 160)]
    ours = to_hotpants(coefficients[:, None], 0)[:, 0]
    assert np.max(np.abs(ours - np.asarray(K1))) < TOL_5
    # Not a reference value: one stamp with orders 0/0 is the same linear
    # system as the spatial fit, so the backgrounds must agree.
    _, spatial_bg = _spatial_solution(stamp_fits, CENTRES_ONE, 0, 0)
    assert abs(background - spatial_bg[0]) < 1e-9


@pytest.mark.parametrize(
    ("centres", "kernel_order", "bg_order", "hp_kernel", "hp_background", "kernel_tol"),
    [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_spatial_solution(stamp_fits, centres, kernel_order, bg_order, hp_kernel,
                          hp_background, kernel_tol):
    """Spatial kernel and background equal HOTPANTS' after mapping."""
    kernel, background = _spatial_solution(stamp_fits, centres, kernel_order, bg_order)
    expected = hotpants_array(hp_kernel, kernel_order)
    assert kernel.shape == expected.shape
    assert np.max(np.abs(to_hotpants(kernel, kernel_order) - expected)) < kernel_tol
    expected_bg = expected_background(hp_background, bg_order)
    assert background.shape == expected_bg.shape
    assert np.max(np.abs(background - expected_bg)) < TOL_5
