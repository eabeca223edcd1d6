"""Stamp extraction: the batch holds the image pixels around each centre, or refuses."""

import numpy as np
import pytest

from gpudiffim import MaskedImage
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
