"""The three clipping stages and candidate replacement within a cell."""

import numpy as np
import pytest

from gpudiffim import ImagePsfMatchTask, MaskedImage, PsfMatchConfig
from gpudiffim.cellset import RejectReason
from gpudiffim.testing import make_fake_pair

SHAPE = (512, 512)
CELL = 256


def _record_at(result, x, y):
    matches = [r for r in result.kernel_cell_set.candidates if r.x == round(x) and r.y == round(y)]
    assert len(matches) == 1, f"no unique candidate at ({x}, {y})"
    return matches[0]


def _isolated(stars, margin=25, separation=32, flux_min=3000):
    """Stars away from the edges with no neighbour of flux > 200 within ``separation`` px.

    A neighbour inside the fit region (+ kernel) of a variable star would make the
    stamp unfittable by any single kernel and reject it at the first stage.
    """
    keep = []
    for star in stars:
        if not (margin < star["x"] < SHAPE[1] - margin and margin < star["y"] < SHAPE[0] - margin):
            continue
        distance = np.hypot(stars["x"] - star["x"], stars["y"] - star["y"])
        crowded = (distance > 0) & (distance < separation) & (stars["science_flux"] > 200)
        if star["science_flux"] >= flux_min and not crowded.any():
            keep.append(star)
    return keep


def test_variable_star_rejected_by_kernel_sum():
    pair = make_fake_pair(shape=SHAPE, n_stars=60, seed=31, n_variables=8, variable_factor=3.0,
                          flux_range=(3e3, 3e4), template_noise=2.0, science_noise=2.0)
    stars = _isolated(pair.stars)
    variables = [s for s in stars if s["kind"] == "variable"]
    assert variables, "the simulation must give an isolated variable star"
    config = PsfMatchConfig(fit_for_background=True, spatial_kernel_order=1, n_star_per_cell=-1)
    result = ImagePsfMatchTask(config).subtract_masked_images(
        pair.template, pair.science, candidates=[(s["x"], s["y"]) for s in stars])
    for star in variables:
        record = _record_at(result, star["x"], star["y"])
        assert record.status == "BAD"
        assert record.reason.startswith("kernel sum")
        assert record.reason_code is RejectReason.KERNEL_SUM
        assert record.kernel_sum == pytest.approx(3.0, rel=0.05)
    assert result.psf_matching_kernel.kernel_sum(256, 256) == pytest.approx(1.0, abs=0.01)
    assert result.kernel_cell_set.n_good >= 3
    counts = result.kernel_cell_set.rejection_counts()
    assert counts["kernel sum"] >= len(variables) and sum(counts.values()) == result.kernel_cell_set.n_bad


def _with_spike(masked, x, y, value):
    image = np.array(masked.image)
    image[y - masked.xy0[1], x - masked.xy0[0]] += value
    return MaskedImage(image, masked.mask, masked.variance, xy0=masked.xy0)


def test_cosmic_ray_rejected_and_replaced_from_same_cell():
    pair = make_fake_pair(shape=SHAPE, n_stars=60, seed=32, flux_range=(3e3, 3e4),
                          template_noise=2.0, science_noise=2.0)
    stars = sorted(_isolated(pair.stars), key=lambda s: -s["science_flux"])
    in_cell = [s for s in stars if s["x"] < CELL and s["y"] < CELL]
    others = [s for s in stars if not (s["x"] < CELL and s["y"] < CELL)]
    assert len(in_cell) >= 2 and len(others) >= 2
    hit, spare = in_cell[0], in_cell[1]
    science = _with_spike(pair.science, int(round(hit["x"])) + 6, int(round(hit["y"])) + 5, 5e4)
    config = PsfMatchConfig(fit_for_background=True, spatial_kernel_order=0, n_star_per_cell=1,
                            kernel_sum_clipping=False, size_cell_x=CELL, size_cell_y=CELL)
    chosen = [hit, spare] + others
    result = ImagePsfMatchTask(config).subtract_masked_images(
        pair.template, science, candidates=[(s["x"], s["y"]) for s in chosen])
    hit_record = _record_at(result, hit["x"], hit["y"])
    spare_record = _record_at(result, spare["x"], spare["y"])
    assert hit_record.status == "BAD"
    assert hit_record.reason.startswith("single-kernel residual")
    assert hit_record.reason_code is RejectReason.SINGLE_KERNEL_RESIDUAL
    assert spare_record.reason_code is RejectReason.NONE and spare_record.reason == ""
    assert hit_record.single_rms > 1.5
    assert hit_record.cell == spare_record.cell
    assert spare_record.status == "GOOD"
    assert spare_record.single_rms < 1.5


@pytest.mark.filterwarnings("ignore::gpudiffim.FitQualityWarning")  # 15 stamps, 82 unknowns
def test_spatial_clipping_rejects_outlier_under_spatial_model():
    """With kernel-sum clipping off, a brightened star passes its own fit but not the spatial model."""
    pair = make_fake_pair(shape=SHAPE, n_stars=60, seed=31, n_variables=8, variable_factor=1.5,
                          flux_range=(3e3, 3e4), template_noise=2.0, science_noise=2.0)
    stars = _isolated(pair.stars)
    variable = min((s for s in stars if s["kind"] == "variable"), key=lambda s: s["flux"])
    chosen = [s for s in stars if s["kind"] == "star"] + [variable]
    config = PsfMatchConfig(fit_for_background=True, spatial_kernel_order=1, n_star_per_cell=-1,
                            kernel_sum_clipping=False)
    result = ImagePsfMatchTask(config).subtract_masked_images(
        pair.template, pair.science, candidates=[(s["x"], s["y"]) for s in chosen])
    record = _record_at(result, variable["x"], variable["y"])
    assert record.single_rms < 1.5
    assert record.kernel_sum == pytest.approx(1.5, rel=0.05)
    assert record.status == "BAD"
    assert record.reason.startswith("spatial-kernel residual")
    assert record.reason_code is RejectReason.SPATIAL_KERNEL_RESIDUAL
    assert abs(record.spatial_mean) > 0.25 or record.spatial_rms > 1.5
    # as in ip_diffim, the outlier biases the first spatial fit (weights scale with flux^2),
    # so some good stars can be rejected with it; the final fit is clean again
    assert result.kernel_cell_set.n_good >= 3
    assert result.psf_matching_kernel.kernel_sum(256, 256) == pytest.approx(1.0, abs=0.02)


def test_clipping_off_keeps_everything():
    pair = make_fake_pair(shape=SHAPE, n_stars=60, seed=31, n_variables=8, variable_factor=3.0,
                          flux_range=(3e3, 3e4), template_noise=2.0, science_noise=2.0)
    stars = _isolated(pair.stars)
    config = PsfMatchConfig(fit_for_background=True, spatial_kernel_order=1, n_star_per_cell=-1,
                            single_kernel_clipping=False, kernel_sum_clipping=False,
                            spatial_kernel_clipping=False)
    result = ImagePsfMatchTask(config).subtract_masked_images(
        pair.template, pair.science, candidates=[(s["x"], s["y"]) for s in stars])
    assert result.kernel_cell_set.n_bad == 0
    assert result.kernel_cell_set.n_good == len(stars)
    assert result.kernel_cell_set.rejection_counts() == {}
