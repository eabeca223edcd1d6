"""Refactoring guard: three configurations give the recorded decisions, coefficients and images.

``tests/data/solve_snapshots.json`` holds, for a simulated 256x256 pair and
three configurations (Alard-Lupton with a background, delta-function,
Alard-Lupton with a PCA spatial basis), every candidate's status and reject
reason (compared exactly), the spatial kernel and background coefficients
and the kernel sum at the centre (to 1e-9 of the largest coefficient: the
arithmetic may be reordered by a refactoring or by another BLAS, and the
stamp systems' condition numbers of ~1e8 turn 1e-16 into ~1e-8 of a small
coefficient, no more), and summaries of the
float32 difference image and variance (to 1e-6 relative: float32 rounding of
an FFT or accumulation done in another order).  A change that alters the algorithm must
regenerate the file on purpose::

    GPUDIFFIM_UPDATE_SNAPSHOTS=1 python -m pytest tests/test_snapshots.py

and say why in its commit.  The snapshot was first recorded at commit
bd3a2f9, before the operations layer took the per-solve choice and the
quality report stopped keeping the input images.
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from gpudiffim import ImagePsfMatchTask, PsfMatchConfig
from gpudiffim.testing import make_fake_pair

SNAPSHOTS = Path(__file__).parent / "data" / "solve_snapshots.json"
UPDATE = os.environ.get("GPUDIFFIM_UPDATE_SNAPSHOTS") == "1"
RTOL = 1e-9
IMAGE_RTOL = 1e-6
IMAGE_KEYS = {"difference_sum", "difference_sum_of_squares", "difference_weighted_sum", "variance_sum"}

CONFIGS = {
    "alard-lupton+background": {"fit_for_background": True, "spatial_kernel_order": 1},
    "delta-function": {"kernel_basis_set": "delta-function", "kernel_size": 9, "fit_for_background": True,
                       "spatial_kernel_order": 1, "use_pca_for_spatial_kernel": False},
    "alard-lupton+pca": {"fit_for_background": True, "spatial_kernel_order": 1,
                         "use_pca_for_spatial_kernel": True},
}


@pytest.fixture(scope="module")
def pair():
    return make_fake_pair(shape=(256, 256), n_stars=90, seed=17, n_variables=4)


def _snapshot(result):
    cells = result.kernel_cell_set
    difference = result.subtracted_image.image.astype(np.float64)
    variance = result.subtracted_image.variance.astype(np.float64)
    finite = np.isfinite(difference)
    return {
        "id": cells.column("id").tolist(),
        "status": cells.column("status").tolist(),
        "reason_code": [int(code) for code in cells.column("reason_code")],
        "kernel_coefficients": result.psf_matching_kernel.coefficients.ravel().tolist(),
        "background_coefficients": np.asarray(result.background_model.coefficients).ravel().tolist(),
        "kernel_sum_at_centre": float(result.diagnostics["kernel_sum_at_centre"]),
        "difference_sum": float(difference[finite].sum()),
        "difference_sum_of_squares": float((difference[finite] ** 2).sum()),
        "difference_weighted_sum": float((difference[finite] * np.arange(difference.size)[finite.ravel()]
                                          / difference.size).sum()),
        "variance_sum": float(variance[finite].sum()),
        "mask_or": int(np.bitwise_or.reduce(result.subtracted_image.mask.ravel())),
        "mask_sum": int(result.subtracted_image.mask.astype(np.int64).sum()),
    }


@pytest.fixture(scope="module")
def recorded():
    if UPDATE:
        return {}
    if not SNAPSHOTS.exists():
        pytest.fail(f"{SNAPSHOTS} is missing: GPUDIFFIM_UPDATE_SNAPSHOTS=1 records it")
    return json.loads(SNAPSHOTS.read_text())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_results_match_the_snapshot(name, pair, recorded):
    result = ImagePsfMatchTask(PsfMatchConfig(**CONFIGS[name])).subtract_masked_images(pair.template,
                                                                                     pair.science)
    got = _snapshot(result)
    if UPDATE:
        data = json.loads(SNAPSHOTS.read_text()) if SNAPSHOTS.exists() else {}
        data[name] = got
        SNAPSHOTS.parent.mkdir(exist_ok=True)
        SNAPSHOTS.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        return
    want = recorded[name]
    assert got.keys() == want.keys()
    for key in ("id", "status", "reason_code", "mask_or", "mask_sum"):
        assert got[key] == want[key], key
    assert 0 < got["status"].count("GOOD")
    for key in sorted(set(got) - {"id", "status", "reason_code", "mask_or", "mask_sum"}):
        rtol = IMAGE_RTOL if key in IMAGE_KEYS else RTOL
        atol = max(1e-12, RTOL * float(np.max(np.abs(want[key]))))
        np.testing.assert_allclose(got[key], want[key], rtol=rtol, atol=atol, err_msg=key)
