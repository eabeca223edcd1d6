"""Why the DECam pair's isolated-star statistic cannot reach 1.2: properties of the data.

``tests/test_cli.py::test_decam_pair_isolated_stars`` measures the std of D/sigma over boxes on
the isolated stars of the DECam pair (science DEC-OBS04a, 2018; template DEC-OBS18a, 2016): 1.36.
Issue 5 asked for < 1.2; issue 14 (item 11) replaced that by a side-by-side criterion, <= 1.37 =
1.03 x what HOTPANTS and the best spatially constant kernel leave on the same boxes.  These
tests pin down why: the stars moved between the epochs, each by its own amount, which no
smooth kernel can follow, and the best constant kernel, fitted to the boxes themselves, leaves
1.35.
"""

import warnings

import numpy as np
import pytest
from scipy import ndimage

from gpudiffim import NoDataWarning
from gpudiffim.basis import make_kernel_basis
from gpudiffim.candidates import detect_candidates
from gpudiffim.config import DetectionConfig, PsfMatchConfig
from gpudiffim.covariance import measure_noise_correlation
from gpudiffim.fwhm import SIGMA_TO_FWHM, adaptive_sigma
from gpudiffim.io import read_exposure
from gpudiffim.variance import scale_variance

HEADER_FWHM = 5.2          # science (DEC-OBS04a) header FWHM, px
EDGE = 10                  # the fitted kernel's half-width: the pipeline flags these border pixels EDGE


def _frame(shared_data, name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoDataWarning)
        masked = read_exposure(shared_data / "decam" / f"DEC-OBS{name}.mini.fits").masked_image
    return scale_variance(masked, mode="add", limit=1000.0)[0]


def _centroid(image, x, y, radius=12, weight_sigma=2.2):
    """Gaussian-weighted centroid (px) of the star near integer (x, y)."""
    cut = image[y - radius:y + radius + 1, x - radius:x + radius + 1].astype(np.float64)
    grid = np.arange(-radius, radius + 1)
    dy, dx = np.meshgrid(grid, grid, indexing="ij")
    cx = cy = 0.0
    for _ in range(50):
        weight = cut * np.exp(-0.5 * ((dx - cx) ** 2 + (dy - cy) ** 2) / weight_sigma**2)
        cx, cy = (weight * dx).sum() / weight.sum(), (weight * dy).sum() / weight.sum()
    return x + cx, y + cy


def _point_sources(science, threshold=5.0, radius=12):
    """Isolated, unresolved sources away from the border: (x, y) integer peaks."""
    peaks = detect_candidates(science, DetectionConfig(det_threshold=threshold))
    keep = []
    for x, y in peaks:
        inside = radius <= x < science.shape[1] - radius and radius <= y < science.shape[0] - radius
        isolated = np.sum(np.hypot(*(peaks - (x, y)).T) < 4 * HEADER_FWHM) == 1
        if not (inside and isolated):
            continue
        cut = science.image[y - radius:y + radius + 1, x - radius:x + radius + 1].astype(np.float64)
        fwhm = SIGMA_TO_FWHM * adaptive_sigma(cut[None] - np.median(cut))[0]
        if fwhm < 1.5 * HEADER_FWHM:        # the galaxy at (129, 129) has 10 px
            keep.append((x, y))
    return keep


@pytest.mark.slow
def test_decam_stars_moved_between_epochs(shared_data):
    """Centroid offsets science - template differ from star to star by ~0.1-0.2 px between the
    2016 and 2018 epochs, by the same amounts in independent exposures, and also when both
    exposures were taken at the same airmass (04b and 18a: 1.23), while two exposures of the
    same night at airmasses 1.65 and 1.23 (04a, 04b) agree to ~0.03 px: proper motion, not
    refraction and not registration (the pixel grids are identical)."""
    frames = {name: _frame(shared_data, name) for name in ("04a", "04b", "18a")}
    stars = _point_sources(frames["04a"])
    assert len(stars) >= 4

    def offsets(first, second):
        a = np.array([_centroid(frames[first].image, x, y) for x, y in stars])
        b = np.array([_centroid(frames[second].image, x, y) for x, y in stars])
        return (a - b)[:, 0]

    across, across_same_airmass, same_night = offsets("04a", "18a"), offsets("04b", "18a"), \
        offsets("04a", "04b")
    print("x offsets 04a-18a", np.round(across, 3), "04b-18a", np.round(across_same_airmass, 3),
          "04a-04b", np.round(same_night, 3))
    assert np.std(across) > 0.08 and np.std(across_same_airmass) > 0.08    # 0.12, 0.14
    assert np.std(same_night) < 0.05                                        # 0.02
    assert np.corrcoef(across, across_same_airmass)[0, 1] > 0.8             # the same stars moved


def _star_boxes(science, threshold=10.0, fwhm=HEADER_FWHM):
    """The boxes of the issue-5 statistic: +-1.5 FWHM around isolated 10-sigma peaks."""
    peaks = detect_candidates(science, DetectionConfig(det_threshold=threshold))
    radius = int(np.ceil(1.5 * fwhm))
    boxes = np.zeros(science.shape, dtype=bool)
    for x, y in peaks:
        if np.sum(np.hypot(*(peaks - (x, y)).T) < 4 * fwhm) == 1:
            boxes[max(y - radius, 0):y + radius + 1, max(x - radius, 0):x + radius + 1] = True
    boxes[:EDGE] = boxes[-EDGE:] = boxes[:, :EDGE] = boxes[:, -EDGE:] = False
    return boxes


@pytest.mark.slow
def test_decam_no_constant_kernel_reaches_the_threshold(shared_data):
    """The best spatially constant Alard-Lupton kernel and background, least-squares fitted
    to the star boxes of the statistic themselves (in-sample, a lower bound for any constant
    kernel of this basis), leaves D/sigma std 1.35 there, with the pipeline's variance
    V_S + f sum K^2 V_T of the fitted kernel (f = 1.12: the template's noise correlation,
    gpudiffim.covariance; 1.35 also with f = 1).  1.2 is out of reach for a spatially constant
    kernel on this pair; the criterion 1.37 of test_decam_pair_isolated_stars is within 2 %
    of this bound."""
    science, template = _frame(shared_data, "04a"), _frame(shared_data, "18a")
    boxes = _star_boxes(science)
    basis = make_kernel_basis(PsfMatchConfig(), 3.85, 5.23)     # header FWHMs, as the fit does
    t_image = template.image.astype(np.float64)
    columns = np.array([ndimage.correlate(t_image, k, mode="nearest")[boxes] for k in basis.kernels]
                       + [np.ones(np.count_nonzero(boxes))]).T
    target = science.image.astype(np.float64)[boxes]
    variance = science.variance.astype(np.float64)[boxes]
    correlation = measure_noise_correlation(template)
    for _ in range(2):                   # weights 1/V_S, then 1/(V_S + sum K^2 V_T) of that kernel
        weight = 1.0 / np.sqrt(variance)
        coefficients = np.linalg.lstsq(columns * weight[:, None], target * weight, rcond=None)[0]
        kernel = np.tensordot(coefficients[:-1], basis.kernels, axes=1)
        variance = (science.variance.astype(np.float64)
                    + correlation.variance_factor(kernel)
                    * ndimage.correlate(template.variance.astype(np.float64), kernel**2,
                                        mode="nearest"))[boxes]
    z = (target - columns @ coefficients) / np.sqrt(variance)
    print(f"best constant kernel on the star boxes: D/sigma std {np.std(z):.3f} "
          f"over {z.size} px, f = {correlation.variance_factor(kernel):.3f}")
    assert 1.25 < np.std(z) <= 1.37                                          # 1.345
