"""Clustering quality on matched proposals: NMI, ARI and purity, overall and per LVIS frequency bucket.

Only matched proposals (matched category != -1) count; their matched category is the true label.
A bucket ('r', 'c', 'f') keeps the proposals whose matched category has that LVIS frequency, and the
scores are computed on that subset alone (purity: each cluster's majority within the subset).
NMI uses scikit-learn's default (arithmetic) normalisation. With no proposal the scores are None.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from pipeline.errors import PipelineError

FREQUENCY_BUCKETS = ("r", "c", "f")


def purity(assignment: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of samples that carry their cluster's most frequent label."""
    assignment, labels = np.asarray(assignment), np.asarray(labels)
    if len(labels) == 0:
        raise PipelineError("purity of an empty set is undefined")
    _, cluster = np.unique(assignment, return_inverse=True)
    _, label = np.unique(labels, return_inverse=True)
    table = np.zeros((cluster.max() + 1, label.max() + 1), dtype=np.int64)
    np.add.at(table, (cluster, label), 1)
    return float(table.max(axis=1).sum() / len(labels))


def clustering_scores(assignment: np.ndarray, labels: np.ndarray) -> dict:
    """{"nmi", "ari", "purity", "n"} of a clustering against true labels (None scores when n == 0)."""
    assignment, labels = np.asarray(assignment), np.asarray(labels)
    n = int(len(labels))
    if n == 0:
        return {"nmi": None, "ari": None, "purity": None, "n": 0}
    return {
        "nmi": float(normalized_mutual_info_score(labels, assignment)),
        "ari": float(adjusted_rand_score(labels, assignment)),
        "purity": purity(assignment, labels),
        "n": n,
    }


def clustering_metrics(
    assignment: np.ndarray, matched_category: np.ndarray, category_frequency: Mapping[int, str]
) -> dict[str, dict]:
    """{"all": scores, "r": ..., "c": ..., "f": ...} on matched proposals; `category_frequency` maps id -> r/c/f."""
    assignment = np.asarray(assignment)
    matched_category = np.asarray(matched_category)
    if assignment.shape != matched_category.shape:
        raise PipelineError(f"{len(assignment)} cluster assignments for {len(matched_category)} matched proposals")
    keep = matched_category >= 0
    assignment, labels = assignment[keep], matched_category[keep]
    unknown = set(np.unique(labels).tolist()) - set(category_frequency)
    if unknown:
        raise PipelineError(f"no LVIS frequency for matched categories {sorted(unknown)[:5]}")
    freq = np.array([category_frequency[int(c)] for c in labels], dtype="<U1")
    out = {"all": clustering_scores(assignment, labels)}
    for bucket in FREQUENCY_BUCKETS:
        sel = freq == bucket
        out[bucket] = clustering_scores(assignment[sel], labels[sel])
    return out
