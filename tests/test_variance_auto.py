"""``scale_variance(mode="auto")``: scale a roughly right plane, add a missing sky term."""

import numpy as np
import pytest

from gpudiffim import MaskedImage
from gpudiffim.variance import AUTO_SCALE_MAX, scale_variance


def _image(sky_sigma, plane_variance, seed=0, shape=(200, 200)):
    rng = np.random.default_rng(seed)
    image = rng.normal(0.0, sky_sigma, size=shape)
    return MaskedImage(image, variance=np.full(shape, plane_variance))


def test_auto_scales_a_plane_off_by_a_small_factor():
    image = _image(sky_sigma=1.2, plane_variance=1.0)        # true factor 1.44
    auto, factor = scale_variance(image, mode="auto")
    scaled, expected = scale_variance(image, mode="scale")
    assert factor == pytest.approx(expected) and factor == pytest.approx(1.44, rel=0.05)
    assert np.array_equal(auto.variance, scaled.variance)


def test_auto_adds_a_missing_sky_term():
    image = _image(sky_sigma=10.0, plane_variance=4.0)       # factor 25 > AUTO_SCALE_MAX
    auto, added = scale_variance(image, mode="auto", limit=1000.0)
    expected, constant = scale_variance(image, mode="add", limit=1000.0)
    assert 100.0 / 4.0 > AUTO_SCALE_MAX
    assert added == pytest.approx(constant) and added == pytest.approx(96.0, rel=0.05)
    assert np.array_equal(auto.variance, expected.variance)


def test_invalid_mode():
    from gpudiffim import ConfigurationError

    with pytest.raises(ConfigurationError, match="auto"):
        scale_variance(_image(1.0, 1.0), mode="multiply")
