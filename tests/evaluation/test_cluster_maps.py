import numpy as np
import pytest

from pipeline.errors import PipelineError
from pipeline.evaluation.cluster_maps import count_matrix, hungarian_map, labels_from_map, majority_map


def test_count_matrix_ignores_unmatched_and_follows_category_order():
    assignment = np.array([0, 0, 1, 2, 1, 2])
    matched = np.array([10, -1, 20, 10, 30, 10])
    counts = count_matrix(assignment, matched, 4, [30, 10, 20])
    assert counts.tolist() == [[0, 1, 0], [1, 0, 1], [0, 2, 0], [0, 0, 0]]


def test_count_matrix_rejects_unknown_category_and_bad_cluster():
    with pytest.raises(PipelineError):
        count_matrix(np.array([0]), np.array([99]), 1, [1, 2])
    with pytest.raises(PipelineError):
        count_matrix(np.array([3]), np.array([1]), 2, [1, 2])


def test_majority_many_to_one_ties_to_lowest_id_and_skips_empty_clusters():
    counts = np.array([[3, 1, 0], [0, 0, 0], [2, 2, 0], [0, 4, 4]])
    assert majority_map(counts, [10, 20, 30]) == {0: 10, 2: 10, 3: 20}
    # same ties with columns not sorted by id: still the lowest id
    assert majority_map(counts[:, ::-1], [30, 20, 10]) == {0: 10, 2: 10, 3: 20}


def test_hungarian_one_to_one_rectangular_tall():
    counts = np.array([[5, 0], [4, 1], [0, 0]])  # 3 clusters, 2 categories
    assert hungarian_map(counts, [7, 8]) == {0: 7, 1: 8}


def test_hungarian_one_to_one_rectangular_wide_maximises_total():
    counts = np.array([[2, 5, 0], [0, 4, 0]])  # greedy would give 0->8 (5) then 1->nothing: total 5 < 6
    assert hungarian_map(counts, [7, 8, 9]) == {0: 7, 1: 8}


def test_hungarian_drops_zero_pairs_and_handles_empty():
    assert hungarian_map(np.array([[3, 0], [0, 0]]), [1, 2]) == {0: 1}
    assert hungarian_map(np.zeros((0, 2), dtype=int), [1, 2]) == {}
    assert majority_map(np.zeros((2, 0), dtype=int), []) == {}


def test_labels_from_map():
    assert labels_from_map(np.array([0, 2, 1, 2]), {2: 30, 0: 10}).tolist() == [10, 30, -1, 30]
    assert labels_from_map(np.array([], dtype=int), {0: 1}).tolist() == []
