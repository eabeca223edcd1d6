"""The spatial cell set as arrays: ordering, visits, rejection, the frozen view.

The reference is the object model of ``afw``'s ``SpatialCellSet`` written
out plainly: a list per cell, sorted by rating (later insertion first among
equal ratings), visited by taking the first ``n_max`` non-BAD entries.
"""

import numpy as np
import pytest

from gpudiffim.cellset import (
    BAD,
    GOOD,
    UNKNOWN,
    Candidates,
    KernelCellSet,
    RejectReason,
    SpatialCellSet,
    rejection_counts,
)
from gpudiffim.errors import ConfigurationError

BBOX = (10, 20, 409, 319)          # 400 x 300 px, cells of 100 x 80: a 4 x 4 grid, last row short


def _random_candidates(rng, n):
    x0, y0, x1, y1 = BBOX
    ratings = rng.choice([5.0, 7.5, 9.0, 20.0], n)       # many ties, to test their order
    return Candidates.from_arrays(rng.permutation(n) + 100, rng.integers(x0, x1 + 1, n),
                                  rng.integers(y0, y1 + 1, n), ratings)


def _reference_cells(candidates):
    """Per cell, the candidate positions (in input order) sorted as afw's insertion does."""
    x0, y0 = BBOX[:2]
    cells = {}
    for k in range(len(candidates)):
        cell = (candidates.y[k] - y0) // 80 * 4 + (candidates.x[k] - x0) // 100
        members = cells.setdefault(int(cell), [])
        # insert before the first existing entry of equal or lower rating
        at = next((i for i, j in enumerate(members) if candidates.rating[j] <= candidates.rating[k]),
                  len(members))
        members.insert(at, k)
    return [cells[c] for c in sorted(cells)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cell_order_matches_insertion_model(seed):
    rng = np.random.default_rng(seed)
    candidates = _random_candidates(rng, 300)
    cell_set = SpatialCellSet(BBOX, 100, 80, candidates)
    expected = [k for cell in _reference_cells(candidates) for k in cell]
    np.testing.assert_array_equal(cell_set.id, candidates.id[expected])
    np.testing.assert_array_equal(cell_set.x, candidates.x[expected])
    assert np.all(np.diff(cell_set.cell) >= 0)
    assert cell_set.n_cells_x == 4 and cell_set.n_cells_y == 4
    assert cell_set.count(UNKNOWN) == 300 and cell_set.count(GOOD) == 0


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n_max", [-1, 1, 3])
def test_visit_takes_first_usable_per_cell(seed, n_max):
    rng = np.random.default_rng(seed)
    cell_set = SpatialCellSet(BBOX, 100, 80, _random_candidates(rng, 300))
    for _ in range(4):          # reject some of those visited, as the solver does, and visit again
        visited = cell_set.visit(n_max)
        expected, ranks = [], np.zeros(len(cell_set), dtype=int)
        for cell in np.unique(cell_set.cell):
            usable = np.flatnonzero((cell_set.cell == cell) & (cell_set.status != 2))
            expected.extend(usable if n_max <= 0 else usable[:n_max])
            ranks[usable] = np.arange(1, len(usable) + 1)
        np.testing.assert_array_equal(visited, expected)
        np.testing.assert_array_equal(cell_set.ranks(), ranks)      # what the GPU path's spares are chosen by
        rejected = visited[rng.random(len(visited)) < 0.3]
        cell_set.mark_good(visited)
        cell_set.reject(rejected, RejectReason.KERNEL_SUM, [f"test {k}" for k in rejected])
    assert cell_set.count(BAD) > 0
    assert cell_set.count(GOOD) + cell_set.count(BAD) + cell_set.count(UNKNOWN) == len(cell_set)
    bad = np.flatnonzero(cell_set.status == 2)
    assert cell_set.reason[bad].tolist() == [f"test {k}" for k in bad]
    assert np.all(cell_set.reason_code[bad] == RejectReason.KERNEL_SUM)
    assert np.all(cell_set.reason_code[cell_set.status != 2] == RejectReason.NONE)


def test_has_usable_cells_and_counts():
    candidates = Candidates.from_arrays([1, 2], [10, 409], [20, 319], [1.0, 2.0])
    cell_set = SpatialCellSet(BBOX, 100, 80, candidates)
    assert cell_set.has_usable_cells()
    cell_set.reject(np.array([0, 1]), RejectReason.NOT_FITTED, "gone")
    assert not cell_set.has_usable_cells()
    assert cell_set.count(BAD) == 2 and cell_set.visit(5).size == 0


def test_candidate_outside_the_box_is_an_error():
    candidates = Candidates.from_arrays([1], [410], [20], [1.0])
    with pytest.raises(ConfigurationError, match=r"candidate at \(410, 20\) is outside"):
        SpatialCellSet(BBOX, 100, 80, candidates)


def test_unequal_candidate_arrays_are_an_error():
    with pytest.raises(ConfigurationError, match="equal length"):
        Candidates.from_arrays([1, 2], [3], [4, 5], [1.0, 2.0])


def test_fractional_centres_are_an_error():
    with pytest.raises(ConfigurationError, match="candidate x values must be integers"):
        Candidates.from_arrays([1], [10.5], [20], [1.0])
    assert Candidates.from_arrays([1], [10.0], [20], [1.0]).x.tolist() == [10]


def test_frozen_view_records_columns_and_table():
    candidates = Candidates.from_arrays([7, 8, 9], [15, 200, 300], [25, 100, 300], [3.0, 2.0, 1.0])
    cell_set = SpatialCellSet(BBOX, 100, 80, candidates)
    solution = cell_set.solution("orig", 2)
    fitted = np.array([0, 2])
    solution.store(fitted, np.array([[1.0, 0.5], [0.9, 0.1]]), np.array([3.0, 4.0]),
                   np.array([1.0, 0.9]), batch=0)
    cell_set.record_stats("single", fitted, np.array([0.1, 0.7]), np.array([1.1, 2.0]), np.array([50, 60]))
    cell_set.mark_good(fitted[:1])
    cell_set.reject(fitted[1:], RejectReason.SINGLE_KERNEL_RESIDUAL, "single-kernel residual rms 2 > 1.5")
    frozen = KernelCellSet.from_cell_set(cell_set, {RejectReason.STAMP_OUTSIDE: 4})
    cell_set.reject(np.arange(3), RejectReason.KERNEL_SUM, "changed afterwards")  # the view is a copy
    records = frozen.candidates
    assert [r.id for r in records] == [7, 8, 9]
    assert [r.status for r in records] == [GOOD, UNKNOWN, BAD]
    assert records[2].reason == "single-kernel residual rms 2 > 1.5" and records[0].reason == ""
    assert records[2].reason_code is RejectReason.SINGLE_KERNEL_RESIDUAL
    assert records[0].reason_code is RejectReason.NONE and records[1].reason_code is RejectReason.NONE
    assert frozen.rejection_counts() == {"single-kernel residual": 1}
    assert frozen.selection_rejects == {RejectReason.STAMP_OUTSIDE: 4}
    assert records[0].coefficients == (1.0, 0.5) and records[1].coefficients == ()
    assert records[2].pca_coefficients == ()
    assert (records[2].kernel_sum, records[2].background, records[2].n_pixels) == (0.9, 4.0, 60)
    assert np.isnan(records[1].kernel_sum) and np.isnan(records[0].spatial_rms)
    assert frozen.n_good == 1 and frozen.n_bad == 1 and len(frozen) == 3
    np.testing.assert_array_equal(frozen.column("single_rms"), [1.1, np.nan, 2.0])
    with pytest.raises(KeyError, match="coefficients"):
        frozen.column("coefficients")
    table = frozen.to_table()
    assert table["status"].tolist() == [GOOD, UNKNOWN, BAD] and table["cell"].tolist() == [0, 5, 14]
    assert table.colnames[table.colnames.index("reason") + 1] == "reason_code"
    assert table["reason_code"].tolist() == [0, 0, RejectReason.SINGLE_KERNEL_RESIDUAL]
    np.testing.assert_array_equal(frozen.column("reason_code"), [0, 0, 7])


# ----------------------------------------------------------------------------
# Rejection reasons: codes, labels, counting


def test_reject_reason_codes_and_labels_are_unique():
    members = list(RejectReason)
    assert len({int(m) for m in members}) == len(members)
    assert len({m.label for m in members}) == len(members)
    assert RejectReason.NONE == 0 and RejectReason.NONE.label == ""
    assert all(m.label for m in members if m is not RejectReason.NONE)
    assert max(members) <= np.iinfo(np.int8).max            # the cell set stores int8 codes
    assert all(RejectReason(int(m)) is m for m in members)


def test_rejection_counts_by_label_sorted_without_none():
    codes = [RejectReason.SPATIAL_KERNEL_RESIDUAL, 0, RejectReason.KERNEL_SUM, RejectReason.SINGLE_KERNEL_RESIDUAL,
             RejectReason.KERNEL_SUM, RejectReason.CONDITION_NUMBER]
    assert rejection_counts(codes) == {"condition number": 1, "kernel sum": 2, "single-kernel residual": 1,
                                       "spatial-kernel residual": 1}
    assert list(rejection_counts(codes)) == sorted(rejection_counts(codes))
    assert rejection_counts([]) == {} and rejection_counts(np.zeros(5, np.int8)) == {}


def test_cell_set_counts_rejections_by_code():
    rng = np.random.default_rng(4)
    cell_set = SpatialCellSet(BBOX, 100, 80, _random_candidates(rng, 40))
    cell_set.mark_good(np.arange(40))
    cell_set.reject(np.arange(0, 6), RejectReason.SINGLE_KERNEL_RESIDUAL,
                    [f"single-kernel residual rms {2 + k} > 1.5" for k in range(6)])
    cell_set.reject(np.array([10, 11]), np.array([RejectReason.CONDITION_NUMBER, RejectReason.FIT_FAILED]),
                    ["condition number 1e+09 > 1e+07", "stamp fit failed: lstsq"])
    cell_set.reject(np.array([20]), RejectReason.KERNEL_SUM, "kernel sum 3 differs from the clipped mean 1")
    assert cell_set.rejection_counts() == {"condition number": 1, "kernel sum": 1, "single-kernel residual": 6,
                                           "stamp fit": 1}
    frozen = KernelCellSet.from_cell_set(cell_set, {})
    assert frozen.rejection_counts() == cell_set.rejection_counts()
    assert sum(frozen.rejection_counts().values()) == frozen.n_bad == 9


def test_reject_needs_a_reason_code():
    cell_set = SpatialCellSet(BBOX, 100, 80, Candidates.from_arrays([1, 2], [10, 409], [20, 319], [1.0, 2.0]))
    with pytest.raises(ValueError, match="reason code"):
        cell_set.reject(np.array([0]), RejectReason.NONE, "no reason")
    with pytest.raises(ValueError, match="reason code"):
        cell_set.reject(np.array([0, 1]), np.array([RejectReason.KERNEL_SUM, 0]), ["a", "b"])
    assert cell_set.count(BAD) == 0


def test_all_rejected_message_keeps_its_wording():
    from gpudiffim.solve import _all_rejected_message

    cell_set = SpatialCellSet(BBOX, 100, 80, Candidates.from_arrays([1, 2, 3], [10, 200, 409], [20, 100, 319],
                                                                    [1.0, 2.0, 3.0]))
    cell_set.reject(np.array([0, 2]), RejectReason.SINGLE_KERNEL_RESIDUAL, "single-kernel residual rms 2 > 1.5")
    cell_set.reject(np.array([1]), RejectReason.CONDITION_NUMBER, "condition number 1e+09 > 1e+07")
    assert _all_rejected_message(cell_set) == ("every kernel candidate was rejected (1 by condition number, "
                                               "2 by single-kernel residual); see the candidates' reasons")
