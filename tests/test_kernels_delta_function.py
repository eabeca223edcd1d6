"""``gdi_delta_function_normal_equations`` (``kernels/delta_function.cu``) against its NumPy reference.

The kernel forms the normal equations of delta-function stamp fits with one
weight per stamp from the template and science stamps, without a design
matrix; it must equal :func:`gpudiffim.delta_function.delta_function_normal_equations`
on the science fit region.  Each case runs on the CPU emulator (g++ and
``gpudiffim/_cuda/emulator.h``) at small sizes (kernels up to 7 px, stamps
up to 13 px) with fresh seeds (recorded in the test report) and NaN-poisoned
output buffers, on kernel widths that leave partial strips (``K`` not a
multiple of ``GDI_DF_RX``), threads with several tasks and surplus blocks;
with a GPU the same comparison runs through CuPy (``@pytest.mark.gpu``).
Tolerances are relative to the sums of absolute terms of each element (for
the background column, the stamp's: the reference's box sums are
differences of cumulative sums).
"""

import numpy as np
import pytest

from gpudiffim._backend import use_backend
from gpudiffim._cuda import launch
from gpudiffim._cuda.delta_function import (
    DELTA_FUNCTION_DEFINES,
    DELTA_FUNCTION_SHARED_DOUBLES,
    normal_equations,
    normal_equations_geometry,
)
from gpudiffim._ops import KERNELS, NUMPY
from gpudiffim.delta_function import delta_function_normal_equations

#: Error allowed, relative to the sum of absolute terms of an element.
TOL = 1e-12


def _case(gen, n, size):
    """Template and science stamps (N, S, S) with a bright centre on noise, and one weight per stamp."""
    yy, xx = np.mgrid[:size, :size] - size // 2
    star = 50.0 * np.exp(-(xx**2 + yy**2) / 4.0)
    template = star + gen.normal(size=(n, size, size))
    science = 1.1 * star + gen.normal(size=(n, size, size))
    return template, science, gen.uniform(0.2, 3.0, size=n)


def _reference(template, science, weights, k, background):
    h, fit = k // 2, template.shape[1] - k + 1
    target = science[:, h:h + fit, h:h + fit].reshape(len(science), -1)
    return delta_function_normal_equations(template, target, weights, k, background)


def _scales(template, science, weights, k, background):
    """Sums of absolute terms of every element, the scale of the reference's rounding."""
    matrix, vector = _reference(np.abs(template), np.abs(science), weights, k, background)
    if background:
        stamp_sums = weights * np.abs(template).sum(axis=(1, 2))
        matrix[:, :k * k, k * k] = matrix[:, k * k, :k * k] = stamp_sums[:, None]
    return matrix, vector


def _check(matrix, vector, template, science, weights, k, background, note):
    want_m, want_v = _reference(template, science, weights, k, background)
    scale_m, scale_v = _scales(template, science, weights, k, background)
    for got, want, scale, name in ((matrix, want_m, scale_m, "matrix"), (vector, want_v, scale_v, "vector")):
        got = got.get() if hasattr(got, "get") else np.asarray(got)
        assert got.shape == want.shape, note
        assert np.isfinite(got).all(), f"{name}: unwritten or non-finite output; {note}"
        excess = np.abs(got - want) - TOL * scale
        worst = np.unravel_index(np.argmax(excess), excess.shape)
        assert excess[worst] <= 0, f"{name} at {worst}: got {got[worst]!r}, want {want[worst]!r}; {note}"
    got = matrix.get() if hasattr(matrix, "get") else matrix
    assert np.array_equal(got, got.transpose(0, 2, 1)), f"not exactly symmetric; {note}"


@pytest.mark.parametrize("background", [False, True])
@pytest.mark.parametrize(("n", "k", "size"), [(1, 1, 3), (3, 3, 7), (2, 5, 9), (2, 7, 13), (1, 4, 8)])
def test_emulated_delta_function_normal_equations_match_numpy(emulator, rng, background, n, k, size):
    gen, seed = rng
    template, science, weights = _case(gen, n, size)
    p = k * k + background
    matrix, vector = np.full((n, p, p), np.nan), np.full((n, p), np.nan)   # poisoned: an unwritten element fails
    got = normal_equations(template, science, weights, k, background, out=(matrix, vector))
    assert got[0] is matrix and got[1] is vector
    _check(matrix, vector, template, science, weights, k, background,
           f"seed={seed} n={n} K={k} S={size} background={background}")


def test_emulated_delta_function_few_threads_and_surplus_blocks(emulator, rng):
    """8 threads for 5 x 2 strips (two rounds each), one surplus stamp block and one surplus pair block."""
    gen, seed = rng
    n, k, size = 2, 5, 9
    template, science, weights = _case(gen, n, size)
    p = k * k + 1
    matrix, vector = np.full(n * p * p + 30, np.nan), np.full(n * p + 7, np.nan)
    (stamps, pairs), _ = normal_equations_geometry(n, k)
    launch("gdi_delta_function_normal_equations", (stamps + 1, pairs + 1), (8,),
           (template, science, weights, n, size, k, 1, matrix, vector), defines=DELTA_FUNCTION_DEFINES)
    assert np.isnan(matrix[n * p * p:]).all() and np.isnan(vector[n * p:]).all(), seed
    _check(matrix[:n * p * p].reshape(n, p, p), vector[:n * p].reshape(n, p), template, science, weights, k, True,
           f"seed={seed} few threads")


def test_emulated_delta_function_beyond_the_shared_stage_writes_nothing(emulator, rng):
    gen, seed = rng
    template, science, weights = _case(gen, 2, 7)
    matrix, vector = np.full((2, 10, 10), np.nan), np.full((2, 10), np.nan)
    grid, block = normal_equations_geometry(2, 3)
    launch("gdi_delta_function_normal_equations", grid, block, (template, science, weights, 2, 7, 3, 1, matrix, vector),
           defines=(("GDI_DF_SHARED_DOUBLES", 7 * 7 + 5 * 5 - 1), ("GDI_DF_RX", 4)))
    assert np.isnan(matrix).all() and np.isnan(vector).all(), seed


@pytest.mark.parametrize(("shapes", "k", "match"), [
    (((2, 7, 7), (2, 7, 8), 2), 3, "one shape"),
    (((2, 7, 7), (2, 7, 7), 3), 3, "one weight each"),
    (((2, 7, 7), (2, 7, 7), 2), 9, "1 <= K <= S"),
    (((1, 64, 64), (1, 64, 64), 1), 21, f"S\\^2 \\+ F\\^2 <= {DELTA_FUNCTION_SHARED_DOUBLES}"),
])
def test_delta_function_wrapper_rejects_bad_shapes(shapes, k, match):
    template, science, n_weights = shapes
    with pytest.raises(ValueError, match=match):
        normal_equations(np.zeros(template), np.zeros(science), np.ones(n_weights), k, True)


def test_delta_function_operations_agree(emulator, rng):
    """The operations layer's kernel path (the emulator under ``cuda-emulator``) and its NumPy reference."""
    gen, seed = rng
    template, science, weights = _case(gen, 3, 9)
    with use_backend("cuda-emulator"):
        matrix, vector = KERNELS.delta_function_normal_equations(template, science, weights, 5, True)
    want_m, want_v = NUMPY.delta_function_normal_equations(template, science, weights, 5, True)
    np.testing.assert_allclose(matrix, want_m, rtol=1e-12, atol=1e-12 * np.abs(want_m).max(), err_msg=str(seed))
    np.testing.assert_allclose(vector, want_v, rtol=1e-12, atol=1e-12 * np.abs(want_v).max(), err_msg=str(seed))


@pytest.mark.gpu
def test_cupy_delta_function_normal_equations_match_numpy(rng):
    """On the GPU, at the pipeline's defaults (21 x 21 kernels, 43 px stamps)."""
    import cupy

    gen, seed = rng
    template, science, weights = _case(gen, 6, 43)
    matrix, vector = normal_equations(cupy.asarray(template), cupy.asarray(science), cupy.asarray(weights), 21,
                                      True)
    _check(matrix, vector, template, science, weights, 21, True, f"seed={seed} (GPU)")
