"""Stamp extraction: the cutter and the batch hold the image pixels around each centre, or refuse."""

import numpy as np
import pytest

from gpudiffim import MaskedImage
from gpudiffim.cutouts import cut_stamps
from gpudiffim.stamps import StampBatch


def _image(rng, shape, xy0):
    return MaskedImage(rng.normal(size=shape).astype(np.float32), rng.integers(0, 4, shape).astype(np.int32),
                       rng.uniform(1, 2, shape).astype(np.float32), xy0=xy0)


def test_stamps_are_the_pixels_around_each_centre():
    rng = np.random.default_rng(4)
    xy0 = (100, -20)
    template, science = _image(rng, (40, 50), xy0), _image(rng, (40, 50), xy0)
    centres = np.array([(104, -16), (145, 15), (120, 0)])          # parent (x, y); corners included
    batch = StampBatch.extract(centres, template, science, 4)
    assert len(batch) == 3 and batch.template.dtype == np.float64 and batch.science_mask.dtype == np.int32
    for k, (x, y) in enumerate(centres):
        box = np.s_[y - xy0[1] - 4:y - xy0[1] + 5, x - xy0[0] - 4:x - xy0[0] + 5]
        np.testing.assert_array_equal(batch.template[k], template.image[box])
        np.testing.assert_array_equal(batch.science_variance[k], science.variance[box])
        np.testing.assert_array_equal(batch.template_mask[k], template.mask[box])


@pytest.mark.parametrize("centre", [(103, 0), (146, 0), (120, -17), (120, 16)])
def test_stamp_outside_the_image_is_an_error(centre):
    rng = np.random.default_rng(5)
    template, science = _image(rng, (40, 50), (100, -20)), _image(rng, (40, 50), (100, -20))
    with pytest.raises(ValueError, match=r"1 stamp\(s\) of half-size 4 do not fit in the image"):
        StampBatch.extract([(120, 0), centre], template, science, 4)


def _reference_stamp(plane, row, col, half_rows, half_cols, clamp):
    rows = np.arange(row - half_rows, row + half_rows + 1)
    cols = np.arange(col - half_cols, col + half_cols + 1)
    if clamp:
        rows, cols = np.clip(rows, 0, plane.shape[0] - 1), np.clip(cols, 0, plane.shape[1] - 1)
    return plane[np.ix_(rows, cols)]


@pytest.mark.parametrize("radius", [0, 3, (0, 2), (4, 1)])
@pytest.mark.parametrize("clamp", [False, True])
def test_cut_stamps_is_the_box_around_each_centre(radius, clamp):
    rng = np.random.default_rng(6)
    plane = rng.normal(size=(23, 31)).astype(np.float32)[:, 2:29]      # a non-contiguous view
    half_rows, half_cols = (radius, radius) if np.ndim(radius) == 0 else radius
    centres = [(half_rows, half_cols), (22 - half_rows, 26 - half_cols), (11, 13)]
    if clamp:
        centres += [(0, 0), (22, 26), (-2, 30)]                       # beyond the edges
    got = cut_stamps(plane, centres, radius, clamp=clamp)
    assert got.shape == (len(centres), 2 * half_rows + 1, 2 * half_cols + 1) and got.dtype == plane.dtype
    for k, (row, col) in enumerate(centres):
        np.testing.assert_array_equal(got[k], _reference_stamp(plane, row, col, half_rows, half_cols, clamp))
    assert cut_stamps(plane, np.zeros((0, 2), int), radius, clamp=clamp).shape == (0, 2 * half_rows + 1,
                                                                                2 * half_cols + 1)


@pytest.mark.parametrize("centre", [(2, 10), (20, 10), (10, 2), (10, 24), (-5, -5)])
def test_cut_stamps_refuses_a_stamp_outside_unless_clamped(centre):
    plane = np.zeros((23, 27))
    with pytest.raises(ValueError, match=r"1 stamp\(s\) of half-size 3 do not fit in the image of shape \(23, 27\)"):
        cut_stamps(plane, [(10, 10), centre], 3)
    assert cut_stamps(plane, [(10, 10), centre], 3, clamp=True).shape == (2, 7, 7)
