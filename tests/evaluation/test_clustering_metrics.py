import numpy as np
import pytest

from pipeline.errors import PipelineError
from pipeline.evaluation.clustering_metrics import clustering_metrics, clustering_scores, purity


def test_perfect_clustering_scores_one_even_with_permuted_cluster_ids():
    labels = np.array([1, 1, 2, 2, 3, 3])
    scores = clustering_scores(np.array([5, 5, 0, 0, 2, 2]), labels)
    assert scores == {"nmi": pytest.approx(1.0), "ari": pytest.approx(1.0), "purity": 1.0, "n": 6}


def test_purity_known_value():
    assert purity(np.array([0, 0, 0, 1, 1]), np.array([1, 1, 2, 2, 2])) == pytest.approx(0.8)


def test_buckets_unmatched_and_empty():
    assignment = np.array([0, 0, 1, 1, 2, 0])
    matched = np.array([1, 1, 2, 2, -1, 3])
    freq = {1: "f", 2: "r", 3: "r"}
    out = clustering_metrics(assignment, matched, freq)
    assert out["all"]["n"] == 5 and out["all"]["purity"] == pytest.approx(0.8)
    assert out["f"] == {"nmi": pytest.approx(1.0), "ari": pytest.approx(1.0), "purity": 1.0, "n": 2}
    assert out["r"]["n"] == 3 and out["r"]["purity"] == 1.0  # within the bucket, cluster 0 holds only category 3
    assert out["c"] == {"nmi": None, "ari": None, "purity": None, "n": 0}


def test_unknown_frequency_is_a_pipeline_error():
    with pytest.raises(PipelineError):
        clustering_metrics(np.array([0]), np.array([4]), {1: "r"})
