"""Device images measured together by :func:`gpudiffim.variance.correct_variances` as each alone on the host.

On the GPU the variance correction stacks the bands of the template and the
science image (one shape, one set of mask planes) and measures them in one
pass with one read-back.  Through the CuPy stand-in (the CuPy branches and
``kernels/statistics.cu``'s NumPy versions), for an image measured whole and
one sampled in bands, every mode must give the NumPy backend's records
exactly, the same corrected variance planes, and each image's own sky
residual (the noise-correlation measurement reads it later).
"""

import numpy as np
import pytest

from cupy_standin import cupy_standin, to_device
from gpudiffim import MaskedImage
from gpudiffim.variance import MAX_PIXELS, _bands, correct_variances


def _images(shape):
    rng = np.random.default_rng(11)
    images = {}
    for name, (sigma, plane) in {"template": (2.0, 3.0), "science": (3.0, 4.0)}.items():
        image = (rng.normal(100.0, sigma, shape)).astype(np.float32)
        image[shape[0] // 3, shape[1] // 2] += 500.0       # a source left out with its surroundings
        mask = np.zeros(shape, np.int32)
        mask[10:14, 20:30] = 1                             # BAD
        images[name] = MaskedImage(image, mask, np.full(shape, plane, np.float32))
    return images


def _host(array):
    return array.get() if hasattr(array, "get") else np.asarray(array)


@pytest.mark.parametrize("shape", [(300, 256), (1100, 1000)])
@pytest.mark.parametrize("mode", ["scale", "add", "auto"])
def test_stacked_device_images_equal_the_host(shape, mode):
    assert (len(_bands(shape, MAX_PIXELS)) > 1) == (shape[0] * shape[1] > MAX_PIXELS)
    images = _images(shape)
    expected = correct_variances(images, mode=mode, limit=1000.0)
    with cupy_standin(kernels="numpy") as recorder:
        got = correct_variances({name: to_device(image) for name, image in images.items()}, mode=mode,
                                limit=1000.0)
        added = sum(record.applied == "add" for _, record, _ in expected.values())
        assert recorder.syncs == 1 + added       # one read-back for both; the sky variance of each added one
        for name, (image, record, sky) in expected.items():
            device_image, device_record, device_sky = got[name]
            assert device_record == record, name
            np.testing.assert_array_equal(_host(device_image.variance), image.variance)
            np.testing.assert_array_equal(_host(device_sky.residual), sky.residual)
            np.testing.assert_array_equal(_host(device_sky.exclude), sky.exclude)
            np.testing.assert_array_equal(_host(device_sky.sample.inner), sky.sample.inner)
            np.testing.assert_array_equal(device_sky.sample.own_rows, sky.sample.own_rows)
            assert device_sky.n_images == 1 and device_sky.shape == sky.shape
