"""What a subtraction asks of a GPU, counted without one (issue 17's instrument).

The CuPy stand-in (``tests/cupy_standin.py``) runs the pipeline's real CuPy
branches on the CPU and records every CuPy call, kernel launch,
device->host synchronisation and host->device upload.  These tests run one
subtraction at two image sizes and two star densities and hold the counts
to budgets, so that a change which adds a read-back inside a loop over
candidates or batches, or uploads per-candidate data, fails here rather than
on the next GPU.

Budgets (issue 17, item 2; the 4096², 8000-star figures are in
``bench/RESULTS.md``, from ``bench/gpu_budget.py``):

* synchronisations: at most 25 in all, one per stamp-fit batch or
  assessment of the kernel fit, and at most :data:`FIXED_SYNCS` elsewhere
  (the issue asks for 5 there; 7 now: the variance correction 1 for both
  images, detection 3 (label count, footprints, ratings with the FWHM
  sigmas), candidate selection 1, the noise correlation 1, the stage
  timers 1);
* uploads beyond the input planes: bounded and independent of the star
  count (decisions per pass: stamp selections, gather indices);
* CuPy calls: at most the issue's 400 (307-352 at these sizes), and not
  growing by more than a pass's worth with four times more stars.
"""

import numpy as np
import pytest

from cupy_standin import cupy_standin, to_device
from gpudiffim import ImagePsfMatchTask, PsfMatchConfig
from gpudiffim.testing import make_fake_pair

#: (size, (few stars, many stars)).
CASES = {384: (60, 240), 768: (250, 1000)}
#: Synchronisations outside the kernel fit's per-batch read-backs (ratchet; issue target: 5).
FIXED_SYNCS = 7
#: CuPy calls of one subtraction at these sizes (the issue's budget).
CALL_CEILING = 400
#: Calls one more clipping pass may add (a stamp-fit batch, its residuals and its read-back).
CALLS_PER_PASS = 40
#: Upload ceiling beyond the input planes, bytes (per-pass decisions; ratchet, issue target: a few kB;
#: 9.9-11.1 kB measured at these sizes now that the detection centres stay on the device and a batch
#: uploads only its selection, a mask or an int16 index: basis factors, gather indices, selections).
UPLOAD_CEILING = 12_000


def _count(size, stars):
    pair = make_fake_pair(shape=(size, size), n_stars=stars, seed=3)
    with cupy_standin(kernels="numpy") as recorder:
        template, science = to_device(pair.template), to_device(pair.science)
        recorder.events.clear()
        result = ImagePsfMatchTask(PsfMatchConfig()).subtract_masked_images(template, science)
    passes = recorder.sites("sync", "kernel fit")          # one read-back per stamp-fit batch and assessment
    return recorder, result, sum(passes.values())


@pytest.fixture(scope="module", params=sorted(CASES))
def counts(request):
    size = request.param
    return size, [_count(size, stars) for stars in CASES[size]]


def test_synchronisations_stay_within_budget(counts):
    size, runs = counts
    for recorder, result, passes in runs:
        assert recorder.syncs <= 25, (size, recorder.sites("sync").most_common())
        assert recorder.syncs - passes <= FIXED_SYNCS, (size, recorder.sites("sync").most_common())
        assert result.kernel_cell_set.n_good > 10
    (few, _, passes_few), (many, _, passes_many) = runs
    assert many.syncs <= few.syncs + 2 * max(0, passes_many - passes_few) + 1


def test_no_read_back_inside_a_loop_over_candidates(counts):
    """Every sync site of the kernel fit is a per-batch read-back, never per candidate."""
    _, runs = counts
    for recorder, result, passes in runs:
        assert passes <= 8 < len(result.kernel_cell_set)


def test_uploads_do_not_grow_with_the_candidates(counts):
    size, runs = counts
    (few, _, _), (many, _, _) = runs
    for recorder in (few, many):
        assert recorder.bytes("h2d") <= UPLOAD_CEILING, recorder.sites("h2d").most_common(8)
    assert many.bytes("h2d") <= few.bytes("h2d") * 1.5 + 50_000


def test_calls_do_not_grow_with_the_candidates(counts):
    size, runs = counts
    (few, _, passes_few), (many, _, passes_many) = runs
    for recorder in (few, many):
        assert recorder.calls <= CALL_CEILING, (size, recorder.sites("call").most_common(10))
    assert many.calls <= few.calls + CALLS_PER_PASS * max(1, passes_many - passes_few)


def test_stage_table_adds_up(counts):
    _, runs = counts
    recorder = runs[0][0]
    rows = recorder.table()
    total = rows[-1]
    assert total[0] == "total"
    assert sum(row[1] for row in rows[:-1]) == total[1] == recorder.calls
    assert sum(row[3] for row in rows[:-1]) == total[3] == recorder.syncs
    assert np.isfinite(total[6]) and total[6] >= 0


def test_device_memory_is_counted_per_buffer():
    """The stand-in's memory count: each buffer once (views share it), released when freed, peak kept."""
    import cupy_standin

    with cupy_standin.cupy_standin(kernels="numpy") as recorder:
        cupy = cupy_standin._CUPY
        start = recorder.device_bytes
        a = cupy.zeros((1000, 125))                     # 1 MB
        view = a[10:20]
        assert recorder.device_bytes - start == 1_000_000
        b = a + 1.0                                     # a new 1 MB buffer
        assert recorder.device_bytes - start == 2_000_000
        del a, view, b
        assert recorder.device_bytes == start
        assert recorder.peak_device_bytes - start >= 2_000_000


def test_term_batches_bound_the_full_image_memory(monkeypatch):
    """Term transforms batched by TERM_BATCH_BYTES (issue 17: <= 2 GB at 4096^2; 1983 -> 1242 MB measured
    there): one term per batch gives the same image bit for bit, at a lower peak of the stage."""
    from gpudiffim import _ops

    pair = make_fake_pair(shape=(384, 384), n_stars=60, seed=3)
    runs = []
    for limit in (_ops.TERM_BATCH_BYTES, 1):
        monkeypatch.setattr(_ops, "TERM_BATCH_BYTES", limit)
        with cupy_standin(kernels="numpy") as recorder:
            template, science = to_device(pair.template), to_device(pair.science)
            recorder.reset_peak()
            result = ImagePsfMatchTask(PsfMatchConfig()).subtract_masked_images(template, science)
            image = result.subtracted_image.image._a.copy()
            variance = result.subtracted_image.variance._a.copy()
        runs.append((image, variance, recorder.stage_peak_bytes["full-image convolution"],
                     recorder.count("launch", "full-image convolution")))
    (image, variance, peak, launches), (image_1, variance_1, peak_1, launches_1) = runs
    np.testing.assert_array_equal(image_1, image)
    np.testing.assert_array_equal(variance_1, variance)
    assert launches_1 > launches                        # more batches, each with its accumulation
    assert peak_1 < peak


def test_delta_function_basis_is_formed_on_the_device():
    """The delta-function basis goes to the GPU as the identity formed there, and the regularisation
    matrix once per solve (the lambda choice takes the same copy): no upload of either per batch or twice."""
    config = PsfMatchConfig(kernel_basis_set="delta-function", kernel_size=9, spatial_kernel_order=1)
    n_basis = config.kernel_size ** 2
    penalty_bytes = (n_basis + 1) ** 2 * 8             # H with the background row and column
    pair = make_fake_pair(shape=(256, 256), n_stars=80, seed=4)
    with cupy_standin(kernels="numpy") as recorder:
        template, science = to_device(pair.template), to_device(pair.science)
        recorder.events.clear()
        ImagePsfMatchTask(config).subtract_masked_images(template, science)
    large = [e.nbytes for e in recorder.events if e.kind == "h2d" and e.nbytes >= n_basis ** 2 * 8]
    assert large == [penalty_bytes], recorder.sites("h2d").most_common(8)   # H once; never the 81 x 9 x 9 basis
    # the rest: the decisions of the passes and each spatial iteration's PCA basis (10 x 81 values)
    assert recorder.bytes("h2d") - penalty_bytes < 40_000, recorder.sites("h2d").most_common(8)
